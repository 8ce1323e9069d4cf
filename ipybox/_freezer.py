"""Is a sandbox frozen (paused)? Asked by the clients, whose timers must not count frozen time.

A paused container's processes are frozen by the engine's cgroup freezer: they take no CPU and answer
nothing, while the host's clocks run on. A client that sees no answer must therefore tell "frozen"
from "dead" before it gives up, and that question is asked often (every heartbeat, every quarter
second of a waiting execution), so it is answered without the engine: one read of
`/proc/<init pid>/cgroup` for the container's cgroup (kept per pid afterwards), one read of its
freezer file:

- cgroup v1: `/sys/fs/cgroup/freezer/<path>/freezer.state` is `FROZEN` (or `FREEZING`);
- cgroup v2: `/sys/fs/cgroup/<path>/cgroup.events` has the line `frozen 1`.

The init pid and the container id come from the record `ExecutionContainer` made for the clients
(ipybox._tokens), the same trust as the liveness check there. Where the files cannot be read (a
remote engine, Docker Desktop's VM, another pid namespace: no usable pid), the answer comes from the
pause log of this process: the pauses and resumes `ExecutionContainer.pause()/resume()` made here.
Pauses made elsewhere (`ipybox pause` in another process, `docker pause`) are then not seen.
"""

from __future__ import annotations

from pathlib import Path

from ipybox import _tokens

_PROC = Path("/proc")
_CGROUP_ROOT = Path("/sys/fs/cgroup")

_files: dict[int, tuple[Path, tuple[str, ...]] | None] = {}
"""Per init pid: its freezer file and the contents that mean frozen (None: no freezer readable)."""

_paused: dict[str, bool] = {}
"""The pause log: container id -> paused, as `ExecutionContainer.pause()/resume()` of this process left it."""


def freezer_file(pid: int, proc: Path = _PROC, root: Path = _CGROUP_ROOT) -> tuple[Path, tuple[str, ...]] | None:
    """The freezer file of the cgroup of process `pid`, and the markers of the frozen state in it.

    None when `/proc/<pid>/cgroup` cannot be read or names no freezer (v1) nor unified (v2) hierarchy.
    """
    try:
        lines = (proc / str(pid) / "cgroup").read_text().splitlines()
    except OSError:
        return None
    unified = None
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        if "freezer" in controllers.split(","):
            return root / "freezer" / path.lstrip("/") / "freezer.state", ("FROZEN", "FREEZING")
        if controllers == "" and fields[0] == "0":
            unified = root / path.lstrip("/") / "cgroup.events"
    if unified is not None:
        return unified, ("frozen 1",)
    return None


def frozen_pid(pid: int, proc: Path = _PROC, root: Path = _CGROUP_ROOT) -> bool | None:
    """Whether the cgroup of process `pid` is frozen; None when this host cannot tell."""
    if proc is not _PROC or root is not _CGROUP_ROOT:
        return _read_state(freezer_file(pid, proc, root))
    if pid not in _files:
        _files[pid] = freezer_file(pid)
    state = _read_state(_files[pid])
    if state is None:
        _files.pop(pid, None)  # the process is gone, or its cgroup changed: look again next time
    return state


def _read_state(found: tuple[Path, tuple[str, ...]] | None) -> bool | None:
    if found is None:
        return None
    path, markers = found
    try:
        text = path.read_text()
    except OSError:
        return None
    if path.name == "cgroup.events":
        return any(line.strip() == markers[0] for line in text.splitlines())
    return text.strip() in markers


def frozen(host: str, port: int) -> bool:
    """Whether the sandbox serving host:port is frozen (paused), as far as this process can tell.

    The freezer file when the container's init pid is recorded and readable, else the pause log of
    this process; False when neither knows the sandbox.
    """
    recorded = _tokens.recorded_container(host, port)
    if recorded is None:
        return False
    container_id, pid = recorded
    if pid:
        state = frozen_pid(pid)
        if state is not None:
            return state
    return _paused.get(container_id, False)


def note_paused(container_id: str, paused: bool) -> None:
    """Record a pause or resume made by this process (the fallback where the freezer cannot be read)."""
    if paused:
        _paused[container_id] = True
    else:
        _paused.pop(container_id, None)


def logged_paused(container_id: str) -> bool:
    """Whether this process paused the container and has not resumed it."""
    return _paused.get(container_id, False)
