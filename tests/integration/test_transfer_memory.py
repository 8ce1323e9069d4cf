"""A 1 GB file moves both ways with client and server memory growth under 64 MiB."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from ipybox import ExecutionClient, ExecutionContainer, _tokens

GIB = 1 << 30
LIMIT_KIB = 64 * 1024

CLIENT = textwrap.dedent(
    """
    import asyncio, resource, sys
    from ipybox import ResourceClient

    async def main(port, token, source, target):
        async with ResourceClient(port=port, token=token) as client:
            await client.upload_file("big.bin", "/dev/null")  # warm up session and code paths
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            await client.upload_file("big.bin", source)
            await client.download_file("big.bin", target)
            after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            print(before, after)

    asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]))
    """
)

# Peak RSS (VmHWM, KiB) of the server process (gateway and resource server share it).
SERVER_PEAK = """
import os
for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
        cmdline = open(f'/proc/{pid}/cmdline', 'rb').read().split(b'\\0')
    except OSError:
        continue
    # `python -I -m ipybox_server`: not docker-init (which names it too), not the kernel stub
    if os.path.basename(cmdline[0]).startswith(b'python') and cmdline[-2] == b'ipybox_server':
        status = open(f'/proc/{pid}/status').read()
        print(next(line.split()[1] for line in status.splitlines() if line.startswith('VmHWM')))
"""


async def test_one_gigabyte_both_ways_in_bounded_memory(make_container, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    container: ExecutionContainer = await make_container()
    source, target = tmp_path / "source.bin", tmp_path / "target.bin"
    with source.open("wb") as file:
        file.truncate(GIB)  # sparse on the host; still 1 GiB of bytes on the wire and in the sandbox
    token = _tokens.lookup("localhost", container.resource_port)
    assert token
    async with ExecutionClient(port=container.executor_port) as kernel:
        server_before = int((await kernel.execute(SERVER_PEAK)).text or "0")
        done = subprocess.run(
            [sys.executable, "-c", CLIENT, str(container.resource_port), token, str(source), str(target)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr
        server_after = int((await kernel.execute(SERVER_PEAK)).text or "0")
        assert (await kernel.execute("import os\nprint(os.path.getsize('/app/big.bin'))")).text == str(GIB)
        await kernel.execute("os.remove('/app/big.bin')")
    assert target.stat().st_size == GIB
    client_before, client_after = map(int, done.stdout.split())
    assert client_after - client_before < LIMIT_KIB, f"client grew {client_after - client_before} KiB"
    assert server_before > 0
    assert server_after - server_before < LIMIT_KIB, f"server grew {server_after - server_before} KiB"
