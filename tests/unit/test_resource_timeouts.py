"""ResourceClient transfers are bounded by inactivity, not by a total time (issue 12).

A small aiohttp server on 127.0.0.1 plays the resource server: it streams steadily but slowly (longer
than aiohttp's default total timeout, patched down to half a second), or stalls. A steady transfer
must succeed; a stalled one must raise ServerConnectionError naming the operation and the option.
"""

from __future__ import annotations

import asyncio
import io
import sys
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from ipybox import ResourceClient, TransferStalledError
from ipybox.resource import _mcp

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "ipybox" / "_image"))

from ipybox_server import mcp_sources  # noqa: E402

STEADY_PIECES = 8
PIECE_INTERVAL = 0.2  # seconds: a steady transfer takes about 1.6 s, over the patched total of 0.5 s
STALL = 0.3  # the inactivity timeout the stall tests pass


def _tar() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name in ("a.txt", "b.txt"):
            data = name.encode() * 1000
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


TAR = _tar()
STEADY_FILE = bytes(range(256)) * 64 * STEADY_PIECES


class FakeResourceServer:
    """The routes ResourceClient uses, each steady or stalled. `release` ends every stall."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.received = 0
        app = web.Application()
        app.router.add_get("/status", self.status)
        app.router.add_get("/files/steady", self.steady_download)
        app.router.add_get("/files/stalled", self.stalled_download)
        app.router.add_put("/files/steady", self.steady_upload)
        app.router.add_put("/files/stalled", self.stalled_upload)
        app.router.add_put("/files/silent", self.silent_after_upload)
        app.router.add_get("/directories/steady", self.steady_directory)
        app.router.add_get("/directories/stalled", self.stalled_directory)
        app.router.add_put("/directories/stalled", self.stalled_upload)
        app.router.add_get("/modules", self.silent)
        app.router.add_post("/mcp/sources", self.slow_generation)
        self.app = app

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _stream(self, request: web.Request, data: bytes, pieces: int) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = len(data)
        await response.prepare(request)
        size = -(-len(data) // pieces)
        for start in range(0, len(data), size):
            await response.write(data[start : start + size])
            await asyncio.sleep(PIECE_INTERVAL)
        await response.write_eof()
        return response

    async def _stall(self, request: web.Request, first: bytes) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        await response.write(first)
        await self.release.wait()
        return response

    async def steady_download(self, request: web.Request) -> web.StreamResponse:
        return await self._stream(request, STEADY_FILE, STEADY_PIECES)

    async def stalled_download(self, request: web.Request) -> web.StreamResponse:
        return await self._stall(request, b"x" * 1024)

    async def steady_directory(self, request: web.Request) -> web.StreamResponse:
        return await self._stream(request, TAR, STEADY_PIECES)

    async def stalled_directory(self, request: web.Request) -> web.StreamResponse:
        return await self._stall(request, TAR[:512])

    async def steady_upload(self, request: web.Request) -> web.Response:
        while chunk := await request.content.read(len(STEADY_FILE) // STEADY_PIECES):
            self.received += len(chunk)
            await asyncio.sleep(PIECE_INTERVAL)
        return web.json_response({"size": self.received})

    async def stalled_upload(self, request: web.Request) -> web.Response:
        await self.release.wait()  # never reads the body
        return web.json_response({"size": 0})

    async def silent_after_upload(self, request: web.Request) -> web.Response:
        await request.read()
        await self.release.wait()  # the whole body arrived, the answer never comes
        return web.json_response({"size": 0})

    async def silent(self, request: web.Request) -> web.Response:
        await self.release.wait()
        return web.json_response({})

    async def slow_generation(self, request: web.Request) -> web.Response:
        await asyncio.sleep(4 * STALL)  # the server has its own, longer limit for this
        return web.json_response({"modules": ["tool"]})


@pytest.fixture
async def server() -> AsyncIterator[tuple[FakeResourceServer, int]]:
    fake = FakeResourceServer()
    test_server = TestServer(fake.app, host="127.0.0.1")
    await test_server.start_server()
    try:
        yield fake, test_server.port or 0
    finally:
        fake.release.set()
        await test_server.close()


@pytest.fixture
def short_total_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """aiohttp's default `ClientTimeout(total=300)`, shortened: what made long transfers fail."""
    monkeypatch.setattr(aiohttp.client, "DEFAULT_TIMEOUT", aiohttp.ClientTimeout(total=0.5, sock_connect=30))


# -- steady transfers outlast any total timeout -----------------------------------------------------


