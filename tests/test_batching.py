"""Cutting a batch into forward passes by token length, and padding subsets of rows."""

import itertools
import random

import pytest
import torch
from transformers import AutoTokenizer

from freemerge.merging.batching import MAX_PASS_TOKENS, PassPlan, Tokenized, plan_passes


def padded_cost(passes, lengths, overhead):
    return sum(overhead + len(p) * max(lengths[i] for i in p) for p in passes)


def brute_force_cost(lengths, overhead, budget=None):
    """The cheapest cut of the length-sorted rows into consecutive passes, by enumeration;
    with a budget, only cuts whose passes fit it (or hold one row)."""
    ordered = sorted(lengths)
    n = len(ordered)
    best = None
    for cuts in itertools.product([False, True], repeat=n - 1):
        cost, start = 0, 0
        fits = True
        for stop in [i + 1 for i, cut in enumerate(cuts) if cut] + [n]:
            cost += overhead + (stop - start) * ordered[stop - 1]
            fits &= (
                budget is None or stop - start == 1 or (stop - start) * ordered[stop - 1] <= budget
            )
            start = stop
        if fits:
            best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(20))
def test_plan_is_a_partition_with_the_least_cost(seed):
    rng = random.Random(seed)
    sizes = [3, 8, 20, 64, 300, 512]
    lengths = [rng.choice(sizes) + rng.randrange(5) for _ in range(rng.randrange(1, 10))]
    overhead = rng.choice([0, 16, 64, 4096])
    passes = plan_passes(lengths, overhead)
    assert sorted(i for p in passes for i in p) == list(range(len(lengths)))
    assert all([lengths[i] for i in p] == sorted(lengths[i] for i in p) for p in passes)
    assert padded_cost(passes, lengths, overhead) == brute_force_cost(lengths, overhead)


def test_short_and_long_rows_go_to_separate_passes_unless_a_pass_is_dear():
    lengths = [10, 500, 12, 480, 11]
    assert plan_passes(lengths, 64) == [[0, 4, 2], [3, 1]]
    assert plan_passes(lengths, 100_000) == [[0, 4, 2, 3, 1]]
    assert plan_passes([], 64) == []
    with pytest.raises(ValueError, match="overhead must be >= 0"):
        plan_passes(lengths, -1)


def test_padded_subset_equals_tokenizing_the_subset(tiny_backbone):
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)
    texts = ["short", "a somewhat longer text than that", "mid length text", "x " * 600]
    tokens = Tokenized(tokenizer, texts, 32)
    assert tokens.truncated == [False, False, False, True]
    assert tokens.lengths[3] == 32
    subset = [2, 0]
    picked = [texts[i] for i in subset]
    expected = tokenizer(picked, truncation=True, max_length=32, padding=True, return_tensors="pt")
    batch = tokens.padded(subset, torch.device("cpu"))
    assert batch.keys() == expected.keys()
    assert all(torch.equal(batch[k], expected[k]) for k in expected)


def test_pass_plan_defaults_by_device_and_checks_its_values():
    assert PassPlan.for_device(torch.device("cpu")) == PassPlan(64, MAX_PASS_TOKENS["cpu"])
    assert PassPlan.for_device(torch.device("cuda")) == PassPlan(4096, MAX_PASS_TOKENS["cuda"])
    assert PassPlan.for_device(torch.device("cpu"), 0, 100) == PassPlan(0, 100)
    with pytest.raises(ValueError, match=">= 0 tokens, got -1"):
        PassPlan(-1)
    with pytest.raises(ValueError, match="token budget must be >= 1 token, got 0"):
        PassPlan(64, 0)


@pytest.mark.parametrize("seed", range(20))
def test_budget_bounds_every_pass_and_keeps_the_least_cost_within_it(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([3, 8, 20, 64, 300, 512]) for _ in range(rng.randrange(1, 10))]
    budget = rng.choice([512, 600, 1024, 2000])
    overhead = rng.choice([0, 64, 4096])
    passes = plan_passes(lengths, overhead, max_tokens=budget)
    assert sorted(i for p in passes for i in p) == list(range(len(lengths)))
    assert all(len(p) * max(lengths[i] for i in p) <= budget for p in passes)
    assert padded_cost(passes, lengths, overhead) == brute_force_cost(lengths, overhead, budget)


def test_a_row_longer_than_the_budget_runs_alone():
    assert plan_passes([900, 10, 10], 10**6, max_tokens=512) == [[1, 2], [0]]
    assert PassPlan(10**6, 512).passes([900, 900]) == [[0], [1]]
