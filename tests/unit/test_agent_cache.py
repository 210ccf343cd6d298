"""The agent binary cache that daemons on fresh data directories share (``ensure_agent(..., cache=)``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from shoal.agent.build import BINARY_NAME, ensure_agent, source_digest

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler: run `make setup`")


def test_a_second_data_dir_takes_the_agent_from_the_cache_without_compiling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o755)
    first = ensure_agent(tmp_path / "one", cache)
    assert (cache / source_digest() / BINARY_NAME).read_bytes() == first.read_bytes()
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))  # no compiler: only the cache can give the binary
    second = ensure_agent(tmp_path / "two", cache)
    assert second.read_bytes() == first.read_bytes()
    assert os.access(second, os.X_OK)
    assert (tmp_path / "two" / f"{BINARY_NAME}.sha256").read_text().strip() == source_digest()


def test_a_cache_others_can_write_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    ensure_agent(tmp_path / "one", cache)
    cache.chmod(0o777)  # anyone could have replaced the binary that the daemon runs as root
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))
    with pytest.raises(RuntimeError, match="C compiler"):
        ensure_agent(tmp_path / "two", cache)
