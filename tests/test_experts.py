import pytest
import torch

from merging.experts import SparseExpert, load_expert, make_expert


def residuals():
    g = torch.Generator().manual_seed(3)
    return {"w": torch.randn(20, 50, generator=g), "b": torch.randn(50, generator=g)}


def test_tensor_topk_keeps_exactly_the_largest_entries():
    expert = SparseExpert(density=0.1)
    for name, residual in residuals().items():
        expert.add(name, residual)
    for name, residual in residuals().items():
        indices, values = expert.entries[name]
        k = round(0.1 * residual.numel())
        assert len(indices) == k
        threshold = residual.abs().reshape(-1).topk(k).values.min()
        assert set(indices.tolist()) == set(
            torch.nonzero(residual.abs().reshape(-1) >= threshold).reshape(-1).tolist()
        )
        assert torch.equal(values, residual.reshape(-1)[indices.long()])


def test_row_granularity_keeps_k_per_row():
    expert = SparseExpert(density=0.1, granularity="row")
    residual = residuals()["w"]
    expert.add("w", residual)
    indices, _ = expert.entries["w"]
    rows = torch.div(indices.long(), 50, rounding_mode="floor")
    assert torch.equal(torch.bincount(rows, minlength=20), torch.full((20,), 5))
    for row in range(20):
        kept = indices.long()[rows == row] % 50
        assert set(kept.tolist()) == set(residual[row].abs().topk(5).indices.tolist())


def test_sparse_round_trip_is_exact(tmp_path):
    expert = make_expert("sparse", density=0.05, granularity="row", rescale=1.5)
    for name, residual in residuals().items():
        expert.add(name, residual)
    expert.save(tmp_path / "e.safetensors")
    loaded = load_expert(tmp_path / "e.safetensors")
    assert (loaded.density, loaded.granularity, loaded.rescale) == (0.05, "row", 1.5)
    for name, (indices, values) in expert.entries.items():
        assert torch.equal(loaded.entries[name][0], indices)
        assert torch.equal(loaded.entries[name][1], values)
    assert loaded.nbytes() == expert.nbytes() == 8 * sum(len(i) for i, _ in expert.entries.values())


def test_apply_gives_merged_plus_expert_and_restores_bitwise():
    base = {name: torch.randn(r.shape) for name, r in residuals().items()}
    target = {name: base[name] + r for name, r in residuals().items()}
    expert = SparseExpert(density=1.0)
    for name in base:
        expert.add(name, target[name] - base[name])
    params = {name: t.clone() for name, t in base.items()}
    for _ in range(1000):
        with expert.applied(params):
            assert all(torch.allclose(params[n], target[n]) for n in params)
    assert all(torch.equal(params[n], base[n]) for n in params)


def test_restore_happens_even_when_the_forward_fails():
    params = {"w": torch.zeros(4)}
    expert = SparseExpert(density=0.5)
    expert.add("w", torch.tensor([1.0, -2.0, 3.0, 0.5]))
    with pytest.raises(RuntimeError), expert.applied(params):
        assert params["w"].abs().sum() > 0
        raise RuntimeError("boom")
    assert torch.equal(params["w"], torch.zeros(4))


@pytest.mark.parametrize("density", [0, -0.1, 1.5])
def test_density_outside_unit_interval_is_refused(density):
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        SparseExpert(density=density)


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown expert kind 'dense'; allowed: sparse"):
        make_expert("dense")
