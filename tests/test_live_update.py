"""Moving a running server to a new artifact version: in the engine (what is kept, what is
loaded, what the old version still answers) and over HTTP through Ray Serve's user_config and
reconfigure, with requests in flight."""

import threading
import time

import pytest
import requests
import torch
from live_server import live_server
from tiny_merges import LINEAR_LOWRANK, QUICK_ROUTER, merged

from freemerge.merging.task_edit import add_task, remove_task
from freemerge.serving.engine import MergedEngine
from freemerge.serving.local import deploy_app
from freemerge.serving.requests import ClassifyRequest, RequestError, StageTimings

NEW = "debate_party"


@pytest.fixture(scope="module")
def versions(tiny_zoo, tmp_path_factory):
    """v1: the tiny zoo without NEW; v2: v1 with NEW added (same backbone); other: a backbone
    merged from two tasks only."""
    root = tmp_path_factory.mktemp("live")
    full = merged(tiny_zoo, root / "full", LINEAR_LOWRANK, router=QUICK_ROUTER)
    remove_task(full, NEW, root / "v1")
    task = tiny_zoo.tasks[NEW]
    add_task(root / "v1", NEW, task.path, task.texts, root / "v2")
    two = ["sms_spam", "bbc_topic"]
    other = merged(tiny_zoo, root / "other", LINEAR_LOWRANK, two, QUICK_ROUTER)
    return {"v1": root / "v1", "v2": root / "v2", "other": other}


def ask(engine, task, texts):
    return engine.classify_requests([ClassifyRequest(task, texts, 0.0)], StageTimings())[0]


def test_an_engine_update_keeps_the_backbone_and_what_did_not_change(versions):
    old = MergedEngine(versions["v1"], "cpu")
    before = ask(old, "sms_spam", ["win a free prize now"])
    held = old.model.store.get("sms_spam")
    assert isinstance(ask(old, NEW, ["x"]), RequestError)
    new = old.updated(versions["v2"])
    assert new.version != old.version and NEW in new.task_names
    assert new.model.backbone is old.model.backbone  # same files: not loaded again
    assert new.model.heads["sms_spam"] is old.model.heads["sms_spam"]
    assert new.model.store.get("sms_spam") is held  # the device copy carried over
    assert new.model.router is not old.model.router  # refitted with the new task: reloaded
    assert ask(new, NEW, ["the senator voted"])[0].task == NEW
    after = ask(new, "sms_spam", ["win a free prize now"])
    assert after[0].scores == pytest.approx(before[0].scores, abs=1e-6)
    # the old version still answers as it did (batches in flight finish on it) and lacks NEW
    refused = ask(old, NEW, ["x"])
    assert isinstance(refused, RequestError) and refused.status == 404
    assert old.version[:12] in str(refused)
    assert ask(old, "sms_spam", ["win a free prize now"])[0].scores == before[0].scores


def test_an_update_to_another_backbone_loads_it(versions):
    old = MergedEngine(versions["v1"], "cpu")
    new = old.updated(versions["other"])
    assert new.model.backbone is not old.model.backbone
    assert sorted(new.task_names) == ["bbc_topic", "sms_spam"]
    loaded = MergedEngine(versions["other"], "cpu")
    texts = ["see you at the game tonight"]
    logits = [e.model.logits("bbc_topic", texts) for e in (new, loaded)]
    assert torch.allclose(*logits, atol=1e-6)


def test_a_live_update_over_http_with_requests_in_flight(versions):
    """Deploying the app's config again with only the artifact changed (as `serve deploy`
    does) reconfigures the running replicas: same processes, no failed request, the new task
    answering soon after."""
    options = {"device": "cpu", "max_batch_size": 8, "batch_wait_timeout_s": 0.01}
    with live_server({**options, "artifact": str(versions["v1"])}, from_config=True) as (url, _):
        pid = requests.get(f"{url}/readyz", timeout=30).json()["pid"]
        v1 = requests.get(f"{url}/v1/tasks", timeout=30).json()["artifact_version"]
        seen: list[tuple[int, str | None]] = []
        stop = threading.Event()

        def traffic() -> None:
            body = {"task": "sms_spam", "inputs": ["call now to claim your prize"]}
            end = time.monotonic() + 120  # bounded in time and count
            with requests.Session() as session:
                while not stop.is_set() and time.monotonic() < end and len(seen) < 5000:
                    answer = session.post(f"{url}/v1/classify", json=body, timeout=60)
                    seen.append((answer.status_code, answer.json().get("artifact_version")))

        sender = threading.Thread(target=traffic)
        sender.start()
        time.sleep(2)
        start = time.monotonic()
        deploy_app({**options, "artifact": str(versions["v1"])}, artifact=str(versions["v2"]))
        answered_after = _until_answered(url, NEW, start, start + 60)
        time.sleep(1)
        stop.set()
        sender.join(60)
        assert answered_after is not None and answered_after < 30
        statuses = {status for status, _ in seen}
        assert statuses == {200}, statuses
        versions_seen = [v for _, v in seen]
        v2 = requests.get(f"{url}/v1/tasks", timeout=30).json()["artifact_version"]
        assert v2 != v1 and versions_seen[0] == v1 and versions_seen[-1] == v2
        assert set(versions_seen) == {v1, v2}
        assert requests.get(f"{url}/readyz", timeout=30).json()["pid"] == pid  # not restarted


def _until_answered(url: str, task: str, start: float, deadline: float) -> float | None:
    """Seconds from ``start`` until ``task`` gets a 200 (polled), or None by ``deadline``."""
    while time.monotonic() < deadline:
        answer = requests.post(
            f"{url}/v1/classify", json={"task": task, "inputs": ["a vote"]}, timeout=60
        )
        if answer.status_code == 200:
            return time.monotonic() - start
        assert answer.status_code == 404, answer.text  # unknown until the update lands
        time.sleep(0.2)
    return None
