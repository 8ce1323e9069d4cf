"""A stalled server (its process stopped with SIGSTOP) stalls transfers: ResourceClient reports each
stall as a ServerConnectionError naming the operation, and its session works again once the server
runs (issue 12). A paused sandbox (`docker pause`) is not a stall any more: transfers wait for it
(tests/integration/test_pause.py).
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from ipybox import ExecutionContainer, ResourceClient, TransferStalledError

STALL = 1.0


@asynccontextmanager
async def paused(container: ExecutionContainer) -> AsyncIterator[None]:
    """The sandbox's server process stopped (SIGSTOP from the host): it answers nothing, while the
    container is not paused (the freezer says thawed) and the connection stays open."""
    server = container._server
    assert server is not None, "the server process was not identified (a local engine is needed)"
    os.kill(server.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.pid, signal.SIGCONT)


@pytest.fixture
async def resources(shared_container: ExecutionContainer) -> AsyncIterator[ResourceClient]:
    async with ResourceClient(port=shared_container.resource_port, inactivity_timeout=STALL) as client:
        yield client


async def test_download_from_a_frozen_sandbox_names_the_operation(
    shared_container: ExecutionContainer, resources: ResourceClient, tmp_path: Path
) -> None:
    (tmp_path / "in.bin").write_bytes(b"ipybox" * 1000)
    await resources.upload_file("frozen/in.bin", tmp_path / "in.bin")
    async with paused(shared_container):
        with pytest.raises(TransferStalledError) as info:
            await resources.download_file("frozen/in.bin", tmp_path / "out.bin")
    message = str(info.value)
    assert "download of 'frozen/in.bin'" in message and "stalled: no data arrived" in message
    assert "inactivity_timeout" in message
    assert not (tmp_path / "out.bin").exists()

    await resources.download_file("frozen/in.bin", tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == (tmp_path / "in.bin").read_bytes()


async def test_upload_to_a_frozen_sandbox_names_the_operation(
    shared_container: ExecutionContainer, resources: ResourceClient, tmp_path: Path
) -> None:
    big = tmp_path / "big.bin"
    with open(big, "wb") as file:
        file.truncate(64 * 1024 * 1024)  # sparse; more than the socket buffers hold
    async with paused(shared_container):
        with pytest.raises(TransferStalledError) as info:
            await resources.upload_file("frozen/big.bin", big)
    message = str(info.value)
    assert f"upload of {str(big)!r} to 'frozen/big.bin'" in message
    assert "stalled: the server took no data" in message and "inactivity_timeout" in message

    (tmp_path / "small.bin").write_bytes(b"after")
    await resources.upload_file("frozen/small.bin", tmp_path / "small.bin")
    await resources.download_file("frozen/small.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == b"after"
