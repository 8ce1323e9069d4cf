"""The executions a client remembers, and their export as a Jupyter notebook."""

from __future__ import annotations

import collections
import contextlib
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import nbformat

from ipybox._router import Route, aborted_error
from ipybox.outputs import Output, OutputArea


@dataclass
class Cell:
    """One execution in the history: its code, its route (count, output size, outcome), its output area."""

    code: str
    route: Route
    area: OutputArea


class History:
    """The newest executions of one client, bounded by count and by the output they hold.

    It holds each execution's output area (output already accounted against the execution's cap),
    never the Execution itself. Beyond `max_history` executions, and while the executions before the
    newest hold more than `max_output_bytes`, the oldest are forgotten.
    """

    def __init__(self, max_history: int, max_output_bytes: int | None) -> None:
        self.max_history = max_history
        self.max_output_bytes = max_output_bytes
        self.cells: collections.deque[Cell] = collections.deque()
        self.forgotten = 0

    def remember(self, code: str, route: Route, area: OutputArea) -> Cell | None:
        if self.max_history == 0:
            self.forgotten += 1
            return None
        cell = Cell(code, route, area)
        self.cells.append(cell)
        budget = self.max_output_bytes
        older = sum(kept.route.used for kept in self.cells) - cell.route.used
        while len(self.cells) > self.max_history or (budget is not None and len(self.cells) > 1 and older > budget):
            forgotten = self.cells.popleft()
            older -= forgotten.route.used
            self.forgotten += 1
        return cell

    def update_displays(self, output: Output, area: OutputArea) -> None:
        """An update_display_data also updates that display in earlier executions, as Jupyter does."""
        for cell in self.cells:
            if cell.area is not area:
                cell.area.update(output)

    def notebook(self) -> nbformat.NotebookNode:
        v4: Any = nbformat.v4  # nbformat's functions carry no annotations
        from_dict: Any = nbformat.from_dict
        cells = []
        if self.forgotten:
            cells.append(
                v4.new_markdown_cell(
                    f"*{self.forgotten} earlier execution(s) of this client are not in this notebook: "
                    f"the client remembers the newest {self.max_history} (ExecutionClient max_history) and "
                    "forgets older ones once they hold more than max_output_bytes of output.*"
                )
            )
        for cell in self.cells:
            outputs = cell.area.nbformat()
            if cell.route.aborted and cell.route.done:
                # Jupyter shows nothing for a skipped cell; an exported run should say it did not run.
                error = aborted_error(cell.route)
                outputs.append(
                    {"output_type": "error", "ename": type(error).__name__, "evalue": str(error), "traceback": []}
                )
            cells.append(
                v4.new_code_cell(
                    source=cell.code,
                    execution_count=cell.route.execution_count,
                    outputs=from_dict(outputs),
                )
            )
        notebook: nbformat.NotebookNode = v4.new_notebook(
            cells=cells,
            metadata={
                "kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"},
                "language_info": {"name": "python"},
            },
        )
        return notebook


def write_notebook(notebook: nbformat.NotebookNode, path: str) -> None:
    """Write atomically: a temporary file next to `path`, then renamed over it."""
    text: str = nbformat.writes(notebook)  # type: ignore[no-untyped-call]
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(prefix=".ipybox-", suffix=".ipynb", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
