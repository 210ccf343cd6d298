"""The image builder: every builder method, the step cache, failures, races, CA trust and the seed's images.

Build logs are read from the resolve stream itself (``build``), so the tests
assert on what the daemon says it built and what it took from the cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

import shoal
from shoal.exception import ImageBuildError
from shoal.sdk import _image_resolve
from shoal.sdk._sync import run_blocking
from shoal.sdk.transport import default_client
from shoal.wire import manifest
from tests.conftest import DEFAULT_RUNTIME

uploads: list[str] = []
"""Contexts the ``build`` helper uploaded, in order."""


def build(image: shoal.Image) -> tuple[str, list[dict[str, Any]], list[str]]:
    """Resolve ``image`` through the API: (image id, step events, log lines).  Uploads files when asked."""

    async def go() -> tuple[str, list[dict[str, Any]], list[str]]:
        client = default_client()
        steps, trees = await _image_resolve.wire_steps(image._steps)
        body = {**image._ref, "steps": steps}
        for _ in range(5):
            events: list[dict[str, Any]] = []
            logs: list[str] = []
            final: dict[str, Any] = {}
            buf = b""
            async for chunk in client.stream("POST", "/v1/images/resolve", json_body=body):
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line.strip():
                        item = json.loads(line)
                        if "step" in item:
                            events.append(item["step"])
                        elif "log" in item:
                            logs.append(item["log"])
                        else:
                            final = item
            if "missing_contexts" in final:
                for digest in final["missing_contexts"]:
                    await _image_resolve.upload(client, digest, trees[digest])
                    uploads.append(digest)
                continue
            if "error" in final:
                raise AssertionError(f"build failed: {final['error']}")
            return str(final["image_id"]), events, logs
        raise AssertionError("too many upload rounds")

    return run_blocking(go())


def statuses(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(label, final status) of each step, in order."""
    last: dict[int, tuple[str, str]] = {}
    for e in events:
        last[int(e["index"])] = (str(e["label"]), str(e["status"]))
    return [last[i] for i in sorted(last)]


def sh(sb: shoal.Sandbox, script: str) -> tuple[int, str, str]:
    p = sb.exec("sh", "-c", script, timeout=120)
    p.wait()
    return p.returncode, p.stdout.read(), p.stderr.read()


def store_layers(daemon) -> set[str]:
    return {p.name for p in (daemon.data_dir / "images" / "layers").iterdir() if p.is_dir()}


def staging_left(daemon) -> list[str]:
    return [p.name for p in (daemon.data_dir / "images" / "tmp").iterdir()]


@pytest.fixture
def token() -> str:
    """A marker that makes each test's recipes new to the daemon."""
    return uuid.uuid4().hex[:12]


# ---------------------------------------------------------------------------------------------- run_commands & config


def test_run_commands_env_workdir_cmd_entrypoint(app, token):
    image = (
        shoal.Image.debian_slim()
        .env({"GREETING": f"hello-{token}"})
        .workdir("/srv/app")
        .run_commands("echo $GREETING > greeting.txt", "pwd > /where")
        .entrypoint(["/bin/sh", "-c"])
        .cmd(["echo from-cmd; sleep 600"])
    )
    sb = shoal.Sandbox.create(app=app, image=image, timeout=120)
    try:
        assert sh(sb, "cat /srv/app/greeting.txt")[1] == f"hello-{token}\n"
        assert sh(sb, "cat /where")[1] == "/srv/app\n"
        assert sh(sb, "pwd")[1] == "/srv/app\n"  # the image's workdir is the processes' default
        assert sh(sb, "echo $GREETING")[1] == f"hello-{token}\n"
        _, out, _ = sh(sb, "cat /proc/*/cmdline 2>/dev/null | tr '\\0' ' '")
        assert "echo from-cmd; sleep 600" in out  # entrypoint + cmd ran as the sandbox's main process
    finally:
        sb.terminate()


def test_a_second_resolve_builds_nothing(app, token):
    image = shoal.Image.debian_slim().run_commands(f"echo {token} > /a").env({"X": token})
    first_id, first, _ = build(image)
    assert [s for _, s in statuses(first)][-2:] == ["built", "done"]
    second_id, second, logs = build(image)
    assert second_id == first_id
    assert {s for _, s in statuses(second)} == {"cached"}
    assert not logs


