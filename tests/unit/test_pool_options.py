"""SandboxPool checks its arguments at once, before any container starts (no Docker needed)."""

from __future__ import annotations

import pytest

from ipybox import InvalidStateError, SandboxPool


@pytest.mark.parametrize("size", [0, -1])
def test_size_must_be_positive(size: int) -> None:
    with pytest.raises(ValueError, match="size must be at least 1"):
        SandboxPool(size)


def test_max_starting_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_starting must be at least 1"):
        SandboxPool(1, max_starting=0)


@pytest.mark.parametrize("option", ["executor_port", "resource_port"])
def test_fixed_ports_are_refused(option: str) -> None:
    with pytest.raises(ValueError, match=f"{option}=8888 cannot be used with a pool.*leave {option} unset"):
        SandboxPool(2, **{option: 8888})


def test_workspace_is_refused_and_idle_timeout_waits_for_the_hand_out() -> None:
    # A workspace holds one sandbox at a time; a spare's idle timer would run while it waits, so the
    # pool keeps idle_timeout out of the spares' options and arms it at hand-out.
    with pytest.raises(ValueError, match="workspace='ws' cannot be used with a pool"):
        SandboxPool(2, workspace="ws")
    pool = SandboxPool(2, idle_timeout=60)
    assert "idle_timeout" not in pool.container_options
    with pytest.raises(ValueError, match="idle_timeout"):
        SandboxPool(2, idle_timeout=-1)  # still checked at once
    SandboxPool(2, max_lifetime=3600, owner_bound=True)  # these apply to each sandbox alike


def test_unknown_option_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="memory_limt"):
        SandboxPool(1, memory_limt="1g")


def test_invalid_container_option_fails_at_construction() -> None:
    with pytest.raises(ValueError, match="memory_limit"):
        SandboxPool(1, memory_limit="lots")


def test_invalid_firewall_entry_fails_at_construction() -> None:
    with pytest.raises(ValueError, match="not a domain name"):
        SandboxPool(1, firewall=["bad domain!"])


async def test_acquire_before_start_is_refused() -> None:
    pool = SandboxPool(1)
    with pytest.raises(InvalidStateError, match="start"):
        await pool.acquire()
    await pool.close()
    with pytest.raises(InvalidStateError, match="closed"):
        await pool.acquire()


async def test_start_twice_is_refused() -> None:
    pool = SandboxPool(1)
    await pool.close()
    with pytest.raises(InvalidStateError):
        await pool.start()


def test_client_options_are_checked_at_once() -> None:
    with pytest.raises(ValueError, match="client_options cannot set host, port"):
        SandboxPool(1, client_options={"port": 1, "host": "x"})
    with pytest.raises(TypeError, match="approvals must be True, False or a policy"):
        SandboxPool(1, client_options={"approvals": "yes"})
    with pytest.raises(TypeError, match="heartbeat"):
        SandboxPool(1, client_options={"heartbeat": 5})
    assert SandboxPool(1, client_options={"approvals": True}).client_options == {"approvals": True}
