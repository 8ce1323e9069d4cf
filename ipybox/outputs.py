"""Rich outputs of an execution, as Jupyter shows them: MIME bundles, typed events, the output area.

`Output` is one `execute_result` or `display_data` MIME bundle with accessors per type. The events
(`Stdout`, `Stderr`, `Display`, `Result`, `Error`, `Clear`) are what `Execution.events()` yields, in
arrival order. `OutputArea` applies a cell's messages the way Jupyter's output area does (consecutive
stream text of one stream merged, `update_display_data` replacing the data of every output with that
display id, `clear_output` clearing at once or, with `wait=True`, when the next output arrives) and
renders nbformat outputs for notebook export. Pure data handling: no I/O.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import re
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ipybox._escapes import strip_escapes

IMAGE_TYPES = ("image/png", "image/jpeg")
"""Image types that `ExecutionResult.images` carries, decoded (the first one present)."""


@dataclass
class Output:
    """One rich output: the MIME bundle of an `execute_result` or `display_data` message.

    Attributes:
        data: MIME type -> value, as the kernel sent it (text types as `str` with terminal escapes
            removed, binary images as base64 `str`, JSON types as parsed JSON).
        metadata: The output's metadata (e.g. image sizes), MIME type -> value.
        kind: "execute_result" (a cell's last expression) or "display_data".
        display_id: The display's id when it was shown with `display_id`, else None.
        execution_count: For an execute_result, the cell's number.
        truncated: The bundle did not fit `max_output_bytes`: only (the head of) its text/plain
            was kept; its other types were dropped.
    """

    data: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    kind: str = "display_data"
    display_id: str | None = None
    execution_count: int | None = None
    truncated: bool = False

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
        """application/json, parsed (None when absent; a string that is not JSON as it is)."""
        value = self.data.get("application/json")
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError:
                return value
        return value

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
        """The PNG or JPEG image, decoded (PNG first when both are present); None when absent."""
        for raw in (self.png, self.jpeg):
            if raw is not None:
                return Image.open(io.BytesIO(raw))
        return None

    def to_nbformat(self) -> dict[str, Any]:
        """This output as an nbformat v4 output dict.

        Values nbformat does not allow (a non-string value of a non-JSON type) are written as JSON text.
        """
        metadata = dict(self.metadata)
        if self.truncated:
            metadata["ipybox"] = {"truncated": True}
        data = {str(mime): _nbformat_value(str(mime), value) for mime, value in self.data.items()}
        output: dict[str, Any] = {"output_type": self.kind, "data": data, "metadata": metadata}
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
        """This error as an nbformat v4 error output."""
        return {
            "output_type": "error",
            "ename": self.name,
            "evalue": self.value,
            "traceback": self.traceback.split("\n"),
        }


# -- events -----------------------------------------------------------------------------------------


@dataclass
class Stdout:
    """Text the code wrote to stdout (terminal escapes removed)."""

    text: str


@dataclass
class Stderr:
    """Text the code wrote to stderr (terminal escapes removed)."""

    text: str


@dataclass
class Display:
    """A `display_data` output; `update` is True for an `update_display_data` of an earlier display
    (`output.display_id` names it; it may belong to an earlier execution)."""

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


@dataclass
class Clear:
    """`clear_output`: the outputs shown so far are cleared, at once or (`wait`) when the next one arrives."""

    wait: bool = False


Event = Stdout | Stderr | Display | Result | Error | Clear


# -- the output area --------------------------------------------------------------------------------


class _Stream:
    """Consecutive text of one stream; the chunks are joined only when rendered."""

    __slots__ = ("chunks", "name")

    def __init__(self, name: str, text: str) -> None:
        self.name = name
        self.chunks = [text]


class OutputArea:
    """A cell's outputs as Jupyter's output area holds them.

    `add` takes one IOPub message (type and content) and returns its event (None for a message
    that shows nothing). `outputs` are the rich outputs (MIME bundles) currently shown; `nbformat()`
    renders everything shown, streams and errors included, as nbformat outputs.
    """

    def __init__(self) -> None:
        self._shown: list[Output | ErrorInfo | _Stream] = []
        self._clear_pending = False

    def add(self, msg_type: str, content: dict[str, Any]) -> Event | None:
        """Apply one IOPub message; its event, or None for a type that shows nothing."""
        if msg_type == "stream":
            return self.stream(str(content.get("name", "stdout")), strip_escapes(_joined(content.get("text", ""))))
        if msg_type in ("display_data", "execute_result", "update_display_data"):
            return self.show(output_from_content(content, msg_type), update=msg_type == "update_display_data")
        if msg_type == "clear_output":
            return self.clear(bool(content.get("wait")))
        if msg_type == "error":
            return self.error(error_info(content))
        return None

    def stream(self, name: str, text: str) -> Stdout | Stderr:
        """Stream text (already free of escapes); merged into the last output when of the same stream."""
        self._apply_pending_clear()
        last = self._shown[-1] if self._shown else None
        if isinstance(last, _Stream) and last.name == name:
            last.chunks.append(text)
        else:
            self._shown.append(_Stream(name, text))
        return Stderr(text) if name == "stderr" else Stdout(text)

    def show(self, output: Output, update: bool = False) -> Display | Result:
        """A display_data or execute_result output; with `update`, an update_display_data."""
        if update:
            self.update(output)
            return Display(output, update=True)
        self._apply_pending_clear()
        self._shown.append(output)
        return Result(output) if output.kind == "execute_result" else Display(output)

    def update(self, output: Output) -> bool:
        """Replace data and metadata of every shown output with `output.display_id`; True if one matched.

        Shown outputs are replaced, not changed: an `Output` handed out before stays as it was.
        An update adds nothing and does not trigger a pending `clear_output(wait=True)`.
        """
        if output.display_id is None:
            return False
        matched = False
        for index, shown in enumerate(self._shown):
            if isinstance(shown, Output) and shown.display_id == output.display_id:
                self._shown[index] = dataclasses.replace(
                    shown, data=output.data, metadata=output.metadata, truncated=output.truncated
                )
                matched = True
        return matched

    def clear(self, wait: bool = False) -> Clear:
        if wait:
            self._clear_pending = True
        else:
            self._clear_pending = False
            self._shown.clear()
        return Clear(wait)

    def error(self, error: ErrorInfo) -> Error:
        self._apply_pending_clear()
        self._shown.append(error)
        return Error(error)

    @property
    def outputs(self) -> list[Output]:
        """The rich outputs currently shown, in order."""
        return [shown for shown in self._shown if isinstance(shown, Output)]

    def nbformat(self) -> list[dict[str, Any]]:
        """Everything shown as nbformat v4 outputs (carriage returns in streams applied as Jupyter does)."""
        rendered: list[dict[str, Any]] = []
        for shown in self._shown:
            if isinstance(shown, _Stream):
                text = apply_carriage_returns("".join(shown.chunks))
                rendered.append({"output_type": "stream", "name": shown.name, "text": text})
            else:
                rendered.append(shown.to_nbformat())
        return rendered

    def _apply_pending_clear(self) -> None:
        if self._clear_pending:
            self._clear_pending = False
            self._shown.clear()


def output_from_content(content: dict[str, Any], msg_type: str) -> Output:
    """An Output from a display_data/execute_result/update_display_data content; text types free of escapes.

    Malformed parts (what only code forging kernel messages sends) become empty, never an exception.
    """
    transient = _mapping(content.get("transient"))
    count = content.get("execution_count")
    data = {
        str(mime): strip_escapes(value) if isinstance(value, str) and str(mime).startswith("text/") else value
        for mime, value in _mapping(content.get("data")).items()
    }
    display_id = transient.get("display_id")
    return Output(
        data=data,
        metadata=_mapping(content.get("metadata")),
        kind="execute_result" if msg_type == "execute_result" else "display_data",
        display_id=None if display_id is None else str(display_id),
        execution_count=count if isinstance(count, int) and not isinstance(count, bool) else None,
    )


def error_info(content: dict[str, Any]) -> ErrorInfo:
    """An ErrorInfo from an `error` message's (or error reply's) content, escapes removed."""
    lines = content.get("traceback") or []
    trace = strip_escapes("\n".join(str(line) for line in lines) if isinstance(lines, list) else str(lines))
    return ErrorInfo(
        name=strip_escapes(str(content.get("ename", "Error"))),
        value=strip_escapes(str(content.get("evalue", ""))),
        traceback=trace,
    )


def decode_image(output: Output) -> Image.Image | None:
    """The output's PNG or JPEG as a (lazily loaded) PIL image; None when absent or not decodable."""
    try:
        return output.image
    except (binascii.Error, ValueError, OSError):  # PIL.UnidentifiedImageError is an OSError
        return None


