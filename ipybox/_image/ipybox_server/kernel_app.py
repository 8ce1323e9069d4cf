"""The sandbox's kernel: ipykernel's, with a guard against forked copies of itself.

Shell escapes (`!cmd`, `!!cmd`, `%sx`, `%%bash`, `%%sh`, `%%script ...`) ask ipybox's tool service first
(`mcp_runtime.ask_shell`), so that an application with approvals on can refuse them
(`ShellEscapeDenied`); with approvals off the answer is immediate. An application-level control, not
a security boundary: a cell can start processes in other ways. See `approve_shell_escapes`.

Every kernel runs `IpyboxKernel`: the pre-warmed one (`kernel_stub`) and those the gateway spawns
(`kernel_launcher`, the kernelspec's entry point set in the Dockerfile).

`os.fork()` in a cell copies the whole kernel: its event loop, its ZeroMQ sockets and the cell in
progress. A copy that the cell does not end itself (`os._exit`, exec) carries on through the rest of
the cell and back into the kernel's machinery, which is not fork-safe: it would send replies on
sockets it shares with the kernel and then wait forever in the kernel's event loop, holding a pid.
A fork bomb (`while True: os.fork()`) left about a hundred such copies at a pids limit of 128. So a
copy ends itself (`os._exit`, no output and no reply):

- when its cell ends, or when the cell raises (before the traceback is published: the kernel, not
  each copy, reports the cell's error; a `SystemExit` gives its exit status);
- when it would return to the kernel's event loop otherwise (a cell with top-level `await`: the
  loop first finishes the round of callbacks it was in);
- when a thread it was forked from fails;
- when it forks after its cell has ended, in the kernel or in any other copy. This stops a bomb's
  swarm at once: its copies keep forking, and each failed fork would otherwise free a pid for the
  next. (The kernel then goes on forking children that end at once, until it fails too.)

Stream output goes out in messages of at most `STREAM_CHUNK` characters (`ChunkedOutStream`).
ipykernel sends all the text buffered since its last flush as one message: a 500 MB `print` was one
500 MB message, which a client refuses by its header (past its output cap) by closing the
connection, and the gateway loses what it had queued behind it on that connection: the execution's
reply and idle status, so whether the cell raised was unknown. In chunks, the client reads every
message, counts what it drops past its cap exactly, and sees the end. IOPub has no high-water mark
(`IpyboxKernelApp`): ZeroMQ drops a PUB socket's messages past it (1000 by default), and a cell that
prints a lot sends thousands at once; dropping the idle status would hang its client.

Kernels start with `/opt/ipybox/user-venv/bin/python -I -m ipybox_server.kernel_launcher` (the
kernelspec, set in the Dockerfile) or as the pre-warmed `kernel_stub`; both run `IpyboxKernelApp` in the
user environment, isolated while it imports its own modules, and then `add_user_paths`.

Untouched: `multiprocessing` children (they never return into the kernel, and forks made in them are
theirs: a Pool created in one cell serves the next), `subprocess` (the child execs at once) and a
forked child that ends itself. The kernel reaps its own children that ended this way, so no zombie
holds a pid.
"""

import asyncio
import functools
import mmap
import os
import struct
import sys
import threading
from typing import Any

import zmq
from ipykernel.iostream import OutStream
from ipykernel.ipkernel import IPythonKernel
from ipykernel.kernelapp import IPKernelApp
from ipykernel.zmqshell import ZMQInteractiveShell
from tornado.ioloop import IOLoop
from traitlets import DottedObjectName, Type

from ipybox_server import mcp_runtime

STREAM_CHUNK = 128 * 1024
"""Characters of stream text per message: at most 768 KiB of JSON even when every character needs a
six-byte escape, under the 1 MiB a client reads past its output cap."""

MAX_MESSAGES_PER_FLUSH = 1000
"""Stream messages one flush may send (see `ChunkedOutStream`): chunks grow past `STREAM_CHUNK` for
flushes of more than 128 Mi characters."""

_PID = struct.Struct("=i")
_REAP_INTERVAL = 0.05
_REAP_ATTEMPTS = 100


