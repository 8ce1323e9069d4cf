"""Reads the per-container secret that the host placed in the container before start."""

import ctypes
import os
import time
from pathlib import Path

TOKEN_PATH = Path("/run/ipybox/token")
TOKEN_ENV = "IPYBOX_TOKEN"


PR_SET_DUMPABLE = 4


def protect_process() -> None:
    """Make this process non-dumpable: its /proc memory, environment and maps become root-only and
    ptrace needs CAP_SYS_PTRACE, which nothing in the container has. Kernels run as the same user,
    so without this they could read the secret out of the server's memory. Children are unaffected
    (the flag resets on exec)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise SystemExit(f"ipybox_server: prctl(PR_SET_DUMPABLE) failed: errno {ctypes.get_errno()}")


TOKEN_WAIT_ENV = "IPYBOX_TOKEN_WAIT"


def _wait_for_file(seconds: float) -> None:
    """Wait up to `seconds` until the secret file can be read with content: on a swarm the task's
    container is started by the node's engine, so the host can only place the secret after the start
    (through that engine's `put_archive`). Nothing else runs in the container meanwhile: no kernel
    starts before the servers, and the servers start after this.

    The engine's extraction creates the file (root's, mode 0400), writes it, and only then hands it to
    the sandbox user: existing is not enough, readable is (and then its content is complete). A read in
    that window used to end the server with PermissionError (one start in about 25 on the swarm rig).
    """
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if TOKEN_PATH.read_text().strip():
                return
        except (FileNotFoundError, PermissionError):
            pass
        time.sleep(0.01)


def take_token() -> str:
    """Return the secret and remove every trace of it that kernels could read.

    The host writes the file before the container starts (or, with `IPYBOX_TOKEN_WAIT=<seconds>`, just
    after: see `_wait_for_file`); deleting it here means a kernel, which starts later and runs as the
    same user, finds no file. The environment variable is a fallback for running the servers by hand;
    it is removed so that kernels do not inherit it.
    """
    token = os.environ.pop(TOKEN_ENV, "")
    wait = os.environ.pop(TOKEN_WAIT_ENV, "")
    if wait and not token:
        try:
            _wait_for_file(float(wait))
        except ValueError:
            raise SystemExit(f"ipybox_server: {TOKEN_WAIT_ENV}={wait!r} is not a number of seconds") from None
    try:
        token = TOKEN_PATH.read_text().strip() or token
        TOKEN_PATH.unlink()
    except FileNotFoundError:
        pass
    if not token:
        raise SystemExit(
            f"ipybox_server: no secret found at {TOKEN_PATH} or in ${TOKEN_ENV}; refusing to serve without one"
        )
    return token
