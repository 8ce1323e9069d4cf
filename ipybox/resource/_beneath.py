"""Host paths opened one component at a time, never through a symlink the sandbox may have planted.

Sandbox code can write into bind-mounted host directories, so it can swap any directory on the way to
a host path for a symlink to elsewhere on the host, before a transfer or while it runs. Opening a path
whole follows such a link (`O_NOFOLLOW` guards the last component only). Here every component is
opened relative to its parent's descriptor with `O_NOFOLLOW | O_DIRECTORY` (`openat`), missing
directories are made relative to it (`mkdirat`), and callers reach what lies below through the final
descriptor (`dir_fd`): a link swapped in at any moment makes the walk fail, it never moves a write or
a read.

A walk starts at `/`, or at a `Root`: a directory opened once (`ipybox mcp` opens each allowed
directory at start), below which paths are reached from its descriptor and no symlink at all is
followed. From `/`, one kind of symlink is followed: a root-owned link directly in `/` (`/bin ->
usr/bin`, macOS's `/tmp -> private/tmp` and `/var -> private/var`); no sandbox can write into the
host's root directory. Relative paths start at the current directory's physical path (`os.getcwd()`);
`..` is resolved lexically, which, with no symlinks on the way, is where the kernel would go too.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from types import TracebackType

# O_PATH (Linux): traversing needs search permission only, as path resolution does.
_WALK_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO swapped in after the type check must not block the open.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_ROOT_LINKS = 8  # root links followed in one walk (each restarts it at /)
_ATTEMPTS = 3  # tries per component when sandbox code removes or re-creates it under the walk


class SymlinkRefusedError(OSError):
    """A symbolic link on the way to a host path (errno ELOOP); `filename` is the link."""


class Root:
    """A directory opened once, by `Root.open`; walks given it as `root` start at its descriptor.

    `path` is the directory's path when it was opened; paths handed to a walk with this root must lie
    lexically below it (`below`). The descriptor stays on the directory whatever happens to its path
    afterwards. A context manager; `close()` is idempotent.
    """

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Root:
        """Open the directory `path`, with the user's symlinks on the way resolved (`realpath`)."""
        directory = open_directory(os.path.realpath(path))
        return cls(directory.detach(), directory.path)

    def below(self, path: str | os.PathLike[str]) -> list[str]:
        """The components of `path` (absolute, `..` resolved lexically) below this root.

        Raises:
            ValueError: `path` does not lie below the root.
        """
        parts, base = components(path), components(self.path)
        if parts[: len(base)] != base:
            raise ValueError(f"{os.fspath(path)} does not lie below {self.path}")
        return parts[len(base) :]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Root:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


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

    def detach(self) -> int:
        """The directory's descriptor, now the caller's to close; every other descriptor is closed."""
        fd, self.fd = self.fd, -1
        self.close()
        return fd

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


def root_links_resolved(path: str | os.PathLike[str]) -> list[str]:
    """`components(path)` with a root-owned link directly in `/` replaced by its target, as a walk
    from `/` would (`/tmp/x` is `/private/tmp/x` on macOS); no other link is looked at."""
    parts = components(path)
    for _ in range(_ROOT_LINKS):
        if not parts:
            break
        try:
            st = os.stat(os.sep + parts[0], follow_symlinks=False)
            if not stat.S_ISLNK(st.st_mode) or st.st_uid != 0:
                break
            parts = components(os.path.join(os.sep, os.readlink(os.sep + parts[0]))) + parts[1:]
        except OSError:
            break
    return parts


def _shown(parts: list[str]) -> str:
    return os.sep + os.sep.join(parts)


def _symlink_error(shown: str) -> SymlinkRefusedError:
    error = SymlinkRefusedError(
        errno.ELOOP,
        f"{shown} is a symbolic link: ipybox never follows one on the way to a host write, or to a read "
        "below an allowed directory (sandbox code can plant links in bind-mounted directories); pass a "
        "path without symbolic links",
    )
    error.filename = shown
    return error


def open_directory(path: str | os.PathLike[str], *, create: bool = False, root: Root | None = None) -> Directory:
    """Open the directory `path` component by component, never through a symlink (see the module).

    With `create`, missing directories are made (mode 0o777 through the umask, like `mkdir -p`). With
    `root`, the walk starts at its descriptor, `path` must lie below it (`Root.below`), and no link is
    followed.

    Raises:
        SymlinkRefusedError: (ELOOP) a component is a symbolic link; the message names it.
        NotADirectoryError: a component is not a directory.
        FileNotFoundError: a component is missing (without `create`).
        ValueError: `path` does not lie below `root`.
    """
    if root is None:
        base, parts = [], components(path)
        fd = os.open(os.sep, _WALK_FLAGS)
    else:
        base, parts = components(root.path), root.below(path)
        fd = os.dup(root.fd)
    created: list[tuple[int, str]] = []
    try:
        index = attempts = links = 0
        while index < len(parts):
            part = parts[index]
            shown = _shown(base + parts[: index + 1])
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
                if root is not None or index > 0 or st.st_uid != 0 or links >= _ROOT_LINKS:
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
        return Directory(fd, _shown(base + parts), created)
    except BaseException:
        os.close(fd)
        for parent_fd, _ in created:
            os.close(parent_fd)
        raise


def open_parent(
    path: str | os.PathLike[str], *, create: bool = True, root: Root | None = None
) -> tuple[Directory, str]:
    """The parent directory of `path`, opened (and, with `create`, made) as `open_directory` does,
    and the last component's name, to be reached through the parent's descriptor."""
    parts = components(path)
    if not parts or (root is not None and not root.below(path)):
        raise IsADirectoryError(errno.EISDIR, f"{os.fspath(path)} is a directory", os.fspath(path))
    return open_directory(Path(_shown(parts[:-1])), create=create, root=root), parts[-1]


def open_file(path: str | os.PathLike[str], *, root: Root | None = None) -> int:
    """A read-only descriptor of the regular file `path`, reached as `open_directory` does; the file
    itself is not followed either (`O_NOFOLLOW`). Nothing but a regular file is opened.

    Raises:
        SymlinkRefusedError: (ELOOP) a component, or the file, is a symbolic link; the message names it.
        FileNotFoundError: the file or a directory on the way is missing.
        IsADirectoryError: `path` is a directory.
        OSError: `path` is something else (a FIFO, a device, a socket).
    """
    directory, name = open_parent(path, create=False, root=root)
    with directory:
        shown = os.path.join(directory.path, name)
        for _ in range(_ATTEMPTS):
            try:
                st = os.stat(name, dir_fd=directory.fd, follow_symlinks=False)
            except FileNotFoundError:
                raise FileNotFoundError(errno.ENOENT, f"{shown} does not exist", shown) from None
            if stat.S_ISLNK(st.st_mode):
                raise _symlink_error(shown)
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, f"{shown} is a directory", shown)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, f"{shown} is not a regular file", shown)
            try:
                fd = os.open(name, _READ_FLAGS, dir_fd=directory.fd)
            except FileNotFoundError:
                continue  # swapped meanwhile: look again
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENXIO):
                    raise
                continue  # a link or a socket swapped in meanwhile: look again
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.set_blocking(fd, True)
                return fd
            os.close(fd)  # something else swapped in meanwhile: look again
        raise OSError(errno.EAGAIN, f"{shown} kept changing while it was opened", shown)
