"""What a stream of kernel messages means for the executions of one client: routing, accounting,
aborted requests, kernel restarts and deaths, and the check after a websocket cut. No I/O.

`Router.receive()` is fed every message the websocket brings; each message goes to the `Route` of the
request it answers (`parent_header.msg_id`). A route accounts for its output before anything is
queued, so an execution holds at most its cap however fast output arrives. The code that owns the
websocket (`ipybox._channel`) only moves bytes and timers; what they mean is decided here, so it can be
tested from recorded message sequences (tests/unit/test_router.py).

An execution's life, `Route.phase`:

    QUEUED ──head of the queue, or busy──▶ RUNNING ──idle and reply──▶ FINISHED  (result, error, aborted)
       │                │
       └────────────────┴──terminal──▶ FAILED        (kernel died or restarted, connection lost,
                                                      outcome unknown after a cut)

and, independently, what a websocket cut means for it, `Route.recovery`:

    CLEAN ──cut──▶ SUSPECT ──its end with messages missing──▶ HELD ──gap filled──▶ (FINISHED)
                      │                                      └──gap stays──▶ (FINISHED, output lost:
                      │                                          the reply says how it ended)
                      └──its end not in the gateway's replay──▶ (FAILED: outcome unknown)
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import time
import uuid
from collections.abc import Callable
from typing import Any

from ipybox._errors import ExecutionAbortedError, ExecutionOutcomeUnknownError, KernelDiedError
from ipybox._escapes import split_unfinished_escape, strip_escapes
from ipybox.outputs import ErrorInfo, Output, bundle_charge, dropped_image_output, error_info, output_from_content

ITEM_OVERHEAD = 64
"""Bytes each kept output is charged besides its content: the bookkeeping of a tiny output is
larger than its text, and a flood of tiny outputs must hit the cap as well."""


class Phase(enum.Enum):
    QUEUED = "queued"  # sent; the kernel has not started it (it runs requests one at a time)
    RUNNING = "running"  # the kernel announced busy for it
    FINISHED = "finished"  # its idle status arrived
    FAILED = "failed"  # ended without its idle: a terminal error was queued


class Recovery(enum.Enum):
    CLEAN = "clean"  # no websocket cut while it was pending
    SUSPECT = "suspect"  # pending at a cut: its end is checked for messages lost in the cut
    HELD = "held"  # its end came while messages numbered before it are missing: waiting for them


class Terminal:
    """Queued for an execution that can receive no more messages (disconnect, death, unknown outcome)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


STARTED = ("started", None)
IDLE = ("idle", None)
RELEASED = ("released", None)


def utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def utf8_head(text: str, size: int) -> str:
    """The longest prefix of `text` whose UTF-8 encoding has at most `size` bytes."""
    if text.isascii():
        return text[:size]
    return text.encode("utf-8", "surrogatepass")[:size].decode("utf-8", "ignore")


