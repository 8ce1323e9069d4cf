"""Rich outputs of an execution, as Jupyter shows them: MIME bundles, typed events, the output area.

`Output` is one `execute_result` or `display_data` MIME bundle with accessors per type. The events
(`Stdout`, `Stderr`, `Display`, `Result`, `Error`, `Clear`, and `ToolCallRequest` when approvals are
on) are what `Execution.events()` yields, in arrival order. `OutputArea` applies a cell's messages the
way Jupyter's output area does (consecutive stream text of one stream merged, `update_display_data`
replacing the data of every output with that display id, `clear_output` clearing at once or, with
`wait=True`, when the next output arrives) and renders nbformat outputs for notebook export. `TextLog`
is the arrival log of an execution's text and makes the result's `text`, `stdout` and `stderr` of it
with at most two copies alive.

What a bundle costs kept (`bundle_charge`): images at the memory their decode takes, read from their
header without decoding them (`ipybox._images`), plus their base64 text and encoded bytes; an image
that cannot be decoded, or does not fit, is replaced by a marked output (`dropped_image_output`).
Pure data handling: no I/O.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii
from typing import Any

from PIL import Image

from ipybox._errors import InvalidStateError
from ipybox._escapes import strip_escapes
from ipybox._images import ImageHeader, UnreadableImage, format_bytes, joined_base64, open_image, read_header

logger = logging.getLogger(__name__)


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
        truncated: The bundle was not kept whole: it did not fit `max_output_bytes` (only the head of
            its text/plain was kept), or its image was dropped (its text/plain is then one line,
            "[image dropped: ...]", saying why: it could not be decoded, or its decoded size did not
            fit the room left).
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
        """image/png, the encoded file's bytes (base64 decoded); None when absent or not base64."""
        return _binary(self.data.get("image/png"))

    @property
    def jpeg(self) -> bytes | None:
        """image/jpeg, the encoded file's bytes (base64 decoded); None when absent or not base64."""
        return _binary(self.data.get("image/jpeg"))

    @property
    def image(self) -> Image.Image | None:
        """The PNG or JPEG image as a PIL image, opened but not yet decoded (PNG first when both are
        present); None when absent or not decodable (see `decode_image`). Never raises."""
        return decode_image(self)

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


class ApprovalState(enum.Enum):
    """Where a `ToolCallRequest` is: PENDING ──approve()──▶ APPROVED, ──deny()──▶ DENIED, or EXPIRED
    (no decision reached the sandbox in time, the calling code went away, or its execution ended)."""

    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"


@dataclass(eq=False)
class ToolCallRequest:
    """A tool call or shell escape of the code that waits for the application's decision before it runs.

    Yielded by `Execution.events()` when the client has approvals on (`ExecutionClient(approvals=...)`).
    A request an approval policy decided is yielded too, already decided (`state`, `decided_by`);
    otherwise the reader decides it with `approve()` or `deny()`. The code waits meanwhile; that
    time does not count against the execution's timeout. A request nobody decides is refused by the
    sandbox after `approval_timeout` seconds (the code gets `ToolApprovalExpired`).

    Attributes:
        kind: "tool" for an MCP tool call, "shell" for a shell escape (`!cmd`, `!!cmd`, `%sx`,
            `%%bash`, `%%sh`).
        server: The MCP server's name; "shell" for a shell escape.
        tool: The tool's name; for a shell escape its kind ("system" for `!cmd`, "getoutput" for
            `!!cmd`/`%sx`, "%%bash", "%%sh").
        arguments: The tool's arguments; for a shell escape `{"command": "..."}`.
        id: The request's id in the sandbox.
        state: PENDING until decided (see `ApprovalState`).
        reason: Why it was denied or expired ("" otherwise).
        decided_by: "reader" (`approve()`/`deny()`), "policy", "client" (no policy and no
            reader that could decide it), "sandbox" (it expired there); None while pending.
    """

    id: str
    kind: str
    server: str
    tool: str
    arguments: dict[str, Any]
    state: ApprovalState = ApprovalState.PENDING
    reason: str = ""
    decided_by: str | None = None
    _decide: Callable[[ToolCallRequest, bool, str, str], Awaitable[None]] | None = field(
        default=None, repr=False, compare=False
    )

    @property
    def name(self) -> str:
        """ "server.tool", e.g. "github.create_issue", or "shell.system" for `!cmd`."""
        return f"{self.server}.{self.tool}"

    async def approve(self) -> None:
        """Let the call run. Returns once the sandbox has taken the decision.

        Raises:
            InvalidStateError: The request was decided already, expired, or its execution ended
                (the message says which); or the client disconnected.
        """
        await self._send(True, "")

    async def deny(self, reason: str = "") -> None:
        """Refuse the call: the code gets `ToolDenied` (`ShellEscapeDenied` for a shell escape) with
        `reason`. Returns once the sandbox has taken the decision.

        Raises:
            InvalidStateError: As for `approve()`.
        """
        await self._send(False, reason)

    async def _send(self, approve: bool, reason: str) -> None:
        if self._decide is None:
            raise InvalidStateError(f"the request for {self.name} belongs to no client; it cannot be decided")
        await self._decide(self, approve, reason, "reader")


