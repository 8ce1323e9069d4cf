"""The kernelspec's entry point: `<user python> -I -m ipybox_server.kernel_launcher -f CONNECTION_FILE`.

ipykernel_launcher with ipybox's application (`kernel_app.IpyboxKernelApp`).
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    # As ipykernel_launcher does: keep the working directory off sys.path while importing, so files
    # in /app cannot shadow the kernel's own modules; IPython adds it back for user code.
    if sys.path[0] == "" or Path(sys.path[0]) == Path.cwd():
        del sys.path[0]

    from ipybox_server.kernel_app import IpyboxKernelApp, add_user_paths, prefer_as_oom_victim

    prefer_as_oom_victim()
    app = IpyboxKernelApp.instance()
    app.initialize()
    add_user_paths()  # after the kernel's own imports and set-up
    app.start()
