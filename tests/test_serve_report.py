"""The serve bench's targets and table, on a synthetic result (no Ray, no model)."""

from freemerge.benchmarks.serve import CLIENTS, PER_CALL, ROLES, serve_markdown, serve_targets

MACHINE = {
    "cpus": 2,
    "processor": "x86_64",
    "memory_gib": 24,
    "accelerator": "none",
    "python": "3.11",
    "torch": "2.13.0",
    "date_utc": "2026-12-05 20:00",
}


def result(served_16: list[float], batches_16: list[float]) -> dict:
    engine = [
        {"round": r, "per_call": per_call, "rate": 100.0}
        for r in (1, 2, 3)
        for per_call in PER_CALL
    ]
    served = []
    for r in (1, 2, 3):
        for clients in CLIENTS:
            rate = served_16[r - 1] if clients == 16 else 70.0
            batch = batches_16[r - 1] if clients == 16 else 16.0
            served.append(
                {
                    "round": r,
                    "clients": clients,
                    "rate": rate,
                    "errors": 0,
                    "p50_ms": 100.0,
                    "p99_ms": 200.0,
                    "batch_p50_texts": batch,
                    "cpu_ms_per_request": dict.fromkeys(ROLES, 5.0),
                }
            )
    return {
        "machine": MACHINE,
        "settings": {"cpus_per_replica": 2},
        "artifact": "a",
        "rounds": 3,
        "engine": engine,
        "served": served,
    }


def test_a_target_is_met_only_when_every_round_clears_it():
    rows = {
        row["target"].split(" /")[0]: row for row in serve_targets(result([61, 65, 70], [8, 8, 16]))
    }
    assert rows["served rate at 16 clients"]["met"] is True
    assert rows["served rate at 64 clients"]["met"] is True
    straddling = serve_targets(result([59, 65, 70], [4, 8, 16]))
    assert [row["met"] for row in straddling] == [False, True, False]
    assert straddling[0]["median"] == 0.65


def test_the_table_has_a_row_per_contender_and_the_targets():
    text = serve_markdown(result([50, 55, 60], [4, 8, 8]), "freemerge bench serve")
    assert "| engine alone, 16 per call | 100.0 (100.0 to 100.0) |" in text
    assert "| served, 16 clients | 55.0 (50.0 to 60.0) |" in text
    assert (
        "| served rate at 16 clients / engine at 16 per call >= 60% | 55.0% (50.0% to 60.0%) | no |"
        in text
    )
    assert "Failed requests in all runs: 0." in text
