"""Starts one kernel ahead of time and hands it to the gateway's first kernel launch.

A kernel needs about 0.4 s from spawn to ready, mostly imports. Starting it at the very beginning
of the launcher overlaps that with the gateway's own start-up (about 0.45 s), so the first kernel a
client asks for is ready at once. Only the first launch is served this way: a standing spare would
cost a kernel's worth of idle memory in every sandbox. Restarts and further kernels are launched
the ordinary way.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
from importlib.metadata import EntryPoint
from typing import Any

PROVISIONER_NAME = "ipybox-prewarmed"
KERNEL_PYTHON = "/opt/ipybox/user-venv/bin/python"
"""The user environment's interpreter: kernels run there (so `%pip install`, which uses sys.executable,
installs there), isolated (-I) while they import their own modules. The server runs in ipybox's own."""
CONNECTION_FILE = "/run/ipybox/spare-kernel.json"


class _Spare:
    def __init__(self, process: subprocess.Popen[bytes], connection_info: dict[str, Any]) -> None:
        self.process = process
        self.connection_info = connection_info


_spare: _Spare | None = None


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def prefer_as_oom_victim(pid: int) -> None:
    """Raise a kernel's oom_score_adj to 1000, from the server, once the kernel has exec'd: if the
    container runs out of memory, the kernel is killed, not the server process that the host talks
    to. Raising a process's oom_score_adj needs no privilege (lowering the server's would).

    Not in the kernel's child before exec (a preexec_fn): forked from the non-dumpable server, the
    child's /proc files belong to root until exec, and making it dumpable to write the file there
    let any process of the user read the server's memory, secret included, through the child's
    /proc/<pid>/mem until it exec'd. After exec the kernel is dumpable again on its own (an exec
    that keeps the credentials resets the flag), holds nothing of the server's, and its /proc files
    are the user's. The pid cannot be reused meanwhile: the kernel is this process's unreaped child.
    Popen may return a moment before the flag is reset (the write is then refused): the kernel also
    raises its own score first thing (kernel_app.prefer_as_oom_victim), which is what holds.
    """
    try:
        with open(f"/proc/{pid}/oom_score_adj", "w") as file:
            file.write("1000")
    except OSError:
        pass  # the kernel has already ended


def start_spare(cwd: str) -> None:
    """Write a connection file and spawn the kernel on it (cheap: no imports in this process)."""
    global _spare
    shell, iopub, stdin, control, hb = _free_ports(5)
    info = {
        "shell_port": shell,
        "iopub_port": iopub,
        "stdin_port": stdin,
        "control_port": control,
        "hb_port": hb,
        "ip": "127.0.0.1",
        "key": secrets.token_hex(16),
        "transport": "tcp",
        "signature_scheme": "hmac-sha256",
        "kernel_name": "python3",
    }
    fd = os.open(CONNECTION_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        json.dump(info, file)
    process = subprocess.Popen(
        [KERNEL_PYTHON, "-I", "-m", "ipybox_server.kernel_stub", CONNECTION_FILE],
        stdin=subprocess.PIPE,
        cwd=cwd,
        # As jupyter_client's launcher does: the kernel exits when the gateway does, and it gets
        # its own session and process group, so an interrupt (SIGINT to the group) reaches the
        # kernel and not the launcher.
        env={**os.environ, "JPY_PARENT_PID": str(os.getpid())},
        start_new_session=True,
    )
    # Popen returns once the child has exec'd (no preexec_fn: the child never runs Python code of
    # this process, and stays non-dumpable until exec).
    prefer_as_oom_victim(process.pid)
    _spare = _Spare(process, info)


def take_spare() -> _Spare | None:
    """The spare kernel if it is still alive and unused, else None (it is handed out once)."""
    global _spare
    spare, _spare = _spare, None
    if spare is not None and spare.process.poll() is not None:
        return None
    return spare


def register_provisioner() -> None:
    """Make `PrewarmedProvisioner` known to jupyter_client without an installed entry point."""
    from jupyter_client.provisioning.factory import KernelProvisionerFactory

    KernelProvisionerFactory.provisioners[PROVISIONER_NAME] = EntryPoint(
        name=PROVISIONER_NAME,
        value="ipybox_server.prewarm:PrewarmedProvisioner",
        group=KernelProvisionerFactory.GROUP_NAME,
    )


def _is_standard_kernel(argv: list[str]) -> bool:
    """Whether a kernelspec's argv is ipybox's kernel launch (or ipykernel's), which the spare stands in for.

    Whatever the interpreter and whether isolated (`-I`): the spare is the user environment's kernel.
    """
    rest = [arg for arg in argv[1:] if arg != "-I"]
    return len(rest) >= 2 and rest[:2] in (["-m", "ipybox_server.kernel_launcher"], ["-m", "ipykernel_launcher"])


def _make_provisioner_class() -> type:
    from jupyter_client.provisioning import LocalProvisioner

    class PrewarmedProvisioner(LocalProvisioner):  # type: ignore[misc]
        """LocalProvisioner that adopts the spare kernel for its first launch."""

        _adopted: _Spare | None = None

        async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
            spare = take_spare() if _is_standard_kernel(self.kernel_spec.argv) else None
            if spare is not None:
                # The kernel already listens on these ports with this key: the manager must use
                # them instead of choosing new ones.
                self.parent.load_connection_info(spare.connection_info)
                self.ports_cached = True
                self._adopted = spare
            return dict(await super().pre_launch(**kwargs))

        async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> Any:
            spare, self._adopted = self._adopted, None
            if spare is None:
                info = await super().launch_kernel(cmd, **kwargs)
                prefer_as_oom_victim(self.pid)  # its Popen has returned: the kernel has exec'd
                return info
            self.process = spare.process
            self.pid = spare.process.pid
            self.pgid = os.getpgid(spare.process.pid)
            self.cwd = kwargs.get("cwd") or os.getcwd()
            return self.connection_info

    return PrewarmedProvisioner


def __getattr__(name: str) -> Any:
    # Built lazily: importing jupyter_client at launcher start would delay the spare's spawn.
    if name == "PrewarmedProvisioner":
        cls = _make_provisioner_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