Event = Stdout | Stderr | Display | Result | Error | Clear | ToolCallRequest


# -- the output area --------------------------------------------------------------------------------


def _stream_key(name: str) -> str:
    """The result string a stream's text goes to: `stderr`, or `stdout` for any other name."""
    return "stderr" if name == "stderr" else "stdout"


class _Stream:
    """Consecutive text of one stream; the chunks are joined only when rendered.

    `start` is where this text begins in all text of its stream key so far (`_stream_key`); once
    `OutputArea.compact_streams` gave it `source` (the whole text of its key), the chunks are gone and
    the text is `source[start : start + length]`.
    """

    __slots__ = ("chunks", "length", "name", "source", "start")

    def __init__(self, name: str, text: str, start: int) -> None:
        self.name = name
        self.chunks = [text]
        self.start = start
        self.length = len(text)
        self.source: str | None = None

    def append(self, text: str) -> None:
        if self.source is not None:
            self.chunks = [self.text()]
            self.source = None
        self.chunks.append(text)
        self.length += len(text)

    def text(self) -> str:
        if self.source is not None:
            return self.source[self.start : self.start + self.length]
        return "".join(self.chunks)


class OutputArea:
    """A cell's outputs as Jupyter's output area holds them.

    `add` takes one IOPub message (type and content) and returns its event (None for a message
    that shows nothing). `outputs` are the rich outputs (MIME bundles) currently shown; `nbformat()`
    renders everything shown, streams and errors included, as nbformat outputs.
    """

    def __init__(self) -> None:
        self._shown: list[Output | ErrorInfo | _Stream] = []
        self._clear_pending = False
        self._stream_lengths = {"stdout": 0, "stderr": 0}  # all stream text so far, shown or cleared

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
        key = _stream_key(name)
        if isinstance(last, _Stream) and last.name == name:
            last.append(text)
        else:
            self._shown.append(_Stream(name, text, self._stream_lengths[key]))
        self._stream_lengths[key] += len(text)
        return Stderr(text) if name == "stderr" else Stdout(text)

    def compact_streams(self, sources: Mapping[str, str]) -> None:
        """Hold stream text as positions in `sources` ("stdout", "stderr": all text of each, as
        `TextLog` joins it) instead of the chunks. A source whose length is not the length of the
        stream text this area was given is not used (its streams keep their chunks)."""
        usable = {key: text for key, text in sources.items() if len(text) == self._stream_lengths.get(key)}
        for shown in self._shown:
            if isinstance(shown, _Stream) and shown.source is None:
                source = usable.get(_stream_key(shown.name))
                if source is not None:
                    shown.source = source
                    shown.chunks = []

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
                text = apply_carriage_returns(shown.text())
                rendered.append({"output_type": "stream", "name": shown.name, "text": text})
            else:
                rendered.append(shown.to_nbformat())
        return rendered

    def _apply_pending_clear(self) -> None:
        if self._clear_pending:
            self._clear_pending = False
            self._shown.clear()


_BATCH = 2**18
"""Characters appended at a time while `TextLog` builds `text` (bounds what is copied besides it)."""
_NOT_SPACE = re.compile(r"\S")


