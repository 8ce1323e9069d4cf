"""The host's side of approvals without a sandbox: AllowList, the desk that decides requests (fed
recorded messages, its sends recorded), and the pause of an execution's timeout clock."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from ipybox import ImageError, InvalidStateError, RequestRefusedError
from ipybox._approvals import ENDED, NO_POLICY, ORPHAN, ApprovalDesk
from ipybox._router import IDLE, RELEASED, STARTED, Router
from ipybox.approvals import AllowList
from ipybox.executor import ExecutionClient
from ipybox.outputs import ApprovalState, ToolCallRequest


def request(server: str = "github", tool: str = "issues", kind: str = "tool") -> ToolCallRequest:
    return ToolCallRequest(id="r", kind=kind, server=server, tool=tool, arguments={})


@pytest.mark.parametrize(
    ("patterns", "server", "tool", "allowed"),
    [
        (["github.issues"], "github", "issues", True),
        (["github.issues"], "github", "issue", False),
        (["github"], "github", "anything", True),
        (["github.*"], "github", "anything", True),
        (["git*.list_*"], "gitlab", "list_projects", True),
        (["git*.list_*"], "gitlab", "delete", False),
        (["shell"], "shell", "%%bash", True),
        (["shell.system"], "shell", "%%bash", False),
        (["shell.%%bash"], "shell", "%%bash", True),
        (["a.b.c"], "a", "b.c", True),  # tool names may hold dots
        ([], "github", "issues", False),
    ],
)
def test_allow_list_patterns(patterns: list[str], server: str, tool: str, allowed: bool) -> None:
    policy = AllowList(patterns)
    assert policy.allows(server, tool) is allowed
    verdict = policy(request(server, tool))
    assert verdict is True if allowed else verdict == f"{server}.{tool} is not in the application's allow-list"


@pytest.mark.parametrize("patterns", ["github.issues", [""], [".issues"], [3]])
def test_allow_list_refuses_what_is_no_pattern(patterns: Any) -> None:
    with pytest.raises((TypeError, ValueError)):
        AllowList(patterns)


class Desk:
    """An ApprovalDesk with a router, its sends recorded, and the sandbox's messages as helpers."""

    def __init__(self, policy: Any = None) -> None:
        self.router = Router("k")
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.desk = ApprovalDesk(policy, 30, self.send, self.router)
        self.auto_reply = True

    async def send(self, msg_type: str, content: dict[str, Any]) -> None:
        self.sent.append((msg_type, content))
        if msg_type == "ipybox_decision" and self.auto_reply:
            asyncio.get_running_loop().call_soon(self.reply, content["id"], True)

    def reply(self, request_id: str, accepted: bool, reason: str = "") -> None:
        content = {"id": request_id, "accepted": accepted, "reason": reason}
        self.desk.receive({"msg_type": "ipybox_decision_reply", "content": content})

    def ask(self, request_id: str, parent: str | None, tool: str = "issues") -> None:
        content = {"id": request_id, "kind": "tool", "server": "github", "tool": tool, "arguments": {"n": 1}}
        parent_header = {"msg_id": parent} if parent else {}
        self.desk.receive({"msg_type": "ipybox_approval_request", "content": content, "parent_header": parent_header})

    def decisions(self) -> list[tuple[str, bool, str]]:
        return [(c["id"], c["approve"], c["reason"]) for kind, c in self.sent if kind == "ipybox_decision"]


def queued(route: Any) -> list[Any]:
    items = []
    while not route.queue.empty():
        items.append(route.queue.get_nowait())
    return items


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_request_goes_to_its_execution_and_waits_for_the_reader() -> None:
    d = Desk()
    route = d.router.register(None, None)
    d.ask("r1", route.msg_id)
    items = queued(route)
    assert items[0] == STARTED  # a message of an execution says it runs
    (kind, event) = items[-1]
    assert kind == "approval" and isinstance(event, ToolCallRequest)
    assert (event.server, event.tool, event.arguments, event.state) == (
        "github",
        "issues",
        {"n": 1},
        ApprovalState.PENDING,
    )
    assert route.holds == 1
    await settle()
    assert d.decisions() == []  # nobody decided yet
    await event.approve()
    assert d.decisions() == [("r1", True, "")]
    assert event.state is ApprovalState.APPROVED and event.decided_by == "reader"
    assert route.holds == 0 and queued(route) == [RELEASED]
    with pytest.raises(InvalidStateError, match="approved already by the reader"):
        await event.deny()


