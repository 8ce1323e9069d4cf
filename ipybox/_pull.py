"""Makes sure an image is present: local, or pulled with optional progress on stderr."""

from __future__ import annotations

import logging
from typing import Any

import aiodocker

from ipybox._errors import ImageError, ImageNotFoundError
from ipybox._labels import IMAGE_LABEL

logger = logging.getLogger(__name__)


async def ensure_image(docker: aiodocker.Docker, tag: str, *, show_progress: bool) -> dict[str, Any]:
    """Return the image's inspect data, pulling it first when it is not local.

    Raises:
        ImageNotFoundError: the image is not local and the pull failed; the message names
            `ipybox build -t TAG`.
        ImageError: the image exists but was not built by `ipybox build` (its servers would not
            speak ipybox's authenticated protocol).
    """
    try:
        info: dict[str, Any] = await docker.images.inspect(tag)
    except aiodocker.DockerError as exc:
        if exc.status != 404:
            raise
        await _pull(docker, tag, show_progress=show_progress)
        info = await docker.images.inspect(tag)
    labels = (info.get("Config") or {}).get("Labels") or {}
    if labels.get(IMAGE_LABEL) != "true":
        raise ImageError(
            f"Image {tag!r} was not built by `ipybox build` (label {IMAGE_LABEL} missing). "
            f"Build an ipybox image with: ipybox build -t {tag}"
        )
    return info


async def _pull(docker: aiodocker.Docker, tag: str, *, show_progress: bool) -> None:
    try:
        if show_progress:
            await _pull_with_progress(docker, tag)
        else:
            async for event in docker.images.pull(tag, stream=True):
                if "error" in event:
                    raise ImageNotFoundError(tag, str(event["error"]))
    except aiodocker.DockerError as exc:
        raise ImageNotFoundError(tag, exc.message) from exc


async def _pull_with_progress(docker: aiodocker.Docker, tag: str) -> None:
    # Imported lazily: rich is only needed when a pull actually happens.
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    # stderr, never stdout: stdout may be an MCP stdio stream.
    with Progress(
        TextColumn("[bold]pull[/] {task.description}"),
        BarColumn(),
        DownloadColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as progress:
        layers: dict[str, Any] = {}
        async for event in docker.images.pull(tag, stream=True):
            if "error" in event:
                raise ImageNotFoundError(tag, str(event["error"]))
            layer = event.get("id")
            detail = event.get("progressDetail") or {}
            if not layer or "total" not in detail:
                continue
            if layer not in layers:
                layers[layer] = progress.add_task(layer, total=detail["total"])
            progress.update(layers[layer], completed=detail.get("current", 0))
