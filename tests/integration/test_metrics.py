"""``GET /metrics``: the daemon's Prometheus metrics, read with the Prometheus client's own parser after known
work (issue 17); ``--metrics-public`` and ``--log-format json``."""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

import shoal
from shoal.exception import NotFoundError
from shoal.sdk._sync import run_blocking
from shoal.sdk.transport import default_client
from shoal.wire import ids

Values = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=30)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self._path)
        self.sock = s


def _parse(text: str) -> Values:
    out: Values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def scrape(daemon) -> Values:  # type: ignore[no-untyped-def]
    conn = _UnixHTTP(str(daemon.socket))
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        body = resp.read().decode()
        assert resp.status == 200, body
        assert resp.getheader("Content-Type", "").startswith("text/plain; version=0.0.4")
        return _parse(body)
    finally:
        conn.close()


def value(values: Values, name: str, **labels: str) -> float:
    return values.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(check: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "the metrics never showed it"
        time.sleep(0.2)


def test_metrics_count_the_work_the_daemon_did(daemon, app) -> None:  # type: ignore[no-untyped-def]
    before = scrape(daemon)
    sb = shoal.Sandbox.create("python3", "-m", "http.server", "8000", app=app, timeout=120, unencrypted_ports=[8000])
    try:
        assert sb.exec("true").wait() == 0
        host, port = sb.tunnels()[8000].tcp_socket
        answer = b""
        for _ in range(100):
            try:
                with socket.create_connection((host, port), timeout=2) as s:
                    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                    answer = s.recv(100)
                if answer:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        assert answer.startswith(b"HTTP/1.0 200"), answer
        step = shoal.Image.debian_slim().env({"METRICS_TEST": uuid.uuid4().hex})
        step.build()  # a new step: built
        step.env({"AND_THEN": "1"}).build()  # that step again (cached), and one more (built)
        with pytest.raises(NotFoundError):
            shoal.Sandbox.create(app=app, image=shoal.Image.from_id(ids.new("image")))

        def sampled() -> bool:
            return (
                value(
                    scrape(daemon),
                    "shoal_sandbox_memory_bytes",
                    sandbox_id=sb.object_id,
                    app_id=app.app_id,
                    runtime="runc",
                )
                > 0
            )

        wait_for(sampled)  # the daemon of the tests samples each second
        after = scrape(daemon)
    finally:
        sb.terminate()

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    created = grew("shoal_sandbox_creates_total", runtime="runc", source="pool") + grew(
        "shoal_sandbox_creates_total", runtime="runc", source="cold"
    )
    assert created == 1
    assert grew("shoal_sandbox_create_seconds_count", runtime="runc") == 1
    assert grew("shoal_sandbox_create_seconds_sum", runtime="runc") > 0
    assert grew("shoal_sandbox_create_failures_total", reason="NotFoundError") == 1
    assert grew("shoal_exec_start_seconds_count", runtime="runc") >= 1
    assert value(after, "shoal_sandboxes_running", runtime="runc") >= 1
    assert grew("shoal_image_build_steps_total", outcome="built") >= 2
    assert grew("shoal_image_build_steps_total", outcome="cached") >= 1
    assert grew("shoal_tunnel_bytes_total", direction="in") >= len(b"GET / HTTP/1.0\r\n\r\n")
    assert grew("shoal_tunnel_bytes_total", direction="out") >= len(answer)
    hits_and_misses = grew("shoal_warm_pool_hits_total") + grew("shoal_warm_pool_misses_total")
    assert hits_and_misses == 0  # a custom entrypoint and ports: not the pool's shape, neither a hit nor a miss
    memory = value(after, "shoal_sandbox_memory_bytes", sandbox_id=sb.object_id, app_id=app.app_id, runtime="runc")
    assert 1 << 20 < memory < 1 << 30
    assert (
        "shoal_sandbox_cpu_cores",
        (("app_id", app.app_id), ("runtime", "runc"), ("sandbox_id", sb.object_id)),
    ) in after

    # (A default create is the pool's business: hits and misses are checked in test_pool, on a daemon of its own.)
    later = scrape(daemon)
    gone = ("shoal_sandbox_memory_bytes", (("app_id", app.app_id), ("runtime", "runc"), ("sandbox_id", sb.object_id)))
    assert gone not in later  # an ended sandbox has no gauges


def test_metrics_need_the_token_over_tcp_unless_public_and_json_logs(own_daemon) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/metrics"
    own_daemon.restart_with("--tcp", f"127.0.0.1:{port}")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=10)
    assert refused.value.code == 401
    refused.value.close()
    token = (own_daemon.data_dir / "api-token").read_text().strip()
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})) as r:
        assert "shoal_sandboxes_running" in r.read().decode()
    # The rest of the API keeps its token when the metrics are public.
    own_daemon.stop()
    logged = own_daemon.log.stat().st_size
    own_daemon.start("--tcp", f"127.0.0.1:{port}", "--metrics-public", "--log-format", "json")
    with urllib.request.urlopen(url, timeout=10) as r:
        assert ("shoal_warm_pool_ready", ()) in _parse(r.read().decode())
    board = run_blocking(default_client().request("GET", "/v1/dashboard"))["url"]
    with urllib.request.urlopen(board + "/metrics", timeout=10) as r:  # the dashboard's, without its token
        assert ("shoal_warm_pool_ready", ()) in _parse(r.read().decode())
    with pytest.raises(urllib.error.HTTPError) as still:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/status", timeout=10)
    assert still.value.code == 401
    still.value.close()
    with open(own_daemon.log, encoding="utf-8") as f:
        f.seek(logged)
        records = [json.loads(line) for line in f.read().splitlines() if line.strip()]  # every line is JSON
    ready = [r for r in records if "daemon ready" in r["message"]]
    assert ready and ready[-1]["level"] == "INFO" and ready[-1]["logger"] == "shoal.server.daemon"
    assert ready[-1]["time"].endswith("+00:00")
