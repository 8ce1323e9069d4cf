"""Hands the per-container secret from ExecutionContainer to the clients.

Seed-style code creates clients with only a port (`ExecutionClient(port=container.executor_port)`),
so a client must find the secret on its own. ExecutionContainer records it in two places, keyed by
host and port:

- an in-process registry, for clients in the same process (no file I/O on the hot path);
- a file readable only by the current user (directory 0700, file 0600), for clients in another
  process of the same user. The file is removed when the container is killed.

Each container's record is also kept under a second name, `<container id>.token`, so that a process
that knows only the container (`ExecutionContainer.attach`, `ipybox ps`) finds its secret without
knowing the host and port it was published on; both names go together.

Loopback names are keyed alike, so a container published on 127.0.0.1 is found by a client that
connects to "localhost".

A record outlives its container when the container goes without `ExecutionContainer.kill()` (`docker
rm -f`, a process that died), and the port is then free for anything, another sandbox of this user
included. So `lookup` hands out a secret only while the container recorded with it still runs. The
check is synchronous and costs one read of a small procfs file, as `lookup` runs on every client
connect: a record carries the container's id and the host pid of its init process, and the container
still runs while `/proc/<pid>/cgroup` names its id (a pid freed by the container and reused by another
process is in another cgroup). Asking the engine instead would cost a round trip per connect and
make `lookup` async. The pid is recorded only when this check works at registration: with a remote
engine, Docker Desktop's VM or another pid namespace the pid means nothing here, and such records
(and records without a container id) are handed out unchecked, as before; `ipybox cleanup` removes
their files once the container is gone. A restarted container has a new init pid, so its old record
is refused: ipybox never restarts its containers.

A record also names the container's server process (pid and start time, ipybox._process), when it was
identified at start: then the secret is handed out only while that very process runs. A cell can hold
the container's init under ptrace, kill the server and serve its ports itself while the container still
counts as running; a client in another process, which knows only this file, must not send the secret
to it (and its published-port connections are refused: ipybox._routes.published_connector).
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from ipybox._process import Process

_LOOPBACK = {"localhost", "127.0.0.1", "::1", "0.0.0.0", "::", ""}
_PROC = Path("/proc")


@dataclass(frozen=True)
class _Record:
    token: str
    container_id: str = ""
    pid: int = 0  # 0: not checkable from this process
    server: Process | None = None  # the container's server process, when identified at start

    def alive(self) -> bool:
        """False only when the container, or its server process, is known to be gone."""
        if not self.container_id or not self.pid:
            return True
        if self.server is not None and not self.server.runs():
            return False
        return container_runs(self.container_id, self.pid)


_registry: dict[tuple[str, int], _Record] = {}


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


def _container_file(container_id: str) -> Path:
    return token_dir() / f"{container_id}.token"


def container_runs(container_id: str, pid: int) -> bool:
    """Whether the container whose init process had host pid `pid` still runs (see the module docstring)."""
    try:
        return container_id in (_PROC / str(pid) / "cgroup").read_text()
    except OSError:
        return False


def container_ended(container_id: str, pid: int) -> bool:
    """Whether a container recorded with its init's host pid has ended; False when `pid` is 0 (not
    checkable here: another machine's container), so that callers go on as if it ran."""
    return bool(pid) and not container_runs(container_id, pid)


