"""Sandbox lifecycle: timeouts, terminate, idle timeout, lookup, listing, tags, names, apps, validation."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

import shoal
from shoal.exception import (
    AlreadyExistsError,
    ClientClosed,
    ConflictError,
    InvalidError,
    NotFoundError,
    SandboxTerminatedError,
    SandboxTimeoutError,
)


def test_lifetime_timeout_is_124_and_raises(app):
    sb = shoal.Sandbox.create(app=app, timeout=2)
    with pytest.raises(SandboxTimeoutError):
        sb.wait()
    assert sb.returncode == 124
    # raise_on_termination=False does not silence a timeout (Modal's behaviour).
    with pytest.raises(SandboxTimeoutError):
        sb.wait(raise_on_termination=False)


def test_terminate_is_137(app):
    sb = shoal.Sandbox.create(app=app)
    p = sb.exec("sleep", "100")
    assert sb.terminate(wait=True) == 137
    with pytest.raises(SandboxTerminatedError):
        sb.wait()
    sb.wait(raise_on_termination=False)
    assert sb.poll() == 137
    # Processes of a terminated sandbox end as killed.
    assert p.wait() == 137
    # Terminating twice is harmless.
    sb.terminate()


def test_entrypoint_exit_code_is_the_sandbox_returncode(app):
    sb = shoal.Sandbox.create("bash", "-c", "exit 7", app=app)
    sb.wait()
    assert sb.returncode == 7
    sb = shoal.Sandbox.create("bash", "-c", "kill -TERM $$", app=app)
    sb.wait()
    assert sb.returncode == 128 + 15


def test_entrypoint_exit_ends_other_processes(app):
    sb = shoal.Sandbox.create("sleep", "1", app=app)
    p = sb.exec("sleep", "100")
    sb.wait()
    assert sb.returncode == 0
    assert p.wait() == 137


def test_entrypoint_stdin(app):
    sb = shoal.Sandbox.create("bash", "-c", "read x; echo got $x", app=app)
    sb.stdin.write("hello\n")
    sb.stdin.drain()
    assert sb.stdout.read() == "got hello\n"
    sb.wait()
    assert sb.returncode == 0


def test_a_handle_from_from_id_writes_stdin_after_the_creators(app):
    # Another handle to the same sandbox carries on the stream where the first one left it (bytes of the same
    # length at offset 0 would look like a retry of what the creator sent).
    sb = shoal.Sandbox.create("bash", "-c", "while read x; do echo got $x; done", app=app, timeout=60)
    try:
        sb.stdin.write("1\n")
        sb.stdin.drain()
        other = shoal.Sandbox.from_id(sb.object_id)
        other.stdin.write("2\n")
        other.stdin.drain()
        other.stdin.write("3\n")
        other.stdin.write_eof()
        other.stdin.drain()
        assert sb.stdout.read() == "got 1\ngot 2\ngot 3\n"
        assert sb.wait() is None and sb.returncode == 0
    finally:
        sb.terminate()


def test_idle_timeout_ends_an_idle_sandbox(app):
    sb = shoal.Sandbox.create(app=app, idle_timeout=2, timeout=60)
    started = time.monotonic()
    with pytest.raises(SandboxTimeoutError):
        sb.wait()
    assert sb.returncode == 124
    assert time.monotonic() - started < 30


def test_running_exec_keeps_an_idle_sandbox_alive(app):
    sb = shoal.Sandbox.create(app=app, idle_timeout=1, timeout=60)
    try:
        p = sb.exec("sleep", "3")
        assert p.wait() == 0  # the sandbox outlived its idle timeout while the exec ran
        assert sb.poll() is None or sb.returncode == 124
    finally:
        sb.terminate()


def test_stdin_activity_keeps_an_idle_sandbox_alive(app):
    sb = shoal.Sandbox.create("cat", app=app, idle_timeout=2, timeout=60)
    try:
        for _ in range(4):
            sb.stdin.write("tick\n")
            sb.stdin.drain()
            time.sleep(1)
        assert sb.poll() is None
    finally:
        sb.terminate()


def test_poll_and_returncode_while_running(sandbox):
    assert sandbox.poll() is None
    assert sandbox.returncode is None


def test_from_id(sandbox):
    again = shoal.Sandbox.from_id(sandbox.object_id)
    assert again.object_id == sandbox.object_id
    assert again.exec("echo", "hi").stdout.read() == "hi\n"
    sandbox.terminate()
    assert shoal.Sandbox.from_id(sandbox.object_id).returncode == 137
    with pytest.raises(NotFoundError):
        shoal.Sandbox.from_id("sb-" + "0" * 22)
    with pytest.raises(NotFoundError):
        shoal.Sandbox.from_id("../etc/passwd")


def test_names_are_unique_among_running_sandboxes(daemon):
    app = shoal.App.lookup("named-app", create_if_missing=True)
    name = f"sb-{uuid.uuid4().hex[:8]}"
    sb = shoal.Sandbox.create(app=app, name=name)
    try:
        with pytest.raises(AlreadyExistsError):
            shoal.Sandbox.create(app=app, name=name)
        found = shoal.Sandbox.from_name("named-app", name)
        assert found.object_id == sb.object_id
    finally:
        sb.terminate()
    with pytest.raises(NotFoundError):
        shoal.Sandbox.from_name("named-app", name)
    # Once the first one finished, the name is free again.
    sb2 = shoal.Sandbox.create(app=app, name=name)
    sb2.terminate()
    with pytest.raises(InvalidError, match="name"):
        shoal.Sandbox.create(app=app, name="bad name!")


def test_a_running_sandbox_is_named_once_after_create(daemon):
    app = shoal.App.lookup("named-app", create_if_missing=True)
    name = f"later-{uuid.uuid4().hex[:8]}"
    sb = shoal.Sandbox.create(app=app)
    other = shoal.Sandbox.create(app=app)
    try:
        with pytest.raises(NotFoundError):
            shoal.Sandbox.from_name("named-app", name)
        sb._experimental_set_name(name)
        sb._experimental_set_name(name)  # the same name again: a retry that succeeds
        assert shoal.Sandbox.from_name("named-app", name).object_id == sb.object_id
        with pytest.raises(ConflictError, match="already named"):
            sb._experimental_set_name(name + "-2")
        with pytest.raises(AlreadyExistsError):
            other._experimental_set_name(name)
        with pytest.raises(InvalidError, match="name"):
            other._experimental_set_name("bad name!")
    finally:
        sb.terminate()
        other.terminate()
    with pytest.raises(ConflictError, match="finished"):
        other._experimental_set_name("too-late")


def test_list_by_app_and_tags(daemon):
    app = shoal.App.lookup(f"list-app-{uuid.uuid4().hex[:6]}", create_if_missing=True)
    a = shoal.Sandbox.create(app=app, tags={"team": "x", "kind": "a"})
    b = shoal.Sandbox.create(app=app, tags={"team": "x", "kind": "b"})
    try:
        ids = [s.object_id for s in shoal.Sandbox.list(app_id=app.app_id)]
        assert ids == [b.object_id, a.object_id]  # newest first
        assert [s.object_id for s in shoal.Sandbox.list(app_id=app.app_id, tags={"kind": "a"})] == [a.object_id]
        assert all(s.returncode is None for s in shoal.Sandbox.list(app_id=app.app_id))
        a.terminate()
        assert [s.object_id for s in shoal.Sandbox.list(app_id=app.app_id)] == [b.object_id]

        async def alist() -> list[str]:
            return [s.object_id async for s in shoal.Sandbox.list.aio(app_id=app.app_id)]

        assert asyncio.run(alist()) == [b.object_id]
    finally:
        a.terminate()
        b.terminate()


def test_tags_replace(sandbox):
    assert sandbox.get_tags() == {}
    sandbox.set_tags({"a": "1", "b": "2"})
    assert sandbox.get_tags() == {"a": "1", "b": "2"}
    sandbox.set_tags({"c": "3"})
    assert sandbox.get_tags() == {"c": "3"}
    sandbox.set_tags({})
    assert sandbox.get_tags() == {}
    with pytest.raises(InvalidError):
        sandbox.set_tags({"a": 1})  # type: ignore[dict-item]


def test_app_lookup_requires_create_if_missing(daemon):
    with pytest.raises(NotFoundError, match="create_if_missing"):
        shoal.App.lookup(f"missing-{uuid.uuid4().hex[:8]}")
    a = shoal.App.lookup("same-app", create_if_missing=True)
    b = shoal.App.lookup("same-app")
    assert a.app_id == b.app_id and a.app_id.startswith("ap-")


def test_ephemeral_app_run_stops_its_sandboxes(daemon):
    app = shoal.App("ephemeral")
    with app.run():
        sb = shoal.Sandbox.create(app=app)
        assert sb.exec("true").wait() == 0
    assert sb.poll() == 137


def test_create_needs_an_initialized_app(daemon):
    with pytest.raises(InvalidError, match="App"):
        shoal.Sandbox.create()
    with pytest.raises(ValueError, match="initialized"):
        shoal.Sandbox.create(app=shoal.App("never-run"))


def test_create_validation_errors(app):
    with pytest.raises(InvalidError, match="absolute"):
        shoal.Sandbox.create(app=app, workdir="relative/path")
    with pytest.raises(InvalidError, match="strings"):
        shoal.Sandbox.create("echo", 1, app=app)  # type: ignore[arg-type]
    with pytest.raises(InvalidError, match="timeout"):
        shoal.Sandbox.create(app=app, timeout=0)
    with pytest.raises(InvalidError, match="timeout"):
        shoal.Sandbox.create(app=app, timeout=1.5)  # type: ignore[arg-type]
    with pytest.raises(InvalidError, match="open ports"):
        shoal.Sandbox.create(app=app, block_network=True, encrypted_ports=[8080])
    with pytest.raises(InvalidError, match="limit"):
        shoal.Sandbox.create(app=app, cpu=(2.0, 1.0))
    with pytest.raises(InvalidError, match="gpu"):
        shoal.Sandbox.create(app=app, gpu="A100")
    with pytest.raises(InvalidError, match="volumes"):
        shoal.Sandbox.create(app=app, volumes={"/data": object()})
    with pytest.raises(InvalidError, match="environment variable name"):
        shoal.Sandbox.create(app=app, env={"1BAD": "x"})


def test_unknown_python_version_names_the_available_ones(app):
    with pytest.raises(InvalidError, match=r"3\.11"):
        shoal.Sandbox.create(app=app, image=shoal.Image.debian_slim(python_version="3.99"))
    with pytest.raises(TypeError):
        shoal.Image.debian_slim(python_version=3.11)  # type: ignore[arg-type]
    sb = shoal.Sandbox.create(app=app, image=shoal.Image.debian_slim(python_version="3.11"))
    try:
        assert sb.exec("python", "--version").stdout.read().startswith("Python 3.11")
    finally:
        sb.terminate()


def test_cpu_and_memory_limits_are_applied(app, daemon):
    sb = shoal.Sandbox.create(app=app, cpu=0.5, memory=300)
    try:
        cg = f"/sys/fs/cgroup/memory{daemon.cgroup_parent}/{sb.object_id}/memory.limit_in_bytes"
        with open(cg) as f:
            assert int(f.read()) == 300 << 20
        cpu = f"/sys/fs/cgroup/cpu{daemon.cgroup_parent}/{sb.object_id}/cpu.shares"
        with open(cpu) as f:
            assert int(f.read()) == 512
    finally:
        sb.terminate()
    sb = shoal.Sandbox.create(app=app, cpu=(0.25, 1.5))
    try:
        quota = f"/sys/fs/cgroup/cpu{daemon.cgroup_parent}/{sb.object_id}/cpu.cfs_quota_us"
        with open(quota) as f:
            assert int(f.read()) == 150000
    finally:
        sb.terminate()


def test_detach(sandbox):
    sandbox.detach()
    with pytest.raises(ClientClosed):
        sandbox.exec("true")
    assert sandbox.poll() is None
    sandbox.terminate()
    assert sandbox.poll() == 137


def test_fifty_sandboxes_created_concurrently(app):
    async def run() -> list[str]:
        async def one(i: int) -> str:
            sb = await shoal.Sandbox.create.aio(app=app, timeout=120)
            try:
                p = await sb.exec.aio("bash", "-c", f"echo {i}")
                return await p.stdout.read.aio()
            finally:
                await sb.terminate.aio()

        return await asyncio.gather(*(one(i) for i in range(50)))

    assert asyncio.run(run()) == [f"{i}\n" for i in range(50)]


def test_blocking_call_inside_event_loop_warns(sandbox):
    async def run() -> None:
        with pytest.warns(shoal.exception.AsyncUsageWarning, match=".aio"):
            sandbox.poll()

    asyncio.run(run())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"cloud": "aws"},
        {"region": "us-east-1"},
        {"network_file_systems": {"/nfs": object()}},
        {"custom_domain": "example.com"},
        {"proxy": object()},
        {"include_oidc_identity_token": True},
        {"experimental_options": {"enable_docker": True}},  # ignoring one could fail open
        {"runtime": "vm"},
    ],
    ids=lambda kw: next(iter(kw)),
)
def test_create_keywords_not_implemented_are_clear_errors(app, kwargs):
    name = next(iter(kwargs))
    with pytest.raises(shoal.exception.InvalidError, match=f"{name}=.*not supported"):
        shoal.Sandbox.create(app=app, **kwargs)


def test_node_labels_a_lone_daemon_lacks_are_refused(app):
    # Outside a cluster the one daemon is the only node: labels it does not have cannot be met.
    with pytest.raises(shoal.exception.InvalidError, match="lacks the labels"):
        shoal.Sandbox.create(app=app, experimental_options={"node_labels": "zone=eu"})


def test_an_unknown_runtime_is_invalid(app):
    with pytest.raises(shoal.exception.InvalidError, match="'gvisor', 'vm', 'runc' or None"):
        shoal.Sandbox.create(app=app, runtime="kata")


def test_from_name_include_terminated_finds_the_latest_ended_one(app):
    name = f"ended-{uuid.uuid4().hex[:8]}"
    first = shoal.Sandbox.create(app=app, name=name)
    first.terminate()
    second = shoal.Sandbox.create("sh", "-c", "exit 7", app=app, name=name)
    second.wait()
    assert second.returncode == 7
    with pytest.raises(NotFoundError):
        shoal.Sandbox.from_name(app.name, name)  # none runs
    found = shoal.Sandbox.from_name(app.name, name, include_terminated=True)
    assert found.object_id == second.object_id
    assert found.poll() == 7
    again = shoal.Sandbox.create(app=app, name=name)
    try:
        assert shoal.Sandbox.from_name(app.name, name, include_terminated=True).object_id == again.object_id
    finally:
        again.terminate()


def test_app_stop_terminates_its_sandboxes_and_the_app_stays_usable():
    app = shoal.App.lookup(f"stop-{uuid.uuid4().hex[:8]}", create_if_missing=True)
    made = [shoal.Sandbox.create(app=app) for _ in range(2)]
    app.stop()
    for sb in made:
        sb.wait(raise_on_termination=False)
        assert sb.returncode is not None
    sb = shoal.Sandbox.create(app=app)
    try:
        assert sb.exec("echo", "ok").stdout.read() == "ok\n"
    finally:
        sb.terminate()
    with pytest.raises(shoal.exception.InvalidError, match="not running"):
        shoal.App("never-looked-up").stop()


def test_get_task_id_names_the_sandbox(sandbox):
    """Agent libraries written for Modal call the private ``_get_task_id``; here the sandbox is its own task."""
    assert sandbox._get_task_id() == sandbox.object_id

    async def run() -> str:
        return await sandbox._get_task_id.aio()

    assert asyncio.run(run()) == sandbox.object_id


def test_hydrate_checks_the_sandbox_and_builds_the_image(app):
    sb = shoal.Sandbox.create(app=app)
    try:
        assert shoal.Sandbox.from_id(sb.object_id).hydrate().object_id == sb.object_id
        again = shoal.Sandbox.from_id(sb.object_id, client=sb.client)  # Modal code passes .client along
        assert again.exec("echo", "ok").stdout.read() == "ok\n"
    finally:
        sb.terminate()
    with pytest.raises(NotFoundError):
        shoal.Sandbox.from_id("sb-" + "A" * 22).hydrate()
    image = shoal.Image.debian_slim().run_commands("echo hydrated > /hydrated")
    assert image.hydrate() is image and image.object_id.startswith("im-")
