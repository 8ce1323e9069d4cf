"""ResourceClient.get_module_sources against a real container."""

from __future__ import annotations

import pytest

from ipybox import (
    ExecutionClient,
    ExecutionContainer,
    RemoteFileNotFoundError,
    RemotePathError,
    ResourceClient,
    ResourceError,
)

PLANT = """
import os
os.makedirs('/app/pkg/sub', exist_ok=True)
open('/app/pkg/__init__.py', 'w').write('A = 1\\n')
open('/app/pkg/sub/__init__.py', 'w').write('')
open('/app/pkg/sub/mod.py', 'w').write('def f():\\n    return 2\\n')
open('/app/mymod.py', 'w').write('X = 42\\n')
# a module whose import would have a visible side effect: looking it up must not run it
open('/app/trap.py', 'w').write("open('/app/trap-ran', 'w').close()\\n")
"""


@pytest.fixture(scope="module")
async def resources(shared_container: ExecutionContainer) -> ResourceClient:
    async with ExecutionClient(port=shared_container.executor_port) as client:
        await client.execute(PLANT)
    client = ResourceClient(port=shared_container.resource_port)
    await client.connect()
    yield client  # type: ignore[misc]
    await client.disconnect()


async def test_sources_of_app_modules_packages_and_environment(resources: ResourceClient) -> None:
    sources = await resources.get_module_sources(["mymod", "pkg", "pkg.sub.mod", "json", "aiohttp.web"])
    assert sources["mymod"] == "X = 42\n"
    assert sources["pkg"] == "A = 1\n"
    assert sources["pkg.sub.mod"] == "def f():\n    return 2\n"
    assert "def dumps(" in sources["json"]
    assert "def run_app(" in sources["aiohttp.web"]


async def test_lookup_does_not_import(resources: ResourceClient, shared_container: ExecutionContainer) -> None:
    sources = await resources.get_module_sources(["trap"])
    assert "trap-ran" in sources["trap"]
    async with ExecutionClient(port=shared_container.executor_port) as client:
        result = await client.execute("import os\nprint(os.path.exists('/app/trap-ran'))")
    assert result.text == "False"


@pytest.mark.parametrize("names", [["nope"], ["json", "nope.sub"], ["math"], ["mymod.sub"]])
async def test_all_or_nothing(resources: ResourceClient, names: list[str]) -> None:
    with pytest.raises(RemoteFileNotFoundError, match=repr(names[-1])):
        await resources.get_module_sources(names)


@pytest.mark.parametrize("name", ["../etc/passwd", "os;rm", "", "a..b"])
async def test_invalid_names_are_refused(resources: ResourceClient, name: str) -> None:
    with pytest.raises(RemotePathError):
        await resources.get_module_sources([name])


async def test_a_string_instead_of_a_list_is_a_type_error(resources: ResourceClient) -> None:
    with pytest.raises(TypeError):
        await resources.get_module_sources("json")  # type: ignore[arg-type]
    assert issubclass(RemoteFileNotFoundError, ResourceError)
