"""A kernel is never dumpable while it still holds the server's memory (issue 13).

The server is non-dumpable so that kernels, which run as the same user, cannot read the secret out of
its memory. A kernel is spawned by forking the server: until it execs, the child is a copy of the
server's memory, secret included. If anything makes that child dumpable before exec (as the
preexec_fn that raised its oom_score_adj did), a same-user process can read `/proc/<child>/mem` in
that window. After exec the kernel is dumpable again (Linux resets the flag on an exec that keeps
the credentials) and holds nothing of the server's; it must still be the preferred OOM victim.

`WINDOW` drives the launcher's real spawn paths (the pre-warmed kernel and the provisioner's launches)
in a non-dumpable "server" process. Each spawned child stops just before exec (a probe wrapped
around whatever preexec_fn the launcher passes) while a same-user process, the server's parent, tries
to read the server's secret from the child's memory; then the child execs `sleep`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ipybox import ExecutionClient
from tests.integration.conftest import ContainerFactory

IMAGE_DIR = Path(__file__).resolve().parents[2] / "ipybox" / "_image"

WINDOW = r"""
import asyncio, ctypes, json, os, select, subprocess, sys, tempfile, types

if len(sys.argv) > 1:
    sys.path.insert(0, sys.argv[1])
from ipybox_server import prewarm

try:
    import jupyter_client.launcher
    import jupyter_client.provisioning
except ImportError:  # outside the image: a LocalProvisioner that launches as jupyter_client's does
    class LocalProvisioner:
        async def launch_kernel(self, cmd, **kwargs):
            self.process = subprocess.Popen(cmd, **kwargs)
            self.pid = self.process.pid
            return {}
    package = types.ModuleType("jupyter_client")
    provisioning = types.ModuleType("jupyter_client.provisioning")
    provisioning.LocalProvisioner = LocalProvisioner
    package.provisioning = provisioning
    sys.modules["jupyter_client"], sys.modules["jupyter_client.provisioning"] = package, provisioning
provisioner = prewarm.PrewarmedProvisioner()

if os.getuid() == 0:  # root reads any process's memory: the attacker must be an ordinary user
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)

libc = ctypes.CDLL(None, use_errno=True)
PR_GET_DUMPABLE, PR_SET_DUMPABLE = 3, 4
secret = os.urandom(16).hex().encode()
address = ctypes.cast(ctypes.c_char_p(secret), ctypes.c_void_p).value
window_r, window_w = os.pipe()
release_r, release_w = os.pipe()
server = os.fork()

if server == 0:  # the server: non-dumpable, spawns kernels the launcher's ways
    os.close(window_r)
    os.close(release_w)
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)

    class Popen(subprocess.Popen):
        label = ""

        def __init__(self, args, **kwargs):
            preexec = kwargs.pop("preexec_fn", None)

            def probe():
                if preexec is not None:
                    preexec()
                state = libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)
                os.write(window_w, f"{Popen.label} {os.getpid()} {state}\n".encode())
                os.read(release_r, 1)  # the attacker tries now

            super().__init__(["sleep", "30"], preexec_fn=probe, **kwargs)

    subprocess.Popen = Popen
    if "jupyter_client.launcher" in sys.modules:
        sys.modules["jupyter_client.launcher"].Popen = Popen
    workdir = tempfile.mkdtemp()
    prewarm.CONNECTION_FILE = os.path.join(workdir, "spare.json")
    after_exec = {}

    def record(label, process):
        pid = process.pid
        with open(f"/proc/{pid}/oom_score_adj") as file:
            oom = file.read().strip()
        owner = os.stat(f"/proc/{pid}").st_uid  # the task's uid when dumpable, else root
        after_exec[label] = {"oom_score_adj": oom, "proc_owned_by_user": owner == os.getuid()}
        process.kill()
        process.wait()

    Popen.label = "spare"
    prewarm.start_spare(cwd=workdir)
    record("spare", prewarm.take_spare().process)
    Popen.label = "launch"
    asyncio.run(provisioner.launch_kernel(["python", "-m", "ipybox_server.kernel_launcher"], cwd=workdir))
    record("launch", provisioner.process)
    os.unlink(prewarm.CONNECTION_FILE)
    os.rmdir(workdir)
    print(json.dumps({"after_exec": after_exec}), flush=True)
    os._exit(0)

