"""Rich results against real kernels: MIME bundles, typed events, errors as data, reset, interrupt, export."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import nbformat
import pytest

from ipybox import (
    Clear,
    Display,
    Error,
    ExecutionClient,
    ExecutionError,
    InvalidStateError,
    KernelDiedError,
    Result,
    Stderr,
    Stdout,
)
from ipybox.outputs import Event

ANSI = re.compile(r"[\x1b\x9b]")


async def test_dataframe_has_html_and_plain(client: ExecutionClient) -> None:
    result = await client.execute("import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': ['x', 'y']})")
    [output] = result.outputs
    assert output.kind == "execute_result" and output.execution_count == result.execution_count
    assert output.html is not None and "<table" in output.html and "<td>x</td>" in output.html
    assert output.text is not None and output.text.split() == ["a", "b", "0", "1", "x", "1", "2", "y"]
    assert result.text == output.text.strip()  # text keeps its meaning: the plain representation, stripped
    assert result.images == []


async def test_svg(client: ExecutionClient) -> None:
    svg = "<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'><circle cx='5' cy='5' r='4'/></svg>"
    result = await client.execute(f'from IPython.display import SVG, display\ndisplay(SVG("{svg}"))')
    [output] = result.outputs
    assert output.svg is not None and "<circle" in output.svg
    assert output.kind == "display_data" and result.images == []


async def test_jpeg_joins_images_like_png(client: ExecutionClient) -> None:
    code = (
        "import io\nfrom PIL import Image as PILImage\nfrom IPython.display import Image, display\n"
        "buffer = io.BytesIO()\nPILImage.new('RGB', (32, 16), 'blue').save(buffer, format='JPEG')\n"
        "display(Image(data=buffer.getvalue(), format='jpeg'))"
    )
    result = await client.execute(code)
    [image] = result.images
    assert image.format == "JPEG" and image.size == (32, 16)
    [output] = result.outputs
    assert output.jpeg is not None and output.jpeg[:2] == b"\xff\xd8"
    assert output.image is not None and output.image.size == (32, 16)
    # As for PNG: an output with an image contributes its image, not its text/plain.
    assert result.text is None


async def test_matplotlib_show_gives_a_png(client: ExecutionClient) -> None:
    result = await client.execute("import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()")
    [image] = result.images
    assert image.format == "PNG" and image.size[0] > 100
    [output] = result.outputs
    assert output.png is not None and output.png.startswith(b"\x89PNG")
    assert result.text is None


async def test_markdown_latex_json(client: ExecutionClient) -> None:
    code = (
        "from IPython.display import JSON, Latex, Markdown, display\n"
        "display(Markdown('# Title\\n*em*'))\n"
        "display(Latex(r'$\\alpha^2$'))\n"
        "display(JSON({'a': [1, 2], 'b': None}))"
    )
    result = await client.execute(code)
    markdown, latex, json_output = result.outputs
    assert markdown.markdown == "# Title\n*em*"
    assert latex.latex == "$\\alpha^2$"
    assert json_output.json == {"a": [1, 2], "b": None}
    assert [sorted(output.mime_types) for output in result.outputs] == [
        ["text/markdown", "text/plain"],
        ["text/latex", "text/plain"],
        ["application/json", "text/plain"],
    ]


async def test_updated_display(client: ExecutionClient) -> None:
    code = (
        "from IPython.display import display\n"
        "handle = display('first', display_id=True)\n"
        "display('other')\n"
        "handle.update('second')"
    )
    execution = await client.submit(code)
    events = [event async for event in execution.events()]
    displays = [event for event in events if isinstance(event, Display)]
    assert [(event.output.text, event.update) for event in displays] == [
        ("'first'", False),
        ("'other'", False),
        ("'second'", True),
    ]
    assert displays[0].output.text == "'first'"  # an event's output is not changed by a later update
    result = await execution.result()
    assert [output.text for output in result.outputs] == ["'second'", "'other'"]
    # `text` is the arrival log, as before: updates do not change it.
    assert result.text == "'first'\n'other'"


async def test_clear_output(client: ExecutionClient) -> None:
    code = (
        "from IPython.display import clear_output, display\n"
        "print('gone')\ndisplay('gone too')\nclear_output()\ndisplay('kept')"
    )
    result = await client.execute(code)
    assert [output.text for output in result.outputs] == ["'kept'"]
    assert result.stdout == "gone\n" and result.text == "gone\n'gone too'\n'kept'"

    waiting = await client.submit(
        "from IPython.display import clear_output, display\n"
        "for step in range(3):\n    clear_output(wait=True)\n    display(f'step {step}')"
    )
    events = [event async for event in waiting.events()]
    assert sum(isinstance(event, Clear) and event.wait for event in events) == 3
    assert [output.text for output in (await waiting.result()).outputs] == ["'step 2'"]

    # wait=True clears only when the next output arrives.
    pending = await client.execute(
        "from IPython.display import clear_output, display\ndisplay('stays')\nclear_output(wait=True)"
    )
    assert [output.text for output in pending.outputs] == ["'stays'"]


async def test_interleaved_stdout_and_stderr_keep_their_order(client: ExecutionClient) -> None:
    code = (
        "import sys\n"
        "for i in range(3):\n"
        "    print(f'out {i}', flush=True)\n"
        "    print(f'err {i}', file=sys.stderr, flush=True)\n"
        "42"
    )
    execution = await client.submit(code)
    events: list[Event] = [event async for event in execution.events()]
    assert events == [
        Stdout("out 0\n"),
        Stderr("err 0\n"),
        Stdout("out 1\n"),
        Stderr("err 1\n"),
        Stdout("out 2\n"),
        Stderr("err 2\n"),
        Result(events[-1].output),  # type: ignore[union-attr]
    ]
    assert isinstance(events[-1], Result) and events[-1].output.text == "42"
    result = await execution.result()
    assert result.stdout == "out 0\nout 1\nout 2\n"
    assert result.stderr == "err 0\nerr 1\nerr 2\n"
    assert result.text == "out 0\nerr 0\nout 1\nerr 1\nout 2\nerr 2\n42"


async def test_events_or_stream_not_both(client: ExecutionClient) -> None:
    execution = await client.submit("print('a')\nprint('b')")
    events = execution.events()
    assert await anext(events) is not None
    with pytest.raises(InvalidStateError, match="either stream"):
        await anext(execution.stream())
    result = await execution.result()  # result() may follow either
    assert result.text == "a\nb"


async def test_errors_as_data(client: ExecutionClient) -> None:
    code = "print('before')\ndef f():\n    raise ValueError('bad value')\nf()"
    result = await client.execute(code, raise_on_error=False)
    assert result.error is not None
    assert (result.error.name, result.error.value) == ("ValueError", "bad value")
    assert "raise ValueError('bad value')" in result.error.traceback
    assert not ANSI.search(result.error.traceback)
    assert result.stdout == "before\n" and result.text == "before"
    assert result.execution_count is not None

    with pytest.raises(ExecutionError, match="ValueError: bad value"):
        await client.execute(code)

    execution = await client.submit("1 / 0")
    events = [event async for event in execution.events()]  # the error is an event, not raised
    assert [type(event) for event in events] == [Error]
    assert isinstance(events[0], Error) and events[0].error.name == "ZeroDivisionError"
    assert (await execution.result(raise_on_error=False)).error == events[0].error
    with pytest.raises(ExecutionError, match="ZeroDivisionError"):
        await execution.result()

    ok = await client.execute("1 + 1", raise_on_error=False)
    assert ok.error is None and ok.text == "2"


async def test_execution_count_and_duration(client: ExecutionClient) -> None:
    first = await client.execute("import time")
    second = await client.execute("time.sleep(0.3)")
    assert first.execution_count is not None and second.execution_count == first.execution_count + 1
    # The duration covers the code's run (the sleep); a first cell may also wait for its kernel to start.
    assert 0.3 <= second.duration < 10
    assert 0 < first.duration < 10


async def test_reset_gives_a_fresh_kernel_in_the_same_container(client: ExecutionClient) -> None:
    await client.execute("x = 42\nimport os\nopen('/tmp/ipybox-reset-marker', 'w').close()")
    kernel_id = client.kernel_id
    before = await client.execute("os.getpid()")
    await client.reset()
    assert client.kernel_id == kernel_id
    result = await client.execute("'x' in dir()", raise_on_error=False)
    assert result.text == "False" and result.execution_count == 1
    files = await client.execute("import os\nprint(os.path.exists('/tmp/ipybox-reset-marker'), os.getpid())")
    assert files.text is not None and files.text.split()[0] == "True"  # same container
    assert files.text.split()[1] != before.text


async def test_reset_fails_a_pending_execution(client: ExecutionClient) -> None:
    # 8 s, not longer: in one CI run the restarted kernel did not answer for 30 s (the old kernel's sleep
    # then) and was not reproduced since; a shorter sleep keeps such a stall inside reset()'s 30 s budget.
    execution = await client.submit("import time\ntime.sleep(8)")
    await asyncio.sleep(0.5)
    await client.reset()
    with pytest.raises(KernelDiedError, match="reset"):
        await execution.result(timeout=10)
    assert (await client.execute("1 + 1")).text == "2"


async def test_interrupt_keeps_state(client: ExecutionClient) -> None:
    await client.execute("kept = 'still here'")
    execution = await client.submit("import time\nprint('sleeping', flush=True)\ntime.sleep(60)")
    events = execution.events()
    assert await anext(events) == Stdout("sleeping\n")  # the cell is running
    await client.interrupt()
    result = await execution.result(timeout=20, raise_on_error=False)
    assert result.error is not None and result.error.name == "KeyboardInterrupt"
    assert result.duration < 20
    assert (await client.execute("kept")).text == "'still here'"


async def test_no_colour_codes_anywhere(client: ExecutionClient) -> None:
    # The kernel itself produces none: colours are off, NO_COLOR is set for tools that honour it.
    settings = await client.execute(
        "import os\nprint(get_ipython().colors, os.environ.get('NO_COLOR'), os.environ.get('MPLBACKEND'),\n"
        "      os.environ.get('FORCE_COLOR'), os.environ.get('CLICOLOR_FORCE'))"
    )
    assert settings.text is not None
    colors, no_color, backend, force_color, clicolor_force = settings.text.split()
    assert colors.lower() == "nocolor" and no_color == "1" and "inline" in backend
    # ipykernel forces colour for subprocesses (FORCE_COLOR, CLICOLOR_FORCE); the image undoes that.
    assert force_color == clicolor_force == "None"

    traceback = await client.execute(
        "import json\ndef nested(v):\n    return json.loads(v)\nnested('{bad')", raise_on_error=False
    )
    assert traceback.error is not None and "JSONDecodeError" in traceback.error.traceback
    timeit = await client.execute("%timeit -n 3 -r 2 sum(range(100))")
    assert timeit.text is not None and "per loop" in timeit.text
    # Tools write no colour to the kernel's pipes: pip's raw output (repr, so nothing here could
    # strip it) has no escape.
    pip = await client.execute(
        "import subprocess, sys\n"
        "run = subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-index', 'ipybox-no-such-package'],\n"
        "                     capture_output=True, text=True)\n"
        "print(repr(run.stdout + run.stderr))",
        timeout=60,
    )
    assert pip.text is not None and "ipybox-no-such-package" in pip.text and "\\x1b" not in pip.text
    rich = await client.execute(
        "import io, os\nfrom IPython.display import display, Markdown\n"
        "print('\\x1b[31mred\\x1b[0m', file=__import__('sys').stderr)\n"
        "display({'text/plain': '\\x1b[1mbold\\x1b[0m', 'text/html': '<b>b</b>'}, raw=True)",
        raise_on_error=False,
    )
    for result in (traceback, timeit, pip, rich):
        texts = [result.text or "", result.stdout, result.stderr]
        texts += [result.error.traceback, result.error.value] if result.error else []
        for output in result.outputs:
            texts += [value for value in output.data.values() if isinstance(value, str)]
        assert not any(ANSI.search(text) for text in texts), texts
    assert rich.stderr == "red\n" and rich.outputs[0].text == "bold"


async def test_rich_outputs_count_toward_the_cap(client: ExecutionClient) -> None:
    code = (
        "from IPython.display import display, HTML\n"
        "display(HTML('<p>' + 'h' * 5000 + '</p>'))\n"
        "display({'text/plain': 'p' * 3000, 'text/html': 'x' * 20000}, raw=True)\n"
        "display(HTML('after'))"
    )
    result = await client.execute(code, max_output_bytes=8000)
    assert result.truncated and result.dropped_bytes > 20000
    first, reduced = result.outputs
    assert first.html is not None and len(first.html) == 5007
    # A bundle that does not fit keeps the head of its text/plain, marked truncated.
    assert reduced.truncated and reduced.mime_types == ["text/plain"]
    assert reduced.text is not None and 0 < len(reduced.text) < 3000
    assert result.text is not None and result.text.endswith("max_output_bytes=8000]")


async def test_export_notebook(client: ExecutionClient, tmp_path: Path) -> None:
    await client.execute("print('hello')")
    await client.execute("import pandas as pd\ndf = pd.DataFrame({'a': [1]})\ndf")
    await client.execute("from IPython.display import display\nhandle = display('v1', display_id=True)")
    await client.execute("handle.update('v2')")  # updates the display of the cell before, as Jupyter does
    await client.execute("import matplotlib.pyplot as plt\nplt.plot([1, 2])\nplt.show()")
    await client.execute("import sys\nfor i in range(3):\n    print(f'\\r{i}', end='', file=sys.stderr)")
    await client.execute("raise KeyError('missing')", raise_on_error=False)
    path = tmp_path / "session.ipynb"
    await client.export_notebook(path)

    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    cells = notebook.cells
    assert [cell.cell_type for cell in cells] == ["code"] * 7
    assert cells[0].source == "print('hello')"
    counts = [cell.execution_count for cell in cells]
    assert all(isinstance(count, int) for count in counts) and counts == sorted(counts)
    assert cells[0].outputs == [{"output_type": "stream", "name": "stdout", "text": "hello\n"}]
    [table] = cells[1].outputs
    assert table.output_type == "execute_result" and "<table" in "".join(table.data["text/html"])
    assert table.execution_count == cells[1].execution_count
    [shown] = cells[2].outputs
    assert shown.data["text/plain"] == "'v2'" and cells[3].outputs == []
    [plot] = cells[4].outputs
    assert plot.output_type == "display_data" and "image/png" in plot.data
    assert cells[5].outputs[0].text == "2"  # carriage returns applied as Jupyter shows them
    [error] = cells[6].outputs
    assert error.output_type == "error" and error.ename == "KeyError" and error.evalue == "'missing'"
    assert not any(ANSI.search(line) for line in error.traceback)


async def test_export_history_is_bounded(shared_container_port: int, tmp_path: Path) -> None:
    async with ExecutionClient(port=shared_container_port, max_history=3) as client:
        for i in range(5):
            await client.execute(f"print({i})")
        await client.export_notebook(tmp_path / "bounded.ipynb")
    # Export works after disconnect() too.
    await client.export_notebook(tmp_path / "after.ipynb")
    notebook = nbformat.read(tmp_path / "bounded.ipynb", as_version=4)
    nbformat.validate(notebook)
    assert [cell.cell_type for cell in notebook.cells] == ["markdown", "code", "code", "code"]
    assert "2 earlier execution(s)" in notebook.cells[0].source
    assert [cell.source for cell in notebook.cells[1:]] == ["print(2)", "print(3)", "print(4)"]
    assert (tmp_path / "after.ipynb").read_text() != ""


@pytest.fixture
def shared_container_port(shared_container: object) -> int:
    return shared_container.executor_port  # type: ignore[attr-defined, no-any-return]
