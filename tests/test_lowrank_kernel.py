"""The fused CPU kernel for the row adapters' low-rank update, against BLAS."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch.utils.cpp_extension import is_ninja_available

from freemerge.serving import lowrank_kernel
from freemerge.serving.lowrank_kernel import add_lowrank_, cpu_kernel, linear_lowrank

CAPABILITY = torch.backends.cpu.get_cpu_capability()
# The builds this CPU runs: its own, and AVX2's on an AVX-512 CPU as well
RUNNABLE = [isa for isa in lowrank_kernel.ISA_FLAGS if isa in (CAPABILITY, "AVX2")]
pytestmark = pytest.mark.skipif(
    CAPABILITY not in lowrank_kernel.ISA_FLAGS, reason="the kernel needs AVX-512 or AVX2"
)


def factors(out: int, rank: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(b, a)`` laid out as ``LowRankExpert.to`` lays them out."""
    return torch.randn(rank, out).T, torch.randn(rank, width)


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    if got.shape != want.shape:
        return False
    if want.numel() == 0:
        return True
    return bool((got - want).abs().max() <= 1e-5 * want.abs().max().clamp(min=1.0))


@pytest.fixture(scope="module", params=RUNNABLE)
def kernel(request):
    """The kernel built for each instruction set this CPU runs; a machine with AVX-512 or AVX2,
    a C++ compiler and ninja must build it, and loads its own widest one."""
    if not (shutil.which("c++") and is_ninja_available()):
        assert cpu_kernel() is None
        pytest.skip("no C++ compiler or ninja to build the kernel (BLAS serves)")
    built = lowrank_kernel.compiled(request.param)
    assert built.isa == request.param.lower()
    assert cpu_kernel().isa == CAPABILITY.lower()
    return built


@pytest.mark.parametrize("rows", [0, 1, 2, 3, 17, 40])  # odd, one pair, and > one thread's share
@pytest.mark.parametrize(
    ("width", "out", "rank"),
    [(32, 48, 8), (64, 16, 16), (48, 32, 64), (32, 64, 4), (16, 32, 13), (32, 80, 8)],
)
def test_the_kernel_equals_blas(kernel, rows, width, out, rank):
    x = torch.randn(rows, width)
    b, a = factors(out, rank, width)
    weight, bias = torch.randn(out, width), torch.randn(out)
    y = torch.randn(rows, out)
    want = y + (x @ a.T) @ b.T
    assert kernel.lowrank_update_(y, x, b, a)
    assert close(y, want)
    assert close(
        kernel.lowrank_linear(x, weight, bias, b, a), x @ weight.T + bias + (x @ a.T) @ b.T
    )
    assert close(kernel.lowrank_linear(x, weight, None, b, a), x @ weight.T + (x @ a.T) @ b.T)


def test_the_kernel_updates_a_slice_of_rows_and_nothing_else(kernel):
    """Row adapters hand it each task's rows of the batch as a view."""
    x, y = torch.randn(9, 32), torch.randn(9, 48)
    b, a = factors(48, 8, 32)
    want = y.clone()
    want[3:7] += (x[3:7] @ a.T) @ b.T
    assert kernel.lowrank_update_(y[3:7], x[3:7], b, a)
    assert torch.equal(y[:3], want[:3]) and torch.equal(y[7:], want[7:])
    assert close(y, want)


def test_the_kernel_reads_rows_of_x_spaced_apart(kernel):
    """BERT's pooler runs on each text's first token: rows of x a sequence apart."""
    hidden = torch.randn(3, 7, 32)
    x = hidden[:, 0]
    b, a = factors(48, 8, 32)
    weight, bias = torch.randn(48, 32), torch.randn(48)
    got = kernel.lowrank_linear(x, weight, bias, b, a)
    assert got is not None
    assert close(got, x @ weight.T + bias + (x @ a.T) @ b.T)


@pytest.mark.parametrize("on_blas", [False, True])
@pytest.mark.parametrize("shape", [(2, 5), (3,), (1, 2, 4)])
def test_a_layer_keeps_the_leading_dimensions_of_its_input(kernel, shape, on_blas, monkeypatch):
    """``linear_lowrank`` maps (..., in) to (..., out) as a linear layer does, in the kernel
    (which reshapes in C++) and on BLAS; an x whose columns are strided (the kernel refuses
    it) goes to BLAS."""
    x = torch.randn(*shape, 64)[..., ::2]
    b, a = factors(48, 8, 32)
    weight, bias = torch.randn(48, 32), torch.randn(48)
    if on_blas:
        monkeypatch.setattr(lowrank_kernel, "cpu_kernel", lambda: None)
    else:
        got = kernel.lowrank_linear(x.contiguous(), weight, bias, b, a)
        assert close(got, x @ weight.T + bias + (x @ a.T) @ b.T)
    assert close(linear_lowrank(x, weight, bias, (b, a)), x @ weight.T + bias + (x @ a.T) @ b.T)


