"""A short description of the machine a result was measured on, for reports."""

from __future__ import annotations

import datetime
import os
import platform

import torch


def describe_machine() -> dict[str, str | int | float]:
    """Cores, memory, processor, accelerator, library versions and the UTC time now."""
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU only)"
    return {
        "cpus": os.cpu_count() or 0,
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(memory_gib, 1),
        "processor": platform.processor() or platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "accelerator": device,
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
    }


def machine_line(machine: dict[str, str | int | float]) -> str:
    return (
        f"{machine['cpus']} CPU cores ({machine['processor']}), {machine['memory_gib']} GiB, "
        f"accelerator: {machine['accelerator']}; Python {machine['python']}, "
        f"torch {machine['torch']}; {machine['date_utc']} UTC"
    )
