import stat
from pathlib import Path

import pytest

from ipybox import _tokens


@pytest.fixture(autouse=True)
def runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "run"
    monkeypatch.setenv("IPYBOX_RUNTIME_DIR", str(directory))
    monkeypatch.setattr(_tokens, "_registry", {})
    return directory


def test_register_writes_user_only_file(runtime_dir: Path) -> None:
    _tokens.register("127.0.0.1", 4321, "secret", "cid")
    path = runtime_dir / "localhost-4321.token"
    assert stat.S_IMODE(runtime_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == "secret\ncid\n"


def test_loopback_names_share_a_key() -> None:
    _tokens.register("127.0.0.1", 4321, "secret")
    assert _tokens.lookup("localhost", 4321) == "secret"
    assert _tokens.lookup("::1", 4321) == "secret"
    assert _tokens.lookup("localhost", 4322) is None
    assert _tokens.lookup("example.internal", 4321) is None


def test_lookup_from_file_when_not_in_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    _tokens.register("127.0.0.1", 4321, "secret")
    monkeypatch.setattr(_tokens, "_registry", {})  # as in another process
    assert _tokens.lookup("localhost", 4321) == "secret"


def test_unregister_removes_both(runtime_dir: Path) -> None:
    _tokens.register("127.0.0.1", 4321, "secret")
    _tokens.unregister("localhost", 4321)
    _tokens.unregister("localhost", 4321)  # twice is fine
    assert _tokens.lookup("localhost", 4321) is None
    assert not list(runtime_dir.iterdir())


def test_remove_stale_keeps_live_containers(runtime_dir: Path) -> None:
    _tokens.register("127.0.0.1", 1, "a", "alive")
    _tokens.register("127.0.0.1", 2, "b", "gone")
    _tokens.remove_stale({"alive"})
    assert sorted(p.name for p in runtime_dir.iterdir()) == ["localhost-1.token"]


def test_new_tokens_are_long_and_distinct() -> None:
    tokens = {_tokens.new_token() for _ in range(100)}
    assert len(tokens) == 100
    assert all(len(token) >= 43 for token in tokens)
