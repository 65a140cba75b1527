"""``freemerge demo``: the main job end to end on the default zoo.

Build the zoo if it is not cached, merge it as the config says (cached by the config's
content), start the server on a local Ray, send tagged and untagged requests, print the answers
and a summary of the server's metrics, and stop.
"""

from __future__ import annotations

import hashlib
import json
import time
import urllib.request
from pathlib import Path

from merging.artifact import open_artifact, verify_artifact
from merging.config import load_config
from merging.evaluate import task_texts
from merging.merge import run_merge
from merging.sources import default_cache_dir
from merging.zoo import build_zoo, zoo_table
from serving.local import free_port, start_local, stop_local
from serving.metrics import histogram_quantile, scrape


def post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def cached_artifact(config_path: Path, cache_dir: Path) -> Path:
    """The artifact for this config: merged once, reused while its hashes verify."""
    config = load_config(config_path)
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


def print_metrics(metrics_url: str) -> None:
    """Wait for the replica's metrics to be exported, then print a summary."""
    deadline = time.time() + 30
    families = scrape(metrics_url)
    while "ray_freemerge_resident_expert_bytes" not in families and time.time() < deadline:
        time.sleep(1)
        families = scrape(metrics_url)
    requests = (
        sum(
            s.value
            for s in families.get("ray_freemerge_requests", []).samples
            if s.name.endswith("_total")
        )
        if "ray_freemerge_requests" in families
        else 0
    )
    print(f"\nmetrics from {metrics_url}:")
    print(f"  requests answered: {requests:.0f}")
    if "ray_freemerge_request_latency_seconds" in families:
        p50 = histogram_quantile(families["ray_freemerge_request_latency_seconds"], 0.5)
        print(f"  request latency p50 <= {p50} s (bucket bound)")
    for stage in ("queue", "route", "expert_apply", "forward"):
        if "ray_freemerge_stage_latency_seconds" in families:
            p50 = histogram_quantile(
                families["ray_freemerge_stage_latency_seconds"], 0.5, stage=stage
            )
            print(f"  stage {stage:>12}: p50 <= {p50} s")
    for gauge in ("process_resident_bytes", "backbone_bytes", "resident_expert_bytes"):
        family = families.get(f"ray_freemerge_{gauge}")
        if family and family.samples:
            print(f"  {gauge}: {family.samples[0].value / 2**20:.1f} MiB")


def run_demo(config_path: Path, cache_dir: Path | None = None, examples: int = 2) -> int:
    cache_dir = cache_dir or default_cache_dir()
    print("== 1. task zoo (fine-tuned once, then cached)")
    zoo = build_zoo(cache_dir=cache_dir)
    print(zoo_table(zoo))

    print(f"\n== 2. merge as {config_path} says")
    out = cached_artifact(config_path, cache_dir)
    artifact = open_artifact(out)
    backbone = artifact.manifest["backbone"]["bytes"]
    print(f"artifact {out}\nversion {artifact.version[:16]}, backbone {backbone / 2**20:.1f} MiB")
    for task, entry in artifact.tasks.items():
        print(
            f"  {task}: expert {entry['expert_bytes'] / 2**20:.2f} MiB "
            f"({100 * entry['expert_bytes'] / backbone:.2f}% of the backbone)"
        )

    print("\n== 3. serve it on a local Ray and send requests")
    port, metrics_port = free_port(), free_port()
    start_local(
        {"artifact": str(out), "device": "auto"},
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
        print_metrics(f"http://127.0.0.1:{metrics_port}/metrics", sent)
    finally:
        stop_local()
        print("\nserver stopped")
    return 0
