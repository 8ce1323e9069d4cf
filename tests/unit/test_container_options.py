import os
from pathlib import Path

import pytest

from ipybox import ExecutionContainer
from ipybox._limits import parse_memory
from ipybox.container import _container_bind_path, _host_bind_path


@pytest.mark.parametrize("path", ["/data", "/app/data", "../data", "data/../../etc", "", "."])
def test_bad_container_bind_paths_raise_value_error(path: str) -> None:
    with pytest.raises(ValueError, match="bind path"):
        ExecutionContainer(binds={"host": path})


def test_container_bind_path_lands_under_app() -> None:
    assert _container_bind_path("data") == "/app/data"
    assert _container_bind_path("a/b") == "/app/a/b"


def test_host_bind_path_is_created_and_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    resolved = _host_bind_path("new/dir", (0, 0))
    assert resolved == str(tmp_path / "new" / "dir")
    assert (tmp_path / "new" / "dir").is_dir()


@pytest.mark.parametrize(
    ("value", "expected"),
    [("512m", 512 * 2**20), ("4g", 4 * 2**30), ("1.5GiB", int(1.5 * 2**30)), (2**30, 2**30), (None, None)],
)
def test_parse_memory(value: int | str | None, expected: int | None) -> None:
    assert parse_memory(value) == expected


@pytest.mark.parametrize("value", ["lots", "-1g", "1k", 1024])
def test_parse_memory_rejects(value: int | str) -> None:
    with pytest.raises(ValueError, match="memory_limit"):
        parse_memory(value)


def test_invalid_limits_raise() -> None:
    with pytest.raises(ValueError, match="cpu_limit"):
        ExecutionContainer(cpu_limit=0)
    with pytest.raises(ValueError, match="pids_limit"):
        ExecutionContainer(pids_limit=0)


def test_ports_unknown_before_run_raise_runtime_error() -> None:
    container = ExecutionContainer()
    with pytest.raises(RuntimeError, match="not running"):
        _ = container.executor_port
    with pytest.raises(RuntimeError, match="not running"):
        _ = container.resource_port


def test_explicit_ports_known_before_run() -> None:
    container = ExecutionContainer(executor_port=1234, resource_port=1235)
    assert (container.executor_port, container.resource_port) == (1234, 1235)


def test_constructor_does_no_io_and_config_publishes_on_loopback() -> None:
    container = ExecutionContainer(env={"A": "1"}, labels={"team": "x"}, cpu_limit=1.5)
    config = container._container_config((1000, 1000))
    bindings = config["HostConfig"]["PortBindings"]
    assert {b[0]["HostIp"] for b in bindings.values()} == {"127.0.0.1"}
    assert {b[0]["HostPort"] for b in bindings.values()} == {""}
    assert config["Env"] == ["A=1", "IPYBOX_MAX_KERNELS=16"]
    assert config["Labels"]["team"] == "x"
    assert config["Labels"]["ai.gradion.ipybox.container"] == "true"
    assert config["HostConfig"]["Memory"] == config["HostConfig"]["MemorySwap"] == 4 * 2**30
    assert config["HostConfig"]["NanoCpus"] == 1_500_000_000
    assert config["HostConfig"]["PidsLimit"] == 1024
    assert config["HostConfig"]["Init"] is True


def test_app_is_a_capped_executable_tmpfs_owned_by_the_sandbox_user() -> None:
    config = ExecutionContainer(app_size="64m")._container_config((1000, 1001))
    tmpfs = config["HostConfig"]["Tmpfs"]
    options = tmpfs["/app"].split(",")
    assert f"size={64 * 2**20}" in options
    assert {"rw", "exec", "nosuid", "nodev", "mode=0755", "uid=1000", "gid=1001"} <= set(options)
    assert "noexec" not in options  # Docker adds noexec to a tmpfs unless `exec` overrides it
    assert tmpfs["/tmp"] == f"rw,nosuid,nodev,mode=1777,size={2**30}"


def test_app_size_default_and_root_image() -> None:
    options = ExecutionContainer()._container_config((0, 0))["HostConfig"]["Tmpfs"]["/app"].split(",")
    assert f"size={2 * 2**30}" in options
    assert {"uid=0", "gid=0"} <= set(options)


def test_app_size_none_keeps_app_in_the_writable_layer() -> None:
    config = ExecutionContainer(app_size=None)._container_config((1000, 1000))
    assert "/app" not in config["HostConfig"]["Tmpfs"]


