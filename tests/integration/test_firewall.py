"""The egress firewall (`ExecutionContainer.init_firewall`) against real, local networks and servers.

One scenario serves the module (see `scenario`): a user-defined network X.Y.0.0/16 with gateway
X.Y.0.1, server containers on it, and an internal IPv6 network; the sandbox starts on the first and is
connected to the second. Every probe runs in the sandbox's kernel and goes only to these containers,
except 169.254.169.254, which the firewall must reject before it leaves the sandbox (and a host rule
would drop if it did not, see `netlab.egress_guard`).

    role           address         how the first allow-list admits it
    ip-allowed     X.Y.1.10        by IPv4 address
    cidr-allowed   X.Y.2.10        by X.Y.2.0/24
    name-allowed   X.Y.3.10        by its network alias, resolved by Docker's embedded DNS
    blocked        X.Y.4.10        not at all (also a UDP echo on 53: "some other resolver")
    resolver       X.Y.5.10        a DNS server on 53 (knows EXTERNAL_NAME); a sandbox configured to use
                                   it may reach it on port 53 only
    local          X.Y.0.50        the gateway's /24, reachable without being listed (it cannot connect
                                   into the sandbox: only the host and the servers' ports can)
    v6             ULA::10         not at all (IPv6, on the second network)

Each test sets the allow-list it needs first, so the tests do not depend on their order; the baseline
(everything reachable without a firewall) is taken once, before the first `init_firewall`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiodocker
import pytest

import ipybox
from ipybox import ExecutionClient, ExecutionContainer, ResourceClient
from tests.integration.conftest import ContainerFactory, session_labels
from tests.integration.netlab import SERVER_PORT, NetLab, egress_guard, random_ula_64

FAST = 2.0  # seconds within which a blocked connection must fail (the probes give up after 3)
METADATA = "169.254.169.254"
SERVER_ROLES = {  # role -> the last two octets of its address in X.Y.0.0/16
    "local": "0.50",
    "ip-allowed": "1.10",
    "cidr-allowed": "2.10",
    "name-allowed": "3.10",
    "blocked": "4.10",
    "resolver": "5.10",
}
EXTERNAL_NAME = "ext-allowed.fw.test"  # known only to the lab's resolver, as the address of ip-allowed
MALFORMED = ["999.1.1.1", "10.0.0.0/33", "", "-x", "bad domain!"]

# Defined once in the module's kernel. Probes run in parallel threads, so a broken firewall costs one
# 3 s timeout per cell, not one per target.
KERNEL_HELPERS = r"""
import concurrent.futures as _fw_cf, errno as _fw_errno, json as _fw_json, socket as _fw_socket
import threading as _fw_threading, time as _fw_time


def _fw_failure(exc, start):
    if isinstance(exc, TimeoutError):
        name = "ETIMEDOUT"
    else:
        name = _fw_errno.errorcode.get(exc.errno, type(exc).__name__) if exc.errno else type(exc).__name__
    return "blocked %s %.2f" % (name, _fw_time.monotonic() - start)


def _fw_probe(host, port, v6=False, udp=False, timeout=3.0):
    family = _fw_socket.AF_INET6 if v6 else _fw_socket.AF_INET
    kind = _fw_socket.SOCK_DGRAM if udp else _fw_socket.SOCK_STREAM
    start = _fw_time.monotonic()
    try:
        with _fw_socket.socket(family, kind) as sock:
            sock.settimeout(timeout)
            sock.connect((host, port))
            if udp:
                sock.send(b"udp-ping\n")
            data = sock.recv(1024)
    except OSError as exc:
        return _fw_failure(exc, start)
    if not data:
        return "blocked EOF %.2f" % (_fw_time.monotonic() - start)
    return "ok " + data.decode(errors="replace").strip()


def _fw_probes(targets):
    with _fw_cf.ThreadPoolExecutor(len(targets)) as pool:
        futures = {label: pool.submit(_fw_probe, *args) for label, args in targets.items()}
    print("FW-PROBES " + _fw_json.dumps({label: future.result() for label, future in futures.items()}))


def _fw_resolve(name):
    try:
        found = sorted({info[4][0] for info in _fw_socket.getaddrinfo(name, 8080, _fw_socket.AF_INET)})
        print("FW-DNS " + " ".join(found))
    except OSError as exc:
        print("FW-DNS error %r" % (exc,))


def _fw_default_gateway():
    with open("/proc/net/route") as table:
        for line in list(table)[1:]:
            fields = line.split()
            if fields[1] == "00000000":
                print("FW-GW " + _fw_socket.inet_ntoa(int(fields[2], 16).to_bytes(4, "little")))
                return
    print("FW-GW none")