class TextLog:
    """An execution's text in arrival order (stream chunks and the text/plain of outputs), and the
    three strings a result gives of it.

    `strings(suffix, area)` returns `text` (all of it joined and stripped, `suffix` on a line of its
    own; `suffix` alone when there is no text), `stdout` and `stderr` (each stream's text joined, not
    stripped; a stream named neither goes to stdout). Memory: the log gives its chunks up once
    stdout and stderr are joined (the `area` given along is re-pointed at them, so it lets go of
    the chunks too) and builds `text` from positions in them, appending 256 Ki characters at a time
    in place: beside the outputs, at most two copies of the stream text are
    alive at any time (the chunks and stdout/stderr, then stdout/stderr and text). The strings are
    kept; calling again returns the same ones.
    """

    def __init__(self) -> None:
        self._entries: list[tuple[str | None, str]] = []  # (stream key, or None for an output's text; text)
        self._streams: dict[str, list[str]] = {"stdout": [], "stderr": []}
        # Once joined: the two streams, and the text as (source, start, end) pieces.
        self._sources: dict[str, str] | None = None
        self._pieces: list[tuple[str, int, int]] = []
        self._piece_keys: list[str | None] = []
        self._text: tuple[str, str] | None = None  # (suffix, text)

    def stream(self, name: str, text: str) -> None:
        """Stream text (free of escapes) of stream `name`."""
        self._reopen()
        key = _stream_key(name)
        self._entries.append((key, text))
        self._streams[key].append(text)

    def output(self, text: str) -> None:
        """An output's text/plain, with the newline `text` gives it."""
        self._reopen()
        self._entries.append((None, text))

    def strings(self, suffix: str = "", area: OutputArea | None = None) -> tuple[str, str, str]:
        """(text, stdout, stderr); `area` (the execution's output area) is compacted onto them."""
        if self._sources is None:
            sources = self._sources = {key: "".join(chunks) for key, chunks in self._streams.items()}
            if area is not None:
                area.compact_streams(sources)
            offsets = {"stdout": 0, "stderr": 0}
            pieces: list[tuple[str, int, int]] = []
            keys: list[str | None] = []
            for key, text in self._entries:
                if key is None:
                    pieces.append((text, 0, len(text)))
                    keys.append(None)
                    continue
                if keys and keys[-1] == key:  # consecutive chunks of one stream are one piece
                    source, start, _ = pieces[-1]
                    pieces[-1] = (source, start, offsets[key] + len(text))
                else:
                    pieces.append((sources[key], offsets[key], offsets[key] + len(text)))
                    keys.append(key)
                offsets[key] += len(text)
            self._pieces, self._piece_keys = pieces, keys
            self._entries = []
            self._streams = {"stdout": [], "stderr": []}
        if self._text is None or self._text[0] != suffix:
            self._text = None
            self._text = (suffix, _stripped_text(self._pieces, suffix))
        return self._text[1], self._sources["stdout"], self._sources["stderr"]

    def _reopen(self) -> None:
        """Text after `strings()`: back to chunks (only code that adds to a finished log gets here)."""
        if self._sources is None:
            return
        self._entries = [
            (key, source[start:end]) for key, (source, start, end) in zip(self._piece_keys, self._pieces, strict=True)
        ]
        self._streams = {key: [text] for key, text in self._sources.items()}
        self._sources, self._pieces, self._piece_keys, self._text = None, [], [], None


def _stripped_text(pieces: list[tuple[str, int, int]], suffix: str) -> str:
    """`"".join(source[start:end] for ...).strip()`, plus `suffix` on its own line, without a third copy."""
    first = None
    for index, (source, start, end) in enumerate(pieces):
        match = _NOT_SPACE.search(source, start, end)
        if match is not None:
            first = (index, match.start())
            break
    if first is None:
        return suffix
    last = first
    for index in range(len(pieces) - 1, first[0] - 1, -1):
        source, start, end = pieces[index]
        stop = _end_without_space(source, first[1] if index == first[0] else start, end)
        if stop is not None:
            last = (index, stop)
            break
    # The first piece becomes `text`; the others are appended a batch of at most _BATCH characters at
    # a time. CPython appends in place to a string nothing else refers to (a realloc), so `text` is
    # never copied whole; a piece is never copied whole besides it either.
    source, start, end = pieces[first[0]]
    text = source[first[1] : last[1] if last[0] == first[0] else end]
    batch: list[str] = []
    pending = 0
    for index in range(first[0] + 1, last[0] + 1):
        source, start, end = pieces[index]
        end = last[1] if index == last[0] else end
        while start < end:
            stop = min(end, start + _BATCH - pending)
            batch.append(source[start:stop])
            pending += stop - start
            start = stop
            if pending >= _BATCH:
                text += batch[0] if len(batch) == 1 else "".join(batch)
                batch.clear()
                pending = 0
    if batch:
        text += "".join(batch)
    if suffix:
        text += "\n" + suffix
    return text


