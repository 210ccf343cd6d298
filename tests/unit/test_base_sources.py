"""The base images' bootstrap uses the host's Debian mirror, also for suites the host does not list."""

from __future__ import annotations

from pathlib import Path

from shoal.images.base import _host_sources

DEB822 = """Types: deb
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
"""


def test_the_hosts_mirror_serves_its_own_suite_and_others(tmp_path: Path) -> None:
    sources = tmp_path / "debian.sources"
    sources.write_text(DEB822)
    assert _host_sources("bookworm", [sources]) == "deb http://mirror.example/debian bookworm main"
    assert _host_sources("trixie", [sources]) == "deb http://mirror.example/debian trixie main"


def test_one_line_sources_with_options(tmp_path: Path) -> None:
    sources = tmp_path / "sources.list"
    sources.write_text(
        "# a comment\n"
        "deb [arch=amd64 signed-by=/usr/share/keyrings/x.gpg] http://proxy.local/debian bookworm main\n"
        "deb http://security.debian.org/debian-security bookworm-security main\n"
        "deb https://apt.example.com/repo stable main\n"
    )
    assert _host_sources("bookworm", [sources]) == "deb http://proxy.local/debian bookworm main"
    assert _host_sources("bullseye", [sources]) == "deb http://proxy.local/debian bullseye main"


def test_no_debian_mirror_leaves_the_default(tmp_path: Path) -> None:
    sources = tmp_path / "sources.list"
    sources.write_text("deb https://apt.example.com/repo stable main\n")
    assert _host_sources("trixie", [sources]) is None
    assert _host_sources("trixie", [tmp_path / "missing.list"]) is None


def test_a_rolling_suite_does_not_check_its_release_files_expiry(tmp_path: Path, monkeypatch) -> None:
    from shoal.images import base

    monkeypatch.setattr(base, "_host_sources", lambda suite: f"deb http://proxy.local/debian {suite} main")
    assert base.sources_line("forky") == "deb [check-valid-until=no] http://proxy.local/debian forky main"
    assert base.sources_line("trixie") == "deb http://proxy.local/debian trixie main"
    monkeypatch.setattr(base, "_host_sources", lambda suite: None)
    assert base.sources_line("forky") == "deb [check-valid-until=no] http://deb.debian.org/debian forky main"
    assert base.sources_line("bookworm") is None
