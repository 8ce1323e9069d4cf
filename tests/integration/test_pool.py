"""SandboxPool against real containers: hand-out, refill, single use, options, failures, shutdown."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import aiodocker
import pytest

from ipybox import (
    ContainerError,
    ExecutionClient,
    ExecutionContainer,
    ExecutionError,
    InvalidStateError,
    IpyboxError,
    Sandbox,
    SandboxPool,
)
from tests.integration.conftest import session_labels

READY_TIMEOUT = 60


def _pool(image: str, size: int = 1, **options: object) -> SandboxPool:
    labels = {**session_labels(), **dict(options.pop("labels", {}))}  # type: ignore[call-overload]
    return SandboxPool(size, tag=image, labels=labels, **options)


async def _containers(**label: str) -> list[str]:
    selector = [f"{key}={value}" for key, value in {**session_labels(), **label}.items()]
    docker = aiodocker.Docker()
    try:
        return [c.id for c in await docker.containers.list(all=True, filters={"label": selector})]
    finally:
        await docker.close()


async def test_hands_out_ready_sandboxes_and_refills(image: str) -> None:
    marker = uuid.uuid4().hex
    async with _pool(image, 2, labels={"pool-test": marker}) as pool:
        await pool.wait_ready(timeout=READY_TIMEOUT)
        assert pool.ready == 2
        async with pool.sandbox() as sandbox:
            assert isinstance(sandbox, Sandbox)
            result = await sandbox.client.execute("print(1)")
            assert result.text == "1"
            used = sandbox.container.container_id
        # Closed after use: its container is gone, and the pool is back at its size.
        assert used not in await _containers(**{"pool-test": marker})
        await pool.wait_ready(timeout=READY_TIMEOUT)
        assert len(await _containers(**{"pool-test": marker})) == 2
    assert await _containers(**{"pool-test": marker}) == []


async def test_never_reuses_a_sandbox(image: str) -> None:
    async with _pool(image, 1) as pool:
        seen = set()
        for _ in range(3):
            async with pool.sandbox() as sandbox:
                # Fresh state every time: a variable set by the previous user is not there.
                result = await sandbox.client.execute("print('secret' in globals()); secret = 1")
                assert result.text == "False"
                seen.add(sandbox.container.container_id)
        assert len(seen) == 3


async def test_readiness_probe_leaves_no_trace(image: str) -> None:
    # The pool's readiness probe is an empty cell, which IPython neither records nor counts: the first
    # cell sees the history of a fresh kernel.
    code = "print(In, get_ipython().execution_count)"
    async with _pool(image, 1) as pool, pool.sandbox() as sandbox:
        result = await sandbox.client.execute(code)
    async with ExecutionContainer(tag=image, labels=session_labels()) as container:
        async with ExecutionClient(port=container.executor_port) as client:
            fresh = await client.execute(code)
    assert result.text == fresh.text
    assert result.text is not None and result.text.startswith(f"['', {code!r}]")


async def test_honours_container_options(image: str) -> None:
    async with _pool(image, 1, env={"POOL_VALUE": "from-the-pool"}, memory_limit="512m") as pool:
        async with pool.sandbox() as sandbox:
            result = await sandbox.client.execute("import os; print(os.environ['POOL_VALUE'])")
            assert result.text == "from-the-pool"
            docker = aiodocker.Docker()
            try:
                info = await (await docker.containers.get(sandbox.container.container_id or "")).show()
            finally:
                await docker.close()
            assert info["HostConfig"]["Memory"] == 512 * 2**20


async def test_acquire_waits_when_empty_and_serves_concurrent_callers(image: str) -> None:
    async with _pool(image, 1) as pool:
        sandboxes = await asyncio.wait_for(asyncio.gather(*(pool.acquire() for _ in range(3))), READY_TIMEOUT)
        try:
            assert len({s.container.container_id for s in sandboxes}) == 3
            results = await asyncio.gather(*(s.client.execute("print(2 * 21)") for s in sandboxes))
            assert [r.text for r in results] == ["42"] * 3
        finally:
            for sandbox in sandboxes:
                await sandbox.close()


async def test_dead_idle_sandbox_is_discarded(image: str) -> None:
    async with _pool(image, 1) as pool:
        await pool.wait_ready(timeout=READY_TIMEOUT)
        idle = pool._ready._queue[0]  # type: ignore[attr-defined]
        docker = aiodocker.Docker()
        try:
            await (await docker.containers.get(idle.container.container_id or "")).kill()
        finally:
            await docker.close()
        await asyncio.sleep(0.5)  # the client's reader sees its websocket close
        async with pool.sandbox() as sandbox:
            assert sandbox.container.container_id != idle.container.container_id
            assert (await sandbox.client.execute("print('alive')")).text == "alive"


async def test_close_removes_handed_out_sandboxes(image: str) -> None:
    marker = uuid.uuid4().hex
    pool = _pool(image, 1, labels={"pool-test": marker})
    await pool.start()
    sandbox = await pool.acquire()
    await pool.close()
    assert sandbox.closed
    assert await _containers(**{"pool-test": marker}) == []
    with pytest.raises(InvalidStateError, match="closed"):
        await pool.acquire()
    await pool.close()  # idempotent


async def test_close_while_starting_leaves_nothing(image: str) -> None:
    marker = uuid.uuid4().hex
    pool = _pool(image, 3, labels={"pool-test": marker})
    await pool.start()
    await asyncio.sleep(0.3)  # starts are in flight, some mid-create
    await pool.close()
    assert await _containers(**{"pool-test": marker}) == []


async def test_failed_starts_reach_the_caller(image: str) -> None:
    # A network that does not exist: every start fails; acquire reports why instead of waiting forever.
    async with _pool(image, 1, network=f"ipybox-missing-{uuid.uuid4().hex[:8]}") as pool:
        with pytest.raises(IpyboxError) as info:
            await asyncio.wait_for(pool.acquire(), READY_TIMEOUT)
        assert isinstance(info.value, ContainerError | IpyboxError)
        assert "network" in str(info.value).lower()


async def test_sandbox_close_is_idempotent_and_errors_still_raise(image: str) -> None:
    async with _pool(image, 1) as pool:
        sandbox = await pool.acquire()
        with pytest.raises(ExecutionError):
            await sandbox.client.execute("1 / 0")
        await sandbox.close()
        await sandbox.close()
        assert sandbox.closed and not sandbox.healthy()


async def test_firewall_is_applied_before_hand_out(image: str, monkeypatch: pytest.MonkeyPatch) -> None:
    applied: list[tuple[str | None, list[str] | None]] = []
    original = ExecutionContainer.init_firewall

    async def recording(self: ExecutionContainer, allowed_domains: list[str] | None = None) -> None:
        await original(self, allowed_domains)
        applied.append((self.container_id, allowed_domains))

    monkeypatch.setattr(ExecutionContainer, "init_firewall", recording)
    # An allow-list of a TEST-NET range: rules are installed, nothing is sent anywhere.
    async with _pool(image, 1, firewall=["198.51.100.0/24"]) as pool, pool.sandbox() as sandbox:
        assert (sandbox.container.container_id, ["198.51.100.0/24"]) in applied
        assert (await sandbox.client.execute("print('behind the firewall')")).text == "behind the firewall"


async def test_concurrent_closes_both_wait_for_the_removal(image: str) -> None:
    marker = uuid.uuid4().hex
    pool = _pool(image, 2, labels={"pool-test": marker})
    await pool.start()
    await pool.wait_ready(1, timeout=READY_TIMEOUT)
    # A second close (e.g. a signal handler that exits right after) must not return before the first's work.
    await asyncio.gather(pool.close(), pool.close())
    assert await _containers(**{"pool-test": marker}) == []


async def test_a_pooled_sandbox_pauses_and_resumes_with_its_cell(image: str) -> None:
    # A pooled sandbox is an ExecutionContainer with a connected client: pausing it must keep the
    # cell (output complete after resume), keep the sandbox healthy while frozen (the pool's health
    # check reads the client's websocket, which stays open), and the pool's spare must stay usable.
    async with _pool(image, 2) as pool:
        await pool.wait_ready(timeout=READY_TIMEOUT)
        async with pool.sandbox() as sandbox:
            code = "import time\nfor i in range(20):\n    print(i, flush=True)\n    time.sleep(0.1)"
            execution = await sandbox.client.submit(code)
            waiting = asyncio.ensure_future(execution.result(timeout=10))
            await asyncio.sleep(0.5)
            await sandbox.pause()
            assert sandbox.container.paused
            await asyncio.sleep(12)  # longer than the cell's timeout: frozen time is not counted
            assert sandbox.healthy()
            assert not waiting.done()
            await sandbox.resume()
            result = await asyncio.wait_for(waiting, 30)
            assert result.text.split() == [str(i) for i in range(20)]
            assert (await sandbox.client.execute("print('after')")).text == "after"
            async with pool.sandbox() as other:  # the spare was not disturbed by the pause
                assert (await other.client.execute("print('spare')")).text == "spare"


async def test_a_dead_spare_is_replaced_without_an_acquire(image: str) -> None:
    # A spare whose container died (a swarm node that went down) used to count as ready until an
    # acquire() reached it: the refill started only then. Now the pool checks its spares every second.
    async with _pool(image, 2) as pool:
        await pool.wait_ready(timeout=READY_TIMEOUT)
        dead = pool._ready._queue[0]  # type: ignore[attr-defined]
        docker = aiodocker.Docker()
        try:
            await (await docker.containers.get(dead.container.container_id or "")).kill()
        finally:
            await docker.close()
        for _ in range(100):  # the spare is taken out of the count within about a second
            await asyncio.sleep(0.1)
            if dead not in pool._ready._queue:  # type: ignore[attr-defined]
                break
        assert dead not in pool._ready._queue  # type: ignore[attr-defined]
        await pool.wait_ready(timeout=READY_TIMEOUT)  # and replaced, with nobody acquiring
        assert pool.ready == 2
        assert dead.closed


async def test_client_options_reach_every_pooled_client_approvals_included(image: str, tmp_path: Path) -> None:
    # Before: a pool's clients were always made without approvals; a shell escape in a pooled sandbox
    # ran at once whatever the application wanted.
    from ipybox.approvals import AllowList

    policy = AllowList(["shell.%%bash"])  # %%bash cells yes, !cmd no
    async with _pool(image, 1, client_options={"approvals": policy, "max_output_bytes": 1000}) as pool:
        async with pool.sandbox() as sandbox:
            client = sandbox.client
            assert client.approvals and client.max_output_bytes == 1000
            assert (await client.execute("%%bash\necho allowed")).text == "allowed"
            result = await client.execute("!echo refused", raise_on_error=False)
            assert result.error is not None and result.error.name == "ShellEscapeDenied"
            snap = await sandbox.snapshot(tmp_path / "s")
        async with await pool.restore(snap) as restored:  # a restore's clients get them too
            result = await restored.client.execute("!echo refused", raise_on_error=False)
            assert result.error is not None and result.error.name == "ShellEscapeDenied"
