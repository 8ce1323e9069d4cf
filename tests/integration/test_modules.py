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
    sources = await resources.get_module_sources(["mymod", "pkg", "pkg.sub.mod", "json", "ipykernel.kernelapp"])
    assert sources["mymod"] == "X = 42\n"
    assert sources["pkg"] == "A = 1\n"
    assert sources["pkg.sub.mod"] == "def f():\n    return 2\n"
    assert "def dumps(" in sources["json"]
    assert "class IPKernelApp(" in sources["ipykernel.kernelapp"]


async def test_the_kernels_environment_is_searched_not_the_servers(resources: ResourceClient) -> None:
    # aiohttp is ipybox's (the server's environment), not importable in a kernel: not found.
    with pytest.raises(RemoteFileNotFoundError, match="aiohttp"):
        await resources.get_module_sources(["aiohttp"])


async def test_a_package_installed_in_a_cell_is_found(
    resources: ResourceClient, shared_container: ExecutionContainer
) -> None:
    # A directory added to the user environment's site-packages after the first lookup (the path is cached).
    await resources.get_module_sources(["json"])
    async with ExecutionClient(port=shared_container.executor_port) as client:
        code = (
            "import os, sysconfig\n"
            "d = os.path.join(sysconfig.get_paths()['purelib'], 'ipybox_probe_pkg')\n"
            "os.makedirs(d, exist_ok=True)\n"
            "open(os.path.join(d, '__init__.py'), 'w').write('PROBE = 1\\n')\n"
            "open(os.path.join(os.path.dirname(d), 'ipybox_probe.pth'), 'w').write('/tmp/ipybox-probe-path\\n')\n"
            "os.makedirs('/tmp/ipybox-probe-path', exist_ok=True)\n"
            "open('/tmp/ipybox-probe-path/probe_mod.py', 'w').write('Y = 2\\n')\n"
        )
        result = await client.execute(code)
    assert result.text is None or "Error" not in result.text
    sources = await resources.get_module_sources(["ipybox_probe_pkg", "probe_mod"])
    assert sources == {"ipybox_probe_pkg": "PROBE = 1\n", "probe_mod": "Y = 2\n"}


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
