"""A short description of the machine a result was measured on, for reports."""

from __future__ import annotations

import datetime
import os
import platform

import torch


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or "" where it is not known."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def describe_machine() -> dict[str, str | int | float]:
    """Cores, memory, processor (its model and the vector instructions torch uses),
    accelerator, library versions and the UTC time now."""
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU only)"
    return {
        "cpus": os.cpu_count() or 0,
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(memory_gib, 1),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "accelerator": device,
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
    }


def machine_line(machine: dict[str, str | int | float]) -> str:
    return (
        f"{machine['cpus']} CPU cores ({_processor(machine)}), {machine['memory_gib']} GiB, "
        f"accelerator: {machine['accelerator']}; Python {machine['python']}, "
        f"torch {machine['torch']}; {machine['date_utc']} UTC"
    )


def _processor(machine: dict[str, str | int | float]) -> str:
    """``x86_64``, or ``x86_64, AMD EPYC, AVX2`` where the model and torch's vector
    instructions were recorded (results from before did not)."""
    parts = [machine["processor"], machine.get("cpu_model"), machine.get("cpu_capability")]
    return ", ".join(str(part) for part in parts if part)
