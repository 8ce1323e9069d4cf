"""The `ipybox` command line: build, run, cleanup."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ipybox._errors import ExecutionError, ImageNotFoundError, IpyboxError

app = typer.Typer(
    name="ipybox",
    help="A secure, fast Python code-execution sandbox for AI agents.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Diagnostics go to stderr; stdout carries only the sandbox's output.
err = Console(stderr=True, soft_wrap=True)

TagOption = Annotated[str, typer.Option("-t", "--tag", help="Name and optionally tag of the image (name:tag).")]


@app.command()
def build(
    tag: TagOption = "gradion-ai/ipybox",
    dependencies: Annotated[
        Path | None,
        typer.Option(
            "-d",
            "--dependencies",
            help="Extra Python packages: requirements.txt lines or pyproject array lines.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    root: Annotated[bool, typer.Option("-r", "--root", help="Build an image whose processes run as root.")] = False,
    base_image: Annotated[
        str | None,
        typer.Option(
            "--base-image",
            help="Debian-based image to build on [default: $IPYBOX_BASE_IMAGE or debian:bookworm-slim]. "
            "When it can be neither found nor pulled, a Debian base is made with debootstrap.",
        ),
    ] = None,
) -> None:
    """Build an ipybox image."""
    from ipybox._build import default_base_image
    from ipybox.build_cli import build_command

    build_command(tag, dependencies, root, base_image or default_base_image())


@app.command()
def run(
    code: Annotated[str | None, typer.Argument(help="Python code to run.")] = None,
    file: Annotated[
        Path | None, typer.Option("-f", "--file", help="Run the code in this file.", exists=True, dir_okay=False)
    ] = None,
    tag: TagOption = "gradion-ai/ipybox",
    timeout: Annotated[float, typer.Option(help="Seconds the code may run.")] = 120,
    images_dir: Annotated[
        Path, typer.Option("--images-dir", help="Where images the code displays are saved as PNG files.")
    ] = Path("."),
) -> None:
    """Run code in a fresh sandbox, print its output and save its images.

    The default image is built on first use.
    """
    if (code is None) == (file is None):
        err.print("[red]error:[/] give either CODE or -f FILE")
        raise typer.Exit(2)
    source = code if code is not None else file.read_text()  # type: ignore[union-attr]
    from ipybox._run import image_present, run_code

    try:
        if not asyncio.run(image_present(tag)):
            err.print(f"ipybox: image {tag} not found; building it now (first use)")
            build(tag=tag, dependencies=None, root=False, base_image=None)
        result = asyncio.run(run_code(source, tag=tag, timeout=timeout))
    except ExecutionError as exc:
        err.print(exc.trace or exc.message, markup=False, highlight=False)
        raise typer.Exit(1) from None
    except ImageNotFoundError as exc:
        err.print(f"[red]error:[/] {exc}", markup=True, highlight=False)
        raise typer.Exit(1) from None
    except (IpyboxError, TimeoutError) as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    if result.text is not None:
        sys.stdout.write(result.text + "\n")
    if result.images:
        images_dir.mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(result.images, start=1):
            path = _free_path(images_dir, f"ipybox-image-{index}.png")
            image.save(path)
            err.print(f"saved image {index} to {path}")


@app.command()
def cleanup(
    ancestor: Annotated[
        str | None,
        typer.Option("-a", "--ancestor", help="Remove the containers created from this image instead."),
    ] = None,
) -> None:
    """Remove ipybox containers (all labelled as ipybox's, or those of one image)."""
    from ipybox._cleanup import remove_containers

    try:
        removed = asyncio.run(remove_containers(ancestor))
    except IpyboxError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    err.print(f"removed {len(removed)} container(s)")


def _free_path(directory: Path, name: str) -> Path:
    path = directory / name
    stem, counter = path.stem, 1
    while path.exists():
        counter += 1
        path = directory / f"{stem}-{counter}.png"
    return path


def main() -> None:
    app()
