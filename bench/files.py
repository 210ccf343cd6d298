"""shoal's file transfer benchmark: throughput of big files and latency of small ones, beside ``cat`` via exec.

Run as root from the repository root::

    .venv/bin/python -m bench.files [--size-mib 256] [--repeats 5] [--runs 200] [--json FILE]

It starts its own daemon on temporary directories (``bench.harness.BenchDaemon``: the same set-up and the
same clean-up as the latency benchmark), creates one sandbox, and measures, all in the same run:

``fs write`` / ``fs read``      ``sb.filesystem.write_bytes`` / ``read_bytes`` of a ``--size-mib`` file
``open write`` / ``open read``  ``sb.open(path, "wb").write(data)`` / ``sb.open(path, "rb").read()`` of the same
``1 KiB round trip``            ``write_text`` of 1 KiB then ``read_text`` of it (``--runs`` times, interleaved with:)
``cat via exec``                ``sb.exec("cat", path)`` of the same 1 KiB file: ``stdout.read()`` and ``wait()``

Throughput is MB/s (10^6 bytes per second) over ``--repeats`` transfers (median and best); every read is
checked against what was written.  Goals (issue 3, 2-core machine): ≥ 200 MB/s each way, 1 KiB round trip
p50 ≤ 5 ms.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.harness import BenchDaemon, Stats, machine_line, parse_args_as_root, run_with_daemon

GOAL_MBPS = 200.0
GOAL_RT_MS = 5.0


def _mbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6


def _pattern(size: int) -> bytes:
    """``size`` bytes that do not compress or repeat in short cycles (every byte value occurs)."""
    block = hashlib.shake_256(b"shoal-bench-files").digest(1 << 20)
    reps, rest = divmod(size, len(block))
    return block * reps + block[:rest]


def throughput(sb: Any, data: bytes, repeats: int) -> dict[str, list[float]]:
    """MB/s samples of each transfer kind."""
    fs = sb.filesystem
    digest = hashlib.sha256(data).digest()
    out: dict[str, list[float]] = {"fs_write": [], "fs_read": [], "open_write": [], "open_read": []}
    for i in range(repeats):
        os.sync()  # start each round without the previous one's dirty pages
        t0 = time.perf_counter()
        fs.write_bytes(data, "/tmp/bench-fs.bin")
        t1 = time.perf_counter()
        got = fs.read_bytes("/tmp/bench-fs.bin")
        t2 = time.perf_counter()
        if hashlib.sha256(got).digest() != digest:
            raise RuntimeError("sb.filesystem read back different bytes")
        del got
        with sb.open("/tmp/bench-open.bin", "wb") as f:
            f.write(data)
        t3 = time.perf_counter()
        with sb.open("/tmp/bench-open.bin", "rb") as f:
            got = f.read()
        t4 = time.perf_counter()
        if hashlib.sha256(got).digest() != digest:
            raise RuntimeError("sb.open read back different bytes")
        del got
        out["fs_write"].append(_mbps(len(data), t1 - t0))
        out["fs_read"].append(_mbps(len(data), t2 - t1))
        out["open_write"].append(_mbps(len(data), t3 - t2))
        out["open_read"].append(_mbps(len(data), t4 - t3))
        print(
            f"  {i + 1}/{repeats}: fs write {out['fs_write'][-1]:.0f}, fs read {out['fs_read'][-1]:.0f},"
            f" open write {out['open_write'][-1]:.0f}, open read {out['open_read'][-1]:.0f} MB/s",
            file=sys.stderr,
            flush=True,
        )
    return out


def latency(sb: Any, runs: int, warmup: int) -> dict[str, list[float]]:
    """Millisecond samples of a 1 KiB round trip and of ``cat`` through exec, interleaved."""
    fs = sb.filesystem
    text = "x" * 1023 + "\n"
    path = "/tmp/bench-1k.txt"
    out: dict[str, list[float]] = {"rt_1k": [], "write_1k": [], "read_1k": [], "cat_1k": []}
    for i in range(warmup + runs):
        t0 = time.perf_counter()
        fs.write_text(text, path)
        t1 = time.perf_counter()
        got = fs.read_text(path)
        t2 = time.perf_counter()
        p = sb.exec("cat", path)
        cat = p.stdout.read()
        p.wait()
        t3 = time.perf_counter()
        if got != text or cat != text:
            raise RuntimeError("the 1 KiB file read back wrong")
        if i >= warmup:
            out["write_1k"].append((t1 - t0) * 1e3)
            out["read_1k"].append((t2 - t1) * 1e3)
            out["rt_1k"].append((t2 - t0) * 1e3)
            out["cat_1k"].append((t3 - t2) * 1e3)
    return out


def report(tp: dict[str, list[float]], lat: dict[str, list[float]], size: int) -> list[str]:
    """The results table."""
    lines = [f"throughput, {size >> 20} MiB file, MB/s (10^6 B/s)   median     best    worst   goal"]
    labels = {
        "fs_write": "sb.filesystem.write_bytes",
        "fs_read": "sb.filesystem.read_bytes",
        "open_write": "sb.open(..., 'wb').write",
        "open_read": "sb.open(..., 'rb').read",
    }
    for key, label in labels.items():
        v = tp[key]
        verdict = "PASS" if statistics.median(v) >= GOAL_MBPS else "MISS"
        lines.append(
            f"  {label:<42}{statistics.median(v):>7.0f}  {max(v):>7.0f}  {min(v):>7.0f}   ≥{GOAL_MBPS:.0f} {verdict}"
        )
    lines += ["", f"latency, ms {'':<31}  n      p50      p95      p99      min      max"]
    labels = {
        "rt_1k": "1 KiB write_text + read_text",
        "write_1k": "  write_text alone",
        "read_1k": "  read_text alone",
        "cat_1k": "sb.exec('cat', same file) + read + wait",
    }
    for key, label in labels.items():
        s = Stats.of(lat[key])
        lines.append(f"  {label:<40}{s.n:>4} {s.p50:>8.2f} {s.p95:>8.2f} {s.p99:>8.2f} {s.min:>8.2f} {s.max:>8.2f}")
    p50 = Stats.of(lat["rt_1k"]).p50
    lines.append(
        f"  goal: round trip p50 ≤ {GOAL_RT_MS:.0f} ms: {p50:.2f} ms {'PASS' if p50 <= GOAL_RT_MS else 'MISS'}"
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.files``."""
    parser = argparse.ArgumentParser(prog="python -m bench.files", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256, help="size of the big file (default 256)")
    parser.add_argument("--repeats", type=int, default=5, help="transfers of the big file each way (default 5)")
    parser.add_argument("--runs", type=int, default=200, help="timed 1 KiB round trips (default 200)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed round trips first (default 10)")
    parser.add_argument("--json", metavar="FILE", help="also write every sample as JSON")
    args = parse_args_as_root(parser, argv)

    def measure(daemon: BenchDaemon) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
        import shoal

        app = shoal.App.lookup("bench-files", create_if_missing=True)
        sb = shoal.Sandbox.create(app=app, timeout=3600)
        try:
            # Small files first: the big transfers leave the page cache writing back for a while.
            print(f"latency: {args.warmup} + {args.runs} round trips …", file=sys.stderr, flush=True)
            lat = latency(sb, args.runs, args.warmup)
            data = _pattern(args.size_mib << 20)
            print(f"throughput: {args.repeats} x {args.size_mib} MiB each way …", file=sys.stderr, flush=True)
            tp = throughput(sb, data, args.repeats)
            del data
        finally:
            sb.terminate()
        return tp, lat

    run = run_with_daemon(measure)
    if not run.ok:
        return run.exit_code
    tp, lat = run.value
    before, after = run.load_before, run.load_after
    lines = [
        machine_line(run.facts, python=True),
        f"load average (1/5/15 min): before {before[0]:.2f}/{before[1]:.2f}/{before[2]:.2f},"
        f" after {after[0]:.2f}/{after[1]:.2f}/{after[2]:.2f}",
        "",
        *report(tp, lat, args.size_mib << 20),
    ]
    print("\n".join(lines))
    if args.json:
        doc = {
            "machine": run.facts,
            "load_average": run.loads,
            "size_bytes": args.size_mib << 20,
            "throughput_mbps": tp,
            "latency_ms": lat,
            "left_behind": run.left,
        }
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    return run.exit_code


if __name__ == "__main__":
    sys.exit(main())
