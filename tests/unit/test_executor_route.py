"""Output accounting of one request, as the reader task does it before anything is queued."""

from __future__ import annotations

import base64
from typing import Any

from ipybox.executor import _ITEM_OVERHEAD, _join_stripped, _Route


def stream(text: str) -> dict[str, Any]:
    return {"msg_type": "stream", "content": {"name": "stdout", "text": text}}


def display(data: dict[str, str]) -> dict[str, Any]:
    return {"msg_type": "display_data", "content": {"data": data, "metadata": {}}}


IDLE = {"msg_type": "status", "content": {"execution_state": "idle"}}


def drain(route: _Route) -> list[tuple[str, Any]]:
    items = []
    while not route.queue.empty():
        items.append(route.queue.get_nowait())
    return items


def test_under_the_cap_everything_is_kept() -> None:
    route = _Route("id", 1000, 1000, raw=False)
    route.deliver(stream("hello\n"))
    route.deliver(display({"text/plain": "42"}))
    assert route.deliver(IDLE) is True
    assert drain(route) == [("text", "hello\n"), ("text", "42\n"), ("idle", None)]
    assert not route.truncated and route.dropped == 0


def test_past_the_cap_output_is_counted_not_queued() -> None:
    cap = 10_000
    route = _Route("id", cap, cap, raw=False)
    for _ in range(1000):
        route.deliver(stream("x" * 1000))
    route.deliver(IDLE)
    items = drain(route)
    kept = sum(len(value) for kind, value in items if kind == "text")
    markers = [value for kind, value in items if kind == "marker"]
    assert kept <= cap and route.used <= cap
    assert kept + route.dropped == 1_000_000
    assert len(markers) == 1 and "max_output_bytes=10000" in markers[0]
    assert items[-1] == ("idle", None)
    assert route.marker() == f"[output truncated: {route.dropped:,} bytes dropped past max_output_bytes=10000]"


def test_the_message_that_crosses_the_cap_keeps_its_head() -> None:
    route = _Route("id", 100 + _ITEM_OVERHEAD, 100, raw=False)
    route.deliver(stream("a" * 150))
    assert drain(route)[0] == ("text", "a" * 100)
    assert route.dropped == 50


def test_multibyte_text_is_counted_in_utf8_bytes_and_cut_on_a_character() -> None:
    route = _Route("id", 5 + _ITEM_OVERHEAD, 5, raw=False)
    route.deliver(stream("ééé"))  # 6 bytes
    assert drain(route)[0] == ("text", "éé")
    assert route.dropped == 2


def test_tiny_outputs_are_charged_their_bookkeeping() -> None:
    route = _Route("id", 100 * (_ITEM_OVERHEAD + 2), 6600, raw=False)
    for i in range(1000):
        route.deliver(display({"text/plain": str(i % 10)}))
    assert sum(1 for kind, _ in drain(route) if kind == "text") == 100
    assert route.dropped == 900 * 2


def test_images_count_and_are_dropped_whole() -> None:
    png = base64.b64encode(b"\x89PNG" + b"\0" * 996).decode()
    route = _Route("id", 2500, 2500, raw=False)
    for _ in range(3):
        route.deliver(display({"image/png": png, "text/plain": "<Figure>"}))
    items = drain(route)
    assert [kind for kind, _ in items] == ["image", "image", "marker"]
    assert route.dropped == 1000


def test_no_limit_keeps_everything() -> None:
    route = _Route("id", None, None, raw=False)
    route.deliver(stream("x" * 1_000_000))
    assert not route.truncated and drain(route) == [("text", "x" * 1_000_000)]


def test_errors_are_kept_aside_with_plain_traces() -> None:
    route = _Route("id", 10, 10, raw=False)
    route.deliver(
        {
            "msg_type": "error",
            "content": {"ename": "ValueError", "evalue": "\x1b[31mbad", "traceback": ["\x1b[0;31mTrace"]},
        }
    )
    assert route.error == ("ValueError: bad", "Trace")
    assert drain(route) == []


def test_escape_split_between_stream_messages_is_held_and_stripped() -> None:
    route = _Route("id", None, None, raw=False)
    route.deliver(stream("a\x1b[3"))
    route.deliver(stream("1mb\x1b]0;unterminated"))
    route.deliver(IDLE)
    assert [value for kind, value in drain(route) if kind == "text"] == ["a", "b"]


def test_join_stripped() -> None:
    assert _join_stripped([], "") == ""
    assert _join_stripped(["\n", " "], "") == ""
    assert _join_stripped(["\n", " "], "[m]") == "[m]"
    assert _join_stripped(["  a\n"], "") == "a"
    assert _join_stripped(["\n", " a", "b ", "c\n", "\n"], "[m]") == "a" + "b " + "c\n[m]"
    chunks = ["  x\n", "y", " z  \n"]
    assert _join_stripped(chunks, "") == "".join(chunks).strip()
