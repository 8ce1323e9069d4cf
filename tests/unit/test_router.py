"""The router from recorded kernel message sequences: no sockets, no kernel.

Each sequence is what a real ipykernel 7.4 sent through the Kernel Gateway (message ids numbered as
jupyter_client numbers them, `<session>_<pid>_<n>`), trimmed to the fields the router reads.
"""

from __future__ import annotations

from typing import Any

import pytest

from ipybox import ExecutionOutcomeUnknownError, KernelDiedError
from ipybox._router import IDLE, STARTED, KernelState, Phase, Recovery, Route, Router, Terminal, aborted_error

TAG = "a1b2c3_42"


class Kernel:
    """Numbers messages as jupyter_client does, so the cut checks see real ids."""

    def __init__(self, tag: str = TAG) -> None:
        self.tag = tag
        self.n = 0

    def message(self, parent: str | None, msg_type: str, channel: str = "iopub", **content: Any) -> dict[str, Any]:
        self.n += 1
        return {
            "channel": channel,
            "header": {"msg_id": f"{self.tag}_{self.n}", "msg_type": msg_type},
            "msg_type": msg_type,
            "parent_header": {"msg_id": parent} if parent else {},
            "content": content,
        }

    def status(self, parent: str | None, state: str) -> dict[str, Any]:
        return self.message(parent, "status", execution_state=state)

    def run(self, parent: str, text: str = "", error: tuple[str, str] | None = None) -> list[dict[str, Any]]:
        """The messages of one execute_request, in the order the gateway relayed them."""
        messages = [self.status(parent, "busy"), self.message(parent, "execute_input", code="...", execution_count=1)]
        if text:
            messages.append(self.message(parent, "stream", name="stdout", text=text))
        if error is not None:
            messages.append(self.message(parent, "error", ename=error[0], evalue=error[1], traceback=["tb"]))
            reply = self.message(
                parent, "execute_reply", "shell", status="error", ename=error[0], evalue=error[1], traceback=["tb"]
            )
        else:
            reply = self.message(parent, "execute_reply", "shell", status="ok", execution_count=1)
        return [*messages, reply, self.status(parent, "idle")]

    def skip(self, parent: str) -> list[dict[str, Any]]:
        """An aborted request: its idle (IOPub) overtook its reply (shell), as recorded."""
        busy, idle = self.status(parent, "busy"), self.status(parent, "idle")
        reply = self.message(parent, "execute_reply", "shell", status="aborted")
        return [busy, idle, reply]


def items(route: Route) -> list[Any]:
    out = []
    while not route.queue.empty():
        out.append(route.queue.get_nowait())
    return out


def feed(router: Router, messages: list[dict[str, Any]]) -> list[Route]:
    held = []
    for message in messages:
        if (route := router.receive(message)) is not None:
            held.append(route)
    return held


def test_an_execution_is_queued_then_running_then_finished() -> None:
    router, kernel = Router("k"), Kernel()
    first = router.register(1000, 1000)
    second = router.register(1000, 1000)
    # The oldest pending execution is the one the kernel runs: its clock starts at once.
    assert first.phase is Phase.RUNNING and second.phase is Phase.QUEUED
    messages = kernel.run(first.msg_id, text="hi\n")
    feed(router, messages)
    assert first.phase is Phase.FINISHED
    assert items(first) == [STARTED, ("stream", "stdout", "hi\n"), IDLE]
    assert first.execution_count == 1
    # It ended, so the kernel runs the next one now, even before any message of it arrives (code
    # holding the GIL in C keeps the kernel from sending busy).
    assert second.phase is Phase.RUNNING and items(second) == [STARTED]
    feed(router, kernel.run(second.msg_id))
    assert second.phase is Phase.FINISHED and not router.pending


def test_a_cancelled_head_starts_the_next() -> None:
    router = Router("k")
    first, second = router.register(1000, 1000), router.register(1000, 1000)
    router.forget(first)
    assert second.phase is Phase.RUNNING


def test_a_request_skipped_after_a_failure_is_aborted_and_names_the_failure() -> None:
    router, kernel = Router("k"), Kernel()
    failing, skipped = router.register(1000, 1000), router.register(1000, 1000)
    feed(router, kernel.run(failing.msg_id, error=("ZeroDivisionError", "division by zero")))
    last = kernel.skip(skipped.msg_id)
    feed(router, last[:2])
    assert not skipped.done, "the idle alone must not end it: its reply says whether it ran"
    feed(router, last[2:])
    assert skipped.done and skipped.aborted and skipped.execution_count is None
    error = aborted_error(skipped)
    assert "did not run" in str(error) and "ZeroDivisionError: division by zero" in str(error)
    assert not router.pending


