"""PNG and JPEG headers read from base64 text without decoding the image, and a decode bounded by them.

`read_header` walks a file's structure (PNG chunks, JPEG marker segments) straight from its base64
text, a few bytes at a time, and returns its size, the PIL mode a decode produces and the memory that
decode takes; or raises `UnreadableImage` saying why (not a PNG/JPEG, truncated, impossible fields,
more pixels than PIL accepts). `open_image` hands PIL only what `read_header` accepted, and only keeps
the PIL image when PIL reads the same size and mode: its later `load()` takes at most `decoded_bytes`.
Nothing here changes PIL's global settings (`Image.MAX_IMAGE_PIXELS` is read, never set).
"""

from __future__ import annotations

import binascii
import io
import struct
import zlib
from dataclasses import dataclass

from PIL import Image, PngImagePlugin

PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "LA": 4, "RGB": 4, "RGBA": 4, "CMYK": 4}
"""Bytes per pixel of each mode a PNG or JPEG decodes to, as PIL stores it (multi-band modes take 4)."""

# PIL's PngImagePlugin._MODES: (bit depth, colour type) -> the mode a decode produces.
_PNG_MODES = {
    (1, 0): "1",
    (2, 0): "L",
    (4, 0): "L",
    (8, 0): "L",
    (16, 0): "I;16",
    (8, 2): "RGB",
    (16, 2): "RGB",
    (1, 3): "P",
    (2, 3): "P",
    (4, 3): "P",
    (8, 3): "P",
    (8, 4): "LA",
    (16, 4): "RGBA",
    (8, 6): "RGBA",
    (16, 6): "RGBA",
}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_MAX_CHUNKS = 65_536
"""More chunks than this is no image an encoder writes; walking them would only cost time."""
_ZLIB_RATIO = 1032
"""The most zlib can expand its input (deflate's limit), bounding a compressed text chunk."""

_JPEG_COMPONENT_MODES = {1: "L", 3: "RGB", 4: "CMYK"}
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # DHT, JPG and DAC share the range
_JPEG_DECODABLE = frozenset({0xC0, 0xC1, 0xC2, 0xC9, 0xCA})  # sequential and progressive DCT, not lossless
_JPEG_PROGRESSIVE = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0-7: no length
_JPEG_MAX_SEGMENTS = 65_536
_JPEG_EOI_WINDOW = 65536
"""A complete JPEG has its end-of-image marker within this many bytes of its end (trailers are short)."""


class UnreadableImage(ValueError):
    """An image whose header cannot be read or that PIL would refuse; `str()` says why."""

    standalone = False
    """The message names the image itself (size and format), not only what is wrong with it."""


class TooManyPixels(UnreadableImage):
    """More pixels than PIL decodes (twice `PIL.Image.MAX_IMAGE_PIXELS`): a decompression bomb."""

    standalone = True


@dataclass(frozen=True)
class ImageHeader:
    """What a PNG or JPEG is and costs, read from its header and structure without decoding it.

    Attributes:
        format: "PNG" or "JPEG".
        width: Pixels.
        height: Pixels.
        mode: The PIL mode a decode produces ("RGB", "RGBA", "L", "P", ...).
        encoded_bytes: The size of the file (the base64 text decoded).
        decoded_bytes: Memory a full decode takes: width x height x the bytes PIL stores a pixel of
            `mode` in, plus what PIL or libjpeg hold besides (the decompressed text chunks of a PNG,
            bounded; the coefficient buffer of a progressive or multi-scan JPEG).
    """

    format: str
    width: int
    height: int
    mode: str
    encoded_bytes: int
    decoded_bytes: int

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def describe(self) -> str:
        """E.g. "3000x2000 PNG"."""
        return f"{self.width}x{self.height} {self.format}"


