"""shoal's networking benchmark: what networking adds to time-to-interactive, and what tunnels cost.

Run as root from the repository root::

    .venv/bin/python -m bench.network [--runs N] [--bytes MIB] [--json FILE]

It starts its own daemon (as ``bench.run`` does) and measures, on the same machine in the same run:

``tti``         TTI (create → ``exec("echo")`` → first output) with networking (the default) and with
                ``block_network=True``, interleaved round by round; the difference is what networking adds.
``throughput``  one TCP stream of ``--bytes`` MiB from a server in a sandbox to a client on the host: straight
                into the sandbox's namespace (its address, no tunnel: the floor), through an unencrypted tunnel,
                and through a TLS tunnel (the client decrypts; all three on this machine's 2 cores).
``latency``     a 64-byte request and its answer on a kept-open connection, and a new connection per request
                (connect, [TLS handshake,] request, answer, close): direct, unencrypted tunnel, TLS tunnel.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import ssl
import statistics
import sys
import time
from typing import Any, cast

from bench.harness import BenchDaemon, Stats, parse_args_as_root, run_with_daemon

SERVER = r"""
import socket, sys, threading
PAYLOAD = memoryview(bytes(range(256)) * 4096)  # 1 MiB
def serve(c):
    f = c.makefile("rb")
    cmd = f.readline().split()
    if cmd[0] == b"SEND":
        left = int(cmd[1])
        while left:
            n = min(left, len(PAYLOAD)); c.sendall(PAYLOAD[:n]); left -= n
    else:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            data = f.read1(65536) if hasattr(f, "read1") else c.recv(65536)
            if not data: break
            c.sendall(data)
    c.close()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", 9000)); s.listen(64)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


def _connect(addr: tuple[str, int], ctx: ssl.SSLContext | None) -> socket.socket:
    s = socket.create_connection(addr, timeout=60)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return ctx.wrap_socket(s, server_hostname=addr[0]) if ctx is not None else s


def throughput(addr: tuple[str, int], ctx: ssl.SSLContext | None, size: int) -> float:
    """MB/s (10^6 bytes) of one stream of ``size`` bytes."""
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    with _connect(addr, ctx) as s:
        t0 = time.perf_counter()
        s.sendall(f"SEND {size}\n".encode())
        got = 0
        while got < size:
            n = s.recv_into(view)
            if not n:
                raise RuntimeError(f"stream ended after {got} of {size} bytes")
            got += n
        elapsed = time.perf_counter() - t0
    return size / elapsed / 1e6