def test_changing_a_middle_step_rebuilds_only_from_there(daemon, token):
    def chain(middle: str) -> shoal.Image:
        return (
            shoal.Image.debian_slim()
            .run_commands(f"echo one-{token} > /one")
            .run_commands(f"echo {middle} > /two")
            .run_commands("cat /two > /three")
        )

    build(chain("first"))
    _, events, _ = build(chain("second"))
    got = statuses(events)
    assert [s for _, s in got[-3:]] == ["cached", "built", "built"], got
    assert got[-3][0] == f"RUN echo one-{token} > /one"


def test_build_failure_raises_names_the_step_and_caches_nothing(app, daemon, token):
    image = shoal.Image.debian_slim().run_commands(f"echo ok-{token}", f"echo before-failing-{token}; exit 3")
    layers = store_layers(daemon)
    with pytest.raises(ImageBuildError) as info:
        shoal.Sandbox.create(app=app, image=image)
    msg = str(info.value)
    assert "exited with code 3" in msg
    assert f"before-failing-{token}" in msg  # the tail of the log
    assert "exit 3" in msg  # which command
    assert info.value.image_id and info.value.image_id.startswith("im-")
    assert store_layers(daemon) == layers
    assert staging_left(daemon) == []
    with pytest.raises(ImageBuildError):  # built again: nothing broken was cached
        image.build()
    assert store_layers(daemon) == layers


# ---------------------------------------------------------------------------------------------- packages


def test_pip_install_really_installs(app):
    image = shoal.Image.debian_slim().pip_install("six")
    sb = shoal.Sandbox.create(app=app, image=image, timeout=120)
    try:
        rc, out, err = sh(sb, "python -c 'import six; print(six.__version__)'")
        assert rc == 0, err
        assert out.strip()
    finally:
        sb.terminate()


def test_pip_options_requirements_files_and_uv(app, tmp_path):
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("idna\n")
    uv_reqs = tmp_path / "uv-requirements.txt"
    uv_reqs.write_text("tomli\n")
    image = (
        shoal.Image.debian_slim()
        .pip_install(
            "six",
            index_url="https://pypi.org/simple",
            extra_index_url="https://pypi.org/simple",
            find_links="/nonexistent-links",
            pre=True,
            extra_options="--no-deps --no-compile",
        )
        .pip_install_from_requirements(str(reqs))
        .uv_pip_install("packaging", requirements=[str(uv_reqs)])
    )
    _, events, _ = build(image)
    assert any("--index-url https://pypi.org/simple" in e["label"] and "--no-deps" in e["label"] for e in events)
    sb = shoal.Sandbox.create(app=app, image=image, timeout=120)
    try:
        rc, out, err = sh(sb, "python -c 'import six, idna, tomli, packaging; print(\"ok\")'")
        assert (rc, out) == (0, "ok\n"), err
        assert sh(sb, "python -m pip show uv >/dev/null 2>&1 || echo not-in-site-packages")[1] == (
            "not-in-site-packages\n"
        )
    finally:
        sb.terminate()


def test_apt_install_a_small_package(app):
    image = shoal.Image.debian_slim().apt_install("jq")
    sb = shoal.Sandbox.create(app=app, image=image, timeout=120)
    try:
        rc, out, err = sh(sb, """echo '{"a": 41}' | jq '.a + 1'""")
        assert (rc, out) == (0, "42\n"), err
        assert sh(sb, "ls /var/lib/apt/lists /var/cache/apt/archives | grep -c deb")[1].strip() == "0"
    finally:
        sb.terminate()