def _is_multiprocessing_child() -> bool:
    """Whether this process is running a `multiprocessing` process (fork start method)."""
    process = sys.modules.get("multiprocessing.process")
    current = getattr(process, "_current_process", None)
    return getattr(current, "_parent_pid", None) is not None


def _exit_status(error: BaseException | None) -> int:
    if isinstance(error, SystemExit):
        code = error.code
        return code if isinstance(code, int) else 0 if code is None else 1
    return 1


class ForkGuard:
    """Ends forked copies of the kernel; created once, in the kernel, before any cell runs."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.thread = threading.get_ident()
        # The number of cells the kernel has finished, shared with every copy (MAP_SHARED); `cell` is
        # each process's own count, frozen in a copy at the value of the cell it was forked in.
        self._finished = mmap.mmap(-1, 8)
        self.cell = 0
        self._depth = 0
        # Direct children of the kernel that end here send their pid, for the kernel to reap.
        self._graves_in, self._graves_out = os.pipe()
        os.set_blocking(self._graves_in, False)
        os.set_blocking(self._graves_out, False)
        self._pending: dict[int, int] = {}
        self._reaping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._io_loop: IOLoop | None = None
        os.register_at_fork(before=self._before_fork, after_in_child=self._after_fork_in_child)
        self._excepthook = threading.excepthook
        threading.excepthook = self._thread_failed

    def is_copy(self) -> bool:
        return os.getpid() != self.pid

    def attach(self, io_loop: IOLoop) -> None:
        """Start reaping on the kernel's loop (the loop runs the cells, in this thread)."""
        self._io_loop = io_loop
        self._loop = io_loop.asyncio_loop  # type: ignore[attr-defined]
        self.thread = threading.get_ident()
        io_loop.add_handler(self._graves_in, self._on_graves, IOLoop.READ)

    def cell_started(self) -> None:
        if self._depth == 0 and not self.is_copy():
            self._on_graves(self._graves_in, 0)  # so that no copy that has ended shows in this cell
        self._depth += 1

    def cell_ended(self) -> None:
        if self.is_copy():
            self.exit_copy(0)
        self._depth -= 1
        if self._depth == 0:  # not a cell that another cell runs (`%run`, `run_cell`)
            self.cell += 1
            self._finish(self.cell)

    def _finished_cells(self) -> int:
        return int.from_bytes(self._finished[:8], "little")

    def _finish(self, cells: int) -> None:
        if self._finished_cells() < cells:
            self._finished[:8] = cells.to_bytes(8, "little")

    def exit_copy(self, status: int) -> None:
        """End this copy at once: no flush (its buffers hold the kernel's output), no reply."""
        # The other copies of its cell may fork no more: a bomb's swarm stops at once, instead of
        # each failed fork freeing a pid for the next.
        self._finish(self.cell + 1)
        if os.getppid() == self.pid:
            try:
                os.write(self._graves_out, _PID.pack(os.getpid()))
            except OSError:
                pass
        os._exit(status)

    def _before_fork(self) -> None:
        if not self.is_copy() or _is_multiprocessing_child():
            return
        if self.cell < self._finished_cells():
            self.exit_copy(1)

    def _after_fork_in_child(self) -> None:
        # The fork came from the thread that runs the loop, so that is where this copy will return.
        # Only after the cell gives up control (an await): a cell that ends normally exits first.
        if self._loop is not None and threading.get_ident() == self.thread:
            try:
                self._loop.call_soon(self._returned_to_loop)
            except RuntimeError:
                pass

    def _returned_to_loop(self) -> None:
        # A multiprocessing child that runs the loop it inherited (asyncio.get_event_loop()) is its own.
        if not _is_multiprocessing_child():
            self.exit_copy(0)

    def _thread_failed(self, args: Any) -> None:
        # A copy forked from a thread ends with that thread; without a traceback that it could only
        # send through the kernel's I/O.
        if self.is_copy():
            self.exit_copy(1)
        self._excepthook(args)

    def _on_graves(self, fd: int, events: int) -> None:
        if self.is_copy():
            return  # a copy that runs a handler of the loop before it ends: the pids are the kernel's
        try:
            data = os.read(fd, 4096 * _PID.size)
        except BlockingIOError:
            return
        usable = len(data) - len(data) % _PID.size
        for (pid,) in _PID.iter_unpack(data[:usable]):
            self._pending[pid] = _REAP_ATTEMPTS
        if not self._reaping:
            self._reap()

    def _reap(self) -> None:
        """Collect the copies' exit statuses; a copy may still be between its message and its exit."""
        for pid, attempts in list(self._pending.items()):
            try:
                done = os.waitpid(pid, os.WNOHANG)[0] != 0
            except ChildProcessError:
                done = True  # reaped already (by the cell's own os.wait)
            if done or attempts <= 1:
                del self._pending[pid]
            else:
                self._pending[pid] = attempts - 1
        self._reaping = bool(self._pending) and self._io_loop is not None
        if self._reaping:
            self._io_loop.call_later(_REAP_INTERVAL, self._reap)  # type: ignore[union-attr]


