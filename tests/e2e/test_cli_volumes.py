"""``shoal volume`` and ``shoal secret``, run as subprocesses against the test daemon."""

from __future__ import annotations

import json
import uuid

import shoal
from tests.e2e.test_cli import shoal_cli


def _ok(daemon, *args: str) -> str:
    r = shoal_cli(daemon, *args)
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout.decode()


def test_volume_commands(daemon, tmp_path):
    name = f"cli-vol-{uuid.uuid4().hex[:8]}"
    assert _ok(daemon, "volume", "create", name).strip() == name
    try:
        r = shoal_cli(daemon, "volume", "create", name)
        assert r.returncode == 1 and b"AlreadyExistsError" in r.stderr
        (tmp_path / "one.txt").write_bytes(b"one\n")
        (tmp_path / "dir" / "sub").mkdir(parents=True)
        (tmp_path / "dir" / "sub" / "two.txt").write_bytes(b"two" * 1000)
        _ok(daemon, "volume", "put", name, str(tmp_path / "one.txt"))
        _ok(daemon, "volume", "put", name, str(tmp_path / "one.txt"), "/renamed.txt")
        _ok(daemon, "volume", "put", name, str(tmp_path / "dir"), "/tree")
        r = shoal_cli(daemon, "volume", "put", name, str(tmp_path / "one.txt"))
        assert r.returncode == 1 and b"FileExistsError" in r.stderr
        _ok(daemon, "volume", "put", "--force", name, str(tmp_path / "one.txt"))
        assert _ok(daemon, "volume", "get", name, "one.txt") == "one\n"
        _ok(daemon, "volume", "get", name, "/tree/sub/two.txt", str(tmp_path))
        assert (tmp_path / "two.txt").read_bytes() == b"two" * 1000
        r = shoal_cli(daemon, "volume", "get", name, "/tree/sub/two.txt", str(tmp_path))
        assert r.returncode == 1 and b"--force" in r.stderr
        r = shoal_cli(daemon, "volume", "get", name, "missing.txt")
        assert r.returncode == 1 and b"FileNotFoundError" in r.stderr
        entries = json.loads(_ok(daemon, "volume", "ls-files", name, "/", "--recursive", "--json"))
        assert sorted(e["path"] for e in entries) == ["one.txt", "renamed.txt", "tree", "tree/sub", "tree/sub/two.txt"]
        assert {e["type"] for e in entries} == {"file", "directory"}
        assert "tree/" in _ok(daemon, "volume", "ls-files", name)
        [item] = [v for v in json.loads(_ok(daemon, "volume", "ls", "--json")) if v["name"] == name]
        assert item["size_bytes"] >= 3000
        assert name in _ok(daemon, "volume", "ls")
    finally:
        _ok(daemon, "volume", "rm", name, "--allow-missing")
    r = shoal_cli(daemon, "volume", "rm", name)
    assert r.returncode == 1 and b"NotFoundError" in r.stderr
    assert name not in _ok(daemon, "volume", "ls")


def test_secret_commands_never_print_values(daemon, app, tmp_path):
    name = f"cli-sec-{uuid.uuid4().hex[:8]}"
    value = uuid.uuid4().hex
    dotenv = tmp_path / "x.env"
    dotenv.write_text(f"FROM_FILE={value}-file\n")
    out = _ok(daemon, "secret", "create", name, f"API_KEY={value}", "--from-dotenv", str(dotenv))
    assert out.strip() == f"{name} (2 keys)"
    try:
        r = shoal_cli(daemon, "secret", "create", name, f"API_KEY={value}")
        assert r.returncode == 1 and b"AlreadyExistsError" in r.stderr and value.encode() not in r.stderr
        r = shoal_cli(daemon, "secret", "create", name, value)  # a value without KEY=
        assert r.returncode == 2 and value.encode() not in r.stderr + r.stdout
        listing = _ok(daemon, "secret", "ls") + _ok(daemon, "secret", "ls", "--json")
        assert name in listing and value not in listing
        sb = shoal.Sandbox.create(app=app, secrets=[shoal.Secret.from_name(name)], timeout=60)
        try:
            assert sb.exec("bash", "-c", 'test "$API_KEY" = "$EXPECT"', env={"EXPECT": value}).wait() == 0
        finally:
            sb.terminate()
        _ok(daemon, "secret", "create", "--force", name, "API_KEY=replaced")
        sb = shoal.Sandbox.create(app=app, secrets=[shoal.Secret.from_name(name)], timeout=60)
        try:
            assert sb.exec("bash", "-c", 'test "$API_KEY" = replaced && test -z "$FROM_FILE"').wait() == 0
        finally:
            sb.terminate()
    finally:
        _ok(daemon, "secret", "rm", name, "--allow-missing")
    assert name not in _ok(daemon, "secret", "ls")
    r = shoal_cli(daemon, "secret", "rm", name)
    assert r.returncode == 1 and b"NotFoundError" in r.stderr
