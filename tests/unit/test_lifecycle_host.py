"""Host side of sandboxes that end themselves: what `ExecutionContainer` asks the engine for, and a
kill() that races the engine's AutoRemove."""

from __future__ import annotations

import os
from typing import Any

import aiodocker
import pytest

from ipybox import ContainerError, ExecutionContainer
from ipybox._cleanup import process_start, stale_reason
from ipybox._labels import EXPIRES_LABEL, IDLE_TIMEOUT_LABEL, MAX_LIFETIME_LABEL, OWNER_LABEL, WORKSPACE_LABEL
from ipybox.container import _remove

LIFECYCLE_ENV = ("IPYBOX_IDLE_TIMEOUT=", "IPYBOX_MAX_LIFETIME=", "IPYBOX_OWNER_GRACE=")


def lifecycle_env(config: dict[str, Any]) -> list[str]:
    return [entry for entry in config["Env"] if entry.startswith(LIFECYCLE_ENV)]


def test_default_config_has_no_lifecycle() -> None:
    config = ExecutionContainer()._container_config((1000, 1000))
    assert "AutoRemove" not in config["HostConfig"]
    assert lifecycle_env(config) == []
    assert not {IDLE_TIMEOUT_LABEL, MAX_LIFETIME_LABEL, EXPIRES_LABEL, OWNER_LABEL} & set(config["Labels"])


def test_options_reach_the_server_and_the_labels() -> None:
    container = ExecutionContainer(idle_timeout=30, max_lifetime=3600.5, owner_bound=True, owner_grace=4)
    config = container._container_config((1000, 1000))
    assert config["HostConfig"]["AutoRemove"] is True
    assert sorted(lifecycle_env(config)) == [
        "IPYBOX_IDLE_TIMEOUT=30",
        "IPYBOX_MAX_LIFETIME=3600.5",
        "IPYBOX_OWNER_GRACE=4",
    ]
    labels = config["Labels"]
    assert labels[IDLE_TIMEOUT_LABEL] == "30"
    assert labels[MAX_LIFETIME_LABEL] == "3600.5"
    assert float(labels[EXPIRES_LABEL]) > 0
    assert labels[OWNER_LABEL].split(":")[1] == str(os.getpid())
    assert labels[OWNER_LABEL].split(":")[2] == process_start(os.getpid()) != ""


@pytest.mark.parametrize("option", ["idle_timeout", "max_lifetime"])
def test_one_option_alone_turns_on_auto_remove(option: str) -> None:
    config = ExecutionContainer(**{option: 5})._container_config((0, 0))
    assert config["HostConfig"]["AutoRemove"] is True
    assert OWNER_LABEL not in config["Labels"]


@pytest.mark.parametrize(
    "options", [{"idle_timeout": 0}, {"max_lifetime": -1}, {"owner_grace": 0}, {"idle_timeout": float("nan")}]
)
def test_invalid_lifecycle_options_raise(options: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="seconds"):
        ExecutionContainer(**options)  # type: ignore[arg-type]


class _Gone:
    id = "c0ffee"

    def __init__(self, status: int, message: str) -> None:
        self.error = aiodocker.DockerError(status, {"message": message})

    async def delete(self, **_: Any) -> None:
        raise self.error


async def test_removal_already_in_progress_counts_as_gone() -> None:
    await _remove(_Gone(409, "removal of container c0ffee is already in progress"), None)
    await _remove(_Gone(404, "No such container: c0ffee"), None)


async def test_other_conflicts_still_raise() -> None:
    with pytest.raises(ContainerError, match="removing failed"):
        await _remove(_Gone(409, "You cannot remove a running container"), None)


def test_workspace_mounts_a_named_volume_instead_of_the_app_tmpfs() -> None:
    container = ExecutionContainer(workspace="ws-1", binds={"/tmp": "data"})
    config = container._container_config((1000, 1000))
    assert config["HostConfig"]["Mounts"] == [{"Type": "volume", "Source": "ws-1", "Target": "/app"}]
    assert "/app" not in config["HostConfig"]["Tmpfs"]
    assert config["HostConfig"]["Binds"][0].endswith(":/app/data")  # binds still land on top
    assert config["Labels"][WORKSPACE_LABEL] == "ws-1"
    assert "Mounts" not in ExecutionContainer()._container_config((1000, 1000))["HostConfig"]


@pytest.mark.parametrize("app_size", ["1g", None])
def test_workspace_with_app_size_raises(app_size: str | None) -> None:
    with pytest.raises(ValueError, match="app_size cannot be used with workspace"):
        ExecutionContainer(workspace="ws", app_size=app_size)


@pytest.mark.parametrize("name", ["", "-x", "a/b", "x", "a b", "../app"])
def test_workspace_names_follow_docker(name: str) -> None:
    with pytest.raises(ValueError, match="not a Docker volume name"):
        ExecutionContainer(workspace=name)


def test_stale_reasons() -> None:
    boot = "b00t"
    dead = 2**22 + 12345  # above the default pid_max: no such process
    assert stale_reason({}, 100.0, boot) is None
    assert stale_reason({EXPIRES_LABEL: "99"}, 100.0, boot) == "expired"
    assert stale_reason({EXPIRES_LABEL: "101"}, 100.0, boot) is None
    assert stale_reason({EXPIRES_LABEL: "soon"}, 100.0, boot) is None
    assert stale_reason({OWNER_LABEL: f"{boot}:{dead}"}, 100.0, boot) == "owner gone"
    assert stale_reason({OWNER_LABEL: f"{boot}:{os.getpid()}"}, 100.0, boot) is None
    me = f"{boot}:{os.getpid()}:{process_start(os.getpid())}"
    assert stale_reason({OWNER_LABEL: me}, 100.0, boot) is None
    # The pid is alive but started at another time: a reused pid, not the owner (before: kept for ever).
    assert stale_reason({OWNER_LABEL: f"{boot}:{os.getpid()}:1"}, 100.0, boot) == (
        "owner gone (its pid now belongs to another process)"
    )
    # An owner from another boot, or another machine, is not judged.
    assert stale_reason({OWNER_LABEL: f"other:{dead}"}, 100.0, boot) is None
    assert stale_reason({OWNER_LABEL: f"{boot}:x"}, 100.0, boot) is None
