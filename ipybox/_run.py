"""One-shot execution for `ipybox run`: a fresh sandbox per call."""

from __future__ import annotations

from ipybox._docker import connect, docker_errors, image_exists
from ipybox.container import ExecutionContainer
from ipybox.executor import ExecutionClient, ExecutionResult


async def image_present(tag: str) -> bool:
    """Whether the image exists in the local engine (no pull is attempted)."""
    docker = connect()
    try:
        with docker_errors("looking up the image"):
            return await image_exists(docker, tag)
    finally:
        await docker.close()


async def run_code(source: str, *, tag: str, timeout: float, owner_bound: bool = True) -> ExecutionResult:
    """Run `source` in a new container and kernel, remove both, and return the output.

    Owner-bound by default: a `ipybox run` killed before it can remove the sandbox leaves nothing behind.
    """
    async with ExecutionContainer(tag=tag, owner_bound=owner_bound) as container:
        async with ExecutionClient(port=container.executor_port) as client:
            return await client.execute(source, timeout=timeout)
