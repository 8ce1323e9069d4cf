"""Progress events that `build_image` reports through its `on_progress` callback."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

_STEP = re.compile(r"^Step (\d+)/(\d+) :")


@dataclass(frozen=True)
class BuildEvent:
    """One line of build progress.

    Attributes:
        stage: what the build is doing: `"base"` (choosing the base image), `"pull"`, `"debootstrap"`,
            `"build"` (Dockerfile steps and their output) or `"done"`.
        message: one line of text, without a trailing newline.
        step: the current Dockerfile step (1-based) during `"build"`, parsed from `Step i/n :` lines.
        total: the number of Dockerfile steps during `"build"`.
    """

    stage: str
    message: str
    step: int | None = None
    total: int | None = None


ProgressCallback = Callable[[BuildEvent], None]


def parse_step(line: str) -> tuple[int, int] | None:
    """Returns (step, total) of a legacy builder `Step 3/14 : RUN ...` line, else None."""
    match = _STEP.match(line)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2))


class Reporter:
    """Sends events to an optional callback, so callers need not check for None."""

    def __init__(self, callback: ProgressCallback | None) -> None:
        self._callback = callback

    def __call__(self, stage: str, message: str, step: int | None = None, total: int | None = None) -> None:
        if self._callback is not None:
            self._callback(BuildEvent(stage, message, step, total))
