"""A local, unprivileged host user against shoal: what the red team did as ``nobody`` (issue 11, findings 1-2).

Each test plays a host user (``setpriv`` to uid/gid 65534, no groups) against the session's daemon and its
sandboxes, and fails if the attack works: reaching into a sandbox's root through the daemon's runtime
directory, running a set-id file a sandbox planted, reading bundles, outputs, the state database or its WAL.
"""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

import shoal

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
SECRET = "sk-shoal-redteam-0f9e8d7c6b5a"


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NOBODY, *argv], capture_output=True, text=True, timeout=30, check=False)


def sh(sb, script: str) -> str:
    p = sb.exec("bash", "-c", script)
    out = p.stdout.read()
    assert p.wait() == 0, p.stderr.read()
    return out


@pytest.fixture(scope="module")
def planted(app):
    """A sandbox that planted a set-uid, set-gid copy of bash in /tmp and holds a secret in its environment."""
    sb = shoal.Sandbox.create(app=app, timeout=300, env={"OPENAI_API_KEY": SECRET})
    sh(sb, "cp /bin/bash /tmp/sbash && chmod 6755 /tmp/sbash && echo planted > /tmp/note && echo $OPENAI_API_KEY")
    yield sb
    sb.terminate()


def test_the_runtime_dir_is_closed_to_host_users(daemon, planted):
    """Attack: list the daemon's runtime dir for sandbox ids. Defence: it may be searched (each sandbox's root,
    a uid of its own, walks to its run directory) but not listed, and each sandbox's run directory is
    root:<that sandbox's gid> 0710; the data dir is root:<storage gid> 0710."""
    for d in (daemon.runtime_dir, daemon.runtime_dir / "sandboxes", daemon.runtime_dir / "oci"):
        out = as_nobody("ls", str(d))
        assert out.returncode != 0 and "Permission denied" in out.stderr, out
    # Not even a path whose name is known (ids are in the world-readable /proc/mounts) can be walked.
    run = daemon.runtime_dir / "sandboxes" / planted.object_id
    for d in (run / "rootfs", run / "bundle", run / "shoal", daemon.data_dir / "sandboxes" / planted.object_id):
        assert d.is_dir()
        out = as_nobody("stat", str(d))
        assert out.returncode != 0 and "Permission denied" in out.stderr, out
    out = as_nobody("ls", str(run))
    assert out.returncode != 0 and "Permission denied" in out.stderr, out
    # The runtime's own record of the container (its config: env, mounts) is closed too.
    oci = daemon.runtime_dir / "oci"
    states = [*oci.glob(f"runc/{planted.object_id}/state.json"), *oci.glob(f"runsc/{planted.object_id}_*.state")]
    assert states, "no runtime state file found"
    for state in states:
        out = as_nobody("cat", str(state))
        assert out.returncode != 0 and "Permission denied" in out.stderr, out


def test_a_planted_setuid_file_cannot_be_run_from_the_host(daemon, planted):
    """Attack: run the sandbox's set-uid bash through <runtime>/sandboxes/<id>/rootfs to become its uid.
    Defence: the path cannot be walked by other users, and the root is mounted nosuid."""
    sbash = daemon.runtime_dir / "sandboxes" / planted.object_id / "rootfs" / "tmp" / "sbash"
    assert sbash.exists() and sbash.stat().st_mode & stat.S_ISUID  # it is really there, as root sees it
    # Through a shell already running as the user: setpriv itself resolves its program with root's access.
    out = as_nobody("/bin/sh", "-c", f"'{sbash}' -p -c 'id -u'")
    assert out.returncode != 0 and "Permission denied" in out.stderr, out
    assert out.stdout == ""


def test_sandbox_roots_are_nosuid_nodev_where_the_host_sees_them(daemon, planted):
    """Attack: a set-id file or device node in a sandbox's root, used from the host. Defence: the overlay is
    mounted nosuid,nodev in the host's namespace."""
    root = str(daemon.runtime_dir / "sandboxes" / planted.object_id / "rootfs")
    with open("/proc/self/mountinfo") as f:
        lines = [line.split() for line in f if line.split()[4] == root]
    assert lines, f"no mount at {root}"
    options = lines[-1][5].split(",")
    assert "nosuid" in options and "nodev" in options, options


def test_a_sandboxs_files_and_bundle_are_unreadable_to_host_users(daemon, planted):
    """Attack: read a sandbox's files and config.json (env, mounts) by path. Defence: the runtime dir is closed."""
    run = daemon.runtime_dir / "sandboxes" / planted.object_id
    for target in (run / "rootfs" / "tmp" / "note", run / "bundle" / "config.json"):
        assert target.exists()
        out = as_nobody("cat", str(target))
        assert out.returncode != 0 and "Permission denied" in out.stderr, out


def test_state_database_and_wal_are_unreadable_to_host_users(daemon, planted):
    """Attack: grep the state database, its WAL and SHM and the outputs for a key passed with env=.
    Defence: the data dir is root:<sandbox group> 0710 and the daemon's umask is 0077."""
    out = as_nobody("grep", "-r", "-l", SECRET, str(daemon.data_dir))
    assert out.returncode != 0 and SECRET not in out.stdout and "Permission denied" in out.stderr, out
    for name in ("state.db", "state.db-wal", "state.db-shm"):
        path = daemon.data_dir / name
        assert path.exists(), name  # WAL mode: all three exist while the daemon runs
        assert path.stat().st_mode & 0o077 == 0, f"{name}: {oct(path.stat().st_mode)}"
        out = as_nobody("cat", str(path))
        assert out.returncode != 0 and "Permission denied" in out.stderr, name


def test_the_daemons_own_files_are_private(daemon, planted):
    """Attack: read anything the daemon wrote (outputs, logs index, network records) where a parent is left
    open. Defence: umask 0077 — nothing under the data dir that only the daemon uses is group/other-readable."""
    status = Path(f"/proc/{daemon.proc.pid}/status").read_text()
    umask = next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:"))
    assert int(umask, 8) == 0o077
    out_dir = daemon.data_dir / "sandboxes" / planted.object_id / "out"
    files = [p for p in out_dir.iterdir() if p.is_file()]
    assert files
    for p in files:
        assert p.stat().st_mode & 0o077 == 0, f"{p}: {oct(p.stat().st_mode)}"
    st = daemon.data_dir.stat()
    assert st.st_uid == 0 and st.st_mode & 0o007 == 0, f"{daemon.data_dir}: {oct(st.st_mode)}"
    # Sandboxes run as uids of their own (decision 0063): others may search the runtime dir, never list it.
    st = daemon.runtime_dir.stat()
    assert st.st_uid == 0 and st.st_mode & 0o006 == 0, f"{daemon.runtime_dir}: {oct(st.st_mode)}"


def test_sandboxes_still_work_for_non_root_users_inside(planted):
    """Regression guard for the defences above: the resolver files, the agent and a USER's view still work."""
    assert sh(planted, "cat /etc/resolv.conf | head -1").startswith("nameserver")
    user = "setpriv --reuid=65534 --regid=65534 --clear-groups --"
    assert sh(planted, f"{user} sh -c 'cat /etc/hosts /etc/resolv.conf >/dev/null && echo ok'") == "ok\n"
    # The planted set-uid file is inert inside too (no-new-privileges; nosuid).
    assert sh(planted, f"{user} /tmp/sbash -p -c 'id -u'") == "65534\n"
