"""Rich outputs on their own: MIME bundle accessors, the output area's rules, nbformat rendering, what
a bundle is charged, the marked output of a dropped image, and the text log's strings."""

from __future__ import annotations

import base64
import io
import json
import random
import struct
import time
import tracemalloc
import zlib
from typing import Any

import nbformat
import pytest
from PIL import Image

from ipybox._images import format_bytes
from ipybox.outputs import (
    Clear,
    Display,
    Error,
    ErrorInfo,
    Output,
    OutputArea,
    Result,
    Stderr,
    Stdout,
    TextLog,
    apply_carriage_returns,
    bundle_charge,
    decode_image,
    dropped_image_output,
    error_info,
    output_from_content,
)


def encoded_image(fmt: str, size: tuple[int, int] = (4, 3)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, "red").save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def display(data: dict[str, Any], display_id: str | None = None, **metadata: Any) -> dict[str, Any]:
    content: dict[str, Any] = {"data": data, "metadata": metadata}
    if display_id is not None:
        content["transient"] = {"display_id": display_id}
    return content


def test_accessors() -> None:
    output = Output(
        {
            "text/plain": "\x1b[1mplain\x1b[0m",
            "text/html": ["<b>", "html</b>"],
            "text/markdown": "# md",
            "text/latex": "$x^2$",
            "image/svg+xml": "<svg/>",
            "application/json": {"a": 1},
            "application/vnd.custom": [1, 2],
        }
    )
    assert output.text == "plain"
    assert output.html == "<b>html</b>"
    assert output.markdown == "# md" and output.latex == "$x^2$" and output.svg == "<svg/>"
    assert output.json == {"a": 1}
    assert output.get("application/vnd.custom") == [1, 2] and output.get("x/y", 0) == 0
    assert "text/latex" in output and "image/png" not in output
    assert output.mime_types[0] == "text/plain"
    assert output.png is None and output.jpeg is None and output.image is None
    assert Output({"application/json": '{"b": 2}'}).json == {"b": 2}
    assert Output({"application/json": "not json"}).json == "not json"
    assert Output({}).text is None and Output({}).json is None


@pytest.mark.parametrize(("mime", "fmt"), [("image/png", "PNG"), ("image/jpeg", "JPEG")])
def test_images_decode(mime: str, fmt: str) -> None:
    output = Output({mime: encoded_image(fmt), "text/plain": "<Image>"})
    raw = output.png if fmt == "PNG" else output.jpeg
    assert raw is not None and len(raw) > 0
    image = output.image
    assert image is not None and image.format == fmt and image.size == (4, 3)
    both = Output({"image/jpeg": encoded_image("JPEG"), "image/png": encoded_image("PNG", (1, 1))})
    assert both.image is not None and both.image.format == "PNG"


def test_undecodable_images_are_none_not_errors() -> None:
    assert decode_image(Output({"image/png": "aGVsbG8="})) is None  # valid base64, not a PNG
    assert decode_image(Output({"image/png": "%%%"})) is None
    assert decode_image(Output({"image/jpeg": {"not": "base64"}})) is None
    output = Output({"image/png": "abc", "image/jpeg": "a"})  # not base64: incorrect padding
    assert output.png is None and output.jpeg is None and output.image is None