def _fw_connect_back(via, my_ip):
    # A listener in the sandbox; `via` (a lab server) is asked to connect to it and report what it read.
    server = _fw_socket.socket()
    server.bind(("0.0.0.0", 0))
    server.listen(1)
    server.settimeout(5)

    def accept():
        try:
            conn, _ = server.accept()
            with conn:
                conn.sendall(b"hello-sandbox\n")
        except OSError:
            pass
        finally:
            server.close()

    thread = _fw_threading.Thread(target=accept)
    thread.start()
    try:
        with _fw_socket.create_connection((via, 8080), timeout=3) as conn:
            lines = conn.makefile("rb")
            lines.readline()
            conn.sendall(("CONNECT %s %d\n" % (my_ip, server.getsockname()[1])).encode())
            reply = lines.readline().decode().strip()
    except OSError as exc:
        reply = "error %r" % (exc,)
    thread.join(6)
    print("FW-BACK " + reply)


def _fw_keep_open(host):
    global _fw_kept
    _fw_kept = _fw_socket.create_connection((host, 8080), timeout=3)
    print("FW-KEEP ok " + _fw_kept.recv(1024).decode().strip())


def _fw_keep_roundtrip(line):
    start = _fw_time.monotonic()
    try:
        _fw_kept.settimeout(3)
        _fw_kept.sendall(line.encode() + b"\n")
        data = _fw_kept.recv(1024)
        result = "ok " + data.decode().strip() if data else "blocked EOF %.2f" % (_fw_time.monotonic() - start)
    except OSError as exc:
        result = _fw_failure(exc, start)
    print("FW-KEEP " + result)
"""


@dataclass(frozen=True)
class Target:
    host: str
    port: int = SERVER_PORT
    v6: bool = False
    udp: bool = False
    expect: str = ""  # the reply when reachable


@dataclass
class Scenario:
    lab: NetLab
    network: str  # the main network's name
    sandbox: ExecutionContainer
    kernel: ExecutionClient
    net16: ipaddress.IPv4Network
    sandbox_ip: str
    v6_server: str
    targets: dict[str, Target]
    baseline: dict[str, str]
    baseline_dns: str
    baseline_gateway: str

    def ip(self, role: str) -> str:
        return str(self.net16.network_address + int(ipaddress.IPv4Address("0.0." + SERVER_ROLES[role])))

    @property
    def gateway(self) -> str:
        return str(self.net16.network_address + 1)

    @property
    def first_list(self) -> list[str]:
        cidr = ipaddress.IPv4Network(f"{self.ip('cidr-allowed')}/24", strict=False)
        return [self.ip("ip-allowed"), str(cidr), "name-allowed"]

    async def run(self, code: str, marker: str) -> str:
        """Runs `code` in the module's kernel; returns the rest of the output line starting with `marker`."""
        text = (await self.kernel.execute(code, timeout=60)).text or ""
        for line in text.splitlines():
            if line.startswith(marker + " "):
                return line[len(marker) + 1 :]
        raise AssertionError(f"no {marker} line in the kernel's output:\n{text}")

    async def probe(self, *labels: str) -> dict[str, str]:
        chosen = {label: self.targets[label] for label in labels or self.targets}
        args = {label: (t.host, t.port, t.v6, t.udp) for label, t in chosen.items()}
        return dict(json.loads(await self.run(f"_fw_probes({args!r})", "FW-PROBES")))

    async def resolve(self, name: str) -> str:
        return await self.run(f"_fw_resolve({name!r})", "FW-DNS")

    def require_baseline(self, *labels: str) -> None:
        """A "blocked" result only means something if the target answered before the firewall."""
        for label in labels:
            if label in self.baseline and self.baseline[label] != "ok " + self.targets[label].expect:
                pytest.fail(f"{label} was not reachable before any firewall ({self.baseline[label]}); see the baseline")

    def assert_reachable(self, results: dict[str, str], *labels: str) -> None:
        for label in labels:
            assert results[label] == "ok " + self.targets[label].expect, f"{label} should be reachable: {results}"

    def assert_blocked_fast(self, results: dict[str, str], *labels: str) -> None:
        self.require_baseline(*labels)
        for label in labels:
            verdict, reason, seconds = (results[label].split() + ["", "", ""])[:3]
            assert verdict == "blocked", f"{label} should be blocked: {results}"
            assert reason != "ETIMEDOUT" and float(seconds) < FAST, (
                f"{label} must be rejected within {FAST} s, not time out: {results}"
            )


