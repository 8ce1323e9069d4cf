"""Tar writing and guarded extraction, as the host (`ipybox.resource._archive`) and the server use it.

One implementation serves both ends; every crafted archive runs against both uses: the host drops links
and special files (a compromised sandbox may send them) and maps errors to ipybox's, the server refuses
them; both refuse unsafe names and enforce the caps, and neither writes anything outside the target or
keeps a partial archive.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from ipybox import ArchiveError
from ipybox._image.ipybox_server import archive as server_archive
from ipybox.resource import _archive as host_archive

Member = tuple[tarfile.TarInfo, bytes]


@pytest.fixture(params=["host", "server"])
def side(request: pytest.FixtureRequest) -> ModuleType:
    return host_archive if request.param == "host" else server_archive


def unsafe_error(side: ModuleType) -> type[Exception]:
    return ArchiveError if side is host_archive else server_archive.UnsafeArchiveError


def extract(side: ModuleType, data: bytes, target: Path, **caps: int) -> tuple[int, int]:
    result: tuple[int, int] = side.extract_tar(io.BytesIO(data), target, drop_special=side is host_archive, **caps)
    return result


def file_member(name: str, content: bytes = b"data") -> Member:
    info = tarfile.TarInfo(name)
    info.size = len(content)
    return info, content


def special_member(name: str, kind: bytes, linkname: str = "") -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, b""


def make_tar(members: list[Member], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for info, content in members:
            tar.addfile(info, io.BytesIO(content) if info.isreg() else None)
    return buffer.getvalue()


def tree(root: Path) -> dict[str, bytes | None]:
    """Relative path -> content (None for directories); symlinks as "-> target"."""
    result: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                result[key] = f"-> {os.readlink(path)}".encode()
            elif path.is_dir():
                result[key] = None
            else:
                result[key] = path.read_bytes()
    return result


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    directory = tmp_path / "outside"
    directory.mkdir()
    return directory


@pytest.fixture
def target(tmp_path: Path) -> Path:
    return tmp_path / "target"


def assert_nothing_kept(target: Path, outside: Path) -> None:
    assert not target.exists(), tree(target)
    assert tree(outside) == {}


# -- round trip ------------------------------------------------------------------------------------


def iter_tar_bytes(side: ModuleType, root: Path, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield from side.iter_tar(fd, chunk_size)
    finally:
        os.close(fd)


def test_round_trip_keeps_files_and_empty_directories(side: ModuleType, tmp_path: Path, target: Path) -> None:
    source = tmp_path / "source"
    (source / "a" / "b").mkdir(parents=True)
    (source / "empty" / "nested-empty").mkdir(parents=True)
    (source / "zero").write_bytes(b"")
    (source / "binary").write_bytes(bytes(range(256)) * 5)
    (source / "a" / "b" / "big").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (source / "ünïcode name with spaces").write_text("ok")
    (source / ("l" * 120)).write_text("long name")  # needs a PAX header
    (source / "script.sh").write_text("#!/bin/sh\n")
    (source / "script.sh").chmod(0o755)
    data = b"".join(iter_tar_bytes(side, source, chunk_size=64 * 1024))
    files, size = extract(side, data, target)
    assert tree(target) == tree(source)
    assert files == 6 and size == sum(len(v) for v in tree(source).values() if v is not None)
    assert os.stat(target / "script.sh").st_mode & 0o777 == 0o755
    assert not any(name.startswith(".ipybox-staging-") for name in os.listdir(target))


def test_writing_skips_links_and_special_files(side: ModuleType, tmp_path: Path, outside: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    (outside / "secret").write_text("secret")
    (source / "regular").write_text("regular")
    (source / "to-outside").symlink_to(outside)
    (source / "to-secret").symlink_to(outside / "secret")
    (source / "dangling").symlink_to("nowhere")
    os.mkfifo(source / "fifo")
    os.link(outside / "secret", source / "hardlinked")  # travels as an ordinary copy, not as a link entry
    (source / "in-progress.ipybox-tmp").write_text("an upload's temp file")
    (source / ".ipybox-staging-0123").mkdir()
    with tarfile.open(fileobj=io.BytesIO(b"".join(iter_tar_bytes(side, source))), mode="r|") as tar:
        members = {member.name: member for member in tar}
    assert sorted(members) == ["hardlinked", "regular"]
    assert all(member.isreg() for member in members.values())


def test_merge_into_existing_directory(side: ModuleType, target: Path) -> None:
    (target / "keep").mkdir(parents=True)
    (target / "keep" / "old.txt").write_text("old")
    (target / "replace.txt").write_text("before")
    data = make_tar([file_member("replace.txt", b"after"), file_member("keep/new.txt", b"new")])
    extract(side, data, target)
    assert tree(target) == {"keep": None, "keep/old.txt": b"old", "keep/new.txt": b"new", "replace.txt": b"after"}


# -- hostile archives ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["/etc/evil", "../evil", "a/../../evil", "./../evil", "a/b/../../../evil", "//evil"],
)
def test_unsafe_names_are_refused(side: ModuleType, name: str, target: Path, outside: Path) -> None:
    data = make_tar([file_member("fine.txt"), file_member(name)])
    with pytest.raises(unsafe_error(side), match="absolute|'..'"):
        extract(side, data, target)
    assert_nothing_kept(target, outside)


def test_symlink_then_file_through_it(side: ModuleType, target: Path, outside: Path) -> None:
    data = make_tar([special_member("link", tarfile.SYMTYPE, str(outside)), file_member("link/pwned", b"x")])
    if side is server_archive:
        with pytest.raises(server_archive.UnsafeArchiveError, match="link or special"):
            extract(side, data, target)
        assert_nothing_kept(target, outside)
    else:
        extract(side, data, target)  # the link is dropped; "link/" becomes a plain directory
        assert tree(target) == {"link": None, "link/pwned": b"x"}
        assert not (target / "link").is_symlink()
        assert tree(outside) == {}


@pytest.mark.parametrize(
    "member",
    [
        special_member("passwd", tarfile.LNKTYPE, "/etc/passwd"),
        special_member("hard", tarfile.LNKTYPE, "../outside/x"),
        special_member("sym", tarfile.SYMTYPE, "/etc/passwd"),
        special_member("sym-rel", tarfile.SYMTYPE, "../../../../etc"),
        special_member("null", tarfile.CHRTYPE),
        special_member("disk", tarfile.BLKTYPE),
        special_member("pipe", tarfile.FIFOTYPE),
    ],
    ids=["hardlink-etc-passwd", "hardlink-relative", "symlink-absolute", "symlink-up", "char", "block", "fifo"],
)
def test_links_and_devices_never_extracted(side: ModuleType, member: Member, target: Path, outside: Path) -> None:
    data = make_tar([file_member("fine.txt"), member, file_member("after.txt")])
    if side is server_archive:
        with pytest.raises(server_archive.UnsafeArchiveError):
            extract(side, data, target)
        assert_nothing_kept(target, outside)
    else:
        extract(side, data, target)
        assert tree(target) == {"fine.txt": b"data", "after.txt": b"data"}
    assert tree(outside) == {}


def test_member_count_cap(side: ModuleType, target: Path, outside: Path) -> None:
    data = make_tar([file_member(f"f{i}") for i in range(11)])
    with pytest.raises(unsafe_error(side), match="more than 10 members"):
        extract(side, data, target, max_members=10)
    assert_nothing_kept(target, outside)
    extract(side, data, target, max_members=11)
    assert len(tree(target)) == 11


def test_dropped_members_count_towards_the_cap(side: ModuleType, target: Path, outside: Path) -> None:
    data = make_tar([special_member(f"l{i}", tarfile.SYMTYPE, "/etc") for i in range(20)])
    with pytest.raises(unsafe_error(side)):
        extract(side, data, target, max_members=10)
    assert_nothing_kept(target, outside)


def test_expanded_size_cap(side: ModuleType, target: Path, outside: Path) -> None:
    data = make_tar([file_member("a", b"x" * 600), file_member("b", b"y" * 600)])
    with pytest.raises(unsafe_error(side), match="more than 1000 bytes"):
        extract(side, data, target, max_bytes=1000)
    assert_nothing_kept(target, outside)


def test_huge_extended_header_is_refused_before_it_is_read(side: ModuleType, target: Path) -> None:
    header = tarfile.TarInfo("././@PaxHeader")
    header.type = tarfile.XHDTYPE
    header.size = 4 << 30  # claims 4 GiB; tarfile would read it whole
    data = header.tobuf(tarfile.USTAR_FORMAT) + b"\0" * 1024
    with pytest.raises(unsafe_error(side), match="extended tar header"):
        extract(side, data, target)


def _extended(kind: bytes, content: bytes, name: str = "././@LongLink") -> bytes:
    header = tarfile.TarInfo(name)
    header.type = kind
    header.size = len(content)
    return header.tobuf(tarfile.USTAR_FORMAT) + content + b"\0" * (-len(content) % tarfile.BLOCKSIZE)


def _pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n".encode()
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length += 1
    return str(length).encode() + body


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        (_extended(tarfile.XGLTYPE, _pax_record("comment", "x")), "global PAX header"),
        (_extended(tarfile.XHDTYPE, _pax_record("GNU.sparse.map", "0,1")), "sparse"),
        (b"".join(_extended(tarfile.GNUTYPE_LONGNAME, b"long\0") for _ in range(5)), "more than 4 extended"),
    ],
    ids=["global-pax", "sparse-pax", "chain-of-5"],
)
def test_headers_that_make_tarfile_hold_memory_are_refused(
    side: ModuleType, headers: bytes, message: str, target: Path, outside: Path
) -> None:
    info, content = file_member("f")
    data = headers + info.tobuf(tarfile.USTAR_FORMAT) + content + b"\0" * (tarfile.BLOCKSIZE - len(content) + 1024)
    with pytest.raises(unsafe_error(side), match=message):
        extract(side, data, target)
    assert_nothing_kept(target, outside)


def test_an_old_gnu_sparse_member_is_refused(side: ModuleType, target: Path) -> None:
    info = tarfile.TarInfo("s")
    info.type = tarfile.GNUTYPE_SPARSE
    with pytest.raises(unsafe_error(side), match="sparse"):
        extract(side, info.tobuf(tarfile.GNU_FORMAT) + b"\0" * 1024, target)


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_long_names_pass_the_header_caps(side: ModuleType, fmt: int, target: Path) -> None:
    name = "/".join(["d" * 200] * 10) + "/f"  # 2 KiB: an extended header in either format
    extract(side, make_tar([file_member(name)], fmt), target)
    assert (target / name).read_bytes() == b"data"


def test_truncated_archive_keeps_nothing(side: ModuleType, target: Path, outside: Path) -> None:
    data = make_tar([file_member("first", b"1" * 2000), file_member("second", b"2" * 5000)])
    with pytest.raises(tarfile.TarError):
        extract(side, data[: len(data) // 2 + 700], target)
    assert_nothing_kept(target, outside)


def test_garbage_is_not_an_archive(side: ModuleType, target: Path) -> None:
    with pytest.raises(tarfile.TarError):
        extract(side, b"not a tar archive at all" * 100, target)
    assert not target.exists()


def test_existing_target_is_untouched_by_a_refused_archive(side: ModuleType, target: Path, outside: Path) -> None:
    target.mkdir()
    (target / "mine.txt").write_text("mine")
    data = make_tar([file_member("mine.txt", b"overwritten"), file_member("new.txt"), file_member("../evil")])
    with pytest.raises(unsafe_error(side)):
        extract(side, data, target)
    assert tree(target) == {"mine.txt": b"mine"}
    assert tree(outside) == {}


def test_symlink_in_the_target_is_not_followed(side: ModuleType, target: Path, outside: Path) -> None:
    target.mkdir()
    (target / "sub").symlink_to(outside)
    data = make_tar([file_member("sub/planted", b"x")])
    conflict = FileExistsError if side is host_archive else server_archive.ArchiveConflictError
    with pytest.raises(conflict, match="symlink"):
        extract(side, data, target)
    assert tree(outside) == {}
    assert tree(target) == {"sub": f"-> {outside}".encode()}


def test_file_over_existing_symlink_replaces_the_link(side: ModuleType, target: Path, outside: Path) -> None:
    target.mkdir()
    (outside / "victim").write_text("victim")
    (target / "f").symlink_to(outside / "victim")
    extract(side, make_tar([file_member("f", b"new")]), target)
    assert (outside / "victim").read_text() == "victim"
    assert not (target / "f").is_symlink() and (target / "f").read_bytes() == b"new"


@pytest.mark.parametrize(
    ("existing", "members"),
    [("dir", [file_member("x")]), ("file", [file_member("x/y")])],
)
def test_type_conflicts_are_refused_before_anything_moves(
    side: ModuleType, target: Path, existing: str, members: list[Member]
) -> None:
    target.mkdir()
    if existing == "dir":
        (target / "x").mkdir()
    else:
        (target / "x").write_text("file")
    before = tree(target)
    conflict = FileExistsError if side is host_archive else server_archive.ArchiveConflictError
    with pytest.raises(conflict):
        extract(side, make_tar([file_member("a-first"), *members]), target)
    assert tree(target) == before


def test_duplicate_members_are_refused(side: ModuleType, target: Path) -> None:
    with pytest.raises(unsafe_error(side), match="twice"):
        extract(side, make_tar([file_member("a", b"1"), file_member("a", b"2")]), target)
    assert not target.exists()


def test_setuid_and_world_writable_bits_are_dropped(side: ModuleType, target: Path) -> None:
    info, content = file_member("tool", b"#!/bin/sh\n")
    info.mode = 0o6777
    extract(side, make_tar([(info, content)]), target)
    assert os.stat(target / "tool").st_mode & 0o7777 == 0o755
