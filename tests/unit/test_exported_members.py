import ipybox


def test_all_is_sorted_and_matches_public_namespace() -> None:
    public = {name for name in dir(ipybox) if not name.startswith("_")} - {
        "cli",
        "container",
        "executor",
        "resource",
        "build_cli",
        "pool",
        "outputs",
        "mcp_server",
        "approvals",
        "tool_host",
        "snapshot",
        "backends",
    }
    exported = set(ipybox.__all__) - {"__version__"}
    assert public == exported

    # isort style, as ruff's RUF022 sorts: CONSTANTS, then Classes, then dunders.
    def kind(name: str) -> tuple[int, str]:
        return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)

    assert ipybox.__all__ == sorted(ipybox.__all__, key=kind)


def test_seed_names_and_module_paths() -> None:
    from ipybox.container import DEFAULT_TAG, ExecutionContainer
    from ipybox.executor import Execution, ExecutionClient, ExecutionResult
    from ipybox.resource.client import ResourceClient

    assert DEFAULT_TAG == ipybox.DEFAULT_TAG == "gradion-ai/ipybox"
    assert ipybox.ExecutionContainer is ExecutionContainer
    assert ipybox.ExecutionClient is ExecutionClient
    assert ipybox.Execution is Execution
    assert ipybox.ExecutionResult is ExecutionResult
    assert ipybox.ResourceClient is ResourceClient


def test_seed_constructor_defaults() -> None:
    import inspect

    params = inspect.signature(ipybox.ExecutionContainer).parameters
    assert [name for name, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD] == [
        "tag",
        "binds",
        "env",
        "executor_port",
        "resource_port",
        "port_allocation_timeout",
        "show_pull_progress",
    ]
    assert params["tag"].default == "gradion-ai/ipybox"
    assert params["binds"].default is None and params["env"].default is None
    assert params["executor_port"].default is None and params["resource_port"].default is None
    assert params["port_allocation_timeout"].default == 10
    assert params["show_pull_progress"].default is True
    client = inspect.signature(ipybox.ExecutionClient).parameters
    assert client["host"].default == "localhost" and client["heartbeat_interval"].default == 10


def test_timeout_error_is_builtin_timeout_and_library_error() -> None:
    assert issubclass(ipybox.ExecutionTimeoutError, TimeoutError)
    assert issubclass(ipybox.ExecutionTimeoutError, ipybox.IpyboxError)
    assert issubclass(ipybox.InvalidStateError, RuntimeError)
    assert issubclass(ipybox.ExecutionError, ipybox.IpyboxError)
