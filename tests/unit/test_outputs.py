"""Rich outputs on their own: MIME bundle accessors, the output area's rules, nbformat rendering."""

from __future__ import annotations

import base64
import io
import time
from typing import Any

import nbformat
import pytest
from PIL import Image

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
    apply_carriage_returns,
    decode_image,
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
