"""A sandbox that turns a directory of a download's host path into a symlink cannot move the write.

Sandbox code can write into bind-mounted host directories, so it can replace any directory below a
download target with a symlink to elsewhere on the host, before a call or while it runs. Host writes
(`ResourceClient.download_file`, `download_directory`, and `ipybox mcp`'s `download_file` into its
allowed directories) open every component relative to the previous one's descriptor with `O_NOFOLLOW`:
a symlink on the way is refused, naming the path, and nothing is ever written outside.

    racing swapper   a thread (or a thread in the sandbox, through a bind mount) that keeps swapping a
                     directory in the target path for a symlink to an outside directory and back, while
                     downloads run repeatedly; afterwards the outside directory holds nothing
    planted link     the symlink is there before the call: a clear error naming it, nothing outside
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from ipybox import ArchiveError, ExecutionClient, ExecutionContainer, ResourceClient, ResourceError
from tests.integration.mcp_client import McpServer, force_remove, text_of, wait_containers_gone

RACE_SECONDS = 4.0


@pytest.fixture
async def resources(shared_container: ExecutionContainer) -> AsyncIterator[ResourceClient]:
    async with ResourceClient(port=shared_container.resource_port) as client:
        yield client


async def _sandbox_files(container: ExecutionContainer) -> None:
    """/app/payload.bin and /app/tree/{a.txt,sub/b.txt} in the sandbox."""
    async with ExecutionClient(port=container.executor_port) as kernel:
        await kernel.execute(
            "import os\n"
            "os.makedirs('/app/tree/sub', exist_ok=True)\n"
            "open('/app/payload.bin', 'wb').write(b'p' * 100_000)\n"
            "open('/app/tree/a.txt', 'w').write('a')\n"
            "open('/app/tree/sub/b.txt', 'w').write('b')\n"
        )


def _everything_below(directory: Path) -> list[str]:
    return sorted(str(path.relative_to(directory)) for path in directory.rglob("*"))


# The swapper, written once: run as a host thread here, and as a thread in the sandbox's kernel below.
SWAPPER = '''
import os, threading, time, uuid

def swap(place, outside, graveyard, stop):
    """Until `stop` is set: `place` is a directory, then a symlink to `outside`, then a directory..."""
    os.makedirs(graveyard, exist_ok=True)
    while not stop.is_set():
        for make in (lambda: os.symlink(outside, place), lambda: os.mkdir(place)):
            try:
                os.rename(place, os.path.join(graveyard, uuid.uuid4().hex))
            except FileNotFoundError:
                pass
            try:
                make()
            except FileExistsError:  # the download created it meanwhile: next round
                pass
            time.sleep(0.0005)
'''
_namespace: dict[str, Any] = {}
exec(SWAPPER, _namespace)
swap: Callable[[str, str, str, threading.Event], None] = _namespace["swap"]


class Swapper:
    def __init__(self, place: Path, outside: Path, graveyard: Path) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=swap, args=(str(place), str(outside), str(graveyard), self._stop))

    def __enter__(self) -> Swapper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# -- ResourceClient, racing a host thread -------------------------------------------------------------------


async def test_downloads_racing_a_symlink_swapper_never_write_outside(
    shared_container: ExecutionContainer, resources: ResourceClient, tmp_path: Path
) -> None:
    await _sandbox_files(shared_container)
    target, outside = tmp_path / "target", tmp_path / "outside"
    target.mkdir()
    outside.mkdir()
    place = target / "place"
    outcomes: dict[str, int] = {}
    deadline = time.monotonic() + RACE_SECONDS
    with Swapper(place, outside, target / "graveyard"):
        while time.monotonic() < deadline:
            for kind, call in (
                ("file", resources.download_file("payload.bin", place / "deep" / "payload.bin")),
                ("file-direct", resources.download_file("payload.bin", place / "payload.bin")),
                ("directory", resources.download_directory("tree", place / "deep" / "tree")),
            ):
                try:
                    await call
                    outcome = f"{kind}: written"
                except (OSError, ArchiveError, ResourceError) as exc:
                    outcome = f"{kind}: {type(exc).__name__}"
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert _everything_below(outside) == [], outcomes
    # The race was real: some downloads got through, some met the symlink.
    assert any(key.endswith("written") for key in outcomes), outcomes
    assert any(not key.endswith("written") for key in outcomes), outcomes


# -- ResourceClient, a symlink planted before the call -------------------------------------------------------


@pytest.mark.parametrize("kind", ["file", "file-deep", "directory", "directory-itself"])
async def test_a_planted_symlink_in_the_target_path_is_refused_by_name(
    shared_container: ExecutionContainer, resources: ResourceClient, tmp_path: Path, kind: str
) -> None:
    await _sandbox_files(shared_container)
    target, outside = tmp_path / "target", tmp_path / "outside"
    target.mkdir()
    outside.mkdir()
    link = target / "place"
    link.symlink_to(outside, target_is_directory=True)
    with pytest.raises(OSError, match=str(link)) as raised:
        if kind == "file":
            await resources.download_file("payload.bin", link / "payload.bin")
        elif kind == "file-deep":
            await resources.download_file("payload.bin", link / "deep" / "payload.bin")
        elif kind == "directory":
            await resources.download_directory("tree", link / "tree")
        else:
            await resources.download_directory("tree", link)
    assert "symbolic link" in str(raised.value)
    assert _everything_below(outside) == []


async def test_a_symlink_as_the_target_file_is_replaced_not_followed(
    shared_container: ExecutionContainer, resources: ResourceClient, tmp_path: Path
) -> None:
    await _sandbox_files(shared_container)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"keep")
    local = tmp_path / "local.bin"
    local.symlink_to(outside)
    await resources.download_file("payload.bin", local)
    assert not local.is_symlink() and local.read_bytes() == b"p" * 100_000
    assert outside.read_bytes() == b"keep"


def test_root_owned_links_directly_in_the_root_are_followed(tmp_path: Path) -> None:
    """System links such as /bin -> usr/bin (or macOS's /tmp -> private/tmp) are followed: the sandbox
    cannot write into /. Any other symlink is refused."""
    from ipybox.resource import _beneath

    links = [entry for entry in os.scandir("/") if entry.is_symlink() and entry.stat(follow_symlinks=False).st_uid == 0]
    if not any(entry.is_dir() for entry in links):
        pytest.skip("no root-owned symlink to a directory in / on this machine")
    entry = next(entry for entry in links if entry.is_dir())
    with _beneath.open_directory(Path(entry.path)) as opened:
        assert os.path.samestat(os.fstat(opened.fd), os.stat(entry.path))
    mine = tmp_path / "mine"
    mine.symlink_to(tmp_path)
    with pytest.raises(OSError, match="symbolic link"), _beneath.open_directory(mine / "x", create=True):
        pass
    assert not (tmp_path / "x").exists()


# -- ipybox mcp: the sandbox swaps a directory of a bind mount inside the allowed directory --------------------


async def test_mcp_downloads_racing_a_swapper_in_the_sandbox_never_write_outside(image: str, tmp_path: Path) -> None:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    bound = allowed / "bound"
    for directory in (allowed, outside, bound):
        directory.mkdir()
    bound.chmod(0o777)  # the sandbox user need not be root
    server = McpServer(image, "--container-bind", f"{bound}:bound", cwd=allowed)
    try:
        async with server:
            await server.output("open('/app/payload.bin', 'wb').write(b'p' * 100_000)")
            stop_name = f"stop_{uuid.uuid4().hex[:8]}"
            await server.output(
                SWAPPER + f"{stop_name} = threading.Event()\n"
                f"threading.Thread(target=swap, args=('/app/bound/place', {str(outside)!r}, "
                f"'/app/bound/graveyard', {stop_name}), daemon=True).start()"
            )
            outcomes: dict[str, int] = {}
            deadline = time.monotonic() + RACE_SECONDS
            while time.monotonic() < deadline:
                for local in (bound / "place" / "payload.bin", bound / "place" / "deep" / "payload.bin"):
                    result = await server.call("download_file", relpath="payload.bin", local_path=str(local))
                    outcome = "error" if result.is_error else "written"
                    if result.is_error:
                        outcome = text_of(result).split(":")[0][:60]
                    outcomes[outcome] = outcomes.get(outcome, 0) + 1
            await server.output(f"{stop_name}.set()")
            await asyncio.sleep(0.1)
        await wait_containers_gone(server.case, timeout=15)
    finally:
        await force_remove(server.case)
    assert _everything_below(outside) == [], outcomes
    assert "written" in outcomes, outcomes
    assert len(outcomes) > 1, outcomes