def apply_carriage_returns(text: str) -> str:
    """Text as a terminal (and Jupyter's output area) shows it: `\\r` returns to the line start and
    what follows overwrites the line character by character; `\\r\\n` is a newline. Linear time."""
    if "\r" not in text:
        return text
    lines = text.replace("\r\n", "\n").split("\n")
    for index, line in enumerate(lines):
        if "\r" not in line:
            continue
        parts = line.split("\r")
        pending = parts[-1] == ""  # the line ends with a carriage return: the next text overwrites it
        if pending:
            parts.pop()
        # Visible text: the last part, then the tail of each earlier part longer than what is visible.
        pieces = [parts[-1]]
        length = len(parts[-1])
        for part in reversed(parts[:-1]):
            if len(part) > length:
                pieces.append(part[length:])
                length = len(part)
        lines[index] = "".join(pieces) + ("\r" if pending and index == len(lines) - 1 else "")
    return "\n".join(lines)


def _mapping(value: Any) -> dict[str, Any]:
    return {str(key): item for key, item in value.items()} if isinstance(value, dict) else {}


_JSON_MIME = re.compile(r"^application/(.*\+)?json$")


def _nbformat_value(mime: str, value: Any) -> Any:
    if _JSON_MIME.match(mime) or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(line, str) for line in value):
        return value
    return json.dumps(value, default=str)


def _joined(value: Any) -> str:
    # nbformat allows multi-line strings as lists of lines.
    return "".join(value) if isinstance(value, list) else str(value)


def _text(value: Any) -> str | None:
    return None if value is None else _joined(value)


def _binary(value: Any) -> bytes | None:
    if value is None:
        return None
    return base64.b64decode(_joined(value))
