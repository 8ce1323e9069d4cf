"""Host directories opened one component at a time, never through a symlink the sandbox may have planted.

Sandbox code can write into bind-mounted host directories, so it can swap any directory on the way to
a download target for a symlink to elsewhere on the host, before a transfer or while it runs. Opening
a path whole follows such a link (`O_NOFOLLOW` guards the last component only). Here every component
is opened relative to its parent's descriptor with `O_NOFOLLOW | O_DIRECTORY` (`openat`), missing
directories are made relative to it (`mkdirat`), and callers reach what lies below through the final
descriptor (`dir_fd`): a link swapped in at any moment makes the walk fail, it never moves a write.

One kind of symlink is followed: a root-owned link directly in `/` (`/bin -> usr/bin`, macOS's
`/tmp -> private/tmp` and `/var -> private/var`); no sandbox can write into the host's root directory.
Relative paths start at the current directory's physical path (`os.getcwd()`); `..` is resolved
lexically, which, with no symlinks on the way, is where the kernel would go too.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from types import TracebackType

# O_PATH (Linux): traversing needs search permission only, as path resolution does.
_WALK_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_ROOT_LINKS = 8  # root links followed in one walk (each restarts it at /)
_ATTEMPTS = 3  # tries per component when sandbox code removes or re-creates it under the walk


class Directory:
    """A directory reached by `open_directory`: its descriptor, and the directories the walk created.

    A context manager; `close()` closes every descriptor it holds.
    """

    def __init__(self, fd: int, path: str, created: list[tuple[int, str]]) -> None:
        self.fd = fd
        self.path = path
        self._created = created  # (descriptor of the parent, name), outermost first

    def remove_created(self) -> None:
        """Remove the directories this walk created, innermost first, as long as they are empty."""
        for parent_fd, name in reversed(self._created):
            try:
                os.rmdir(name, dir_fd=parent_fd)
            except OSError:
                break

    def close(self) -> None:
        for parent_fd, _ in self._created:
            os.close(parent_fd)
        self._created = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Directory:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def components(path: str | os.PathLike[str]) -> list[str]:
    """The components of `path` made absolute (against the physical cwd), `.` and `..` resolved lexically."""
    return [part for part in os.path.normpath(os.path.abspath(path)).split(os.sep) if part]


def _shown(parts: list[str]) -> str:
    return os.sep + os.sep.join(parts)


def _symlink_error(shown: str) -> OSError:
    error = OSError(
        errno.ELOOP,
        f"{shown} is a symbolic link: host writes never follow one (sandbox code can plant links in "
        "bind-mounted directories); pass a path without symbolic links",
    )
    error.filename = shown
    return error


def open_directory(path: str | os.PathLike[str], *, create: bool = False) -> Directory:
    """Open the directory `path` component by component, never through a symlink (see the module).

    With `create`, missing directories are made (mode 0o777 through the umask, like `mkdir -p`).

    Raises:
        OSError: (ELOOP) a component is a symbolic link; the message names it.
        NotADirectoryError: a component is not a directory.
        FileNotFoundError: a component is missing (without `create`).
    """
    parts = components(path)
    fd = os.open(os.sep, _WALK_FLAGS)
    created: list[tuple[int, str]] = []
    try:
        index = attempts = links = 0
        while index < len(parts):
            part = parts[index]
            shown = _shown(parts[: index + 1])
            attempts += 1
            try:
                child = os.open(part, _WALK_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create or attempts > _ATTEMPTS:
                    raise FileNotFoundError(errno.ENOENT, f"{shown} does not exist", shown) from None
                try:
                    os.mkdir(part, 0o777, dir_fd=fd)
                except FileExistsError:
                    continue  # made meanwhile: open it
                created.append((os.dup(fd), part))
                continue
            except OSError as exc:
                if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                    raise
                try:
                    st = os.stat(part, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    if attempts > _ATTEMPTS:
                        raise
                    continue
                if stat.S_ISDIR(st.st_mode) and attempts <= _ATTEMPTS:
                    continue  # a directory again: the link was swapped out meanwhile
                if not stat.S_ISLNK(st.st_mode):
                    raise NotADirectoryError(errno.ENOTDIR, f"{shown} is not a directory", shown) from None
                if index > 0 or st.st_uid != 0 or links >= _ROOT_LINKS:
                    raise _symlink_error(shown) from None
                # A system link in / (see the module): the walk restarts at / with its target.
                parts = components(os.path.join(os.sep, os.readlink(part, dir_fd=fd))) + parts[1:]
                links += 1
                index = attempts = 0
                continue
            os.close(fd)
            fd = child
            index += 1
            attempts = 0
        return Directory(fd, _shown(parts), created)
    except BaseException:
        os.close(fd)
        for parent_fd, _ in created:
            os.close(parent_fd)
        raise


def open_parent(path: str | os.PathLike[str]) -> tuple[Directory, str]:
    """The parent directory of `path`, opened (and made) as `open_directory(create=True)` does, and
    the last component's name, to be reached through the parent's descriptor."""
    parts = components(path)
    if not parts:
        raise IsADirectoryError(errno.EISDIR, f"{os.fspath(path)} is a directory", os.fspath(path))
    return open_directory(Path(_shown(parts[:-1])), create=True), parts[-1]
