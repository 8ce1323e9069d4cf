"""A kernel started ahead of time: `<user python> -I -m ipybox_server.kernel_stub CONNECTION_FILE`.

The launcher spawns it before importing the gateway, so its slow start (imports, shell set-up:
about 0.4 s) overlaps with the gateway's own. When the gateway launches its first kernel,
`PrewarmedProvisioner` adopts this running process instead of spawning a new one. It is the same
kernel as the kernelspec's (`kernel_app.IpyboxKernelApp`).
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    # As ipykernel_launcher does: keep the working directory off sys.path while importing, so
    # files in /app cannot shadow the kernel's own modules; IPython adds it back for user code.
    if sys.path[0] == "" or Path(sys.path[0]) == Path.cwd():
        del sys.path[0]

    from ipybox_server.kernel_app import IpyboxKernelApp, add_user_paths, prefer_as_oom_victim

    prefer_as_oom_victim()
    app = IpyboxKernelApp.instance()
    app.initialize(["-f", sys.argv[1]])
    add_user_paths()  # after the kernel's own imports and set-up
    # The first cell of a fresh IPython pays for lazy set-up (compiler, display hooks); pay it here.
    app.shell.run_cell("pass", store_history=False, silent=True)
    app.start()