async def test_the_execution_policy_comes_before_the_client_policy() -> None:
    d = Desk(policy=AllowList(["github"]))
    route = d.router.register(None, None)
    route.policy = lambda request: "not from this execution"
    d.ask("r1", route.msg_id)
    await settle()
    assert d.decisions() == [("r1", False, "not from this execution")]
    event = queued(route)[-2][1]  # the request, then its release
    assert event.state is ApprovalState.DENIED and event.decided_by == "policy"


async def test_policies_async_raising_or_not_true() -> None:
    async def slow_yes(request: ToolCallRequest) -> bool:
        await asyncio.sleep(0)
        return True

    def broken(request: ToolCallRequest) -> bool:
        raise RuntimeError("boom")

    for policy, expected in [
        (slow_yes, (True, "")),
        (broken, (False, "the approval policy raised RuntimeError('boom')")),
        (lambda r: 1, (False, "denied by the approval policy")),
        (lambda r: "", (False, "denied by the approval policy")),
    ]:
        d = Desk(policy=policy)
        route = d.router.register(None, None)
        d.ask("r", route.msg_id)
        await settle()
        assert d.decisions() == [("r", *expected)]


async def test_a_request_of_no_running_execution_needs_the_client_policy() -> None:
    d = Desk()
    d.ask("r1", "ended-long-ago")
    await settle()
    assert d.decisions() == [("r1", False, ORPHAN)]
    d = Desk(policy=AllowList(["github"]))
    d.ask("r2", None)
    await settle()
    assert d.decisions() == [("r2", True, "")]


async def test_a_reader_that_is_no_events_reader_denies() -> None:
    d = Desk()
    route = d.router.register(None, None)
    d.ask("r1", route.msg_id)
    event = queued(route)[-1][1]
    d.desk.unread(event)
    assert event.state is ApprovalState.DENIED and event.reason == NO_POLICY  # at once
    await settle()
    assert d.decisions() == [("r1", False, NO_POLICY)]


async def test_the_end_of_the_execution_denies_what_is_still_open() -> None:
    d = Desk()
    route = d.router.register(None, None)
    d.ask("r1", route.msg_id)
    event = queued(route)[-1][1]
    for message in (
        {"msg_type": "execute_reply", "content": {"status": "ok"}, "parent_header": {"msg_id": route.msg_id}},
        {"msg_type": "status", "content": {"execution_state": "idle"}, "parent_header": {"msg_id": route.msg_id}},
    ):
        d.router.receive(message)
    assert event.state is ApprovalState.DENIED and event.reason == ENDED
    with pytest.raises(InvalidStateError, match="its execution ended before a decision"):
        await event.approve()
    await settle()
    assert d.decisions() == [("r1", False, ENDED)]
    assert IDLE in queued(route)


async def test_expiry_and_late_decisions() -> None:
    d = Desk()
    route = d.router.register(None, None)
    d.ask("r1", route.msg_id)
    event = queued(route)[-1][1]
    d.desk.receive(
        {"msg_type": "ipybox_approval_expired", "content": {"id": "r1", "reason": "no decision within 30 s"}}
    )
    assert event.state is ApprovalState.EXPIRED and event.decided_by == "sandbox" and route.holds == 0
    with pytest.raises(InvalidStateError, match=r"expired already by the sandbox \(no decision within 30 s\)"):
        await event.approve()
    # A decision that crosses the expiry on the wire: the sandbox's reply says it came too late.
    d.auto_reply = False
    d.ask("r2", route.msg_id)
    event = queued(route)[-1][1]
    approving = asyncio.ensure_future(event.approve())
    await settle()
    d.reply("r2", False, "no request with this id is waiting for a decision")
    with pytest.raises(InvalidStateError, match="came too late: the sandbox says no request"):
        await approving
    assert event.state is ApprovalState.EXPIRED