class Route:
    """The reader's side of one request: where its output goes and how much of it is kept.

    Past the limit, output is counted and dropped; the request is still followed to its idle status.

    Queue items: STARTED, ("stream", name, text), ("output", msg_type, Output), ("clear", wait),
    ("error", ErrorInfo), ("marker", text), ("approval", ToolCallRequest), RELEASED, IDLE, or a
    `Terminal`.

    While the code waits for the application to approve a call (`hold()` until `release()`), the
    execution's timeout clock is paused: `held_time()` is the time spent so.
    """

    def __init__(self, msg_id: str, limit: int | None, cap_name: int | None, raw: bool = False) -> None:
        self.msg_id = msg_id
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.limit = limit
        self.cap_name = cap_name
        self.raw = raw  # kernel_info requests of the client itself: whole messages, no accounting
        self.phase = Phase.QUEUED
        self.recovery = Recovery.CLEAN
        self.used = 0
        self.dropped = 0
        self.truncated = False
        self.lost = False  # messages of it went missing (refused or cut): `dropped` is a lower bound
        self.aborted = False  # the kernel answered "aborted": it skipped the request without running it
        self.replied = False  # its execute_reply arrived
        self._reply_error: ErrorInfo | None = None
        self.idle = False  # its idle status arrived
        self.skipped_after: str | None = None  # for an aborted one: the earlier failure, "Name: value"
        self.kernel_id: str | None = None
        self.error: ErrorInfo | None = None
        self.execution_count: int | None = None
        self.submitted = time.monotonic()
        self.ended: float | None = None
        self._carry: dict[str, str] = {}  # per stream: an escape sequence cut at the end of its last chunk
        self._last_clear = False  # the last item queued was a clear_output
        self.policy: Any = None  # the approval policy of this execution (`submit(approve=...)`)
        self.holds = 0  # calls of the code waiting for an approval
        self._held_since: float | None = None
        self._held_total = 0.0
        self.on_end: Callable[[Route], None] | None = None  # called once when it finishes or fails

    @property
    def done(self) -> bool:
        return self.phase in (Phase.FINISHED, Phase.FAILED)

    @property
    def duration(self) -> float:
        return (time.monotonic() if self.ended is None else self.ended) - self.submitted

    def ends_with(self, message: dict[str, Any]) -> bool:
        """True if `message` completes the request: its idle status or its reply, whichever comes last."""
        if is_idle(message):
            return self.replied
        return message.get("msg_type") == "execute_reply" and self.idle

    def deliver(self, message: dict[str, Any]) -> bool:
        """Account for and queue one message; True once the request has ended.

        A request ends when both its idle status (IOPub) and its `execute_reply` (shell) have
        arrived: output may follow the reply, and the two channels are not ordered with each other
        (an aborted request's idle often overtakes its reply).
        """
        if self.raw:
            self.queue.put_nowait(message)
            return False
        self.start()  # any message of it says the kernel runs it
        msg_type = message["msg_type"]
        content = message["content"]
        if msg_type == "stream":
            self._stream(str(content.get("name", "stdout")), str(content.get("text", "")))
        elif msg_type in ("execute_result", "display_data", "update_display_data"):
            self._flush_carry()
            self._output(msg_type, output_from_content(content, msg_type))
        elif msg_type == "clear_output":
            self._flush_carry()
            self._clear(bool(content.get("wait")))
        elif msg_type == "error":
            self._flush_carry()
            self._error(error_info(content))
        elif msg_type in ("execute_input", "execute_reply"):
            count = content.get("execution_count")
            if self.execution_count is None and isinstance(count, int) and not isinstance(count, bool):
                self.execution_count = count
            if msg_type == "execute_reply":
                self.replied = True
                self.aborted = content.get("status") == "aborted"
                if content.get("status") == "error":
                    # The reply repeats the exception: it still says what happened when the error
                    # message itself was lost in a cut.
                    self._reply_error = error_info(content)
                return self._end_if_complete()
        elif msg_type == "status" and content.get("execution_state") == "idle":
            self.idle = True
            return self._end_if_complete()
        return False

    def _end_if_complete(self) -> bool:
        if self.replied and self.idle:
            self.finish()
            return True
        return False

    def start(self) -> None:
        """The kernel runs this request now (or is about to): its timeout clock starts."""
        if self.phase is Phase.QUEUED and not self.raw:
            self.phase = Phase.RUNNING
            self.queue.put_nowait(STARTED)

    def finish(self) -> None:
        if not self.done:
            self.phase = Phase.FINISHED
            self.ended = time.monotonic()
            self._flush_carry()
            if self.error is None and self._reply_error is not None:
                self._error(self._reply_error)
            self.queue.put_nowait(IDLE)
            self._ended()

    def ask(self, request: Any) -> None:
        """A call of the code waits for approval: queued as an event (outside the output cap), and
        the timeout clock pauses until it is `release()`d."""
        self.hold()
        self.queue.put_nowait(("approval", request))

    def hold(self) -> None:
        if self.holds == 0:
            self._held_since = time.monotonic()
        self.holds += 1

    def release(self) -> None:
        """A call waits no more (decided or expired); the clock runs again once none waits."""
        if self.holds == 0:
            return
        self.holds -= 1
        if self.holds == 0 and self._held_since is not None:
            self._held_total += time.monotonic() - self._held_since
            self._held_since = None
        self.queue.put_nowait(RELEASED)  # wakes a reader that waits without a deadline

    def held_time(self) -> float:
        """Seconds calls of the code have waited for approval (at least one at a time), so far."""
        if self._held_since is None:
            return self._held_total
        return self._held_total + time.monotonic() - self._held_since

    def _ended(self) -> None:
        on_end, self.on_end = self.on_end, None
        if on_end is not None:
            on_end(self)

    def lose(self) -> None:
        """Messages of this request went missing in a cut; its reply still says how it ended."""
        self.lost = True
        if not self.truncated:
            self.truncated = True
            self._put(("marker", "\n[output lost: messages of this execution were lost when the connection broke]\n"))

    def fail(self, error: Exception) -> None:
        if not self.done:
            self.phase = Phase.FAILED
            self.ended = time.monotonic()
            self.queue.put_nowait(Terminal(error))
            self._ended()

    def drop(self, size: int) -> None:
        self.dropped += size
        if not self.truncated:
            self.truncated = True
            self._put(("marker", f"\n[output truncated: output past max_output_bytes={self.cap_name} is dropped]\n"))

    def marker(self) -> str:
        if self.lost and not self.dropped:
            return "[output truncated: messages of this execution were lost when the connection broke]"
        at_least = "at least " if self.lost else ""
        return f"[output truncated: {at_least}{self.dropped:,} bytes dropped past max_output_bytes={self.cap_name}]"

    def _put(self, item: tuple[Any, ...]) -> None:
        self._last_clear = item[0] == "clear"
        self.queue.put_nowait(item)

    def _room(self) -> int | None:
        return None if self.limit is None else self.limit - self.used

    def _fits(self, size: int) -> bool:
        room = self._room()
        return room is None or size + ITEM_OVERHEAD <= room

    def _stream(self, name: str, text: str) -> None:
        carry = self._carry.pop(name, "")
        text, held = split_unfinished_escape(carry + text if carry else text)
        if held:
            self._carry[name] = held
        self._keep_text(name, strip_escapes(text))

    def _flush_carry(self) -> None:
        """Any other output ends the held escape sequences: what is held is stripped and kept."""
        if self._carry:
            carries, self._carry = self._carry, {}
            for name, carry in carries.items():
                self._keep_text(name, strip_escapes(carry))

    def _keep_text(self, name: str, text: str) -> None:
        if not text:
            return
        size = utf8_size(text)
        if self._fits(size):
            self.used += size + ITEM_OVERHEAD
            self._put(("stream", name, text))
            return
        head = self._head(text)
        if head:
            kept = utf8_size(head)
            self.used += kept + ITEM_OVERHEAD
            self._put(("stream", name, head))
            size -= kept
        self.drop(size)

    def _head(self, text: str) -> str:
        """The longest head of `text` that fits the room left."""
        room = self._room()
        if room is None:
            return text
        return utf8_head(text, room - ITEM_OVERHEAD) if room > ITEM_OVERHEAD else ""

    def _output(self, msg_type: str, output: Output) -> None:
        """A MIME bundle is kept whole when it fits. An image bundle that does not fit, or whose image
        cannot be decoded, is replaced by a marked output (`dropped_image_output`); any other bundle
        that does not fit is reduced to (the head of) its text/plain, marked `truncated`, unless it
        is an update: that is dropped whole."""
        charge = bundle_charge(output)
        size = charge.size
        if charge.unreadable is None and self._fits(size):
            self.used += size + ITEM_OVERHEAD
            self._put(("output", msg_type, output))
            return
        if charge.has_image:
            marked = dropped_image_output(output, charge, cap=self.cap_name, room=self._room())
            marked_size = bundle_charge(marked).size
            if self._fits(marked_size):
                self.used += marked_size + ITEM_OVERHEAD
                self._put(("output", msg_type, marked))
            else:
                self.drop(marked_size)
            if charge.unreadable is None:  # an undecodable image is not output past the cap
                self.drop(size)
            return
        plain = output.data.get("text/plain")
        head = "" if msg_type == "update_display_data" or not isinstance(plain, str) else self._head(plain)
        if head:
            kept = utf8_size(head)
            self.used += kept + ITEM_OVERHEAD
            reduced = dataclasses.replace(output, data={"text/plain": head}, metadata={}, truncated=True)
            self._put(("output", msg_type, reduced))
            size -= kept
        self.drop(size)

    def _clear(self, wait: bool) -> None:
        if self._fits(0):
            self.used += ITEM_OVERHEAD
            self._put(("clear", wait))
        elif not self._last_clear:
            # Past the cap a clear is still applied (it only shrinks what is shown); consecutive
            # ones are queued once, so a flood of them cannot grow the queue.
            self._put(("clear", wait))

    def _error(self, info: ErrorInfo) -> None:
        first = self.error is None
        self.error = info
        size = utf8_size(info.traceback) + utf8_size(info.value)
        if first or self._fits(size):
            # A request has one error; its event is always queued. Further ones (only code that
            # forges kernel messages sends them) are accounted like any output.
            self.used += size + ITEM_OVERHEAD
            self._put(("error", info))
        else:
            self.drop(size)


