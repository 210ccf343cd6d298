"""What shoal's benchmarks share: their own daemon, machine facts, statistics, and the run around a measurement.

Every benchmark (``bench.run``, ``bench.files``, ``bench.network``, ``bench.volumes``, ``bench.images``,
``bench.snapshots``) measures against a ``BenchDaemon`` of its own, started on fresh temporary directories
(the same set-up as the test suite), and goes through the same sequence, ``run_with_daemon``::

    run = run_with_daemon(lambda daemon: measure(daemon, ...))
    if not run.ok:                  # Ctrl-C / SIGTERM (130) or the measurement did not finish (1)
        return run.exit_code
    print(report(run.value, run.facts, run.loads))
    return run.exit_code            # 0, or 2 if something was left behind

which records the machine facts and the load average, starts the daemon, runs the measurement, and cleans
up whatever happens (sandboxes, containers, overlay mounts, cgroups, temporary directories; a second Ctrl-C
during clean-up is ignored), printing what could not be removed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

REPO = Path(__file__).resolve().parent.parent
MACHINE_IMAGES = Path("/var/lib/shoal/images")
CGROUP_ROOT = Path("/sys/fs/cgroup")
READY_TIMEOUT = 60.0

T = TypeVar("T")
LoadAverage = tuple[float, float, float]


# ---------------------------------------------------------------------------------------------- statistics


def percentile(ordered: list[float], q: float) -> float:
    """The ``q``-th percentile of sorted values, interpolating linearly between ranks (numpy's default)."""
    if not ordered:
        return math.nan
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class Stats:
    """Summary of one metric's samples, in milliseconds."""

    n: int
    p50: float
    p95: float
    p99: float
    min: float
    max: float
    mean: float

    @classmethod
    def of(cls, samples: list[float]) -> Stats:
        """Summarise ``samples`` (ms)."""
        s = sorted(samples)
        if not s:
            return cls(0, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan)
        return cls(len(s), percentile(s, 50), percentile(s, 95), percentile(s, 99), s[0], s[-1], sum(s) / len(s))


def now_ns() -> int:
    """CLOCK_MONOTONIC in ns: the same clock in every process, so the daemon's stamps line up with ours."""
    return time.monotonic_ns()


def ms(start_ns: int, end_ns: int) -> float:
    """Milliseconds between two ``now_ns`` stamps."""
    return (end_ns - start_ns) / 1e6


# ---------------------------------------------------------------------------------------------- machine


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.strip().splitlines()[0] if out.strip() else "unknown"


def machine_facts() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu_model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    os_name = "unknown"
    with contextlib.suppress(OSError), open("/etc/os-release") as f:
        for line in f:
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip().strip('"')
    runc = shutil.which("runc") or "runc"
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "os": os_name,
        "kernel": platform.release(),
        "runc": _first_line([runc, "--version"]),
        "python": platform.python_version(),
    }


def machine_line(facts: dict[str, Any], *, python: bool = False) -> str:
    """``machine: N CPUs (model), OS, kernel K`` (and ``, Python V`` with ``python``)."""
    line = f"machine: {facts['cpu_count']} CPUs ({facts['cpu_model']}), {facts['os']}, kernel {facts['kernel']}"
    return line + f", Python {facts['python']}" if python else line


def load_line(before: LoadAverage, after: LoadAverage) -> str:
    """``load average before: 1 5 15; after: 1 5 15`` (minutes)."""
    return "load average before: {:.2f} {:.2f} {:.2f}; after: {:.2f} {:.2f} {:.2f}".format(*before, *after)


def header_lines(facts: dict[str, Any], loads: dict[str, LoadAverage]) -> list[str]:
    """The ``machine: …`` and ``load average …`` lines that head a report (``loads`` as ``BenchRun.loads``)."""
    return [machine_line(facts), load_line(loads["before"], loads["after"])]


# ---------------------------------------------------------------------------------------------- daemon


