"""Hands the per-container secret from ExecutionContainer to the clients.

Seed-style code creates clients with only a port (`ExecutionClient(port=container.executor_port)`),
so a client must find the secret on its own. ExecutionContainer records it in two places, keyed by
host and port:

- an in-process registry, for clients in the same process (no file I/O on the hot path);
- a file readable only by the current user (directory 0700, file 0600), for clients in another
  process of the same user. The file is removed when the container is killed.

Loopback names are keyed alike, so a container published on 127.0.0.1 is found by a client that
connects to "localhost".
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

_LOOPBACK = {"localhost", "127.0.0.1", "::1", "0.0.0.0", "::", ""}
_registry: dict[tuple[str, int], str] = {}


def new_token() -> str:
    """A fresh 256-bit secret, URL-safe."""
    return secrets.token_urlsafe(32)


def token_dir() -> Path:
    """Where token files live: `$IPYBOX_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/ipybox`, else `~/.ipybox/run`."""
    if explicit := os.environ.get("IPYBOX_RUNTIME_DIR"):
        return Path(explicit)
    if runtime := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(runtime) / "ipybox"
    return Path.home() / ".ipybox" / "run"


def key(host: str, port: int) -> tuple[str, int]:
    """The registry key of host:port: loopback names are one name."""
    host = host.strip("[]").lower()
    return ("localhost" if host in _LOOPBACK else host, port)


def _token_file(host: str, port: int) -> Path:
    name, port = key(host, port)
    return token_dir() / f"{name.replace(':', '_')}-{port}.token"


def register(host: str, port: int, token: str, container_id: str = "") -> None:
    """Record the secret of a server published at host:port, in memory and in a user-only file.

    The file holds the secret on its first line and the container id on its second, so that
    `ipybox cleanup` can remove the files of containers that are gone.
    """
    _registry[key(host, port)] = token
    directory = token_dir()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    path = _token_file(host, port)
    tmp = path.with_suffix(".tmp")
    # O_EXCL + 0600 from the start: the secret is never readable by others, not even briefly.
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(f"{token}\n{container_id}\n")
    os.replace(tmp, path)


def unregister(host: str, port: int) -> None:
    """Forget the secret of host:port (in memory and on disk). Safe to call twice."""
    _registry.pop(key(host, port), None)
    _token_file(host, port).unlink(missing_ok=True)


def lookup(host: str, port: int) -> str | None:
    """The secret registered for host:port, or None when no ExecutionContainer of this user made one."""
    if token := _registry.get(key(host, port)):
        return token
    try:
        return _token_file(host, port).read_text().partition("\n")[0].strip() or None
    except (FileNotFoundError, NotADirectoryError):
        return None
    except PermissionError:
        return None


def remove_stale(alive_container_ids: set[str]) -> None:
    """Remove the token files of containers that no longer exist."""
    directory = token_dir()
    if not directory.is_dir():
        return
    for path in directory.glob("*.token"):
        try:
            container_id = path.read_text().split("\n")[1].strip()
        except (IndexError, OSError):
            container_id = ""
        if container_id not in alive_container_ids:
            path.unlink(missing_ok=True)