def latency_kept(addr: tuple[str, int], ctx: ssl.SSLContext | None, n: int) -> list[float]:
    """ms per 64-byte request/answer on one connection."""
    out = []
    msg = b"x" * 64
    with _connect(addr, ctx) as s:
        s.sendall(b"ECHO\n")
        for _ in range(n):
            t0 = time.perf_counter()
            s.sendall(msg)
            got = 0
            while got < len(msg):
                got += len(s.recv(4096))
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def latency_new(addr: tuple[str, int], ctx: ssl.SSLContext | None, n: int) -> list[float]:
    """ms per new connection: connect, [handshake,] request, answer, close."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        with _connect(addr, ctx) as s:
            s.sendall(b"ECHO\n" + b"x" * 64)
            got = 0
            while got < 64:
                got += len(s.recv(4096))
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.network``."""
    parser = argparse.ArgumentParser(prog="python -m bench.network", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100, help="TTI rounds and latency samples (default 100)")
    parser.add_argument("--bytes", type=int, default=1024, help="MiB per throughput stream (default 1024)")
    parser.add_argument("--streams", type=int, default=5, help="throughput streams per path (default 5)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parse_args_as_root(parser, argv)

    def measure(daemon: BenchDaemon) -> dict[str, Any]:
        import shoal

        results: dict[str, Any] = {}
        app = shoal.App.lookup("bench-network", create_if_missing=True)
        # --- TTI with and without networking, interleaved
        tti: dict[str, list[float]] = {"network": [], "block_network": []}
        for i in range(args.runs + 5):
            for label, block in (("network", False), ("block_network", True)):
                t0 = time.perf_counter()
                sb = shoal.Sandbox.create(app=app, block_network=block)
                p = sb.exec("echo", "ready")
                with contextlib.closing(cast(Any, iter(p.stdout))) as chunks:
                    next(chunks)
                t = (time.perf_counter() - t0) * 1e3
                sb.terminate()
                if i >= 5:
                    tti[label].append(t)
        results["tti_ms"] = {k: vars(Stats.of(v)) for k, v in tti.items()}
        results["tti_added_p50_ms"] = statistics.median(tti["network"]) - statistics.median(tti["block_network"])
        # --- tunnels
        sb = shoal.Sandbox.create(app=app, encrypted_ports=[9000], unencrypted_ports=[9001], timeout=3600)
        try:
            srv = sb.exec("python3", "-u", "-c", SERVER)
            with contextlib.closing(cast(Any, iter(srv.stdout))) as chunks:
                next(chunks)
            # The unencrypted tunnel needs the same server on 9001: a second instance.
            srv2 = sb.exec("python3", "-u", "-c", SERVER.replace("9000", "9001"))
            with contextlib.closing(cast(Any, iter(srv2.stdout))) as chunks:
                next(chunks)
            tunnels = sb.tunnels()
            ctx = ssl.create_default_context(cafile=str(daemon.data_dir / "tls" / "ca.pem"))
            # The sandbox's own address (a UDP "connect" sends nothing).
            p = sb.exec(
                "python3",
                "-c",
                "import socket; s = socket.socket(2, 2); s.connect(('198.18.0.1', 9)); print(s.getsockname()[0])",
            )
            p.wait()
            ip = p.stdout.read().strip()
            paths = {
                "direct": ((ip, 9001), None),
                "tunnel": (tunnels[9001].tcp_socket, None),
                "tls_tunnel": (tunnels[9000].tls_socket, ctx),
            }
            size = args.bytes << 20
            tput: dict[str, list[float]] = {k: [] for k in paths}
            for _ in range(args.streams):
                for k, (addr, c) in paths.items():
                    tput[k].append(throughput(addr, c, size))
            results["throughput_MBps"] = {k: {"median": statistics.median(v), "samples": v} for k, v in tput.items()}
            lat: dict[str, Any] = {}
            for k, (addr, c) in paths.items():
                latency_kept(addr, c, 20)
                kept = latency_kept(addr, c, args.runs * 10)
                new = latency_new(addr, c, args.runs)
                lat[k] = {"kept_open": vars(Stats.of(kept)), "new_connection": vars(Stats.of(new))}
            results["latency_ms"] = lat
        finally:
            sb.terminate()
        return results

    # Networking's cost is measured on cold creates: a warm pool would serve the networked ones precreated.
    daemon = BenchDaemon()
    daemon.env["SHOAL_WARM_POOL"] = "0"
    run = run_with_daemon(measure, daemon=daemon)
    if not run.ok:
        return run.exit_code
    results = run.value
    results["machine"] = run.facts
    results["load_average"] = run.loads
    results["left_behind"] = run.left
    print(report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return run.exit_code


def report(r: dict[str, Any]) -> str:
    """The results as a table."""
    lines = []
    t = r.get("tti_ms", {})
    if t:
        lines.append("TTI (create → first output), ms        p50      p95      p99")
        for k in ("network", "block_network"):
            s = t[k]
            lines.append(f"  {k:<36} {s['p50']:8.2f} {s['p95']:8.2f} {s['p99']:8.2f}")
        lines.append(f"  networking adds (p50)                {r['tti_added_p50_ms']:8.2f}")
    tp = r.get("throughput_MBps", {})
    if tp:
        lines.append("throughput, MB/s (median of streams)")
        for k, v in tp.items():
            lines.append(f"  {k:<36} {v['median']:8.0f}")
    lat = r.get("latency_ms", {})
    if lat:
        lines.append("latency, ms                           kept-open p50  p99    new-conn p50  p99")
        for k, v in lat.items():
            a, b = v["kept_open"], v["new_connection"]
            lines.append(f"  {k:<36} {a['p50']:8.3f} {a['p99']:8.3f} {b['p50']:12.3f} {b['p99']:8.3f}")
    lines.append(f"load average before {r['load_average']['before']}, after {r['load_average']['after']}")
    if r.get("left_behind"):
        lines.append("LEFT BEHIND: " + ", ".join(r["left_behind"]))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
