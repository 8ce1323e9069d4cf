"""What fuzzing the resource server found (tests/adversarial/test_fuzz_resource.py), each now a clear 4xx.

Run on the host against the app with a temporary directory as /app; the server package needs nothing but
aiohttp, so it is imported from the source tree.
"""

from __future__ import annotations

import io
import sys
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "ipybox" / "_image"))

from ipybox_server import paths, resource  # noqa: E402

AUTH = {"Authorization": "token secret"}
Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def http(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Client]:
    app_root = tmp_path / "app"
    app_root.mkdir()
    monkeypatch.setattr(paths, "APP_ROOT", app_root)
    async with TestClient(TestServer(resource.create_app("secret"))) as client:
        yield client


def tar(name: str, *, directory: bool = False, mtime: float = 0) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo(name)
        info.mtime = mtime
        info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
        archive.addfile(info, io.BytesIO(b""))
    return buffer.getvalue()


async def error(response: ClientResponse, status: int) -> str:
    assert response.status == status, await response.text()
    message: str = (await response.json())["error"]
    return message


async def test_a_newline_in_a_path_names_a_file_not_a_missing_route(http: Client) -> None:
    put = await http.put("/files/a%0Ab", data=b"x", headers=AUTH)
    assert put.status == 200
    got = await http.get("/files/a%0Ab", headers=AUTH)
    assert (got.status, await got.read()) == (200, b"x")


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
async def test_a_name_over_255_bytes_is_a_400(http: Client, method: str) -> None:
    response = await http.request(method, "/files/" + "n" * 256, data=b"x", headers=AUTH)
    assert "longer than 255 bytes" in await error(response, 400)
    directory = await http.get("/directories/d/" + "%C3%A9" * 128, headers=AUTH)
    assert "longer than 255 bytes" in await error(directory, 400)


async def test_a_path_over_path_max_is_a_400(http: Client) -> None:
    response = await http.get("/files/" + "/".join(["d" * 200] * 25), headers=AUTH)
    assert "is longer than 4095 bytes" in await error(response, 400)


async def test_a_name_of_255_bytes_can_be_uploaded(http: Client) -> None:
    # The temp file's name is cut to fit, not the target's.
    response = await http.put("/files/" + "n" * 255, data=b"x", headers=AUTH)
    assert response.status == 200
    assert (paths.APP_ROOT / ("n" * 255)).read_bytes() == b"x"


@pytest.mark.parametrize("method", ["GET", "DELETE"])
async def test_a_file_below_a_file_is_missing_not_a_server_error(http: Client, method: str) -> None:
    assert (await http.put("/files/plain", data=b"x", headers=AUTH)).status == 200
    response = await http.request(method, "/files/plain/sub", headers=AUTH)
    assert "a parent is not a directory" in await error(response, 404)


async def test_an_archive_member_name_over_255_bytes_is_a_400(http: Client) -> None:
    response = await http.put("/directories/d", data=tar("y" * 300, directory=True), headers=AUTH)
    assert "longer than 255 bytes" in await error(response, 400)
    assert not (paths.APP_ROOT / "d").exists()


async def test_an_archive_member_time_out_of_range_is_a_400(http: Client) -> None:
    response = await http.put("/directories/d", data=tar("m", mtime=2**64), headers=AUTH)
    assert "time is out of range" in await error(response, 400)
    assert not (paths.APP_ROOT / "d").exists()