def _end_without_space(source: str, start: int, end: int) -> int | None:
    """The end of `source[start:end]` with trailing whitespace removed; None when it is all whitespace.
    Looks at 4096 characters at a time from the end, so a long whitespace tail costs no copy of it."""
    while end > start:
        block_start = max(start, end - 4096)
        kept = len(source[block_start:end].rstrip())
        if kept:
            return block_start + kept
        end = block_start
    return None


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


def decode_image(output: Output, max_decoded_bytes: int | None = None) -> Image.Image | None:
    """The output's PNG (else JPEG) as a PIL image, opened but not decoded; None when it has none or
    it cannot be decoded. Never raises; a failure is logged (INFO, logger "ipybox.outputs").

    The header is read first (`ipybox._images.read_header`, without decoding anything); PIL then
    opens the file only when the header is sound, restricted to the MIME type's format, and the image
    is kept only when PIL reads the header's size and mode. So its `load()` takes at most the header's
    `decoded_bytes`, the size `bundle_charge` charged for it; with `max_decoded_bytes`, an image whose
    decode would take more is None as well. PIL's global settings are never changed:
    `PIL.Image.MAX_IMAGE_PIXELS` (the decompression-bomb limit) is honoured as it is set.

    A file whose compressed pixel data is corrupt behind a sound structure is only found out by
    decoding it: then `load()` raises PIL's `OSError`, as for any damaged file.
    """
    for mime in IMAGE_TYPES:
        if mime not in output.data:
            continue
        value = output.data[mime]
        try:
            header = read_header(value, mime)
            if max_decoded_bytes is not None and header.decoded_bytes > max_decoded_bytes:
                raise UnreadableImage(
                    f"{header.describe()} would decode to {format_bytes(header.decoded_bytes)}, more than "
                    f"the {format_bytes(max_decoded_bytes)} allowed"
                )
            return open_image(value, mime, header)
        except UnreadableImage as exc:
            logger.info("%s output not decoded: %s", mime, exc)
            return None
    return None


def image_payloads(outputs: list[Output]) -> list[tuple[str, str]]:
    """(MIME type, base64 text) of each output's image, as the kernel sent it: for passing images on
    (`ipybox mcp`) without decoding or re-encoding them.

    One image per output, PNG first, else JPEG; the base64 text as it came, line breaks removed. An
    image whose header cannot be read, or that PIL would refuse as a decompression bomb, is left out
    (the client has already replaced such outputs by marked ones, whose "[image dropped: ...]" line
    is in the result's text). Never raises.
    """
    payloads: list[tuple[str, str]] = []
    for output in outputs:
        for mime in IMAGE_TYPES:
            if mime not in output.data:
                continue
            value = output.data[mime]
            try:
                read_header(value, mime)
            except UnreadableImage as exc:
                logger.info("%s output not passed on: %s", mime, exc)
                break
            data = joined_base64(value)
            if data is not None:
                payloads.append((mime, data))
            break
    return payloads


# -- what a bundle costs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Charge:
    """What keeping a MIME bundle whole costs, from `bundle_charge`.

    Attributes:
        size: Bytes to charge against `max_output_bytes`: text/plain in UTF-8 with the newline
            `text` gives it; the image `images` gets (image/png, else image/jpeg) at the
            `decoded_bytes` of its header plus its base64 text plus its encoded bytes (all three
            are held once `images` has it); a second image type at its base64 text; every other MIME
            type at its name plus its value (text in UTF-8, JSON values at their JSON size); plus
            the metadata as JSON.
        images: (MIME type, header) of each image the bundle carries, PNG first: the first is the
            one `images` gets.
        unreadable: Why an image of the bundle cannot be decoded, as the marker line says it (e.g.
            "image/png cannot be decoded: truncated (...)"); None when every image can. A bundle
            with an unreadable image is never kept whole, whatever the room.
    """

    size: int
    images: tuple[tuple[str, ImageHeader], ...] = ()
    unreadable: str | None = None

    @property
    def has_image(self) -> bool:
        """The bundle carries image/png or image/jpeg (readable or not)."""
        return bool(self.images) or self.unreadable is not None


