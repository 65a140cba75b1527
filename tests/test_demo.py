"""The demo's serving step on a tiny artifact: answers printed, metrics summarised."""

from freemerge.benchmarks.demo import serve_and_ask


def test_demo_serves_asks_and_summarises_the_metrics(tiny_routed_artifact, capsys):
    summary = serve_and_ask(tiny_routed_artifact, None, examples=1)
    out = capsys.readouterr().out
    # one tagged request per task, one untagged, one through huggingface_hub
    assert summary["sent"] == 5
    assert summary["requests answered"] == 5
    assert summary["backbone MiB"] > 0 and summary["request latency p50 <= s"] > 0
    assert "no task given (the router picks):" in out and "server stopped" in out
    assert ".text_classification(text) -> " in out and ".models.list() -> " in out
    assert "graceful_shutdown" not in out  # Ray's note at stop, which reads as an error