def bomb_png(width: int = 20000, height: int = 20000) -> str:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    raw = (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
    return base64.b64encode(raw).decode()


def test_a_decompression_bomb_is_none_from_every_accessor() -> None:
    limit = Image.MAX_IMAGE_PIXELS
    output = Output({"image/png": bomb_png(), "text/plain": "<Image>"})
    assert output.image is None and decode_image(output) is None
    assert output.png is not None and len(output.png) < 100  # the bytes themselves are harmless
    assert Image.MAX_IMAGE_PIXELS == limit


def test_decode_image_never_opens_more_than_allowed() -> None:
    output = Output({"image/png": encoded_image("PNG", (100, 10))})  # RGB: 4 bytes a pixel in PIL
    assert decode_image(output, max_decoded_bytes=3999) is None
    image = decode_image(output, max_decoded_bytes=4000)
    assert image is not None and image.size == (100, 10)
    image.load()


# -- what a bundle is charged -----------------------------------------------------------------------


def old_bundle_size(output: Output) -> int:
    """The charge of bundles without images, as the router had it."""
    size = 0
    for mime, value in output.data.items():
        if mime == "text/plain" and isinstance(value, str):
            size += len(value.encode()) + (0 if value.endswith("\n") else 1)
        elif isinstance(value, str):
            size += len(mime) + len(value.encode())
        else:
            size += len(mime) + len(json.dumps(value, separators=(",", ":"), default=str))
    if output.metadata:
        size += len(json.dumps(output.metadata, separators=(",", ":"), default=str))
    return size


SHARED = [1, "two"]


def test_bundles_without_images_are_charged_as_before() -> None:
    bundles = [
        Output({"text/plain": "héllo"}),
        Output({"text/plain": "x\n", "text/html": "<b>é</b>"}, metadata={"a": [1, 2.5, None]}),
        Output({"application/json": {"k": ['v\n"é😀\x01', 1, True, None, {"n": {}}]}, "text/plain": "{}"}),
        Output({"application/vnd.odd": [float("inf"), (1, 2)], "x/set": {"s": {3}}, "x/int-keys": {1: 2}}),
        Output({"text/plain": 42}),
        Output({"application/json": "é" * 300_000 + "a" * 300_000}),
        Output({"application/json": [[i, {"k": str(i)}] for i in range(60_000)]}),  # sized by json.dumps
        Output({"application/json": [SHARED, {"a": SHARED}]}),
    ]
    for output in bundles:
        charge = bundle_charge(output)
        assert charge.size == old_bundle_size(output)
        assert charge.images == () and charge.unreadable is None and not charge.has_image


def test_a_long_json_string_is_sized_without_a_copy() -> None:
    output = Output({"application/json": {"a": "x" * (8 << 20)}, "text/plain": "{}"})
    tracemalloc.start()
    try:
        charge = bundle_charge(output)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert charge.size == old_bundle_size(output)
    assert peak < 1 << 20  # json.dumps held two copies: 16 MiB


def test_an_image_is_charged_decoded_plus_its_base64_and_encoded_bytes() -> None:
    encoded = encoded_image("PNG", (300, 200))
    output = Output({"image/png": encoded, "text/plain": "<Image>"}, metadata={"image/png": {"width": 300}})
    charge = bundle_charge(output)
    [(mime, header)] = charge.images
    assert mime == "image/png" and header.describe() == "300x200 PNG" and header.mode == "RGB"
    raw = base64.b64decode(encoded)
    metadata = len(json.dumps(output.metadata, separators=(",", ":")))
    assert charge.size == len("<Image>\n") + len(encoded) + len(raw) + 300 * 200 * 4 + metadata
    assert charge.unreadable is None and charge.has_image


def test_only_the_image_images_gets_is_charged_decoded() -> None:
    png, jpeg = encoded_image("PNG", (300, 200)), encoded_image("JPEG", (300, 200))
    charge = bundle_charge(Output({"image/jpeg": jpeg, "image/png": png}))
    assert [mime for mime, _ in charge.images] == ["image/png", "image/jpeg"]  # PNG first, as `images`
    assert charge.size == len(png) + len(base64.b64decode(png)) + 300 * 200 * 4 + len(jpeg)


def test_a_bundle_with_an_unreadable_image_says_why() -> None:
    charge = bundle_charge(Output({"image/png": bomb_png(), "text/plain": "<Image>"}))
    assert charge.unreadable is not None and charge.has_image and charge.images == ()
    assert charge.unreadable.startswith("20000x20000 PNG would decode to 1.5 GiB, more than PIL's limit of ")
    charge = bundle_charge(Output({"image/jpeg": encoded_image("PNG")}))
    assert charge.unreadable == "image/jpeg cannot be decoded: not a JPEG (no start-of-image marker)"
    both = bundle_charge(Output({"image/png": encoded_image("PNG"), "image/jpeg": "%%%%"}))
    assert both.unreadable is not None and len(both.images) == 1  # one bad image spoils the bundle


def test_the_marked_output_of_a_dropped_image() -> None:
    output = Output(
        {"image/png": encoded_image("PNG", (3000, 2)), "text/plain": "<Image>"},
        metadata={"image/png": {"width": 3000}},
        kind="execute_result",
        display_id="d1",
        execution_count=7,
    )
    marked = dropped_image_output(output, bundle_charge(output), cap=8388608, room=1 << 20)
    needed = format_bytes(bundle_charge(output).size)
    assert marked.text == (
        f"[image dropped: 3000x2 PNG would decode to 23.4 KiB; with its encoded data it needs {needed}, "
        "past max_output_bytes=8388608 (1.0 MiB left)]"
    )
    assert marked.mime_types == ["text/plain"] and marked.metadata == {} and marked.truncated
    assert (marked.kind, marked.display_id, marked.execution_count) == ("execute_result", "d1", 7)
    assert marked.image is None
    bad = Output({"image/png": "aGVsbG8=", "text/plain": "<Image>"})
    marked = dropped_image_output(bad, bundle_charge(bad), cap=None, room=None)
    assert marked.text == "[image dropped: image/png cannot be decoded: not a PNG (no PNG signature)]"
    assert marked.kind == "display_data" and marked.truncated


def test_output_from_content() -> None:
    output = output_from_content(
        {"data": {"text/plain": "\x1b[31m42\x1b[0m"}, "metadata": {"k": 1}, "execution_count": 3}, "execute_result"
    )
    assert output == Output({"text/plain": "42"}, {"k": 1}, "execute_result", None, 3)
    update = output_from_content(display({"text/plain": "x"}, "abc"), "update_display_data")
    assert update.kind == "display_data" and update.display_id == "abc"


def test_error_info_is_free_of_escapes() -> None:
    info = error_info({"ename": "\x1b[31mValueError", "evalue": "bad", "traceback": ["\x1b[0;31mline 1", "line 2"]})
    assert info == ErrorInfo("ValueError", "bad", "line 1\nline 2")
    assert info.to_nbformat() == {
        "output_type": "error",
        "ename": "ValueError",
        "evalue": "bad",
        "traceback": ["line 1", "line 2"],
    }


def test_events_per_message() -> None:
    area = OutputArea()
    assert area.add("stream", {"name": "stdout", "text": "a"}) == Stdout("a")
    assert area.add("stream", {"name": "stderr", "text": "\x1b[31mb"}) == Stderr("b")
    assert isinstance(area.add("display_data", display({"text/plain": "d"})), Display)
    result = area.add("execute_result", {"data": {"text/plain": "r"}, "metadata": {}, "execution_count": 1})
    assert isinstance(result, Result) and result.output.execution_count == 1
    assert area.add("error", {"ename": "E", "evalue": "v", "traceback": []}) == Error(ErrorInfo("E", "v", ""))
    assert area.add("clear_output", {"wait": True}) == Clear(wait=True)
    assert area.add("status", {"execution_state": "idle"}) is None


def test_consecutive_stream_text_is_merged_per_stream() -> None:
    area = OutputArea()
    for name, text in [("stdout", "a"), ("stdout", "b\n"), ("stderr", "e\n"), ("stdout", "c")]:
        area.stream(name, text)
    assert area.nbformat() == [
        {"output_type": "stream", "name": "stdout", "text": "ab\n"},
        {"output_type": "stream", "name": "stderr", "text": "e\n"},
        {"output_type": "stream", "name": "stdout", "text": "c"},
    ]


def test_update_replaces_every_output_with_the_display_id_without_changing_handed_out_outputs() -> None:
    area = OutputArea()
    first = area.add("display_data", display({"text/plain": "old"}, "d1"))
    area.add("display_data", display({"text/plain": "other"}, "d2"))
    area.add("display_data", display({"text/plain": "old again"}, "d1"))
    event = area.add("update_display_data", display({"text/plain": "new"}, "d1"))
    assert isinstance(event, Display) and event.update and event.output.display_id == "d1"
    assert [output.text for output in area.outputs] == ["new", "other", "new"]
    assert isinstance(first, Display) and first.output.text == "old"
    assert not area.update(Output({"text/plain": "x"}, display_id="unknown"))
    assert not area.update(Output({"text/plain": "x"}))


def test_clear_output_at_once_and_with_wait() -> None:
    area = OutputArea()
    area.stream("stdout", "1\n")
    area.add("display_data", display({"text/plain": "shown"}))
    area.clear()
    assert area.nbformat() == []
    area.stream("stdout", "2\n")
    area.clear(wait=True)
    assert len(area.nbformat()) == 1  # still shown until the next output
    area.stream("stdout", "3\n")
    assert area.nbformat() == [{"output_type": "stream", "name": "stdout", "text": "3\n"}]


def test_an_update_does_not_trigger_a_pending_clear() -> None:
    area = OutputArea()
    area.add("display_data", display({"text/plain": "0%"}, "bar"))
    area.clear(wait=True)
    area.add("update_display_data", display({"text/plain": "50%"}, "bar"))
    assert [output.text for output in area.outputs] == ["50%"]
    area.add("display_data", display({"text/plain": "done"}))
    assert [output.text for output in area.outputs] == ["done"]
    area.clear(wait=True)
    area.clear(wait=False)
    area.stream("stdout", "x")
    assert area.nbformat() == [{"output_type": "stream", "name": "stdout", "text": "x"}]


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain\n", "plain\n"),
        ("10%\r20%\r30%\n", "30%\n"),
        ("long line\rshort\n", "shortline\n"),
        ("a\r\nb\r\n", "a\nb\n"),
        ("x\r\r\ny", "x\ny"),
        ("done\r", "done\r"),
        ("first\nabc\rd", "first\ndbc"),
    ],
)
def test_carriage_returns_overwrite_as_in_a_terminal(text: str, shown: str) -> None:
    assert apply_carriage_returns(text) == shown