def stats_lines(values: dict[str, list[float]], rows: Iterable[tuple[str, str]], **fmt: Any) -> list[str]:
    """A table of n, p50, p95, p99, min and max (ms) for each ``(key, label)`` row with samples; ``fmt`` fills the
    labels' ``{placeholders}``."""
    lines = [f"{'measurement (ms)':44} {'n':>3} {'p50':>8} {'p95':>8} {'p99':>8} {'min':>8} {'max':>8}"]
    for key, label in rows:
        v = values.get(key) or []
        if v:
            s = Stats.of(v)
            lines.append(
                f"{label.format(**fmt):44} {s.n:3d} {s.p50:8.1f} {s.p95:8.1f} {s.p99:8.1f} {s.min:8.1f} {s.max:8.1f}"
            )
    return lines


def _cgroup_dirs(rel: str) -> list[Path]:
    """``rel`` (an absolute cgroup path) under every mounted controller hierarchy that has it."""
    if not CGROUP_ROOT.is_dir():
        return []
    found = []
    for ctrl in CGROUP_ROOT.iterdir():
        if ctrl.is_symlink():
            continue
        d = ctrl / rel.lstrip("/")
        if d.is_dir():
            found.append(d)
    return found


def _remove_cgroup_tree(rel: str) -> list[str]:
    """rmdir a cgroup subtree (deepest first) in every hierarchy; returns what could not be removed."""
    left = []
    for top in _cgroup_dirs(rel):
        dirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
        for d in [*dirs, top]:
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError as e:
                left.append(f"cgroup {d} ({e.strerror})")
    return left


def _processes_in(cgroup_rel: str) -> set[int]:
    marker = cgroup_rel.rstrip("/") + "/"
    pids = set()
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            cgroups = (pid_dir / "cgroup").read_text()
        except OSError:
            continue
        if marker in cgroups:
            pids.add(int(pid_dir.name))
    return pids


def _mounts_under(root: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(str(root) + "/")]