@pytest.fixture(scope="module")
async def scenario(image: str) -> AsyncIterator[Scenario]:
    prefix = f"ipybox-fw-{uuid.uuid4().hex[:8]}"
    async with contextlib.AsyncExitStack() as stack:
        lab = NetLab(image, prefix)
        stack.push_async_callback(lab.aclose)
        net16, other16 = await lab.free_ipv4_16s(2)
        v6_v4_subnet = ipaddress.IPv4Network((other16.network_address, 24))
        v6_subnet = random_ula_64()
        # Before any container exists: nothing the lab's networks forward may leave this machine.
        stack.enter_context(egress_guard([str(net16), str(v6_v4_subnet)]))

        gateway = str(net16.network_address + 1)
        main = await lab.create_network("main", [str(net16)], gateways={str(net16): gateway})
        # Internal: Docker prefers a network with IPv4 and IPv6 gateways as the default route, which
        # would move the sandbox's default gateway (and its /24) off the main network.
        v6net = await lab.create_network("v6", [str(v6_v4_subnet), str(v6_subnet)], ipv6=True, internal=True)

        targets: dict[str, Target] = {}
        for role, suffix in SERVER_ROLES.items():
            address = str(net16.network_address + int(ipaddress.IPv4Address("0.0." + suffix)))
            records = {EXTERNAL_NAME: targets["ip-allowed"].host} if role == "resolver" else None
            await lab.start_server(role, main, address, dns=records)
            targets[role] = Target(address, expect=f"hello-{role}")
        v6_server = str(v6_subnet.network_address + 0x10)
        await lab.start_server("v6", v6net, str(v6_v4_subnet.network_address + 10), v6_server)
        targets["v6"] = Target(v6_server, v6=True, expect="hello-v6")
        targets["udp53"] = Target(targets["blocked"].host, 53, udp=True, expect="udp-ping")
        targets["metadata"] = Target(METADATA, 80)  # never probed before the firewall is on

        sandbox = ExecutionContainer(tag=image, network=main.name, labels=session_labels())
        stack.push_async_callback(sandbox.kill)
        await sandbox.run()
        assert sandbox.container_id is not None
        await lab.connect(v6net, sandbox.container_id)
        info = await lab.container_info(sandbox.container_id)
        sandbox_ip = info["NetworkSettings"]["Networks"][main.name]["IPAddress"]

        kernel = ExecutionClient(port=sandbox.executor_port)
        await kernel.connect()
        stack.push_async_callback(kernel.disconnect)
        await kernel.execute(KERNEL_HELPERS)

        state = Scenario(lab, main.name, sandbox, kernel, net16, sandbox_ip, v6_server, targets, {}, "", "")
        state.baseline = await state.probe(*[label for label in targets if label != "metadata"])
        state.baseline_dns = await state.resolve("name-allowed")
        state.baseline_gateway = await state.run("_fw_default_gateway()", "FW-GW")
        yield state


async def test_baseline_every_server_answers_without_a_firewall(scenario: Scenario) -> None:
    assert scenario.baseline_gateway == scenario.gateway, "the sandbox's default route must use the main network"
    for label, result in scenario.baseline.items():
        assert result == "ok " + scenario.targets[label].expect, f"{label} unreachable before the firewall: {result}"
    assert scenario.baseline_dns == scenario.ip("name-allowed")


async def test_only_the_allow_list_and_the_essentials_are_reachable(scenario: Scenario) -> None:
    await scenario.sandbox.init_firewall(scenario.first_list)

    results = await scenario.probe()
    scenario.assert_reachable(results, "ip-allowed", "cidr-allowed", "name-allowed", "local")
    scenario.assert_blocked_fast(results, "blocked", "udp53", "v6", "metadata")
    # DNS through the configured resolver still works, for listed and unlisted names alike.
    assert await scenario.resolve("name-allowed") == scenario.ip("name-allowed")
    assert await scenario.resolve("blocked") == scenario.ip("blocked")
    # The gateway's /24 is reachable, but a container there cannot open a connection to a listener in
    # the sandbox (sandboxes share that /24); it is refused at once.
    back = await scenario.run(f"_fw_connect_back({scenario.ip('local')!r}, {scenario.sandbox_ip!r})", "FW-BACK")
    assert back.startswith("fail ConnectionRefusedError"), back


