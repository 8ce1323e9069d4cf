"""A hostile 2 MB tar stream cannot grow the reader's memory by more than 16 MiB.

Directory downloads feed the sandbox's archive to `archive.extract_tar` on the host (through
`ipybox.resource._archive`); uploads feed the client's to the same code on the server. Python's tarfile
keeps every member in `TarFile.members` (also when streaming), copies a global PAX header into every
following member, reads chains of extended headers recursively, and reads GNU sparse maps whole: a 2 MB
archive grew the reader by gigabytes. Each archive below is read in a fresh subprocess, whose peak RSS
growth is measured (its address space capped, so that a regression fails fast instead of eating the
machine).
"""

from __future__ import annotations

import io
import json
import string
import subprocess
import sys
import tarfile
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from ipybox import ArchiveError
from ipybox.resource import _archive

TWO_MB = 2 << 20
LIMIT_KIB = 16 * 1024
END = tarfile.NUL * (2 * tarfile.BLOCKSIZE)
_ALNUM = (string.ascii_letters + string.digits).encode()
# Two-character keys: the shortest records (6 bytes) that make distinct dict entries.
KEYS = [bytes([a, b]) for a in _ALNUM for b in _ALNUM]


def record(key: bytes, value: bytes = b"") -> bytes:
    """One PAX record, `<length> <key>=<value>\\n`, the length counting itself."""
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length += 1
    return str(length).encode() + body


