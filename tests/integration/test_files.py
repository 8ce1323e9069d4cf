"""File and directory transfers against a real sandbox: bytes, atomicity, hostile paths and archives.

Hostile requests go through a raw aiohttp session with the container's secret, so the client library
cannot "help"; every refusal must leave the sandbox untouched.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from ipybox import (
    ExecutionClient,
    ExecutionContainer,
    RemoteFileNotFoundError,
    RemotePathError,
    ResourceClient,
    ResourceError,
    _tokens,
)

HUNDRED_MB = 100_000_000


@pytest.fixture
async def resources(shared_container: ExecutionContainer) -> AsyncIterator[ResourceClient]:
    async with ResourceClient(port=shared_container.resource_port) as client:
        yield client


@pytest.fixture
async def raw(shared_container: ExecutionContainer) -> AsyncIterator[aiohttp.ClientSession]:
    """A plain session with the secret; URLs are sent exactly as written (no normalisation)."""
    token = _tokens.lookup("localhost", shared_container.resource_port)
    async with aiohttp.ClientSession(headers={"Authorization": f"token {token}"}) as session:
        yield session


def raw_url(container: ExecutionContainer, path: str) -> URL:
    return URL(f"http://127.0.0.1:{container.resource_port}{path}", encoded=True)


async def sandbox(client: ExecutionClient, code: str) -> str:
    return (await client.execute(code)).text or ""


async def sandbox_sha256(client: ExecutionClient, path: str) -> str:
    return await sandbox(client, f"import hashlib; print(hashlib.sha256(open({path!r}, 'rb').read()).hexdigest())")


async def sandbox_listing(client: ExecutionClient, path: str) -> list[str]:
    code = (
        "import os\n"
        f"root = {path!r}\n"
        "for d, dirs, files in sorted(os.walk(root)):\n"
        "    for n in sorted(dirs + files):\n"
        "        p = os.path.join(d, n)\n"
        "        print(os.path.relpath(p, root) + (' -> ' + os.readlink(p) if os.path.islink(p) else ''))"
    )
    return (await sandbox(client, code)).splitlines()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# -- files -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [b"", b"x", bytes(range(256)), None],
    ids=["0B", "1B", "all-byte-values", "100MB"],
)
async def test_round_trip_is_byte_exact(
    resources: ResourceClient, client: ExecutionClient, tmp_path: Path, content: bytes | None
) -> None:
    source = tmp_path / "source.bin"
    if content is None:
        with source.open("wb") as file:
            for _ in range(HUNDRED_MB // 4_000_000):
                file.write(os.urandom(4_000_000))
    else:
        source.write_bytes(content)
    await resources.upload_file("exact/nested/dirs/file.bin", source)
    assert await sandbox_sha256(client, "/app/exact/nested/dirs/file.bin") == sha256(source)
    back = tmp_path / "made" / "on" / "download.bin"
    await resources.download_file("exact/nested/dirs/file.bin", back)
    assert sha256(back) == sha256(source)
    assert os.listdir(back.parent) == ["download.bin"]  # no temp file left
    assert await sandbox(client, "import os; print(os.listdir('/app/exact/nested/dirs'))") == "['file.bin']"


async def test_upload_replaces_existing_file(
    resources: ResourceClient, client: ExecutionClient, tmp_path: Path
) -> None:
    (tmp_path / "a").write_text("first version, longer")
    (tmp_path / "b").write_text("second")
    await resources.upload_file("replace.txt", tmp_path / "a")
    await resources.upload_file("replace.txt", tmp_path / "b")
    assert await sandbox(client, "print(open('/app/replace.txt').read())") == "second"


async def test_missing_local_file_fails_before_any_request(resources: ResourceClient, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        await resources.upload_file("never.txt", tmp_path / "missing")
    assert not isinstance(info.value, ResourceError)
    with pytest.raises(FileNotFoundError) as info:
        await resources.upload_directory("never", tmp_path / "missing-dir")
    assert not isinstance(info.value, ResourceError)
    with pytest.raises(RemoteFileNotFoundError):
        await resources.download_file("never.txt", tmp_path / "x")


async def test_missing_remote_file(resources: ResourceClient, tmp_path: Path) -> None:
    existing = tmp_path / "keep.txt"
    existing.write_text("keep")
    with pytest.raises(RemoteFileNotFoundError) as info:
        await resources.download_file("does/not/exist.txt", existing)
    assert isinstance(info.value, FileNotFoundError) and info.value.status == 404
    assert existing.read_text() == "keep"
    assert os.listdir(tmp_path) == ["keep.txt"]
    with pytest.raises(RemoteFileNotFoundError):
        await resources.delete_file("does/not/exist.txt")
    with pytest.raises(RemoteFileNotFoundError):
        await resources.download_directory("does/not/exist", tmp_path / "dir")
    assert not (tmp_path / "dir").exists()


async def test_delete_file(resources: ResourceClient, client: ExecutionClient, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    await resources.upload_file("to-delete/f", tmp_path / "f")
    await resources.delete_file("to-delete/f")
    assert await sandbox(client, "import os; print(os.listdir('/app/to-delete'))") == "[]"


async def test_files_and_directories_do_not_stand_in_for_each_other(
    resources: ResourceClient, client: ExecutionClient, tmp_path: Path
) -> None:
    await sandbox(client, "import os; os.makedirs('/app/a-dir', exist_ok=True); open('/app/a-file', 'w').close()")
    (tmp_path / "f").write_text("x")
    with pytest.raises(RemoteFileNotFoundError, match="directory"):
        await resources.download_file("a-dir", tmp_path / "out")
    with pytest.raises(RemoteFileNotFoundError, match="directory"):
        await resources.delete_file("a-dir")
    with pytest.raises(ResourceError) as info:
        await resources.upload_file("a-dir", tmp_path / "f")
    assert info.value.status == 409
    with pytest.raises(RemoteFileNotFoundError, match="not a directory"):
        await resources.download_directory("a-file", tmp_path / "out")
    assert not (tmp_path / "out").exists()


async def test_aborted_upload_leaves_no_file(
    shared_container: ExecutionContainer, raw: aiohttp.ClientSession, client: ExecutionClient
) -> None:
    await sandbox(
        client, "import os; os.makedirs('/app/abort', exist_ok=True); open('/app/abort/old', 'w').write('old')"
    )

    async def failing_body() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b"x" * (1 << 20)
            await asyncio.sleep(0.01)
        raise RuntimeError("the client gives up mid-stream")

    for name in ["new", "old"]:
        with pytest.raises((RuntimeError, aiohttp.ClientError)):
            await raw.put(raw_url(shared_container, f"/files/abort/{name}"), data=failing_body())
    await asyncio.sleep(0.5)  # the server notices the reset
    assert await sandbox(client, "import os; print(sorted(os.listdir('/app/abort')))") == "['old']"
    assert await sandbox(client, "print(open('/app/abort/old').read())") == "old"


async def test_reader_never_sees_a_torn_file(
    resources: ResourceClient, client: ExecutionClient, tmp_path: Path
) -> None:
    size = 8 << 20
    versions = [tmp_path / "a", tmp_path / "b"]
    versions[0].write_bytes(b"a" * size)
    versions[1].write_bytes(b"b" * size)
    await resources.upload_file("torn/f", versions[0])
    reader = client.execute(
        "import time\n"
        "seen, deadline = set(), time.monotonic() + 3\n"
        "while time.monotonic() < deadline:\n"
        "    data = open('/app/torn/f', 'rb').read()\n"
        f"    seen.add('ok' if len(data) == {size} and data.count(data[:1]) == {size} else 'torn')\n"
        "print(sorted(seen))"
    )
    reading = asyncio.ensure_future(reader)
    while not reading.done():
        for version in versions:
            await resources.upload_file("torn/f", version)
    assert (await reading).text == "['ok']"


# -- hostile paths ---------------------------------------------------------------------------------

HOSTILE_PATHS = [
    "../etc/passwd",
    "a/../../etc/passwd",
    "%2e%2e/etc/passwd",
    "%2e%2e%2fetc%2fpasswd",
    "%252e%252e%252fetc%252fpasswd",  # double-encoded
    "/etc/passwd",
    "%2fetc%2fpasswd",
    "file%00.txt",
    "escape/passwd",  # a symlink the sandbox planted: /app/escape -> /etc
    "escape-dir/new-file",  # /app/escape-dir -> /tmp
]


@pytest.fixture
async def planted_links(client: ExecutionClient) -> None:
    await sandbox(
        client,
        "import os\n"
        "for name, target in [('escape', '/etc'), ('escape-dir', '/tmp')]:\n"
        "    if not os.path.islink('/app/' + name): os.symlink(target, '/app/' + name)",
    )


@pytest.mark.parametrize("relpath", HOSTILE_PATHS)
@pytest.mark.usefixtures("planted_links")
async def test_hostile_paths_are_refused_and_touch_nothing(
    shared_container: ExecutionContainer, raw: aiohttp.ClientSession, client: ExecutionClient, relpath: str
) -> None:
    before = await sandbox(client, "import os; print(sorted(os.listdir('/app')), sorted(os.listdir('/tmp')))")
    for method, kind in [("GET", "files"), ("PUT", "files"), ("DELETE", "files"), ("GET", "directories")]:
        async with raw.request(method, raw_url(shared_container, f"/{kind}/{relpath}"), data=b"pwned") as response:
            assert response.status == 400, (method, kind, await response.text())
            assert "error" in await response.json()
    tar = make_tar([("pwned.txt", b"pwned")])
    async with raw.put(raw_url(shared_container, f"/directories/{relpath}"), data=tar) as response:
        assert response.status == 400
    after = await sandbox(client, "import os; print(sorted(os.listdir('/app')), sorted(os.listdir('/tmp')))")
    assert after == before
    assert "pwned" not in await sandbox(
        client, "import subprocess; print(subprocess.getoutput('grep -rl pwned /app /tmp'))"
    )


@pytest.mark.parametrize("relpath", ["../status", "a/../../files/x", "/etc/passwd", "x\x00y"])
async def test_client_sends_hostile_paths_verbatim(resources: ResourceClient, tmp_path: Path, relpath: str) -> None:
    # The library neither normalises `..` away (which could reach another endpoint) nor hides a refusal.
    (tmp_path / "f").write_text("x")
    with pytest.raises(RemotePathError):
        await resources.download_file(relpath, tmp_path / "out")
    with pytest.raises(RemotePathError):
        await resources.upload_file(relpath, tmp_path / "f")
    assert not (tmp_path / "out").exists()


async def test_missing_token_is_refused(shared_container: ExecutionContainer) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(raw_url(shared_container, "/files/anything")) as response:
            assert response.status == 401


# -- directories -----------------------------------------------------------------------------------


def make_tar(members: list[tuple[str, bytes]], links: list[tuple[str, bytes, str]] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        for name, kind, linkname in links or []:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = linkname
            tar.addfile(info)
    return buffer.getvalue()


async def test_directory_round_trip(resources: ResourceClient, client: ExecutionClient, tmp_path: Path) -> None:
    source = tmp_path / "source"
    (source / "sub" / "deeper").mkdir(parents=True)
    (source / "empty" / "also-empty").mkdir(parents=True)
    (source / "zero").write_bytes(b"")
    (source / "bytes").write_bytes(bytes(range(256)))
    (source / "sub" / "deeper" / "big").write_bytes(os.urandom(5_000_000))
    (source / "sub" / "link-out").symlink_to("/etc")
    (source / "link-file").symlink_to(source / "bytes")
    os.mkfifo(source / "fifo")
    await resources.upload_directory("tree", source)
    expected = ["bytes", "empty", "empty/also-empty", "sub", "sub/deeper", "sub/deeper/big", "zero"]
    assert sorted(await sandbox_listing(client, "/app/tree")) == expected
    assert await sandbox_sha256(client, "/app/tree/sub/deeper/big") == sha256(source / "sub" / "deeper" / "big")

    back = tmp_path / "back"
    await resources.download_directory("tree", back)
    found = sorted(str(p.relative_to(back)) for p in back.rglob("*"))
    assert found == expected
    for name in ["bytes", "zero", "sub/deeper/big"]:
        assert sha256(back / name) == sha256(source / name)


async def test_whole_app_directory_round_trip(resources: ResourceClient, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("root")
    await resources.upload_file("at-root.txt", tmp_path / "f")
    await resources.download_directory("", tmp_path / "app")
    assert (tmp_path / "app" / "at-root.txt").read_text() == "root"


async def test_download_directory_neither_follows_nor_creates_planted_links(
    resources: ResourceClient, client: ExecutionClient, tmp_path: Path
) -> None:
    await sandbox(
        client,
        "import os\n"
        "os.makedirs('/app/d/sub', exist_ok=True)\n"
        "open('/app/d/real.txt', 'w').write('real')\n"
        "for link, target in [('link', '/etc'), ('passwd', '/etc/passwd'), ('sub/up', '../..'), ('loop', 'loop')]:\n"
        "    if not os.path.lexists('/app/d/' + link): os.symlink(target, '/app/d/' + link)\n"
        "os.mkfifo('/app/d/fifo') if not os.path.exists('/app/d/fifo') else None\n"
        "os.link('/app/d/real.txt', '/app/d/hard.txt') if not os.path.exists('/app/d/hard.txt') else None",
    )
    back = tmp_path / "d"
    await resources.download_directory("d", back)
    found = {str(p.relative_to(back)): p for p in back.rglob("*")}
    assert sorted(found) == ["hard.txt", "real.txt", "sub"]
    assert not any(p.is_symlink() for p in found.values())
    assert (back / "hard.txt").read_text() == "real"


async def test_upload_directory_merges_into_existing(
    resources: ResourceClient, client: ExecutionClient, tmp_path: Path
) -> None:
    await sandbox(client, "import os; os.makedirs('/app/merge/keep', exist_ok=True); open('/app/merge/keep/old', 'w')")
    source = tmp_path / "src"
    (source / "keep").mkdir(parents=True)
    (source / "keep" / "new").write_text("new")
    await resources.upload_directory("merge", source)
    assert await sandbox_listing(client, "/app/merge") == ["keep", "keep/new", "keep/old"]


@pytest.mark.parametrize(
    ("members", "links", "status"),
    [
        ([("ok.txt", b"1"), ("../evil.txt", b"x")], [], 400),
        ([("ok.txt", b"1"), ("/tmp/evil.txt", b"x")], [], 400),
        ([("ok.txt", b"1")], [("link", tarfile.SYMTYPE, "/etc")], 400),
        ([("ok.txt", b"1")], [("hard", tarfile.LNKTYPE, "/etc/passwd")], 400),
        ([("ok.txt", b"1")], [("dev", tarfile.CHRTYPE, "")], 400),
    ],
    ids=["dotdot", "absolute", "symlink", "hardlink", "device"],
)
async def test_hostile_archives_are_refused_and_touch_nothing(
    shared_container: ExecutionContainer,
    raw: aiohttp.ClientSession,
    client: ExecutionClient,
    members: list[tuple[str, bytes]],
    links: list[tuple[str, bytes, str]],
    status: int,
) -> None:
    async with raw.put(raw_url(shared_container, "/directories/hostile/x"), data=make_tar(members, links)) as response:
        assert response.status == status, await response.text()
    assert await sandbox(
        client, "import os; print(os.path.lexists('/app/hostile'), os.path.lexists('/tmp/evil.txt'))"
    ) == ("False False")


async def test_garbage_archive_is_refused(
    shared_container: ExecutionContainer, raw: aiohttp.ClientSession, client: ExecutionClient
) -> None:
    async with raw.put(raw_url(shared_container, "/directories/garbage"), data=b"no tar" * 1000) as response:
        assert response.status == 400
    assert await sandbox(client, "import os; print(os.path.lexists('/app/garbage'))") == "False"


async def test_aborted_directory_upload_leaves_nothing(
    shared_container: ExecutionContainer, raw: aiohttp.ClientSession, client: ExecutionClient
) -> None:
    archive = make_tar([(f"f{i}", os.urandom(1 << 20)) for i in range(6)])

    async def failing_body() -> AsyncIterator[bytes]:
        yield archive[: 4 << 20]  # four whole members, then the client gives up
        await asyncio.sleep(0.2)
        raise RuntimeError("the client gives up mid-stream")

    with pytest.raises((RuntimeError, aiohttp.ClientError)):
        await raw.put(raw_url(shared_container, "/directories/aborted/dir"), data=failing_body())
    await asyncio.sleep(0.5)
    assert await sandbox(client, "import os; print(os.path.lexists('/app/aborted'))") == "False"
