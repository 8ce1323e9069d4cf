"""Loss detection after a websocket cut: the kernel's message numbers, and the errors it reports."""

from __future__ import annotations

from typing import Any

import pytest

import ipybox
from ipybox._router import CutWindow as _CutWindow
from ipybox._router import is_idle as _is_idle
from ipybox._router import message_number as _numbered

TAG = "0f1e2d3c-aaaa-bbbb-cccc-0123456789ab_4242"


def numbered(n: int, msg_type: str = "stream", tag: str = TAG, state: str = "idle") -> dict[str, Any]:
    return {"header": {"msg_id": f"{tag}_{n}"}, "msg_type": msg_type, "content": {"execution_state": state}}


def test_message_ids_of_jupyter_client_are_numbered() -> None:
    assert _numbered(numbered(17)) == (TAG, 17)
    assert _numbered({"header": {"msg_id": "3f2a9c0e4b5d4e6f8a7b6c5d4e3f2a1b"}}) is None  # older kernels: uuid
    assert _numbered({"header": {}}) is None
    assert _numbered({}) is None
    assert _numbered({"header": {"msg_id": "_12"}}) is None


def test_a_window_without_gaps_is_complete() -> None:
    window = _CutWindow(TAG, 10)
    window.seen.update({11, 12, 13})
    assert window.complete_through(numbered(13, "status"))


def test_a_missing_number_between_the_cut_and_the_idle_is_a_loss() -> None:
    window = _CutWindow(TAG, 10)
    window.seen.update({11, 13})
    assert not window.complete_through(numbered(13, "status"))
    window.seen.add(12)  # arrived late, out of order
    assert window.complete_through(numbered(13, "status"))


def test_unknown_numbering_cannot_be_checked_and_passes() -> None:
    assert _CutWindow(None, -1).complete_through(numbered(99))
    assert _CutWindow(TAG, 10).complete_through({"header": {"msg_id": "no-number"}})
    # A message of another kernel process (a restart) is not compared with the old numbers.
    assert _CutWindow(TAG, 10).complete_through(numbered(3, tag="other_1"))


def test_is_idle() -> None:
    assert _is_idle({"msg_type": "status", "content": {"execution_state": "idle"}})
    assert not _is_idle({"msg_type": "status", "content": {"execution_state": "busy"}})
    assert not _is_idle({"msg_type": "stream", "content": {"text": "idle"}})


def test_outcome_unknown_is_its_own_branch_with_the_kernel_id() -> None:
    # Not a ServerConnectionError: code that retries on a lost connection must not re-run it.
    error = ipybox.ExecutionOutcomeUnknownError("lost", kernel_id="k1")
    assert not isinstance(error, ipybox.ServerConnectionError)
    assert isinstance(error, ipybox.IpyboxError)
    assert not isinstance(error, ipybox.KernelError)
    assert error.kernel_id == "k1" and str(error) == "lost"


def test_timeout_error_says_whether_the_kernel_was_restarted() -> None:
    assert ipybox.ExecutionTimeoutError("t").restarted is False
    error = ipybox.ExecutionTimeoutError("t", restarted=True)
    assert error.restarted is True and isinstance(error, TimeoutError) and str(error) == "t"


def test_the_gateways_kernel_info_nudge_excuses_its_unseen_messages() -> None:
    # Seen: our output 11, the nudge's idle 14 (its busy 12 was swallowed, its reply 13 went to the
    # gateway), our idle 15.
    window = _CutWindow(TAG, 10)
    nudge = {"msg_id": "gateway-request", "msg_type": "kernel_info_request"}
    for n, message in (
        (11, numbered(11)),
        (14, {**numbered(14, "status"), "parent_header": nudge}),
        (15, numbered(15)),
    ):
        window.note(message, n)
    assert window.complete_through(numbered(15, "status"))
    # One more number missing than the nudge explains: a lost message of ours.
    window = _CutWindow(TAG, 9)
    for n, message in (
        (11, numbered(11)),
        (14, {**numbered(14, "status"), "parent_header": nudge}),
        (15, numbered(15)),
    ):
        window.note(message, n)
    assert not window.complete_through(numbered(15, "status"))
    # Our own kernel_info requests excuse nothing.
    window = _CutWindow(TAG, 10)
    window.ours.add("gateway-request")
    for n, message in (
        (11, numbered(11)),
        (14, {**numbered(14, "status"), "parent_header": nudge}),
        (15, numbered(15)),
    ):
        window.note(message, n)
    assert not window.complete_through(numbered(15, "status"))


def test_repeated_nudges_with_the_same_request_id_each_excuse_their_messages() -> None:
    # The gateway numbers each connection's requests from 0: three nudges share one id.
    window = _CutWindow(TAG, 17)
    nudge = {"msg_id": "gateway_7_1", "msg_type": "kernel_info_request"}
    for idle in (20, 24, 28):
        window.note({**numbered(idle, "status"), "parent_header": nudge}, idle)
    for n in (21, 25, 29, 30):
        window.note(numbered(n), n)
    assert window.complete_through(numbered(30, "status"))
    window.seen.discard(21)
    assert not window.complete_through(numbered(30, "status"))


def test_every_error_takes_a_message_and_keyword_only_context() -> None:
    """One constructor shape: message, then container_id/kernel_id/status/option by keyword."""
    special = {ipybox.ImageNotFoundError, ipybox.DependencyFileError}
    errors = [
        value
        for value in vars(ipybox).values()
        if isinstance(value, type) and issubclass(value, ipybox.IpyboxError) and value not in special
    ]
    assert len(errors) > 15
    for cls in errors:
        error = cls("m", container_id="c" * 64, kernel_id="k", status=409, option="x=...")
        assert (error.container_id, error.kernel_id, error.status, error.option) == ("c" * 64, "k", 409, "x=..."), cls
        assert str(error).endswith("m"), cls
        if not issubclass(cls, ipybox.ExecutionError):  # its second argument is the trace
            with pytest.raises(TypeError):
                cls("m", "positional context")
