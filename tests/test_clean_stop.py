"""`freemerge serve` stops cleanly: after SIGTERM, Ctrl-C or a failed start, no process is left.

The server runs in its own session, so that its processes can be found (its descendants,
recorded while it runs, and whatever is left in its session) and, whatever the outcome,
killed: the suite never leaks a Ray daemon.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from freemerge.serving.local import _end, free_port, still_running
from freemerge.serving.proxy import PROXY_CALLBACK, PROXY_CALLBACK_ENV, PROXY_LIMIT_ENV
from freemerge.serving.settings import ServingOptions

READY_WITHIN_S = 120  # Ray, Serve and the tiny model on 2 shared CPUs
EXIT_WITHIN_S = 90  # the server's own bound on stopping (STOP_DEADLINE_S) is under this
GONE_WITHIN_S = 5  # an exited process may take a moment to be reaped by its new parent


def _command() -> list[str]:
    script = Path(sys.executable).with_name("freemerge")
    return [str(script)] if script.exists() else [sys.executable, "-m", "freemerge.serving.cli"]


@contextmanager
def _serve(
    artifact: Path, log: Path, ingress: str = "proxy"
) -> Iterator[tuple[subprocess.Popen, int, dict]]:
    """``freemerge serve artifact`` in its own session: (process, port, processes seen)."""
    port, metrics_port = free_port(), free_port()
    args = ["serve", str(artifact), "--port", str(port), "--metrics-port", str(metrics_port)]
    args += ["--ingress", ingress]
    with log.open("wb") as out:
        server = subprocess.Popen(
            [*_command(), *args, "--device", "cpu"],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    seen: dict[int, psutil.Process] = {}
    try:
        yield server, port, seen
    finally:
        _kill_leftovers(server, seen)


def _record_tree(server: subprocess.Popen, seen: dict[int, psutil.Process]) -> None:
    """Add the server's living descendants to ``seen`` (psutil.Process keeps their identity)."""
    try:
        children = psutil.Process(server.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for child in children:
        seen.setdefault(child.pid, child)


def _answers_200(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def _wait_ready(server: subprocess.Popen, port: int, seen: dict[int, psutil.Process]) -> None:
    """Wait for /readyz to answer 200, recording the server's process tree meanwhile."""
    deadline = time.monotonic() + READY_WITHIN_S
    while not _answers_200(f"http://127.0.0.1:{port}/readyz"):
        _record_tree(server, seen)
        assert server.poll() is None, f"the server exited early with status {server.returncode}"
        assert time.monotonic() < deadline, f"/readyz did not answer 200 in {READY_WITHIN_S} s"
        time.sleep(0.5)
    for _ in range(4):  # let the last daemons (agents, workers) appear, then take them in
        time.sleep(0.5)
        _record_tree(server, seen)


def _in_session(sid: int) -> list[psutil.Process]:
    """Processes in session ``sid`` (Ray's daemons stay in the server's session)."""
    found = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == sid:
                found.append(process)
        except (OSError, psutil.Error):
            pass
    return found


def _left_behind(server: subprocess.Popen, seen: dict[int, psutil.Process]) -> list[str]:
    """What is still running, of what the server started, a few seconds after it exited."""
    deadline = time.monotonic() + GONE_WITHIN_S
    while True:
        left = still_running(list({*seen.values(), *_in_session(server.pid)}))
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    described = []
    for process in left:
        try:
            described.append(f"{process.pid} {' '.join(process.cmdline()).strip()[:100]}")
        except psutil.Error:
            described.append(str(process.pid))
    return described


def _kill_leftovers(server: subprocess.Popen, seen: dict[int, psutil.Process]) -> None:
    if server.poll() is None:
        try:
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        server.wait()
    for process in still_running(list({*seen.values(), *_in_session(server.pid)})):
        try:
            process.kill()
        except psutil.Error:
            pass


def _assert_proxy_has_our_middleware(seen: dict[int, psutil.Process]) -> None:
    """`freemerge serve` starts Ray's proxy with the middleware that resends and refuses, and
    the room of its one front (the default --max-queued-requests)."""
    running = still_running(list(seen.values()))
    proxy = next(p for p in running if "ProxyActor" in " ".join(p.cmdline()))
    environment = proxy.environ()
    assert environment.get(PROXY_CALLBACK_ENV) == PROXY_CALLBACK
    assert environment.get(PROXY_LIMIT_ENV) == str(ServingOptions.max_queued_requests)


def _loads_torch(process: psutil.Process) -> bool:
    return any("libtorch" in Path(m.path).name for m in process.memory_maps())


def _assert_only_the_model_replica_loads_torch(seen: dict[int, psutil.Process]) -> None:
    """The front (ClassifierServer) checks requests without torch; the model replica runs it."""
    running = still_running(list(seen.values()))
    by_class = {
        name: [p for p in running if name in " ".join(p.cmdline())]
        for name in ("ClassifierServer", "ModelReplica")
    }
    assert by_class["ClassifierServer"] and by_class["ModelReplica"], by_class
    assert not any(_loads_torch(p) for p in by_class["ClassifierServer"])
    assert all(_loads_torch(p) for p in by_class["ModelReplica"])


@pytest.mark.parametrize(
    ("stop_signal", "ingress"),
    [(signal.SIGTERM, "proxy"), (signal.SIGINT, "haproxy")],
    ids=["SIGTERM-proxy", "SIGINT-haproxy"],
)
def test_a_stopped_server_leaves_no_process_behind(
    tiny_routed_artifact, stop_signal, ingress, tmp_path
):
    log = tmp_path / "serve.log"
    with _serve(tiny_routed_artifact, log, ingress) as (server, port, seen):
        _wait_ready(server, port, seen)
        running = still_running(list(seen.values()))
        assert any("raylet" in p.name() for p in running)
        assert any(p.name() == "haproxy" for p in running) == (ingress == "haproxy")
        _assert_proxy_has_our_middleware(seen)
        _assert_only_the_model_replica_loads_torch(seen)
        started = time.monotonic()
        server.send_signal(stop_signal)
        server.wait(timeout=EXIT_WITHIN_S)
        took = time.monotonic() - started
        left = _left_behind(server, seen)
        output = log.read_text(errors="replace")
        assert not left, f"running {took:.0f} s after {stop_signal.name} and exit: {left}"
        assert server.returncode == 0, output[-3000:]
        assert "shutting down" in output


@pytest.mark.slow  # Serve retries the failing replica for about half a minute
def test_a_failed_start_leaves_no_process_behind(tmp_path):
    not_an_artifact = tmp_path / "empty"
    not_an_artifact.mkdir()
    log = tmp_path / "serve.log"
    with _serve(not_an_artifact, log) as (server, _, seen):
        deadline = time.monotonic() + READY_WITHIN_S
        while server.poll() is None:
            _record_tree(server, seen)
            assert time.monotonic() < deadline, "a server with no artifact did not give up"
            time.sleep(0.2)
        output = log.read_text(errors="replace")
        assert server.returncode != 0, output[-3000:]
        assert seen, "it failed before starting Ray: nothing was checked"
        left = _left_behind(server, seen)
        assert not left, f"running after a failed start: {left}\n{output[-3000:]}"


def test_what_outlives_ray_shutdown_is_killed_even_if_it_ignores_sigterm():
    ignore_sigterm = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(60)"
    )
    with subprocess.Popen([sys.executable, "-c", ignore_sigterm], stdout=subprocess.PIPE) as stub:
        try:
            stub.stdout.readline()  # its SIGTERM handler is in place
            started = time.monotonic()
            _end([psutil.Process(stub.pid)], grace_s=0.5)
            assert time.monotonic() - started < 5
            assert stub.wait(timeout=5) == -signal.SIGKILL
        finally:
            stub.kill()


def test_picked_ports_are_unique_and_below_the_ephemeral_range():
    """free_port's ports cannot be taken meanwhile by an outgoing connection's local port or by
    a listener bound to port 0 (which Ray starts many of): the race that failed a proxy's bind."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(100)]
    assert len(set(ports)) == len(ports)
    assert all(20000 <= port < low for port in ports)


def test_the_ingress_is_set_for_each_start_and_unknown_ones_refused(monkeypatch):
    """A server started behind HAProxy leaves its flag on in this process's environment, which
    the next start's Ray inherits: the next start behind Ray's proxy turns it off."""
    from freemerge.serving.local import _proxy_environment, haproxy_environment

    options = ServingOptions.from_mapping({"artifact": "a"})
    for name in (*haproxy_environment(), PROXY_CALLBACK_ENV, PROXY_LIMIT_ENV):
        monkeypatch.setenv(name, "")  # restored (or removed) after the test
    _proxy_environment(options, "haproxy")
    assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert "empty-response" in os.environ["RAY_SERVE_HAPROXY_RETRY_ON"]
    _proxy_environment(options, "proxy")
    assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    with pytest.raises(ValueError, match="unknown ingress"):
        _proxy_environment(options, "nginx")