def format_bytes(size: int) -> str:
    """A byte count for people: "812 bytes", "34.3 MiB", "1.5 GiB"."""
    if size < 1024:
        return f"{size} bytes"
    value, unit = size / 1024, "KiB"
    for larger in ("MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, larger
    return f"{value:.1f} {unit}"


def joined_base64(value: object) -> str | None:
    """The base64 text of a MIME value (a string, or nbformat's list of lines), without whitespace;
    None for any other value. A copy is made only when the text has line breaks or spaces."""
    if isinstance(value, list) and all(isinstance(line, str) for line in value):
        value = "".join(value)
    if not isinstance(value, str):
        return None
    if any(space in value for space in (" ", "\n", "\r", "\t")):
        return "".join(value.split())
    return value


class _Base64Bytes:
    """Random access to the bytes that base64 text (without whitespace) encodes: a read decodes only
    the groups of four characters it covers."""

    def __init__(self, text: str) -> None:
        if len(text) % 4 or not text.isascii():
            raise UnreadableImage("not base64 text")
        self._text = text
        padding = 0 if not text else 2 if text.endswith("==") else 1 if text.endswith("=") else 0
        self.size = len(text) // 4 * 3 - padding

    def read(self, offset: int, count: int) -> bytes:
        """Up to `count` bytes at `offset` (fewer at the end)."""
        end = min(offset + count, self.size)
        if offset >= end:
            return b""
        first, last = offset // 3, (end + 2) // 3
        try:
            raw = binascii.a2b_base64(self._text[4 * first : 4 * last], strict_mode=True)
        except (binascii.Error, ValueError) as exc:
            raise UnreadableImage("not base64 text") from exc
        start = offset - 3 * first
        return raw[start : start + end - offset]

    def exactly(self, offset: int, count: int, what: str) -> bytes:
        data = self.read(offset, count)
        if len(data) < count:
            raise UnreadableImage(f"truncated ({what} cut off at byte {self.size:,})")
        return data


def read_header(value: object, mime_type: str) -> ImageHeader:
    """The header of the image/png or image/jpeg `value` (base64 text, as in a MIME bundle).

    Reads a few bytes per PNG chunk or JPEG segment, never the pixel data: bounded memory and time
    whatever the image claims. Raises `UnreadableImage` when the value is not base64 text of an image
    of that type, the file is truncated or impossible, or PIL would refuse it (more than twice
    `PIL.Image.MAX_IMAGE_PIXELS`, PIL's decompression-bomb limit, when that is set).
    """
    text = joined_base64(value)
    if text is None:
        raise UnreadableImage("not base64 text")
    source = _Base64Bytes(text)
    try:
        if mime_type == "image/png":
            header = _png_header(source)
        elif mime_type == "image/jpeg":
            header = _jpeg_header(source)
        else:
            raise UnreadableImage(f"{mime_type} is not read here")
    except (IndexError, struct.error, OverflowError) as exc:  # a file no check above foresaw
        raise UnreadableImage(f"corrupt image ({exc})") from exc
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and header.pixels > 2 * limit:
        raise TooManyPixels(
            f"{header.describe()} would decode to {format_bytes(header.decoded_bytes)}, more than PIL's "
            f"limit of {2 * limit:,} pixels (a decompression bomb)"
        )
    return header


def _png_header(source: _Base64Bytes) -> ImageHeader:
    if source.read(0, 8) != _PNG_SIGNATURE:
        raise UnreadableImage("not a PNG (no PNG signature)")
    ihdr = source.exactly(8, 25, "IHDR chunk")
    length, kind = struct.unpack(">I4s", ihdr[:8])
    if kind != b"IHDR" or length != 13:
        raise UnreadableImage("not a PNG (no IHDR chunk first)")
    if zlib.crc32(ihdr[4:21]) != struct.unpack(">I", ihdr[21:25])[0]:
        raise UnreadableImage("corrupt PNG (IHDR checksum)")
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", ihdr[8:21])
    if not (0 < width < 2**31 and 0 < height < 2**31):
        raise UnreadableImage(f"impossible PNG size {width}x{height}")
    mode = _PNG_MODES.get((depth, colour))
    if mode is None or compression or filtering or interlace > 1:
        raise UnreadableImage(f"unsupported PNG (bit depth {depth}, colour type {colour})")
    extra = _png_walk(source)
    decoded = width * height * PIXEL_BYTES[mode] + extra
    return ImageHeader("PNG", width, height, mode, source.size, decoded)


def _png_walk(source: _Base64Bytes) -> int:
    """Walk every chunk to IEND (checking that the file is whole and has image data); returns the
    memory PIL may take for its text chunks once decompressed, bounded as PIL bounds it."""
    text_memory = 0
    image_data = False
    position = 8
    for _ in range(_PNG_MAX_CHUNKS):
        head = source.exactly(position, 8, "a chunk header")
        length, kind = struct.unpack(">I4s", head)
        if length >= 2**31:
            raise UnreadableImage("corrupt PNG (chunk length)")
        if position + 12 + length > source.size:
            raise UnreadableImage(f"truncated ({kind.decode('latin-1')!r} chunk cut off at byte {source.size:,})")
        if kind in (b"IDAT", b"fdAT"):
            image_data = True
        elif kind == b"tEXt":
            text_memory += length
        elif kind in (b"zTXt", b"iCCP") or (kind == b"iTXt" and _itxt_compressed(source, position + 8, length)):
            text_memory += min(length * _ZLIB_RATIO, PngImagePlugin.MAX_TEXT_CHUNK)
        elif kind == b"IEND":
            if not image_data:
                raise UnreadableImage("corrupt PNG (no image data)")
            return min(text_memory, PngImagePlugin.MAX_TEXT_MEMORY + PngImagePlugin.MAX_TEXT_CHUNK)
        position += 12 + length
    raise UnreadableImage(f"corrupt PNG (more than {_PNG_MAX_CHUNKS:,} chunks)")


def _itxt_compressed(source: _Base64Bytes, start: int, length: int) -> bool:
    # keyword (1-79 bytes), NUL, compression flag, ...
    head = source.read(start, min(length, 81))
    keyword_end = head.find(b"\0")
    return keyword_end < 0 or keyword_end + 1 >= len(head) or head[keyword_end + 1] != 0


def _jpeg_header(source: _Base64Bytes) -> ImageHeader:
    if source.read(0, 3) != b"\xff\xd8\xff":
        raise UnreadableImage("not a JPEG (no start-of-image marker)")
    frame: tuple[int, int, int, list[tuple[int, int]]] | None = None  # marker, width, height, sampling
    position = 2
    for _ in range(_JPEG_MAX_SEGMENTS):
        prefix = source.exactly(position, 2, "a marker")
        if prefix[0] != 0xFF:
            raise UnreadableImage("corrupt JPEG (no marker where one belongs)")
        marker = prefix[1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _JPEG_STANDALONE:
            position += 2
            continue
        if marker in (0xD8, 0xD9, 0x00):
            raise UnreadableImage("corrupt JPEG (no image before its end)")
        length = struct.unpack(">H", source.exactly(position + 2, 2, "a segment"))[0]
        if length < 2 or position + 2 + length > source.size:
            raise UnreadableImage(f"truncated (a segment cut off at byte {source.size:,})")
        if marker in _JPEG_SOF:
            frame = _jpeg_frame(source.exactly(position + 4, length - 2, "the frame header"), marker)
        elif marker == 0xDA:  # start of scan: the header is complete
            if frame is None:
                raise UnreadableImage("corrupt JPEG (a scan before the frame header)")
            components = source.exactly(position + 4, 1, "the scan header")[0]
            return _jpeg_result(source, frame, components)
        position += 2 + length
    raise UnreadableImage(f"corrupt JPEG (more than {_JPEG_MAX_SEGMENTS:,} segments)")


def _jpeg_frame(segment: bytes, marker: int) -> tuple[int, int, int, list[tuple[int, int]]]:
    if len(segment) < 6:
        raise UnreadableImage("corrupt JPEG (short frame header)")
    precision, height, width, count = struct.unpack(">BHHB", segment[:6])
    if marker not in _JPEG_DECODABLE:
        raise UnreadableImage(f"unsupported JPEG (lossless or hierarchical, marker 0x{marker:02X})")
    if precision != 8:
        raise UnreadableImage(f"unsupported JPEG ({precision}-bit samples)")
    if count not in _JPEG_COMPONENT_MODES:
        raise UnreadableImage(f"unsupported JPEG ({count} components)")
    if not width or not height:
        raise UnreadableImage(f"unsupported JPEG (size {width}x{height})")
    if len(segment) < 6 + 3 * count:
        raise UnreadableImage("corrupt JPEG (short frame header)")
    sampling = []
    for index in range(count):
        factors = segment[6 + 3 * index + 1]
        horizontal, vertical = factors >> 4, factors & 15
        if not (1 <= horizontal <= 4 and 1 <= vertical <= 4):
            raise UnreadableImage("corrupt JPEG (sampling factors)")
        sampling.append((horizontal, vertical))
    return marker, width, height, sampling


def _jpeg_result(
    source: _Base64Bytes, frame: tuple[int, int, int, list[tuple[int, int]]], scan_components: int
) -> ImageHeader:
    marker, width, height, sampling = frame
    tail_start = max(0, source.size - _JPEG_EOI_WINDOW)
    if b"\xff\xd9" not in source.read(tail_start, source.size - tail_start):
        raise UnreadableImage(f"truncated (no end-of-image marker in the last {_JPEG_EOI_WINDOW:,} bytes)")
    mode = _JPEG_COMPONENT_MODES[len(sampling)]
    decoded = width * height * PIXEL_BYTES[mode]
    if marker in _JPEG_PROGRESSIVE or scan_components < len(sampling):
        # libjpeg keeps every DCT coefficient of the image (2 bytes each) until the last scan.
        decoded += _jpeg_coefficient_bytes(width, height, sampling)
    return ImageHeader("JPEG", width, height, mode, source.size, decoded)


def _jpeg_coefficient_bytes(width: int, height: int, sampling: list[tuple[int, int]]) -> int:
    max_h = max(h for h, _ in sampling)
    max_v = max(v for _, v in sampling)
    mcu_columns = -(-width // (8 * max_h))
    mcu_rows = -(-height // (8 * max_v))
    return sum(mcu_columns * h * mcu_rows * v * 64 * 2 for h, v in sampling)


def open_image(value: object, mime_type: str, header: ImageHeader) -> Image.Image:
    """The image `header` was read from, opened (lazily) by PIL, restricted to its format.

    Raises `UnreadableImage` when PIL fails or refuses it, or reads another size or mode than
    `header` (then a decode could take more than `header.decoded_bytes`). The returned image holds
    the encoded bytes; its `load()` decodes.
    """
    text = joined_base64(value)
    if text is None:
        raise UnreadableImage("not base64 text")
    try:
        raw = binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        raise UnreadableImage("not base64 text") from exc
    formats = ["PNG"] if mime_type == "image/png" else ["JPEG"]
    try:
        image = Image.open(io.BytesIO(raw), formats=formats)
    except Exception as exc:  # PIL raises many kinds (OSError, SyntaxError, ValueError, bomb errors...)
        raise UnreadableImage(f"PIL cannot open it: {exc}") from exc
    if image.size != (header.width, header.height) or image.mode != header.mode:
        found = f"{image.size[0]}x{image.size[1]} {image.mode}"
        raise UnreadableImage(f"PIL reads {found}, the header {header.describe()} {header.mode}")
    return image