_guard: ForkGuard | None = None


def fork_guard() -> ForkGuard:
    """The kernel's guard; a copy gets the one it inherited, which knows it is a copy."""
    global _guard
    if _guard is None:
        _guard = ForkGuard()
    return _guard


def approve_shell_escapes() -> None:
    """Make `!cmd` (`system`) and the script cell magics ask `mcp_runtime.ask_shell` before they run.

    Both are wrapped where the command is final, not in the shell's methods: those expand `$var` from
    the caller's frame by depth, which a wrapping method would shift. `!!cmd` and `%sx` go through
    `IpyboxShell.getoutput`, which takes a depth.
    """
    import ipykernel.zmqshell
    from IPython.core.magics import script

    system = ipykernel.zmqshell.system  # what ZMQInteractiveShell.system_piped runs, the command expanded
    if not getattr(system, "ipybox_approved", False):

        def approved_system(cmd: str) -> Any:
            mcp_runtime.ask_shell("system", cmd)
            return system(cmd)

        approved_system.ipybox_approved = True  # type: ignore[attr-defined]
        ipykernel.zmqshell.system = approved_system  # type: ignore[attr-defined]

    shebang = script.ScriptMagics.shebang  # %%script, and %%bash, %%sh, ... through it
    if not getattr(shebang, "ipybox_approved", False):

        @functools.wraps(shebang)  # keeps the magic's argument parser, which shebang itself reads
        def approved_shebang(self: Any, line: str, cell: str) -> Any:
            program = next((word for word in line.split() if not word.startswith("-")), "script")
            mcp_runtime.ask_shell(f"%%{os.path.basename(program)}", f"{line}\n{cell}".strip())
            return shebang(self, line, cell)

        approved_shebang.ipybox_approved = True  # type: ignore[attr-defined]
        script.ScriptMagics.shebang = approved_shebang  # type: ignore[method-assign]


class IpyboxShell(ZMQInteractiveShell):
    """The shell that tells the guard where each cell starts and ends, and names the execution in
    progress for tool calls made from threads (`mcp_runtime.current_msg_id`)."""

    ipybox_msg_id: str | None = None

    async def run_cell_async(self, *args: Any, **kwargs: Any) -> Any:
        guard = fork_guard()
        guard.cell_started()
        kernel = getattr(self, "kernel", None)
        if kernel is not None:
            self.ipybox_msg_id = kernel.get_parent().get("header", {}).get("msg_id") or self.ipybox_msg_id
        try:
            return await super().run_cell_async(*args, **kwargs)
        finally:
            guard.cell_ended()

    def getoutput(self, cmd: str, split: bool = True, depth: int = 0) -> Any:
        mcp_runtime.ask_shell("getoutput", self.var_expand(cmd, depth=depth + 1))
        return super().getoutput(cmd, split, depth + 1)

    def showtraceback(self, *args: Any, **kwargs: Any) -> None:
        guard = fork_guard()
        if guard.is_copy():
            exc_tuple = args[0] if args else kwargs.get("exc_tuple")
            guard.exit_copy(_exit_status(exc_tuple[1] if exc_tuple else sys.exc_info()[1]))
        super().showtraceback(*args, **kwargs)