async def test_host_keeps_using_the_executor_and_resource_ports(scenario: Scenario, tmp_path: Path) -> None:
    await scenario.sandbox.init_firewall(scenario.first_list)

    assert (await scenario.kernel.execute("print(6 * 7)")).text == "42"
    async with ExecutionClient(port=scenario.sandbox.executor_port) as fresh:  # a new kernel, too
        assert (await fresh.execute("print('fresh kernel')")).text == "fresh kernel"
    source = tmp_path / "up.txt"
    source.write_text("through the firewall")
    async with ResourceClient(port=scenario.sandbox.resource_port) as resources:
        await resources.upload_file("fw/up.txt", source)
        assert (await scenario.kernel.execute("print(open('/app/fw/up.txt').read())")).text == "through the firewall"
        await scenario.kernel.execute("open('/app/fw/down.txt', 'w').write('made in the sandbox')")
        await resources.download_file("fw/down.txt", tmp_path / "down.txt")
    assert (tmp_path / "down.txt").read_text() == "made in the sandbox"


async def test_the_kernel_cannot_lift_the_firewall(scenario: Scenario) -> None:
    await scenario.sandbox.init_firewall(scenario.first_list)

    caps = await scenario.run(
        "print('FW-CAPS', *[line.split()[1] for line in open('/proc/self/status')\n"
        "                   if line.startswith(('CapEff', 'CapBnd'))])",
        "FW-CAPS",
    )
    effective, bounding = (int(value, 16) for value in caps.split())
    for name, bit in (("NET_ADMIN", 12), ("NET_RAW", 13)):
        assert not bounding & (1 << bit), f"the sandbox's bounding set holds CAP_{name} (CapBnd={bounding:#x})"
        assert not effective & (1 << bit), f"the kernel holds CAP_{name} (CapEff={effective:#x})"

    attempts = await scenario.run(
        "import json, shutil, socket, subprocess\n"
        "out = {}\n"
        "for cmd in (['iptables', '-F'], ['iptables', '-P', 'OUTPUT', 'ACCEPT'], ['ip6tables', '-F'],\n"
        "            ['nft', 'flush', 'ruleset'],\n"
        f"            ['ip', 'route', 'add', '198.51.100.0/24', 'via', {scenario.gateway!r}],\n"
        "            ['ip', 'route', 'del', 'default']):\n"
        "    if shutil.which(cmd[0]):\n"
        "        done = subprocess.run(cmd, capture_output=True, text=True)\n"
        "        out[' '.join(cmd)] = [done.returncode, (done.stdout + done.stderr).strip()]\n"
        "try:\n"
        "    socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close()\n"
        "    out['raw socket'] = [0, 'opened']\n"
        "except PermissionError as exc:\n"
        "    out['raw socket'] = [1, repr(exc)]\n"
        "print('FW-UNDO ' + json.dumps(out))",
        "FW-UNDO",
    )
    for command, (returncode, output) in json.loads(attempts).items():
        assert returncode != 0, f"{command!r} succeeded in the sandbox: {output}"

    results = await scenario.probe("blocked", "udp53", "v6", "ip-allowed")
    scenario.assert_blocked_fast(results, "blocked", "udp53", "v6")
    scenario.assert_reachable(results, "ip-allowed")
    assert await scenario.run("_fw_default_gateway()", "FW-GW") == scenario.gateway


async def test_a_new_list_replaces_the_old_one_and_cuts_its_connections(scenario: Scenario) -> None:
    await scenario.sandbox.init_firewall(scenario.first_list)
    assert await scenario.run(f"_fw_keep_open({scenario.ip('ip-allowed')!r})", "FW-KEEP") == "ok hello-ip-allowed"
    try:
        assert await scenario.run("_fw_keep_roundtrip('before')", "FW-KEEP") == "ok before"

        await scenario.sandbox.init_firewall([scenario.ip("blocked")])

        results = await scenario.probe()
        scenario.assert_reachable(results, "blocked", "local")
        scenario.assert_blocked_fast(results, "ip-allowed", "cidr-allowed", "name-allowed", "v6", "metadata")
        after = await scenario.run("_fw_keep_roundtrip('after')", "FW-KEEP")
        assert not after.startswith("ok"), f"a connection to a host no longer allowed still works: {after}"
    finally:
        await scenario.kernel.execute("_fw_kept.close()")

    for essentials_only in (None, []):
        await scenario.sandbox.init_firewall(essentials_only)
        results = await scenario.probe()
        scenario.assert_reachable(results, "local")
        scenario.assert_blocked_fast(
            results, "ip-allowed", "cidr-allowed", "name-allowed", "blocked", "udp53", "v6", "metadata"
        )
        assert await scenario.resolve("name-allowed") == scenario.ip("name-allowed")


