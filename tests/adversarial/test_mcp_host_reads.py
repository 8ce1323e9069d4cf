"""A sandbox that swaps a directory below `ipybox mcp`'s allowed directories for a symlink cannot make an
upload read a host file outside them.

Sandbox code can write into bind-mounted host directories (an allowed directory may well be one), so it
can turn any directory there into a symlink to elsewhere on the host, before a tool call or while it
runs. `ipybox mcp` opens each allowed directory once, at start, and reaches every path below it from
that descriptor, one component at a time, following no link: an upload never reads through a link
(exfiltration of, say, ~/.ssh/id_rsa), a download never writes through one.

    racing swapper    a thread in the sandbox swaps allowed/sub between a directory and a symlink to a
                      host directory holding a secret, while upload_file uploads allowed/sub/file again
                      and again; afterwards no upload delivered the secret
    swapped root      sandbox code replaces the allowed directory itself (its parent is bind-mounted)
                      with a symlink to the secret's directory: uploads and downloads stay in the
                      directory opened at start
    after the check   a link planted between the check of a path and the opening of the file (in
                      process, deterministic): refused, the secret never sent
    directories       links inside an uploaded tree are left out, never followed; a link on the way to
                      an anchored directory upload is refused
    allowed_path      a link swapped in and out while a path is checked: a refusal naming the path,
                      never a stray error (EINVAL from readlink)
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

from ipybox import ExecutionClient, ExecutionContainer, ResourceClient
from ipybox._mcp_session import PathNotAllowedError, Sandbox, SandboxOptions
from tests.integration.mcp_client import McpServer, force_remove, text_of, wait_containers_gone

RACE_SECONDS = 6.0
BENIGN = "benign content"


def _secret(tmp_path: Path) -> tuple[Path, str]:
    """A host directory outside the allowed ones, holding `file` with a unique secret."""
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir()
    secret = f"SECRET-{uuid.uuid4().hex}"
    (secret_dir / "file").write_text(secret)
    return secret_dir, secret


# The swapper, written once: run as a thread in the sandbox's kernel, and as a host thread below.
SWAPPER = '''
import os, threading, time, uuid

def swap_reads(place, outside, stash, stop):
    """Until `stop` is set: `place` is a directory holding `file`, then a symlink to `outside`, then
    the directory again... (each moved aside and back by rename)."""
    os.makedirs(stash, exist_ok=True)
    directory, link = os.path.join(stash, "directory"), os.path.join(stash, "link")
    if not os.path.isdir(directory):
        os.mkdir(directory)
        with open(os.path.join(directory, "file"), "w") as f:
            f.write("benign content")
    if not os.path.lexists(link):
        os.symlink(outside, link)
    while not stop.is_set():
        for present, coming in ((directory, link), (link, directory)):
            try:
                os.rename(place, present)
            except FileNotFoundError:
                pass
            try:
                os.rename(coming, place)
            except FileNotFoundError:
                pass
            time.sleep(0.0005)
'''
_namespace: dict[str, Any] = {}
exec(SWAPPER, _namespace)
swap_reads: Callable[[str, str, str, threading.Event], None] = _namespace["swap_reads"]


async def _cell(server: McpServer, code: str) -> str:
    return await server.output(code)


def _outcome(is_error: bool, text: str) -> str:
    if not is_error:
        return "uploaded"
    for kind in ("symbolic link", "outside the allowed directories", "File not found"):
        if kind in text:
            return kind
    return text[:80]


# -- ipybox mcp: a swapper in the sandbox races upload_file ---------------------------------------------------


async def test_mcp_uploads_racing_a_swapper_in_the_sandbox_never_read_outside(image: str, tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    allowed.chmod(0o777)  # bind-mounted into the sandbox, whose user need not be root
    secret_dir, secret = _secret(tmp_path)
    server = McpServer(image, "--container-bind", f"{allowed}:bound", cwd=allowed)
    outcomes: dict[str, int] = {}
    try:
        async with server:
            stop_name = f"stop_{uuid.uuid4().hex[:8]}"
            await _cell(
                server,
                SWAPPER + f"{stop_name} = threading.Event()\n"
                f"threading.Thread(target=swap_reads, args=('/app/bound/sub', {str(secret_dir)!r}, "
                f"'/app/bound/.stash', {stop_name}), daemon=True).start()",
            )
            deadline = time.monotonic() + RACE_SECONDS
            count = 0
            while time.monotonic() < deadline:
                count += 1
                result = await server.call(
                    "upload_file", relpath=f"got/{count}.txt", local_path=str(allowed / "sub" / "file")
                )
                outcome = _outcome(result.is_error, text_of(result))
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
            await _cell(server, f"{stop_name}.set()")
            found = await _cell(
                server,
                "import os\n"
                "got = [open(os.path.join('/app/got', n)).read() for n in os.listdir('/app/got')]\n"
                f"print(sum({secret!r} in text for text in got), sum(text == {BENIGN!r} for text in got))",
            )
            await asyncio.sleep(0.1)
        await wait_containers_gone(server.case, timeout=15)
    finally:
        await force_remove(server.case)
    stolen, benign = (int(n) for n in found.split())
    assert stolen == 0, f"{stolen} uploads delivered the secret; outcomes: {outcomes}"
    # The race was real: some uploads got through, some met the symlink.
    assert benign > 0 and outcomes.get("uploaded", 0) == benign, outcomes
    assert len(outcomes) > 1, outcomes


# -- ipybox mcp: the allowed directory itself swapped for a symlink after start -------------------------------


async def test_mcp_transfers_stay_in_the_allowed_directory_opened_at_start(image: str, tmp_path: Path) -> None:
    parent = tmp_path / "parent"
    allowed = parent / "allowed"
    allowed.mkdir(parents=True)
    parent.chmod(0o777)
    allowed.chmod(0o777)
    (allowed / "file").write_text(BENIGN)
    secret_dir, secret = _secret(tmp_path)
    server = McpServer(image, "--container-bind", f"{parent}:parent", "--allowed-dir", str(allowed), cwd=tmp_path)
    try:
        async with server:
            await _cell(
                server,
                "import os\n"
                "os.rename('/app/parent/allowed', '/app/parent/moved')\n"
                f"os.symlink({str(secret_dir)!r}, '/app/parent/allowed')\n"
                "open('/app/planted.txt', 'w').write('planted')",
            )
            uploaded = await server.call("upload_file", relpath="got.txt", local_path=str(allowed / "file"))
            downloaded = await server.call(
                "download_file", relpath="planted.txt", local_path=str(allowed / "planted.txt")
            )
            got = await _cell(
                server, "import os\nprint(open('/app/got.txt').read() if os.path.exists('/app/got.txt') else '-')"
            )
        await wait_containers_gone(server.case, timeout=15)
    finally:
        await force_remove(server.case)
    assert secret not in got, f"the secret was uploaded: {text_of(uploaded)}"
    assert sorted(path.name for path in secret_dir.iterdir()) == ["file"], text_of(downloaded)
    # The directory opened at start (moved by the sandbox, still the user's) is the one used.
    assert not uploaded.is_error and got.strip() == BENIGN, text_of(uploaded)
    assert not downloaded.is_error and (parent / "moved" / "planted.txt").read_text() == "planted"


# -- ipybox mcp's session in process: a link planted right after the path was checked ------------------------


@pytest.fixture
async def resources(shared_container: ExecutionContainer) -> AsyncIterator[ResourceClient]:
    async with ResourceClient(port=shared_container.resource_port) as client:
        yield client


async def _sandbox_text(container: ExecutionContainer, path: str) -> str:
    async with ExecutionClient(port=container.executor_port) as kernel:
        result = await kernel.execute(
            f"import os\nprint(open({path!r}).read() if os.path.exists({path!r}) else '-', end='')"
        )
    return result.text or ""


async def test_an_upload_whose_path_turns_into_a_link_after_the_check_never_reads_outside(
    shared_container: ExecutionContainer,
    resources: ResourceClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    (allowed / "sub" / "file").write_text(BENIGN)
    secret_dir, secret = _secret(tmp_path)
    sandbox = Sandbox(SandboxOptions(tag="t", allowed_dirs=[allowed]))

    async def ready() -> tuple[None, ResourceClient]:
        return None, resources

    checked = sandbox.allowed_path

    def check_then_swap(local_path: str) -> Path:
        """What sandbox code can do through a bind mount between the check and the open."""
        path = checked(local_path)
        os.rename(allowed / "sub", allowed / "sub-moved")
        os.symlink(secret_dir, allowed / "sub")
        return path

    monkeypatch.setattr(sandbox, "ready", ready)
    monkeypatch.setattr(sandbox, "allowed_path", check_then_swap)
    relpath = f"after-check-{uuid.uuid4().hex[:8]}.txt"
    try:
        outcome = await sandbox.upload(relpath, str(allowed / "sub" / "file"))
    except OSError as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    finally:
        await sandbox.close()
    got = await _sandbox_text(shared_container, f"/app/{relpath}")
    assert secret not in got, f"the secret was uploaded ({outcome})"
    assert "symbolic link" in outcome and str(allowed / "sub") in outcome, outcome


# -- directory uploads: links inside the tree, a link on the way ------------------------------------------------


async def test_links_inside_an_uploaded_tree_are_left_out_never_followed(
    shared_container: ExecutionContainer, resources: ResourceClient, tmp_path: Path
) -> None:
    secret_dir, secret = _secret(tmp_path)
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "file").write_text(BENIGN)
    (tree / "to-dir").symlink_to(secret_dir, target_is_directory=True)
    (tree / "sub" / "to-file").symlink_to(secret_dir / "file")
    relpath = f"tree-{uuid.uuid4().hex[:8]}"
    await resources.upload_directory(relpath, tree)
    async with ExecutionClient(port=shared_container.executor_port) as kernel:
        result = await kernel.execute(
            "import os\n"
            f"root = '/app/{relpath}'\n"
            "entries = sorted(\n"
            "    os.path.relpath(os.path.join(d, n), root) for d, ds, fs in os.walk(root) for n in ds + fs\n"
            ")\n"
            "print(entries, open(os.path.join(root, 'sub', 'file')).read())"
        )
    assert result.text == f"['sub', 'sub/file'] {BENIGN}", result.text
    assert secret not in (result.text or "")


async def test_an_anchored_directory_upload_refuses_a_link_on_the_way(
    shared_container: ExecutionContainer, resources: ResourceClient, tmp_path: Path
) -> None:
    from ipybox.resource import _beneath, _files

    secret_dir, secret = _secret(tmp_path)
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "sub").symlink_to(secret_dir, target_is_directory=True)
    relpath = f"anchored-{uuid.uuid4().hex[:8]}"
    with _beneath.Root.open(allowed) as root:
        with pytest.raises(OSError, match="symbolic link") as raised:
            await _files.upload_directory(resources._connected(), relpath, allowed / "sub", root=root)
        with pytest.raises(OSError, match="symbolic link"):
            await _files.upload_file(resources._connected(), f"{relpath}.txt", allowed / "sub" / "file", root=root)
    assert str(allowed / "sub") in str(raised.value)
    assert await _sandbox_text(shared_container, f"/app/{relpath}/file") == "-"
    assert await _sandbox_text(shared_container, f"/app/{relpath}.txt") == "-"
    assert secret not in await _sandbox_text(shared_container, f"/app/{relpath}.txt")


# -- allowed_path while a link is swapped in and out ---------------------------------------------------------


def test_allowed_path_refuses_a_link_swapped_mid_call_by_name(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    inside = allowed / "inside"
    inside.mkdir()
    sandbox = Sandbox(SandboxOptions(tag="t", allowed_dirs=[allowed]))
    stop = threading.Event()
    # The link points inside the allowed directory: the old realpath check allowed it, when it got that far.
    args = (str(allowed / "sub"), str(inside), str(allowed / ".stash"), stop)
    swapper = threading.Thread(target=swap_reads, args=args)
    outcomes: dict[str, int] = {}
    swapper.start()
    try:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            local = str(allowed / "sub" / "file")
            try:
                sandbox.allowed_path(local)
                outcome = "allowed"
            except PathNotAllowedError as exc:
                assert local in str(exc) or str(allowed / "sub") in str(exc), exc
                outcome = "refused"
            except OSError as exc:
                outcome = f"{type(exc).__name__} (errno {exc.errno}): {exc}"
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    finally:
        stop.set()
        swapper.join()
    assert set(outcomes) <= {"allowed", "refused"}, outcomes
    assert "refused" in outcomes, outcomes
