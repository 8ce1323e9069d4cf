"""Finding the Debian mirror for debootstrap in one-line and deb822 apt sources."""

from __future__ import annotations

from pathlib import Path

from ipybox._build.apt_sources import (
    DEFAULT_MIRROR,
    AptSource,
    find_debian_mirror,
    parse_deb822,
    parse_one_line,
)

DEB822 = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
"""


def test_parse_one_line() -> None:
    text = """\
# deb http://commented.example/debian bookworm main
deb-src http://src.example/debian bookworm main
deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian/ bookworm main contrib
deb http://security.debian.org/debian-security bookworm-security main
"""
    assert parse_one_line(text) == [
        AptSource("http://mirror.example/debian/", ("bookworm",)),
        AptSource("http://security.debian.org/debian-security", ("bookworm-security",)),
    ]


def test_parse_deb822() -> None:
    assert parse_deb822(DEB822) == [
        AptSource("http://deb.debian.org/debian", ("bookworm", "bookworm-updates")),
        AptSource("http://deb.debian.org/debian-security", ("bookworm-security",)),
    ]


def test_deb822_skips_disabled_and_source_only_stanzas() -> None:
    text = "Types: deb-src\nURIs: http://a/\nSuites: bookworm\n\nEnabled: no\nTypes: deb\nURIs: http://b/\nSuites: x\n"
    assert parse_deb822(text) == []


def test_mirror_from_sources_list_first(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text("deb http://one-line.example/debian bookworm main\n")
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(DEB822)
    assert find_debian_mirror("bookworm", tmp_path) == "http://one-line.example/debian"


def test_mirror_from_deb822_skipping_security_and_other_projects(tmp_path: Path) -> None:
    parts = tmp_path / "sources.list.d"
    parts.mkdir()
    (parts / "a-google.list").write_text("deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main\n")
    (parts / "b-security.list").write_text("deb http://security.example/debian-security bookworm main\n")
    (parts / "debian.sources").write_text(DEB822)
    (parts / "ignored.list.disabled").write_text("deb http://disabled.example/debian bookworm main\n")
    assert find_debian_mirror("bookworm", tmp_path) == "http://deb.debian.org/debian"


def test_default_mirror_when_nothing_matches(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text("deb http://archive.ubuntu.com/ubuntu noble main\n")
    assert find_debian_mirror("bookworm", tmp_path) == DEFAULT_MIRROR