def refused_inputs() -> dict[str, tuple[torch.Tensor, ...]]:
    """Each breaks one of the kernel's conditions: (y, x, b, a)."""
    b, a = factors(48, 8, 32)
    x, y = torch.randn(5, 32), torch.randn(5, 48)
    b72, a72 = factors(48, 72, 32)
    b33, a33 = factors(33, 8, 40)
    return {
        "rank above 64": (y, x, b72, a72),
        "widths not multiples of 16": (torch.randn(5, 33), torch.randn(5, 40), b33, a33),
        "float64": (y.double(), x.double(), b.double(), a.double()),
        "x's columns strided": (y, torch.randn(32, 5).T, b, a),
        "y's rows strided": (torch.randn(48, 5).T, x, b, a),
        "y's rows overlapping": (torch.randn(1, 48).expand(5, 48), x, b, a),
        "a transposed": (y, x, b, a.T.contiguous().T),
        "b contiguous": (y, x, b.contiguous(), a),
        "shapes that do not chain": (torch.randn(4, 48), x, b, a),
    }


@pytest.mark.parametrize("case", sorted(refused_inputs()))
def test_inputs_the_kernel_does_not_take_are_left_alone_and_blas_runs_them(kernel, case):
    y, x, b, a = refused_inputs()[case]
    before = y.clone()
    assert not kernel.lowrank_update_(y, x, b, a)
    assert torch.equal(y, before)
    if y.shape[0] == x.shape[0] and y.stride(0) > 0:  # BLAS refuses to write overlapping rows
        want = y.double() + (x.double() @ a.double().T) @ b.double().T
        add_lowrank_(y, x, b, a)  # falls back to BLAS
        assert close(y.double(), want)
        weight = torch.randn(b.shape[0], x.shape[1], dtype=x.dtype)
        got = linear_lowrank(x, weight, None, (b, a)).double()
        assert close(got, x.double() @ weight.double().T + (want - before.double()))


def test_it_is_built_aside_into_the_cache_and_can_be_switched_off(kernel, monkeypatch):
    folder = lowrank_kernel.kernel_folder()
    built = [p.stem.split("_")[2:] for p in folder.glob("freemerge_lowrank_*.so")]
    assert len({digest for _, digest in built}) == 1  # stale builds removed: one source's
    assert len({isa for isa, _ in built}) == len(built)  # one per instruction set
    assert not any(p.name.startswith(".") for p in folder.iterdir())  # no build left half-done
    monkeypatch.setenv(lowrank_kernel.KERNEL_ENV, "0")
    lowrank_kernel.cpu_kernel.cache_clear()
    try:
        assert cpu_kernel() is None
        x, (b, a) = torch.randn(3, 32), factors(48, 8, 32)
        weight, bias = torch.randn(48, 32), torch.randn(48)
        assert close(linear_lowrank(x, weight, bias, (b, a)), x @ weight.T + bias + (x @ a.T) @ b.T)
    finally:
        monkeypatch.delenv(lowrank_kernel.KERNEL_ENV)
        lowrank_kernel.cpu_kernel.cache_clear()
    assert cpu_kernel() is not None  # loaded from the cache: no second build


@pytest.mark.slow  # a fresh compile: 54 s on 2 cores of the AVX2 machine (twice with AVX-512)
def test_an_image_build_compiles_it_into_a_folder_of_its_own(tmp_path):
    """``python -m freemerge.serving.lowrank_kernel`` with ``$FREEMERGE_KERNELS`` set (the CPU
    image's build step) leaves the compiled file there, and a replica's process loads it; run
    again with ``ATEN_CPU_CAPABILITY=avx2`` it adds AVX2's beside it on an AVX-512 host."""
    env = {**os.environ, lowrank_kernel.FOLDER_ENV: str(tmp_path)}
    module = [sys.executable, "-m", "freemerge.serving.lowrank_kernel"]
    printed = subprocess.run(module, env=env, check=True, capture_output=True, text=True)
    built = list(tmp_path.iterdir())
    assert len(built) == 1 and built[0].name.startswith("freemerge_lowrank_")  # no scratch left
    assert printed.stdout.strip() == f"{built[0].name} in {tmp_path}"
    load = "from freemerge.serving.lowrank_kernel import cpu_kernel; print(cpu_kernel().__file__)"
    loaded = subprocess.run(
        [sys.executable, "-c", load], env=env, check=True, capture_output=True, text=True
    )
    assert loaded.stdout.strip() == str(built[0])
    env["ATEN_CPU_CAPABILITY"] = "avx2"
    subprocess.run(module, env=env, check=True, capture_output=True, text=True)
    names = sorted(path.name.split("_")[2] for path in tmp_path.iterdir())
    assert names == (["avx2", "avx512"] if CAPABILITY == "AVX512" else ["avx2"])
