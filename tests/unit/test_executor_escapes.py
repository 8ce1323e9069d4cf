"""Terminal escape sequences never reach result text: the stripping functions on their own."""

from __future__ import annotations

import time

import pytest

from ipybox._escapes import split_unfinished_escape as _split_unfinished_escape
from ipybox._escapes import strip_escapes as _strip_escapes


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("plain text\n", "plain text\n"),
        ("\x1b[31mred\x1b[0m", "red"),
        ("\x1b[1;38;5;208mbold\x1b[m", "bold"),
        ("\x1b[?25l\x1b[2J\x1b[H\x1b[10;20Hcursor", "cursor"),
        ("\x1b]0;title\x07after", "after"),
        ("\x1b]2;title\x1b\\after", "after"),
        ("\x1b]8;;https://example.com\x1b\\link\x1b]8;;\x1b\\", "link"),
        ("\x1b]52;c;ZXZpbA==\x07clipboard", "clipboard"),  # OSC 52 would write the clipboard
        ("\x1bPq#0;2;0;0;0\x1b\\sixel", "sixel"),  # DCS
        ("\x1b_apc\x1b\\\x1b^pm\x1b\\\x1bXsos\x1b\\x", "x"),
        ("\x1bc\x1b7\x1b8\x1b(B\x1b=reset", "reset"),
        ("\x9b31mc1\x9d0;t\x9cx", "c1x"),  # 8-bit CSI and OSC
        ("tail\x1b]0;never terminated", "tail"),
        ("stray\x1b", "stray"),
        ("keeps\r\nand\ttabs\b", "keeps\r\nand\ttabs\b"),
        ("ünïcödé \x1b[1m✓\x1b[0m", "ünïcödé ✓"),
    ],
)
def test_strip_escapes(raw: str, clean: str) -> None:
    assert _strip_escapes(raw) == clean


def test_nothing_to_strip_returns_the_same_object() -> None:
    text = "x" * 1000
    assert _strip_escapes(text) is text


@pytest.mark.parametrize(
    "hostile", ["\x1b]" * 200_000, "\x1b[" + "1;" * 400_000, "\x1b[1" * 200_000, ("\x1b]" + "x" * 10) * 50_000]
)
def test_stripping_is_linear_on_hostile_input(hostile: str) -> None:
    start = time.monotonic()
    assert "\x1b" not in _strip_escapes(hostile)
    assert time.monotonic() - start < 2


@pytest.mark.parametrize(
    ("chunk", "kept", "held"),
    [
        ("done\n", "done\n", ""),
        ("a\x1b", "a", "\x1b"),
        ("a\x1b[3", "a", "\x1b[3"),
        ("a\x1b[1;3", "a", "\x1b[1;3"),
        ("a\x1b]0;ti", "a", "\x1b]0;ti"),
        ("a\x1b]8;;http://x", "a", "\x1b]8;;http://x"),
        ("a\x1b(", "a", "\x1b("),
        ("a\x9b1", "a", "\x9b1"),
        ("a\x1b[31mb", "a\x1b[31mb", ""),  # complete: stripped later, nothing held
        ("a\x1b]0;t\x07b", "a\x1b]0;t\x07b", ""),
    ],
)
def test_split_unfinished_escape(chunk: str, kept: str, held: str) -> None:
    assert _split_unfinished_escape(chunk) == (kept, held)


def test_split_holds_back_a_bounded_tail() -> None:
    chunk = "\x1b]0;" + "x" * 100_000
    kept, held = _split_unfinished_escape(chunk)
    assert len(held) <= 4096 and kept + held == chunk
