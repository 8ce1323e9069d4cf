import aiodocker
import pytest

from ipybox import ContainerError, DockerUnavailableError, ExecutionContainer
from ipybox._docker import docker_errors


def test_cannot_connect_becomes_docker_unavailable() -> None:
    with pytest.raises(DockerUnavailableError, match="engine start"):
        with docker_errors("starting"):
            raise aiodocker.DockerError(900, "Cannot connect to Docker engine")


def test_api_error_becomes_container_error_with_context() -> None:
    with pytest.raises(ContainerError, match=r"container 0123456789ab: starting failed: boom \(HTTP 500\)") as info:
        with docker_errors("starting", "0123456789abcdef"):
            raise aiodocker.DockerError(500, "boom")
    assert isinstance(info.value.__cause__, aiodocker.DockerError)


async def test_run_without_an_engine_names_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-such.sock")
    container = ExecutionContainer(show_pull_progress=False)
    with pytest.raises(DockerUnavailableError, match="Docker engine"):
        await container.run()
    await container.kill()  # nothing was started; still safe
