"""The daemon's staged copy of the agent, which every sandbox's ``/.shoal/bin/shoal-agent`` is a hard link to
(decision 0079): a new build replaces it without touching the binary running sandboxes have."""

from __future__ import annotations

import os
from pathlib import Path

from shoal.agent.build import stage_agent


def test_the_same_binary_is_left_alone_and_a_new_one_leaves_linked_copies_as_they_were(tmp_path: Path) -> None:
    built = tmp_path / "data" / "agent" / "shoal-agent"
    built.parent.mkdir(parents=True)
    built.write_bytes(b"agent v1")
    staged = tmp_path / "run" / "agent" / "shoal-agent"
    stage_agent(built, staged)
    assert staged.read_bytes() == b"agent v1" and os.access(staged, os.X_OK)
    assert staged.parent.stat().st_mode & 0o777 == 0o755  # sandboxes' users walk to their links through it
    sandbox_link = tmp_path / "run" / "sb-1-agent"
    os.link(staged, sandbox_link)  # what a sandbox's bundle makes
    inode = staged.stat().st_ino

    stage_agent(built, staged)  # a daemon restart with the same binary
    assert staged.stat().st_ino == inode

    built.write_bytes(b"agent v2")  # a new build
    stage_agent(built, staged)
    assert staged.read_bytes() == b"agent v2" and staged.stat().st_ino != inode
    assert sandbox_link.read_bytes() == b"agent v1"  # the running sandbox keeps the binary it started with
    assert not [p for p in staged.parent.iterdir() if p.name != "shoal-agent"]  # no temporary file left


def test_a_sandboxs_shoal_dir_holds_the_agent_its_control_dir_and_the_mount_points_of_binds_below_it(
    tmp_path: Path,
) -> None:
    from shoal.engine.bundle import _make_shoal_dir
    from shoal.runtime.spec import Bind

    staged = tmp_path / "staged"
    staged.write_bytes(b"agent")
    lib = tmp_path / "libcuda.so.1"
    lib.write_text("lib")
    binds = [
        Bind(str(lib), "/.shoal/nvidia/lib/libcuda.so.1", read_only=True),
        Bind(str(tmp_path), "/.shoal/nvidia/extra", read_only=True),
        Bind(str(lib), "/.shoal/../etc/passwd", read_only=True),  # not below /.shoal: nothing is made for it
        Bind(str(lib), "/data/x", read_only=True),
    ]
    shoal = tmp_path / "run" / "shoal"
    shoal.parent.mkdir()
    _make_shoal_dir(shoal, staged, binds)
    assert (shoal / "bin" / "shoal-agent").stat().st_ino == staged.stat().st_ino  # a link, not a copy
    assert (shoal / "ctl").is_dir()
    assert (shoal / "nvidia" / "lib" / "libcuda.so.1").is_file()
    assert (shoal / "nvidia" / "extra").is_dir()
    for d in (shoal, shoal / "bin", shoal / "ctl", shoal / "nvidia", shoal / "nvidia" / "lib"):
        assert d.stat().st_mode & 0o777 == 0o755, d
    made = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert not [p for p in made if "etc" in p or p.startswith("data")]
    _make_shoal_dir(shoal, staged, binds)  # a second bundle of the same sandbox (a restart of its start)
