"""``.dockerignore``-style patterns: which local files ``add_local_dir`` and COPY leave out.

Semantics of Docker's pattern matcher (and of Modal's ``FilePatternMatcher``):
patterns are matched against the path relative to the directory being added,
with ``/`` separators; ``*`` matches within one path component, ``?`` one
character, ``**`` any number of components, ``[...]`` a character class and
``\\`` escapes.  A pattern that matches a directory also matches everything
below it.  A leading ``!`` re-includes what an earlier pattern excluded; the
last matching pattern decides.  A leading ``/`` is ignored, and each pattern
is normalised (``./a//b`` is ``a/b``).

Examples:
    FilePatternMatcher("**/__pycache__", "*.log", "!keep.log")
    ~FilePatternMatcher("**/*.py")        # everything that is *not* a Python file
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath


@dataclass(frozen=True)
class _Pattern:
    text: str
    exclusion: bool
    regex: re.Pattern[str]
    depth: int


def _clean(pattern: str) -> str:
    cleaned = posixpath.normpath(pattern)
    if len(cleaned) > 1 and cleaned.startswith("/"):
        cleaned = cleaned.lstrip("/")
    return cleaned


def _translate(pattern: str) -> re.Pattern[str]:
    out = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            if pattern.startswith("**", i):
                i += 2
                if pattern.startswith("/", i):
                    out.append("(?:.*/)?")
                    i += 1
                else:
                    out.append(".*")
                continue
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "\\" and i + 1 < n:
            i += 1
            out.append(re.escape(pattern[i]))
        elif c == "[":
            end = pattern.find("]", i + 2 if pattern.startswith("[!", i) or pattern.startswith("[^", i) else i + 1)
            if end < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : end]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z", re.DOTALL)


class FilePatternMatcher:
    """Matches paths against dockerignore patterns: ``matcher(Path("a/b.pyc"))`` is True when it is ignored."""

    def __init__(self, *patterns: str) -> None:
        self._patterns: list[_Pattern] = []
        self._inverted = False
        for raw in patterns:
            if not isinstance(raw, str):
                raise TypeError(f"patterns must be strings, got {type(raw).__name__}")
            text = raw.strip()
            if not text:
                continue
            exclusion = text.startswith("!")
            if exclusion:
                text = text[1:].strip()
            if not text:
                continue
            cleaned = _clean(text)
            self._patterns.append(_Pattern(raw, exclusion, _translate(cleaned), len(cleaned.split("/"))))

    @classmethod
    def from_file(cls, path: Path | str) -> FilePatternMatcher:
        """The patterns of an ignore file (one per line; ``#`` starts a comment line)."""
        lines = Path(path).read_text().splitlines()
        return cls(*(line for line in lines if line.strip() and not line.lstrip().startswith("#")))

    def __invert__(self) -> FilePatternMatcher:
        new = FilePatternMatcher()
        new._patterns = list(self._patterns)
        new._inverted = not self._inverted
        return new

    def __repr__(self) -> str:
        body = ", ".join(repr(p.text) for p in self._patterns)
        return f"{'~' if self._inverted else ''}FilePatternMatcher({body})"

    @property
    def patterns(self) -> list[str]:
        """The patterns as given."""
        return [p.text for p in self._patterns]

    @property
    def has_exclusions(self) -> bool:
        """Whether a ``!`` pattern may re-include something below an ignored directory."""
        return self._inverted or any(p.exclusion for p in self._patterns)

    def _matches(self, path: str) -> bool:
        matched = False
        parts = path.split("/")
        for p in self._patterns:
            hit = bool(p.regex.match(path))
            if not hit and len(parts) > 1:
                hit = bool(p.regex.match("/".join(parts[: p.depth]))) if p.depth < len(parts) else False
            if hit:
                matched = not p.exclusion
        return matched

    def __call__(self, path: PurePath | str) -> bool:
        rel = posixpath.normpath(PurePath(path).as_posix()).lstrip("/")
        result = self._matches(rel)
        return not result if self._inverted else result


Ignore = Sequence[str] | Callable[[Path], bool]
"""What ``add_local_dir(ignore=...)`` accepts: patterns, or a function of the relative path."""


def as_matcher(ignore: Ignore | None) -> Callable[[Path], bool]:
    """One callable for either form."""
    if ignore is None:
        return FilePatternMatcher()
    if callable(ignore):
        return ignore
    if isinstance(ignore, str):
        return FilePatternMatcher(ignore)
    return FilePatternMatcher(*ignore)


NON_PYTHON_FILES = ~FilePatternMatcher("**/*.py")
"""``add_local_python_source``'s default: leave out everything but ``.py`` files."""


class _AutoDockerignore:
    """``ignore=AUTO_DOCKERIGNORE``: use the build context's ``.dockerignore`` if there is one."""

    def __repr__(self) -> str:
        return "AUTO_DOCKERIGNORE"


AUTO_DOCKERIGNORE = _AutoDockerignore()


def dockerignore_for(context_dir: Path, dockerfile: Path | None = None) -> FilePatternMatcher:
    """The patterns Docker would use: ``<Dockerfile>.dockerignore`` next to the Dockerfile, else the
    context's ``.dockerignore``, else none."""
    candidates = [Path(f"{dockerfile}.dockerignore")] if dockerfile is not None else []
    candidates.append(context_dir / ".dockerignore")
    for c in candidates:
        if c.is_file():
            return FilePatternMatcher.from_file(c)
    return FilePatternMatcher()