class IpyboxKernel(IPythonKernel):  # type: ignore[misc]
    shell_class = Type(IpyboxShell)

    def __init__(self, **kwargs: Any) -> None:
        fork_guard()  # before any cell can fork
        approve_shell_escapes()
        super().__init__(**kwargs)

    def start(self) -> None:
        super().start()
        fork_guard().attach(self.io_loop)


class ChunkedOutStream(OutStream):  # type: ignore[misc]
    """ipykernel's stdout/stderr, flushing in messages of `STREAM_CHUNK` characters.

    One flush sends at most `MAX_MESSAGES_PER_FLUSH` messages; bigger flushes get bigger chunks, so
    a huge print does not become hundreds of thousands of messages.
    """

    def _flush(self) -> None:
        thread = self.pub_thread.thread if self.pub_thread is not None else None
        if thread is None or thread.ident != threading.get_ident():
            super()._flush()
            return
        # In the IOPub thread (always, but in a forked child): as ipykernel's `_flush`, but each message
        # goes straight to the IOPub socket, which this thread owns. ipykernel schedules each one on
        # this same thread through a wake-up pipe that blocks its sender when full: a big flush
        # deadlocked the thread on itself (no output, no idle, ever).
        self._flush_pending = False
        self._subprocess_flush_pending = False
        if self.echo is not None:
            try:
                self.echo.flush()
            except OSError as exc:
                if self.echo is not sys.__stderr__:
                    print(f"Flush failed: {exc}", file=sys.__stderr__)
        for parent, data in self._flush_buffers():
            if not data:
                continue
            self.session.pid = os.getpid()
            msg = self.session.msg("stream", {"name": self.name, "text": data}, parent=parent)
            for hook in self._hooks:
                msg = hook(msg)
                if msg is None:
                    return
            self.session.send(self.pub_thread.socket, msg, ident=self.topic)

    def _flush_buffers(self) -> Any:
        for parent, data in super()._flush_buffers():
            size = max(STREAM_CHUNK, -(-len(data) // MAX_MESSAGES_PER_FLUSH))
            if len(data) <= size:
                yield parent, data
                continue
            for start in range(0, len(data), size):
                yield parent, data[start : start + size]


class IpyboxKernelApp(IPKernelApp):  # type: ignore[misc]
    """ipykernel's application with ipybox's kernel, stdout/stderr and an IOPub without a high-water mark."""

    kernel_class = Type(IpyboxKernel)
    outstream_class = DottedObjectName("ipybox_server.kernel_app.ChunkedOutStream")

    def init_iopub(self, context: zmq.Context) -> None:  # type: ignore[type-arg]
        # A context default, so the option is on the socket before it binds and before any peer
        # connects (ZeroMQ applies a high-water mark to a connection when it is made).
        context.setsockopt(zmq.SNDHWM, 0)
        try:
            super().init_iopub(context)
        finally:
            context.sockopts.pop(zmq.SNDHWM, None)


def prefer_as_oom_victim() -> None:
    """Raise this kernel's own oom_score_adj to 1000 (no privilege needed to raise it): if the container
    runs out of memory, a kernel is killed, not the server the host talks to.

    The server also raises it once Popen returns (prewarm.prefer_as_oom_victim), but that can come too
    early: the exec'd kernel may still be non-dumpable for a moment, its /proc files root's, and the
    write is refused (seen once in CI: a pre-warmed kernel at 0). Here, at the kernel's own start, the
    exec is complete and the file is this process's.
    """
    try:
        with open("/proc/self/oom_score_adj", "w") as file:
            file.write("1000")
    except OSError:
        pass  # not Linux, or no /proc: nothing to prefer


def add_user_paths() -> None:
    """Put the working directory and PYTHONPATH's entries (/app) on sys.path, after the kernel's own imports.

    Kernels start isolated (`python -I`): PYTHONPATH, the working directory and sitecustomize are ignored
    while ipybox's kernel imports ipykernel, zmq, tornado, ..., so files in /app cannot shadow them. User
    code, and the processes it starts, see PYTHONPATH as usual.
    """
    entries = [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
    # As a plain `python`: the working directory first (-I implies -P, so IPython leaves it out), then
    # PYTHONPATH's entries, then the environment's.
    for entry in ["", *entries][::-1]:
        if entry not in sys.path:
            sys.path.insert(0, entry)
