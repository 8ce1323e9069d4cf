"""Jupyter kernel websocket framing: the binary v1 protocol, and the legacy JSON one as fallback.

v1 ("v1.kernel.websocket.jupyter.org") lets the gateway forward a kernel's message parts as they
are, without decoding and re-encoding every message as one JSON document, which makes each
message cheaper for the gateway. Layout: an 8-byte little-endian count n, then n 8-byte offsets,
then the channel name and the message parts (header, parent_header, metadata, content, buffers...)
at those offsets.
"""

from __future__ import annotations

import json
from typing import Any

V1_PROTOCOL = "v1.kernel.websocket.jupyter.org"


def encode_v1(channel: str, message: dict[str, Any]) -> bytes:
    parts = [json.dumps(message[key]).encode() for key in ("header", "parent_header", "metadata", "content")]
    channel_bytes = channel.encode()
    offsets = [8 * (1 + 1 + len(parts) + 1)]
    offsets.append(offsets[-1] + len(channel_bytes))
    for part in parts:
        offsets.append(offsets[-1] + len(part))
    head = len(offsets).to_bytes(8, "little") + b"".join(offset.to_bytes(8, "little") for offset in offsets)
    return head + channel_bytes + b"".join(parts)


def decode_v1(data: bytes) -> dict[str, Any]:
    return parse_v1(*split_v1(data))


def encode_json(channel: str, message: dict[str, Any]) -> str:
    return json.dumps({**message, "channel": channel})


def decode_json(data: str) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(data)
    return message


def split_v1(data: bytes) -> tuple[str, list[str]]:
    """A v1 frame's channel and its header, parent_header, metadata and content parts as JSON text,
    decoded from the frame in place (no bytes copies; binary buffers after them are skipped).

    With `parse_v1` this is `decode_v1` in two steps, so the caller can let go of the frame in
    between: a big message then has at most two copies alive (frame + text, then text + parsed)
    instead of four (frame, a sliced part, json's own decoded text, parsed).
    """
    view = memoryview(data)
    try:
        count = int.from_bytes(view[:8], "little")
        offsets = [int.from_bytes(view[8 * (i + 1) : 8 * (i + 2)], "little") for i in range(count)]
        channel = str(view[offsets[0] : offsets[1]], "utf-8")
        parts = [str(view[offsets[i] : offsets[i + 1]], "utf-8") for i in range(1, min(count - 1, 5))]
    finally:
        view.release()
    return channel, parts


def parse_v1(channel: str, parts: list[str]) -> dict[str, Any]:
    """The message of `split_v1`'s parts; empties `parts` as it goes, so each text is freed once parsed."""
    header = json.loads(parts[0])
    parent = json.loads(parts[1])
    content_text = parts[3]
    parts.clear()
    content = json.loads(content_text)
    del content_text
    return {
        "channel": channel,
        "header": header,
        "msg_type": header.get("msg_type"),
        "parent_header": parent,
        "content": content,
    }
