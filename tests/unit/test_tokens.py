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


@pytest.fixture
def proc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in for /proc: `run(pid, container_id)` puts a process into a container's cgroup."""
    root = tmp_path / "proc"
    root.mkdir()
    monkeypatch.setattr(_tokens, "_PROC", root)
    return root


def run_in(proc: Path, pid: int, container_id: str) -> None:
    (proc / str(pid)).mkdir(exist_ok=True)
    (proc / str(pid) / "cgroup").write_text(f"0::/system.slice/docker-{container_id}.scope\n")


def test_register_writes_user_only_file(runtime_dir: Path) -> None:
    _tokens.register("127.0.0.1", 4321, "secret", "cid")
    path = runtime_dir / "localhost-4321.token"
    assert stat.S_IMODE(runtime_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == "secret\ncid\n0\n"


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
    assert sorted(p.name for p in runtime_dir.iterdir()) == ["alive.token", "localhost-1.token"]


def test_a_record_is_found_by_container_id_and_removed_with_it(runtime_dir: Path) -> None:
    cid = "c" * 64
    _tokens.register("127.0.0.1", 5001, "secret", cid)
    _tokens.register("127.0.0.1", 5002, "secret", cid)
    assert (runtime_dir / f"{cid}.token").stat().st_mode & 0o777 == 0o600
    assert _tokens.container_token(cid) == "secret"
    assert _tokens.container_token("d" * 64) is None
    assert _tokens.recorded_container("localhost", 5001) == (cid, 0)
    _tokens.unregister("127.0.0.1", 5001, cid)
    _tokens.unregister("127.0.0.1", 5002, cid)
    assert not list(runtime_dir.iterdir())
    assert _tokens.container_token(cid) is None


def test_new_tokens_are_long_and_distinct() -> None:
    tokens = {_tokens.new_token() for _ in range(100)}
    assert len(tokens) == 100
    assert all(len(token) >= 43 for token in tokens)


def test_secret_of_a_running_container_is_handed_out(proc: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_in(proc, 4242, "c" * 64)
    _tokens.register("127.0.0.1", 4321, "secret", "c" * 64, 4242)
    assert _tokens.lookup("localhost", 4321) == "secret"
    monkeypatch.setattr(_tokens, "_registry", {})  # another process: the file
    assert _tokens.lookup("localhost", 4321) == "secret"


@pytest.mark.parametrize("how", ["pid gone", "pid reused"])
def test_secret_of_a_container_that_is_gone_is_not_handed_out(
    proc: Path, monkeypatch: pytest.MonkeyPatch, runtime_dir: Path, how: str
) -> None:
    run_in(proc, 4242, "c" * 64)
    _tokens.register("127.0.0.1", 4321, "secret", "c" * 64, 4242)
    if how == "pid gone":
        (proc / "4242" / "cgroup").unlink()
    else:
        run_in(proc, 4242, "d" * 64)
    assert _tokens.lookup("localhost", 4321) is None  # in-process registry
    assert "secret" in (runtime_dir / "localhost-4321.token").read_text()
    monkeypatch.setattr(_tokens, "_registry", {})
    assert _tokens.lookup("localhost", 4321) is None  # the file


def test_stale_in_process_record_gives_way_to_the_ports_new_container(
    proc: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_in(proc, 4242, "c" * 64)
    _tokens.register("127.0.0.1", 4321, "old", "c" * 64, 4242)
    (proc / "4242" / "cgroup").unlink()
    # Another process of this user starts a container on the freed port: only the file knows it.
    ours = dict(_tokens._registry)
    run_in(proc, 5151, "d" * 64)
    _tokens.register("127.0.0.1", 4321, "new", "d" * 64, 5151)
    monkeypatch.setattr(_tokens, "_registry", ours)
    assert _tokens.lookup("localhost", 4321) == "new"


def test_unregister_leaves_the_record_of_the_ports_new_container(proc: Path) -> None:
    run_in(proc, 5151, "d" * 64)
    _tokens.register("127.0.0.1", 4321, "new", "d" * 64, 5151)
    _tokens.unregister("localhost", 4321, "c" * 64)  # the old container's kill(), late
    assert _tokens.lookup("localhost", 4321) == "new"
    _tokens.unregister("localhost", 4321, "d" * 64)
    assert _tokens.lookup("localhost", 4321) is None


def test_pid_not_checkable_here_is_not_recorded(proc: Path, runtime_dir: Path) -> None:
    # A remote engine's pid means nothing in this process: the record is kept, unchecked.
    _tokens.register("127.0.0.1", 4321, "secret", "c" * 64, 4242)
    assert (runtime_dir / "localhost-4321.token").read_text() == f"secret\n{'c' * 64}\n0\n"
    assert _tokens.lookup("localhost", 4321) == "secret"


def test_file_of_an_older_ipybox_without_pid_is_read(runtime_dir: Path) -> None:
    runtime_dir.mkdir(mode=0o700)
    (runtime_dir / "localhost-4321.token").write_text("secret\ncid\n")
    assert _tokens.lookup("localhost", 4321) == "secret"


def test_secret_is_withheld_once_the_server_process_is_gone(proc: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The container still runs (its init is in its cgroup), but the recorded server process does not:
    # a cell may be serving the ports.
    from ipybox import _process
    from ipybox._process import Process

    monkeypatch.setattr(_process, "_PROC", proc)
    run_in(proc, 4242, "c" * 64)
    (proc / "4243").mkdir()
    (proc / "4243" / "stat").write_text("4243 (python) S 4242 " + "0 " * 17 + "777 0\n")
    server = Process.of(4243)
    assert server == Process(4243, 777)
    _tokens.register("127.0.0.1", 4321, "secret", "c" * 64, 4242, server)
    assert _tokens.lookup("localhost", 4321) == "secret"
    monkeypatch.setattr(_tokens, "_registry", {})  # another process: the file names the server too
    assert _tokens.recorded_server("localhost", 4321) == ("c" * 64, 4242, server)
    assert _tokens.lookup("localhost", 4321) == "secret"

    (proc / "4243" / "stat").write_text("4243 (python) Z 4242 " + "0 " * 17 + "777 0\n")  # killed
    assert _tokens.lookup("localhost", 4321) is None
    (proc / "4243" / "stat").write_text("4243 (cell) S 4242 " + "0 " * 17 + "999 0\n")  # pid reused
    assert _tokens.lookup("localhost", 4321) is None