def test_carriage_returns_take_linear_time_on_hostile_text() -> None:
    text = "x" * 2_000_000 + "\ra" * 1_000_000
    start = time.monotonic()
    shown = apply_carriage_returns(text)
    assert time.monotonic() - start < 2
    assert shown == "a" + "x" * 1_999_999


def test_streams_render_with_carriage_returns_applied() -> None:
    area = OutputArea()
    for step in range(5):
        area.stream("stderr", f"\r{step * 25}%")
    area.stream("stderr", "\n")
    assert area.nbformat()[0]["text"] == "100%\n"


def test_nbformat_rendering_is_a_valid_notebook() -> None:
    area = OutputArea()
    area.stream("stdout", "hello\n")
    area.add("display_data", display({"image/png": encoded_image("PNG"), "text/plain": "<Figure>"}, width=4))
    area.add("display_data", display({"application/json": {"a": [1, None]}, "text/plain": "{}"}))
    area.add("display_data", {"data": {"text/plain": 42, "application/x-odd": {"k": 1}}, "metadata": {}})
    truncated = Output({"text/plain": "head"}, kind="display_data", truncated=True)
    area.show(truncated)
    area.add(
        "execute_result",
        {"data": {"text/html": "<table/>", "text/plain": "df"}, "metadata": {}, "execution_count": 2},
    )
    area.add("error", {"ename": "ValueError", "evalue": "bad", "traceback": ["Traceback", "ValueError: bad"]})
    cell = nbformat.v4.new_code_cell("print('hello')", execution_count=2, outputs=nbformat.from_dict(area.nbformat()))
    notebook = nbformat.v4.new_notebook(cells=[cell])
    nbformat.validate(notebook)
    again = nbformat.reads(nbformat.writes(notebook), as_version=4)
    outputs = again.cells[0].outputs
    assert [output.output_type for output in outputs] == [
        "stream",
        "display_data",
        "display_data",
        "display_data",
        "display_data",
        "execute_result",
        "error",
    ]
    assert outputs[1].metadata == {"width": 4}
    assert outputs[3].data == {"text/plain": "42", "application/x-odd": '{"k": 1}'}
    assert outputs[4].metadata == {"ipybox": {"truncated": True}}
    assert outputs[5].execution_count == 2


