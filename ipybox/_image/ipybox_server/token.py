"""Reads the per-container secret that the host placed in the container before start."""

import os
from pathlib import Path

TOKEN_PATH = Path("/run/ipybox/token")
TOKEN_ENV = "IPYBOX_TOKEN"


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