def register(
    host: str, port: int, token: str, container_id: str = "", pid: int = 0, server: Process | None = None
) -> None:
    """Record the secret of a server published at host:port, in memory and in a user-only file.

    The file holds the secret on its first line, the container id on its second (so that `ipybox
    cleanup` can remove the files of containers that are gone), the pid of the container's init
    process on its third (0 when this process cannot check it; see the module docstring) and the
    server process as `pid start` on its fourth (none when not identified).
    """
    if pid and not (container_id and container_runs(container_id, pid)):
        pid, server = 0, None
    _registry[key(host, port)] = _Record(token, container_id, pid, server)
    directory = token_dir()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    path = _token_file(host, port)
    tmp = path.with_suffix(".tmp")
    # O_EXCL + 0600 from the start: the secret is never readable by others, not even briefly.
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        server_line = f"{server.pid} {server.start}\n" if server is not None else ""
        file.write(f"{token}\n{container_id}\n{pid}\n{server_line}")
    os.replace(tmp, path)
    if container_id:
        # The second name: the same record, found by the container's id (a hard link: one inode).
        by_id = _container_file(container_id)
        if by_id != path:
            link = by_id.with_suffix(".tmp")
            link.unlink(missing_ok=True)
            try:
                os.link(path, link)
            except OSError:  # a file system without hard links: a copy, user-only from the start
                fd = os.open(link, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as file:
                    file.write(path.read_text())
            os.replace(link, by_id)


def unregister(host: str, port: int, container_id: str = "") -> None:
    """Forget the secret of host:port (in memory and on disk). Safe to call twice.

    With `container_id`, only a record of that container is removed: the port may have gone to another
    container meanwhile (this one was removed behind ipybox's back), whose record stays; so does its
    record under the container's id.
    """
    name = key(host, port)
    record = _registry.get(name)
    if record is not None and (not container_id or record.container_id in ("", container_id)):
        del _registry[name]
    path = _token_file(host, port)
    if container_id:
        _container_file(container_id).unlink(missing_ok=True)
        on_disk = _read(path)
        if on_disk is not None and on_disk.container_id not in ("", container_id):
            return
    path.unlink(missing_ok=True)


def registered(host: str, port: int, container_id: str) -> bool:
    """Whether this process holds the secret of host:port for that container in memory."""
    record = _registry.get(key(host, port))
    return record is not None and record.container_id == container_id


def forget(host: str, port: int) -> None:
    """Forget the secret of host:port in this process only; the user-only file stays (the container runs on)."""
    _registry.pop(key(host, port), None)


def lookup(host: str, port: int) -> str | None:
    """The secret registered for host:port, or None when no running container of this user has one."""
    name = key(host, port)
    if (record := _registry.get(name)) is not None:
        if record.alive():
            return record.token
        # Gone behind ipybox's back; a container that took the port since may be recorded in the file.
        del _registry[name]
    record = _read(_token_file(host, port))
    if record is None or not record.alive():
        return None
    return record.token


def _read(path: Path) -> _Record | None:
    try:
        lines = path.read_text().split("\n")
    except (OSError, UnicodeDecodeError):
        return None
    token = lines[0].strip()
    if not token:
        return None
    container_id = lines[1].strip() if len(lines) > 1 else ""
    try:
        pid = int(lines[2]) if len(lines) > 2 and lines[2].strip() else 0
    except ValueError:
        pid = 0
    server = None
    fields = lines[3].split() if len(lines) > 3 else []
    if len(fields) == 2 and all(field.isdigit() for field in fields):
        server = Process(int(fields[0]), int(fields[1]))
    return _Record(token, container_id, pid, server)


def recorded_server(host: str, port: int) -> tuple[str, int, Process] | None:
    """(container id, init pid, server process) recorded for host:port, when all three are known."""
    name = key(host, port)
    record = _registry.get(name) or _read(_token_file(host, port))
    if record is None or not record.container_id or not record.pid or record.server is None:
        return None
    return record.container_id, record.pid, record.server


def recorded_container(host: str, port: int) -> tuple[str, int] | None:
    """(container id, init pid: 0 when not checkable here) recorded for host:port; None without a container id."""
    name = key(host, port)
    record = _registry.get(name) or _read(_token_file(host, port))
    if record is None or not record.container_id:
        return None
    return record.container_id, record.pid


def container_token(container_id: str) -> str | None:
    """The secret recorded for the container with this full id, while it (and its server) still runs."""
    record = _read(_container_file(container_id))
    if record is None or record.container_id != container_id or not record.alive():
        return None
    return record.token


def remove_stale(alive_container_ids: set[str]) -> None:
    """Remove the token files of containers that no longer exist."""
    directory = token_dir()
    if not directory.is_dir():
        return
    for path in directory.glob("*.token"):
        record = _read(path)
        if record is None or record.container_id not in alive_container_ids:
            path.unlink(missing_ok=True)
