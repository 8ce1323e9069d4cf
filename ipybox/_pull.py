"""Makes sure an image is present: local, or pulled with optional progress on stderr.

Pull progress goes to stderr, never stdout (stdout may be an MCP stdio stream):

- stderr is a terminal: a transient rich display with the bytes of each layer;
- stderr is not a terminal (logs, CI, a parent process): plain lines from `PullLines`;
- `show_progress=False`: nothing.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncGenerator, Callable, Mapping
from contextlib import aclosing
from typing import IO, Any, cast

import aiodocker

from ipybox._errors import ImageError, ImageNotFoundError
from ipybox._labels import IMAGE_LABEL

PullEvent = Mapping[str, Any]

# Statuses with which the engine reports a layer as present locally.
_LAYER_DONE = frozenset({"Pull complete", "Already exists"})
# Statuses after which a layer's download is complete (it may still be extracting).
_LAYER_DOWNLOADED = _LAYER_DONE | {"Download complete"}


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


class PullLines:
    """Renders Docker pull events as plain progress lines, for a stderr that is not a terminal.

    One line when the pull starts, one per layer when it is complete, one when the pull finished.
    Each layer is reported once, however many events the engine sends for it.
    """

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self._sizes: dict[str, int] = {}
        self._done: set[str] = set()

    def start(self) -> str:
        return f"ipybox: pulling {self.tag}"

    def feed(self, event: PullEvent) -> str | None:
        """The line for `event`, or None when it completes no layer."""
        layer = _layer_of(event)
        if layer is None:
            return None
        status = event.get("status")
        total = _total_of(event)
        if status == "Downloading" and total is not None:
            self._sizes[layer] = total
        if status not in _LAYER_DONE or layer in self._done:
            return None
        self._done.add(layer)
        if status == "Already exists":
            note = " (already exists)"
        elif layer in self._sizes:
            note = f" ({_format_bytes(self._sizes[layer])})"
        else:
            note = ""
        return f"ipybox: pull {self.tag}: {layer} done{note}"

    def finish(self) -> str:
        return f"ipybox: pulled {self.tag}"


async def _pull(docker: aiodocker.Docker, tag: str, *, show_progress: bool) -> None:
    stderr = sys.stderr  # looked up now: it may be redirected after import
    try:
        if not show_progress:
            await _drain(docker, tag, lambda event: None)
        elif stderr is not None and stderr.isatty():
            await _pull_with_display(docker, tag)
        else:
            await _pull_with_lines(docker, tag, stderr)
    except aiodocker.DockerError as exc:
        raise ImageNotFoundError(tag, exc.message) from exc


async def _drain(docker: aiodocker.Docker, tag: str, on_event: Callable[[PullEvent], None]) -> None:
    """Run the pull to its end, passing every event to `on_event`; stream errors fail the pull."""
    # Typed as an AsyncIterator, but it is an async generator: close it (and its HTTP response)
    # at once when the pull fails, not when it is garbage-collected.
    stream = cast(AsyncGenerator[PullEvent, None], docker.images.pull(tag, stream=True))
    async with aclosing(stream) as events:
        async for event in events:
            if "error" in event:
                raise ImageNotFoundError(tag, str(event["error"]))
            on_event(event)


async def _pull_with_lines(docker: aiodocker.Docker, tag: str, stderr: IO[str] | None) -> None:
    def write(line: str | None) -> None:
        if line is not None and stderr is not None:
            print(line, file=stderr, flush=True)

    lines = PullLines(tag)
    write(lines.start())
    await _drain(docker, tag, lambda event: write(lines.feed(event)))
    write(lines.finish())


async def _pull_with_display(docker: aiodocker.Docker, tag: str) -> None:
    # Imported lazily: rich is only needed when a pull actually happens on a terminal.
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn

    with Progress(
        TextColumn(f"[bold]pull[/] {tag} {{task.description}}"),
        BarColumn(),
        DownloadColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as progress:
        tasks: dict[str, tuple[TaskID, int]] = {}  # layer -> (task, total bytes)

        def on_event(event: PullEvent) -> None:
            layer = _layer_of(event)
            if layer is None:
                return
            status = event.get("status")
            total = _total_of(event)
            if status == "Downloading" and total is not None:
                if layer not in tasks:
                    tasks[layer] = (progress.add_task(layer, total=total), total)
                current = (event.get("progressDetail") or {}).get("current", 0)
                progress.update(tasks[layer][0], completed=current)
            elif status in _LAYER_DOWNLOADED and layer in tasks:
                task, size = tasks[layer]
                progress.update(task, completed=size)

        await _drain(docker, tag, on_event)


def _layer_of(event: PullEvent) -> str | None:
    # Layer events carry the short layer id; the first event carries the tag as "id" too, but
    # never a layer status, so it is filtered by the callers' status checks.
    layer = event.get("id")
    return layer if isinstance(layer, str) and layer else None


def _total_of(event: PullEvent) -> int | None:
    detail = event.get("progressDetail") or {}
    total = detail.get("total") if isinstance(detail, Mapping) else None
    return total if isinstance(total, int) and total > 0 else None


def _format_bytes(size: int) -> str:
    if size < 1000:
        return f"{size} B"
    value = size / 1000
    for unit in ("kB", "MB"):
        if value < 1000:
            return f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"