async def test_a_request_sent_again_after_a_cut_gets_its_decision_again() -> None:
    d = Desk()
    d.auto_reply = False
    route = d.router.register(None, None)
    d.ask("r1", route.msg_id)
    event = queued(route)[-1][1]
    approving = asyncio.ensure_future(event.approve())
    await settle()
    d.ask("r1", route.msg_id)  # the re-opened websocket: the first decision may be lost
    await settle()
    assert d.decisions() == [("r1", True, ""), ("r1", True, "")]
    assert queued(route) == [RELEASED]  # not queued twice
    d.reply("r1", True)
    await approving


async def test_closing_fails_waiting_decisions_and_expires_open_requests() -> None:
    d = Desk()
    d.auto_reply = False
    route = d.router.register(None, None)
    d.ask("r1", route.msg_id)
    d.ask("r2", route.msg_id)
    first, second = (item[1] for item in queued(route)[-2:])
    approving = asyncio.ensure_future(first.approve())
    await settle()
    d.desk.close(ConnectionError("gone"))
    with pytest.raises(InvalidStateError, match="did not reach the sandbox"):
        await approving
    assert first.state is ApprovalState.APPROVED
    assert second.state is ApprovalState.EXPIRED and "the client disconnected" in second.reason
    with pytest.raises(InvalidStateError):
        await second.deny()


async def test_enable_waits_for_the_acknowledgement() -> None:
    d = Desk()
    enabling = asyncio.ensure_future(d.desk.enable())
    await settle()
    assert d.sent == [("ipybox_approvals", {"type": "approvals", "enabled": True, "timeout": 30})]
    d.desk.receive({"msg_type": "ipybox_approvals_reply", "content": {"enabled": True, "timeout": 30}})
    await enabling


def test_held_time_pauses_the_clock_across_overlapping_holds() -> None:
    route = Router("k").register(None, None)
    assert route.held_time() == 0
    route.hold()
    route.hold()
    time.sleep(0.05)
    route.release()
    assert route.holds == 1
    time.sleep(0.05)
    route.release()
    route.release()  # more releases than holds change nothing
    held = route.held_time()
    assert 0.1 <= held < 0.5
    time.sleep(0.02)
    assert route.held_time() == held


def test_client_options_are_checked() -> None:
    with pytest.raises(TypeError, match="approvals must be True, False or a policy"):
        ExecutionClient(port=1, approvals="yes")  # type: ignore[arg-type]
    for bad in (0, -1, float("nan"), 10**6):
        with pytest.raises(ValueError, match="approval_timeout"):
            ExecutionClient(port=1, approvals=True, approval_timeout=bad)
    client = ExecutionClient(port=1, approvals=AllowList(["x"]))
    assert client.approvals and client.approval_timeout == 300


async def test_a_policy_per_execution_needs_approvals_on() -> None:
    client = ExecutionClient(port=1)
    with pytest.raises(ValueError, match="approve=... needs a client with approvals on"):
        await client.submit("1", approve=AllowList(["x"]))


async def test_a_sandbox_that_does_not_confirm_approvals_is_an_old_image(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ipybox._approvals.ENABLE_TIMEOUT", 0.05)
    with pytest.raises(ImageError, match="Rebuild it with `ipybox build`"):
        await Desk().desk.enable()
    d = Desk()
    enabling = asyncio.ensure_future(d.desk.enable())
    await settle()
    d.desk.receive({"msg_type": "ipybox_approvals_reply", "content": {"enabled": False, "error": "timeout must be"}})
    with pytest.raises(RequestRefusedError, match="refused to turn approvals on: timeout must be"):
        await enabling