def test_run_commands_env_and_secrets_reach_the_commands_but_not_the_store(app, token):
    secret_value = f"s3cret-{token}"
    image = shoal.Image.debian_slim().run_commands(
        "echo $PLAIN $TOKEN > /seen",
        env={"PLAIN": "plain-value"},
        secrets=[shoal.Secret.from_dict({"TOKEN": secret_value})],
    )
    sb = shoal.Sandbox.create(app=app, image=image, timeout=60)
    try:
        assert sh(sb, "cat /seen")[1] == f"plain-value {secret_value}\n"
        assert sh(sb, "echo ${TOKEN:-unset}")[1] == "unset\n"  # build secrets are not the sandbox's
    finally:
        sb.terminate()
    listed = run_blocking(default_client().request("GET", "/v1/images"))
    assert secret_value not in json.dumps(listed)
    # a changed secret value is not a changed step (like Modal: use force_build to rebuild)
    again = shoal.Image.debian_slim().run_commands(
        "echo $PLAIN $TOKEN > /seen",
        env={"PLAIN": "plain-value"},
        secrets=[shoal.Secret.from_dict({"TOKEN": "other"})],
    )
    assert statuses(build(again)[1])[-1][1] == "cached"


def test_force_build_rebuilds_and_the_new_result_is_kept(app, token):
    def image(force: bool) -> shoal.Image:
        return shoal.Image.debian_slim().run_commands(f"echo {token} $(date +%s%N) > /stamp", force_build=force)

    def stamp(img: shoal.Image) -> str:
        sb = shoal.Sandbox.create(app=app, image=img, timeout=60)
        try:
            return sh(sb, "cat /stamp")[1]
        finally:
            sb.terminate()

    first = stamp(image(False))
    _, events, _ = build(image(True))
    assert statuses(events)[-1][1] == "built"
    forced = stamp(image(True))  # built once more
    assert len({first, forced}) == 2
    _, events, _ = build(image(False))
    assert statuses(events)[-1][1] == "cached"
    assert stamp(image(False)) == forced  # the forced build replaced the cached result
    _, events, _ = build(shoal.Image.debian_slim(force_build=True).run_commands(f"echo {token} > /x"))
    assert [s for _, s in statuses(events)] == ["built", "built"]


def test_two_builds_racing_build_once(daemon, token):
    image = shoal.Image.debian_slim().run_commands(f"sleep 2; echo {token} > /raced")
    results: list[tuple[str, list[dict[str, Any]], list[str]]] = []
    errors: list[BaseException] = []

    def go() -> None:
        try:
            results.append(build(image))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len({r[0] for r in results}) == 1
    last = [statuses(r[1])[-1][1] for r in results]
    assert sorted(last) == ["built", "cached"], last
    building = [e for r in results for e in r[1] if e["status"] == "building" and e["label"].endswith("/raced")]
    assert len(building) == 1


# ---------------------------------------------------------------------------------------------- CA trust


def test_sandboxes_and_builds_trust_the_hosts_extra_cas(app):
    certs = sorted(Path("/usr/local/share/ca-certificates").rglob("*.crt"))
    if not certs:
        pytest.skip("this host has no extra CA certificates")
    sb = shoal.Sandbox.create(app=app, timeout=120)  # the seed's snapshot example: pip in a bare sandbox
    try:
        bundle = sh(sb, "cat /etc/ssl/certs/ca-certificates.crt")[1]
        body = certs[0].read_text().strip().splitlines()[1]
        assert body in bundle
        assert sh(sb, "echo $SSL_CERT_FILE")[1] == "/etc/ssl/certs/ca-certificates.crt\n"
        assert sh(sb, f"ls /usr/local/share/ca-certificates/shoal-host/{certs[0].name}")[0] == 0
        rc, out, err = sh(sb, "pip download --no-deps -d /tmp/dl six 2>&1")
        assert rc == 0, out + err
    finally:
        sb.terminate()


@pytest.mark.slow
def test_without_host_cas_pip_fails_behind_the_proxy(own_daemon):
    """The control for the test above: with ``--no-host-cas`` this host's TLS-inspecting proxy is not trusted."""
    if not sorted(Path("/usr/local/share/ca-certificates").rglob("*.crt")):
        pytest.skip("this host has no extra CA certificates")
    own_daemon.restart_with("--no-host-cas")
    app = shoal.App.lookup("no-cas", create_if_missing=True)
    sb = shoal.Sandbox.create(app=app, timeout=120)
    try:
        assert sh(sb, "echo ${SSL_CERT_FILE:-unset}")[1] == "unset\n"
        rc, out, _ = sh(sb, "pip download --no-deps --retries 0 --timeout 20 -d /tmp/dl six 2>&1")
        assert rc != 0
        assert "CERTIFICATE_VERIFY_FAILED" in out or "certificate verify failed" in out, out[-2000:]
    finally:
        sb.terminate()


