"""A kernel manager that starts the first kernel before anyone asks for it."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import zmq
from jupyter_client.session import DELIM as DELIMITER
from jupyter_server._tz import utcnow
from kernel_gateway.services.kernels.manager import SeedingMappingKernelManager


class PrestartingKernelManager(SeedingMappingKernelManager):  # type: ignore[misc]
    """Starts one kernel as soon as the gateway runs and hands it to the first plain request.

    Together with the pre-warmed kernel process (prewarm.py) this takes the kernel's start-up off
    a new sandbox's critical path: by the time the host has seen the ready line and asks for a
    kernel, that kernel is already (or almost) running. Requests that ask for anything special
    (another kernel name, a kernel id, a path, environment variables) get a kernel of their own.
    """

    _prestarted: asyncio.Future[str] | None = None

    def prestart(self) -> None:
        self._prestarted = asyncio.ensure_future(
            super().start_kernel(kernel_name=self.default_kernel_name, path=None, kernel_id=None)
        )

    async def start_kernel(self, *args: Any, **kwargs: Any) -> str:
        prestarted = self._prestarted
        if prestarted is not None and not args and _is_plain_request(kwargs, self.default_kernel_name):
            self._prestarted = None
            try:
                return await prestarted
            except Exception:
                self.log.exception("the pre-started kernel failed; starting another")
        return str(await super().start_kernel(*args, **kwargs))

    def start_watching_activity(self, kernel_id: str) -> None:
        """Track the kernel's execution state (busy/idle) from its IOPub status messages, cheaply.

        The gateway needs the state: it does not nudge a busy kernel when a websocket (re)connects,
        because the nudge's temporary IOPub handler would swallow a message of the running cell (a
        reconnect after a cut would then lose output). The stock watcher gets the state by decoding
        every IOPub message in full (signature, JSON, dates) on the loop that relays the replies: tens
        of microseconds per message, about 0.2 ms per trivial cell. This one subscribes only to the
        kernel's own topics (`kernel.<id>.status`, `.execute_input`, ...; the kernel's ZeroMQ socket
        filters out streams and displays before sending) and parses only a status message's parent
        header and content. Same rules as the stock watcher for the state; last_activity is updated on
        every message it sees.
        """
        kernel = self._kernels[kernel_id]
        kernel.reason = ""
        kernel.last_activity = utcnow()
        stream = kernel.connect_iopub()
        stream.socket.setsockopt(zmq.UNSUBSCRIBE, b"")
        stream.socket.setsockopt(zmq.SUBSCRIBE, b"kernel.")
        kernel._activity_stream = stream

        def record_activity(msg_list: list[bytes]) -> None:
            kernel.last_activity = self.last_kernel_activity = utcnow()
            if not bytes(msg_list[0]).endswith(b".status"):
                return
            try:
                parts = [bytes(part) for part in msg_list]
                fed = parts[parts.index(DELIMITER) + 1 :]  # signature, header, parent, metadata, content
                parent_type = (json.loads(fed[2]) or {}).get("msg_type")
                state = json.loads(fed[4]).get("execution_state")
            except (ValueError, IndexError, AttributeError):
                return
            if self.track_message_type(parent_type):
                kernel.execution_state = state
            elif kernel.execution_state == "starting" and state != "starting":
                kernel.execution_state = "idle"

        stream.on_recv(record_activity)


def _is_plain_request(kwargs: dict[str, Any], default_kernel_name: str) -> bool:
    return (
        kwargs.get("kernel_name") in (None, default_kernel_name)
        and kwargs.get("path") is None
        and kwargs.get("kernel_id") is None
        and set(kwargs) <= {"kernel_name", "path", "kernel_id"}
    )
