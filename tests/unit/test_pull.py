"""The plain-line pull progress (stderr not a terminal), without a Docker engine."""

from __future__ import annotations

from typing import Any

import pytest

from ipybox._pull import PullLines

TAG = "localhost:5000/ipybox:1"


def _feed(lines: PullLines, events: list[dict[str, Any]]) -> list[str]:
    return [line for event in events if (line := lines.feed(event)) is not None]


def _downloading(layer: str, current: int, total: int) -> dict[str, Any]:
    return {"status": "Downloading", "id": layer, "progressDetail": {"current": current, "total": total}}


def test_start_and_finish_name_the_tag() -> None:
    lines = PullLines(TAG)
    assert lines.start() == f"ipybox: pulling {TAG}"
    assert lines.finish() == f"ipybox: pulled {TAG}"


def test_one_line_per_completed_layer_with_its_size() -> None:
    events = [
        {"status": "Pulling from ipybox", "id": "1"},
        {"status": "Pulling fs layer", "id": "aaa", "progressDetail": {}},
        {"status": "Pulling fs layer", "id": "bbb", "progressDetail": {}},
        {"status": "Waiting", "id": "bbb", "progressDetail": {}},
        _downloading("aaa", 500, 2_500_000),
        _downloading("aaa", 2_500_000, 2_500_000),
        {"status": "Verifying Checksum", "id": "aaa", "progressDetail": {}},
        {"status": "Download complete", "id": "aaa", "progressDetail": {}},
        {"status": "Extracting", "id": "aaa", "progressDetail": {"current": 100, "total": 9_000_000}},
        _downloading("bbb", 10, 512),
        {"status": "Pull complete", "id": "aaa", "progressDetail": {}},
        {"status": "Download complete", "id": "bbb", "progressDetail": {}},
        {"status": "Pull complete", "id": "bbb", "progressDetail": {}},
        {"status": "Digest: sha256:0123"},
        {"status": f"Status: Downloaded newer image for {TAG}"},
    ]
    assert _feed(PullLines(TAG), events) == [
        f"ipybox: pull {TAG}: aaa done (2.5 MB)",
        f"ipybox: pull {TAG}: bbb done (512 B)",
    ]


def test_layers_already_present_are_reported_as_such() -> None:
    events = [
        {"status": "Already exists", "id": "aaa", "progressDetail": {}},
        {"status": "Pulling fs layer", "id": "bbb", "progressDetail": {}},
        {"status": "Pull complete", "id": "bbb", "progressDetail": {}},
    ]
    assert _feed(PullLines(TAG), events) == [
        f"ipybox: pull {TAG}: aaa done (already exists)",
        f"ipybox: pull {TAG}: bbb done",
    ]


def test_a_layer_is_reported_once() -> None:
    events = [{"status": "Pull complete", "id": "aaa"}, {"status": "Pull complete", "id": "aaa"}]
    assert _feed(PullLines(TAG), events) == [f"ipybox: pull {TAG}: aaa done"]


def test_events_without_a_layer_give_no_line() -> None:
    lines = PullLines(TAG)
    assert lines.feed({"status": "Pull complete"}) is None
    assert lines.feed({"status": "Pull complete", "id": ""}) is None
    assert lines.feed({"status": "Downloading", "id": "aaa", "progressDetail": None}) is None
    assert lines.feed({}) is None


@pytest.mark.parametrize(
    ("total", "shown"),
    [(999, "999 B"), (1000, "1.0 kB"), (1_234_567, "1.2 MB"), (3_400_000_000, "3.4 GB")],
)
def test_sizes_are_human_readable(total: int, shown: str) -> None:
    lines = PullLines(TAG)
    lines.feed(_downloading("aaa", 0, total))
    assert lines.feed({"status": "Pull complete", "id": "aaa"}) == f"ipybox: pull {TAG}: aaa done ({shown})"
