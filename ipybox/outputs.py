"""Rich outputs of an execution, as Jupyter shows them: MIME bundles, typed events, the output area.

`Output` is one `execute_result` or `display_data` MIME bundle with accessors per type. The events
(`Stdout`, `Stderr`, `Display`, `Result`, `Error`) are what `Execution.events()` yields, in arrival
order. `OutputArea` applies a cell's messages the way Jupyter's output area does (streams merged,
`update_display_data` replacing the data of every output with that display id, `clear_output`
clearing, at once or, with `wait=True`, when the next output arrives) and renders nbformat outputs for
notebook export. Pure data handling: no I/O.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ipybox._escapes import strip_escapes

IMAGE_TYPES = ("image/png", "image/jpeg")
"""Image types that `ExecutionResult.images` carries, decoded."""


@dataclass
class Output:
    """One rich output: the MIME bundle of an `execute_result` or `display_data` message.

    Attributes:
        data: MIME type -> value, as the kernel sent it (text types as `str`, binary images as
            base64 `str`, JSON types as parsed JSON).
        metadata: The output's metadata (e.g. image sizes), MIME type -> value.
        kind: "execute_result" (a cell's last expression) or "display_data".
        display_id: The display's id when it was shown with `display_id`, else None.
        execution_count: For an execute_result, the cell's number.
    """

    data: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    kind: str = "display_data"
    display_id: str | None = None
    execution_count: int | None = None

    @property
    def mime_types(self) -> list[str]:
        """The MIME types present, in the kernel's order."""
        return list(self.data)

    def get(self, mime_type: str, default: Any = None) -> Any:
        """The raw value for `mime_type` (any type, e.g. "application/vnd.plotly.v1+json")."""
        return self.data.get(mime_type, default)

    def __contains__(self, mime_type: object) -> bool:
        return mime_type in self.data

    @property
    def text(self) -> str | None:
        """text/plain, without terminal escapes."""
        value = self.data.get("text/plain")
        return None if value is None else strip_escapes(_joined(value))

    @property
    def html(self) -> str | None:
        """text/html."""
        return _text(self.data.get("text/html"))

    @property
    def markdown(self) -> str | None:
        """text/markdown."""
        return _text(self.data.get("text/markdown"))

    @property
    def latex(self) -> str | None:
        """text/latex."""
        return _text(self.data.get("text/latex"))

    @property
    def svg(self) -> str | None:
        """image/svg+xml, as XML text."""
        return _text(self.data.get("image/svg+xml"))

    @property
    def json(self) -> Any:
        """application/json, parsed (None when absent)."""
        value = self.data.get("application/json")
        return json.loads(value) if isinstance(value, str) else value

    @property
    def png(self) -> bytes | None:
        """image/png, decoded bytes."""
        return _binary(self.data.get("image/png"))

    @property
    def jpeg(self) -> bytes | None:
        """image/jpeg, decoded bytes."""
        return _binary(self.data.get("image/jpeg"))

    @property
    def image(self) -> Image.Image | None:
        """The PNG or JPEG image, decoded (PNG first when both are present)."""
        for raw in (self.png, self.jpeg):
            if raw is not None:
                image = Image.open(io.BytesIO(raw))
                image.load()
                return image
        return None

    def to_nbformat(self) -> dict[str, Any]:
        """This output as an nbformat v4 output dict."""
        output: dict[str, Any] = {"output_type": self.kind, "data": dict(self.data), "metadata": dict(self.metadata)}
        if self.kind == "execute_result":
            output["execution_count"] = self.execution_count
        return output


@dataclass
class ErrorInfo:
    """An exception raised by executed code.

    Attributes:
        name: The exception class name, e.g. "ZeroDivisionError".
        value: The exception message.
        traceback: The formatted traceback, without terminal escapes.
    """

    name: str
    value: str
    traceback: str

    def to_nbformat(self) -> dict[str, Any]:
        return {
            "output_type": "error",
            "ename": self.name,
            "evalue": self.value,
            "traceback": self.traceback.split("\n"),
        }


# -- events -----------------------------------------------------------------------------------------


@dataclass
class Stdout:
    """Text the code wrote to stdout."""

    text: str


@dataclass
class Stderr:
    """Text the code wrote to stderr."""

    text: str


@dataclass
class Display:
    """A `display_data` output; `update` is True for an `update_display_data` of an earlier display."""

    output: Output
    update: bool = False


@dataclass
class Result:
    """The `execute_result` of the cell's last expression."""

    output: Output


@dataclass
class Error:
    """The exception that ended the execution."""

    error: ErrorInfo


Event = Stdout | Stderr | Display | Result | Error


# -- the output area --------------------------------------------------------------------------------


class OutputArea:
    """A cell's outputs as Jupyter's output area holds them.

    `add` takes one IOPub message content by type and returns the event for it (None for
    clear_output). `outputs` are the rich outputs (MIME bundles) currently shown; `nbformat()` is
    everything shown, streams included, for a notebook.
    """

    def __init__(self) -> None:
        self._shown: list[Output | ErrorInfo | list[str]] = []  # list[str]: [stream name, text]
        self._clear_pending = False

    def add(self, msg_type: str, content: dict[str, Any]) -> Event | None:
        if msg_type == "clear_output":
            if content.get("wait"):
                self._clear_pending = True
            else:
                self._shown.clear()
            return None
        if msg_type == "update_display_data":
            output = self._output(content, "display_data")
            for shown in self._shown:
                if isinstance(shown, Output) and output.display_id and shown.display_id == output.display_id:
                    shown.data, shown.metadata = output.data, output.metadata
            return Display(output, update=True)
        self._apply_pending_clear()
        if msg_type == "stream":
            name, text = str(content.get("name", "stdout")), strip_escapes(_joined(content.get("text", "")))
            last = self._shown[-1] if self._shown else None
            if isinstance(last, list) and last[0] == name:
                last[1] += text
            else:
                self._shown.append([name, text])
            return Stderr(text) if name == "stderr" else Stdout(text)
        if msg_type in ("display_data", "execute_result"):
            output = self._output(content, msg_type)
            self._shown.append(output)
            return Result(output) if msg_type == "execute_result" else Display(output)
        if msg_type == "error":
            error = error_info(content)
            self._shown.append(error)
            return Error(error)
        return None

    @property
    def outputs(self) -> list[Output]:
        return [shown for shown in self._shown if isinstance(shown, Output)]

    def nbformat(self) -> list[dict[str, Any]]:
        rendered: list[dict[str, Any]] = []
        for shown in self._shown:
            if isinstance(shown, list):
                rendered.append({"output_type": "stream", "name": shown[0], "text": shown[1]})
            else:
                rendered.append(shown.to_nbformat())
        return rendered

    def _apply_pending_clear(self) -> None:
        if self._clear_pending:
            self._clear_pending = False
            self._shown.clear()

    @staticmethod
    def _output(content: dict[str, Any], kind: str) -> Output:
        transient = content.get("transient") or {}
        count = content.get("execution_count")
        return Output(
            data=dict(content.get("data") or {}),
            metadata=dict(content.get("metadata") or {}),
            kind=kind,
            display_id=transient.get("display_id"),
            execution_count=count if isinstance(count, int) else None,
        )


def error_info(content: dict[str, Any]) -> ErrorInfo:
    """An ErrorInfo from an `error` message's (or error reply's) content, escapes removed."""
    trace = strip_escapes("\n".join(str(line) for line in content.get("traceback") or []))
    return ErrorInfo(
        name=strip_escapes(str(content.get("ename", "Error"))),
        value=strip_escapes(str(content.get("evalue", ""))),
        traceback=trace,
    )


def _joined(value: Any) -> str:
    # nbformat allows multi-line strings as lists of lines.
    return "".join(value) if isinstance(value, list) else str(value)


def _text(value: Any) -> str | None:
    return None if value is None else _joined(value)


def _binary(value: Any) -> bytes | None:
    if value is None:
        return None
    return base64.b64decode(_joined(value))
