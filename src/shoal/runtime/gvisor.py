"""gVisor's ``runsc``: the :class:`~shoal.runtime.base.ContainerRuntime` that puts a kernel (the Sentry) between
a sandbox and the host (decision 0069).

What differs from runc, and why:

* The agent's control socket is the container's standard input: runsc passes only its own stdio into the
  sandbox (there is no ``--preserve-fds``), and it carries a host socket there intact.
* ``--host-uds=open`` lets the agent connect to the daemon's reconnection socket in its bind-mounted control
  directory; nothing else in a sandbox may reach a host socket.
* The network is gVisor's own TCP/IP stack (``--network=sandbox``): runsc takes the addresses and routes of
  the namespace shoal prepared (one veth) into the Sentry.  Debian's runsc (2022-12 and 2024-07 builds) refuses
  any namespace in which ``/proc/sys/net/core/rmem_default`` exists, which it takes for "the host's" — but
  since Linux 6.x that file exists in every network namespace.  So the runsc commands that set a network up
  run in a private mount namespace with an empty tmpfs over ``/proc/sys/net`` (``shoal-agent runsc-exec
  --hide-net``), and shoal itself makes sure the namespace named in the bundle is not the host's
  (:func:`check_netns`) before runsc may scrape it.
* No seccomp filter inside the sandbox: its system calls reach the Sentry, not the host's kernel (runsc
  filters the Sentry's own calls to the host); runsc 2024-07 applying the runc profile inside broke
  ``pthread_create`` (the profile's ``clone3`` → ENOSYS rule).
* ``--directfs=false``: the Sentry reaches files only through the gofer, so runsc runs it as host uid nobody
  with no capability (with directfs it keeps uid 0 and capabilities in an identity-mapped user namespace);
  small-file work costs about twice as much (decision 0069).
* No user namespace in the spec: runsc puts the Sentry in a user namespace of its own with no host privilege,
  and the files it writes through its gofer go through an id-mapped root (the storage mapping), so sandbox
  root's files are stored as the shared range's root (100000), as runc sandboxes' are.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
from pathlib import Path

from shoal.exception import InvalidError
from shoal.runtime.base import ContainerRuntime, RuntimeFailure
from shoal.runtime.oci import live_stat, log_tail, parse_list, parse_state, start_failure
from shoal.util import spawn

PLATFORM = "systrap"
"""runsc's own default.  ``--platform=kvm`` hangs on this kind of host; ``ptrace`` starts execs faster here (exec
p50 16 vs 51 ms) but holds ~10 host tasks per sandbox process and keeps them after it ends, so any host pids
limit ends the whole sandbox under a fork bomb; systrap holds ~2 and a fork bomb stops at the sandbox's
RLIMIT_NPROC (decision 0069, issue 15).  An operator adds or overrides runsc's flags with ``$SHOAL_RUNSC_FLAGS``
(e.g. ``--debug --debug-log=/tmp/runsc/``)."""
SENTRY_UID = 65534
"""The host uid a Sentry runs as: runsc drops it to nobody, with no capability, when its files go through the
gofer (``--directfs=false``, decision 0069); with directfs it would keep uid 0 in a user namespace of its own
whose map is the identity, with capabilities there.  Its other processes are known by name (:meth:`is_ours`)."""
QUICK_VERBS = frozenset({"pause", "resume", "checkpoint", "state", "kill", "delete", "list", "start"})
"""runsc commands that start no Sentry or gofer (they call one that runs): run with membarrier(2) failing, which
saves each ~10 ms of memory-barrier registration at start that only a Sentry needs (``shoal-agent runsc-exec
--no-membarrier``, decision 0073).  ``create``, ``run`` and ``restore`` are never among them."""
CONTROL_TIMEOUT = 10.0
"""Seconds a call on a Sentry's control socket may take."""
NET_MASK = 'mount -t tmpfs -o size=4k,mode=555,nosuid,nodev,noexec shoal-runsc /proc/sys/net && exec "$@"'
"""The shell line that hides ``/proc/sys/net`` from runsc before running it (see the module's docstring) where no
``helper`` does it (the bench's floor: bare runsc)."""


class SentryUnreachable(RuntimeFailure):
    """A call on a Sentry's control socket that never reached it (so it did nothing)."""


