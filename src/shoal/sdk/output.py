"""``enable_output()``: show image build logs and progress while a block runs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console

_console: Console | None = None
_verbose = False


@contextlib.contextmanager
def enable_output(show_progress: bool = True) -> Iterator[None]:
    """Print image build logs (and other daemon progress) while the block runs.

    Examples:
        with shoal.enable_output():
            sb = shoal.Sandbox.create(app=app)
    """
    global _console
    previous = _console
    _console = Console(stderr=True, highlight=False) if show_progress else None
    try:
        yield
    finally:
        _console = previous


def log_line(line: str) -> None:
    """Show a progress line if output is enabled."""
    if _console is not None:
        _console.print(line, markup=False)


def console() -> Console | None:
    """The console build progress prints to, while ``enable_output()`` is active."""
    return _console


def is_enabled() -> bool:
    """Whether ``enable_output()`` is active."""
    return _console is not None


def set_verbose(verbose: bool) -> None:
    """Also show what needed no work (build steps found in the cache): ``shoal run -v``."""
    global _verbose
    _verbose = verbose


def is_verbose() -> bool:
    """Whether ``set_verbose(True)`` is in force."""
    return _verbose
