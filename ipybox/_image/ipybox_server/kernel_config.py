"""Settings of every ipybox kernel: installed as <venv>/etc/ipython/ipython_kernel_config.py.

IPython reads this file (its system-wide kernel config) in every kernel process, whoever starts it:
the pre-warmed kernel, the gateway's kernels, a kernel a user starts with jupyter_client.
"""

c = get_config()  # type: ignore[name-defined]  # noqa: F821  (IPython's config loader provides it)

# No colour codes in tracebacks or magics' output: results are read by models and logs, not terminals.
c.InteractiveShell.colors = "nocolor"

# History in memory only: nothing of a session's code is written to the sandbox's disk (it held secrets
# pasted into cells), and the SQLite writes, done on a thread that holds the lock the next cell's
# `store_inputs` needs, leave the path of every cell. `In`, `Out` and %history work as before.
c.HistoryManager.hist_file = ":memory:"
