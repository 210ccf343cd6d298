"""Per-sandbox bounds on what the daemon spends for a sandbox (issue 11): output spooled to the host's disk."""

from __future__ import annotations

import shoal

QUOTA_MIB = 2


def _stored(daemon, sandbox_id: str) -> int:
    out = daemon.data_dir / "sandboxes" / sandbox_id / "out"
    return sum(p.stat().st_size for p in out.iterdir() if p.is_file())


def test_unread_output_is_bounded_per_sandbox_and_the_loss_is_reported(own_daemon):
    """Attack: print far more than anyone reads, to fill the host's disk through the daemon's spool.
    Defence: a per-sandbox output quota; past it output is discarded, processes go on, sb.logs says so."""
    own_daemon.env["SHOAL_SANDBOX_OUTPUT_MIB"] = str(QUOTA_MIB)
    own_daemon.restart()
    app = shoal.App.lookup("bounds-tests", create_if_missing=True)
    sb = shoal.Sandbox.create(app=app, timeout=120)
    sid = sb.object_id
    # 3 MiB on stdout and 1 MiB on stderr from one process, then 1 MiB from another: 5 MiB offered.
    big = sb.exec("bash", "-c", "head -c 3145728 /dev/zero; head -c 1048576 /dev/zero >&2; echo done >&2")
    assert big.wait() == 0  # never blocked: the process ran to its end
    later = sb.exec("bash", "-c", "head -c 1048576 /dev/zero; exit 7")
    assert later.wait() == 7
    stored = _stored(own_daemon, sid)
    assert stored <= QUOTA_MIB << 20
    assert stored >= (QUOTA_MIB << 20) - (64 << 10)  # the quota is used, not merely refused
    out, err = big.stdout.read(), big.stderr.read()
    assert len(out) + len(err) + len(later.stdout.read()) == stored  # readers get exactly what was kept
    assert out == "\0" * len(out)  # a prefix of what was printed, nothing made up
    # The loss is said where the user looks, once.
    quota_lines = [e.message for e in sb.logs.tail(50) if e.source == "system" and "Output quota" in e.message]
    assert len(quota_lines) == 1 and f"{QUOTA_MIB} MiB" in quota_lines[0]
    # The sandbox itself is unharmed.
    assert sb.exec("echo", "still here").wait() == 0
    sb.terminate()


def test_the_quota_survives_a_daemon_restart(own_daemon):
    """Attack: restart-and-repeat to reset the quota. Defence: what a sandbox already stored counts after a
    restart (the daemon measures its spool when it first needs the quota)."""
    own_daemon.env["SHOAL_SANDBOX_OUTPUT_MIB"] = str(QUOTA_MIB)
    own_daemon.restart()
    app = shoal.App.lookup("bounds-tests", create_if_missing=True)
    sb = shoal.Sandbox.create(app=app, timeout=120)
    assert sb.exec("bash", "-c", "head -c 1572864 /dev/zero").wait() == 0
    own_daemon.restart()
    assert sb.exec("bash", "-c", "head -c 1572864 /dev/zero").wait() == 0
    assert _stored(own_daemon, sb.object_id) <= QUOTA_MIB << 20
    sb.terminate()
