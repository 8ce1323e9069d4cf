"""The resource server, fuzzed from its own OpenAPI description with schemathesis: no 5xx, no hang.

A container of this module's own (the fuzzer writes, reads and deletes under its /app) serves
`/openapi.json`; `schemathesis run` loads it from there with the token and sends schema-valid and
schema-violating requests to every operation but one, at http://127.0.0.1:<resource port> only.
Phases: the description's examples, coverage (boundary values), fuzzing, and stateful sequences along
the description's links (a file put, then read, deleted, read again; a directory put, then read).
Bounded: deterministic generation, MAX_EXAMPLES cases per operation and phase, MAX_STEPS per stateful
sequence, one worker, REQUEST_TIMEOUT s per request (a hang fails the run), the whole run killed after
RUN_TIMEOUT s; it takes about 12-25 s. Checks: all of schemathesis' response checks (no 5xx, documented
status codes, content types, headers and bodies, schema-violating requests refused, schema-valid ones
accepted, 401 without the token, 405 for undocumented methods, use after delete), with one exception
for the file and directory operations, explained in CONFIG.

`test_directory_uploads_of_fuzzed_archives_get_an_answer_not_a_server_error` sends ARCHIVE_EXAMPLES more
generated archives than the schemathesis run does: the tar reader and extraction are the largest attack
surface behind one route.

`POST /mcp/sources` is not fuzzed: a schema-valid request starts a process in the sandbox (stdio) or
connects to a URL (off this machine), and may take up to 240 s. Instead,
`test_mcp_generation_refuses_malformed_requests_before_starting_anything` sends it hypothesis-generated
requests that are malformed in a way the server checks first, and asserts each is a quick 400 with a
message, and that nothing was generated. `PUT /tools/servers/{name}` is left out for the same reason
(a registered server is started by a call), and `GET /tools/host` and `GET /lease` because they are
websocket upgrades: a plain GET, all a fuzzer sends, gets the documented 400.

Request bodies of type `application/x-tar` come from `tar_archives()`: real archives with random members
(also links, devices, `..` and absolute names, odd modes and times), some truncated or corrupted, and
raw bytes. schemathesis loads this file as its hooks module (SCHEMATHESIS_HOOKS) to register them.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[2]
MAX_EXAMPLES = 100
MAX_STEPS = 10
ARCHIVE_EXAMPLES = 500
MCP_EXAMPLES = 200
SEED = 20240606
REQUEST_TIMEOUT = 15.0
RUN_TIMEOUT = 240.0
# Operations left out of the fuzz run, with the reason in the module docstring.
NOT_FUZZED = ("generateMcpSources", "registerToolServer", "toolHostWebsocket", "holdLease")

CONFIG = f"""
seed = {SEED}
workers = 1

[generation]
deterministic = true
database = "none"
max-examples = {MAX_EXAMPLES}

[phases]
examples.enabled = true
coverage.enabled = true
fuzzing.enabled = true
stateful.enabled = true
stateful.max-steps = {MAX_STEPS}

[checks]
enabled = true