os.close(window_w)
os.close(release_r)
before_exec = {}
lines = os.fdopen(window_r)
while select.select([lines], [], [], 20)[0]:
    line = lines.readline()
    if not line:
        break
    label, pid, state = line.split()
    try:
        with open(f"/proc/{pid}/mem", "rb") as mem:
            mem.seek(address)
            read = "the secret" if mem.read(len(secret)) == secret else "other bytes"
    except OSError as exc:
        read = f"refused: {os.strerror(exc.errno)}"
    before_exec[label] = {"dumpable": int(state), "attacker_read": read}
    os.write(release_w, b"x")
_, status = os.waitpid(server, 0)
print(json.dumps({"before_exec": before_exec, "server_status": status}), flush=True)
"""


def _check_window(output: str) -> None:
    reports = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert len(reports) == 2 and reports[1]["server_status"] == 0, output
    server, attacker = reports
    for label in ("spare", "launch"):
        before = attacker["before_exec"][label]
        # Forked from the non-dumpable server and not yet exec'd: nobody but root may look inside.
        assert before == {"dumpable": 0, "attacker_read": "refused: Permission denied"}, (label, attacker)
        # After exec: dumpable again (its /proc is its user's) and the preferred OOM victim.
        assert server["after_exec"][label] == {"oom_score_adj": "1000", "proc_owned_by_user": True}, (label, server)


def test_no_kernel_is_dumpable_before_exec() -> None:
    """The launcher's spawn paths on this machine, without a container (root drops to nobody)."""
    result = subprocess.run(
        [sys.executable, "-c", WINDOW, str(IMAGE_DIR)], capture_output=True, text=True, timeout=60, cwd="/"
    )
    assert result.returncode == 0, result.stderr
    _check_window(result.stdout + result.stderr)


async def test_a_cell_cannot_read_the_server_memory_in_a_kernel_before_exec(client: ExecutionClient) -> None:
    """The same, in the sandbox: the image's launcher and jupyter_client, attacked by a cell's process."""
    result = await client.execute(
        "import subprocess, sys\n"
        f"run = subprocess.run([sys.executable, '-c', {WINDOW!r}], capture_output=True, text=True, timeout=60)\n"
        "print(run.stdout + run.stderr, end='')\n",
        timeout=90,
    )
    _check_window(result.text or "")


PR_GET_DUMPABLE = 3
KERNEL_STATE = (
    "import ctypes\n"
    "oom = open('/proc/self/oom_score_adj').read().strip()\n"
    f"print(oom, ctypes.CDLL(None).prctl({PR_GET_DUMPABLE}, 0, 0, 0, 0))\n"
)


async def _kernel_state(client: ExecutionClient) -> str:
    return (await client.execute(KERNEL_STATE)).text or ""


async def test_kernels_are_oom_victims_and_dumpable_after_exec(make_container: ContainerFactory) -> None:
    """Pre-warmed, ordinary and restarted kernels: oom_score_adj 1000, dumpable (1) as any process."""
    container = await make_container()
    states: dict[str, str] = {}
    async with ExecutionClient(port=container.executor_port) as first:  # the pre-warmed kernel
        states["first"] = await _kernel_state(first)
        async with ExecutionClient(port=container.executor_port) as second:
            states["second"] = await _kernel_state(second)
        await first.reset()
        states["restarted"] = await _kernel_state(first)
    assert states == {"first": "1000 1", "second": "1000 1", "restarted": "1000 1"}
