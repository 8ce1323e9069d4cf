"""The gateway's kernel websocket connection: a faster first handshake, and death reasons."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from jupyter_client.jsonutil import json_default
from jupyter_server.services.kernels.connection.base import serialize_msg_to_ws_v1
from jupyter_server.services.kernels.connection.channels import ZMQChannelsWebsocketConnection

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


class IpyboxWebsocketConnection(ZMQChannelsWebsocketConnection):  # type: ignore[misc]
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
