"""Image headers read from base64 text without decoding, from crafted files: sizes, modes, what a decode
costs, and every kind of bad file refused with a reason, never with another exception."""

from __future__ import annotations

import base64
import io
import random
import struct
import zlib
from typing import Any

import pytest
from PIL import Image, PngImagePlugin

from ipybox._images import (
    PIXEL_BYTES,
    ImageHeader,
    TooManyPixels,
    UnreadableImage,
    format_bytes,
    open_image,
    read_header,
)
from ipybox.outputs import Output, decode_image, image_payloads

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


IEND = chunk(b"IEND", b"")


def crafted_png(
    width: int, height: int, depth: int = 8, colour: int = 2, pixel_data: bytes | None = None, *extra: bytes
) -> bytes:
    """A PNG with the given IHDR, optional chunks before IDAT, and pixel data (all-zero rows by default)."""
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    if pixel_data is None:
        pixel_data = b"\0" * 64
    return SIGNATURE + chunk(b"IHDR", header) + b"".join(extra) + chunk(b"IDAT", zlib.compress(pixel_data, 9))


def bomb() -> bytes:
    """69 bytes that claim 20000 x 20000 RGB pixels."""
    return crafted_png(20000, 20000) + chunk(b"IEND", b"")


def saved(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


# -- PNG ----------------------------------------------------------------------------------------------


def test_the_bomb_is_refused_from_its_header() -> None:
    raw = bomb()
    assert len(raw) < 100
    limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(TooManyPixels) as caught:
        read_header(b64(raw), "image/png")
    assert str(caught.value).startswith("20000x20000 PNG would decode to 1.5 GiB, more than PIL's limit")
    assert caught.value.standalone
    assert Image.MAX_IMAGE_PIXELS == limit  # read, never set


def test_without_pils_limit_the_bomb_is_charged_at_its_decoded_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    header = read_header(b64(bomb()), "image/png")
    assert header == ImageHeader("PNG", 20000, 20000, "RGB", len(bomb()), 20000 * 20000 * 4)


def test_pils_limit_is_honoured_as_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(TooManyPixels):
        read_header(b64(saved(Image.new("RGB", (20, 20)), "PNG")), "image/png")
    read_header(b64(saved(Image.new("RGB", (10, 20)), "PNG")), "image/png")  # 200 pixels: twice the limit


def test_a_one_pixel_png() -> None:
    raw = saved(Image.new("RGB", (1, 1), "red"), "PNG")
    assert read_header(b64(raw), "image/png") == ImageHeader("PNG", 1, 1, "RGB", len(raw), 4)


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "RGBA", "LA", "I;16"])
def test_png_modes_are_the_modes_pil_decodes_to(mode: str) -> None:
    raw = saved(Image.new(mode, (7, 5)), "PNG")
    header = read_header(b64(raw), "image/png")
    with Image.open(io.BytesIO(raw)) as image:
        assert (header.width, header.height, header.mode) == (*image.size, image.mode)
    assert header.decoded_bytes == 7 * 5 * PIXEL_BYTES[mode]


