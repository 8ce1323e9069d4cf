"""Settings of every ipybox kernel: installed as /etc/ipython/ipython_kernel_config.py.

IPython reads this file (its system-wide kernel config, outside both environments and not writable by
the sandbox user) in every kernel process, whoever starts it and from whichever environment: the
pre-warmed kernel, the gateway's kernels, a kernel a user starts with jupyter_client.
"""

c = get_config()  # type: ignore[name-defined]  # noqa: F821  (IPython's config loader provides it)

# No colour codes in tracebacks or magics' output: results are read by models and logs, not terminals.
c.InteractiveShell.colors = "nocolor"

# History in memory only: nothing of a session's code is written to the sandbox's disk (it held secrets
# pasted into cells), and the SQLite writes, done on a thread that holds the lock the next cell's
# `store_inputs` needs, leave the path of every cell. `In`, `Out` and %history work as before.
c.HistoryManager.hist_file = ":memory:"


def _no_forced_colour() -> None:
    """Keep NO_COLOR in force for the tools the code runs (pip, git, ls, ...).

    ipykernel's shell sets FORCE_COLOR=1 and CLICOLOR_FORCE=1 in the kernel's environment when it
    starts, so that subprocesses colour their output even into a pipe; both override NO_COLOR. Undo
    that right after the shell does it.
    """
    import os

    try:
        from ipykernel.zmqshell import ZMQInteractiveShell
    except ImportError:  # not an ipykernel process
        return
    original = ZMQInteractiveShell.init_environment

    def init_environment(self):  # type: ignore[no-untyped-def]
        original(self)
        for name in ("FORCE_COLOR", "CLICOLOR_FORCE"):
            os.environ.pop(name, None)
        os.environ["CLICOLOR"] = "0"

    ZMQInteractiveShell.init_environment = init_environment


_no_forced_colour()