# -- the text log -----------------------------------------------------------------------------------


def naive_strings(entries: list[tuple[str | None, str]], suffix: str) -> tuple[str, str, str]:
    """text, stdout and stderr as the executor joined them before the text log."""
    text = "".join(text for _, text in entries).strip()
    text = (text + "\n" + suffix if text else suffix) if suffix else text
    stdout = "".join(text for key, text in entries if key is not None and key != "stderr")
    stderr = "".join(text for key, text in entries if key == "stderr")
    return text, stdout, stderr


def test_the_text_log_gives_the_strings_the_executor_gave() -> None:
    rng = random.Random(5)
    alphabet = ["a", "b", " ", "\n", "\t", "\x1c", "\u3000", "é", "😀", "\r"]
    for _ in range(400):
        entries: list[tuple[str | None, str]] = []
        for _ in range(rng.randrange(8)):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 6)))
            entries.append((rng.choice(["stdout", "stderr", "other", None]), text))
        suffix = rng.choice(["", "[output truncated: 12 bytes dropped past max_output_bytes=100]"])
        log = TextLog()
        for name, text in entries:
            if name is None:
                log.output(text)
            else:
                log.stream(name, text)
        assert log.strings(suffix) == naive_strings(entries, suffix), entries


def test_the_text_log_handles_pieces_longer_than_a_batch() -> None:
    big = "x" * (3 << 18) + " " * 5000
    entries = [("stdout", "  \n"), ("stderr", big), ("stdout", big), (None, "y\n"), ("stdout", " \n" * 3000)]
    log = TextLog()
    for name, text in entries:
        log.output(text) if name is None else log.stream(name, text)
    assert log.strings("end") == naive_strings(entries, "end")