class CutWindow:
    """What the reader saw of the kernel's numbered messages since the websocket broke.

    jupyter_client numbers every message a kernel sends (`header.msg_id` is
    `<session>_<pid>_<n>`, n counting up over all channels). While an execution runs, every
    message the kernel sends comes to this client, so a number missing between the last one seen
    before the cut and an execution's idle is a message lost in the cut. The exceptions: the
    kernel_info requests with which the gateway nudges a new websocket (on the control channel too,
    so served at once): their replies go to the gateway, and it swallows the first IOPub message
    after a nudge; each such request excuses those of its three messages (busy, reply, idle) not seen.
    And a message the client refused as too big (`excused`): it is counted as dropped output.
    """

    def __init__(self, tag: str | None, mark: int) -> None:
        self.tag = tag  # "<session>_<pid>" of the kernel before the cut; None: never saw one
        self.mark = mark  # the highest number seen before the cut
        self.seen: set[int] = set()
        self.ours: set[str] = set()  # ids of this client's requests pending at or sent since the cut
        # (number, is idle) of each message seen for a kernel_info request of the gateway. Its
        # requests cannot be told apart by id (each new connection numbers them from 0 again); each
        # ends with one idle status, so the idle statuses count them.
        self.foreign: list[tuple[int, bool]] = []
        self.excused = 0  # messages refused as too big since the cut: missing on purpose
        self.shutdown = False  # the kernel announced its shutdown (a restart) since the cut

    def complete_through(self, message: dict[str, Any]) -> bool:
        """True unless a message numbered between the cut and this one never arrived."""
        numbered = message_number(message)
        if self.tag is None or numbered is None or numbered[0] != self.tag:
            return True
        last = numbered[1]
        missing = sum(1 for n in range(self.mark + 1, last + 1) if n not in self.seen)
        if not missing:
            return True
        foreign = [idle for number, idle in self.foreign if number <= last]
        return missing <= 3 * sum(foreign) - len(foreign) + self.excused

    def note(self, message: dict[str, Any], number: int) -> None:
        self.seen.add(number)
        if message.get("msg_type") == "shutdown_reply":
            self.shutdown = True
        parent = message.get("parent_header") or {}
        if parent.get("msg_type") == "kernel_info_request" and parent.get("msg_id") not in self.ours:
            self.foreign.append((number, is_idle(message)))


