"""Each merge method and filter against its direct formula on small tensors."""

import math

import numpy as np
import pytest
import torch

from freemerge.merging.filters import HighPass, radial_mask, reference_mask
from freemerge.merging.methods import METHODS, get_method, keep_top_magnitude


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 10, generator=g, dtype=torch.float64)
    taus = [torch.randn(6, 10, generator=g, dtype=torch.float64) for _ in range(3)]
    return base, taus


def test_registry_reads_parameters_from_signatures():
    assert set(METHODS) == {"average", "task_arithmetic", "ties", "fr", "free"}
    assert METHODS["free"].experts and not METHODS["fr"].experts
    assert METHODS["free"].parameters == METHODS["fr"].parameters
    assert METHODS["fr"].parameters["scaling"] == 0.3
    assert METHODS["fr"].choices == {"task_weights": ("uniform", "energy")}
    assert METHODS["task_arithmetic"].parameters == {"scaling": 0.3}
    assert METHODS["ties"].parameters == {"scaling": 1.0, "density": 0.2}
    assert "stats" not in METHODS["fr"].parameters and "name" not in METHODS["fr"].parameters
    with pytest.raises(ValueError, match="unknown merge method 'slerp'; allowed: average"):
        get_method("slerp")


def test_average_and_task_arithmetic(tensors):
    base, taus = tensors
    thetas = [base + t for t in taus]
    assert torch.allclose(get_method("average")(base, taus), sum(thetas) / 3)
    merged = get_method("task_arithmetic")(base, taus, scaling=0.4)
    assert torch.allclose(merged, base + 0.4 * (taus[0] + taus[1] + taus[2]))


def test_ties_matches_a_direct_loop():
    base = torch.zeros(4)
    taus = [torch.tensor([3.0, -1.0, 0.5, 2.0]), torch.tensor([-2.0, -4.0, 0.1, 1.0])]
    # density 0.5 keeps 2 of 4 per task: [3, 0, 0, 2] and [-2, -4, 0, 0]
    # signs of the sums: [+, -, 0, +]; agreeing entries: [3], [-4], none, [2]
    merged = get_method("ties")(base, taus, scaling=1.0, density=0.5)
    assert torch.equal(merged, torch.tensor([3.0, -4.0, 0.0, 2.0]))


def test_keep_top_magnitude_keeps_the_largest_half():
    x = torch.tensor([[0.1, -5.0, 2.0], [0.3, 4.0, -0.2]])
    assert torch.equal(
        keep_top_magnitude(x, 0.5), torch.tensor([[0.0, -5.0, 2.0], [0.0, 4.0, 0.0]])
    )


def test_fr_is_base_plus_lambda_sum_of_filtered(tensors):
    base, taus = tensors
    high_pass = HighPass("radial", cutoff=0.2, targets="")
    stats = {}
    merged = get_method("fr")(base, taus, scaling=0.5, filter=high_pass, stats=stats)
    expected = base + 0.5 * sum(high_pass.apply(t)[0] for t in taus)
    assert torch.allclose(merged, expected)
    assert len(stats["removed_energy"]) == 3 and all(0 < e < 1 for e in stats["removed_energy"])
    # 1-D tensors and the unfiltered case are plain task arithmetic.
    vector = torch.ones(5)
    assert torch.allclose(
        get_method("fr")(vector, [vector, vector], scaling=0.5, filter=high_pass), 2 * vector
    )


def test_fr_options_weights_and_magnitude_alignment(tensors):
    base, taus = tensors
    high_pass = HighPass("radial", cutoff=0.3, targets="")
    weights = [0.5, 0.3, 0.2]
    merged = get_method("fr")(
        base, taus, scaling=1.0, filter=high_pass, task_weights=weights, magnitude_alignment=True
    )
    filtered = sum(w * high_pass.apply(t)[0] for w, t in zip(weights, taus, strict=True))
    plain = sum(w * t for w, t in zip(weights, taus, strict=True))
    assert torch.allclose(merged, base + filtered * plain.norm() / filtered.norm())


