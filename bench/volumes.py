"""shoal's volume benchmark: uploads, reads, and writes from inside a sandbox.

Run as root from the repository root::

    .venv/bin/python -m bench.volumes [--rounds N] [--small-files 1000] [--big-mib 512] [--json FILE]

It starts its own daemon on temporary directories (``bench.harness.BenchDaemon``:
the same set-up and clean-up as the latency benchmark), then takes ``--rounds``
samples of each measurement:

``upload small``   ``batch_upload`` + ``put_directory`` of N files of 1 KiB (files/s, s per batch)
``upload big``     ``batch_upload`` + ``put_file`` of one file of M MiB from local disk (MB/s)
``read hot``       ``for chunk in vol.read_file(big)`` right after the upload: the file is in the page cache (MB/s)
``read cold``      the same after ``posix_fadvise(DONTNEED)`` on that one file (other files untouched); in a VM whose
                   disk the host caches, this is the guest's disk path, not the physical disk
``sandbox write``  ``dd if=/dev/zero bs=1M count=M conv=fsync`` inside a sandbox, once to the mounted volume and
                   once to the sandbox's own root filesystem (its overlay upper directory), same sandbox, the order
                   alternating between rounds (MB/s)

Every upload is flushed to disk before it returns (``syncfs``), so upload figures include that.  MB is 10^6
bytes.  Everything is cleaned up at the end, on errors and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.harness import BenchDaemon, header_lines, parse_args_as_root, run_with_daemon

GOAL_READ_MBPS = 300.0


def _mbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _make_inputs(tmp: Path, small_files: int, big_mib: int) -> tuple[Path, Path]:
    small = tmp / "small"
    small.mkdir()
    for i in range(small_files):
        (small / f"f{i:05d}.txt").write_bytes(os.urandom(1024))
    big = tmp / "big.bin"
    block = os.urandom(1 << 20)
    with open(big, "wb") as f:
        for _ in range(big_mib):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    return small, big


def _dd_seconds(sb: Any, target: str, mib: int) -> float:
    p = sb.exec("bash", "-c", f"dd if=/dev/zero of={target} bs=1M count={mib} conv=fsync 2>&1 && rm -f {target}")
    out = p.stdout.read()
    if p.wait() != 0:
        raise RuntimeError(f"dd into {target} failed: {out}")
    m = re.search(r"copied, ([0-9.]+) s", out)
    if not m:
        raise RuntimeError(f"unexpected dd output: {out}")
    return float(m.group(1))


def measure(daemon: BenchDaemon, rounds: int, small_files: int, big_mib: int) -> dict[str, list[float]]:
    import shoal

    big_bytes = big_mib << 20
    values: dict[str, list[float]] = {
        k: []
        for k in (
            "upload_small_s",
            "upload_big_mbps",
            "read_hot_mbps",
            "read_cold_mbps",
            "dd_volume_mbps",
            "dd_rootfs_mbps",
        )
    }
    app = shoal.App.lookup("bench-volumes", create_if_missing=True)
    with tempfile.TemporaryDirectory(prefix="shoal-bench-vol-") as tmp:
        print(f"preparing {small_files} small files and one {big_mib} MiB file …", file=sys.stderr, flush=True)
        small, big = _make_inputs(Path(tmp), small_files, big_mib)
        for r in range(rounds):
            print(f"round {r + 1}/{rounds} …", file=sys.stderr, flush=True)
            with shoal.Volume.ephemeral() as vol:

                def put_small() -> None:
                    with vol.batch_upload() as batch:
                        batch.put_directory(small, "/small")

                values["upload_small_s"].append(_timed(put_small))

                def put_big() -> None:
                    with vol.batch_upload() as batch:
                        batch.put_file(big, "/big.bin")

                values["upload_big_mbps"].append(_mbps(big_bytes, _timed(put_big)))

                def read_all() -> None:
                    n = sum(len(c) for c in vol.read_file("big.bin"))
                    assert n == big_bytes, n

                values["read_hot_mbps"].append(_mbps(big_bytes, _timed(read_all)))
                host_file = daemon.data_dir / "volumes" / vol.object_id / "root" / "big.bin"
                fd = os.open(host_file, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
                values["read_cold_mbps"].append(_mbps(big_bytes, _timed(read_all)))

                sb = shoal.Sandbox.create(app=app, volumes={"/data": vol}, timeout=600)
                try:
                    # The first big write after a while is slow on this VM whatever its target (the host
                    # allocates the guest disk's blocks lazily): warm both targets up, then alternate which
                    # goes first so neither always inherits the other's writeback.
                    targets = [("dd_volume_mbps", "/data/dd.out"), ("dd_rootfs_mbps", "/root/dd.out")]
                    for _, target in targets:
                        _dd_seconds(sb, target, big_mib)
                    for key, target in targets if r % 2 == 0 else targets[::-1]:
                        values[key].append(_mbps(big_bytes, _dd_seconds(sb, target, big_mib)))
                finally:
                    sb.terminate()
    values["upload_small_files_per_s"] = [small_files / s for s in values["upload_small_s"]]
    return values


ROWS = (
    ("upload_small_s", "batch_upload: {n} files of 1 KiB (s)", 3),
    ("upload_small_files_per_s", "  … files per second", 0),
    ("upload_big_mbps", "batch_upload: one {m} MiB file (MB/s)", 0),
    ("read_hot_mbps", "read_file, page cache (MB/s)", 0),
    ("read_cold_mbps", "read_file, after fadvise(DONTNEED) (MB/s)", 0),
    ("dd_volume_mbps", "sandbox dd → volume, fsync (MB/s)", 0),
    ("dd_rootfs_mbps", "sandbox dd → own rootfs, fsync (MB/s)", 0),
)


def report(
    values: dict[str, list[float]], small_files: int, big_mib: int, facts: dict[str, Any], loads: dict[str, Any]
) -> str:
    lines = [
        *header_lines(facts, loads),
        "",
        f"{'measurement':44} {'n':>3} {'median':>9} {'min':>9} {'max':>9}",
    ]
    for key, label, d in ROWS:
        v = values.get(key) or []
        if not v:
            continue
        name = label.format(n=small_files, m=big_mib)
        lines.append(f"{name:44} {len(v):3d} {statistics.median(v):9.{d}f} {min(v):9.{d}f} {max(v):9.{d}f}")
    hot = statistics.median(values["read_hot_mbps"])
    verdict = "PASS" if hot >= GOAL_READ_MBPS else "MISS"
    lines += ["", f"goal: read_file ≥ {GOAL_READ_MBPS:.0f} MB/s (page cache): {hot:.0f} MB/s {verdict}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.volumes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="samples of each measurement (default 3)")
    parser.add_argument("--small-files", type=int, default=1000, help="files in the small-file batch (default 1000)")
    parser.add_argument("--big-mib", type=int, default=512, help="size of the big file in MiB (default 512)")
    parser.add_argument("--json", type=Path, help="write machine facts, load and every sample here")
    args = parse_args_as_root(parser, argv)
    run = run_with_daemon(lambda daemon: measure(daemon, args.rounds, args.small_files, args.big_mib))
    if not run.ok:
        return run.exit_code
    print(report(run.value, args.small_files, args.big_mib, run.facts, run.loads))
    if args.json:
        run.write_json(args.json, args)
    return run.exit_code


if __name__ == "__main__":
    sys.exit(main())
