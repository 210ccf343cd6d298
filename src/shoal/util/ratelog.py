"""Rate-limited log lines about one subject (a sandbox, or a condition such as running out of descriptors).

What a sandbox (or a client of its tunnels) can make the daemon say, it must not be able to make the daemon
say a thousand times a second.  A log call names its subject with ``extra=about(key)``; the filter
``PER_SANDBOX``, attached to the loggers of code a sandbox can drive (the DNS forwarder, tunnels, the
connect proxy, the accept loops), lets ``LINES`` records per subject through in each ``INTERVAL`` seconds.
The last one let through says that more are being suppressed; the first one after the window says how many
were.  Records that name no subject pass untouched.  At most ``MAX_KEYS`` subjects are remembered (the
stalest are forgotten first), so the filter's own memory is bounded too.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

LINES = 10
"""Lines per subject per interval."""
INTERVAL = 60.0
"""Seconds."""
MAX_KEYS = 4096
ATTR = "ratelog_key"
"""The log record attribute that names the subject."""


def about(key: str) -> dict[str, str]:
    """The ``extra`` of a log call about ``key`` (a sandbox's address or id)."""
    return {ATTR: key}


@dataclass
class _Window:
    start: float
    lines: int = 0
    suppressed: int = 0


class RateLimit(logging.Filter):
    """A ``logging.Filter``: ``lines`` records per subject per ``interval`` seconds, then a count of the rest."""

    def __init__(
        self,
        lines: int = LINES,
        interval: float = INTERVAL,
        *,
        max_keys: int = MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.lines = lines
        self.interval = interval
        self.max_keys = max_keys
        self.clock = clock
        self._windows: OrderedDict[str, _Window] = OrderedDict()

    def allow(self, key: str) -> tuple[bool, str]:
        """Whether a line about ``key`` may be written now, and a note to add to it ("" for none)."""
        now = self.clock()
        w = self._windows.get(key)
        note = ""
        if w is None or now - w.start >= self.interval:
            if w is not None and w.suppressed:
                note = f" ({w.suppressed} similar lines about {key} were suppressed)"
            w = _Window(now)
            self._windows[key] = w
            self._windows.move_to_end(key)
            while len(self._windows) > self.max_keys:
                self._windows.popitem(last=False)
        if w.lines >= self.lines:
            w.suppressed += 1
            return False, ""
        w.lines += 1
        if w.lines == self.lines:
            note += f" (further lines about {key} suppressed for {self.interval:g} s)"
        return True, note

    def filter(self, record: logging.LogRecord) -> bool:
        key = getattr(record, ATTR, None)
        if key is None:
            return True
        ok, note = self.allow(str(key))
        if ok and note:
            record.msg = str(record.msg) + (note.replace("%", "%%") if record.args else note)
        return ok


PER_SANDBOX = RateLimit()
"""The daemon's one limiter: attach it to a module's logger with ``log.addFilter(PER_SANDBOX)``."""