def header(name: str, kind: bytes, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    return info.tobuf(tarfile.USTAR_FORMAT)


def padded(data: bytes) -> bytes:
    return data + tarfile.NUL * (-len(data) % tarfile.BLOCKSIZE)


def records(budget: int, prefix: str = "") -> bytes:
    """Distinct tiny records, at most `budget` bytes of them."""
    out = bytearray()
    index = 0
    while True:
        key = KEYS[index] if not prefix and index < len(KEYS) else f"{prefix}{index}".encode()
        item = record(key)
        if len(out) + len(item) > budget:
            return bytes(out)
        out += item
        index += 1


def global_header() -> bytes:
    """A ~1 MB global PAX header of tiny records, then empty members up to 2 MB."""
    pax = records((1 << 20) - 4096, prefix="g")
    data = bytearray(header("pax_global_header", tarfile.XGLTYPE, len(pax)) + padded(pax))
    index = 0
    while len(data) < TWO_MB - len(END) - tarfile.BLOCKSIZE:
        data += header(f"m{index}", tarfile.REGTYPE, 0)
        index += 1
    return bytes(data + END)


def keyed_members() -> bytes:
    """Empty members, each after its own PAX header of ~23 KB of tiny records (within the caps)."""
    pax = records(len(KEYS) * 6)
    member = header("PaxHeaders/m", tarfile.XHDTYPE, len(pax)) + padded(pax)
    data = bytearray()
    index = 0
    while len(data) + len(member) + tarfile.BLOCKSIZE < TWO_MB - len(END):
        data += member + header(f"m{index}", tarfile.REGTYPE, 0)
        index += 1
    return bytes(data + END)


def header_chain() -> bytes:
    """Two ~1 MB extended headers before one member (tarfile holds a chain in memory whole)."""
    data = bytearray()
    for link in range(2):
        pax = records((1 << 20) - 4096, prefix=f"c{link}_")
        data += header(f"PaxHeaders/{link}", tarfile.XHDTYPE, len(pax)) + padded(pax)
    return bytes(data + header("f", tarfile.REGTYPE, 0) + END)


def sparse_map() -> bytes:
    """A GNU sparse file (PAX format 1.0) whose map, read from its data, fills the archive."""
    pax = b"".join(
        record(key, value)
        for key, value in [
            (b"GNU.sparse.major", b"1"),
            (b"GNU.sparse.minor", b"0"),
            (b"GNU.sparse.realsize", b"10"),
            (b"GNU.sparse.name", b"s"),
        ]
    )
    pairs = (TWO_MB - 8192) // 4 - 4
    body = str(pairs).encode() + b"\n" + b"1\n" * (2 * pairs)
    data = header("PaxHeaders/s", tarfile.XHDTYPE, len(pax)) + padded(pax)
    return data + header("s", tarfile.REGTYPE, len(body)) + padded(body) + END


def tiny_members() -> bytes:
    """Empty members only: 4094 headers in 2 MB."""
    count = (TWO_MB - len(END)) // tarfile.BLOCKSIZE
    return b"".join(header(f"d/{index}", tarfile.REGTYPE, 0) for index in range(count)) + END


CHILD = textwrap.dedent(
    """
    import io, json, resource, sys, tarfile, tempfile
    from pathlib import Path

    path, side = sys.argv[1], sys.argv[2]
    if side == "host":
        from ipybox.resource import _archive as archive
        options = {"drop_special": True}
    else:
        from ipybox._image.ipybox_server import archive
        options = {}

    def tiny():
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo("w" * 200)  # a PAX header too
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
        return buffer.getvalue()

    def status_kib(field):
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))

    with tempfile.TemporaryDirectory() as directory:  # warm up the code paths
        archive.extract_tar(io.BytesIO(tiny()), Path(directory) / "warm", **options)
    resource.setrlimit(resource.RLIMIT_AS, ((status_kib("VmSize") << 10) + (1 << 30), resource.RLIM_INFINITY))
    # The peak RSS (VmHWM) is reset to the current RSS: what memory freed earlier would hide counts too.
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    before = status_kib("VmRSS")
    error = None
    with tempfile.TemporaryDirectory() as directory, open(path, "rb", buffering=0) as file:
        try:
            archive.extract_tar(file, Path(directory) / "target", **options)
        except MemoryError:
            error = "MemoryError"
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
    after = status_kib("VmHWM")
    print(json.dumps({"growth_kib": after - before, "error": error}))
    """
)

CASES: dict[str, tuple[Callable[[], bytes], str | None]] = {
    # archive: (builder, what the error must say; None: extracted)
    "global-header": (global_header, "global PAX header"),
    "keyed-members": (keyed_members, None),
    "header-chain": (header_chain, "extended tar header"),
    "sparse-map": (sparse_map, "sparse"),
    "tiny-members": (tiny_members, None),
}


@pytest.mark.parametrize("side", ["host", "server"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_hostile_two_megabyte_archive_grows_the_reader_by_at_most_16_mib(
    tmp_path: Path, case: str, side: str
) -> None:
    build, expected_error = CASES[case]
    data = build()
    assert TWO_MB - 64 * 1024 <= len(data) <= TWO_MB, len(data)
    path = tmp_path / f"{case}.tar"
    path.write_bytes(data)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), side], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = json.loads(done.stdout)
    assert outcome["growth_kib"] <= LIMIT_KIB, outcome
    if expected_error is None:
        assert outcome["error"] is None, outcome
    else:
        assert outcome["error"] is not None and expected_error in outcome["error"], outcome


def test_a_global_pax_header_is_refused_with_a_message_and_nothing_extracted(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "x"}) as tar:
        info = tarfile.TarInfo("a.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"a"))
    target = tmp_path / "target"
    with pytest.raises(ArchiveError, match="global PAX header.*ipybox never writes one"):
        _archive.extract_tar(io.BytesIO(buffer.getvalue()), target, drop_special=True)
    assert not target.exists()


def test_tarfile_keeps_no_member_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """However many members stream past, the TarFile holds at most the current one."""
    seen: list[int] = []
    next_member = tarfile.TarFile.next

    def spy(self: tarfile.TarFile) -> tarfile.TarInfo | None:
        seen.append(len(self.members))  # type: ignore[attr-defined]
        return next_member(self)

    monkeypatch.setattr(tarfile.TarFile, "next", spy)
    _archive.extract_tar(io.BytesIO(tiny_members()[: 500 * tarfile.BLOCKSIZE] + END), tmp_path / "t")
    assert len(seen) > 400 and max(seen) <= 1, max(seen)
