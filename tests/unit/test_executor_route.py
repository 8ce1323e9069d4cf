"""Output accounting of one request, as the reader task does it before anything is queued."""

from __future__ import annotations

import base64
import io
from typing import Any

from PIL import Image

from ipybox._router import ITEM_OVERHEAD as _ITEM_OVERHEAD
from ipybox._router import Route as _Route
from ipybox.outputs import ErrorInfo, Output, TextLog, bundle_charge


def stream(text: str) -> dict[str, Any]:
    return {"msg_type": "stream", "content": {"name": "stdout", "text": text}}


def display(data: dict[str, str]) -> dict[str, Any]:
    return {"msg_type": "display_data", "content": {"data": data, "metadata": {}}}


IDLE = {"msg_type": "status", "content": {"execution_state": "idle"}}
REPLY = {"msg_type": "execute_reply", "content": {"status": "ok", "execution_count": 1}}


def end(route: _Route) -> bool:
    """Deliver the reply and then the idle status: an execution ends when it has both."""
    assert route.deliver(REPLY) is False
    return route.deliver(IDLE)


def drain(route: _Route) -> list[tuple[Any, ...]]:
    """The queued items after the first one, which says the execution started."""
    items = []
    while not route.queue.empty():
        items.append(route.queue.get_nowait())
    assert not items or items[0] == ("started", None), items
    return items[1:]


def texts(items: list[tuple[Any, ...]]) -> list[str]:
    """The stream text of queued items."""
    return [item[2] for item in items if item[0] == "stream"]


def test_under_the_cap_everything_is_kept() -> None:
    route = _Route("id", 1000, 1000, raw=False)
    route.deliver(stream("hello\n"))
    route.deliver(display({"text/plain": "42"}))
    assert end(route) is True
    assert drain(route) == [
        ("stream", "stdout", "hello\n"),
        ("output", "display_data", Output({"text/plain": "42"})),
        ("idle", None),
    ]
    assert not route.truncated and route.dropped == 0


def test_past_the_cap_output_is_counted_not_queued() -> None:
    cap = 10_000
    route = _Route("id", cap, cap, raw=False)
    for _ in range(1000):
        route.deliver(stream("x" * 1000))
    end(route)
    items = drain(route)
    kept = sum(len(text) for text in texts(items))
    markers = [item[1] for item in items if item[0] == "marker"]
    assert kept <= cap and route.used <= cap
    assert kept + route.dropped == 1_000_000
    assert len(markers) == 1 and "max_output_bytes=10000" in markers[0]
    assert items[-1] == ("idle", None)
    assert route.marker() == f"[output truncated: {route.dropped:,} bytes dropped past max_output_bytes=10000]"


def test_the_message_that_crosses_the_cap_keeps_its_head() -> None:
    route = _Route("id", 100 + _ITEM_OVERHEAD, 100, raw=False)
    route.deliver(stream("a" * 150))
    assert drain(route)[0] == ("stream", "stdout", "a" * 100)
    assert route.dropped == 50


def test_multibyte_text_is_counted_in_utf8_bytes_and_cut_on_a_character() -> None:
    route = _Route("id", 5 + _ITEM_OVERHEAD, 5, raw=False)
    route.deliver(stream("ééé"))  # 6 bytes
    assert drain(route)[0] == ("stream", "stdout", "éé")
    assert route.dropped == 2


def test_tiny_outputs_are_charged_their_bookkeeping() -> None:
    size = 2  # text/plain is charged with the newline `text` gives it, as it always was
    route = _Route("id", 100 * (_ITEM_OVERHEAD + size), 6600, raw=False)
    for i in range(1000):
        route.deliver(display({"text/plain": str(i % 10)}))
    assert sum(1 for item in drain(route) if item[0] == "output") == 100
    assert route.dropped == 900 * size


