"""Every request to both ports needs the container's secret; the clients find it on their own."""

from __future__ import annotations

import stat
import subprocess
import sys
import textwrap

import aiohttp
import pytest

from ipybox import AuthenticationError, ExecutionClient, ExecutionContainer, ResourceClient, _tokens
from tests.integration.conftest import ContainerFactory


@pytest.mark.parametrize("path", ["/api", "/api/kernels", "/api/kernelspecs"])
async def test_executor_port_requires_token(shared_container: ExecutionContainer, path: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{shared_container.executor_port}{path}") as response:
            assert response.status in (401, 403)
        async with session.get(
            f"http://127.0.0.1:{shared_container.executor_port}{path}", headers={"Authorization": "token wrong"}
        ) as response:
            assert response.status in (401, 403)


async def test_kernel_creation_and_websocket_upgrade_require_token(shared_container: ExecutionContainer) -> None:
    base = f"http://127.0.0.1:{shared_container.executor_port}"
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/api/kernels", json={"name": "python3"}) as response:
            assert response.status in (401, 403)
    async with ExecutionClient(port=shared_container.executor_port) as client:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await session.ws_connect(f"{base}/api/kernels/{client.kernel_id}/channels")
            assert info.value.status in (401, 403)
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await session.ws_connect(f"{base}/api/kernels/{client.kernel_id}/channels?token=wrong")
            assert info.value.status in (401, 403)


async def test_resource_port_requires_token(shared_container: ExecutionContainer) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{shared_container.resource_port}/status") as response:
            assert response.status == 401
        async with session.get(
            f"http://127.0.0.1:{shared_container.resource_port}/status", headers={"Authorization": "token nope"}
        ) as response:
            assert response.status == 401


async def test_clients_with_wrong_token_raise_authentication_error(shared_container: ExecutionContainer) -> None:
    with pytest.raises(AuthenticationError, match="token="):
        await ExecutionClient(port=shared_container.executor_port, token="wrong").connect(retries=1)
    with pytest.raises(AuthenticationError):
        await ResourceClient(port=shared_container.resource_port, token="wrong").connect()


async def test_explicit_token_works(shared_container: ExecutionContainer) -> None:
    token = _tokens.lookup("127.0.0.1", shared_container.executor_port)
    assert token
    async with ExecutionClient(port=shared_container.executor_port, host="127.0.0.1", token=token) as client:
        assert (await client.execute("print('explicit')")).text == "explicit"


async def test_client_in_another_process_finds_the_token(shared_container: ExecutionContainer) -> None:
    path = _tokens._token_file("127.0.0.1", shared_container.executor_port)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    script = textwrap.dedent(
        f"""
        import asyncio
        from ipybox import ExecutionClient, ResourceClient

        async def main():
            async with ExecutionClient(port={shared_container.executor_port}) as client:
                print((await client.execute("print('other process')")).text)
            async with ResourceClient(port={shared_container.resource_port}) as resources:
                print((await resources.status())["status"])

        asyncio.run(main())
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["other", "process", "ok"]


async def test_kernel_cannot_see_the_secret(shared_container: ExecutionContainer) -> None:
    token = _tokens.lookup("127.0.0.1", shared_container.executor_port)
    assert token
    async with ExecutionClient(port=shared_container.executor_port) as client:
        result = await client.execute(
            "import os\n"
            "print(os.path.exists('/run/ipybox/token'))\n"
            "print(any('IPYBOX_TOKEN' in k for k in os.environ))\n"
            f"print({token!r} in repr(dict(os.environ)))"
        )
    assert result.text == "False\nFalse\nFalse"


async def test_token_file_removed_on_kill(make_container: ContainerFactory) -> None:
    container = await make_container()
    path = _tokens._token_file("127.0.0.1", container.executor_port)
    assert path.exists()
    await container.kill()
    assert not path.exists()
    assert _tokens.lookup("localhost", container.executor_port) is None