def bundle_charge(output: Output) -> Charge:
    """What keeping `output` whole costs; see `Charge`. Reads image headers, decodes nothing; never raises.

    The router keeps the bundle when `charge.unreadable is None` and `charge.size` fits the room
    left; otherwise a bundle with an image (`charge.has_image`) becomes `dropped_image_output(...)`.
    """
    size = 0
    images: list[tuple[str, ImageHeader]] = []
    unreadable: str | None = None
    for mime in IMAGE_TYPES:
        if mime not in output.data:
            continue
        try:
            header = read_header(output.data[mime], mime)
        except UnreadableImage as exc:
            if unreadable is None:
                unreadable = str(exc) if exc.standalone else f"{mime} cannot be decoded: {exc}"
        else:
            if not images:  # the one `images` gets: decoded, and its encoded bytes held besides its text
                size += header.encoded_bytes + header.decoded_bytes
            images.append((mime, header))
    for mime, value in output.data.items():
        if mime == "text/plain" and isinstance(value, str):
            size += _utf8_size(value) + (0 if value.endswith("\n") else 1)
        elif mime in IMAGE_TYPES and isinstance(value, str):
            size += _utf8_size(value)
        elif isinstance(value, str):
            size += len(mime) + _utf8_size(value)
        else:
            size += len(mime) + _json_size(value)
    if output.metadata:
        size += _json_size(output.metadata)
    return Charge(size, tuple(images), unreadable)


def dropped_image_output(output: Output, charge: Charge, *, cap: int | None, room: int | None) -> Output:
    """The marked output that stands for an image bundle the router does not keep.

    Same kind, display id and execution count; `truncated=True`; its only data is a text/plain line:
    "[image dropped: <why>]", with why `charge.unreadable` when set, else e.g. "3000x3000 PNG would
    decode to 34.3 MiB; with its encoded data it needs 34.4 MiB, past max_output_bytes=8388608 (7.9
    MiB left)" (`charge.size` is what it needs, `cap` the cap as the user set it, `room` the bytes
    left when the bundle came). That line is the output's `text`, so it joins
    `ExecutionResult.text` and `stream()` like any text/plain; `images` does not get it.
    """
    if charge.unreadable is not None:
        why = charge.unreadable
    elif charge.images:
        mime, header = charge.images[0]
        left = "" if room is None else f" ({format_bytes(max(room, 0))} left)"
        decoded, needed = format_bytes(header.decoded_bytes), format_bytes(charge.size)
        why = (
            f"{header.describe()} would decode to {decoded}; with its encoded data it needs {needed}, "
            f"past max_output_bytes={cap}{left}"
        )
    else:
        why = f"past max_output_bytes={cap}"
    return Output(
        data={"text/plain": f"[image dropped: {why}]"},
        metadata={},
        kind=output.kind,
        display_id=output.display_id,
        execution_count=output.execution_count,
        truncated=True,
    )


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
    try:
        return base64.b64decode(_joined(value))
    except (binascii.Error, ValueError):
        return None


def _utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


_JSON_WALK_LIMIT = 100_000
"""JSON values `_json_size` walks itself; a larger structure is sized by `json.dumps` at C speed."""


def _json_size(value: Any) -> int:
    """`len(json.dumps(value, separators=(",", ":"), default=str))` without building the JSON text: a
    long string is encoded a block at a time, so sizing a value costs no copy of it (json.dumps would
    hold two). A structure of more than `_JSON_WALK_LIMIT` values is sized by json.dumps itself."""
    size = 0
    stack = [value]
    walked = 0
    while stack:
        item = stack.pop()
        walked += 1
        if walked > _JSON_WALK_LIMIT:
            return len(json.dumps(value, separators=(",", ":"), default=str))
        if isinstance(item, str):
            size += 2 + sum(
                len(encode_basestring_ascii(item[block : block + _BATCH])) - 2 for block in range(0, len(item), _BATCH)
            )
        elif isinstance(item, dict) and all(isinstance(key, str) for key in item):
            size += 2 + max(len(item) - 1, 0) + len(item)  # braces, commas, colons
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            size += 2 + max(len(item) - 1, 0)
            stack.extend(item)
        else:
            size += len(json.dumps(item, separators=(",", ":"), default=str))
    return size
