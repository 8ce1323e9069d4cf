"""The kernel cannot get at the control plane's secret (issue #6)."""

from __future__ import annotations

from ipybox import ExecutionClient, ExecutionContainer, _tokens

PROBE = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
server = next(pid for pid in filter(str.isdigit, os.listdir('/proc'))
              if open(f'/proc/{pid}/cmdline', 'rb').read().split(b'\\0')[0].endswith(b'python')
              and open(f'/proc/{pid}/cmdline', 'rb').read().endswith(b'-m\\0ipybox_server\\0'))
for what in ('environ', 'maps', 'mem'):
    try:
        with open(f'/proc/{server}/{what}', 'rb') as f:
            f.read(16)
        print(what, 'readable')
    except OSError as e:
        print(what, type(e).__name__)
print('ptrace', libc.ptrace(16, int(server), 0, 0), ctypes.get_errno())  # PTRACE_ATTACH -> -1 EPERM
"""


async def test_kernel_cannot_read_the_servers_memory_or_attach_to_it(shared_container: ExecutionContainer) -> None:
    async with ExecutionClient(port=shared_container.executor_port) as client:
        result = await client.execute(PROBE)
    assert (result.text or "").splitlines() == [
        "environ PermissionError",
        "maps PermissionError",
        "mem PermissionError",
        "ptrace -1 1",
    ]


async def test_secret_is_nowhere_a_kernel_can_read(shared_container: ExecutionContainer) -> None:
    token = _tokens.lookup("localhost", shared_container.executor_port)
    assert token
    half = len(token) // 2
    search = (
        "import os\n"
        # Built at run time: the whole secret must not appear in the cell (IPython keeps a history).
        f"secret = ({token[:half]!r} + {token[half:]!r}).encode()\n"
        "hits = []\n"
        "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
        "    for what in ('environ', 'cmdline'):\n"
        "        try:\n"
        "            if secret in open(f'/proc/{pid}/{what}', 'rb').read(): hits.append((pid, what))\n"
        "        except OSError:\n"
        "            pass\n"
        "for root in ('/run', '/tmp', '/app', '/home', '/etc'):\n"
        "    for d, _, files in os.walk(root):\n"
        "        for name in files:\n"
        "            try:\n"
        "                if secret in open(os.path.join(d, name), 'rb').read(1 << 20): hits.append(name)\n"
        "            except OSError:\n"
        "                pass\n"
        "print(hits)"
    )
    async with ExecutionClient(port=shared_container.executor_port) as client:
        result = await client.execute(search)
    assert result.text == "[]"


async def test_kernels_are_capped(make_container) -> None:  # type: ignore[no-untyped-def]
    import pytest

    from ipybox import AuthenticationError, KernelLimitError, ServerConnectionError

    container = await make_container(max_kernels=2)
    async with ExecutionClient(port=container.executor_port) as one, ExecutionClient(port=container.executor_port):
        assert (await one.execute("print(1)")).text == "1"
        # A refusal, not a lost connection: retrying the same request is refused again.
        with pytest.raises(KernelLimitError, match="max_kernels") as info:
            await ExecutionClient(port=container.executor_port).connect(retries=1)
        assert not isinstance(info.value, (AuthenticationError, ServerConnectionError))
        assert info.value.option == "ExecutionContainer(max_kernels=...)"
