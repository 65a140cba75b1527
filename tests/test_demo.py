"""The demo's serving step on a tiny artifact: answers printed, metrics summarised."""

from freemerge.benchmarks.demo import serve_and_ask


def test_demo_serves_asks_and_summarises_the_metrics(tiny_routed_artifact, capsys):
    summary = serve_and_ask(tiny_routed_artifact, None, examples=1)
    out = capsys.readouterr().out
    assert summary["sent"] == 4  # one tagged request per task, one untagged
    assert summary["requests answered"] == 4
    assert summary["backbone MiB"] > 0 and summary["request latency p50 <= s"] > 0
    assert "no task given (the router picks):" in out and "server stopped" in out
