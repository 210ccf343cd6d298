"""A Dockerfile parser for ``Image.from_dockerfile`` and ``Image.dockerfile_commands`` (pure: no I/O).

Supported instructions: FROM (one stage), RUN, ENV, WORKDIR, COPY, ADD (of
local files), CMD, ENTRYPOINT, USER and ARG.  Anything else (EXPOSE, LABEL,
VOLUME, HEALTHCHECK, SHELL, ONBUILD, multi-stage builds, ``COPY --from``,
``RUN --mount``, heredocs, ``ADD`` of URLs or archives) is an
:class:`~shoal.exception.InvalidError` naming the line, never silently
ignored.

Syntax follows Docker's: ``# escape=`` directive, line continuations,
comment lines (also inside continuations), JSON (exec) and shell forms,
``ENV k=v ...`` and the legacy ``ENV k v``, quoting, and variable
substitution (``$v``, ``${v}``, ``${v:-default}``, ``${v:+alt}``) in the
instructions Docker expands them in, from ARG values (``build_args``
override their defaults) and earlier ENVs.  ARG values are also in the
environment of later RUNs, as in Docker.  Variables of the base image's own
environment are not known here and expand to nothing.

The result is a list of :class:`Op`: the SDK turns COPY/ADD sources into
local files (:mod:`shoal.sdk._image_build`) and everything else into build
steps.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from shoal.exception import InvalidError

SUPPORTED = ("FROM", "RUN", "ENV", "WORKDIR", "COPY", "ADD", "CMD", "ENTRYPOINT", "USER", "ARG")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst")
NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass
class Op:
    """One instruction, interpreted."""

    kind: str
    """``from`` | ``run`` | ``env`` | ``workdir`` | ``copy`` | ``cmd`` | ``entrypoint`` | ``user``."""
    line: int
    argv: list[str] = field(default_factory=list)
    """run/cmd/entrypoint: the command; from: ``[image]``; workdir/user: ``[value]``."""
    env: dict[str, str] = field(default_factory=dict)
    """env: the variables set; run: the ARG values in scope."""
    sources: list[str] = field(default_factory=list)
    """copy: paths in the build context (wildcards allowed)."""
    dest: str = ""
    chmod: int | None = None
    chown: str | None = None


@dataclass
class _Line:
    number: int
    text: str


def _error(line: int, message: str) -> InvalidError:
    return InvalidError(f"Dockerfile line {line}: {message}")


def _logical_lines(text: str) -> list[_Line]:
    """Join continuations, drop comments and blank lines; honours a leading ``# escape=`` directive."""
    escape = "\\"
    lines = text.splitlines()
    start = 0
    for i, raw in enumerate(lines):
        m = re.match(r"\s*#\s*([A-Za-z]+)\s*=\s*(\S+)\s*$", raw)
        if not m:
            break
        if m.group(1).lower() == "escape":
            if m.group(2) not in ("\\", "`"):
                raise _error(i + 1, f"invalid escape character {m.group(2)!r}")
            escape = m.group(2)
        start = i + 1
    out: list[_Line] = []
    pending: list[str] | None = None
    first = 0
    for i in range(start, len(lines)):
        raw = lines[i]
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # blank and comment lines, also inside a continuation (as Docker does)
        if pending is None:
            pending, first = [], i + 1
        body = raw.rstrip()
        if body.endswith(escape):
            pending.append(body[: -len(escape)])
            continue
        pending.append(body)
        out.append(_Line(first, "".join(pending).strip()))
        pending = None
    if pending:
        out.append(_Line(first, "".join(pending).strip()))
    return out


def _json_array(text: str) -> list[str] | None:
    text = text.strip()
    if not text.startswith("["):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return None
    return value


def _split_flags(rest: str) -> tuple[dict[str, str], str]:
    flags: dict[str, str] = {}
    while True:
        m = re.match(r"\s*--([A-Za-z][A-Za-z0-9-]*)(?:=(\S*))?(?=\s|$)", rest)
        if not m:
            return flags, rest.strip()
        flags[m.group(1).lower()] = m.group(2) if m.group(2) is not None else "true"
        rest = rest[m.end() :]


