"""Approval policies: how an application decides the tool calls and shell escapes of sandboxed code.

With `ExecutionClient(approvals=...)` on, each MCP tool call and each IPython shell escape (`!cmd`,
`!!cmd`, `%sx`, `%%bash`, `%%sh`) of the client's kernel waits in the sandbox for a decision before it
runs. The decision comes, per request, from the first of:

1. the execution's policy: `execute(code, approve=policy)` or `submit(code, approve=policy)`;
2. the client's policy: `ExecutionClient(approvals=policy)`;
3. the reader of `Execution.events()`: a `ToolCallRequest` event, decided with `await request.approve()`
   or `await request.deny(reason)`;
4. otherwise it is denied ("no approval policy").

A policy is an `AllowList` or any callable taking the `ToolCallRequest` and returning (or awaiting
to) `True` to approve, `False` to deny, or a string to deny with that reason. Only `True` approves;
a policy that raises denies (the reason names the exception).

Approving shell escapes is an application-level control, not a security boundary: code can run
programs without a shell escape (`subprocess`, `os.system`). What keeps code in is the sandbox.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Awaitable, Callable, Iterable

from ipybox.outputs import ToolCallRequest

ApprovalPolicy = Callable[[ToolCallRequest], "bool | str | Awaitable[bool | str]"]
"""Decides one request: `True` approves; `False`, or a string (the reason), denies."""


class AllowList:
    """Approves the requests that match one of its patterns and denies all others.

    A pattern is "server.tool" or "server" (every tool of that server); either part may use shell
    wildcards (`*`, `?`, `[...]`). Shell escapes are server "shell": "shell" allows all of them,
    "shell.system" only `!cmd`, "shell.%%bash" only `%%bash` cells.

    Args:
        patterns: The allowed "server.tool" patterns.

    Example:
        ```python
        policy = AllowList(["github.list_issues", "weather.*"])
        async with ExecutionClient(port=container.executor_port, approvals=policy) as client:
            await client.execute(code)  # other tools and shell escapes are denied
        ```
    """

    def __init__(self, patterns: Iterable[str]) -> None:
        if isinstance(patterns, str):
            raise TypeError(f"AllowList takes a list of patterns, not the string {patterns!r}: AllowList([...])")
        self.patterns: tuple[str, ...] = tuple(patterns)
        for pattern in self.patterns:
            if not isinstance(pattern, str) or not pattern or pattern.startswith("."):
                raise ValueError(f'AllowList patterns are "server.tool" or "server" strings, not {pattern!r}')
        self._rules = [_split(pattern) for pattern in self.patterns]

    def allows(self, server: str, tool: str) -> bool:
        """Whether a call of `server`'s `tool` matches a pattern."""
        return any(
            fnmatch.fnmatchcase(server, server_pattern) and fnmatch.fnmatchcase(tool, tool_pattern)
            for server_pattern, tool_pattern in self._rules
        )

    def __call__(self, request: ToolCallRequest) -> bool | str:
        if self.allows(request.server, request.tool):
            return True
        return f"{request.name} is not in the application's allow-list"

    def __repr__(self) -> str:
        return f"AllowList({list(self.patterns)!r})"


def _split(pattern: str) -> tuple[str, str]:
    # Server names are identifiers: the first dot ends one (tool names may hold dots).
    server, dot, tool = pattern.partition(".")
    return server, tool if dot else "*"
