"""Tar rules on the host: the server's `archive` module, with its errors mapped to ipybox's.

One implementation serves both ends (`ipybox/_image/ipybox_server/archive.py`). The host applies it
to archives from the sandbox, which it treats as hostile, with `drop_special=True`: links, devices and
FIFOs are dropped rather than refused. The target directory is reached through `_beneath`, one
component at a time, so a symlink that sandbox code swaps into the target's path (through a bind
mount) cannot move the extraction.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO

from ipybox._errors import ArchiveError
from ipybox._image.ipybox_server import archive as _rules
from ipybox.resource import _beneath

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
    """`archive.extract_tar` into `target`, opened (and made) by `_beneath.open_directory`; raises
    ArchiveError for unsafe or oversized archives and FileExistsError for members that clash with
    existing entries. Directories this call made are removed again if it fails."""
    try:
        with _beneath.open_directory(target, create=True) as directory:
            try:
                result: tuple[int, int] = _rules.extract_into(
                    fileobj,
                    directory.fd,
                    target,
                    drop_special=drop_special,
                    max_members=max_members,
                    max_bytes=max_bytes,
                )
                return result
            except BaseException:
                directory.remove_created()
                raise
    except _rules.UnsafeArchiveError as exc:
        raise ArchiveError(str(exc)) from exc
    except _rules.ArchiveConflictError as exc:
        raise FileExistsError(str(exc)) from exc