class BenchDaemon:
    """A shoal daemon on temporary directories, owned by this benchmark (the same set-up as the test suite).

    With ``instrument_to`` set, the daemon runs as ``python -m bench.run _instrumented-daemon FILE`` (the latency
    benchmark's ``--profile``) and writes its timestamps to that file.
    """

    def __init__(self, instrument_to: Path | None = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="shoal-bench-"))
        self.root.chmod(0o711)  # sandboxes' mounts are set up as their (unprivileged) user
        self.cgroup_parent = f"/shoal-bench-{os.getpid()}"
        self.instrument_to = instrument_to
        self.proc: subprocess.Popen[bytes] | None = None
        env = dict(os.environ)
        env.update(
            SHOAL_DATA_DIR=str(self.data_dir),
            SHOAL_RUNTIME_DIR=str(self.runtime_dir),
            SHOAL_CGROUP_PARENT=self.cgroup_parent,
            SHOAL_NO_AUTOSTART="1",
            PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO)]),
        )
        if MACHINE_IMAGES.is_dir():
            env["SHOAL_IMAGE_CACHE"] = str(MACHINE_IMAGES)
        for name in ("SHOAL_URL", "SHOAL_SOCKET", "SHOAL_RUNTIME"):
            env.pop(name, None)
        self.env = env

    @property
    def data_dir(self) -> Path:
        """The daemon's state and images."""
        return self.root / "data"

    @property
    def runtime_dir(self) -> Path:
        """Sockets, bundles and overlay mounts."""
        return self.root / "run"

    def image_lowers(self, sandbox_id: str) -> list[str]:
        """The image layer directories of a sandbox, topmost first, from its stored spec (its overlay is built
        from id-mapped clones of them, so the mount table does not name them)."""
        db = sqlite3.connect(f"file:{self.data_dir / 'state.db'}?mode=ro", uri=True)
        try:
            row = db.execute("SELECT spec FROM sandboxes WHERE id = ?", (sandbox_id,)).fetchone()
        finally:
            db.close()
        if row is None:
            raise RuntimeError(f"sandbox {sandbox_id} is not in the daemon's database")
        lowers = []
        for layer in reversed(json.loads(row[0])["image_layers"]):
            stores = (self.data_dir / "images" / "layers" / layer, MACHINE_IMAGES / "layers" / layer)
            found = [d for d in stores if d.is_dir()]
            if not found:
                raise RuntimeError(f"layer {layer} of sandbox {sandbox_id} is in no image store")
            lowers.append(str(found[0]))
        return lowers

    @property
    def socket(self) -> Path:
        """The API socket."""
        return self.runtime_dir / "shoald.sock"

    @property
    def log(self) -> Path:
        """The daemon's stdout and stderr."""
        return self.root / "daemon.log"

    def start(self) -> None:
        """Start the daemon and wait until it serves; point this process's SDK at it."""
        if self.instrument_to is None:
            argv = [sys.executable, "-m", "shoal", "serve"]
        else:
            argv = [sys.executable, "-m", "bench.run", "_instrumented-daemon", str(self.instrument_to)]
        with open(self.log, "ab") as log:
            # A session of its own: Ctrl-C in the terminal must reach the benchmark, not the daemon,
            # so that the benchmark can still terminate the sandboxes through it.
            self.proc = subprocess.Popen(
                argv, env=self.env, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
            )
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited at start:\n{self.log.read_text()[-3000:]}")
            if self.socket.exists() and "daemon ready" in self.log.read_text():
                break
            time.sleep(0.05)
        else:
            raise RuntimeError(f"the daemon did not become ready:\n{self.log.read_text()[-3000:]}")
        os.environ["SHOAL_RUNTIME_DIR"] = str(self.runtime_dir)
        os.environ["SHOAL_NO_AUTOSTART"] = "1"
        for name in ("SHOAL_URL", "SHOAL_SOCKET"):
            os.environ.pop(name, None)

    def terminate_all(self) -> None:
        """Terminate every sandbox the daemon still runs (through its API, like a user would)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        import shoal

        for sb in shoal.Sandbox.list():
            with contextlib.suppress(Exception):
                sb.terminate()

    def stop(self) -> None:
        """Stop the daemon (SIGTERM, then SIGKILL)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def leaks(self) -> list[str]:
        """Containers, mounts, cgroups, runtime dirs or processes the daemon's sandboxes left behind."""
        found: list[str] = []
        for state_dir in (self.runtime_dir / "oci").glob("*"):
            found += [f"container {c}" for c in state_dir.iterdir() if c.is_dir()]
        found += [f"mount {m}" for m in _mounts_under(self.root)]
        for parent in _cgroup_dirs(self.cgroup_parent):
            found += [f"cgroup {c}" for c in parent.iterdir() if c.is_dir()]
        sandboxes = self.runtime_dir / "sandboxes"
        if sandboxes.is_dir():
            found += [f"runtime dir {p}" for p in sandboxes.iterdir()]
        found += [f"process {pid} in a sandbox cgroup" for pid in sorted(_processes_in(self.cgroup_parent))]
        return found

    def force_cleanup(self) -> list[str]:
        """Last resort after the daemon is gone: delete containers, unmount, remove cgroups; returns what is left."""
        runc = shutil.which("runc")
        for state_dir in (self.runtime_dir / "oci").glob("*"):
            binary = shutil.which(state_dir.name) or runc
            for c in state_dir.iterdir():
                if c.is_dir() and binary:
                    subprocess.run(
                        [binary, "--root", str(state_dir), "delete", "--force", c.name],
                        capture_output=True,
                        check=False,
                    )
        for m in sorted(_mounts_under(self.root), key=len, reverse=True):
            subprocess.run(["umount", "-l", m], capture_output=True, check=False)
        left = _remove_cgroup_tree(self.cgroup_parent)
        return left + [f"mount {m}" for m in _mounts_under(self.root)]

    def remove(self) -> None:
        """Delete the temporary directories."""
        shutil.rmtree(self.root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- a run


def parse_args_as_root(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, refusing (exit 2, with usage) unless running as root."""
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("the benchmark starts a shoal daemon, which needs root")
    return args


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM cleans up like Ctrl-C does."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def clean_up(daemon: BenchDaemon, extra: Callable[[], list[str]] | None = None) -> list[str]:
    """Terminate the sandboxes, stop the daemon, remove what it left and its directories; returns what is left.

    ``extra`` runs after the daemon's own leftovers are gone and before its temporary tree is removed (the
    latency benchmark's floor lives there). Ctrl-C is ignored meanwhile: clean-up must finish.
    """
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with contextlib.suppress(Exception):
            daemon.terminate_all()
        daemon.stop()
        left = daemon.leaks()
        if left:
            left = daemon.force_cleanup()
        left += _remove_cgroup_tree(daemon.cgroup_parent)  # the (now empty) parent of the sandboxes' cgroups
        if extra is not None:
            left += extra()
        daemon.remove()
    finally:
        signal.signal(signal.SIGINT, old_int)
    return left


@dataclass
class BenchRun(Generic[T]):
    """How one ``run_with_daemon`` went: the measurement's result, what was left, the machine and its load."""

    daemon: BenchDaemon
    facts: dict[str, Any]
    load_before: LoadAverage
    load_after: LoadAverage = (math.nan, math.nan, math.nan)
    result: T | None = None
    completed: bool = False
    interrupted: bool = False
    left: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """The measurement finished and was not interrupted: there is something to report."""
        return self.completed and not self.interrupted

    @property
    def value(self) -> T:
        """The measurement's result (only once it finished)."""
        if not self.completed:
            raise RuntimeError("the measurement did not finish")
        return cast(T, self.result)

    @property
    def loads(self) -> dict[str, LoadAverage]:
        """``{"before": …, "after": …}``: the 1/5/15-minute load averages around the run."""
        return {"before": self.load_before, "after": self.load_after}

    def write_json(self, path: Path, args: argparse.Namespace) -> None:
        """Machine facts, load averages, the command-line arguments and the result, as JSON (indented by 2)."""
        doc = {
            "machine": self.facts,
            "load_average": self.loads,
            "args": vars(args) | {"json": str(path)},
            "values": self.value,
        }
        path.write_text(json.dumps(doc, indent=2))

    @property
    def exit_code(self) -> int:
        """130 after Ctrl-C or SIGTERM, 1 if the measurement did not finish, 2 if something was left behind, else 0."""
        if self.interrupted:
            return 130
        if not self.completed:
            return 1
        return 2 if self.left else 0


def run_with_daemon(
    body: Callable[[BenchDaemon], T],
    *,
    daemon: BenchDaemon | None = None,
    cleanup: Callable[[], list[str]] | None = None,
) -> BenchRun[T]:
    """Start a daemon, run ``body(daemon)``, clean up whatever happens, and say how it went.

    Records the machine facts and the load average first; SIGTERM counts as Ctrl-C while ``body`` runs, and
    either ends it (``interrupted``, exit code 130) without a traceback. Any other exception propagates after
    the clean-up. What could not be removed is printed (stderr) and kept in ``left``; ``cleanup`` is passed
    to ``clean_up`` as ``extra``. ``daemon`` defaults to a fresh ``BenchDaemon()``.
    """
    facts = machine_facts()
    load_before = os.getloadavg()
    if daemon is None:
        daemon = BenchDaemon()
    run: BenchRun[T] = BenchRun(daemon, facts, load_before)
    try:
        with _sigterm_as_interrupt():
            print(f"starting a daemon in {daemon.root} …", file=sys.stderr, flush=True)
            daemon.start()
            run.result = body(daemon)
            run.completed = True
    except KeyboardInterrupt:
        run.interrupted = True
        print("\ninterrupted; cleaning up …", file=sys.stderr, flush=True)
    finally:
        run.left = clean_up(daemon, cleanup)
    if run.left:
        print("LEFT BEHIND:\n  " + "\n  ".join(run.left), file=sys.stderr)
    run.load_after = os.getloadavg()
    return run
