import pytest
import torch
from safetensors.torch import save_file

from freemerge.merging.experts import LowRankExpert, SparseExpert, load_expert, make_expert


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
    with pytest.raises(ValueError, match="unknown expert kind 'dense'; allowed: sparse, lowrank"):
        make_expert("dense")


def test_lowrank_expert_is_the_truncated_svd_of_the_residual():
    expert = LowRankExpert(rank=3, vectors="full", dtype="float32")
    for name, residual in residuals().items():
        expert.add(name, residual)
    w = residuals()["w"]
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    best = (u[:, :3] * s[:3]) @ vh[:3]
    assert torch.allclose(expert.delta("w").double(), best, atol=1e-5)
    # Eckart-Young: no rank-3 matrix is closer; the error is the tail of the spectrum.
    assert torch.linalg.norm(w.double() - expert.delta("w").double()) == pytest.approx(
        float(s[3:].square().sum().sqrt()), rel=1e-5
    )
    assert torch.equal(expert.full["b"], residuals()["b"])  # 1-D stored in full
    assert expert.nbytes() == 4 * (20 * 3 + 3 * 50 + 50)


def test_lowrank_factors_are_stored_in_16_bits_by_default(tmp_path):
    wide = LowRankExpert(rank=3, vectors="full", dtype="float32")
    narrow = LowRankExpert(rank=3, vectors="full")
    for name, residual in residuals().items():
        wide.add(name, residual)
        narrow.add(name, residual)
    assert narrow.settings["dtype"] == "float16"
    assert {t.dtype for pair in narrow.factors.values() for t in pair} == {torch.float16}
    assert narrow.nbytes() * 2 == wide.nbytes()
    # the product is computed in float32 and differs only by the factors' rounding
    assert narrow.delta("w").dtype == torch.float32
    assert torch.allclose(narrow.delta("w"), wide.delta("w"), rtol=0, atol=2e-3)
    narrow.save(tmp_path / "e.safetensors")
    loaded = load_expert(tmp_path / "e.safetensors")
    assert loaded.settings == narrow.settings
    assert torch.equal(loaded.factors["w"][0], narrow.factors["w"][0])
    # on the device in the dtype it computes in, as the expert store puts it there
    moved = loaded.to("cpu", torch.float32)
    assert moved.factors["w"][1].dtype == torch.float32 and moved.dtype == "float32"


def test_expert_files_from_before_the_dtype_setting_load_as_float32(tmp_path):
    old = LowRankExpert(rank=2, dtype="float32")
    old.add("w", residuals()["w"])
    settings = {k: v for k, v in old.settings.items() if k != "dtype"}
    tensors = {"w.lora_B": old.factors["w"][0], "w.lora_A": old.factors["w"][1]}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=settings)
    loaded = load_expert(tmp_path / "old.safetensors")
    assert loaded.dtype == "float32" and torch.equal(loaded.delta("w"), old.delta("w"))


def test_an_unknown_factor_dtype_is_refused():
    with pytest.raises(ValueError, match="unknown expert dtype 'int8'; allowed: float16"):
        LowRankExpert(dtype="int8")


def test_lowrank_round_trip_is_exact_and_skip_and_vectors_apply(tmp_path):
    expert = make_expert("lowrank", rank=2, vectors="skip", skip="^w$")
    expert.add("w", torch.randn(5, 5))
    expert.add("v", torch.randn(6, 4))
    expert.add("b", torch.randn(4))
    assert set(expert.factors) == {"v"} and not expert.full
    expert.save(tmp_path / "e.safetensors")
    loaded = load_expert(tmp_path / "e.safetensors")
    assert (loaded.rank, loaded.vectors, loaded.skip) == (2, "skip", "^w$")
    assert all(
        torch.equal(x, y) for x, y in zip(loaded.factors["v"], expert.factors["v"], strict=True)
    )


def test_a_moved_expert_keeps_its_values_lays_out_its_factors_and_saves(tmp_path):
    """``to`` gives the row adapters ``A`` contiguous and ``B`` with its transpose contiguous
    (the layout the fused kernel reads), the same values, and a copy that still saves and
    loads back."""
    expert = make_expert("lowrank", rank=2, vectors="full", skip="")
    expert.add("v", torch.randn(6, 4))
    expert.add("b", torch.randn(6))
    moved = expert.to("cpu", torch.float32)
    b, a = moved.factors["v"]
    assert b.T.is_contiguous() and not b.is_contiguous() and a.is_contiguous()
    assert torch.equal(b, expert.factors["v"][0].float())
    assert torch.equal(a, expert.factors["v"][1].float())
    moved.save(tmp_path / "moved.safetensors")  # safetensors refuses non-contiguous tensors
    loaded = load_expert(tmp_path / "moved.safetensors")
    assert all(
        torch.equal(x, y) for x, y in zip(loaded.factors["v"], moved.factors["v"], strict=True)
    )


def test_lowrank_apply_restores_bitwise():
    expert = LowRankExpert(rank=4)
    for name, residual in residuals().items():
        expert.add(name, residual)
    base = {name: torch.randn(r.shape) for name, r in residuals().items()}
    params = {name: t.clone() for name, t in base.items()}
    for _ in range(200):
        with expert.applied(params):
            assert torch.allclose(params["w"], base["w"] + expert.delta("w"))
    assert all(torch.equal(params[n], base[n]) for n in params)


@pytest.mark.parametrize("kind, settings", [("sparse", {"density": 0.2}), ("lowrank", {"rank": 2})])
def test_mixture_of_experts_is_the_weighted_sum(kind, settings):
    g = torch.Generator().manual_seed(5)
    experts = []
    for _ in range(3):
        expert = make_expert(kind, **settings)
        expert.add("w", torch.randn(8, 6, generator=g))
        expert.add("b", torch.randn(6, generator=g))
        experts.append(expert)
    weights = [0.5, 0.3, 0.2]
    base = {"w": torch.randn(8, 6, generator=g), "b": torch.randn(6, generator=g)}

    def applied_state(expert):
        params = {n: t.clone() for n, t in base.items()}
        with expert.applied(params):
            return {n: t.clone() for n, t in params.items()}

    mixed = applied_state(type(experts[0]).mix(experts, weights))
    expected = {
        n: base[n]
        + sum(w * (applied_state(e)[n] - base[n]) for e, w in zip(experts, weights, strict=True))
        for n in base
    }
    assert all(torch.allclose(mixed[n], expected[n], atol=1e-6) for n in base)


def test_loaded_factors_are_in_name_order_whatever_the_file_order(tmp_path):
    """A router's feature columns follow the factors' order, so it must not vary between
    processes (safetensors' loader returns tensors in an order that does)."""
    from freemerge.merging.router import expert_subspaces

    names = [f"layer.{i}.weight" for i in (3, 1, 2, 0)]
    expert = LowRankExpert(rank=1, skip="")
    for name in names:
        expert.add(name, torch.randn(4, 3))
    expert.save(tmp_path / "e.safetensors")
    loaded = load_expert(tmp_path / "e.safetensors")
    assert list(loaded.factors) == sorted(names)
    backwards = LowRankExpert(rank=1, skip="")
    backwards.factors = dict(reversed(list(loaded.factors.items())))
    subspaces = expert_subspaces({"a": backwards, "b": loaded}, ["a", "b"], names)
    assert list(subspaces.factors) == sorted(n.removesuffix(".weight") for n in names)
