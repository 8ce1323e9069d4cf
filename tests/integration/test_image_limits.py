"""Images against a real kernel: charged at their decoded size, never decoded past it, never an exception.

A PNG or JPEG whose header cannot be read, or whose decoded size does not fit the room left under
`max_output_bytes`, stays in `outputs` as a marked output (`truncated`, its text/plain a line saying
why) and is left out of `images`; `result()`, `stream()`, `events()` and `Output.image` never raise.
"""

from __future__ import annotations

import base64
import io
import struct
import zlib

from PIL import Image

from ipybox import Display, ExecutionClient

MIB = 2**20


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A PNG of a few dozen bytes whose header claims `width` x `height` RGB pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png(size: tuple[int, int] = (1, 1)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "red").save(buffer, format="PNG")
    return buffer.getvalue()


def show_image(raw: bytes, *, jpeg: bool = False) -> str:
    """A cell that displays `raw` with IPython's Image (which checks nothing)."""
    fmt = "jpeg" if jpeg else "png"
    return f"from IPython.display import Image, display\ndisplay(Image(data={raw!r}, format={fmt!r}))"


def show_raw(raw: bytes, mime: str = "image/png") -> str:
    """A cell that displays a raw MIME bundle with the base64 of `raw` under `mime`."""
    encoded = base64.b64encode(raw).decode()
    return f"from IPython.display import display\ndisplay({{{mime!r}: {encoded!r}, 'text/plain': '<img>'}}, raw=True)"


async def test_a_decompression_bomb_is_a_marked_dropped_output(client: ExecutionClient) -> None:
    bomb = bomb_png()
    assert len(bomb) < 100
    for code in (show_image(bomb), show_raw(bomb)):
        result = await client.execute(code + "\nprint('after')")
        assert result.images == []
        [output] = result.outputs
        assert output.truncated and output.mime_types == ["text/plain"]
        assert output.image is None and output.png is None
        assert output.text is not None and output.text.startswith("[image dropped: ")
        assert "20000x20000 PNG" in output.text
        assert result.text is not None and output.text in result.text and result.text.endswith("after")


async def test_a_bomb_does_not_break_stream_or_events(client: ExecutionClient) -> None:
    execution = await client.submit(show_image(bomb_png()))
    chunks = [chunk async for chunk in execution.stream()]
    assert any(chunk.startswith("[image dropped: ") for chunk in chunks)
    execution = await client.submit(show_image(bomb_png()))
    events = [event async for event in execution.events()]
    [display] = [event for event in events if isinstance(event, Display)]
    assert display.output.truncated and display.output.image is None
    assert (await execution.result()).images == []


async def test_an_image_is_charged_at_its_decoded_size(client: ExecutionClient) -> None:
    # 3000 x 3000 of one colour: a PNG of about 30 KB that decodes to 36 MB (RGB, 4 bytes a pixel in PIL).
    big = png((3000, 3000))
    assert len(big) < 100_000
    result = await client.execute(show_image(big), max_output_bytes=8 * MIB)
    assert result.images == [] and result.truncated
    assert result.dropped_bytes >= 3000 * 3000 * 3
    [output] = result.outputs
    assert output.truncated and output.text is not None
    assert "3000x3000 PNG" in output.text and "max_output_bytes=8388608" in output.text
    assert result.text is not None and output.text in result.text
    # The same image fits a cap that holds its decoded size, and decodes.
    result = await client.execute(show_image(big), max_output_bytes=64 * MIB)
    [image] = result.images
    assert image.size == (3000, 3000) and not result.truncated
    image.load()


async def test_undecodable_images_are_marked_dropped_outputs(client: ExecutionClient) -> None:
    whole = png((64, 64))
    for raw, mime in (
        (whole[: len(whole) // 2], "image/png"),  # truncated
        (b"not an image at all" * 10, "image/png"),  # garbage
        (b"GIF89a" + b"\0" * 40, "image/png"),  # another format under image/png
        (whole, "image/jpeg"),  # a PNG sent as JPEG
    ):
        result = await client.execute(show_raw(raw, mime))
        assert result.images == []
        [output] = result.outputs
        assert output.truncated and output.image is None
        assert output.text is not None and output.text.startswith("[image dropped: "), output.text
        assert not result.truncated  # nothing was dropped for lack of room


async def test_small_images_are_kept(client: ExecutionClient) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 4), "blue").save(buffer, format="JPEG")
    result = await client.execute(show_image(png()) + "\n" + show_image(buffer.getvalue(), jpeg=True).split("\n")[1])
    first, second = result.images
    assert (first.format, first.size) == ("PNG", (1, 1)) and (second.format, second.size) == ("JPEG", (8, 4))
    assert all(not output.truncated for output in result.outputs)
