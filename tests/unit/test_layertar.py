"""Unpacking registry layers (``shoal.images.layertar``) and parsing image references, without a daemon."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from shoal.images import layertar
from shoal.wire import reference

LOW = 100000
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="unpacking sets owners and whiteouts: needs root")


def tar(*members: tuple[tarfile.TarInfo, bytes | None]) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    buf.seek(0)
    return buf


def m(
    name: str, kind: bytes = tarfile.REGTYPE, data: bytes | None = None, **kw
) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = kw.pop("mode", 0o755 if kind == tarfile.DIRTYPE else 0o644)
    if data is not None:
        info.size = len(data)
    for k, v in kw.items():
        setattr(info, k, v)
    return info, data


def unpack(tmp_path: Path, *members, budget: layertar.Budget | None = None) -> tuple[Path, layertar.Stats]:
    root = tmp_path / "layer"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        stats = layertar.unpack(tar(*members), fd, LOW, 65536, budget or layertar.Budget(1 << 30, 10_000))
    finally:
        os.close(fd)
    return root, stats


def test_whiteouts_become_overlay_whiteouts_and_opaque_directories(tmp_path):
    root, stats = unpack(
        tmp_path,
        m("d", tarfile.DIRTYPE),
        m("d/.wh.gone", data=b""),
        m("o/.wh..wh..opq", data=b""),
        m("o/kept", data=b"k"),
        m(".wh..wh.plnk", data=b""),
    )
    st = os.lstat(root / "d" / "gone")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(root / "o", "trusted.overlay.opaque") == b"y"
    assert (root / "o" / "kept").read_bytes() == b"k"
    assert not (root / ".wh..wh.plnk").exists() and not (root / "d" / ".wh.gone").exists()
    assert (stats.whiteouts, stats.opaque) == (1, 1)


def test_a_packed_layer_unpacks_as_it_was_in_another_uid_range(tmp_path):
    """What one node of a cluster sends another (``layertar.pack``): the same tree, shifted into the taker's range."""
    src, _ = unpack(
        tmp_path,
        m("d", tarfile.DIRTYPE),
        m("d/.wh.gone", data=b""),
        m(".wh.top", data=b""),
        m("o/.wh..wh..opq", data=b""),
        m("o/kept", data=b"k"),
        m("bin/su", data=b"elf", mode=0o4755),
        m("bin/user", data=b"u", uid=1000, gid=1000),
        m("bin/hard", tarfile.LNKTYPE, linkname="bin/su"),
        m("bin/link", tarfile.SYMTYPE, linkname="/etc/passwd"),
        m("pipe", tarfile.FIFOTYPE),
    )
    packed = io.BytesIO()
    assert layertar.pack(str(src), LOW, packed) >= 10
    packed.seek(0)
    other = tmp_path / "other"
    other.mkdir()
    fd = os.open(other, os.O_RDONLY | os.O_DIRECTORY)
    try:
        stats = layertar.unpack(packed, fd, 200000, 65536, layertar.Budget(1 << 30, 10_000))
    finally:
        os.close(fd)
    assert (stats.whiteouts, stats.opaque) == (2, 1)
    for gone in ("d/gone", "top"):
        st = os.lstat(other / gone)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(other / "o", "trusted.overlay.opaque") == b"y"
    su = os.lstat(other / "bin" / "su")
    assert (su.st_uid, stat.S_IMODE(su.st_mode)) == (200000, 0o4755)
    assert os.lstat(other / "bin" / "hard").st_ino == su.st_ino
    assert os.lstat(other / "bin" / "user").st_uid == 201000
    assert os.readlink(other / "bin" / "link") == "/etc/passwd"
    assert stat.S_ISFIFO(os.lstat(other / "pipe").st_mode)
    assert (other / "o" / "kept").read_bytes() == b"k"


def test_owners_are_shifted_and_foreign_owners_lose_set_id_bits(tmp_path):
    root, _ = unpack(
        tmp_path,
        m("root-suid", data=b"x", mode=0o4755, uid=0, gid=0),
        m("user", data=b"x", uid=1000, gid=1000),
        m("alien", data=b"x", mode=0o6755, uid=70000, gid=5),
    )
    st = os.stat(root / "root-suid")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (LOW, LOW, 0o4755)
    assert os.stat(root / "user").st_uid == LOW + 1000
    st = os.stat(root / "alien")
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (LOW + 65534, 0o755)