@pytest.mark.parametrize("shape", [(8, 8), (6, 10), (7, 5)])
def test_filters_return_real_tensors_of_the_same_shape(shape):
    matrix = torch.randn(*shape)
    for high_pass in (HighPass("reference", ratio=0.3), HighPass("radial", cutoff=0.1)):
        out, removed = high_pass.apply(matrix)
        assert out.shape == matrix.shape and out.dtype == matrix.dtype and not out.is_complex()
        assert 0 <= removed <= 1


@pytest.mark.parametrize("n", [4, 9, 16])
def test_reference_with_large_ratio_is_identity_on_square_matrices(n):
    matrix = torch.randn(n, n, dtype=torch.float64)
    out, removed = HighPass("reference", ratio=0.71).apply(matrix)
    assert torch.allclose(out, matrix) and removed == 0.0
    assert reference_mask((n, n), math.sqrt(2) / 2).all()


def test_reference_mask_keeps_the_high_frequencies_at_the_centre():
    mask = reference_mask((8, 8), 0.25)  # keeps radius <= 2 around (4, 4)
    assert mask[4, 4] and mask[2, 4] and not mask[0, 0] and not mask[1, 4]
    assert int(mask.sum()) == 13


def test_radial_removes_the_dc_term_and_keeps_the_highest():
    matrix = torch.full((6, 8), 3.0) + torch.randn(6, 8) * 0.01
    out, removed = HighPass("radial", cutoff=0.05).apply(matrix)
    assert abs(float(out.mean())) < 1e-6  # DC (the mean) is gone
    assert removed > 0.99
    mask = radial_mask((6, 8), 0.05)
    assert not mask[0, 0] and mask[3, 4]


def test_reference_removed_energy_matches_parseval():
    matrix = torch.randn(12, 20, dtype=torch.float64)
    out, removed = HighPass("reference", ratio=0.3).apply(matrix)
    spectrum = torch.fft.fft2(matrix)
    kept = reference_mask((12, 20), 0.3)
    assert removed == pytest.approx(
        float((spectrum.abs() ** 2)[~kept].sum() / (spectrum.abs() ** 2).sum())
    )


def test_bad_filter_settings_are_refused():
    with pytest.raises(
        ValueError, match="unknown filter mode 'lowpass'; allowed: reference, radial"
    ):
        HighPass("lowpass")
    with pytest.raises(ValueError, match="2-D"):
        HighPass().apply(torch.ones(3))


def authors_high_pass(matrix: np.ndarray, ratio: float) -> np.ndarray:
    """The authors' released filter, spelled out with numpy and loops: on the unshifted
    spectrum, keep F[u, v] within ratio * min(H, W) of (H // 2, W // 2)."""
    height, width = matrix.shape
    spectrum = np.fft.fft2(matrix)
    for u in range(height):
        for v in range(width):
            if math.hypot(u - height // 2, v - width // 2) > ratio * min(height, width):
                spectrum[u, v] = 0
    return np.fft.ifft2(spectrum).real


@pytest.mark.parametrize("shape, ratio", [((12, 20), 0.3), ((16, 16), 0.25), ((9, 7), 0.5)])
def test_fr_merge_equals_the_authors_filter_written_out(shape, ratio):
    rng = np.random.default_rng(1)
    base = rng.normal(size=shape)
    taus = [rng.normal(size=shape) for _ in range(3)]
    expected = base + 0.4 * sum(authors_high_pass(t, ratio) for t in taus)
    high_pass = HighPass("reference", ratio=ratio, targets="^w$")
    merged = get_method("fr")(
        torch.from_numpy(base),
        [torch.from_numpy(t) for t in taus],
        name="w",
        scaling=0.4,
        filter=high_pass,
    )
    assert np.allclose(merged.numpy(), expected, atol=1e-10)
    # A tensor the targets do not match is merged by task arithmetic, with other_scaling.
    other = get_method("fr")(
        torch.from_numpy(base),
        [torch.from_numpy(t) for t in taus],
        name="v",
        scaling=0.4,
        other_scaling=0.2,
        filter=high_pass,
    )
    assert np.allclose(other.numpy(), base + 0.2 * sum(taus))
