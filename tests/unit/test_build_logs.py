"""The kept build output of image steps (``image.logs``): bounds, ordering, chains and cleanup."""

from __future__ import annotations

from pathlib import Path

from shoal.images import build_logs
from shoal.store.state import ImageRow, State


def _state(tmp_path: Path) -> State:
    state = State(tmp_path / "state.db")
    build_logs.ensure_schema(state.db)
    return state


def _step(state: State, image_id: str, parent: str) -> None:
    state.add_image(ImageRow(image_id, {"kind": "step", "parent": parent}, {}, 1.0))


def _log(*lines: str) -> build_logs.StepLog:
    log = build_logs.StepLog()
    for i, line in enumerate(lines):
        log.add(i, line)
    return log


def test_a_chain_reads_oldest_step_first_and_counts_layers_from_the_newest(tmp_path):
    state = _state(tmp_path)
    state.add_image(ImageRow("im-base", {"kind": "debian_slim"}, {}, 1.0))
    _step(state, "im-a", "im-base")
    _step(state, "im-b", "im-a")
    build_logs.record(state.db, "im-a", "ka", _log("a1", "a2"))
    build_logs.record(state.db, "im-b", "kb", _log("b1"))
    assert build_logs.step_chain(state, "im-b") == ["im-b", "im-a"]
    assert [ln.message for ln in build_logs.read(state, "im-b")] == ["a1", "a2", "b1"]
    assert [ln.message for ln in build_logs.read(state, "im-b", layers=1)] == ["b1"]
    assert [ln.message for ln in build_logs.read(state, "im-b", tail=2)] == ["a2", "b1"]
    assert build_logs.read(state, "im-base") == []  # a base has no steps


def test_a_rebuilt_step_replaces_its_lines_and_a_no_op_step_adds_to_its_parents(tmp_path):
    state = _state(tmp_path)
    _step(state, "im-a", "im-base")
    build_logs.record(state.db, "im-a", "ka", _log("old"))
    build_logs.record(state.db, "im-a", "ka", _log("new"))
    build_logs.record(state.db, "im-a", "k-noop", _log("noop"))  # changed nothing: same image id
    assert [ln.message for ln in build_logs.read(state, "im-a")] == ["new", "noop"]


def test_lines_are_bounded(tmp_path):
    log = build_logs.StepLog()
    for i in range(build_logs.KEPT_LINES + 5):
        log.add(i, f"line {i}")
    log.add(0, "x" * (build_logs.LINE_CHARS * 3))
    assert len(log.lines) == build_logs.KEPT_LINES
    assert log.lines[0].message == "line 6"  # the last lines are kept
    assert len(log.lines[-1].message) == build_logs.LINE_CHARS


def test_a_looping_chain_ends_and_removed_images_lose_their_lines(tmp_path):
    state = _state(tmp_path)
    _step(state, "im-a", "im-b")
    _step(state, "im-b", "im-a")  # corrupt: a loop
    assert build_logs.step_chain(state, "im-a") == ["im-a", "im-b"]
    build_logs.record(state.db, "im-a", "ka", _log("a"))
    state.delete_image("im-a")
    assert build_logs.forget_dangling(state.db) == 1
    assert state.db.execute("SELECT COUNT(*) FROM image_logs").fetchone()[0] == 0