# ---------------------------------------------------------------------------------------------- store hygiene


@pytest.mark.slow
def test_a_build_interrupted_by_a_daemon_crash_leaves_no_half_layer(own_daemon, token):
    import signal
    import time

    app = shoal.App.lookup("crash", create_if_missing=True)
    image = shoal.Image.debian_slim().run_commands(f"echo {token} > /half; sleep 300")
    outcome: list[BaseException | None] = []

    def build_until_the_crash() -> None:
        try:
            image.build()
            outcome.append(None)
        except BaseException as exc:  # the daemon dies under it
            outcome.append(exc)

    t = threading.Thread(target=build_until_the_crash, daemon=True)
    t.start()
    deadline = time.monotonic() + 60
    building: list[dict[str, Any]] = []
    while not building and time.monotonic() < deadline:
        listed = run_blocking(default_client().request("GET", "/v1/sandboxes", params={"tag": "shoal.image-build=1"}))
        building = listed["sandboxes"]
        time.sleep(0.1)
    assert building, "no build sandbox appeared"
    time.sleep(1.0)  # the step is running
    layers = store_layers(own_daemon)  # the CA layer below the step is done by now
    own_daemon.restart(signal.SIGKILL)
    t.join(30)
    assert outcome and outcome[0] is not None, "the build should have failed with its daemon"
    listed = run_blocking(
        default_client().request("GET", "/v1/sandboxes", params={"tag": "shoal.image-build=1", "include_finished": "1"})
    )
    assert [s["state"] for s in listed["sandboxes"]] == ["finished"]
    assert store_layers(own_daemon) == layers
    assert staging_left(own_daemon) == []
    assert not (own_daemon.data_dir / "sandboxes" / building[0]["sandbox_id"] / "upper").exists()
    del app


# ---------------------------------------------------------------------------------------------- local files