def png(size: tuple[int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, "red").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_images_are_charged_decoded_and_replaced_by_a_mark_when_they_do_not_fit() -> None:
    data = {"image/png": png((20, 10)), "text/plain": "<Figure>"}
    size = bundle_charge(Output(data)).size  # 20 x 10 x 4 decoded + base64 + encoded + "<Figure>\n"
    assert size > 800 + len(data["image/png"])
    route = _Route("id", 2 * (size + _ITEM_OVERHEAD) + 500, 2500, raw=False)
    for _ in range(3):
        route.deliver(display(data))
    items = drain(route)
    assert [item[0] for item in items] == ["output", "output", "output", "marker"]
    marked = items[2][2]
    assert marked.truncated and marked.mime_types == ["text/plain"]
    assert marked.text.startswith("[image dropped: 20x10 PNG would decode to 800 bytes; with its encoded data")
    assert marked.text.endswith("past max_output_bytes=2500 (500 bytes left)]")
    assert route.dropped == size


def test_an_undecodable_image_is_marked_whatever_the_room() -> None:
    route = _Route("id", None, None, raw=False)
    route.deliver(display({"image/png": base64.b64encode(b"\x89PNG" + b"\0" * 996).decode(), "text/plain": "<F>"}))
    [(kind, msg_type, marked)] = drain(route)
    assert (kind, msg_type) == ("output", "display_data") and marked.truncated
    assert marked.text == "[image dropped: image/png cannot be decoded: not a PNG (no PNG signature)]"
    assert not route.truncated and route.dropped == 0


def test_no_limit_keeps_everything() -> None:
    route = _Route("id", None, None, raw=False)
    route.deliver(stream("x" * 1_000_000))
    assert not route.truncated and drain(route) == [("stream", "stdout", "x" * 1_000_000)]


def test_errors_are_kept_aside_with_plain_traces() -> None:
    route = _Route("id", 10, 10, raw=False)
    route.deliver(
        {
            "msg_type": "error",
            "content": {"ename": "ValueError", "evalue": "\x1b[31mbad", "traceback": ["\x1b[0;31mTrace"]},
        }
    )
    assert route.error == ErrorInfo("ValueError", "bad", "Trace")
    # The first error is queued as an event even past the cap.
    assert drain(route) == [("error", ErrorInfo("ValueError", "bad", "Trace"))]


def test_escape_split_between_stream_messages_is_held_and_stripped() -> None:
    route = _Route("id", None, None, raw=False)
    route.deliver(stream("a\x1b[3"))
    route.deliver(stream("1mb\x1b]0;unterminated"))
    end(route)
    assert texts(drain(route)) == ["a", "b"]


def joined(chunks: list[str], suffix: str) -> str:
    log = TextLog()
    for chunk in chunks:
        log.stream("stdout", chunk)
    return log.strings(suffix)[0]


def test_join_stripped() -> None:
    assert joined([], "") == ""
    assert joined(["\n", " "], "") == ""
    assert joined(["\n", " "], "[m]") == "[m]"
    assert joined(["  a\n"], "") == "a"
    assert joined(["\n", " a", "b ", "c\n", "\n"], "[m]") == "a" + "b " + "c\n[m]"
    chunks = ["  x\n", "y", " z  \n"]
    assert joined(chunks, "") == "".join(chunks).strip()


def message(msg_type: str, **content: Any) -> dict[str, Any]:
    return {"msg_type": msg_type, "content": content}


def test_a_bundle_that_does_not_fit_keeps_the_head_of_its_text() -> None:
    route = _Route("id", 50 + _ITEM_OVERHEAD, 50, raw=False)
    route.deliver(display({"text/html": "<b>" + "h" * 200 + "</b>", "text/plain": "p" * 80}))
    items = drain(route)
    reduced = items[0][2]
    assert reduced.data == {"text/plain": "p" * 50} and reduced.truncated
    assert reduced.to_nbformat()["metadata"] == {"ipybox": {"truncated": True}}
    assert items[1][0] == "marker"
    assert route.used == 50 + _ITEM_OVERHEAD


def test_updates_and_images_that_do_not_fit_are_dropped_whole() -> None:
    route = _Route("id", 30 + _ITEM_OVERHEAD, 30, raw=False)
    route.deliver(message("update_display_data", data={"text/plain": "u" * 100}, transient={"display_id": "d"}))
    route.deliver(display({"image/jpeg": base64.b64encode(b"j" * 300).decode(), "text/plain": "<Image>"}))
    assert [item[0] for item in drain(route)] == ["marker"]
    assert route.used == 0


def test_clears_are_charged_and_past_the_cap_queued_once() -> None:
    route = _Route("id", 2 * _ITEM_OVERHEAD + 10, 138, raw=False)
    route.deliver(message("clear_output", wait=True))
    route.deliver(stream("x" * 500))
    for _ in range(1000):
        route.deliver(message("clear_output", wait=False))
    kinds = [item[0] for item in drain(route)]
    assert kinds == ["clear", "stream", "marker", "clear"]


def test_each_stream_keeps_its_own_unfinished_escape() -> None:
    route = _Route("id", None, None, raw=False)
    route.deliver(message("stream", name="stdout", text="a\x1b[3"))
    route.deliver(message("stream", name="stderr", text="err\n"))
    route.deliver(message("stream", name="stdout", text="1mb"))
    end(route)
    assert [(item[1], item[2]) for item in drain(route) if item[0] == "stream"] == [
        ("stdout", "a"),
        ("stderr", "err\n"),
        ("stdout", "b"),
    ]


def test_execution_count_and_duration() -> None:
    route = _Route("id", None, None, raw=False)
    route.deliver(message("execute_input", code="1", execution_count=7))
    route.deliver(message("execute_reply", status="ok", execution_count=8))
    assert route.execution_count == 7
    end(route)
    assert route.ended is not None and route.duration == route.ended - route.submitted >= 0


def test_text_types_lose_their_escapes_in_the_bundle() -> None:
    route = _Route("id", None, None, raw=False)
    route.deliver(display({"text/plain": "\x1b[31mred\x1b[0m", "text/html": "<p>\x1b[1mx</p>"}))
    output = drain(route)[0][2]
    assert output.data == {"text/plain": "red", "text/html": "<p>x</p>"}


def test_malformed_content_never_breaks_the_reader() -> None:
    route = _Route("id", 1000, 1000, raw=False)
    route.deliver(message("display_data", data=["not", "a", "dict"], metadata="nope", transient=5))
    route.deliver(message("execute_result", data={"application/json": {"a": [1, 2]}}, execution_count="x"))
    route.deliver(message("error", ename=None, evalue=3, traceback="one string"))
    items = drain(route)
    assert items[0][2] == Output({})
    assert items[1][2].json == {"a": [1, 2]} and items[1][2].execution_count is None
    assert items[2][1] == ErrorInfo("None", "3", "one string")


def test_many_empty_mime_types_still_count() -> None:
    route = _Route("id", 10_000, 10_000, raw=False)
    bundle = {f"application/x-{i}": "" for i in range(1000)}
    route.deliver(display(bundle))
    assert route.truncated and route.dropped >= 1000 * len("application/x-0")


def test_an_execution_ends_with_both_its_idle_and_its_reply_in_either_order() -> None:
    # An aborted request's idle (IOPub) often overtakes its reply (shell): ending at the idle alone
    # reported a request the kernel skipped as a success.
    route = _Route("id", 1000, 1000, raw=False)
    assert route.deliver({"msg_type": "status", "content": {"execution_state": "busy"}}) is False
    assert route.deliver(IDLE) is False
    assert not route.done
    assert route.deliver({"msg_type": "execute_reply", "content": {"status": "aborted"}}) is True
    assert route.done and route.aborted
    assert drain(route) == [("idle", None)]
