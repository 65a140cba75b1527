"""``freemerge demo``: the main job end to end on the small ``demo`` zoo.

Build the demo zoo if it is not cached (three tasks, a short recipe), merge it as the config
says (cached by the config's content), start the server on a local Ray, send tagged and
untagged requests and one through each of huggingface_hub and openai, print the answers and
a summary of the server's metrics, and stop.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from freemerge.benchmarks.evaluate import task_texts
from freemerge.benchmarks.loadgen import call
from freemerge.benchmarks.zoo import build_named_zoo, zoo_table
from freemerge.merging.artifact import open_artifact, verify_artifact
from freemerge.merging.config import load_config
from freemerge.merging.files import default_cache_dir
from freemerge.merging.merge import run_merge
from freemerge.serving.local import free_port, start_local, stop_local
from freemerge.serving.metrics import counter_total, histogram_quantile, scrape_until


def post_json(url: str, body: dict) -> dict:
    """The JSON answer of a POST that must succeed."""
    status, answer = call(url, body, timeout=120)
    if status != 200:
        raise RuntimeError(f"POST {url} answered {status}: {answer}")
    return answer


def cached_artifact(config_path: Path, cache_dir: Path, zoo: str | None = None) -> Path:
    """The artifact for this config (over ``zoo``, if given): merged once, reused while its
    hashes verify."""
    config = load_config(config_path, zoo=zoo and str(Path(cache_dir) / "zoo" / zoo))
    key = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
    out = cache_dir / "artifacts" / f"demo-{key}"
    if not out.exists() or verify_artifact(out):
        summary = run_merge(config, out, overwrite=True)
        print(f"merged in {summary.wall_seconds:.1f} s, ", end="")
        print(f"peak resident memory {summary.peak_rss_mib:.0f} MiB")
    return out


def print_answers(title: str, texts: list[str], reply: dict) -> None:
    print(title)
    for text, result in zip(texts, reply["results"], strict=True):
        how = (
            f"routed, confidence {result['router_confidence']:.2f}"
            if result["routed"]
            else "tagged"
        )
        snippet = " ".join(text.split())[:60]
        label = f"{result['label']!r} ({result['score']:.2f}, {how})"
        print(f"  {result['task']:>16} {label:>40} {snippet}")


def ask_through_clients(base_url: str, task: str, text: str) -> int:
    """The same server through the clients people already use: huggingface_hub's
    ``InferenceClient`` on the task's TEI-style base URL, and the ``openai`` client listing
    the tasks as models. The requests it sent to the model (for the metrics count)."""
    from huggingface_hub import InferenceClient

    print(f"\nthrough huggingface_hub: InferenceClient(base_url='{base_url}/tasks/{task}')")
    labels = InferenceClient(base_url=f"{base_url}/tasks/{task}").text_classification(text)
    best = ", ".join(f"{e.label!r} {e.score:.2f}" for e in labels[:2])
    print(f"  .text_classification(text) -> {best}   {' '.join(text.split())[:50]}")
    try:
        from openai import OpenAI
    except ImportError:
        print("\n(pip install openai to see the same server through the openai client)")
        return 1
    client = OpenAI(base_url=f"{base_url}/v1", api_key="not-needed-without---api-key")
    print(f"\nthrough openai: OpenAI(base_url='{base_url}/v1')")
    models = ", ".join(f"{m.id} ({m.kind})" for m in client.models.list())
    print(f"  .models.list() -> {models}")
    return 1


def metrics_summary(metrics_url: str, sent: int, wait_s: float = 30.0) -> dict[str, float | None]:
    """The server's metrics once Ray has exported all ``sent`` requests (at most ``wait_s``):
    requests answered, latency medians (bucket bounds) and memory gauges."""
    families = scrape_until(
        metrics_url,
        lambda families: (
            counter_total(families, "ray_freemerge_requests") >= sent
            and "ray_freemerge_resident_expert_bytes" in families
        ),
        wait_s,
    )
    summary: dict[str, float | None] = {
        "requests answered": counter_total(families, "ray_freemerge_requests")
    }
    latency = families.get("ray_freemerge_request_latency_seconds")
    summary["request latency p50 <= s"] = histogram_quantile(latency, 0.5) if latency else None
    stages = families.get("ray_freemerge_stage_latency_seconds")
    for stage in ("queue", "route", "expert_apply", "forward"):
        p50 = histogram_quantile(stages, 0.5, stage=stage) if stages else None
        summary[f"stage {stage} p50 <= s"] = p50
    for gauge in ("process_resident_bytes", "backbone_bytes", "resident_expert_bytes"):
        family = families.get(f"ray_freemerge_{gauge}")
        value = family.samples[0].value / 2**20 if family and family.samples else None
        summary[f"{gauge.replace('_bytes', '')} MiB"] = value
    return summary


def serve_and_ask(artifact_dir: Path, cache_dir: Path | None, examples: int) -> dict:
    """Serve the artifact on a local Ray, send tagged requests for every task and one untagged
    request (when it has a router), print the answers; the metrics summary, server stopped."""
    artifact = open_artifact(artifact_dir, verify=False)  # the replica verifies it
    port, metrics_port = free_port(), free_port()
    start_local(
        {"artifact": str(artifact_dir), "device": "auto"},
        port=port,
        metrics_port=metrics_port,
        metrics_interval_ms=1000,
    )
    try:
        url = f"http://127.0.0.1:{port}/v1/classify"
        untagged, sent = [], 0
        for task in artifact.tasks:
            texts = [t[:2000] for t in task_texts(task, "test", cache_dir)[0][:examples]]
            print_answers(
                f"task {task} (tagged):", texts, post_json(url, {"task": task, "inputs": texts})
            )
            untagged.append(texts[0])
            sent += 1
        if artifact.manifest.get("router"):
            reply = post_json(url, {"inputs": untagged})
            print_answers("\nno task given (the router picks):", untagged, reply)
            sent += 1
        sent += ask_through_clients(
            f"http://127.0.0.1:{port}", next(iter(artifact.tasks)), untagged[0]
        )
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        summary = metrics_summary(metrics_url, sent)
        print(f"\nmetrics from {metrics_url}:")
        for name, value in summary.items():
            print(f"  {name}: {'-' if value is None else f'{value:.4g}'}")
    finally:
        stop_local()
        print("\nserver stopped")
    return {"sent": sent, **summary}


def run_demo(
    config_path: Path, cache_dir: Path | None = None, zoo: str = "demo", examples: int = 2
) -> int:
    cache_dir = cache_dir or default_cache_dir()
    print(f"== 1. the {zoo} task zoo (fine-tuned once, then cached)")
    print(zoo_table(build_named_zoo(zoo, cache_dir)))

    print(f"\n== 2. merge the {zoo} zoo as {config_path} says")
    out = cached_artifact(config_path, cache_dir, zoo)
    artifact = open_artifact(out, verify=False)  # cached_artifact verified or wrote it
    backbone = artifact.manifest["backbone"]["bytes"]
    print(f"artifact {out}\nversion {artifact.version[:16]}, backbone {backbone / 2**20:.1f} MiB")
    for task, entry in artifact.tasks.items():
        print(
            f"  {task}: expert {entry['expert_bytes'] / 2**20:.2f} MiB "
            f"({100 * entry['expert_bytes'] / backbone:.2f}% of the backbone)"
        )

    print("\n== 3. serve it on a local Ray and send requests")
    serve_and_ask(out, cache_dir, examples)
    return 0