def test_later_entries_replace_earlier_ones(tmp_path):
    root, _ = unpack(
        tmp_path,
        m("x", data=b"file first"),
        m("x", tarfile.DIRTYPE),
        m("x/inside", data=b"i"),
        m("y", tarfile.DIRTYPE),
        m("y/z", data=b"z"),
        m("y", data=b"now a file"),
        m("x", tarfile.DIRTYPE, mode=0o700),  # a directory again: kept, metadata updated
    )
    assert (root / "x" / "inside").read_bytes() == b"i"
    assert stat.S_IMODE(os.stat(root / "x").st_mode) == 0o700
    assert (root / "y").read_bytes() == b"now a file"


def test_hard_links_within_the_layer(tmp_path):
    root, _ = unpack(tmp_path, m("a", data=b"same"), m("b", tarfile.LNKTYPE, linkname="a"))
    assert os.stat(root / "a").st_ino == os.stat(root / "b").st_ino


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([m("../x", data=b"")], "climbs out"),
        ([m("a/../../x", data=b"")], "climbs out"),
        ([m("l", tarfile.SYMTYPE, linkname="{victim}"), m("l/file", data=b"")], "symlink"),
        ([m("f", data=b""), m("f/below", data=b"")], "not a directory"),
        ([m("h", tarfile.LNKTYPE, linkname="{victim}/file")], "this layer"),
        ([m("d", tarfile.DIRTYPE), m("h", tarfile.LNKTYPE, linkname="d")], "not a file of this layer"),
        ([m("l", tarfile.SYMTYPE, linkname="{victim}"), m("h", tarfile.LNKTYPE, linkname="l/file")], "symlink"),
        ([m("big", data=b"x" * 2000)], "larger than"),
        ([m(".wh..", data=b"")], "names nothing"),
    ],
)
def test_hostile_entries_refuse_the_layer(tmp_path, members, message):
    # Links point at a sacrificial directory, never at the host's own files: if the unpacker ever followed
    # one, this test must fail without damaging the machine it runs on.
    victim = tmp_path / "outside"
    victim.mkdir()
    (victim / "file").write_bytes(b"untouched")
    for info, _ in members:
        info.linkname = info.linkname.replace("{victim}", str(victim))
    with pytest.raises(layertar.LayerError, match=message):
        unpack(tmp_path, *members, budget=layertar.Budget(1000, 100))
    assert sorted(p.name for p in victim.iterdir()) == ["file"]
    assert (victim / "file").read_bytes() == b"untouched" and os.stat(victim / "file").st_nlink == 1


def test_devices_are_dropped_absolute_names_kept_inside(tmp_path):
    root, stats = unpack(
        tmp_path,
        m("null", tarfile.CHRTYPE, devmajor=1, devminor=3),
        m("sda", tarfile.BLKTYPE, devmajor=8, devminor=0),
        m("/abs/name", data=b"in"),
        m("link", tarfile.SYMTYPE, linkname="/etc/shadow"),
    )
    assert not (root / "null").exists() and not (root / "sda").exists()
    assert stats.dropped_count == 2
    assert (root / "abs" / "name").read_bytes() == b"in"
    assert os.readlink(root / "link") == "/etc/shadow"


def test_too_many_entries(tmp_path):
    with pytest.raises(layertar.LayerError, match="too many"):
        unpack(tmp_path, *[m(f"f{i}", data=b"") for i in range(5)], budget=layertar.Budget(1000, 3))


def test_a_truncated_layer(tmp_path):
    data = tar(m("f", data=b"x" * 5000)).getvalue()[:1500]
    root = tmp_path / "layer"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises((layertar.LayerError, OSError)):
            layertar.unpack(io.BytesIO(data), fd, LOW, 65536, layertar.Budget(1 << 20, 100))
    finally:
        os.close(fd)


def test_references():
    r = reference.parse("python:3.11-slim")
    assert (r.host, r.path, r.tag) == ("docker.io", "library/python", "3.11-slim")
    assert r.transport() == "docker://docker.io/library/python:3.11-slim"
    r = reference.parse("127.0.0.1:5000/team/app")
    assert (r.host, r.path, r.tag, r.loopback) == ("127.0.0.1:5000", "team/app", "latest", True)
    d = "sha256:" + "a" * 64
    r = reference.parse(f"ghcr.io/org/app:v1@{d}")
    assert r.transport() == f"docker://ghcr.io/org/app@{d}" and not r.loopback
    assert reference.parse("localhost:5000/x").loopback
    for bad in ("", "-x", "UPPER", "a b", "x@sha256:zz", "http://host/x", "x:" + "t" * 200):
        with pytest.raises(reference.BadReference):
            reference.parse(bad)
