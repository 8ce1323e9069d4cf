"""Hostile output: floods stay within `max_output_bytes` in client memory, escapes never reach the text."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from ipybox import ExecutionClient, ExecutionContainer, _tokens
from ipybox.executor import DEFAULT_MAX_OUTPUT_BYTES

MIB = 2**20

# Runs one flood in a fresh process, so its peak RSS is the client's alone.
CLIENT = textwrap.dedent(
    """
    import asyncio, json, resource, sys, time
    from ipybox import ExecutionClient

    async def main(port, token, code, cap):
        async with ExecutionClient(port=port, token=token, max_output_bytes=cap) as client:
            await client.execute("print('warm up the code paths')")
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            start = time.monotonic()
            result = await client.execute(code, timeout=120)
            seconds = time.monotonic() - start
            after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            following = await client.execute("x = 6 * 7\\nprint(x)", timeout=30)
            text = result.text or ""
            last = text.rsplit("\\n", 1)[-1]
            print(json.dumps({
                "grew_kib": after - before, "seconds": seconds, "truncated": result.truncated,
                "dropped": result.dropped_bytes, "kept": len(text) - len(last), "last_line": last,
                "images": len(result.images), "next": following.text,
            }))

    asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])))
    """
)

# name: (code, max_output_bytes, bytes of output the code produces)
FLOODS = {
    # Hundreds of MB written between two flushes: the kernel sends it in 128 Ki-character messages, each
    # read, counted and dropped past the cap (one message of 1 GB would be refused unread, losing the
    # execution's end behind it).
    "1GB-stdout": (
        "import sys\nfor _ in range(1000):\n    sys.stdout.write('x' * 10**6)",
        DEFAULT_MAX_OUTPUT_BYTES,
        10**9,
    ),
    "500MB-line": ("print('x' * 500_000_000)", DEFAULT_MAX_OUTPUT_BYTES, 500_000_001),
    # 200 messages of 1 MB: each read, kept up to the cap, then counted and dropped.
    "200MB-flushed": ("for _ in range(200):\n    print('y' * 999_999, flush=True)", 16 * MIB, 200 * 10**6),
    "100k-display_data": (
        "from IPython.display import display\nfor i in range(100_000):\n    display(i)",
        MIB,
        sum(len(f"{i}\n") for i in range(100_000)),
    ),
}


@pytest.mark.parametrize(("code", "cap", "produced"), FLOODS.values(), ids=FLOODS.keys())
async def test_flood_keeps_client_memory_bounded(make_container, code: str, cap: int, produced: int) -> None:  # type: ignore[no-untyped-def]
    # Inside the sandbox a 1 GB message costs the kernel and the gateway several copies each, more
    # than the default 4 GiB: this test is about the client, so the sandbox gets room.
    container: ExecutionContainer = await make_container(memory_limit="8g")
    token = _tokens.lookup("localhost", container.executor_port)
    assert token
    done = subprocess.run(
        [sys.executable, "-c", CLIENT, str(container.executor_port), token, code, str(cap)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    # The kept output, its one joined copy in the result, and a margin for the message being decoded.
    assert report["grew_kib"] * 1024 < 2 * cap + 48 * MIB, report
    assert report["truncated"] is True, report
    assert report["kept"] <= cap
    assert report[
        "last_line"
    ] == f"[output truncated: {report['dropped']:,} bytes dropped past max_output_bytes={cap}]" or (
        report["last_line"]
        == f"[output truncated: at least {report['dropped']:,} bytes dropped past max_output_bytes={cap}]"
    ), report
    if "at least" in report["last_line"]:
        # Messages in flight when a refused one closed the connection are lost, not counted.
        assert report["dropped"] >= 100 * MIB, report
    else:
        assert abs(produced - report["kept"] - report["dropped"]) <= 1, report
    # The sandbox is fine: the next execution sees only its own output.
    assert report["next"] == "42", report


async def test_stream_says_once_when_truncation_starts(client: ExecutionClient) -> None:
    execution = await client.submit("for _ in range(50):\n    print('z' * 99_999, flush=True)", max_output_bytes=MIB)
    chunks = [chunk async for chunk in execution.stream(timeout=60)]
    markers = [chunk for chunk in chunks if "[output truncated" in chunk]
    assert len(markers) == 1 and "max_output_bytes=1048576" in markers[0]
    assert sum(len(chunk) for chunk in chunks if chunk not in markers) <= MIB
    result = await execution.result()
    assert result.truncated and result.dropped_bytes == 50 * 100_000 - sum(
        len(chunk) for chunk in chunks if chunk not in markers
    )
    assert result.text is not None and result.text.endswith(
        f"[output truncated: {result.dropped_bytes:,} bytes dropped past max_output_bytes=1048576]"
    )


async def test_client_cap_and_per_call_override(shared_container: ExecutionContainer) -> None:
    async with ExecutionClient(port=shared_container.executor_port, max_output_bytes=10_000) as client:
        small = await client.execute("print('a' * 20_000)")
        assert small.truncated and small.text is not None and len(small.text) < 11_000
        full = await client.execute("print('b' * 20_000)", max_output_bytes=None)
        assert not full.truncated and full.dropped_bytes == 0 and full.text == "b" * 20_000
        exact = await client.execute("print('c' * 500)")
        assert not exact.truncated and exact.text == "c" * 500


async def test_images_count_toward_the_cap(client: ExecutionClient) -> None:
    code = (
        "from PIL import Image\nimport numpy as np\nfrom IPython.display import display\n"
        "for _ in range(5):\n    display(Image.fromarray(np.random.randint(0, 255, (300, 300, 3), dtype=np.uint8)))"
    )
    # Each 300 x 300 PNG of noise is charged about 1 MB: 360 KB decoded (4 bytes a pixel in PIL),
    # about 270 KB encoded and 360 KB of base64 (plus the bundle's JPEG, as text).
    result = await client.execute(code, max_output_bytes=2_500_000)
    assert len(result.images) == 2
    assert result.truncated and result.dropped_bytes > 3 * 900_000
    dropped = [output.text or "" for output in result.outputs if output.truncated]
    assert len(dropped) == 3 and all(text.startswith("[image dropped: 300x300 PNG") for text in dropped)


async def test_escape_sequences_are_stripped(client: ExecutionClient) -> None:
    code = (
        "print('\\x1b[31mred\\x1b[0m \\x1b]0;title\\x07\\x1b]8;;https://example.com\\x1b\\\\link\\x1b]8;;\\x1b\\\\ "
        "\\x1bc\\x1b[2J\\x9b1;1Hend')\n"
        "class Shown:\n"
        "    def __repr__(self):\n"
        "        return '\\x1b[1mshown\\x1b[0m'\n"
        "Shown()"
    )
    result = await client.execute(code)
    assert result.text == "red link end\nshown"


async def test_escape_split_across_stream_chunks_is_stripped(client: ExecutionClient) -> None:
    execution = await client.submit(
        "import sys, time\n"
        "sys.stdout.write('a\\x1b[3'); sys.stdout.flush(); time.sleep(0.3)\n"
        "sys.stdout.write('1mb\\x1b]0;ti'); sys.stdout.flush(); time.sleep(0.3)\n"
        "sys.stdout.write('tle\\x07c\\n');"
    )
    chunks = [chunk async for chunk in execution.stream(timeout=30)]
    assert all("\x1b" not in chunk and "\x07" not in chunk for chunk in chunks)
    assert "".join(chunks) == "abc\n"
    assert (await execution.result()).text == "abc"
