"""A kernel manager that starts the first kernel before anyone asks for it."""

from __future__ import annotations

import asyncio
from typing import Any

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
        # The stock watcher subscribes to the kernel's IOPub a second time and decodes every message
        # (signature, JSON, dates) on the gateway's event loop, the loop that relays the replies: tens of
        # microseconds per message on the path of every cell. Nothing here reads the activity fields
        # (kernel culling is off), so they are set once: GET /api/kernels reports the start time as
        # last_activity and "idle" as execution_state.
        kernel = self._kernels[kernel_id]
        kernel.reason = ""
        kernel.last_activity = utcnow()
        kernel.execution_state = "idle"


def _is_plain_request(kwargs: dict[str, Any], default_kernel_name: str) -> bool:
    return (
        kwargs.get("kernel_name") in (None, default_kernel_name)
        and kwargs.get("path") is None
        and kwargs.get("kernel_id") is None
        and set(kwargs) <= {"kernel_name", "path", "kernel_id"}
    )
