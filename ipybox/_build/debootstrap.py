"""Creating a Debian base image locally with debootstrap, for hosts that cannot pull from a registry."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path

from .._errors import BuildError
from .apt_sources import find_debian_mirror
from .events import Reporter

SUITE = "bookworm"
PACKAGES = ("python3", "python3-venv", "ca-certificates")


async def create_base_image(tag: str, report: Reporter) -> None:
    """Bootstraps a minimal Debian with python3 and venv and imports it into Docker as `tag`.

    Takes about half a minute with a nearby mirror. Needs root (debootstrap does) and the docker CLI.

    Raises:
        BuildError: not root, debootstrap unavailable, or debootstrap/import failed.
    """
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        raise BuildError(
            f"Creating the base image {tag} with debootstrap needs root. Run the build as root, "
            "or pass --base-image with an image that exists locally or can be pulled."
        )
    debootstrap = await _ensure_debootstrap(report)
    docker = shutil.which("docker")
    if docker is None:
        raise BuildError(f"Creating the base image {tag} needs the docker CLI (for `docker import`).")
    mirror = find_debian_mirror(SUITE)
    report("debootstrap", f"Creating {tag} with debootstrap from {mirror} (about 35 s)")
    root_dir = tempfile.mkdtemp(prefix="ipybox-debootstrap-")
    try:
        await _run(
            report,
            debootstrap,
            "--variant=minbase",
            "--include=" + ",".join(PACKAGES),
            SUITE,
            root_dir,
            mirror,
        )
        report("debootstrap", f"Importing {root_dir} as {tag}")
        await _import(root_dir, docker, tag)
    finally:
        # Owned by root and full of device nodes; the tree is useless once imported.
        shutil.rmtree(root_dir, ignore_errors=True)
    report("debootstrap", f"Created base image {tag}")


async def _ensure_debootstrap(report: Reporter) -> str:
    found = shutil.which("debootstrap") or shutil.which("debootstrap", path="/usr/sbin:/sbin")
    if found is not None:
        return found
    apt_get = shutil.which("apt-get")
    if apt_get is None or not Path("/etc/debian_version").exists():
        raise BuildError("debootstrap is not installed; install it with `apt-get install debootstrap`.")
    report("debootstrap", "Installing debootstrap with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        await _run(report, apt_get, "install", "-y", "--no-install-recommends", "debootstrap", env=env)
    except BuildError:
        # A fresh host may have no package lists yet.
        await _run(report, apt_get, "update", env=env)
        await _run(report, apt_get, "install", "-y", "--no-install-recommends", "debootstrap", env=env)
    found = shutil.which("debootstrap") or shutil.which("debootstrap", path="/usr/sbin:/sbin")
    if found is None:
        raise BuildError("debootstrap is not installed; install it with `apt-get install debootstrap`.")
    return found


async def _run(report: Reporter, *argv: str, env: dict[str, str] | None = None) -> None:
    """Runs a command, reporting each output line; raises BuildError with the last lines on failure."""
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env
    )
    assert process.stdout is not None
    tail: list[str] = []
    async for raw in process.stdout:
        line = raw.decode(errors="replace").rstrip()
        if line:
            report("debootstrap", line)
            tail = [*tail[-19:], line]
    if await process.wait() != 0:
        name = Path(argv[0]).name
        raise BuildError(f"{name} exited with {process.returncode}:\n" + "\n".join(tail))


async def _import(root_dir: str, docker: str, tag: str) -> None:
    """`tar -C root_dir -c . | docker import - tag`, without a shell."""
    read_fd, write_fd = os.pipe()
    try:
        tar = await asyncio.create_subprocess_exec(
            "tar", "-C", root_dir, "--numeric-owner", "-c", ".", stdout=write_fd, stderr=asyncio.subprocess.PIPE
        )
    finally:
        os.close(write_fd)
    try:
        importer = await asyncio.create_subprocess_exec(
            docker, "import", "-", tag, stdin=read_fd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
    except BaseException:
        tar.kill()
        await tar.wait()
        raise
    finally:
        os.close(read_fd)
    (_, import_err), (_, tar_err) = await asyncio.gather(importer.communicate(), tar.communicate())
    if tar.returncode != 0:
        raise BuildError(f"tar of the debootstrap tree failed: {tar_err.decode(errors='replace').strip()}")
    if importer.returncode != 0:
        raise BuildError(f"docker import of {tag} failed: {import_err.decode(errors='replace').strip()}")