class GvisorRuntime(ContainerRuntime):
    """runsc with its own state directory."""

    def __init__(self, binary: str, state_dir: str) -> None:
        self._binary = binary
        self.state_dir = state_dir
        self._networks: dict[str, str] = {}
        self.helper: str | None = None
        """``shoal-agent``, which runs runsc more cheaply (``runsc-exec``; the daemon sets it).  Without it runsc runs
        bare, its network commands under ``unshare`` and ``sh`` (as the bench's floor does)."""
        """Container id → the --network its create used (``runsc start`` sets the network up, with its own flags)."""

    def __repr__(self) -> str:
        return f"GvisorRuntime({self._binary!r}, {self.state_dir!r})"

    @property
    def name(self) -> str:
        """``runsc``."""
        return "runsc"

    @property
    def binary(self) -> str:
        """The runsc executable."""
        return self._binary

    def _argv(self, *args: str, network: str = "sandbox", masked: bool = False) -> list[str]:
        """runsc's command line; ``masked``: in a private mount namespace without ``/proc/sys/net`` (the commands
        that set up the sandbox's network: create, run, start)."""
        quick = bool(args) and args[0] in QUICK_VERBS
        runsc = [
            self.binary,
            "--root",
            self.state_dir,
            f"--platform={PLATFORM}",
            f"--network={network}",
            "--host-uds=open",
            "--overlay2=none",  # what the sandbox writes goes to its upper directory on disk, as under runc
            "--directfs=false",  # the Sentry runs as nobody with no capabilities; files go through the gofer
            *shlex.split(os.environ.get("SHOAL_RUNSC_FLAGS", "")),
            *args,
        ]
        if self.helper is not None and (masked or quick):
            flags = [*(["--hide-net"] if masked else []), *(["--no-membarrier"] if quick else [])]
            return [self.helper, "runsc-exec", *flags, *runsc]
        if not masked:
            return runsc
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", NET_MASK, "sh", *runsc]

    async def _run(self, *args: str, check: bool = True, masked: bool = False) -> str:
        res = await spawn.run(self._argv(*args, masked=masked))
        if check and res.returncode != 0:
            raise RuntimeFailure(f"runsc {args[0]} failed (exit {res.returncode})", res.stderr.decode(errors="replace"))
        return res.stdout.decode(errors="replace")

    async def _launch(self, verb: str, container_id: str, bundle: str, ctl_fd: int, log_path: str, *extra: str) -> None:
        network = "sandbox" if check_netns(bundle) else "none"
        if verb == "create":
            self._networks[container_id] = network
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            argv = self._argv(verb, *extra, "--bundle", bundle, container_id, network=network, masked=True)
            res = await spawn.run(argv, fds={0: ctl_fd, 1: log_fd, 2: log_fd})
        finally:
            os.close(log_fd)
        if res.returncode != 0:
            raise start_failure(f"runsc {verb} failed (exit {res.returncode})", log_tail(log_path))

    @staticmethod
    def is_ours(pid: int, uid: int) -> bool:
        """Whether an exited child of the daemon was one of runsc's processes, orphaned to it (the daemon is a child
        subreaper): a Sentry (uid 65534 where runsc drops to nobody), a gofer, or the platform's stub processes,
        which a Sentry leaves when it ends.  runsc starts all of them by re-executing itself through
        ``/proc/self/exe``, so their name is ``exe``; the daemon runs every program of its own by its path, so none
        of those is."""
        if uid == SENTRY_UID:
            return True
        try:
            return Path(f"/proc/{pid}/comm").read_text().strip() == "exe"
        except OSError:
            return False

    def waiting_init_alive(self, container_id: str) -> bool | None:
        """Whether a created container's Sentry still runs (from runsc's state file and ``/proc``): a pooled
        sandbox whose Sentry was killed while it waited cannot be started."""
        state_file = Path(self.state_dir, f"{container_id}_sandbox:{container_id}.state")
        try:
            pid = int(json.loads(state_file.read_text())["sandbox"]["pid"])
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return live_stat(pid) is not None and comm == "exe"  # runsc re-executes itself: another name is a reused pid

    async def start(self, container_id: str, bundle: str, ctl_fd: int, log_path: str) -> None:
        """``runsc run --detach``: the agent's control socket is its standard input."""
        await self._launch("run", container_id, bundle, ctl_fd, log_path, "--detach")

    async def pause(self, container_id: str) -> None:
        """The Sentry stops every task of the sandbox: its ``containerManager.Pause`` through its control socket
        (~0.5 ms, against ~11 ms for a ``runsc pause`` process; decision 0073).  runsc's state file does not see
        that, so a marker beside it does (``frozen``): ``pausing`` until the Sentry has answered, then
        ``paused``.  Every pause must be matched by exactly one ``resume`` (an unmatched one panics the Sentry)."""
        marker = self._marker(container_id)
        _write_marker(marker, "pausing")
        try:
            answered = await self._control(container_id, "containerManager.Pause")
        except SentryUnreachable:
            marker.unlink(missing_ok=True)  # the call never reached it: nothing is paused
            raise
        if not answered:
            marker.unlink(missing_ok=True)  # it said no: nothing is paused
            raise RuntimeFailure("runsc pause failed", "the sandbox's Sentry refused to pause it")
        _write_marker(marker, "paused")

    async def resume(self, container_id: str) -> None:
        """Thaw a sandbox frozen by ``pause`` (or by a ``runsc pause`` command, whose state file says so)."""
        marker = self._marker(container_id)
        if not marker.exists():
            await self._run("resume", container_id)
            return
        _write_marker(marker, "resuming")
        if not await self._control(container_id, "containerManager.Resume"):
            raise RuntimeFailure("runsc resume failed", "the sandbox's Sentry refused to resume it")
        marker.unlink(missing_ok=True)

    def frozen(self, container_id: str) -> str | None:
        """``pausing``/``paused``/``resuming`` while a ``pause`` holds the sandbox (or a daemon died then), or None."""
        try:
            return self._marker(container_id).read_text().strip() or None
        except OSError:
            return None

    def clear_frozen(self, container_id: str) -> None:
        """Drop the marker of a sandbox found running."""
        self._marker(container_id).unlink(missing_ok=True)

    def _marker(self, container_id: str) -> Path:
        return Path(self.state_dir, f"{container_id}.shoal-frozen")

    async def _control(self, container_id: str, method: str) -> bool:
        """One call of the Sentry's urpc control socket (one JSON object each way); whether it succeeded."""
        path = os.path.join(self.state_dir, f"runsc-{container_id}.sock")
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), CONTROL_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            raise SentryUnreachable(f"runsc {method} failed", f"cannot reach the sandbox's Sentry: {exc}") from None
        try:
            writer.write(json.dumps({"method": method, "arg": None}).encode())
            answer, data, decoder = None, b"", json.JSONDecoder()
            async with asyncio.timeout(CONTROL_TIMEOUT):
                while answer is None:
                    chunk = await reader.read(65536)
                    if not chunk:
                        raise RuntimeFailure(f"runsc {method} failed", "the Sentry closed its control socket")
                    data += chunk
                    if len(data) > 1 << 20:
                        raise RuntimeFailure(f"runsc {method} failed", "the Sentry's answer is too long")
                    with contextlib.suppress(ValueError):
                        answer = decoder.raw_decode(data.decode())[0]
        except TimeoutError:
            raise RuntimeFailure(f"runsc {method} failed", "the Sentry did not answer") from None
        finally:
            writer.close()
        return isinstance(answer, dict) and answer.get("success") is True

    async def checkpoint(self, container_id: str, image_dir: str) -> None:
        """``runsc checkpoint --leave-running``: the sandbox's kernel state and memory into ``image_dir`` (the
        files it uses stay on the host; a paused sandbox stays paused)."""
        await self._run("checkpoint", "--leave-running", "--image-path", image_dir, container_id)

    async def restore(self, container_id: str, bundle: str, image_dir: str, ctl_fd: int, log_path: str) -> None:
        """``runsc restore --detach``: a new sandbox from a checkpoint, its processes carrying on; its standard
        input (the agent's control socket, kept by number) is the new ``ctl_fd``."""
        await self._launch("restore", container_id, bundle, ctl_fd, log_path, "--detach", "--image-path", image_dir)

    async def create(self, container_id: str, bundle: str, ctl_fd: int, log_path: str) -> None:
        """``runsc create``: the sandbox boots; the init waits for ``start_created``."""
        await self._launch("create", container_id, bundle, ctl_fd, log_path)

    async def start_created(self, container_id: str) -> None:
        """``runsc start``."""
        network = self._networks.pop(container_id, "sandbox")
        res = await spawn.run(self._argv("start", container_id, network=network, masked=True))
        if res.returncode != 0:
            raise RuntimeFailure(f"runsc start failed (exit {res.returncode})", res.stderr.decode(errors="replace"))

    async def kill(self, container_id: str, signal: str = "KILL") -> None:
        """Signal the container's init; no error if it is gone."""
        await self._run("kill", container_id, signal, check=False)

    async def delete(self, container_id: str) -> None:
        """Remove the container and its sandbox, killing it first; no error if it is gone."""
        self._networks.pop(container_id, None)
        await self._run("delete", "--force", container_id, check=False)
        self.clear_frozen(container_id)

    async def state(self, container_id: str) -> str | None:
        """``created``/``running``/``stopped``/``paused``, or None if unknown."""
        res = await spawn.run(self._argv("state", container_id))
        return parse_state(res.returncode, res.stdout)

    async def list_ids(self) -> list[str]:
        """Ids of every container in this runtime's state directory."""
        return parse_list(await self._run("list", "--format", "json", check=False))


def check_netns(bundle: str) -> bool:
    """Whether the bundle names a network namespace (else the sandbox gets none); refuses one that is the host's
    or the daemon's own, which runsc would strip of its addresses."""
    config = json.loads(Path(bundle, "config.json").read_text())
    paths = [n.get("path") for n in config["linux"]["namespaces"] if n.get("type") == "network"]
    if not paths or not paths[0]:
        return False
    target = os.stat(paths[0])
    for own in ("/proc/self/ns/net", "/proc/1/ns/net"):
        try:
            st = os.stat(own)
        except PermissionError:  # pid 1 may be out of reach (a VM's agent); the daemon's own is the host's
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            raise InvalidError(f"refusing to start a gVisor sandbox in the host's network namespace ({paths[0]})")
    return True


def _write_marker(path: Path, state: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(state)
    os.replace(tmp, path)