def test_the_text_log_returns_the_same_strings_again_and_takes_more_text() -> None:
    log = TextLog()
    log.stream("stdout", "a\n")
    log.stream("stderr", "b\n")
    first = log.strings()
    assert log.strings() == first and all(x is y for x, y in zip(log.strings(), first, strict=True))
    assert log.strings("marker")[0] == "a\nb\nmarker"
    log.stream("stdout", "c\n")  # only code that feeds a finished log does this
    assert log.strings() == ("a\nb\nc", "a\nc\n", "b\n")


def test_the_output_area_is_rendered_the_same_from_the_log_s_strings() -> None:
    area, log = OutputArea(), TextLog()
    for name, text in [("stdout", "1\r2\n"), ("stdout", "3\n"), ("stderr", "warn\n"), ("stdout", "4\n")]:
        area.stream(name, text)
        log.stream(name, text)
    area.show(Output({"text/plain": "out"}))
    area.clear(wait=True)
    for name, text in [("stdout", "5\n"), ("other", "6\n"), ("stdout", "7")]:
        area.stream(name, text)
        log.stream(name, text)
    before = area.nbformat()
    log.strings("", area)
    assert (
        area.nbformat()
        == before
        == [
            {"output_type": "stream", "name": "stdout", "text": "5\n"},
            {"output_type": "stream", "name": "other", "text": "6\n"},
            {"output_type": "stream", "name": "stdout", "text": "7"},
        ]
    )
    area.stream("stdout", "8")  # a compacted stream still takes more text
    assert area.nbformat()[-1]["text"] == "78"


def test_a_source_of_another_length_is_not_used() -> None:
    area = OutputArea()
    area.stream("stdout", "abc")
    area.compact_streams({"stdout": "abcd"})
    assert area.nbformat() == [{"output_type": "stream", "name": "stdout", "text": "abc"}]


def test_the_text_log_keeps_at_most_two_copies_of_the_text() -> None:
    # 24 MiB of stream text in 1 MiB chunks, stdout and stderr interleaved: before the text log, the
    # result's text, stdout/stderr and the chunks (kept by the output area) were three copies.
    size = 24 << 20
    area, log = OutputArea(), TextLog()
    tracemalloc.start()
    try:
        for index in range(24):
            name = "stderr" if index % 3 == 2 else "stdout"
            text = chr(ord("a") + index % 26) * ((1 << 20) - 1) + "\n"
            area.stream(name, text)
            log.stream(name, text)
        del text
        tracemalloc.reset_peak()
        held = tracemalloc.get_traced_memory()[0]
        strings = log.strings("[output truncated]", area)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(strings[0]) > size - 10 and len(strings[1]) + len(strings[2]) == size
    assert held >= size
    assert peak <= 2 * size + (2 << 20), f"peak {peak / size:.2f} x the text"
    assert current <= 2 * size + (1 << 20), f"held {current / size:.2f} x the text"
