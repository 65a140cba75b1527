"""FR-Merging's frequency-domain high-pass filters for 2-D task vectors (paper, Sec. 3.2).

Both filters take a task-vector matrix V (H x W) and return G(V), real and of the same shape,
with the low-frequency part removed:

- ``reference``: as the authors' released code. F = fft2(V) on the *unshifted* spectrum; keep
  F[u, v] where sqrt((u - floor(H/2))^2 + (v - floor(W/2))^2) <= ratio * min(H, W). On the
  unshifted spectrum the centre (H/2, W/2) holds the highest frequencies, so the kept disc is a
  high-pass; with ratio >= sqrt(2)/2 it keeps every entry of a square matrix.
- ``radial``: a plain high-pass on normalised frequency: zero every component with
  sqrt(f_u^2 + f_v^2) < cutoff, f = k / H (resp. k / W) in [-1/2, 1/2) as ``fftfreq`` gives.
  It treats square and rectangular matrices alike and always removes the DC term.

Only the matrices whose name matches ``targets`` are filtered; by default (``targets`` unset)
the attention and feed-forward matrices of the transformer layers, which the merge finds by
module type (:func:`freemerge.merging.families.layer_matrices`) and passes in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

FILTER_MODES = ("reference", "radial")


def reference_mask(shape: tuple[int, int], ratio: float) -> torch.Tensor:
    """Boolean keep-mask of the ``reference`` filter on the unshifted spectrum."""
    height, width = shape
    u = torch.arange(height, dtype=torch.float64).unsqueeze(1) - height // 2
    v = torch.arange(width, dtype=torch.float64).unsqueeze(0) - width // 2
    return torch.sqrt(u**2 + v**2) <= ratio * min(height, width)


def radial_mask(shape: tuple[int, int], cutoff: float) -> torch.Tensor:
    """Boolean keep-mask of the ``radial`` filter: frequencies at radius ``cutoff`` or above."""
    height, width = shape
    f_u = torch.fft.fftfreq(height, dtype=torch.float64).unsqueeze(1)
    f_v = torch.fft.fftfreq(width, dtype=torch.float64).unsqueeze(0)
    return torch.sqrt(f_u**2 + f_v**2) >= cutoff


@dataclass(frozen=True)
class HighPass:
    """One configured filter: ``mode`` with its ``ratio`` (reference) or ``cutoff`` (radial),
    applied to the matrices whose name matches the regex ``targets`` (None: the matrices the
    merge passes in, the layer matrices)."""

    mode: str = "reference"
    ratio: float = 0.7
    cutoff: float = 0.05
    targets: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in FILTER_MODES:
            raise ValueError(
                f"unknown filter mode {self.mode!r}; allowed: {', '.join(FILTER_MODES)}"
            )
        if self.ratio <= 0:
            raise ValueError(f"filter ratio must be > 0, got {self.ratio}")
        if not 0 <= self.cutoff <= 0.75:
            raise ValueError(f"filter cutoff must be in [0, 0.75], got {self.cutoff}")
        try:
            re.compile(self.targets or "")
        except re.error as err:
            raise ValueError(f"filter targets is not a valid regex: {err}") from None

    def targets_tensor(self, name: str, matrices: frozenset[str] = frozenset()) -> bool:
        """Whether tensor ``name`` is filtered: ``targets`` matches it, or (``targets`` None)
        it is one of ``matrices``."""
        if self.targets is None:
            return name in matrices
        return re.search(self.targets, name) is not None

    def mask(self, shape: tuple[int, int]) -> torch.Tensor:
        if self.mode == "reference":
            return reference_mask(shape, self.ratio)
        return radial_mask(shape, self.cutoff)

    def apply(self, matrix: torch.Tensor) -> tuple[torch.Tensor, float]:
        """G(V) = real(ifft2(fft2(V) * mask)), and the fraction of spectral energy removed."""
        if matrix.ndim != 2:
            raise ValueError(
                f"high-pass filters take 2-D matrices, got shape {tuple(matrix.shape)}"
            )
        spectrum = torch.fft.fft2(matrix.to(torch.float64))
        keep = self.mask(tuple(matrix.shape))
        power = spectrum.abs() ** 2
        total = float(power.sum())
        removed = float(power[~keep].sum()) / total if total > 0 else 0.0
        filtered = torch.fft.ifft2(spectrum * keep).real
        return filtered.to(matrix.dtype), removed
