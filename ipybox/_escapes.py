"""Terminal escape sequences: removed from every text result so output cannot drive a terminal."""

from __future__ import annotations

import re

MAX_ESCAPE_CARRY = 4096
"""Longest unfinished escape sequence held back at the end of a stream chunk for the next one."""

# Terminal escape sequences (ECMA-48), in 7-bit and 8-bit (C1) form. No alternative can backtrack
# over more than the run up to the next ESC, so stripping stays linear on hostile input.
_STRING_SEQUENCE = r"(?:\x1b[P\]X^_]|[\x90\x98\x9d-\x9f])[^\x07\x1b\x9c]*"  # OSC, DCS, SOS, PM, APC
_ESCAPES = re.compile(
    _STRING_SEQUENCE + r"(?:\x07|\x1b\\|\x9c)?"  # ... ended by BEL or ST; unterminated: to the end
    r"|(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"  # CSI: colours, cursor movement, ...
    r"|\x1b[ -/]*[0-~]"  # other escapes: ESC c (reset), ESC 7, ESC ( B, ...
    r"|\x1b"  # a stray ESC
)
_UNFINISHED_ESCAPE = re.compile(r"(?:" + _STRING_SEQUENCE + r"|(?:\x1b\[|\x9b)[0-?]*[ -/]*|\x1b[ -/]*)\Z")


_C1_INTRODUCERS = "\x90\x98\x9b\x9d\x9e\x9f"


def _may_escape(text: str) -> bool:
    """Whether `text` has a character that starts an escape sequence. `in` and `isascii` are C scans,
    about a hundred times faster than the regular expression looking at every position."""
    if "\x1b" in text:
        return True
    return not text.isascii() and any(introducer in text for introducer in _C1_INTRODUCERS)


def strip_escapes(text: str) -> str:
    """Remove terminal escape sequences (CSI, OSC, DCS, ...) so output cannot drive a terminal."""
    return _ESCAPES.sub("", text) if _may_escape(text) and _ESCAPES.search(text) else text


def split_unfinished_escape(text: str) -> tuple[str, str]:
    """Split off an escape sequence that the end of a stream chunk cut in two."""
    tail = text[-MAX_ESCAPE_CARRY:]
    if not _may_escape(tail):
        return text, ""
    match = _UNFINISHED_ESCAPE.search(tail)
    if match is None:
        return text, ""
    cut = len(text) - len(tail) + match.start()
    return text[:cut], text[cut:]