def test_every_other_writable_directory_is_a_capped_tmpfs() -> None:
    config = ExecutionContainer(tmp_size="64m")._container_config((1000, 1001), home="/home/ipybox")
    tmpfs = config["HostConfig"]["Tmpfs"]
    assert set(tmpfs) == {"/tmp", "/var/tmp", "/run/lock", "/home/ipybox", "/app"}
    for path in ("/tmp", "/var/tmp", "/run/lock"):
        assert tmpfs[path] == f"rw,nosuid,nodev,mode=1777,size={64 * 2**20}"
    home = tmpfs["/home/ipybox"].split(",")
    assert {"exec", "nosuid", "nodev", "uid=1000", "gid=1001", f"size={64 * 2**20}"} <= set(home)


@pytest.mark.parametrize("home", [None, "", "/", "/app", "relative"])
def test_a_home_that_is_not_a_directory_of_its_own_gets_no_tmpfs(home: str | None) -> None:
    tmpfs = ExecutionContainer()._container_config((1000, 1000), home=home)["HostConfig"]["Tmpfs"]
    assert set(tmpfs) == {"/tmp", "/var/tmp", "/run/lock", "/app"}


def test_binds_stay_under_app_with_the_tmpfs() -> None:
    config = ExecutionContainer(binds={"/tmp/x": "data"})._container_config((1000, 1000))
    assert config["HostConfig"]["Binds"] == ["/tmp/x:/app/data"]
    assert "/app" in config["HostConfig"]["Tmpfs"]


@pytest.mark.parametrize("value", ["lots", "1k", 1024, "-2g"])
def test_invalid_app_size_raises(value: int | str) -> None:
    with pytest.raises(ValueError, match="app_size"):
        ExecutionContainer(app_size=value)


def test_caps_beyond_the_memory_limit_warn(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each configuration warns once per process: start from none warned, whatever ran before.
    monkeypatch.setattr("ipybox.container._warned_file_caps", set())
    with caplog.at_level("WARNING", logger="ipybox.container"):
        ExecutionContainer(memory_limit="4g")  # defaults: 2g + 1g fit
        ExecutionContainer(memory_limit=None, app_size="64g")  # no memory limit: nothing to compare
        assert not caplog.records
        ExecutionContainer(memory_limit="2g", app_size="2g", tmp_size="64m")
    assert len(caplog.records) == 1
    assert "exceed memory_limit" in caplog.records[0].getMessage()
    assert "2112 MiB" in caplog.records[0].getMessage()


@pytest.mark.parametrize("network", ["host", "none", "container:abc"])
def test_networks_without_a_namespace_of_their_own_are_refused(network: str) -> None:
    # The isolation and firewall helpers join the sandbox's namespace: with "host" they would rewrite
    # the host's own rules.
    with pytest.raises(ValueError, match="namespace of its own"):
        ExecutionContainer(network=network)


def test_dns_servers_must_be_addresses() -> None:
    assert ExecutionContainer(dns=[" 192.0.2.53", "2001:db8::53"]).dns == ["192.0.2.53", "2001:db8::53"]
    with pytest.raises(ValueError, match="not an IP address"):
        ExecutionContainer(dns=["resolver.example"])


def test_a_bind_the_sandbox_user_cannot_write_is_named_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The seed's example 06 as root: `mkdir output` (root, 0755) bound into a uid-1000 sandbox.
    theirs, shared, ours = tmp_path / "output", tmp_path / "shared", tmp_path / "mine"
    for directory in (theirs, shared, ours):
        directory.mkdir()
    theirs.chmod(0o755)
    shared.chmod(0o777)
    if os.geteuid() == 0:
        os.chown(ours, 1000, 1000)
    else:
        ours = tmp_path / "made-by-ipybox"  # created for the sandbox user
    container = ExecutionContainer(binds={str(theirs): "output", str(shared): "shared", str(ours): "mine"})
    sandbox = (1000, 1000) if os.geteuid() == 0 else (os.geteuid(), os.getegid())
    with caplog.at_level("WARNING", logger="ipybox"):
        container._container_config(sandbox)
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    if os.geteuid() == 0:
        assert len(warnings) == 1, warnings
        assert str(theirs) in warnings[0] and "/app/output" in warnings[0]
        assert (
            "cannot write" in warnings[0] and "chown -R 1000:1000" in warnings[0] and "ipybox build -r" in warnings[0]
        )
    else:  # our own directories are writable by a sandbox that runs as us
        assert warnings == []
