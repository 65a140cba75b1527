"""The row adapters' low-rank update ``(x A^T) B^T``: a fused CPU kernel where it runs, else
BLAS.

BLAS runs the update as two narrow GEMMs that use a fraction of a core and barely spread over
threads, after the layer's GEMM, reading its input and reading and writing its output again.
The fused kernel (``lowrank_kernel.cpp``, built for the CPU's instruction set: AVX-512, two
rows at a time, or AVX2 with FMA, one row at a time; rows split among torch's threads) runs a
pass of one task in one call per layer (:func:`linear_lowrank`): the output is written as the
bias plus the update while the input is fresh in cache, then the GEMM accumulates ``x W^T``
into it, reading it once inside the GEMM. Measured on the demo's MiniLM with AVX-512, a batch-1
forward of 128 tokens: +4.1% (3.8..4.5%) over the plain forward (``bench load --costs-only``, 2
threads); by hand, side by side, +3.7 to 4.6% on one thread and +4.0 to 5.4% on two, against
+7.1 to 8.4% and +11.8 to 13.6% on BLAS (serve_profile.md, sixth session; AVX2's in its ninth).
Mixed passes add each task's update after the GEMM (:func:`add_lowrank_`).

The kernel is compiled on first use with torch's extension builder (the machine's C++ compiler
and ninja) in a scratch folder and moved whole into :func:`kernel_folder` (``<cache>/kernels``,
or ``$FREEMERGE_KERNELS``), so a build that dies leaves nothing behind and concurrent
builders never wait on a lock; later processes load the compiled file of their CPU's
instruction set (torch's ``get_cpu_capability``), and a new build removes the ones built from
other sources or for other torch versions. Without AVX-512 or AVX2, a compiler or ninja, or with
``FREEMERGE_CPU_KERNEL=0``, the update runs on BLAS, with the same results up to float
rounding.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import platform
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import torch

from freemerge.merging.files import default_cache_dir

logger = logging.getLogger(__name__)

KERNEL_ENV = "FREEMERGE_CPU_KERNEL"
FOLDER_ENV = "FREEMERGE_KERNELS"  # where compiled kernels live (default: <cache>/kernels)
SOURCE = Path(__file__).with_name("lowrank_kernel.cpp")
FLAGS = ["-O3", "-fopenmp"]
# The instruction sets the kernel is built for, by torch's name for a CPU's capability, with
# their compiler flags (one source: the flags pick its vector width)
ISA_FLAGS = {"AVX512": ["-mavx512f", "-mavx2", "-mfma"], "AVX2": ["-mavx2", "-mfma"]}


def linear_lowrank(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    factors: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """A linear layer plus its low-rank update, ``x W^T + bias + (x a^T) b^T`` for
    ``factors`` ``(b, a)`` (``x``: (..., in), the result (..., out)): in one call of the kernel
    where it takes the inputs (the update written first, the GEMM accumulating into it), else
    the GEMM and then the update (the faster order on BLAS)."""
    if factors is not None and x.is_cpu:
        kernel = cpu_kernel()
        if kernel is not None:
            y = kernel.lowrank_linear(x, weight, bias, *factors)
            if y is not None:
                return y
    y = torch.nn.functional.linear(x, weight, bias)
    if factors is not None:
        add_lowrank_(y.view(-1, y.shape[-1]), x.reshape(-1, x.shape[-1]), *factors)
    return y


def add_lowrank_(y: torch.Tensor, x: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> None:
    """``y += (x a^T) b^T`` in place (``x``: rows x in, ``a``: rank x in, ``b``: out x rank):
    the fused kernel where it takes the inputs, else BLAS (``a x^T`` first: the narrow
    product BLAS runs fastest, measured)."""
    kernel = cpu_kernel() if y.device.type == "cpu" else None
    if kernel is None or not kernel.lowrank_update_(y, x, b, a):
        y.addmm_(torch.mm(a, x.T).T, b.T)


@functools.cache
def cpu_kernel() -> ModuleType | None:
    """The kernel compiled for this CPU's instruction set (built on the first call in a
    machine's cache), or None where it cannot run here (the reason logged once)."""
    if os.environ.get(KERNEL_ENV, "1") == "0":
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ISA_FLAGS:
        logger.info("the fused low-rank kernel needs AVX-512 or AVX2 (this CPU: %s)", capability)
        return None
    try:
        return compiled(capability)
    except Exception as err:  # no compiler, no ninja, no headers: BLAS still serves
        logger.warning("the fused low-rank kernel did not build (%s): experts run on BLAS", err)
        return None


def kernel_folder() -> Path:
    """``$FREEMERGE_KERNELS``, else ``<cache>/kernels``."""
    return Path(os.environ.get(FOLDER_ENV) or default_cache_dir() / "kernels").expanduser()


def compiled(isa: str) -> ModuleType:
    """The kernel's module for ``isa`` (a key of :data:`ISA_FLAGS`; the CPU must run it: the
    build imports it), compiled into :func:`kernel_folder` first where it is not there (an
    image build runs ``python -m freemerge.serving.lowrank_kernel``, so that its replicas on
    CPUs like the builder's load it and need no compiler)."""
    source = SOURCE.read_bytes()
    key = b"\0".join(
        [source, torch.__version__.encode(), sys.version.encode(), platform.machine().encode()]
    )
    digest = hashlib.sha256(key).hexdigest()[:16]
    name = f"freemerge_lowrank_{isa.lower()}_{digest}"
    folder = kernel_folder()
    library = folder / f"{name}.so"
    if library.exists():
        loader = importlib.machinery.ExtensionFileLoader(name, str(library))
        spec = importlib.util.spec_from_file_location(name, library, loader=loader)
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
        return module
    folder.mkdir(parents=True, exist_ok=True)
    from torch.utils.cpp_extension import load  # slow to import: only to build

    with tempfile.TemporaryDirectory(dir=folder, prefix=f".{name}-") as scratch:
        module = load(
            name,
            [str(SOURCE)],
            extra_cflags=FLAGS + ISA_FLAGS[isa],
            extra_ldflags=["-fopenmp"],  # torch's own OpenMP runtime, already loaded
            build_directory=scratch,
            verbose=False,
        )
        os.replace(Path(scratch) / f"{name}.so", library)  # whole, or not at all
    for stale in folder.glob("freemerge_lowrank_*.so"):  # other sources or torch versions
        if not stale.name.endswith(f"_{digest}.so"):
            stale.unlink(missing_ok=True)  # a process that loaded it keeps its mapping
    return module


if __name__ == "__main__":
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ISA_FLAGS:
        print(f"{compiled(capability).__name__}.so in {kernel_folder()}")
    else:
        print(f"no fused kernel for this CPU ({capability}): experts run on BLAS")
