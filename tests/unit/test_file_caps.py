"""tmpfs caps (app_size, tmp_size) against memory_limit: derived defaults, one warning per configuration."""

from __future__ import annotations

import logging

import pytest

from ipybox import ContainerStartError, ExecutionContainer, SandboxPool
from ipybox import container as container_module
from ipybox.pool import start_sandbox

MiB = 2**20
GiB = 2**30


@pytest.fixture(autouse=True)
def fresh_process(monkeypatch: pytest.MonkeyPatch) -> None:
    # Warnings are once per configuration and process; each test is a fresh process in that respect.
    monkeypatch.setattr(container_module, "_warned_file_caps", set(), raising=False)


def cap_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "exceed memory_limit" in r.getMessage()]


def sizes(container: ExecutionContainer) -> tuple[int, int | None]:
    tmpfs = container._container_config((1000, 1000))["HostConfig"]["Tmpfs"]

    def size(path: str) -> int | None:
        if path not in tmpfs:
            return None
        return int(next(o for o in tmpfs[path].split(",") if o.startswith("size="))[len("size=") :])

    tmp = size("/tmp")
    assert tmp is not None
    return tmp, size("/app")


@pytest.mark.parametrize(
    ("memory_limit", "tmp", "app"),
    [
        ("512m", 128 * MiB, 256 * MiB),
        ("1g", 256 * MiB, 512 * MiB),
        ("2g", 512 * MiB, GiB),
        ("4g", GiB, 2 * GiB),  # the default limit: the caps are the documented defaults
        ("16g", GiB, 2 * GiB),  # the defaults are the ceiling: a large limit does not grow them
        (None, GiB, 2 * GiB),
    ],
)
def test_default_caps_follow_the_memory_limit_and_never_warn(
    caplog: pytest.LogCaptureFixture, memory_limit: str | None, tmp: int, app: int
) -> None:
    with caplog.at_level(logging.WARNING, logger="ipybox.container"):
        container = ExecutionContainer(memory_limit=memory_limit)
    assert sizes(container) == (tmp, app)
    assert cap_warnings(caplog) == []


def test_explicit_caps_are_kept_and_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="ipybox.container"):
        container = ExecutionContainer(memory_limit="512m", tmp_size="1g")
    # tmp_size is the user's and stays; app_size is still derived from the limit.
    assert sizes(container) == (GiB, 256 * MiB)
    [message] = cap_warnings(caplog)
    assert "1280 MiB" in message and "512 MiB" in message


def test_explicit_none_app_size_is_kept(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="ipybox.container"):
        container = ExecutionContainer(memory_limit="512m", app_size=None)
    assert sizes(container) == (128 * MiB, None)
    assert cap_warnings(caplog) == []


async def test_pool_serving_many_sandboxes_warns_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def no_engine(self: ExecutionContainer) -> None:
        raise ContainerStartError("no engine in a unit test")

    monkeypatch.setattr(ExecutionContainer, "run", no_engine)
    with caplog.at_level(logging.WARNING, logger="ipybox.container"):
        # tmp_size explicit and too large for the limit: worth one warning, not one per container.
        pool = SandboxPool(6, memory_limit="512m", tmp_size="512m")
        for _ in range(46):
            with pytest.raises(ContainerStartError):
                await start_sandbox(pool.container_options)
    assert len(cap_warnings(caplog)) == 1


async def test_pool_with_a_memory_limit_alone_warns_about_nothing(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def no_engine(self: ExecutionContainer) -> None:
        raise ContainerStartError("no engine in a unit test")

    monkeypatch.setattr(ExecutionContainer, "run", no_engine)
    with caplog.at_level(logging.WARNING, logger="ipybox.container"):
        pool = SandboxPool(6, memory_limit="512m")
        for _ in range(10):
            with pytest.raises(ContainerStartError):
                await start_sandbox(pool.container_options)
    assert cap_warnings(caplog) == []


def test_each_distinct_configuration_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="ipybox.container"):
        for _ in range(3):
            ExecutionContainer(memory_limit="1g", tmp_size="1g")
            ExecutionContainer(memory_limit="1g", app_size="1g")
            ExecutionContainer(memory_limit="1g", tmp_size="1g", tag="other-image")  # same caps: same warning
    assert len(cap_warnings(caplog)) == 2
