"""`build_image`: the whole build, from dependencies file to image id."""

from __future__ import annotations

import asyncio
import io
import os
from collections import deque
from pathlib import Path

import aiodocker

from .._errors import BuildError
from .base_image import DEFAULT_BASE_IMAGE, ensure_base_image
from .context import build_args, context_files, context_tar
from .dependencies import parse_dependencies
from .docker_client import docker_client
from .events import ProgressCallback, Reporter, parse_step
from .npm_settings import read_npm_settings
from .pip_settings import read_pip_settings
from .user import sandbox_user

BASE_IMAGE_ENV = "IPYBOX_BASE_IMAGE"
_LOG_TAIL = 20


def default_base_image() -> str:
    """The base image to use when none is given: `$IPYBOX_BASE_IMAGE`, else `DEFAULT_BASE_IMAGE`."""
    return os.environ.get(BASE_IMAGE_ENV) or DEFAULT_BASE_IMAGE


async def build_image(
    tag: str = "gradion-ai/ipybox",
    *,
    dependencies: Path | None = None,
    root: bool = False,
    base_image: str = DEFAULT_BASE_IMAGE,
    on_progress: ProgressCallback | None = None,
) -> str:
    """Builds an ipybox image.

    The image has two Python environments: ipybox's machinery (kernel gateway, ipybox server) in
    `/opt/ipybox/venv`, which the user cannot change, and the user environment `/opt/ipybox/user-venv`
    (kernels, `pip install` in cells), owned by the sandbox user, into which the packages of `dependencies`
    go in a layer of their own. uv, uvx, node, npm and npx are on PATH; pip, uv and npm use the host's
    index settings and CA bundle. The image runs as a non-root user whose uid/gid are the builder's (1000
    when the builder is root). Unchanged inputs rebuild from the layer cache in seconds.

    Example:
        ```python
        image_id = await build_image("my-box", dependencies=Path("deps.txt"), on_progress=print)
        ```

    Args:
        tag: name of the image.
        dependencies: a file of extra requirements for the user environment, requirements.txt lines or
            pyproject `dependencies` array items; validated before anything is sent to Docker.
        root: run the image's processes as root instead of the sandbox user.
        base_image: a Debian-based image; pulled when missing, and replaced by a local debootstrap base
            (`LOCAL_BASE_IMAGE`) when it cannot be pulled.
        on_progress: called with each `BuildEvent` (base image choice, pull, debootstrap, build output).

    Returns:
        The id of the built image (`sha256:…`).

    Raises:
        DependencyFileError: a line of `dependencies` is not a valid requirement.
        BuildError: the base image cannot be made available or a Dockerfile step failed.
        DockerUnavailableError: no Docker engine answers.
    """
    report = Reporter(on_progress)
    requirements = parse_dependencies(dependencies) if dependencies is not None else []
    # Each asks a host tool (`pip config list`, `npm config get registry cafile`): about half a second apiece.
    pip, (npm_registry, npm_cafile) = await asyncio.gather(
        asyncio.to_thread(read_pip_settings), asyncio.to_thread(read_npm_settings)
    )
    user = sandbox_user(root)
    files = context_files(requirements, pip, npm_registry=npm_registry, npm_cafile=npm_cafile)
    async with docker_client() as docker:
        await docker.version()  # fail fast, with a clear error, when no engine answers
        base = await ensure_base_image(docker, base_image, report)
        image_id = await _build(docker, context_tar(files), tag, build_args(base, user), report)
    report("done", f"Built {tag} ({image_id})")
    return image_id


async def _build(docker: aiodocker.Docker, context: bytes, tag: str, args: dict[str, str], report: Reporter) -> str:
    tail: deque[str] = deque(maxlen=_LOG_TAIL)
    step: int | None = None
    total: int | None = None
    step_line = ""
    image_id: str | None = None
    short_id: str | None = None
    pending = ""
    try:
        async for chunk in docker.images.build(
            fileobj=io.BytesIO(context),
            encoding="gzip",
            tag=tag,
            buildargs=args,
            rm=True,
            forcerm=True,
            stream=True,
        ):
            if isinstance(chunk.get("aux"), dict) and chunk["aux"].get("ID"):
                image_id = str(chunk["aux"]["ID"])
            # Output arrives in arbitrary pieces; only complete lines are reported.
            pending += str(chunk.get("stream", ""))
            *lines, pending = pending.split("\n")
            for raw in lines:
                line = raw.rsplit("\r", 1)[-1].rstrip()  # keep what a terminal would show after \r
                if not line:
                    continue
                parsed = parse_step(line)
                if parsed is not None:
                    step, total = parsed
                    step_line = line
                if line.startswith("Successfully built "):
                    short_id = line.split()[-1]
                tail.append(line)
                report("build", line, step, total)
    except aiodocker.DockerStreamError as exc:
        where = f" at {step_line}" if step_line else ""
        raise BuildError(
            f"Building {tag} failed{where}: {exc.message}\nLast build output:\n" + "\n".join(tail)
        ) from exc
    if image_id is None and short_id is not None:
        image_id = str((await docker.images.inspect(short_id))["Id"])
    if image_id is None:
        # aiodocker ends the stream quietly when the connection drops; the tag may be stale.
        raise BuildError(f"Building {tag} ended without a result (connection to Docker lost?)")
    return image_id