def expand(word: str, variables: dict[str, str], line: int) -> str:
    """Variable substitution in one word (quotes are kept for :func:`words` to remove)."""
    return "".join(_process(word, variables, line, split=False)[0])


def words(text: str, variables: dict[str, str], line: int) -> list[str]:
    """Split ``text`` into words as Docker does: quotes group and are removed, ``\\`` escapes, ``$`` expands
    (not inside single quotes)."""
    return _process(text, variables, line, split=True)


def _process(text: str, variables: dict[str, str], line: int, split: bool) -> list[str]:
    out: list[str] = []
    cur: list[str] = []
    has_word = False
    i, n = 0, len(text)
    quote = ""
    while i < n:
        c = text[i]
        if quote == "'":
            if c == "'":
                quote = ""
            else:
                cur.append(c)
            i += 1
            continue
        if c == "\\" and i + 1 < n:
            if quote == '"' and text[i + 1] not in '"\\$':
                cur.append(c)
            cur.append(text[i + 1])
            has_word = True
            i += 2
            continue
        if c == "$":
            value, i = _variable(text, i, variables, line)
            cur.append(value)
            has_word = True
            continue
        if quote == '"':
            if c == '"':
                quote = ""
            else:
                cur.append(c)
            i += 1
            continue
        if c in "'\"" and split:
            quote = c
            has_word = True
            i += 1
            continue
        if c.isspace() and split:
            if has_word or cur:
                out.append("".join(cur))
            cur, has_word = [], False
            i += 1
            continue
        cur.append(c)
        has_word = True
        i += 1
    if quote:
        raise _error(line, "unterminated quote")
    if has_word or cur:
        out.append("".join(cur))
    return out


def _variable(text: str, i: int, variables: dict[str, str], line: int) -> tuple[str, int]:
    """Expand the ``$`` reference at ``text[i]``; returns (value, index after it)."""
    if i + 1 < len(text) and text[i + 1] == "{":
        end = text.find("}", i + 2)
        if end < 0:
            raise _error(line, "missing '}' in variable reference")
        body = text[i + 2 : end]
        m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?::([-+])(.*))?", body, re.DOTALL)
        if not m:
            raise _error(line, f"bad variable reference ${{{body}}}")
        name, op, word = m.group(1), m.group(2), m.group(3)
        value = variables.get(name, "")
        if op == "-":
            value = value or expand(word, variables, line)
        elif op == "+":
            value = expand(word, variables, line) if value else ""
        return value, end + 1
    m = NAME_RE.match(text, i + 1)
    if not m:
        return "$", i + 1
    return variables.get(m.group(0), ""), m.end()


def parse(text: str, build_args: dict[str, str] | None = None, *, allow_from: bool = True) -> list[Op]:
    """The instructions of a Dockerfile (or of ``dockerfile_commands`` when ``allow_from`` is False)."""
    build_args = dict(build_args or {})
    global_args: dict[str, str] = {}
    args: dict[str, str] = {}
    env: dict[str, str] = {}
    ops: list[Op] = []
    seen_from = not allow_from
    for ln in _logical_lines(text):
        m = re.match(r"([A-Za-z]+)(\s+|$)(.*)", ln.text, re.DOTALL)
        if not m:
            raise _error(ln.number, f"cannot parse {ln.text[:80]!r}")
        instr, rest = m.group(1).upper(), m.group(3)
        if instr not in SUPPORTED:
            raise _error(
                ln.number,
                f"{instr} is not supported by shoal's image builder (supported: {', '.join(SUPPORTED)})",
            )
        if re.search(r"<<-?\s*['\"]?[A-Za-z_]", rest) and instr in ("RUN", "COPY", "ADD"):
            raise _error(ln.number, "heredocs are not supported")
        variables = {**args, **env}
        if instr == "ARG":
            for item in words(rest, variables, ln.number):
                name, eq, default = item.partition("=")
                if not NAME_RE.fullmatch(name):
                    raise _error(ln.number, f"invalid ARG name {name!r}")
                value = build_args.get(name, default if eq else global_args.get(name, ""))
                if not seen_from:
                    global_args[name] = value
                else:
                    args[name] = value
            continue
        if instr == "FROM":
            if seen_from:
                what = "multi-stage builds are" if allow_from else "FROM is"
                raise _error(ln.number, f"{what} not supported here")
            flags, body = _split_flags(rest)
            if flags:
                raise _error(ln.number, f"FROM --{next(iter(flags))} is not supported")
            parts = words(body, global_args, ln.number)
            if len(parts) == 3 and parts[1].lower() == "as":
                parts = parts[:1]
            if len(parts) != 1:
                raise _error(ln.number, "FROM takes one image")
            ops.append(Op("from", ln.number, argv=parts))
            seen_from = True
            continue
        if not seen_from:
            raise _error(ln.number, f"{instr} before FROM")
        ops.append(_instruction(instr, rest, variables, args, env, ln.number))
    if allow_from and not any(op.kind == "from" for op in ops):
        raise InvalidError("the Dockerfile has no FROM line")
    return ops


