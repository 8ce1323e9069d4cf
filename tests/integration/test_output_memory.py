"""Peak client memory of one execution whose output is near `max_output_bytes`: at most twice the cap.

Measured with tracemalloc (every Python allocation: websocket frames, decoded JSON, the kept output,
the result's strings, the opened images) from before `submit()` to after `result()`, the result
still alive. Before the fix a message near the cap had four copies alive at once (the frame, a sliced
part, json's decoded text, the parsed value) and a result kept its text three times (the chunks,
`text`, `stdout`/`stderr`): 3.8 x the cap for one big print.
"""

from __future__ import annotations

import tracemalloc

import pytest

from ipybox import ExecutionClient, ExecutionResult

MIB = 2**20
CAP = 32 * MIB

RANDOM_PNG = """
import io, numpy as np
from PIL import Image as PILImage
from IPython.display import Image, display
def random_png(side):
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    PILImage.fromarray(pixels).save(buffer, format="PNG", compress_level=0)
    return buffer.getvalue()
"""

CELLS = {
    # One incompressible 1700 x 1700 PNG: 8.7 MB encoded, 11.6 MB of base64, 11.6 MB decoded (RGB
    # in PIL: 4 bytes a pixel): charged 31.8 MB, 95 % of the cap.
    "one image": RANDOM_PNG + "display(Image(data=random_png(1700)))",
    "ten images": RANDOM_PNG + "for _ in range(10):\n    display(Image(data=random_png(520)))",
    "one print": "import sys\nsys.stdout.write('x' * 32_000_000)",
    "interleaved streams": (
        "import sys\nfor i in range(31):\n"
        "    stream = sys.stderr if i % 3 == 2 else sys.stdout\n"
        "    stream.write(chr(97 + i % 26) * 999_999 + '\\n')\n    stream.flush()"
    ),
    "many small chunks": "import sys\nfor i in range(3000):\n    sys.stdout.write('y' * 9_999 + '\\n')",
    "json": (
        "from IPython.display import display\n"
        "display({'application/json': {'a': 'x' * 32_000_000}, 'text/plain': 'json'}, raw=True)"
    ),
}


async def measure(client: ExecutionClient, code: str) -> tuple[ExecutionResult, int]:
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        result = await (await client.submit(code, max_output_bytes=CAP)).result()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return result, peak - base


# 2850 x 2850: 32.5 MB of base64, just under the largest message the client reads (the cap + 1 MiB),
# charged 89 MB: dropped and marked, but read and parsed first.
PAST_THE_CAP = RANDOM_PNG + "display(Image(data=random_png(2850)))"


@pytest.mark.parametrize("cell", list(CELLS))
async def test_peak_memory_stays_within_twice_the_cap(client: ExecutionClient, cell: str) -> None:
    await client.execute("import numpy, PIL, IPython.display")  # imports outside the measurement
    result, peak = await measure(client, CELLS[cell])
    assert not result.truncated, result.text and result.text[-200:]
    kept = len(result.stdout) + len(result.stderr) + sum(len(str(output.data)) for output in result.outputs)
    assert kept > 0.25 * CAP  # the cell really produced output near the cap
    print(f"{cell}: peak {peak / MIB:.1f} MiB = {peak / CAP:.2f} x max_output_bytes")  # shown with -rP
    assert peak <= 2 * CAP, f"{cell}: peak {peak / MIB:.1f} MiB = {peak / CAP:.2f} x max_output_bytes"


async def test_an_image_past_the_cap_is_dropped_within_twice_the_cap(client: ExecutionClient) -> None:
    await client.execute("import numpy, PIL, IPython.display")
    result, peak = await measure(client, PAST_THE_CAP)
    assert result.truncated and result.images == []
    assert result.text is not None and "[image dropped: 2850x2850 PNG would decode to 31.0 MiB" in result.text
    print(f"image past the cap: peak {peak / MIB:.1f} MiB = {peak / CAP:.2f} x max_output_bytes")
    assert peak <= 2 * CAP, f"peak {peak / MIB:.1f} MiB = {peak / CAP:.2f} x max_output_bytes"
