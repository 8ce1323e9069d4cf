"""The server's secret hand-over when the host can only place the file after the start (a swarm task)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "ipybox" / "_image"))

from ipybox_server import token  # noqa: E402


@pytest.fixture
def token_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "token"
    monkeypatch.setattr(token, "TOKEN_PATH", path)
    monkeypatch.delenv(token.TOKEN_ENV, raising=False)
    return path


def test_waits_for_a_secret_placed_after_the_start_and_deletes_it(
    token_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(token.TOKEN_WAIT_ENV, "5")
    writer = threading.Timer(0.2, lambda: token_path.write_text("s3cret\n"))
    writer.start()
    try:
        assert token.take_token() == "s3cret"
    finally:
        writer.cancel()
    assert not token_path.exists()
    assert token.TOKEN_WAIT_ENV not in __import__("os").environ  # kernels do not inherit it


def test_no_secret_within_the_wait_refuses_to_serve(token_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(token.TOKEN_WAIT_ENV, "0.1")
    with pytest.raises(SystemExit, match="no secret found"):
        token.take_token()


def test_a_bad_wait_is_named(token_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(token.TOKEN_WAIT_ENV, "soon")
    with pytest.raises(SystemExit, match="IPYBOX_TOKEN_WAIT='soon' is not a number"):
        token.take_token()


def test_a_file_not_yet_handed_over_is_waited_for(token_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The engine's extraction creates the file root-owned first; the server's read then failed with
    # PermissionError and the sandbox exited. Simulated: unreadable, then empty, then the secret.
    monkeypatch.setenv(token.TOKEN_WAIT_ENV, "5")
    reads = iter([PermissionError(13, "Permission denied"), "", "s3cret\n"])
    real_read = Path.read_text

    def read_text(self: Path, *args: object, **kwargs: object) -> str:
        if self == token_path:
            value = next(reads, "s3cret\n")
            if isinstance(value, BaseException):
                raise value
            return value
        return real_read(self, *args, **kwargs)  # type: ignore[arg-type]

    token_path.write_text("placeholder")
    monkeypatch.setattr(Path, "read_text", read_text)
    assert token.take_token() == "s3cret"
    assert not token_path.exists()
