"""Choosing the base image: local if present, else pulled, else made with debootstrap."""

from __future__ import annotations

import aiodocker

from .._docker import image_exists, is_connection_error
from .debootstrap import create_base_image
from .events import Reporter

DEFAULT_BASE_IMAGE = "debian:bookworm-slim"
"""The base image `ipybox build` uses unless told otherwise (pulled from Docker Hub)."""

LOCAL_BASE_IMAGE = "ipybox/debian-base:bookworm"
"""A Debian base made on this machine with debootstrap; the fallback when pulling is impossible."""


async def ensure_base_image(docker: aiodocker.Docker, base_image: str, report: Reporter) -> str:
    """Makes a base image available and returns its name.

    `base_image` is used when it exists locally. `LOCAL_BASE_IMAGE` is created with debootstrap when
    missing, without trying a pull. Any other image is pulled; if the pull fails, `LOCAL_BASE_IMAGE` is
    used instead (created first if missing).
    """
    if await image_exists(docker, base_image):
        report("base", f"Using local base image {base_image}")
        return base_image
    if base_image != LOCAL_BASE_IMAGE:
        report("pull", f"Pulling {base_image}")
        try:
            await _pull(docker, base_image, report)
            report("base", f"Using pulled base image {base_image}")
            return base_image
        except aiodocker.DockerError as exc:
            if is_connection_error(exc):
                raise
            report("base", f"Pulling {base_image} failed ({exc.message}); using {LOCAL_BASE_IMAGE} instead")
        if await image_exists(docker, LOCAL_BASE_IMAGE):
            report("base", f"Using local base image {LOCAL_BASE_IMAGE}")
            return LOCAL_BASE_IMAGE
    await create_base_image(LOCAL_BASE_IMAGE, report)
    return LOCAL_BASE_IMAGE


async def _pull(docker: aiodocker.Docker, name: str, report: Reporter) -> None:
    async for event in docker.images.pull(name, stream=True):
        # Byte counters ("Downloading 3MB/20MB") change many times a second; report status changes only.
        if event.get("progressDetail"):
            continue
        message = " ".join(str(event[k]) for k in ("id", "status") if event.get(k))
        if message:
            report("pull", message)