def test_a_restart_fails_every_pending_execution() -> None:
    router, kernel = Router("k"), Kernel()
    running, queued = router.register(1000, 1000), router.register(1000, 1000)
    feed(router, kernel.run(running.msg_id)[:2])
    feed(router, [kernel.status(None, "restarting")])
    assert router.kernel is KernelState.RESTARTING and not router.pending
    for route in (running, queued):
        assert route.phase is Phase.FAILED
        terminal = items(route)[-1]
        assert isinstance(terminal, Terminal) and isinstance(terminal.error, KernelDiedError)


def test_death_by_the_oom_killer_names_memory_limit() -> None:
    router = Router("k")
    route = router.register(1000, 1000)
    dead = Kernel().status(None, "dead")
    dead["content"]["ipybox_reason"] = "out of memory"
    feed(router, [dead])
    assert router.kernel is KernelState.DEAD
    terminal = items(route)[-1]
    assert "out of memory" in str(terminal.error) and "memory_limit" in str(terminal.error)


def test_after_a_cut_an_end_with_a_gap_is_held_and_reports_lost_output_if_the_gap_stays() -> None:
    router, kernel = Router("k"), Kernel()
    route = router.register(1000, 1000)
    messages = kernel.run(route.msg_id, text="x\n")
    feed(router, messages[:2])
    assert router.begin_cut() == [route] and route.recovery is Recovery.SUSPECT
    window = router.window
    assert window is not None
    # The stream message is lost in the cut; reply and idle come with the gateway's replay.
    held = feed(router, messages[3:])
    assert held == [route] and route.recovery is Recovery.HELD
    router.settle(route, messages[-1], window)
    # Its reply is here, so how it ended is known: it finished; the lost stream is reported.
    assert route.phase is Phase.FINISHED and route.lost and route.truncated
    assert "lost when the connection broke" in route.marker()


def test_an_error_whose_message_was_lost_comes_from_the_reply() -> None:
    router, kernel = Router("k"), Kernel()
    route = router.register(1000, 1000)
    messages = kernel.run(route.msg_id, error=("ValueError", "bad"))
    feed(router, messages[:2])
    router.begin_cut()
    window = router.window
    assert window is not None
    held = feed(router, messages[3:])  # the error message is lost in the cut
    assert held == [route]
    router.settle(route, messages[-1], window)
    assert route.error is not None and route.error.name == "ValueError" and route.error.value == "bad"
    assert ("error", route.error) in items(route)


def test_after_a_cut_a_complete_replay_finishes_the_execution() -> None:
    router, kernel = Router("k"), Kernel()
    route = router.register(1000, 1000)
    messages = kernel.run(route.msg_id, text="x\n")
    feed(router, messages[:2])
    router.begin_cut()
    assert feed(router, messages[2:]) == []
    assert route.phase is Phase.FINISHED
    router.recovered([route], router.window, restarted=False)
    assert route.phase is Phase.FINISHED


def test_a_suspect_whose_end_never_came_has_an_unknown_outcome() -> None:
    router, kernel = Router("k"), Kernel()
    route = router.register(1000, 1000)
    feed(router, kernel.run(route.msg_id)[:2])
    suspects = router.begin_cut()
    router.recovered(suspects, router.window, restarted=True)
    assert route.phase is Phase.FAILED
    error = items(route)[-1].error
    assert isinstance(error, ExecutionOutcomeUnknownError) and "restarted meanwhile" in str(error)


def test_a_refused_message_is_charged_to_the_running_execution_and_excused() -> None:
    router, kernel = Router("k"), Kernel()
    running, queued = router.register(1000, 1000), router.register(1000, 1000)
    messages = kernel.run(running.msg_id, text="big")
    feed(router, messages[:2])
    kernel_numbered_refusal = messages[2]  # refused by its header: never read, so never seen
    router.refused(5_000_000)
    router.begin_cut()
    assert running.dropped == 5_000_000 and running.truncated
    assert queued.dropped == 0
    assert kernel_numbered_refusal["header"]["msg_id"].endswith("_3")
    assert feed(router, messages[3:]) == []
    assert running.phase is Phase.FINISHED
    assert "at least" not in running.marker() and "5,000,000 bytes dropped" in running.marker()


@pytest.mark.parametrize("kind", ["forgotten", "ended"])
def test_forgotten_and_ended_routes_leave_the_pending_map(kind: str) -> None:
    router, kernel = Router("k"), Kernel()
    route = router.register(1000, 1000)
    if kind == "forgotten":
        router.forget(route)
    else:
        feed(router, kernel.run(route.msg_id))
    assert router.executions() == []
    # A message for a forgotten request reaches no one.
    assert feed(router, kernel.run(route.msg_id)) == []
