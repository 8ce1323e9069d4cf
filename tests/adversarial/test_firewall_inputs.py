"""The firewall's inputs come from the host, never from files the sandbox can write.

In a root image the sandbox owns Docker's bind-mounted `/etc/resolv.conf` and `/etc/hosts`. Here they
are rewritten as root through the Docker API (what a cell of a root image can do), then the host calls
`init_firewall`: a nameserver the sandbox added must not open port 53 to its address (a tunnel to any
address), and a name the sandbox mapped in /etc/hosts must resolve through DNS as the host configured
it. Uses the firewall tests' network lab (`tests/integration/test_firewall.py`): nothing leaves the
machine.
"""

from __future__ import annotations

import dataclasses

from ipybox import ExecutionClient
from tests.integration.conftest import ContainerFactory
from tests.integration.test_firewall import KERNEL_HELPERS, Scenario, scenario  # noqa: F401  (fixture)


async def test_a_nameserver_written_by_the_sandbox_opens_nothing(
    scenario: Scenario,  # noqa: F811  (the fixture imported above)
    make_container: ContainerFactory,
) -> None:
    sandbox = await make_container(network=scenario.network)
    assert sandbox.container_id is not None
    tunnel = scenario.ip("blocked")  # listens on UDP 53 (an echo), outside the host's /24
    code, output = await scenario.lab.exec_root(
        sandbox.container_id,
        ["sh", "-c", 'printf "nameserver %s\\nnameserver 127.0.0.11\\n" "$1" > /etc/resolv.conf', "sh", tunnel],
    )
    assert code == 0, output
    async with ExecutionClient(port=sandbox.executor_port) as kernel:
        await kernel.execute(KERNEL_HELPERS)
        other = dataclasses.replace(scenario, sandbox=sandbox, kernel=kernel)
        assert (await other.probe("udp53"))["udp53"] == "ok udp-ping", "the tunnel must work before the firewall"

        await sandbox.init_firewall([])

        results = await other.probe("udp53", "blocked", "local")
        other.assert_blocked_fast(results, "udp53", "blocked")
        other.assert_reachable(results, "local")


async def test_a_name_the_sandbox_mapped_in_etc_hosts_resolves_through_dns(
    scenario: Scenario,  # noqa: F811  (the fixture imported above)
    make_container: ContainerFactory,
) -> None:
    sandbox = await make_container(network=scenario.network)
    assert sandbox.container_id is not None
    code, output = await scenario.lab.exec_root(
        sandbox.container_id,
        ["sh", "-c", 'printf "%s name-allowed\\n" "$1" >> /etc/hosts', "sh", scenario.ip("blocked")],
    )
    assert code == 0, output
    async with ExecutionClient(port=sandbox.executor_port) as kernel:
        await kernel.execute(KERNEL_HELPERS)
        other = dataclasses.replace(scenario, sandbox=sandbox, kernel=kernel)
        assert await other.resolve("name-allowed") == scenario.ip("blocked"), "the sandbox's mapping must be in place"

        await sandbox.init_firewall(["name-allowed"])

        results = await other.probe("blocked", "name-allowed")
        other.assert_blocked_fast(results, "blocked")
        other.assert_reachable(results, "name-allowed")