def test_add_local_file_and_dir_with_ignore_patterns(app, tmp_path, token):
    tool = tmp_path / "run.sh"
    tool.write_text(f"#!/bin/sh\necho tool-{token}\n")
    tool.chmod(0o750)
    src = tmp_path / "src"
    (src / "sub" / "__pycache__").mkdir(parents=True)
    (src / "keep.txt").write_text("kept")
    (src / "skip.log").write_text("skipped")
    (src / "sub" / "deep.txt").write_text("deep")
    (src / "sub" / "keep.log").write_text("re-included")
    (src / "sub" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    (src / "link").symlink_to("keep.txt")
    image = (
        shoal.Image.debian_slim()
        .add_local_file(tool, "/opt/tools/")
        .add_local_file(tool, "/usr/local/bin/renamed")
        .add_local_dir(src, "/app", ignore=["*.log", "**/__pycache__", "!sub/keep.log"])
    )
    sb = shoal.Sandbox.create(app=app, image=image, timeout=60)
    try:
        assert sh(sb, "/opt/tools/run.sh")[1] == f"tool-{token}\n"
        assert sh(sb, "renamed")[1] == f"tool-{token}\n"
        assert sh(sb, "stat -c '%a %U' /opt/tools/run.sh")[1] == "750 root\n"
        _, listing, _ = sh(sb, "cd /app && find . | sort")
        assert listing.split() == [".", "./keep.txt", "./link", "./sub", "./sub/deep.txt", "./sub/keep.log"]
        assert sh(sb, "readlink /app/link; cat /app/link")[1] == "keep.txt\nkept"
        assert sh(sb, "stat -c '%a' /opt /usr/local/bin")[1] == "755\n755\n"  # existing dirs untouched
    finally:
        sb.terminate()


def test_local_files_are_uploaded_only_on_a_cache_miss(daemon, tmp_path, token):
    d = tmp_path / "ctx"
    d.mkdir()
    (d / "a.txt").write_text(token)

    def image() -> shoal.Image:
        return shoal.Image.debian_slim().add_local_dir(d, "/data").run_commands("cat /data/a.txt > /copy")

    uploads.clear()
    first, events, _ = build(image())
    assert len(uploads) == 1 and [s for _, s in statuses(events)][-2:] == ["built", "built"]
    again, events, _ = build(image())
    assert again == first and len(uploads) == 1  # nothing sent the second time
    assert {s for _, s in statuses(events)} == {"cached"}
    os.utime(d / "a.txt", (1, 1))  # a new mtime is not new content
    assert build(image())[0] == first and len(uploads) == 1
    (d / "a.txt").chmod(0o600)  # a new mode is
    _, events, _ = build(image())
    assert len(uploads) == 2 and [s for _, s in statuses(events)][-2:] == ["built", "built"]
    (d / "a.txt").write_text(token + "!")  # and so is new content
    changed, events, _ = build(image())
    assert len(uploads) == 3 and changed != first


def test_add_local_python_source(app, tmp_path, monkeypatch, token):
    pkg = tmp_path / f"pkg_{token}"
    (pkg / "inner").mkdir(parents=True)
    (pkg / "__init__.py").write_text(f"VALUE = '{token}'\n")
    (pkg / "inner" / "__init__.py").write_text("from .. import VALUE as V\n")
    (pkg / "notes.txt").write_text("not python")
    (tmp_path / f"mod_{token}.py").write_text("X = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    image = shoal.Image.debian_slim().add_local_python_source(f"pkg_{token}", f"mod_{token}")
    sb = shoal.Sandbox.create(app=app, image=image, timeout=60)
    try:
        assert sh(sb, f"ls /root/pkg_{token}")[1].split() == ["__init__.py", "inner"]  # only Python files
        script = f"import pkg_{token}.inner as i, mod_{token} as m; print(i.V, m.X)"
        rc, out, err = sh(sb, f"cd /tmp && python -c '{script}'")
        assert (rc, out) == (0, f"{token} 42\n"), err
        assert sh(sb, "stat -c '%a' /root")[1] == "700\n"  # the existing /root keeps its mode
    finally:
        sb.terminate()
    with pytest.raises(shoal.exception.InvalidError, match="not found"):
        shoal.Image.debian_slim().add_local_python_source(f"no_such_module_{token}")


def _tar(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def _put_context(digest: str, body: bytes) -> Any:
    return run_blocking(default_client().request("PUT", f"/v1/image-store/contexts/{digest}", data=body))


def test_context_uploads_are_checked(daemon):
    from shoal.exception import InvalidError

    good = tarfile.TarInfo("a.txt")
    body = _tar((good, b"hello"))
    digest = manifest.digest([["a.txt", "f", good.mode & 0o777, 5, hashlib.sha256(b"hello").hexdigest()]])
    with pytest.raises(InvalidError, match="do not match"):
        _put_context("0" * 64, body)  # not its content's name
    assert _put_context(digest, body)["stored"] is True
    escape = tarfile.TarInfo("../escape.txt")
    with pytest.raises(InvalidError, match="escapes"):
        _put_context("1" * 64, _tar((escape, b"x")))
    absolute = tarfile.TarInfo("/etc/evil")
    with pytest.raises(InvalidError, match="absolute"):
        _put_context("2" * 64, _tar((absolute, b"x")))
    link = tarfile.TarInfo("out")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc"
    through = tarfile.TarInfo("out/passwd")
    with pytest.raises(InvalidError, match="non-directory"):
        _put_context("3" * 64, _tar((link, b""), (through, b"owned")))
    hard = tarfile.TarInfo("hard")
    hard.type, hard.linkname = tarfile.LNKTYPE, "a.txt"
    with pytest.raises(InvalidError, match="not a file"):
        _put_context("4" * 64, _tar((good, b"hello"), (hard, b"")))
    assert staging_left(daemon) == []
    assert not Path("/etc/evil").exists()


# ---------------------------------------------------------------------------------------------- Dockerfiles


def test_from_dockerfile(app, tmp_path, token):
    base = shoal.Image.debian_slim().build()
    ctx = tmp_path / "ctx"
    (ctx / "site").mkdir(parents=True)
    (ctx / "site" / "index.html").write_text(f"<p>{token}</p>")
    (ctx / "site" / "secret.key").write_text("never copied")
    (ctx / "entry.sh").write_text('#!/bin/sh\necho entry "$@" > /tmp/entry.out\nexec sleep 600\n')
    (ctx / "notes.txt").write_text("added")
    (ctx / ".dockerignore").write_text("**/*.key\n")
    (ctx / "Dockerfile").write_text(
        f"""\
# a comment
ARG BASE={base.object_id}
FROM ${{BASE}}
ARG GREETING=hello
ENV APP_HOME=/srv/app \\
    MODE="two words"
WORKDIR $APP_HOME
COPY site/ ./www/
COPY --chmod=755 entry.sh /usr/local/bin/entry
ADD notes.txt /opt/
RUN echo "$GREETING-{token} $MODE" > greeting && useradd -m builder
USER builder
RUN id -un > /tmp/who && touch /home/builder/made-by-builder
USER root
ENTRYPOINT ["/usr/local/bin/entry"]
CMD ["from-cmd"]
"""
    )
    image = shoal.Image.from_dockerfile(ctx / "Dockerfile", build_args={"GREETING": "hi"})
    sb = shoal.Sandbox.create(app=app, image=image, timeout=60)
    try:
        assert sh(sb, "pwd; cat greeting")[1] == f"/srv/app\nhi-{token} two words\n"
        assert sh(sb, "ls www; cat www/index.html")[1] == f"index.html\n<p>{token}</p>"
        assert sh(sb, "stat -c %a /usr/local/bin/entry; cat /opt/notes.txt")[1] == "755\nadded"
        assert sh(sb, "cat /tmp/who; stat -c %U /home/builder/made-by-builder")[1] == "builder\nbuilder\n"
        assert sh(sb, "echo $GREETING")[1] == "\n"  # ARGs are build-time only
        assert sh(sb, "sleep 0.2; cat /tmp/entry.out")[1] == "entry from-cmd\n"  # ENTRYPOINT + CMD started it
    finally:
        sb.terminate()


def test_image_user_runs_every_process(app):
    """An image's USER is who the entrypoint, execs and file operations run as (Docker's and Modal's behaviour)."""
    image = shoal.Image.debian_slim().dockerfile_commands(
        "RUN useradd -m -u 1234 worker && groupadd extra && usermod -aG extra worker", "USER worker"
    )
    sb = shoal.Sandbox.create(app=app, image=image, timeout=60)
    try:
        code, out, err = sh(sb, "id -un; id -u; id -Gn; echo $HOME; touch ~/mine && stat -c %U ~/mine")
        assert code == 0, err
        assert out == "worker\n1234\nworker extra\n/home/worker\nworker\n"
        assert sh(sb, "touch /etc/not-allowed")[0] != 0  # really not root
        sb.filesystem.write_text("hi", "/home/worker/via-api")
        assert sh(sb, "stat -c %U /home/worker/via-api")[1] == "worker\n"
        with pytest.raises(shoal.exception.SandboxFilesystemPermissionError):
            sb.filesystem.write_text("x", "/etc/not-allowed-either")
        with pytest.raises(PermissionError):
            sb.open("/etc/shadow").read()
    finally:
        sb.terminate()
    missing = shoal.Image.debian_slim().dockerfile_commands("USER nobody-here")
    sb = shoal.Sandbox.create(app=app, image=missing, timeout=60)
    sb.wait()  # its entrypoint (the image's CMD) cannot start as a user that does not exist
    assert sb.returncode == 126
    assert "cannot switch to user: nobody-here" in sb.stderr.read()


def test_an_exec_stuck_before_it_starts_still_times_out(app):
    """Code in the sandbox swaps the image user's /etc/passwd for a FIFO: a new process, which must look its user
    up before it runs, blocks there; its timeout still ends it, and the sandbox goes on answering."""
    image = shoal.Image.debian_slim().dockerfile_commands(
        "RUN useradd -m -u 1234 worker && chmod 777 /etc", "USER worker"
    )
    trap = "mv /etc/passwd /etc/passwd.real && mkfifo /etc/passwd && echo trapped"
    trap += " && read _ && rm /etc/passwd && mv /etc/passwd.real /etc/passwd && echo freed && sleep 600"
    sb = shoal.Sandbox.create("sh", "-c", trap, app=app, image=image, timeout=120)
    try:
        lines = iter(sb.stdout)
        assert next(lines) == "trapped\n"
        started = time.monotonic()
        p = sb.exec("true", timeout=2)
        assert p.wait() == -1
        assert time.monotonic() - started < 30
        sb.stdin.write("go\n")
        sb.stdin.drain()
        assert next(lines) == "freed\n"
        assert sh(sb, "id -un")[1] == "worker\n"
    finally:
        sb.terminate()


def test_dockerfile_commands_with_context_files(app, tmp_path, token):
    local = tmp_path / "settings.ini"
    local.write_text(f"token={token}\n")
    image = shoal.Image.debian_slim().dockerfile_commands(
        ["ENV CONF=/etc/myapp", "COPY /settings.ini $CONF/"],
        "RUN grep -c token $CONF/settings.ini > /count",
        context_files={"/settings.ini": str(local)},
    )
    sb = shoal.Sandbox.create(app=app, image=image, timeout=60)
    try:
        assert sh(sb, "cat /etc/myapp/settings.ini /count")[1] == f"token={token}\n1\n"
    finally:
        sb.terminate()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("EXPOSE 80", "EXPOSE is not supported"),
        ("FROM debian", "FROM is not supported here"),
        ("COPY --from=build /a /b", "--from is not supported"),
        ("ADD https://example.com/x /x", "ADD of a URL"),
        ("RUN --mount=type=cache,target=/c true", "RUN --mount is not supported"),
    ],
)
def test_unsupported_dockerfile_instructions_are_clear_errors(line, message):
    with pytest.raises(shoal.exception.InvalidError, match=message):
        shoal.Image.debian_slim().dockerfile_commands(line)


# ---------------------------------------------------------------------------------------------- the seed, verbatim


@pytest.mark.slow
def test_seed_custom_images(daemon, capsys):
    import shoal as modal

    app = modal.App.lookup("sandbox-app", create_if_missing=True)

    image = (
        modal.Image.debian_slim()
        .pip_install("pandas", "numpy", "matplotlib")
    )  # fmt: skip

    with modal.enable_output():  # Show build logs
        sb = modal.Sandbox.create(
            image=image,
            app=app,
        )

    try:
        shown = capsys.readouterr().err
        assert "pip install" in shown and ("Successfully installed" in shown or "cached" in shown)
        p = sb.exec("python", "-c", "import pandas, numpy, matplotlib; print(pandas.DataFrame({'a': [1, 2]}).a.sum())")
        assert p.stdout.read() == "3\n"
        assert p.wait() == 0
    finally:
        sb.terminate()


@pytest.mark.slow
def test_seed_llm_code_execution(daemon):
    import shoal as modal

    def execute_llm_code(code: str) -> dict:
        app = modal.App.lookup("code-executor", create_if_missing=True)

        sb = modal.Sandbox.create(
            image=modal.Image.debian_slim().pip_install("numpy", "pandas"),
            timeout=30,
            block_network=True,
            app=app,
        )

        try:
            # Write code to file
            with sb.open("/tmp/code.py", "w") as f:
                f.write(code)

            # Execute
            p = sb.exec("python", "/tmp/code.py", timeout=10)
            p.wait()

            return {
                "stdout": p.stdout.read(),
                "stderr": p.stderr.read(),
                "returncode": p.returncode,
            }
        finally:
            sb.terminate()

    result = execute_llm_code("import numpy as np, pandas as pd\nprint(int(np.arange(4).sum()), len(pd.DataFrame()))")
    assert result == {"stdout": "6 0\n", "stderr": "", "returncode": 0}


@pytest.mark.skipif(
    DEFAULT_RUNTIME == "gvisor",
    reason="it mounts the image into a running sandbox, not built for gVisor yet (decision 0069)",
)
def test_from_scratch_holds_only_what_is_added(app, tmp_path, token):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "f.txt").write_text(token)
    image = shoal.Image.from_scratch().add_local_dir(data, "/data")
    # Mounted into a running sandbox: exactly the added files.
    sb = shoal.Sandbox.create(app=app)
    try:
        sb.mount_image("/mnt/scratch", image)
        p = sb.exec("bash", "-c", "cd /mnt/scratch && find . | sort && cat data/sub/f.txt")
        assert p.stdout.read() == f".\n./data\n./data/sub\n./data/sub/f.txt\n{token}"
    finally:
        sb.terminate()
    # As a sandbox's own root it has no shell, but shoal's agent (and with it the file API) still works.
    bare = shoal.Sandbox.create(app=app, image=image)
    try:
        assert bare.exec("ls", "/").wait() == 127
        assert bare.filesystem.read_text("/data/sub/f.txt") == token
        bare.filesystem.write_text("written", "/new.txt")
        names = {e.path for e in bare.filesystem.list_files("/")}
        assert {"/data", "/new.txt"} <= names and "/bin" not in names and "/usr" not in names
    finally:
        bare.terminate()


