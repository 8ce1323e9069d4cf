"""Which uid/gid the sandbox user of an image gets."""

from __future__ import annotations

import os
from dataclasses import dataclass

FALLBACK_ID = 1000
"""Used when the builder is root: the sandbox must never run as uid 0 unless `--root` asks for it."""


@dataclass(frozen=True)
class SandboxUser:
    """The numeric identity and home of the image's processes."""

    uid: int
    gid: int
    home: str


def sandbox_user(root: bool, uid: int | None = None, gid: int | None = None) -> SandboxUser:
    """Chooses the image's user.

    The builder's own uid/gid (default: of this process) make files in bind mounts writable on both
    sides. A root builder, or a platform without uids, gets `FALLBACK_ID` instead.

    Args:
        root: build a root image (uid/gid 0).
        uid: the builder's uid; defaults to `os.getuid()`.
        gid: the builder's gid; defaults to `os.getgid()`.
    """
    if root:
        return SandboxUser(0, 0, "/root")
    if uid is None:
        uid = os.getuid() if hasattr(os, "getuid") else FALLBACK_ID
    if gid is None:
        gid = os.getgid() if hasattr(os, "getgid") else FALLBACK_ID
    if uid == 0 or gid == 0:
        uid = gid = FALLBACK_ID
    return SandboxUser(uid, gid, "/home/ipybox")
