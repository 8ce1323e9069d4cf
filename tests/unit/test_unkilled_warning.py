"""An ExecutionContainer dropped while its container runs warns (ResourceWarning); nothing else does."""

from __future__ import annotations

import gc
import warnings
from types import SimpleNamespace

import pytest

from ipybox import ExecutionContainer
from ipybox.container import _State


def dropped(**options: object) -> None:
    container = ExecutionContainer(**options)  # type: ignore[arg-type]
    container._state = _State.RUNNING
    container._container = SimpleNamespace(id="c0ffee" * 10)
    del container
    gc.collect()


def test_a_running_container_dropped_without_kill_warns() -> None:
    # The README's lifecycle example used to leave three sandboxes running without a word from ipybox.
    with pytest.warns(ResourceWarning, match="c0ffeec0ffee was never killed"):
        dropped()


@pytest.mark.parametrize("options", [{"idle_timeout": 60}, {"max_lifetime": 60}, {"owner_bound": True}])
def test_a_sandbox_that_ends_itself_does_not_warn(options: dict[str, object]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dropped(**options)


def test_killed_detached_or_never_started_does_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        container = ExecutionContainer()
        container._state = _State.KILLED
        del container
        ExecutionContainer()
        gc.collect()