@pytest.mark.usefixtures("short_total_timeout")
async def test_steady_download_longer_than_the_total_timeout_succeeds(
    server: tuple[FakeResourceServer, int], tmp_path: Path
) -> None:
    _, port = server
    async with ResourceClient(port=port, host="127.0.0.1", token="t", connect_retries=1) as resources:
        await resources.download_file("steady", tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == STEADY_FILE


@pytest.mark.usefixtures("short_total_timeout")
async def test_steady_upload_longer_than_the_total_timeout_succeeds(
    server: tuple[FakeResourceServer, int], tmp_path: Path
) -> None:
    fake, port = server
    (tmp_path / "in.bin").write_bytes(STEADY_FILE)
    async with ResourceClient(port=port, host="127.0.0.1", token="t", connect_retries=1) as resources:
        await resources.upload_file("steady", tmp_path / "in.bin")
    assert fake.received == len(STEADY_FILE)


@pytest.mark.usefixtures("short_total_timeout")
async def test_steady_directory_download_longer_than_the_total_timeout_succeeds(
    server: tuple[FakeResourceServer, int], tmp_path: Path
) -> None:
    _, port = server
    async with ResourceClient(port=port, host="127.0.0.1", token="t", connect_retries=1) as resources:
        await resources.download_directory("steady", tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.txt", "b.txt"]


@pytest.mark.usefixtures("short_total_timeout")
async def test_mcp_generation_waits_for_the_servers_own_limit_not_the_inactivity_timeout(
    server: tuple[FakeResourceServer, int],
) -> None:
    _, port = server
    async with ResourceClient(
        port=port, host="127.0.0.1", token="t", connect_retries=1, inactivity_timeout=STALL
    ) as resources:
        assert await resources.generate_mcp_sources("gen", "srv", {"command": "x"}) == ["tool"]


def test_mcp_generation_waits_longer_than_the_server_allows_itself() -> None:
    # Else a slow MCP server would end in a stall error instead of the server's 422 that names the cause.
    assert _mcp.GENERATE_RESPONSE_TIMEOUT > mcp_sources.GENERATE_TIMEOUT


# -- stalls are reported as ours, naming the operation and the option ----------------------------


async def _stalled(port: int, call: str, *args: object) -> str:
    async with ResourceClient(
        port=port, host="127.0.0.1", token="t", connect_retries=1, inactivity_timeout=STALL
    ) as resources:
        with pytest.raises(TransferStalledError) as info:
            await getattr(resources, call)(*args)
        # The session survives a stall: the next request works.
        assert await resources.status() == {"status": "ok"}
    message = str(info.value)
    assert "stalled" in message and "inactivity_timeout" in message and f"{STALL:g} s" in message
    assert isinstance(info.value.__cause__, BaseException)
    return message


async def test_stalled_download_names_the_operation(server: tuple[FakeResourceServer, int], tmp_path: Path) -> None:
    _, port = server
    message = await _stalled(port, "download_file", "stalled", tmp_path / "out.bin")
    assert "download of 'stalled'" in message and f"127.0.0.1:{port}" in message
    assert not list(tmp_path.iterdir())  # the temp file went with the failed transfer


async def test_stalled_upload_names_the_operation(server: tuple[FakeResourceServer, int], tmp_path: Path) -> None:
    _, port = server
    local = tmp_path / "big.bin"
    with open(local, "wb") as file:
        file.truncate(64 * 1024 * 1024)  # sparse: more than the socket buffers hold
    message = await _stalled(port, "upload_file", "stalled", local)
    assert f"upload of {str(local)!r} to 'stalled'" in message


async def test_server_silent_after_an_upload_names_the_operation(
    server: tuple[FakeResourceServer, int], tmp_path: Path
) -> None:
    _, port = server
    (tmp_path / "in.bin").write_bytes(b"abc")
    message = await _stalled(port, "upload_file", "silent", tmp_path / "in.bin")
    assert "to 'silent'" in message


async def test_stalled_directory_download_names_the_operation(
    server: tuple[FakeResourceServer, int], tmp_path: Path
) -> None:
    _, port = server
    message = await _stalled(port, "download_directory", "stalled", tmp_path / "out")
    assert "download of directory 'stalled'" in message


async def test_stalled_directory_upload_names_the_operation(
    server: tuple[FakeResourceServer, int], tmp_path: Path
) -> None:
    _, port = server
    local = tmp_path / "tree"
    local.mkdir()
    with open(local / "big.bin", "wb") as file:
        file.truncate(64 * 1024 * 1024)
    message = await _stalled(port, "upload_directory", "stalled", local)
    assert "upload of directory" in message and "to 'stalled'" in message


async def test_silent_module_request_names_the_operation(server: tuple[FakeResourceServer, int]) -> None:
    _, port = server
    message = await _stalled(port, "get_module_sources", ["json"])
    assert "getting the sources of json" in message


@pytest.mark.parametrize("value", [0, -1.0])
def test_an_inactivity_timeout_must_be_positive_or_none(value: float) -> None:
    # aiohttp would take 0 for "no limit"; None says so explicitly.
    with pytest.raises(ValueError, match="inactivity_timeout"):
        ResourceClient(port=1, inactivity_timeout=value)
    assert ResourceClient(port=1, inactivity_timeout=None).inactivity_timeout is None
