"""build_image and the base-image choice against a fake Docker engine."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiodocker
import pytest

from ipybox._build import LOCAL_BASE_IMAGE, BuildEvent, build_image, default_base_image
from ipybox._build import base_image as base_image_module
from ipybox._build import builder as builder_module
from ipybox._build.base_image import ensure_base_image
from ipybox._build.events import Reporter, parse_step
from ipybox._build.pip_settings import PipSettings
from ipybox._errors import BuildError, DependencyFileError, DockerUnavailableError


class FakeImages:
    def __init__(self, present: set[str], build_stream: list[dict[str, Any]], pull_error: bool = True):
        self.present = present
        self.build_stream = build_stream
        self.pull_error = pull_error
        self.calls: list[str] = []
        self.build_kwargs: dict[str, Any] = {}

    async def inspect(self, name: str) -> dict[str, Any]:
        self.calls.append(f"inspect {name}")
        if name not in self.present:
            raise aiodocker.DockerError(404, f"No such image: {name}")
        return {"Id": "sha256:" + "f" * 64}

    async def pull(self, name: str, stream: bool) -> AsyncIterator[dict[str, Any]]:
        self.calls.append(f"pull {name}")
        yield {"status": "Pulling from library/debian", "id": "bookworm-slim"}
        yield {"status": "Downloading", "progressDetail": {"current": 1}, "id": "abc"}
        if self.pull_error:
            raise aiodocker.DockerStreamError("no such host")
        self.present.add(name)

    async def build(self, **kwargs: Any) -> AsyncIterator[dict[str, Any]]:
        self.calls.append("build")
        self.build_kwargs = kwargs
        for chunk in self.build_stream:
            if "error" in chunk:
                raise aiodocker.DockerStreamError(chunk["error"])
            yield chunk


class FakeDocker:
    def __init__(self, images: FakeImages) -> None:
        self.images = images

    async def version(self) -> dict[str, str]:
        return {"ApiVersion": "1.41"}


OK_STREAM: list[dict[str, Any]] = [
    {"stream": "Step 1/3 : ARG BASE_IMAGE\n"},
    {"stream": "Step 2/3 : FROM ${BASE_IMAGE}\n ---> abc\nStep 3/3 : RUN pip"},  # a line split in two
    {"stream": " install x\n"},
    {"stream": "Downloading 10%\rDownloading 100%\n"},
    {"aux": {"ID": "sha256:" + "a" * 64}},
    {"stream": "Successfully built aaaaaaaaaaaa\n"},
]


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeImages]:
    images = FakeImages({LOCAL_BASE_IMAGE}, list(OK_STREAM))

    @asynccontextmanager
    async def fake_client() -> AsyncIterator[FakeDocker]:
        yield FakeDocker(images)

    monkeypatch.setattr(builder_module, "docker_client", fake_client)
    monkeypatch.setattr(builder_module, "read_pip_settings", lambda: PipSettings())
    monkeypatch.setattr(builder_module, "read_npm_settings", lambda: ("https://registry.npmjs.org/", None))
    yield images


async def test_build_reports_steps_and_returns_the_id(fake: FakeImages) -> None:
    events: list[BuildEvent] = []
    image_id = await build_image("t", base_image=LOCAL_BASE_IMAGE, on_progress=events.append)
    assert image_id == "sha256:" + "a" * 64
    build = [e for e in events if e.stage == "build"]
    assert [e.message for e in build] == [
        "Step 1/3 : ARG BASE_IMAGE",
        "Step 2/3 : FROM ${BASE_IMAGE}",
        " ---> abc",
        "Step 3/3 : RUN pip install x",
        "Downloading 100%",
        "Successfully built aaaaaaaaaaaa",
    ]
    assert (build[3].step, build[3].total) == (3, 3)
    assert build[4].step == 3
    assert events[0] == BuildEvent("base", f"Using local base image {LOCAL_BASE_IMAGE}")
    assert events[-1].stage == "done"
    assert fake.build_kwargs["tag"] == "t"
    assert fake.build_kwargs["buildargs"]["BASE_IMAGE"] == LOCAL_BASE_IMAGE


async def test_build_without_aux_id_inspects_the_short_id(fake: FakeImages) -> None:
    fake.build_stream = [c for c in OK_STREAM if "aux" not in c]
    fake.present.add("aaaaaaaaaaaa")
    assert await build_image("t", base_image=LOCAL_BASE_IMAGE) == "sha256:" + "f" * 64


async def test_stream_that_ends_without_result_is_an_error(fake: FakeImages) -> None:
    fake.build_stream = OK_STREAM[:2]
    with pytest.raises(BuildError, match="ended without a result"):
        await build_image("t", base_image=LOCAL_BASE_IMAGE)


async def test_failing_step_names_the_step_and_shows_the_log(fake: FakeImages) -> None:
    fake.build_stream = [
        {"stream": "Step 1/2 : FROM x\n"},
        {"stream": "Step 2/2 : RUN pip install nope\n"},
        {"stream": "ERROR: No matching distribution found for nope\n"},
        {"error": "The command '/bin/sh -c pip install nope' returned a non-zero code: 1"},
    ]
    with pytest.raises(BuildError) as info:
        await build_image("t", base_image=LOCAL_BASE_IMAGE)
    first, *rest = str(info.value).splitlines()
    assert first.startswith("Building t failed at Step 2/2 : RUN pip install nope: The command")
    assert "ERROR: No matching distribution found for nope" in rest


async def test_malformed_dependencies_fail_before_docker(fake: FakeImages, tmp_path: Path) -> None:
    deps = tmp_path / "deps.txt"
    deps.write_text("six\nnot valid!\n")
    with pytest.raises(DependencyFileError):
        await build_image("t", dependencies=deps, base_image=LOCAL_BASE_IMAGE)
    assert fake.calls == []


async def test_dependencies_reach_the_context(
    fake: FakeImages, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, bytes] = {}
    real = builder_module.context_tar

    def spy(files: dict[str, bytes]) -> bytes:
        seen.update(files)
        return real(files)

    monkeypatch.setattr(builder_module, "context_tar", spy)
    deps = tmp_path / "deps.txt"
    deps.write_text('dependencies = [\n  "six",\n]\n')
    await build_image("t", dependencies=deps, base_image=LOCAL_BASE_IMAGE)
    assert seen["dependencies.txt"] == b"six\n"


# --- base image choice ---------------------------------------------------------------------------


@pytest.fixture
def created(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    tags: list[str] = []

    async def fake_create(tag: str, report: Reporter) -> None:
        tags.append(tag)

    monkeypatch.setattr(base_image_module, "create_base_image", fake_create)
    return tags


async def test_local_base_is_used(created: list[str]) -> None:
    images = FakeImages({"debian:bookworm-slim"}, [])
    assert await ensure_base_image(FakeDocker(images), "debian:bookworm-slim", Reporter(None)) == "debian:bookworm-slim"
    assert images.calls == ["inspect debian:bookworm-slim"]
    assert created == []


async def test_missing_local_base_is_created_without_pull(created: list[str]) -> None:
    images = FakeImages(set(), [])
    assert await ensure_base_image(FakeDocker(images), LOCAL_BASE_IMAGE, Reporter(None)) == LOCAL_BASE_IMAGE
    assert not any(call.startswith("pull") for call in images.calls)
    assert created == [LOCAL_BASE_IMAGE]


async def test_pulled_base_is_used(created: list[str]) -> None:
    images = FakeImages(set(), [], pull_error=False)
    events: list[BuildEvent] = []
    assert await ensure_base_image(FakeDocker(images), "debian:bookworm-slim", Reporter(events.append)) == (
        "debian:bookworm-slim"
    )
    assert created == []
    pull_messages = [e.message for e in events if e.stage == "pull"]
    assert pull_messages == ["Pulling debian:bookworm-slim", "bookworm-slim Pulling from library/debian"]


async def test_failed_pull_falls_back_to_debootstrap(created: list[str]) -> None:
    images = FakeImages(set(), [])
    events: list[BuildEvent] = []
    assert await ensure_base_image(FakeDocker(images), "debian:bookworm-slim", Reporter(events.append)) == (
        LOCAL_BASE_IMAGE
    )
    assert created == [LOCAL_BASE_IMAGE]
    assert any("failed" in e.message and LOCAL_BASE_IMAGE in e.message for e in events if e.stage == "base")


async def test_failed_pull_reuses_an_existing_local_base(created: list[str]) -> None:
    images = FakeImages({LOCAL_BASE_IMAGE}, [])
    assert await ensure_base_image(FakeDocker(images), "debian:bookworm-slim", Reporter(None)) == LOCAL_BASE_IMAGE
    assert created == []


async def test_unreachable_engine_is_not_a_pull_failure(created: list[str]) -> None:
    class Unreachable(FakeImages):
        async def pull(self, name: str, stream: bool) -> AsyncIterator[dict[str, Any]]:
            raise aiodocker.DockerError(900, "Cannot connect to Docker Engine")
            yield {}

    with pytest.raises(aiodocker.DockerError):
        await ensure_base_image(FakeDocker(Unreachable(set(), [])), "debian:bookworm-slim", Reporter(None))
    assert created == []


# --- small pieces ----------------------------------------------------------------------------------


def test_parse_step() -> None:
    assert parse_step("Step 3/14 : RUN x") == (3, 14)
    assert parse_step(" ---> Running in abc") is None


def test_default_base_image(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IPYBOX_BASE_IMAGE", raising=False)
    assert default_base_image() == "debian:bookworm-slim"
    monkeypatch.setenv("IPYBOX_BASE_IMAGE", "ubuntu:24.04")
    assert default_base_image() == "ubuntu:24.04"


async def test_missing_engine_is_docker_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    monkeypatch.setattr(builder_module, "read_pip_settings", lambda: PipSettings())
    monkeypatch.setattr(builder_module, "read_npm_settings", lambda: ("https://registry.npmjs.org/", None))
    with pytest.raises(DockerUnavailableError, match="scripts/engine start"):
        await build_image("t", base_image=LOCAL_BASE_IMAGE)