def _command(rest: str) -> list[str]:
    argv = _json_array(rest)
    return argv if argv is not None else ["/bin/sh", "-c", rest.strip()]


def _instruction(
    instr: str, rest: str, variables: dict[str, str], args: dict[str, str], env: dict[str, str], line: int
) -> Op:
    if instr == "RUN":
        flags, body = _split_flags(rest)
        if flags:
            raise _error(line, f"RUN --{next(iter(flags))} is not supported")
        if not body:
            raise _error(line, "RUN needs a command")
        return Op("run", line, argv=_command(body), env=dict(args))
    if instr in ("CMD", "ENTRYPOINT"):
        return Op(instr.lower(), line, argv=_command(rest) if rest.strip() else [])
    if instr == "ENV":
        items = words(rest, variables, line)
        new: dict[str, str] = {}
        if items and "=" not in items[0]:
            if len(items) < 2:
                raise _error(line, "ENV needs a value")
            key, value = rest.strip().split(None, 1)
            new[key] = " ".join(words(value, variables, line))
        else:
            for item in items:
                key, eq, value = item.partition("=")
                if not eq:
                    raise _error(line, f"ENV expects key=value, got {item!r}")
                new[key] = value
        for key in new:
            if not NAME_RE.fullmatch(key):
                raise _error(line, f"invalid environment variable name {key!r}")
        env.update(new)
        return Op("env", line, env=new)
    if instr in ("WORKDIR", "USER"):
        parts = words(rest, variables, line)
        if len(parts) != 1:
            raise _error(line, f"{instr} takes one value")
        return Op(instr.lower(), line, argv=parts)
    # COPY / ADD
    flags, body = _split_flags(rest)
    for flag in flags:
        if flag not in ("chown", "chmod", "link"):
            raise _error(line, f"{instr} --{flag} is not supported")
    listed = _json_array(body)
    paths = words(body, variables, line) if listed is None else [expand(p, variables, line) for p in listed]
    if len(paths) < 2:
        raise _error(line, f"{instr} needs at least one source and a destination")
    sources, dest = paths[:-1], paths[-1]
    if instr == "ADD":
        for s in sources:
            if re.match(r"[a-z][a-z0-9+.-]*://", s) or s.startswith("git@"):
                raise _error(line, f"ADD of a URL ({s}) is not supported: RUN curl or pip instead")
            if s.lower().endswith(ARCHIVE_SUFFIXES):
                raise _error(
                    line, f"ADD of a local archive ({s}), which Docker unpacks, is not supported: COPY it and RUN tar"
                )
    if len(sources) > 1 and not dest.endswith("/"):
        raise _error(line, f"{instr} with several sources needs a destination ending in '/'")
    chmod = None
    if "chmod" in flags:
        try:
            chmod = int(flags["chmod"], 8)
        except ValueError:
            raise _error(line, f"--chmod must be octal, got {flags['chmod']!r}") from None
        if not 0 <= chmod <= 0o7777:
            raise _error(line, f"--chmod out of range: {flags['chmod']}")
    chown = None
    if "chown" in flags:
        chown = expand(flags["chown"], variables, line)
        if chown in ("root", "root:root", "0", "0:0"):
            chown = None
        elif not re.fullmatch(r"[0-9]+(:[0-9]+)?", chown):
            raise _error(line, f"--chown takes numeric uid[:gid] in shoal, got {chown!r}")
    return Op("copy", line, sources=sources, dest=dest, chmod=chmod, chown=chown)