async def test_malformed_entries_are_refused_before_any_rule_changes(scenario: Scenario) -> None:
    await scenario.sandbox.init_firewall([scenario.ip("ip-allowed")])

    for entry in MALFORMED:
        with pytest.raises(ValueError) as info:
            await scenario.sandbox.init_firewall([scenario.ip("blocked"), entry])
        if entry:
            assert entry in str(info.value), f"the error should name {entry!r}: {info.value}"

    results = await scenario.probe("ip-allowed", "blocked")
    scenario.assert_reachable(results, "ip-allowed")
    scenario.assert_blocked_fast(results, "blocked")


async def test_an_unresolvable_domain_is_skipped_with_a_warning(
    scenario: Scenario, caplog: pytest.LogCaptureFixture
) -> None:
    # Names must be resolved by the sandbox's resolver (only it knows "name-allowed"); otherwise the
    # unresolvable name below could be sent to the host's upstream resolver, off this machine. In the
    # sandbox, the firewall already on and the host's egress guard keep a forwarded query local.
    await scenario.sandbox.init_firewall(["name-allowed"])
    results = await scenario.probe("name-allowed", "blocked")
    if results["name-allowed"] != "ok hello-name-allowed":
        pytest.fail(f"names are not resolved through the sandbox's resolver: {results}; not trying an unknown name")

    missing = f"no-such-host-{uuid.uuid4().hex[:8]}.invalid"
    caplog.set_level(logging.WARNING)
    await scenario.sandbox.init_firewall([missing, scenario.ip("cidr-allowed")])

    warnings = [
        record
        for record in caplog.records
        if record.name.startswith("ipybox") and record.levelno >= logging.WARNING and missing in record.getMessage()
    ]
    assert warnings, f"no ipybox warning names {missing}: {[r.getMessage() for r in caplog.records]}"
    results = await scenario.probe("cidr-allowed", "name-allowed")
    scenario.assert_reachable(results, "cidr-allowed")
    scenario.assert_blocked_fast(results, "name-allowed")


async def test_a_resolver_outside_the_host_network_is_used_and_reachable_on_port_53_only(
    scenario: Scenario, make_container: ContainerFactory
) -> None:
    # A second sandbox whose configured resolver is the lab's DNS server (as on the default bridge, where
    # the resolver is the host's): not loopback, not in the gateway's /24. Configured through Docker
    # (`dns=`), the only source the firewall trusts: Docker's embedded DNS forwards to it from inside
    # the sandbox's network namespace.
    resolver = scenario.ip("resolver")
    sandbox = await make_container(network=scenario.network, dns=[resolver])
    assert sandbox.container_id is not None
    async with ExecutionClient(port=sandbox.executor_port) as kernel:
        await kernel.execute(KERNEL_HELPERS)
        other = dataclasses.replace(scenario, sandbox=sandbox, kernel=kernel)
        assert await other.resolve(EXTERNAL_NAME) == scenario.ip("ip-allowed"), "the lab's resolver must answer"
        before = await other.probe("resolver", "blocked", "udp53")
        assert all(result.startswith("ok") for result in before.values()), before

        await sandbox.init_firewall([EXTERNAL_NAME])

        # The name was resolved at call time through that resolver, and DNS keeps working through it ...
        assert await other.resolve(EXTERNAL_NAME) == scenario.ip("ip-allowed")
        results = await other.probe("ip-allowed", "local", "resolver", "blocked", "udp53", "cidr-allowed")
        other.assert_reachable(results, "ip-allowed", "local")
        # ... but only on port 53 of the configured resolver: not its other ports, not other resolvers.
        other.assert_blocked_fast(results, "resolver", "blocked", "udp53", "cidr-allowed")


async def test_a_container_that_is_not_running_is_refused(image: str, make_container: ContainerFactory) -> None:
    never_started = ExecutionContainer(tag=image, labels=session_labels())
    with pytest.raises(RuntimeError):
        await never_started.init_firewall(["10.0.0.1"])
    with pytest.raises(RuntimeError):
        await never_started.init_firewall(None)
    killed = await make_container()
    await killed.kill()
    with pytest.raises(RuntimeError):
        await killed.init_firewall([])


async def test_a_failed_rule_set_up_raises_firewall_error(make_container: ContainerFactory) -> None:
    assert issubclass(ipybox.FirewallError, RuntimeError)
    container = await make_container()
    docker = aiodocker.Docker()
    try:
        # Stopped behind ipybox's back: the helper cannot join the sandbox's network namespace.
        await (await docker.containers.get(container.container_id)).kill()
    finally:
        await docker.close()
    with pytest.raises(ipybox.FirewallError) as info:
        await container.init_firewall(["10.0.0.1"])
    assert re.search(r"\S", str(info.value)), "the error should say what failed"
