"""Application approvals of tool calls and shell escapes (issue 15): skeleton, filled in by its owner.

`check()` decides whether a call may run; see /tmp/issue15/SPEC.md section 3.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web


class Refused(Exception):
    """The application did not approve a call; `kind` is "denied" or "expired"."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


_kernel_manager: Any = None


def use_kernel_manager(kernel_manager: Any) -> None:
    """The gateway's kernel manager: callers are attributed to its kernels by process."""
    global _kernel_manager
    _kernel_manager = kernel_manager


async def check(
    request: web.Request, *, msg_id: str | None, kind: str, server: str, tool: str, arguments: dict[str, Any]
) -> None:
    """Return when the call may run; raise `Refused` when it may not."""