@pytest.mark.parametrize(("depth", "colour", "mode"), [(16, 2, "RGB"), (16, 6, "RGBA"), (16, 4, "RGBA"), (2, 0, "L")])
def test_png_bit_depths_pil_converts(depth: int, colour: int, mode: str) -> None:
    samples = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    row = b"\0" + b"\x10" * -(-3 * samples * depth // 8)
    raw = crafted_png(3, 2, depth, colour, row * 2) + chunk(b"IEND", b"")
    header = read_header(b64(raw), "image/png")
    with Image.open(io.BytesIO(raw)) as image:
        image.load()
        assert image.mode == header.mode == mode


def test_compressed_text_chunks_are_charged_as_pil_may_decompress_them() -> None:
    text = chunk(b"zTXt", b"key\0\0" + zlib.compress(b"a" * 100_000))
    plain = chunk(b"tEXt", b"key\0" + b"b" * 50)
    raw = crafted_png(4, 4, 8, 2, None, text, plain) + chunk(b"IEND", b"")
    header = read_header(b64(raw), "image/png")
    compressed = len(text) - 12
    assert header.decoded_bytes == 4 * 4 * 4 + min(compressed * 1032, PngImagePlugin.MAX_TEXT_CHUNK) + 54


def test_base64_with_line_breaks_and_nbformat_lines() -> None:
    raw = saved(Image.new("RGB", (30, 20)), "PNG")
    expected = read_header(b64(raw), "image/png")
    wrapped = base64.encodebytes(raw).decode()
    assert "\n" in wrapped
    assert read_header(wrapped, "image/png") == expected
    assert read_header(wrapped.splitlines(keepends=True), "image/png") == expected


@pytest.mark.parametrize(
    ("value", "mime", "reason"),
    [
        (b64(saved(Image.effect_noise((64, 64), 50), "PNG"))[:200], "image/png", "truncated"),
        (b64(crafted_png(4, 4)), "image/png", "truncated"),  # no IEND
        (b64(b"not an image at all" * 10), "image/png", "not a PNG"),
        (b64(b"GIF89a" + b"\0" * 40), "image/png", "not a PNG"),
        (b64(saved(Image.new("RGB", (4, 4)), "PNG")), "image/jpeg", "not a JPEG"),
        (b64(saved(Image.new("RGB", (4, 4)), "JPEG")), "image/png", "not a PNG"),
        ("!!!!", "image/png", "not base64"),
        ("abc", "image/png", "not base64"),
        ({"not": "text"}, "image/png", "not base64"),
        ("", "image/png", "not a PNG"),
        (b64(crafted_png(0, 5) + IEND), "image/png", "impossible PNG size"),
        (b64(crafted_png(5, 5, 8, 5) + IEND), "image/png", "unsupported PNG"),
        (b64(crafted_png(5, 5, 3, 2) + IEND), "image/png", "unsupported PNG"),
        (b64(SIGNATURE + chunk(b"IHDR", b"\0" * 13)[:-4] + b"xxxx" + IEND), "image/png", "checksum"),
        (b64(SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0)) + IEND), "image/png", "data"),
    ],
)  # fmt: skip
def test_unreadable_images_say_why(value: Any, mime: str, reason: str) -> None:
    with pytest.raises(UnreadableImage) as caught:
        read_header(value, mime)
    assert reason in str(caught.value)
    assert not caught.value.standalone


# -- JPEG ---------------------------------------------------------------------------------------------


def test_a_baseline_jpeg() -> None:
    raw = saved(Image.new("RGB", (8, 4), "blue"), "JPEG")
    assert read_header(b64(raw), "image/jpeg") == ImageHeader("JPEG", 8, 4, "RGB", len(raw), 8 * 4 * 4)


@pytest.mark.parametrize(("mode", "expected"), [("L", "L"), ("RGB", "RGB"), ("CMYK", "CMYK")])
def test_jpeg_modes(mode: str, expected: str) -> None:
    raw = saved(Image.new(mode, (33, 17)), "JPEG")
    header = read_header(b64(raw), "image/jpeg")
    with Image.open(io.BytesIO(raw)) as image:
        assert header.mode == image.mode == expected and (header.width, header.height) == image.size


def test_a_progressive_jpeg_is_charged_for_libjpegs_coefficients() -> None:
    image = Image.new("RGB", (100, 60), "green")
    baseline = read_header(b64(saved(image, "JPEG")), "image/jpeg")
    progressive = read_header(b64(saved(image, "JPEG", progressive=True)), "image/jpeg")
    assert baseline.decoded_bytes == 100 * 60 * 4
    # 4:2:0 sampling: MCUs of 16 x 16 pixels, 7 x 4 of them; Y 2 x 2 blocks each, Cb and Cr 1 each.
    assert progressive.decoded_bytes == 100 * 60 * 4 + 7 * 4 * 6 * 64 * 2


