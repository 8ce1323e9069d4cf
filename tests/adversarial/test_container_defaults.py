"""Container defaults, each verified from inside a cell (issue #6)."""

from __future__ import annotations

import ast
import json

import aiodocker

from ipybox import ExecutionClient, ExecutionContainer

PROCESSES = """
import json, os
procs = {}
for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
        status = dict(line.split(':', 1) for line in open(f'/proc/{pid}/status').read().splitlines() if ':' in line)
        cmd = open(f'/proc/{pid}/cmdline', 'rb').read().replace(b'\\0', b' ').decode().strip()
        oom = open(f'/proc/{pid}/oom_score_adj').read().strip()
    except OSError:
        continue
    keys = ('CapEff', 'CapPrm', 'CapBnd', 'NoNewPrivs', 'Uid')
    procs[pid] = {k: status[k].strip() for k in keys} | {'cmd': cmd, 'oom': oom}
print(json.dumps(procs))
"""


async def _processes(client: ExecutionClient) -> dict[str, dict[str, str]]:
    result = await client.execute(PROCESSES)
    processes: dict[str, dict[str, str]] = json.loads(result.text or "{}")
    return processes


async def test_no_capabilities_and_no_new_privileges_for_every_process(client: ExecutionClient) -> None:
    processes = await _processes(client)
    assert len(processes) >= 3  # init, server, kernel(s)
    for pid, info in processes.items():
        assert info["CapEff"] == info["CapPrm"] == info["CapBnd"] == "0000000000000000", (pid, info)
        assert info["NoNewPrivs"] == "1", (pid, info)
        assert info["Uid"].split()[0] != "0", (pid, info)


async def test_kernels_are_the_oom_victims_not_the_server(shared_container: ExecutionContainer) -> None:
    # Two clients: the pre-warmed kernel and one started the ordinary way.
    async with ExecutionClient(port=shared_container.executor_port) as first:
        async with ExecutionClient(port=shared_container.executor_port) as second:
            processes = await _processes(second)
            await first.execute("1")
    kernels = [p for p in processes.values() if _is_kernel(p["cmd"])]
    servers = [p for p in processes.values() if p["cmd"].endswith("-m ipybox_server")]
    assert len(kernels) >= 2 and all(k["oom"] == "1000" for k in kernels), kernels
    assert servers and all(s["oom"] == "0" for s in servers), servers


async def test_no_setuid_binaries_no_engine_sockets_read_only_kernel_interfaces(client: ExecutionClient) -> None:
    result = await client.execute(
        "import os, stat, subprocess\n"
        "find = ['find', '/', '-xdev', '-type', 'f', '-perm', '/6000']\n"
        "setuid = subprocess.run(find, capture_output=True, text=True)\n"
        "print('setuid:', setuid.stdout.split())\n"
        "socks = [os.path.join(d, f) for d, _, fs in os.walk('/') if not d.startswith(('/proc', '/sys'))\n"
        "         for f in fs if f.endswith('.sock')]\n"
        "print('sockets:', socks)\n"
        "def writable(path):\n"
        "    try:\n"
        "        open(path, 'w').close()\n"
        "        return True\n"
        "    except OSError as e:\n"
        "        return e.errno\n"
        "print('proc-sys:', writable('/proc/sys/kernel/hostname'), 'sys:', writable('/sys/kernel/uevent_helper'))\n"
    )
    lines = (result.text or "").splitlines()
    assert lines[0] == "setuid: []"
    # The only sockets are ipybox's own servers': the host's same-process routes and the kernels' tools
    # socket (mcp-generation.md); no engine socket.
    sockets = sorted(ast.literal_eval(lines[1].removeprefix("sockets: ")))
    assert sockets == ["/run/ipybox/executor.sock", "/run/ipybox/resource.sock", "/run/ipybox/tools.sock"], lines[1]
    assert "True" not in lines[2], lines[2]


async def test_limits_are_applied(client: ExecutionClient) -> None:
    result = await client.execute(
        "import os, resource\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE))\n"
        "st = os.statvfs('/tmp'); print(st.f_blocks * st.f_frsize)\n"
        "print(open('/proc/mounts').read().count(' /tmp tmpfs '))\n"
    )
    nofile, tmp_bytes, tmpfs = (result.text or "").splitlines()
    assert nofile == "(4096, 4096)"
    assert int(tmp_bytes) == 2**30
    assert tmpfs == "1"


async def test_only_the_asked_binds_are_mounted_and_logs_are_bounded(make_container, tmp_path) -> None:  # type: ignore[no-untyped-def]
    container = await make_container(binds={str(tmp_path): "data"}, tmp_size="64m", open_files_limit=256)
    async with ExecutionClient(port=container.executor_port) as client:
        result = await client.execute(
            "import json, os, resource\n"
            "mounts = [line.split() for line in open('/proc/self/mountinfo')]\n"
            "skip = ('/proc', '/sys', '/dev')\n"
            "print(json.dumps(sorted(m[4] for m in mounts if m[3] != '/' and not m[4].startswith(skip))))\n"
            "st = os.statvfs('/tmp')\n"
            "print(st.f_blocks * st.f_frsize, resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
        )
    mounted, sizes = (result.text or "").splitlines()
    # Docker's own per-container files and init, and the one bind asked for: nothing else of the host.
    docker_files = {"/etc/resolv.conf", "/etc/hostname", "/etc/hosts", "/usr/sbin/docker-init"}
    assert set(json.loads(mounted)) <= docker_files | {"/app/data"}, mounted
    assert "/app/data" in mounted
    assert sizes == f"{64 * 2**20} 256"
    docker = aiodocker.Docker()
    try:
        info = await (await docker.containers.get(container.container_id)).show()
    finally:
        await docker.close()
    assert info["HostConfig"]["LogConfig"] == {"Type": "json-file", "Config": {"max-file": "2", "max-size": "10m"}}
    assert info["HostConfig"]["SecurityOpt"] == ["no-new-privileges:true"]
    assert info["HostConfig"]["CapDrop"] == ["ALL"]


def _is_kernel(cmd: str) -> bool:
    """A kernel process: launched by the kernelspec (`ipybox_server.kernel_launcher`) or pre-warmed."""
    return "kernel_launcher" in cmd or "kernel_stub" in cmd or "ipykernel" in cmd
