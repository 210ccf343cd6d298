"""Apps as Modal's ``App`` shows them: tags, ``info()``, the merged logs of their sandboxes, and the billing
statistics shoal does not keep."""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid

import pytest

import shoal
from shoal.exception import InvalidError, NotFoundError, UnimplementedError
from shoal.types import AppState


def test_tags_replace_and_persist(daemon):
    app = shoal.App.lookup(f"tags-{uuid.uuid4().hex[:8]}", create_if_missing=True)
    assert app.get_tags() == {}
    app.set_tags({"team": "ml", "env": "dev"})
    assert app.get_tags() == {"team": "ml", "env": "dev"}
    app.set_tags({"team": "infra"})  # the whole set: 'env' goes
    assert shoal.App.lookup(app.name).get_tags() == {"team": "infra"}
    daemon.restart()
    assert app.get_tags() == {"team": "infra"}
    for bad in ({"has space": "x"}, {"k": "v" * 64}, {"k": ""}):
        with pytest.raises(InvalidError, match="Invalid tag"):
            app.set_tags(bad)
    with pytest.raises(InvalidError, match="mapping"):
        app.set_tags(["team"])  # type: ignore[arg-type]
    assert app.get_tags() == {"team": "infra"}
    with pytest.raises(InvalidError, match="running app"):
        shoal.App("never-run").get_tags()


def test_constructor_tags_and_lifecycle_of_an_ephemeral_app(daemon):
    app = shoal.App("ephemeral-info", tags={"owner": "tests"})
    before = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    with app.run():
        assert app.get_tags() == {"owner": "tests"}
        info = app.info()
        assert info.app_id == app.app_id and info.functions == {} and info.servers == {}
        assert info.lifecycle.state == AppState.EPHEMERAL and info.lifecycle.stopped_at is None
        assert before <= info.lifecycle.created_at <= dt.datetime.now(dt.UTC)
        sb = shoal.Sandbox.create(app=app, timeout=60)
        app.stop()
        sb.wait(raise_on_termination=False)
        assert sb.poll() is not None  # stopping the app ended its sandbox
        stopped = app.info().lifecycle
        assert stopped.state == AppState.STOPPED and stopped.stopped_at is not None
    named = shoal.App.lookup("info-named", create_if_missing=True).info()
    assert named.lifecycle.state == AppState.DEPLOYED and named.description == "info-named"


def test_app_logs_merge_its_sandboxes(app):
    mine = shoal.App.lookup(f"logs-{uuid.uuid4().hex[:8]}", create_if_missing=True)
    since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    # The order in time is from-a, from-b, again-a as long as b's create takes under a second (gVisor's take ~0.3).
    a = shoal.Sandbox.create("sh", "-c", "echo from-a; sleep 1.5; echo again-a >&2", app=mine, timeout=60)
    b = shoal.Sandbox.create("sh", "-c", "sleep 0.5; echo from-b", app=mine, timeout=60)
    other = shoal.Sandbox.create("sh", "-c", "echo not-this-app", app=app, timeout=60)
    for sb in (a, b, other):
        sb.wait()
    lines = [(e.message, e.context_ids, e.source) for e in mine.logs.fetch(since=since) if e.source != "system"]
    assert lines == [
        ("from-a", [a.object_id], "stdout"),
        ("from-b", [b.object_id], "stdout"),
        ("again-a", [a.object_id], "stderr"),
    ]
    entries = list(mine.logs.tail(2, source="stdout"))
    assert [e.message for e in entries] == ["from-a", "from-b"]
    assert all(e.object_id == mine.app_id for e in entries)
    assert [e.message for e in mine.logs.fetch(since=since, search_text="again")] == ["again-a"]
    # Lifecycle events of each sandbox are there too.
    assert {e.context_ids[0] for e in mine.logs.fetch(since=since, source="system")} == {a.object_id, b.object_id}


def test_app_logs_stream_new_lines_until_quiet(app):
    mine = shoal.App.lookup(f"stream-{uuid.uuid4().hex[:8]}", create_if_missing=True)
    got: list[str] = []

    def later() -> None:
        time.sleep(0.5)
        shoal.Sandbox.create("sh", "-c", "echo streamed-1; sleep 0.3; echo streamed-2", app=mine, timeout=60).wait()

    starter = threading.Thread(target=later)
    starter.start()
    t0 = time.monotonic()
    for entry in mine.logs.stream(timeout=3):
        if entry.source != "system":
            got.append(entry.message)
    starter.join()
    assert got == ["streamed-1", "streamed-2"]
    assert time.monotonic() - t0 < 20


def test_billing_statistics_are_not_kept(app):
    with pytest.raises(UnimplementedError, match="no cost or usage accounting"):
        app.stats(since=dt.datetime.now(dt.UTC))
    with pytest.raises(UnimplementedError, match="no cost or usage accounting"):
        app.sandboxes.stats(since=dt.datetime.now(dt.UTC))


def test_unknown_app(daemon):
    ghost = shoal.App("ghost")
    ghost._app_id = "ap-" + "x" * 22
    with pytest.raises(NotFoundError):
        ghost.get_tags()
    with pytest.raises(NotFoundError):
        list(ghost.logs.tail(5))
