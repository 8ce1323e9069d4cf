"""Processes of a local container as the host sees them: one process for good (pid and start time),
and the container's server process among its init's children. Used to check that a route leads to the
server (ipybox._routes) and that a recorded secret may still be handed out (ipybox._tokens).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_PROC = Path("/proc")
_ENDED = frozenset("ZXx")  # zombie, dead: /proc/<pid>/stat still shows the process, but it serves nothing


@dataclass(frozen=True)
class Process:
    """One process for good: its host pid and its start time (a process that gets the pid later starts later)."""

    pid: int
    start: int  # clock ticks after boot, field 22 of /proc/<pid>/stat

    @classmethod
    def of(cls, pid: int) -> Process | None:
        stat_ = _stat(pid)
        if stat_ is None or stat_[0] in _ENDED:
            return None
        return cls(pid, stat_[2])

    def runs(self) -> bool:
        stat_ = _stat(self.pid)
        return stat_ is not None and stat_[2] == self.start and stat_[0] not in _ENDED


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of a process, or None when there is no such process."""
    try:
        text = (_PROC / str(pid) / "stat").read_text()
        # The command name (field 2) is in parentheses and may hold anything, parentheses and spaces included.
        fields = text[text.rindex(")") + 2 :].split()
        return fields[0], int(fields[1]), int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def find_server(init: int) -> Process | None:
    """The container's server process: its init's only child, asked right after the server said it is ready.

    At that moment no cell has run and kernels are the server's children, not init's. Later, processes
    that cells leave behind become init's children too, so the server is identified once, here.
    """
    try:
        children = (_PROC / str(init) / "task" / str(init) / "children").read_text().split()
    except OSError:  # a kernel without CONFIG_PROC_CHILDREN: ask every process for its parent
        children = [name for name in os.listdir(_PROC) if name.isdigit() and _parent(int(name)) == init]
    if len(children) != 1:
        return None
    return Process.of(int(children[0]))


def _parent(pid: int) -> int | None:
    stat_ = _stat(pid)
    return None if stat_ is None else stat_[1]