def message_number(message: dict[str, Any]) -> tuple[str, int] | None:
    """("<session>_<pid>", n) from a jupyter_client message id, or None for another format."""
    tag, _, number = str((message.get("header") or {}).get("msg_id", "")).rpartition("_")
    return (tag, int(number)) if tag and number.isdigit() else None


def is_idle(message: dict[str, Any]) -> bool:
    return message.get("msg_type") == "status" and message["content"].get("execution_state") == "idle"


class KernelState(enum.Enum):
    ALIVE = "alive"
    RESTARTING = "restarting"  # the gateway restarted it: the next request waits until it answers
    DEAD = "dead"  # the gateway could not restart it: nothing more can run


class Router:
    """The pending requests of one kernel connection and what each incoming message means for them."""

    def __init__(self, kernel_id: str | None = None) -> None:
        self.kernel_id = kernel_id
        self.pending: dict[str, Route] = {}
        self.kernel = KernelState.ALIVE
        self.window: CutWindow | None = None  # set from a cut until its recovery is done
        self.last_failure: str | None = None  # "Name: value" of the newest execution that raised
        # The kernel's message ids count up ("<session>_<pid>_<n>"): the tag and the highest n seen.
        self.kernel_tag: str | None = None
        self.last_number = -1

    def register(self, limit: int | None, cap_name: int | None, raw: bool = False) -> Route:
        route = Route(uuid.uuid4().hex, limit, cap_name, raw)
        route.kernel_id = self.kernel_id
        self.pending[route.msg_id] = route
        self._start_head()
        if self.window is not None:
            self.window.ours.add(route.msg_id)
        return route

    def forget(self, route: Route) -> None:
        """Stop routing to `route` (ended, never sent, or given up by its reader)."""
        if self.pending.get(route.msg_id) is route:
            del self.pending[route.msg_id]
            self._start_head()

    def _start_head(self) -> None:
        """The oldest pending execution is the one the kernel runs: it serves this client's requests
        one at a time, in order. This starts its clock even when the kernel cannot say so: code that
        holds the GIL in C (`sum(range(10**15))`) keeps the kernel's IOPub thread from sending busy."""
        for route in self.pending.values():
            if not route.raw:
                route.start()
                return

    def executions(self) -> list[Route]:
        """Pending executions (not the client's own kernel_info requests), oldest first."""
        return [route for route in self.pending.values() if not route.raw]

    def receive(self, message: dict[str, Any]) -> Route | None:
        """Route one message. Returns a route to hold: its last message (idle or reply) came while
        messages numbered before it are missing after a cut (the caller settles it after a grace
        period, `settle()`)."""
        if message.get("msg_type") == "status":
            state = message["content"].get("execution_state")
            if state in ("restarting", "dead"):
                self._kernel_lost(state, message["content"].get("ipybox_reason"))
                return None
        self._note(message)
        parent_id = (message.get("parent_header") or {}).get("msg_id")
        route = self.pending.get(parent_id) if parent_id else None
        if route is None or route.recovery is Recovery.HELD:
            return None
        window = self.window
        if route.recovery is Recovery.SUSPECT and window is not None and route.ends_with(message):
            if not window.complete_through(message):
                route.recovery = Recovery.HELD
                return route
        if route.deliver(message):
            self._ended(route)
        return None

    def settle(self, route: Route, last: dict[str, Any], window: CutWindow) -> None:
        """End a held route after its grace period. Its idle and its reply are both here, so how it
        ended is known (the reply says ok, error or aborted); a gap still open means lost output,
        which the result says."""
        if route.done or self.pending.get(route.msg_id) is not route:
            return
        if not window.complete_through(last):
            route.lose()
        route.deliver(last)
        self._ended(route)

    def begin_cut(self) -> list[Route]:
        """The websocket broke: every pending execution becomes a suspect whose end is checked."""
        suspects = self.executions()
        if suspects and self.window is None:
            self.window = CutWindow(self.kernel_tag, self.last_number)
        if self.window is not None:
            self.window.ours.update(self.pending)
        for route in suspects:
            if route.recovery is Recovery.CLEAN:
                route.recovery = Recovery.SUSPECT
        return suspects

    def refused(self, size: int) -> None:
        """A message too big to read closed the websocket: it belongs to the running execution.

        The kernel runs one request at a time, so that is the oldest one pending (the one it
        announced busy for, if any). The message is counted as dropped output and excused from the
        cut check that follows, which treats the re-open like any cut.
        """
        executions = self.executions()
        running = [route for route in executions if route.phase is Phase.RUNNING] or executions
        if running:
            running[0].drop(size)
        if self.window is None:
            self.window = CutWindow(self.kernel_tag, self.last_number)
        self.window.excused += 1

    def recovered(self, suspects: list[Route], window: CutWindow | None, restarted: bool) -> None:
        """The recovery barrier came back: every suspect whose end did not arrive has an unknown outcome."""
        if window is not None and restarted:
            window.shutdown = True
        why = self.cut_reason(window)
        for route in suspects:
            if not route.done and route.recovery is not Recovery.HELD and self.pending.get(route.msg_id) is route:
                self.fail(route, outcome_unknown(why, self.kernel_id))

    def cut_reason(self, window: CutWindow | None) -> str:
        cut = f"the connection to kernel {self.kernel_id} broke during the execution"
        if window is not None and (window.shutdown or (window.tag is not None and self.kernel_tag != window.tag)):
            return f"{cut} and the kernel was restarted meanwhile (its state, variables and imports, is lost)"
        return f"{cut} and its end did not come with the messages the gateway kept"

    def fail(self, route: Route, error: Exception) -> None:
        self.forget(route)
        route.fail(error)

    def fail_all(self, error: Exception) -> None:
        pending, self.pending = self.pending, {}
        for route in pending.values():
            route.fail(error)

    def _ended(self, route: Route) -> None:
        self.forget(route)
        if route.aborted:
            route.skipped_after = self.last_failure
        elif route.error is not None and not route.raw:
            self.last_failure = f"{route.error.name}: {route.error.value}"

    def _kernel_lost(self, state: str, reason: Any) -> None:
        # The gateway reports a kernel death with a status message that has no parent: every
        # pending execution is lost.
        self.kernel = KernelState.RESTARTING if state == "restarting" else KernelState.DEAD
        what = "was restarted" if state == "restarting" else "could not be restarted"
        # The server adds why, when it knows (the container's OOM killer).
        cause = f" ({reason}; raise the container's memory_limit)" if reason == "out of memory" else ""
        self.fail_all(
            KernelDiedError(
                f"kernel {self.kernel_id} died during execution{cause} and {what}; its state "
                "(variables, imports) is lost",
                kernel_id=self.kernel_id,
            )
        )

    def _note(self, message: dict[str, Any]) -> None:
        """Follow the numbers of the kernel's messages (see `CutWindow`)."""
        numbered = message_number(message)
        if numbered is None:
            return
        tag, number = numbered
        if tag != self.kernel_tag:
            self.kernel_tag, self.last_number = tag, number  # the first message, or a new kernel
        elif number > self.last_number:
            self.last_number = number
        window = self.window
        if window is not None and tag == window.tag:
            window.note(message, number)


def outcome_unknown(why: str, kernel_id: str | None) -> ExecutionOutcomeUnknownError:
    return ExecutionOutcomeUnknownError(
        f"{why}; the outcome of the execution is unknown: its code may or may not have run (fully or in "
        "part). It was not executed again; check the sandbox's state before running it again.",
        kernel_id=kernel_id,
    )


def aborted_error(route: Route) -> ExecutionAbortedError:
    """The error of an execution the kernel skipped (`execute_reply` status `aborted`)."""
    why = f" ({route.skipped_after})" if route.skipped_after else ""
    return ExecutionAbortedError(
        f"the execution did not run: kernel {route.kernel_id} skipped it because an earlier execution "
        f"failed{why} and was submitted with stop_on_error; nothing of its code ran. Submit it again "
        "once the earlier failure is dealt with, or await each execution before submitting the next.",
        kernel_id=route.kernel_id,
    )
