"""The host's side of approvals for one kernel connection: requests in, decisions out.

The sandbox (ipybox_server/approvals.py) sends each tool call and shell escape of the kernel that
waits for approval on the websocket's channel "ipybox", `parent_header.msg_id` naming the execution.
`ApprovalDesk.receive()` is fed those messages by the websocket's reader; it turns each into a
`ToolCallRequest`, queues it on its execution's route (a pause of that execution's timeout clock),
and lets the first decision source decide (see `ipybox.approvals`). Decisions go back as
`{"type": "decision", "id", "approve", "reason"}`; the sandbox confirms each
(`ipybox_decision_reply`), which is what `approve()`/`deny()` wait for.

After a websocket cut the sandbox sends the requests still open again: one this desk decided already
gets its decision again (the first may have been lost in the cut).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ipybox._errors import ImageError, InvalidStateError, RequestRefusedError, ServerConnectionError
from ipybox._router import Route, Router
from ipybox.approvals import ApprovalPolicy
from ipybox.outputs import ApprovalState, ToolCallRequest

logger = logging.getLogger(__name__)

CHANNEL = "ipybox"
ENABLE_TIMEOUT = 10.0
"""Seconds the sandbox gets to confirm that approvals are on before `connect()` gives up."""

NO_POLICY = (
    "no approval policy decides it: pass approve=... to execute() or submit(), "
    "ExecutionClient(approvals=<policy>), or read the execution with events() and call approve()/deny()"
)
ENDED = "its execution ended before a decision"
ORPHAN = (
    "its execution is not running (the call came from code that outlived its cell, e.g. a thread) "
    "and ExecutionClient has no approval policy (ExecutionClient(approvals=<policy>))"
)

Send = Callable[[str, dict[str, Any]], Awaitable[None]]


class ApprovalDesk:
    """Decides the approval requests of one kernel connection.

    Args:
        policy: The client's policy, or None (decisions by the execution's policy or its reader).
        timeout: Seconds the sandbox waits for a decision before it refuses the call.
        send: Sends one message on channel "ipybox" (msg_type, content).
        router: The connection's router: requests go to its pending executions.
    """

    def __init__(self, policy: ApprovalPolicy | None, timeout: float, send: Send, router: Router) -> None:
        self.policy = policy
        self.timeout = timeout
        self._send = send
        self._router = router
        self._enabled: asyncio.Future[dict[str, Any]] | None = None
        self._requests: dict[str, ToolCallRequest] = {}  # not yet final in the sandbox
        self._routes: dict[str, Route] = {}  # request id -> the execution it waits in
        self._for_reader: set[str] = set()  # request ids no policy decides
        self._replies: dict[str, asyncio.Future[tuple[bool, str]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed: Exception | None = None

    async def enable(self) -> None:
        """Turn approvals on for the kernel; returns once the sandbox confirms.

        Raises:
            ImageError: The sandbox did not confirm: its image predates approvals.
            RequestRefusedError: The sandbox refused (a timeout it does not take).
            ServerConnectionError: Sending failed.
        """
        self._enabled = asyncio.get_running_loop().create_future()
        await self._send("ipybox_approvals", {"type": "approvals", "enabled": True, "timeout": self.timeout})
        try:
            async with asyncio.timeout(ENABLE_TIMEOUT):
                reply = await self._enabled
        except TimeoutError:
            raise ImageError(
                f"the sandbox did not confirm approvals within {ENABLE_TIMEOUT:g} s: its image was built by "
                "an ipybox without them. Rebuild it with `ipybox build`, or connect without "
                "ExecutionClient(approvals=...)",
                option="ipybox build",
            ) from None
        if reply.get("error") or reply.get("enabled") is not True:
            raise RequestRefusedError(f"the sandbox refused to turn approvals on: {reply.get('error')}")

    def close(self, error: Exception) -> None:
        """The connection is gone: requests still open expire, waiting decisions fail with `error`."""
        self._closed = error
        for task in list(self._tasks):
            task.cancel()
        for future in self._replies.values():
            if not future.done():
                future.set_exception(error)
        self._replies.clear()
        for request in list(self._requests.values()):
            if request.state is ApprovalState.PENDING:
                self._final(request, ApprovalState.EXPIRED, f"the client disconnected ({error})", "client")
        self._requests.clear()

    # -- messages from the sandbox ------------------------------------------------------------

    def receive(self, message: dict[str, Any]) -> None:
        msg_type = message.get("msg_type")
        content = message.get("content") or {}
        if msg_type == "ipybox_approval_request":
            parent = (message.get("parent_header") or {}).get("msg_id")
            self._request(content, parent if isinstance(parent, str) else None)
        elif msg_type == "ipybox_approval_expired":
            request = self._requests.pop(str(content.get("id")), None)
            if request is not None and request.state is ApprovalState.PENDING:
                self._final(request, ApprovalState.EXPIRED, str(content.get("reason") or "expired"), "sandbox")
        elif msg_type == "ipybox_decision_reply":
            request_id = str(content.get("id"))
            future = self._replies.pop(request_id, None)
            if content.get("accepted") is True:
                self._requests.pop(request_id, None)
            if future is not None and not future.done():
                future.set_result((content.get("accepted") is True, str(content.get("reason") or "")))
        elif msg_type == "ipybox_approvals_reply":
            if self._enabled is not None and not self._enabled.done():
                self._enabled.set_result(dict(content))

    def _request(self, content: dict[str, Any], parent: str | None) -> None:
        request_id = str(content.get("id"))
        known = self._requests.get(request_id)
        if known is not None:
            if known.state is not ApprovalState.PENDING:
                # Sent again after a cut: the decision may have been lost in it.
                self._spawn(self._transmit(known))
            return
        arguments = content.get("arguments")
        request = ToolCallRequest(
            id=request_id,
            kind=str(content.get("kind", "tool")),
            server=str(content.get("server", "")),
            tool=str(content.get("tool", "")),
            arguments=arguments if isinstance(arguments, dict) else {},
            _decide=self.decide,
        )
        self._requests[request_id] = request
        route = self._router.pending.get(parent) if parent else None
        if route is None or route.raw or route.done:
            if self.policy is None:
                self._decide_soon(request, ORPHAN)
            else:
                self._spawn(self._apply(self.policy, request))
            return
        self._routes[request_id] = route
        route.on_end = self._execution_ended
        route.ask(request)
        policy = route.policy if route.policy is not None else self.policy
        if policy is not None:
            self._spawn(self._apply(policy, request))
        else:
            self._for_reader.add(request_id)

    # -- decisions ----------------------------------------------------------------------------

    async def decide(self, request: ToolCallRequest, approve: bool, reason: str, by: str) -> None:
        """Decide `request` and wait until the sandbox confirms.

        Raises:
            InvalidStateError: It was decided or expired already, or the sandbox no longer waits
                for it (the message says why).
        """
        if request.state is not ApprovalState.PENDING:
            how = f" by the {request.decided_by}" if request.decided_by else ""
            why = f" ({request.reason})" if request.reason else ""
            raise InvalidStateError(
                f"the request for {request.name} was {request.state.value} already{how}{why}; a request is decided once"
            )
        if self._closed is not None:
            raise InvalidStateError(f"the request for {request.name} cannot be decided: {self._closed}")
        await self._confirmed(request, self._commit(request, approve, reason, by))

    def _commit(
        self, request: ToolCallRequest, approve: bool, reason: str, by: str
    ) -> asyncio.Future[tuple[bool, str]]:
        """Decide `request` here and now (its execution's clock runs again); the sandbox's reply to come."""
        state = ApprovalState.APPROVED if approve else ApprovalState.DENIED
        self._final(request, state, reason, by, keep=True)
        future: asyncio.Future[tuple[bool, str]] = asyncio.get_running_loop().create_future()
        self._replies[request.id] = future
        return future

    def _decide_soon(self, request: ToolCallRequest, reason: str) -> None:
        """Deny `request` now (seen at once by whoever holds it); the message follows in a task."""
        if request.state is ApprovalState.PENDING and self._closed is None:
            self._spawn(self._confirmed(request, self._commit(request, False, reason, "client")))

    async def _confirmed(self, request: ToolCallRequest, future: asyncio.Future[tuple[bool, str]]) -> None:
        await self._transmit(request)
        try:
            accepted, why = await future
        except Exception as exc:  # the connection closed first (`close()`)
            raise InvalidStateError(f"the decision on {request.name} did not reach the sandbox: {exc}") from exc
        if not accepted:
            request.state, request.reason, request.decided_by = ApprovalState.EXPIRED, why, "sandbox"
            raise InvalidStateError(f"the decision on {request.name} came too late: the sandbox says {why}")

    def unread(self, request: ToolCallRequest) -> None:
        """An execution read without `events()` reached `request`: nobody will decide it there."""
        if request.id in self._for_reader:
            self._decide_soon(request, NO_POLICY)

    async def _apply(self, policy: ApprovalPolicy, request: ToolCallRequest) -> None:
        try:
            verdict = policy(request)
            if inspect.isawaitable(verdict):
                verdict = await verdict
        except Exception as exc:
            logger.warning("the approval policy raised on %s: %r", request.name, exc)
            verdict = f"the approval policy raised {exc!r}"
        if request.state is not ApprovalState.PENDING:
            return  # expired while the policy thought, or decided by the reader meanwhile
        if verdict is True:
            await self.decide(request, True, "", "policy")
        else:
            reason = verdict if isinstance(verdict, str) and verdict else "denied by the approval policy"
            await self.decide(request, False, reason, "policy")

    async def _transmit(self, request: ToolCallRequest) -> None:
        content = {
            "type": "decision",
            "id": request.id,
            "approve": request.state is ApprovalState.APPROVED,
            "reason": request.reason,
        }
        try:
            await self._send("ipybox_decision", content)
        except ServerConnectionError as exc:
            # Lost with the websocket: the sandbox sends the request again to the re-opened one, and
            # `_request` sends this decision again.
            logger.debug("sending the decision on %s failed: %r", request.name, exc)

    def _execution_ended(self, route: Route) -> None:
        for request_id, waiting_in in list(self._routes.items()):
            if waiting_in is route:
                request = self._requests.get(request_id)
                if request is not None:
                    self._decide_soon(request, ENDED)

    def _final(self, request: ToolCallRequest, state: ApprovalState, reason: str, by: str, keep: bool = False) -> None:
        """Leave PENDING: the execution's clock runs again."""
        request.state, request.reason, request.decided_by = state, reason, by
        self._for_reader.discard(request.id)
        route = self._routes.pop(request.id, None)
        if route is not None:
            route.release()
        if not keep:
            self._requests.pop(request.id, None)

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            if isinstance(exc, InvalidStateError):
                logger.debug("an approval decision was refused: %s", exc)
            else:
                logger.warning("an approval decision failed: %r", exc)
