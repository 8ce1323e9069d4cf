"""`ipybox mcp` passes images on as the kernel sent them and survives images it cannot pass on."""

from __future__ import annotations

import base64
import io
from collections.abc import AsyncIterator

import pytest
from PIL import Image

from tests.integration.mcp_client import McpServer, force_remove, text_of, wait_containers_gone
from tests.integration.test_image_limits import bomb_png, show_image, show_raw


@pytest.fixture(scope="module")
async def server(image: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[McpServer]:
    server = McpServer(image, cwd=tmp_path_factory.mktemp("mcp-images"))
    try:
        async with server:
            yield server
        await wait_containers_gone(server.case, timeout=15)
    finally:
        await force_remove(server.case)


async def test_png_and_jpeg_come_back_byte_for_byte(server: McpServer) -> None:
    png, jpeg = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (5, 3), "red").save(png, format="PNG", compress_level=1)  # PIL would write level 6
    Image.new("RGB", (8, 4), "blue").save(jpeg, format="JPEG")
    code = show_image(png.getvalue()) + "\n" + show_image(jpeg.getvalue(), jpeg=True).split("\n")[1]
    result = await server.execute(code)
    assert not result.is_error, text_of(result)
    images = result.content[1:]
    assert [(item.type, item.mime_type) for item in images] == [("image", "image/png"), ("image", "image/jpeg")]
    assert [base64.b64decode(item.data) for item in images] == [png.getvalue(), jpeg.getvalue()]


async def test_a_bomb_is_a_line_of_text_not_an_error(server: McpServer) -> None:
    for code in (show_image(bomb_png()), show_raw(b"garbage" * 10)):
        result = await server.execute(code + "\nprint('still here')")
        assert not result.is_error, text_of(result)
        text = text_of(result)
        assert "[image dropped: " in text and text.endswith("still here")
        assert len(result.content) == 1
    assert "1 + 1 = 2" in text_of(await server.execute("print('1 + 1 =', 1 + 1)"))
