"""Tar rules on the host: the server's `archive` module, with its errors mapped to ipybox's.

One implementation serves both ends (`ipybox/_image/ipybox_server/archive.py`). The host applies it
to archives from the sandbox, which it treats as hostile, with `drop_special=True`: links, devices and
FIFOs are dropped rather than refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO

from ipybox._errors import ArchiveError
from ipybox._image.ipybox_server import archive as _rules

CHUNK_SIZE: int = _rules.CHUNK_SIZE
MAX_MEMBERS: int = _rules.MAX_MEMBERS
MAX_BYTES: int = _rules.MAX_BYTES
TEMP_SUFFIX: str = _rules.TEMP_SUFFIX
iter_tar = _rules.iter_tar
AsyncStreamFile = _rules.AsyncStreamFile
write_stream = _rules.write_stream


def extract_tar(
    fileobj: IO[bytes],
    target: Path,
    *,
    drop_special: bool = False,
    max_members: int = MAX_MEMBERS,
    max_bytes: int = MAX_BYTES,
) -> tuple[int, int]:
    """`archive.extract_tar`, raising ArchiveError for unsafe or oversized archives and
    FileExistsError for members that clash with existing entries."""
    try:
        result: tuple[int, int] = _rules.extract_tar(
            fileobj, target, drop_special=drop_special, max_members=max_members, max_bytes=max_bytes
        )
        return result
    except _rules.UnsafeArchiveError as exc:
        raise ArchiveError(str(exc)) from exc
    except _rules.ArchiveConflictError as exc:
        raise FileExistsError(str(exc)) from exc