def test_a_truncated_jpeg() -> None:
    raw = saved(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")
    with pytest.raises(UnreadableImage, match="truncated"):
        read_header(b64(raw[: len(raw) - 100]), "image/jpeg")
    with pytest.raises(UnreadableImage, match="truncated"):
        read_header(b64(raw[:30]), "image/jpeg")


def test_a_lossless_jpeg_is_refused() -> None:
    raw = bytearray(saved(Image.new("L", (8, 8)), "JPEG"))
    position = raw.index(b"\xff\xc0")
    raw[position + 1] = 0xC3
    with pytest.raises(UnreadableImage, match="lossless"):
        read_header(b64(bytes(raw)), "image/jpeg")


# -- never anything but UnreadableImage ---------------------------------------------------------------


def test_mutated_files_never_raise_anything_else() -> None:
    rng = random.Random(12)
    sources = [
        (saved(Image.new("RGB", (40, 30), "red"), "PNG"), "image/png"),
        (saved(Image.new("P", (9, 9)), "PNG"), "image/png"),
        (saved(Image.effect_noise((40, 30), 40).convert("RGB"), "JPEG"), "image/jpeg"),
        (saved(Image.new("RGB", (40, 30)), "JPEG", progressive=True), "image/jpeg"),
    ]
    for raw, mime in sources:
        for _ in range(400):
            mutated = bytearray(raw)
            for _ in range(rng.randint(1, 4)):
                position = rng.randrange(min(len(mutated), 120))
                mutated[position] = rng.randrange(256)
            if rng.random() < 0.3:
                mutated = mutated[: rng.randrange(len(mutated))]
            value = b64(bytes(mutated))
            try:
                header = read_header(value, mime)
            except UnreadableImage:
                header = None
            output = Output({mime: value})
            image = decode_image(output)  # never raises
            if image is not None:
                assert header is not None and image.size == (header.width, header.height)


# -- opening ------------------------------------------------------------------------------------------


def test_open_refuses_a_header_pil_reads_otherwise() -> None:
    raw = saved(Image.new("RGB", (8, 4)), "PNG")
    header = read_header(b64(raw), "image/png")
    image = open_image(b64(raw), "image/png", header)
    assert image.size == (8, 4) and image.format == "PNG"
    claimed_smaller = ImageHeader("PNG", 4, 4, "RGB", header.encoded_bytes, 64)
    with pytest.raises(UnreadableImage, match="PIL reads 8x4 RGB"):
        open_image(b64(raw), "image/png", claimed_smaller)


def test_format_bytes() -> None:
    assert format_bytes(812) == "812 bytes"
    assert format_bytes(36 * 2**20) == "36.0 MiB"
    assert format_bytes(1_600_000_000) == "1.5 GiB"


# -- ipybox mcp ---------------------------------------------------------------------------------------


def test_images_are_passed_on_as_the_kernel_sent_them() -> None:
    # What `ipybox mcp` returns as MCP image content.
    png = b64(saved(Image.new("RGB", (3, 3)), "PNG"))
    jpeg = b64(saved(Image.new("RGB", (3, 3)), "JPEG"))
    wrapped = base64.encodebytes(saved(Image.new("L", (2, 2)), "PNG")).decode()
    outputs = [
        Output({"image/png": png, "image/jpeg": jpeg, "text/plain": "<both>"}),
        Output({"image/jpeg": jpeg}),
        Output({"image/png": b64(bomb())}),
        Output({"image/png": "garbage!"}),
        Output({"text/plain": "[image dropped: ...]"}, truncated=True),
        Output({"image/png": wrapped}),
    ]
    assert image_payloads(outputs) == [
        ("image/png", png),
        ("image/jpeg", jpeg),
        ("image/png", "".join(wrapped.split())),
    ]