[[operations]]
include-operation-id-regex = "^(putFile|getFile|deleteFile|putDirectory|getDirectory)$"
# Whether a relpath is acceptable depends on more than a JSON schema can say: names of at most 255
# bytes (not characters), no '..' also after percent-decoding, no way out through a symlink; and
# whether an archive is acceptable depends on its members. So a schema-valid path or archive may
# rightly get a 400 here; every other check applies.
checks.positive_data_acceptance.enabled = false
"""


# -- request bodies: tar archives ------------------------------------------------------------------

_NAMES = st.one_of(
    st.text(alphabet="ab_/.", min_size=1, max_size=12),
    st.sampled_from(
        ["..", "../x", "/etc/x", "a/../b", "./a", "a//b", ".", "a\x00b", "é/ü", "x" * 300, "d/" + "é" * 128 + "/f"]
    ),
    st.text(max_size=20),
)
_TYPES = st.sampled_from(
    [tarfile.REGTYPE] * 4
    + [tarfile.DIRTYPE] * 3
    + [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE, tarfile.CHRTYPE, tarfile.CONTTYPE, b"Z"]
)
_MTIMES = st.one_of(
    st.sampled_from([0, -1, 2**31, 2**33, 2**62, -(2**62), 2**64, 1e300, -1e300, 0.5]),
    st.integers(-(2**64), 2**64),
    st.floats(-1e20, 1e20),
)


@st.composite
def _archive(draw: Any) -> bytes:
    buffer = io.BytesIO()
    tar_format = draw(st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT]))
    with tarfile.open(fileobj=buffer, mode="w", format=tar_format) as tar:
        for _ in range(draw(st.integers(1, 6))):
            info = tarfile.TarInfo(draw(_NAMES))
            info.type = draw(_TYPES)
            info.mode = draw(st.integers(0, 0o7777))
            info.mtime = draw(_MTIMES)
            data = draw(st.binary(max_size=100)) if info.type in (tarfile.REGTYPE, tarfile.CONTTYPE) else b""
            info.size = len(data)
            if info.type in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = draw(_NAMES)
            try:
                tar.addfile(info, io.BytesIO(data))
            except (ValueError, UnicodeError, OverflowError):
                continue  # not representable in this format
    raw = buffer.getvalue()
    damage = draw(st.sampled_from(["none", "none", "none", "truncate", "flip"]))
    if damage == "truncate":
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    elif damage == "flip":
        at = draw(st.integers(0, len(raw) - 1))
        raw = raw[:at] + bytes([raw[at] ^ draw(st.integers(1, 255))]) + raw[at + 1 :]
    return raw


def tar_archives() -> st.SearchStrategy[bytes]:
    return st.one_of(_archive(), _archive(), _archive(), st.binary(max_size=2048))


if __name__ == "_schemathesis_hooks":  # loaded by schemathesis through SCHEMATHESIS_HOOKS
    import schemathesis

    schemathesis.openapi.media_type("application/x-tar", tar_archives())


# -- the container ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def server(image: str) -> AsyncIterator[tuple[str, str]]:
    """(base URL, token) of a fresh container's resource server."""
    from ipybox import ExecutionContainer, _tokens
    from tests.integration.conftest import session_labels

    async with ExecutionContainer(tag=image, labels=session_labels()) as container:
        token = _tokens.lookup(container.host, container.resource_port)
        assert token
        yield f"http://127.0.0.1:{container.resource_port}", token


def request(
    base: str,
    method: str,
    path: str,
    token: str | None,
    body: bytes | None = None,
    timeout: float = 10,
    content_type: str = "application/json",
) -> tuple[int, str, bytes]:
    headers = {"Authorization": f"token {token}"} if token else {}
    if body is not None:
        headers["Content-Type"] = content_type
    req = urllib.request.Request(base + path, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, response.headers.get_content_type(), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get_content_type(), exc.read()


# -- tests -----------------------------------------------------------------------------------------


def test_description_is_served_only_with_the_token(server: tuple[str, str]) -> None:
    base, token = server
    assert request(base, "GET", "/openapi.json", None)[0] == 401
    status, content_type, body = request(base, "GET", "/openapi.json", token)
    assert (status, content_type) == (200, "application/json")
    spec = json.loads(body)
    assert spec["openapi"].startswith("3.")
    assert {op["operationId"] for item in spec["paths"].values() for op in item.values() if "operationId" in op} >= {
        *NOT_FUZZED,
        "putFile",
        "getDirectory",
    }


def run_schemathesis(
    base: str, token: str, workdir: Path, *extra: str
) -> tuple[subprocess.CompletedProcess[str], float]:
    config = workdir / "schemathesis.toml"
    config.write_text(CONFIG)
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(config),
        "run",
        f"{base}/openapi.json",
        "--url",
        base,
        "--header",
        f"Authorization: token {token}",
        "--request-timeout",
        str(REQUEST_TIMEOUT),
        "--no-color",
        "--output-truncate",
        "false",
        *[arg for op in NOT_FUZZED for arg in ("--exclude-operation-id", op)],
        *extra,
    ]
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": __file__,
        "PYTHONPATH": str(REPO),
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    started = time.monotonic()
    # cwd: schemathesis may leave caches or reports in its working directory, not in the repo.
    result = subprocess.run(
        command, cwd=workdir, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False
    )
    return result, time.monotonic() - started


def test_fuzzing_finds_no_server_error_and_no_hang(server: tuple[str, str], tmp_path: Path) -> None:
    base, token = server
    result, elapsed = run_schemathesis(base, token, tmp_path)
    report = result.stdout + result.stderr
    assert result.returncode == 0, f"schemathesis found problems (exit {result.returncode}):\n{report}"
    assert "No issues found" in report or " passed" in report, report
    print(report)
    print(f"schemathesis run took {elapsed:.1f} s")


