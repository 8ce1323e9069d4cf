import json

from ipybox import _wire

MESSAGE = {
    "header": {"msg_id": "abc", "msg_type": "execute_request"},
    "parent_header": {"msg_id": "parent"},
    "metadata": {},
    "content": {"code": "print('é')"},
}


def test_v1_round_trip() -> None:
    decoded = _wire.decode_v1(_wire.encode_v1("shell", MESSAGE))
    assert decoded["channel"] == "shell"
    assert decoded["msg_type"] == "execute_request"
    assert decoded["parent_header"] == {"msg_id": "parent"}
    assert decoded["content"] == {"code": "print('é')"}


def test_v1_layout_matches_the_protocol() -> None:
    # count, then offsets of: channel start, each part's start, end of the last part
    frame = _wire.encode_v1("iopub", MESSAGE)
    count = int.from_bytes(frame[:8], "little")
    assert count == 6
    offsets = [int.from_bytes(frame[8 * (i + 1) : 8 * (i + 2)], "little") for i in range(count)]
    assert offsets[0] == 8 * (count + 1)
    assert frame[offsets[0] : offsets[1]] == b"iopub"
    assert json.loads(frame[offsets[1] : offsets[2]]) == MESSAGE["header"]
    assert offsets[-1] == len(frame)


def test_v1_decode_ignores_buffers() -> None:
    frame = bytearray(_wire.encode_v1("iopub", MESSAGE))
    # append a binary buffer part, as kernels may send
    count = int.from_bytes(frame[:8], "little")
    offsets = [int.from_bytes(frame[8 * (i + 1) : 8 * (i + 2)], "little") for i in range(count)]
    body = bytes(frame[offsets[0] :]) + b"\x00\x01binary"
    offsets = [o + 8 for o in offsets] + [offsets[-1] + 8 + 8]
    rebuilt = (count + 1).to_bytes(8, "little") + b"".join(o.to_bytes(8, "little") for o in offsets) + body
    assert _wire.decode_v1(rebuilt)["content"] == MESSAGE["content"]


def test_json_round_trip() -> None:
    assert _wire.decode_json(_wire.encode_json("shell", MESSAGE)) == {**MESSAGE, "channel": "shell"}
