"""The Dockerfile parser, the dockerignore matcher and build-context archives (pure logic, no daemon)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from shoal.exception import InvalidError
from shoal.images import context
from shoal.wire import manifest
from shoal.wire.dockerfile import parse, words
from shoal.wire.ignore import NON_PYTHON_FILES, FilePatternMatcher


def kinds(text: str, **kw) -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for op in parse(text, **kw):
        detail = {
            "from": op.argv,
            "run": op.argv,
            "cmd": op.argv,
            "entrypoint": op.argv,
            "workdir": op.argv,
            "user": op.argv,
            "env": op.env,
            "copy": (op.sources, op.dest, op.chmod, op.chown),
        }[op.kind]
        out.append((op.kind, detail))
    return out


def test_a_full_dockerfile():
    text = r"""# syntax is ignored as a comment
ARG TAG=latest
FROM python:${TAG} AS build
ARG VERSION=1
ENV APP=/app \
    # a comment inside a continuation
    MODE="a b" LEGACY=${VERSION:-x}
ENV OLD style value
WORKDIR $APP/src
RUN pip install -r requirements.txt && \
    echo "$VERSION"
RUN ["python", "-c", "print(1)"]
COPY --chmod=640 --chown=1000:1000 a.txt b/ /dst/
ADD ["with space.txt", "/opt/"]
USER 1000
CMD python app.py
ENTRYPOINT ["tini", "--"]
"""
    assert kinds(text, build_args={"TAG": "3.11"}) == [
        ("from", ["python:3.11"]),
        ("env", {"APP": "/app", "MODE": "a b", "LEGACY": "1"}),
        ("env", {"OLD": "style value"}),
        ("workdir", ["/app/src"]),
        ("run", ["/bin/sh", "-c", 'pip install -r requirements.txt &&     echo "$VERSION"']),
        ("run", ["python", "-c", "print(1)"]),
        ("copy", (["a.txt", "b/"], "/dst/", 0o640, "1000:1000")),
        ("copy", (["with space.txt"], "/opt/", None, None)),
        ("user", ["1000"]),
        ("cmd", ["/bin/sh", "-c", "python app.py"]),
        ("entrypoint", ["tini", "--"]),
    ]
    run = parse(text)[4]
    assert run.env == {"VERSION": "1"}  # ARGs are in the environment of RUN


def test_escape_directive_and_arg_scoping():
    text = "# escape=`\nARG A=global\nFROM im-x\nRUN echo `\n  done\nARG A\nWORKDIR /$A\n"
    ops = parse(text)
    assert ops[1].argv == ["/bin/sh", "-c", "echo   done"]
    assert ops[2].argv == ["/global"]  # an ARG re-declared after FROM takes the global default


def test_word_splitting_and_substitution():
    v = {"A": "x", "EMPTY": ""}
    assert words("""a "b c" 'd $A' $A ${A}y \\$A ${EMPTY:-dflt} ${A:+alt} ${NOPE}z""", v, 1) == [
        "a",
        "b c",
        "d $A",
        "x",
        "xy",
        "$A",
        "dflt",
        "alt",
        "z",
    ]
    with pytest.raises(InvalidError, match="unterminated"):
        words("'open", v, 1)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("FROM a\nEXPOSE 80", "line 2: EXPOSE is not supported"),
        ("FROM a\nLABEL x=y", "LABEL is not supported"),
        ("FROM a\nFROM b", "multi-stage"),
        ("RUN true", "before FROM"),
        ("ENV A=1", "before FROM"),
        ("ARG X=1", "no FROM"),
        ("FROM a\nCOPY --from=b /x /y", "--from is not supported"),
        ("FROM a\nCOPY a b c", "ending in '/'"),
        ("FROM a\nADD http://x/y /z", "ADD of a URL"),
        ("FROM a\nADD local.tar.gz /z", "local archive"),
        ("FROM a\nRUN --network=none true", "RUN --network"),
        ("FROM a\nRUN <<EOF\necho\nEOF", "heredocs"),
        ("FROM a\nCOPY --chown=app /x /y", "numeric"),
        ("FROM a\nENV 1A=b", "invalid environment variable"),
    ],
)
def test_clear_errors(text, message):
    with pytest.raises(InvalidError, match=message):
        parse(text)


def test_dockerfile_commands_refuse_from():
    with pytest.raises(InvalidError, match="FROM is not supported here"):
        parse("FROM x", allow_from=False)
    assert [op.kind for op in parse("RUN true\nENV A=1", allow_from=False)] == ["run", "env"]


def test_dockerignore_matching():
    m = FilePatternMatcher("**/__pycache__", "*.log", "!keep.log", "/build", "docs/*.md", "a?c", "[xy].txt")
    ignored = ["pkg/__pycache__/m.pyc", "__pycache__", "x.log", "build/out/bin", "docs/a.md", "abc", "x.txt"]
    kept = ["keep.log", "sub/x.log", "docs/sub/a.md", "src/a.py", "abbc", "z.txt", "buildx"]
    assert [p for p in ignored if not m(p)] == []
    assert [p for p in kept if m(p)] == []
    assert m(Path("build")) and not m(Path("src"))
    assert not NON_PYTHON_FILES("a/b.py") and NON_PYTHON_FILES("a/b.txt")
    assert m.has_exclusions and not FilePatternMatcher("*.log").has_exclusions


def _tar(*members: tuple[tarfile.TarInfo, bytes]) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    buf.seek(0)
    return buf


def _info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, mode
    return info


def test_context_archives_extract_and_hash(tmp_path):
    archive = _tar(
        (_info("d", tarfile.DIRTYPE, mode=0o750), b""),
        (_info("d/f.sh", mode=0o755), b"#!/bin/sh\n"),
        (_info("l", tarfile.SYMTYPE, "/etc/passwd"), b""),  # kept as written: resolved inside a sandbox only
    )
    dest = tmp_path / "out"
    dest.mkdir()
    context.extract(archive, dest)
    entries = context.tree_manifest(dest)
    assert sorted(e[:3] for e in entries) == [["d", "d", 0o750], ["d/f.sh", "f", 0o755], ["l", "l", "/etc/passwd"]]
    assert manifest.digest(entries) == manifest.digest(list(reversed(entries)))  # order does not matter


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([(_info("../x"), b"x")], "escapes"),
        ([(_info("/abs"), b"x")], "absolute"),
        ([(_info("a/../../x"), b"x")], "escapes"),
        ([(_info("l", tarfile.SYMTYPE, "/etc"), b""), (_info("l/passwd"), b"x")], "non-directory"),
        ([(_info("f"), b"x"), (_info("f/g"), b"x")], "non-directory"),
        ([(_info("f"), b"x"), (_info("h", tarfile.LNKTYPE, "f"), b"")], "not a file"),
        ([(_info("dev", tarfile.CHRTYPE), b"")], "not a file"),
        ([(_info("f"), b"x"), (_info("f"), b"y")], "twice"),
    ],
)
def test_hostile_context_archives_are_refused(tmp_path, members, message):
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(InvalidError, match=message):
        context.extract(_tar(*members), dest)
    assert not (tmp_path / "x").exists()