@pytest.mark.filterwarnings("ignore:Generating overly large repr")
def test_directory_uploads_of_fuzzed_archives_get_an_answer_not_a_server_error(server: tuple[str, str]) -> None:
    """More archives than the schemathesis run sends: every one is a 200, or a 4xx with a message."""
    base, token = server

    @settings(
        max_examples=ARCHIVE_EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(archive=_archive(), target=st.sampled_from(["up", "up/nested", "up/f.txt"]))
    def check(archive: bytes, target: str) -> None:
        status, content_type, answer = request(
            base,
            "PUT",
            f"/directories/{target}",
            token,
            archive,
            timeout=REQUEST_TIMEOUT,
            content_type="application/x-tar",
        )
        assert content_type == "application/json", (archive, answer)
        assert status == 200 or (status in (400, 409, 413) and json.loads(answer)["error"]), (status, answer, archive)
        answers[status] = answers.get(status, 0) + 1

    answers: dict[int, int] = {}
    request(base, "PUT", "/files/up/f.txt", token, b"a file where a directory may be asked for")
    check()
    # The archives reach both outcomes: extraction and refusal.
    assert answers.get(200, 0) >= ARCHIVE_EXAMPLES // 20 and answers.get(400, 0) >= ARCHIVE_EXAMPLES // 5, answers


# -- POST /mcp/sources: malformed requests only ----------------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
_BAD_SERVER_NAMES = st.one_of(
    st.none(),
    st.integers(),
    st.just(""),
    st.sampled_from(["1abc", "a-b", "class", "a b", "a.b", "../x", "x\x00"]),
    st.text(max_size=10).filter(lambda s: not s.isidentifier()),
)
_BAD_PARAMS = st.one_of(
    _JSON.filter(lambda v: not isinstance(v, dict)),
    st.fixed_dictionaries({"type": st.text(max_size=8).filter(lambda t: t not in ("stdio", "sse", "streamable_http"))}),
    st.fixed_dictionaries({"args": st.lists(st.text(max_size=5), max_size=2)}),  # neither command nor url
    st.fixed_dictionaries({"command": st.one_of(st.just(""), st.integers(), st.none(), st.just("a\x00b"))}),
    st.fixed_dictionaries({"command": st.just("true"), "args": st.one_of(st.text(max_size=3), st.just([1]))}),
    st.fixed_dictionaries({"command": st.just("true"), "bogus": _JSON}),
    st.fixed_dictionaries(
        {"url": st.one_of(st.just("ftp://x/mcp"), st.just("/mcp"), st.integers(), st.just("http:x"))}
    ),
    st.fixed_dictionaries({"url": st.just("http://127.0.0.1:9/nothing")}),  # transport cannot be told
    st.fixed_dictionaries({"url": st.just("http://127.0.0.1:9/mcp"), "headers": st.just({"a": 1})}),
)


@st.composite
def _malformed_generation_requests(draw: Any) -> bytes:
    relpath = draw(st.one_of(st.text(max_size=10), _JSON))
    kind = draw(st.sampled_from(["not json", "not an object", "bad name", "bad relpath", "bad params"]))
    if kind == "not json":
        return draw(st.binary(max_size=50).filter(lambda b: not _is_json(b)))
    if kind == "not an object":
        return json.dumps(draw(_JSON.filter(lambda v: not isinstance(v, dict)))).encode()
    body: dict[str, Any] = {"relpath": relpath, "server_name": "pkg", "server_params": {"command": "true"}}
    if kind == "bad name":
        body["server_name"] = draw(_BAD_SERVER_NAMES)
        body["server_params"] = draw(_JSON)
    elif kind == "bad relpath":
        body["relpath"] = draw(
            st.one_of(_JSON.filter(lambda v: not isinstance(v, str)), st.sampled_from(["/etc", "..", "a/../.."]))
        )
    else:
        body["relpath"] = draw(st.text(alphabet="ab/", max_size=5))
        body["server_params"] = draw(_BAD_PARAMS)
    if draw(st.booleans()):
        del body[draw(st.sampled_from(sorted(body)))]
    return json.dumps(body).encode()


def _is_json(raw: bytes) -> bool:
    try:
        json.loads(raw)
    except ValueError:
        return False
    return True


def test_mcp_generation_refuses_malformed_requests_before_starting_anything(server: tuple[str, str]) -> None:
    base, token = server

    @settings(
        max_examples=MCP_EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(body=_malformed_generation_requests())
    def check(body: bytes) -> None:
        started = time.monotonic()
        status, content_type, answer = request(base, "POST", "/mcp/sources", token, body, timeout=REQUEST_TIMEOUT)
        assert (status, content_type) == (400, "application/json"), (body, answer)
        assert json.loads(answer)["error"], answer
        assert time.monotonic() - started < 5, "a refusal must not wait for a generator"
        sent.append(body)

    sent: list[bytes] = []
    check()
    assert len(sent) >= MCP_EXAMPLES // 2
    # Nothing was generated: no package under /app named by any of the requests.
    status, _, _ = request(base, "GET", "/mcp/sources?server_name=pkg", token)
    assert status == 404
