"""The gateway's kernel websocket connection: a faster first handshake, death reasons, and the
channel "ipybox" that carries approvals between the host and this server (approvals.py)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

from jupyter_client.jsonutil import json_default
from jupyter_server.services.kernels.connection.base import deserialize_msg_from_ws_v1, serialize_msg_to_ws_v1
from jupyter_server.services.kernels.connection.channels import ZMQChannelsWebsocketConnection

from ipybox_server import approvals

V1_PROTOCOL = "v1.kernel.websocket.jupyter.org"

SUBSCRIBE_GRACE = 0.02
"""Seconds given to a new IOPub subscription before the first kernel_info nudge.

The gateway nudges a new connection with kernel_info requests until an IOPub message arrives, and
retries only every 0.5 s. A nudge sent the instant the IOPub socket is created often loses its
IOPub reply to ZeroMQ's slow-joiner window (measured here: about one first connection in three
took 0.5 s longer). A short pause before the first nudge avoids that retry.
"""

REASON_KEY = "ipybox_reason"
"""Extra field of a `restarting`/`dead` status message's content: why the kernel died, if known."""

_OOM_COUNTERS = (Path("/sys/fs/cgroup/memory/memory.oom_control"), Path("/sys/fs/cgroup/memory.events"))
_oom_kills_seen = 0


def oom_kills() -> int:
    """How many processes the container's memory cgroup has OOM-killed (cgroup v1 or v2)."""
    for path in _OOM_COUNTERS:
        try:
            for line in path.read_text().splitlines():
                name, _, value = line.partition(" ")
                if name == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            continue
    return 0


def death_reason() -> str | None:
    """'out of memory' if the cgroup OOM-killed something since the last call, else None."""
    global _oom_kills_seen
    count = oom_kills()
    killed, _oom_kills_seen = count > _oom_kills_seen, count
    return "out of memory" if killed else None


def v1_channel(frame: bytes) -> str | None:
    """The channel of a v1 websocket frame, read from its first two offsets (the rest is not parsed)."""
    if len(frame) < 24:
        return None
    start = int.from_bytes(frame[8:16], "little")
    end = int.from_bytes(frame[16:24], "little")
    if not 24 <= start <= end <= len(frame) or end - start > 64:
        return None
    return frame[start:end].decode("utf-8", "replace")


class IpyboxWebsocketConnection(ZMQChannelsWebsocketConnection):  # type: ignore[misc]
    def connect(self) -> Any:
        connected = super().connect()
        if connected is not None:  # None: the connection failed and was closed
            approvals.attach(self)
        return connected

    def disconnect(self) -> None:
        approvals.detach(self)
        super().disconnect()

    def handle_incoming_message(self, incoming_msg: Any) -> None:
        # Approval messages on channel "ipybox" are this server's, never the kernel's. Only the v1
        # protocol carries them (ipybox's host client speaks it; legacy JSON clients get none).
        if (
            isinstance(incoming_msg, bytes)
            and self.subprotocol == V1_PROTOCOL
            and v1_channel(incoming_msg) == approvals.CHANNEL
        ):
            try:
                content = json.loads(deserialize_msg_from_ws_v1(incoming_msg)[1][3])
            except (IndexError, ValueError):
                content = None  # malformed: receive() logs and ignores it
            approvals.receive(self, content)
            return
        super().handle_incoming_message(incoming_msg)

    def send_ipybox(self, msg_type: str, content: dict[str, Any], parent_msg_id: str | None) -> None:
        """Write one message on channel "ipybox" to this websocket (v1 only)."""
        if self.subprotocol != V1_PROTOCOL:
            return
        # A uuid, not the session's numbered msg_id: the host reads the kernel's numbers to find
        # messages lost in a cut, and these are not the kernel's.
        msg = {
            "header": {
                "msg_id": uuid.uuid4().hex,
                "msg_type": msg_type,
                "session": self.session.session,
                "username": "ipybox",
                "date": time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime()),
                "version": "5.3",
            },
            "parent_header": {"msg_id": parent_msg_id} if parent_msg_id else {},
            "metadata": {},
            "content": content,
        }
        self.write_message(serialize_msg_to_ws_v1(msg, approvals.CHANNEL, self.session.pack), binary=True)

    def nudge(self) -> asyncio.Future[None]:
        parent_nudge = super().nudge

        async def nudge_after_grace() -> None:
            await asyncio.sleep(SUBSCRIBE_GRACE)
            await parent_nudge()

        return asyncio.ensure_future(nudge_after_grace())

    def _send_status_message(self, status: str) -> None:
        reason = death_reason() if status in ("restarting", "dead") else None
        if reason is None:
            super()._send_status_message(status)
            return
        # As the parent does, with the reason added to the content (clients that do not know the
        # field ignore it).
        iopub = self.channels.get("iopub", None)
        if iopub and not iopub.closed():
            iopub.flush()
        msg = self.session.msg("status", {"execution_state": status, REASON_KEY: reason})
        if self.subprotocol == "v1.kernel.websocket.jupyter.org":
            self.write_message(serialize_msg_to_ws_v1(msg, "iopub", self.session.pack), binary=True)
        else:
            msg["channel"] = "iopub"
            self.write_message(json.dumps(msg, default=json_default))


# The counter at start-up is history, not a death of ours.
_oom_kills_seen = oom_kills()
