"""Finding the host's Debian mirror in its apt sources, for debootstrap.

A host that cannot reach a container registry often reaches Debian only through its configured mirror,
so debootstrap uses the same one. Both formats are read: one-line (`sources.list`, `*.list`) and deb822
(`*.sources`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_MIRROR = "http://deb.debian.org/debian"


@dataclass(frozen=True)
class AptSource:
    """One `deb` entry: its URI and suites."""

    uri: str
    suites: tuple[str, ...]


def find_debian_mirror(suite: str = "bookworm", apt_dir: Path = Path("/etc/apt")) -> str:
    """Returns the first `deb` URI of the main Debian archive serving `suite`, else `DEFAULT_MIRROR`.

    Security archives are skipped: debootstrap needs the main archive. Entries of other projects
    (`cloud-sdk-bookworm`, `nodistro`) do not match because their suite is not `suite`.
    """
    for source in read_apt_sources(apt_dir):
        if "security" in source.uri:
            continue
        if suite in source.suites or "stable" in source.suites:
            return source.uri.rstrip("/")
    return DEFAULT_MIRROR


def read_apt_sources(apt_dir: Path = Path("/etc/apt")) -> list[AptSource]:
    """All `deb` entries, in apt's order: `sources.list`, then `sources.list.d/` by name."""
    files = [apt_dir / "sources.list"]
    parts = apt_dir / "sources.list.d"
    if parts.is_dir():
        files += sorted(p for p in parts.iterdir() if p.suffix in (".list", ".sources"))
    sources: list[AptSource] = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        parse = parse_deb822 if path.suffix == ".sources" else parse_one_line
        sources += parse(text)
    return sources


def parse_one_line(text: str) -> list[AptSource]:
    """Parses one-line format: `deb [options] URI suite [components...]`."""
    sources = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        rest = line[len("deb ") :].strip()
        if rest.startswith("["):
            _, _, rest = rest.partition("]")
        fields = rest.split()
        if len(fields) >= 2:
            sources.append(AptSource(fields[0], (fields[1],)))
    return sources


def parse_deb822(text: str) -> list[AptSource]:
    """Parses deb822 format: stanzas of `Types:`, `URIs:`, `Suites:` separated by blank lines."""
    sources = []
    for stanza in _stanzas(text):
        types = stanza.get("types", "").split()
        uris = stanza.get("uris", "").split()
        if "deb" not in types or not uris or stanza.get("enabled", "yes").lower() == "no":
            continue
        sources.append(AptSource(uris[0], tuple(stanza.get("suites", "").split())))
    return sources


def _stanzas(text: str) -> list[dict[str, str]]:
    stanzas: list[dict[str, str]] = []
    current: dict[str, str] = {}
    key = ""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if not line.strip():
            if current:
                stanzas.append(current)
            current, key = {}, ""
        elif line[0] in " \t" and key:
            current[key] += " " + line.strip()  # a continuation line (e.g. an inline Signed-By key)
        elif ":" in line:
            name, _, value = line.partition(":")
            key = name.strip().lower()
            current[key] = value.strip()
    if current:
        stanzas.append(current)
    return stanzas
