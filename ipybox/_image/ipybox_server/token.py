"""Reads the per-container secret that the host placed in the container before start."""

import ctypes
import os
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


def take_token() -> str:
    """Return the secret and remove every trace of it that kernels could read.

    The host writes the file before the container starts; deleting it here means a kernel, which
    starts later and runs as the same user, finds no file. The environment variable is a fallback for
    running the servers by hand; it is removed so that kernels do not inherit it.
    """
    token = os.environ.pop(TOKEN_ENV, "")
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