def test_pipe_and_imports(app):
    def with_env(image: shoal.Image, name: str, value: str) -> shoal.Image:
        return image.env({name: value})

    image = shoal.Image.debian_slim().pipe(with_env, "PIPED", "yes")
    sb = shoal.Sandbox.create(app=app, image=image)
    try:
        assert sb.exec("printenv", "PIPED").stdout.read() == "yes\n"
    finally:
        sb.terminate()
    with pytest.raises(shoal.exception.InvalidError, match="must return an Image"):
        shoal.Image.debian_slim().pipe(lambda image: None)
    with image.imports():
        import shoal_module_only_in_the_image  # noqa: F401
    with pytest.raises(ZeroDivisionError), image.imports():
        _ = 1 / 0


# ---------------------------------------------------------------------------------------------- image.logs


def test_image_logs_keep_what_each_step_printed(daemon, token):
    image = (
        shoal.Image.debian_slim()
        .run_commands(f"echo one-{token}; echo err-{token} >&2")
        .run_commands(f"for i in 1 2 3; do echo two-{token}-$i; done")
    )
    last = list(image.logs.fetch())  # builds the image first: these are the lines it just printed
    messages = [e.message for e in last]
    assert messages == [f"RUN for i in 1 2 3; do echo two-{token}-$i; done", *(f"two-{token}-{i}" for i in (1, 2, 3))]
    assert {e.object_id for e in last} == {image.object_id}
    assert {e.source for e in last} == {"stdout"}
    assert all(abs(time.time() - e.timestamp.timestamp()) < 600 for e in last)

    everything = [e.message for e in image.logs.fetch(layers=None)]
    assert f"one-{token}" in everything and f"err-{token}" in everything  # stderr too
    assert everything.index(f"one-{token}") < everything.index(f"two-{token}-1")  # oldest step first
    assert [e.message for e in image.logs.fetch(layers=2)] == everything[-7:]
    assert [e.message for e in image.logs.tail(2)] == [f"two-{token}-2", f"two-{token}-3"]

    # the same recipe, resolved again from the cache, shows the lines of the build that made it
    again = shoal.Image.debian_slim().run_commands(f"echo one-{token}; echo err-{token} >&2")
    assert f"one-{token}" in [e.message for e in again.logs.fetch()]
    assert [e.message for e in run_blocking(_aio_tail(shoal.Image.from_id(image.object_id), 1))] == [f"two-{token}-3"]

    with pytest.raises(shoal.exception.InvalidError, match="at least 1"):
        list(image.logs.fetch(layers=0))
    with pytest.raises(shoal.exception.InvalidError, match="at least 1"):
        list(image.logs.tail(0))


async def _aio_tail(image: shoal.Image, entries: int) -> list[Any]:
    return [e async for e in image.logs.tail.aio(entries)]


def test_image_logs_of_a_removed_image_are_gone(daemon, token):
    image = shoal.Image.debian_slim().run_commands(f"echo gone-{token}")
    assert f"gone-{token}" in [e.message for e in image.logs.fetch()]
    image_id = image.object_id
    run_blocking(default_client().request("DELETE", f"/v1/images/{image_id}"))
    with pytest.raises(shoal.exception.NotFoundError, match="no image"):
        list(shoal.Image.from_id(image_id).logs.fetch())
    with pytest.raises(shoal.exception.NotFoundError, match="not an image id"):
        list(shoal.Image.from_id("im-" + "0" * 8).logs.tail())
