"""The load generator's HTTP client, against a small local HTTP/1.1 server (no Ray): answers
read whatever their framing, connections kept alive and reused, and every request that gets
no answer counted as status 0 rather than hanging the run."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from freemerge.benchmarks import loadgen
from freemerge.benchmarks.loadgen import LoadSpec, run_load

TEXTS = {"t": [f"text {i}" for i in range(5)]}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # kept alive unless the answer says otherwise

    def setup(self) -> None:
        super().setup()
        self.server.connections += 1

    def do_POST(self) -> None:
        sent = json.loads(self.rfile.read(int(self.headers["content-length"])))
        if self.path == "/hang":
            time.sleep(2)
        answer = {"artifact_version": "v1", "results": [{"label": sent["inputs"][0]}]}
        status = 503 if self.path == "/busy" else 200
        body = json.dumps(answer if status == 200 else {"error": "full"}).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        if self.path == "/chunked":
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            half = len(body) // 2
            for part in (body[:half], body[half:], b""):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            return
        self.send_header("content-length", str(len(body)))
        if self.path == "/close":
            self.send_header("connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.connections = 0
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def spec_for(httpd, path: str, **fields) -> LoadSpec:
    url = f"http://127.0.0.1:{httpd.server_address[1]}{path}"
    return LoadSpec(url=url, tasks=["t"], texts=TEXTS, **fields)


@pytest.mark.parametrize("path", ["/ok", "/chunked", "/close"])
def test_answers_are_read_whatever_their_framing(server, path):
    spec = spec_for(server, path, concurrency=3, requests=30)
    result = run_load(spec)
    assert [r["status"] for r in result.records] == [200] * 30
    sent = [json.loads(body)["inputs"][0] for body in loadgen._bodies(spec)]
    by_index = sorted(result.records, key=lambda r: r["index"])
    assert [r["labels"] for r in by_index] == [[text] for text in sent]
    assert all(r["version"] == "v1" for r in result.records)
    # kept alive: three clients hold three connections; a server that closes each gets 30
    assert server.connections == (30 if path == "/close" else 3)


def test_refusals_are_counted_with_their_status(server):
    result = run_load(spec_for(server, "/busy", mode="open", rate=200.0, requests=40))
    assert [r["status"] for r in result.records] == [503] * 40
    assert result.errors == 40 and not result.latencies


def test_no_server_and_no_answer_count_as_status_0(server, monkeypatch):
    monkeypatch.setattr(loadgen, "ANSWER_TIMEOUT_S", 0.3)
    started = time.perf_counter()
    hung = run_load(spec_for(server, "/hang", concurrency=2, requests=2))
    assert [r["status"] for r in hung.records] == [0, 0]
    assert time.perf_counter() - started < 1.5
    spec = spec_for(server, "/ok", requests=3)
    server.shutdown()
    server.server_close()
    assert [r["status"] for r in run_load(spec).records] == [0, 0, 0]
