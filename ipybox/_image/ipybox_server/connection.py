"""The gateway's kernel websocket connection, with a faster first handshake."""

from __future__ import annotations

import asyncio

from jupyter_server.services.kernels.connection.channels import ZMQChannelsWebsocketConnection

SUBSCRIBE_GRACE = 0.02
"""Seconds given to a new IOPub subscription before the first kernel_info nudge.

The gateway nudges a new connection with kernel_info requests until an IOPub message arrives, and
retries only every 0.5 s. A nudge sent the instant the IOPub socket is created often loses its
IOPub reply to ZeroMQ's slow-joiner window (measured here: about one first connection in three
took 0.5 s longer). A short pause before the first nudge avoids that retry.
"""


class IpyboxWebsocketConnection(ZMQChannelsWebsocketConnection):  # type: ignore[misc]
    def nudge(self) -> asyncio.Future[None]:
        parent_nudge = super().nudge

        async def nudge_after_grace() -> None:
            await asyncio.sleep(SUBSCRIBE_GRACE)
            await parent_nudge()

        return asyncio.ensure_future(nudge_after_grace())
