"""Secrets: every way to make one, named secrets in the daemon, and proof that values never leak.

Values are checked inside sandboxes through their SHA-256 (``sha256sum``), so
that not even the sandboxes' stored output holds them in the clear; the leak
test then greps everything the daemon wrote for them.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import shoal
from shoal.exception import AlreadyExistsError, InvalidError, NotFoundError


def _name() -> str:
    return f"sec-{uuid.uuid4().hex[:10]}"


def _sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def _env_hashes(sb: shoal.Sandbox, *keys: str, secrets: list[shoal.Secret] | None = None) -> list[str]:
    """The SHA-256 of each variable as a process in ``sb`` sees it ("unset" when it is not set)."""
    script = "; ".join(
        f'if [ -n "${{{k}+x}}" ]; then printf %s "${k}" | sha256sum | cut -d" " -f1; else echo unset; fi' for k in keys
    )
    p = sb.exec("bash", "-c", script, secrets=secrets or [])
    out = p.stdout.read()
    assert p.wait() == 0, p.stderr.read()
    return out.split()


@pytest.fixture
def named(daemon) -> Iterator[str]:
    name = _name()
    yield name
    shoal.Secret.objects.delete(name, allow_missing=True)


def test_from_name_required_keys_and_objects(app, named):
    value = uuid.uuid4().hex
    shoal.Secret.objects.create(named, {"API_KEY": value, "OTHER": "o"})
    with pytest.raises(AlreadyExistsError):
        shoal.Secret.objects.create(named, {"API_KEY": "changed"})
    shoal.Secret.objects.create(named, {"API_KEY": "ignored"}, allow_existing=True)  # kept as it was
    assert named in [s.name for s in shoal.Secret.objects.list()]
    secret = shoal.Secret.from_name(named, required_keys=["API_KEY"])
    assert secret.info().name == named
    assert secret.info(refresh=True).created_at == secret.info().created_at
    assert secret.object_id.startswith("st-")
    sb = shoal.Sandbox.create(app=app, secrets=[secret], timeout=60)
    try:
        assert _env_hashes(sb, "API_KEY", "OTHER") == [_sha(value), _sha("o")]
    finally:
        sb.terminate()
    with pytest.raises(NotFoundError, match="MISSING"):
        shoal.Secret.from_name(named, required_keys=["API_KEY", "MISSING"]).hydrate()
    with pytest.raises(NotFoundError, match="not found"):
        shoal.Sandbox.create(app=app, secrets=[shoal.Secret.from_name(_name())])
    shoal.Secret.objects.delete(named)
    with pytest.raises(NotFoundError):
        shoal.Secret.objects.delete(named)
    shoal.Secret.objects.delete(named, allow_missing=True)
    with pytest.raises(InvalidError, match="invalid secret name"):
        shoal.Secret.objects.create("no spaces allowed", {"A": "b"})
    with pytest.raises(InvalidError, match="environment variable name"):
        shoal.Secret.objects.create(_name(), {"1BAD": "b"})


def test_update_merges_and_new_sandboxes_see_it(app, named):
    shoal.Secret.objects.create(named, {"A": "1", "B": "2"})
    secret = shoal.Secret.from_name(named)
    sb_before = shoal.Sandbox.create(app=app, secrets=[secret], timeout=60)
    try:
        secret.update({"B": "two", "C": "3"})
        sb_after = shoal.Sandbox.create(app=app, secrets=[secret], timeout=60)
        try:
            assert _env_hashes(sb_after, "A", "B", "C") == [_sha("1"), _sha("two"), _sha("3")]
        finally:
            sb_after.terminate()
        # A sandbox keeps the values it was created with.
        assert _env_hashes(sb_before, "A", "B", "C") == [_sha("1"), _sha("2"), "unset"]
    finally:
        sb_before.terminate()
    inline = shoal.Secret.from_dict({"X": "1"})
    inline.update({"Y": "2"})
    assert inline._as_env() == {"X": "1", "Y": "2"}


def test_exec_secrets_named_and_inline(app, named):
    shoal.Secret.objects.create(named, {"FROM_NAME": "named-value"})
    sb = shoal.Sandbox.create(app=app, timeout=60)
    try:
        hashes = _env_hashes(
            sb,
            "FROM_NAME",
            "FROM_DICT",
            secrets=[shoal.Secret.from_name(named), shoal.Secret.from_dict({"FROM_DICT": "d"})],
        )
        assert hashes == [_sha("named-value"), _sha("d")]
        assert _env_hashes(sb, "FROM_NAME") == ["unset"]  # exec secrets are for that exec only
    finally:
        sb.terminate()


def test_from_dotenv_and_from_local_environ(app, tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("# comment\nexport DOT_A=alpha\nDOT_B=\"be ta\"\nDOT_C='x y' \n")
    sub = tmp_path / "nested" / "dir"
    sub.mkdir(parents=True)
    from_dir = shoal.Secret.from_dotenv(sub)  # searched upwards
    monkeypatch.chdir(sub)
    from_cwd = shoal.Secret.from_dotenv()
    (tmp_path / "custom.env").write_text("DOT_A=custom\n")
    custom = shoal.Secret.from_dotenv(tmp_path, filename="custom.env")
    monkeypatch.setenv("LOCAL_ONE", "l1")
    local = shoal.Secret.from_local_environ(["LOCAL_ONE"])
    with pytest.raises(InvalidError, match="NOT_SET_ANYWHERE"):
        shoal.Secret.from_local_environ(["NOT_SET_ANYWHERE"])
    with pytest.raises(InvalidError):
        shoal.Secret.from_dict({"A": 1})  # type: ignore[dict-item]
    sb = shoal.Sandbox.create(app=app, secrets=[from_dir, local], timeout=60)
    try:
        assert _env_hashes(sb, "DOT_A", "DOT_B", "DOT_C", "LOCAL_ONE") == [
            _sha("alpha"),
            _sha("be ta"),
            _sha("x y"),
            _sha("l1"),
        ]
        assert _env_hashes(sb, "DOT_A", secrets=[from_cwd, custom]) == [_sha("custom")]  # later secrets win
    finally:
        sb.terminate()


def test_named_secret_reaches_execs_after_a_daemon_restart(own_daemon):
    app = shoal.App.lookup("secret-restart", create_if_missing=True)
    name = _name()
    shoal.Secret.objects.create(name, {"SURVIVES": "restart-value"})
    sb = shoal.Sandbox.create(
        app=app, secrets=[shoal.Secret.from_name(name), shoal.Secret.from_dict({"INLINE": "i"})], timeout=120
    )
    try:
        own_daemon.restart(signal.SIGKILL)
        assert _env_hashes(sb, "SURVIVES", "INLINE") == [_sha("restart-value"), _sha("i")]
    finally:
        sb.terminate()
    shoal.Secret.objects.delete(name)


# ------------------------------------------------------------------ leaks


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=60)
        self._path = str(path)

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self._path)
        self.sock = s


def _get(d, path: str) -> bytes:
    conn = _UnixHTTP(d.socket)
    try:
        conn.request("GET", path)
        return conn.getresponse().read()
    finally:
        conn.close()


def _files_under(*roots: Path) -> Iterator[Path]:
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            # Never descend into mounted sandbox roots or volumes' content: they are the sandbox's own files.
            dirnames[:] = [n for n in dirnames if not os.path.ismount(os.path.join(dirpath, n))]
            for f in filenames:
                p = Path(dirpath, f)
                # A mounted file is not one the daemon wrote: gVisor sandboxes hold their network
                # namespace as a bind mount (nsfs), which has no content to read.
                if p.is_file() and not p.is_symlink() and not os.path.ismount(p):
                    yield p


def test_secret_values_never_appear_in_the_clear(own_daemon):
    d = own_daemon
    app = shoal.App.lookup("secret-leaks", create_if_missing=True)
    values = {k: f"{k.lower()}-{uuid.uuid4().hex}" for k in ("NAMED", "INLINE", "EXEC_NAMED", "EXEC_INLINE")}
    name, exec_name = _name(), _name()
    shoal.Secret.objects.create(name, {"NAMED": values["NAMED"]})
    shoal.Secret.objects.create(exec_name, {"EXEC_NAMED": values["EXEC_NAMED"]})
    shoal.Secret.from_name(name).update({"NAMED": values["NAMED"]})
    sb = shoal.Sandbox.create(
        app=app,
        secrets=[shoal.Secret.from_name(name), shoal.Secret.from_dict({"INLINE": values["INLINE"]})],
        timeout=120,
    )
    try:
        exec_secrets = [
            shoal.Secret.from_name(exec_name),
            shoal.Secret.from_dict({"EXEC_INLINE": values["EXEC_INLINE"]}),
        ]
        assert _env_hashes(sb, *values, secrets=exec_secrets) == [_sha(v) for v in values.values()]
        # Errors name keys, never values.
        with pytest.raises(NotFoundError) as err:
            shoal.Secret.from_name(name, required_keys=["ABSENT"]).hydrate()
        assert values["NAMED"] not in str(err.value)
        answers = [
            _get(d, path)
            for path in (
                "/v1/sandboxes",
                "/v1/sandboxes?include_finished=1",
                f"/v1/sandboxes/{sb.object_id}",
                f"/v1/sandboxes/{sb.object_id}/execs",
                "/v1/secrets",
                f"/v1/secrets/{shoal.Secret.from_name(name).hydrate().object_id}",
                "/v1/status",
                "/openapi.json",
            )
        ]
        # The CLI's listing too.
        cli = subprocess.run(
            [sys.executable, "-m", "shoal", "secret", "ls", "--json"],
            capture_output=True,
            env={**os.environ, "SHOAL_NO_AUTOSTART": "1"},
        )
        assert cli.returncode == 0, cli.stderr
        assert name.encode() in cli.stdout
        answers += [cli.stdout, cli.stderr]
        own_daemon.restart(signal.SIGKILL)  # the sealed spec is opened again by the new daemon
        assert _env_hashes(sb, "NAMED", "INLINE") == [_sha(values["NAMED"]), _sha(values["INLINE"])]
        files = [*_files_under(d.data_dir, d.runtime_dir), d.log]
        assert any(p.name == "state.db" for p in files)
        forms = [v.encode() for v in values.values()] + [base64.b64encode(v.encode()) for v in values.values()]
        for p in files:
            try:
                content = p.read_bytes()
            except FileNotFoundError:
                continue  # a runtime's temporary file (runc writes state.json through one) renamed meanwhile
            for form in forms:
                assert form not in content, f"a secret value is in {p}"
        for answer in answers:
            for form in forms:
                assert form not in answer, f"a secret value is in an API answer: {answer[:200]!r}"
        key = d.data_dir / "secrets.key"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600 and key.stat().st_size == 32
        # The stored create request keeps them sealed; the old clear field is gone.
        conn_spec = json.loads(_get(d, f"/v1/sandboxes/{sb.object_id}"))
        assert "secret_env" not in conn_spec and "sealed_env" not in conn_spec
    finally:
        sb.terminate()
        shoal.Secret.objects.delete(name)
        shoal.Secret.objects.delete(exec_name)


def test_clear_secrets_stored_by_older_versions_are_sealed_at_start(own_daemon):
    import sqlite3

    app = shoal.App.lookup("secret-migration", create_if_missing=True)
    value = f"legacy-{uuid.uuid4().hex}"
    sb = shoal.Sandbox.create(app=app, timeout=120)
    try:
        own_daemon.stop()
        # What a shoal before sealing stored: the secret environment in the clear in the sandbox's spec.
        db = sqlite3.connect(own_daemon.data_dir / "state.db")
        (raw,) = db.execute("SELECT spec FROM sandboxes WHERE id = ?", (sb.object_id,)).fetchone()
        spec = json.loads(raw)
        spec.pop("sealed_env", None)
        spec["secret_env"] = {"LEGACY": value}
        db.execute("UPDATE sandboxes SET spec = ? WHERE id = ?", (json.dumps(spec), sb.object_id))
        db.commit()
        db.close()
        assert value.encode() in (own_daemon.data_dir / "state.db").read_bytes()
        own_daemon.start()
        assert _env_hashes(sb, "LEGACY") == [_sha(value)]
        for p in own_daemon.data_dir.glob("state.db*"):
            assert value.encode() not in p.read_bytes(), p
    finally:
        sb.terminate()
