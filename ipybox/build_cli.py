"""`ipybox build`: runs `build_image` with a progress display on stderr.

stdout stays untouched: `ipybox run` builds on first use and its stdout carries only the sandbox's output.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn

from ._build import BuildEvent, build_image, default_base_image
from ._build.events import ProgressCallback
from ._errors import IpyboxError


def build_command(tag: str, dependencies: Path | None, root: bool, base_image: str) -> None:
    """Builds an image for the CLI, showing progress and turning errors into exit code 1.

    Args:
        tag: name of the image.
        dependencies: optional dependencies file (see `ipybox._build.build_image`).
        root: build a root image.
        base_image: the base image; empty means `default_base_image()`.

    Raises:
        typer.Exit: with code 1 after printing the error to stderr.
    """
    console = Console(stderr=True, highlight=False)
    try:
        with _progress_display(console) as on_progress:
            image_id = asyncio.run(
                build_image(
                    tag,
                    dependencies=dependencies,
                    root=root,
                    base_image=base_image or default_base_image(),
                    on_progress=on_progress,
                )
            )
    except IpyboxError as exc:
        first, _, rest = str(exc).partition("\n")
        # soft_wrap: the message stays one line however narrow the terminal (or the 80 columns of a pipe).
        console.print(f"[red]error:[/] {escape(first)}", soft_wrap=True)
        if rest:
            console.print(escape(rest), style="dim", soft_wrap=True)
        raise typer.Exit(1) from None
    console.print(f"Built image [bold]{escape(tag)}[/] ({image_id[:19]})")


@contextmanager
def _progress_display(console: Console) -> Iterator[ProgressCallback]:
    if not console.is_terminal:
        yield lambda event: console.print(f"[{event.stage}] {event.message}", markup=False, soft_wrap=True)
        return
    progress = Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.fields[stage]}[/]"),
        BarColumn(bar_width=20),
        MofNCompleteColumn(),
        TextColumn("{task.description}", markup=False),
        console=console,
        transient=True,
    )
    task = progress.add_task("starting", total=None, stage="build")

    def on_progress(event: BuildEvent) -> None:
        if event.stage == "done":
            return
        if event.step is not None:
            progress.update(task, completed=event.step, total=event.total)
        if event.stage == "base" or (event.stage == "build" and event.message.startswith("Step ")):
            # Dockerfile steps and the base-image choice stay on screen above the live line.
            progress.console.print(
                f"[{event.stage}] {event.message}", markup=False, style="dim", no_wrap=True, overflow="ellipsis"
            )
        width = max(20, console.width - 45)
        progress.update(task, description=event.message[:width], stage=event.stage)

    with progress:
        yield on_progress
