"""Fixtures the security tests share."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture
def sandboxes() -> Iterator[list]:
    """Sandboxes a test creates (append to the list); all terminated afterwards, also when it fails."""
    made: list = []
    try:
        yield made
    finally:
        for sb in made:
            sb.terminate()
