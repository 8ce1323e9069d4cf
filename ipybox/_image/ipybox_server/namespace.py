"""Kernel side of snapshots: this kernel's user namespace, pickled (`capture`) and loaded (`restore`).

Imported in the kernel (the user interpreter) by the silent requests of `ipybox.snapshot`; stdlib and the
vendored cloudpickle only (`ipybox_server._vendor.cloudpickle`, so the reconstructors a pickle names are
the same code in every sandbox of the image, whatever the user installs or uninstalls).

The user namespace is `shell.user_ns` minus IPython's own names (`user_ns_hidden`: In, Out, exit,
get_ipython, ...) minus names starting with `_`. Modules are recorded by name and imported again on
restore. Everything else goes into ONE pickle of the `{name: value}` dict, so values shared between
names stay shared (`alias is df` holds after a restore). What cannot travel is left out and named with
the reason: by type first (generators and coroutines, open files, sockets, threads, locks: they would
not mean the same thing elsewhere, or not pickle at all), then, only when the one dump fails, each value
alone into a byte-counting sink to name the culprits, and the survivors in one more dump.

The request that runs `capture`/`restore` stores its report here; `report()` returns it as hex of JSON,
which the host reads from the reply's user expression (hex survives IPython's repr unchanged).
"""

from __future__ import annotations

import errno
import importlib
import importlib.metadata
import io
import json
import os
import pickle
import shutil
import socket
import sys
import threading
import time
import types
from typing import Any

from ipybox_server._vendor import cloudpickle

PROTOCOL = 5
_MAX_NAMES = 10_000
_LOCK_TYPES = (type(threading.Lock()), type(threading.RLock()))

_report: dict[str, Any] = {}


class _Count(io.RawIOBase):
    """A sink that only counts bytes: pickling a value alone tells whether it pickles, without memory."""

    def __init__(self) -> None:
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        size = memoryview(data).nbytes
        self.size += size
        return size


def report() -> str:
    """The last capture's or restore's report, as hex of its JSON."""
    return json.dumps(_report, ensure_ascii=True).encode().hex()


def _shell() -> Any:
    from IPython import get_ipython

    shell = get_ipython()
    if shell is None:
        raise RuntimeError("not running in an IPython kernel")
    return shell


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


def _refused(value: Any) -> str | None:
    if isinstance(value, types.GeneratorType | types.CoroutineType | types.AsyncGeneratorType):
        return f"{type(value).__name__}: a running frame cannot be captured"
    if isinstance(value, socket.socket):
        return "socket: an open connection cannot be captured (connect again after the restore)"
    if isinstance(value, io.IOBase):
        state = "a closed file object" if value.closed else "an open file"
        return f"{type(value).__name__}: {state} cannot be captured (open it again after the restore)"
    if isinstance(value, threading.Thread):
        return "Thread: a running thread cannot be captured (start it again after the restore)"
    if isinstance(value, _LOCK_TYPES):
        return f"{type(value).__name__}: a lock cannot be captured (its holder is not in the snapshot)"
    return None


def _dump(values: dict[str, Any], path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with open(fd, "wb") as out:
        cloudpickle.dump(values, out, protocol=PROTOCOL)


def capture(path: str, not_after: float) -> None:
    """Pickle the user namespace into `path` (its directory is made, 0700); the report goes to `report()`.

    `not_after`: a wall-clock time after which the request is stale (the host gave up waiting while it
    was queued behind a running cell): then nothing is written.
    """
    global _report
    _report = {}
    if time.time() > not_after:
        raise TimeoutError("the snapshot request waited too long behind a running cell; the host gave up on it")
    started = time.perf_counter()
    shell = _shell()
    hidden = shell.user_ns_hidden
    namespace = shell.user_ns
    names = [name for name in namespace if not name.startswith("_") and name not in hidden]
    modules = {name: namespace[name].__name__ for name in names if isinstance(namespace[name], types.ModuleType)}
    values = {name: namespace[name] for name in names if name not in modules}
    skipped: dict[str, str] = {}
    for name, value in list(values.items()):
        if (reason := _refused(value)) is not None:
            skipped[name] = reason
            del values[name]
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    mode = "one pass"
    try:
        _dump(values, path)
    except OSError as exc:
        _discard(path)
        if exc.errno == errno.ENOSPC:
            raise OSError(
                exc.errno,
                "No space left in /app for the namespace's pickle: a snapshot writes it there first "
                "(as big as the namespace; raise ExecutionContainer(app_size=...) or free room)",
            ) from exc
        raise
    except Exception:
        mode = "per variable"
        for name, value in list(values.items()):
            try:
                cloudpickle.dump(value, _Count(), protocol=PROTOCOL)
            except Exception as exc:  # anything a value's reducer raises names that value
                skipped[name] = _why(exc)
                del values[name]
        try:
            _dump(values, path)
        except BaseException:
            _discard(path)
            raise
    _report = {
        "captured": sorted(values)[:_MAX_NAMES],
        "modules": dict(list(modules.items())[:_MAX_NAMES]),
        "distributions": _distributions(),
        "skipped": dict(list(skipped.items())[:_MAX_NAMES]),
        "mode": mode,
        "python": sys.version.split()[0],
        "cloudpickle": cloudpickle.__version__,
        "execution_count": shell.execution_count,
        "seconds": round(time.perf_counter() - started, 3),
    }


def _distributions() -> dict[str, str]:
    """`{distribution: version}` of the installed distributions whose top-level modules this kernel has
    imported: what a restore needs installed (named in its error when a module is missing)."""
    try:
        providers = importlib.metadata.packages_distributions()
    except Exception:  # a broken distribution's metadata must not cost the snapshot
        return {}
    found: dict[str, str] = {}
    for top in sorted({name.partition(".")[0] for name in list(sys.modules)}):
        for dist in providers.get(top, []):
            if dist not in found:
                try:
                    found[dist] = importlib.metadata.version(dist)
                except Exception:
                    continue
    return dict(list(found.items())[:_MAX_NAMES])


def _install_hint(module: str, distributions: dict[str, str]) -> str:
    """What to install for a missing `module`, from the snapshot's record of its kernel's distributions."""
    top = module.partition(".")[0]
    named = [f"{d}=={v}" for d, v in distributions.items() if d.lower().replace("-", "_") == top.lower()]
    if named:
        return f"the snapshot's kernel had it from {named[0]}: `pip install {named[0]}` here"
    if distributions:
        listed = " ".join(f"{d}=={v}" for d, v in distributions.items())
        return f"the snapshot's kernel had these distributions imported: {listed}"
    return "install it here"


def restore(path: str, modules_hex: str, distributions_hex: str = "") -> None:
    """Import the modules, load the pickle at `path`, then put everything into the user namespace.

    All or nothing: nothing is added to the namespace unless every module imports and the pickle loads.
    The pickle's directory is removed in either case. `distributions_hex`: the snapshot's record of the
    kernel's distributions (`{name: version}`, JSON, hex), named in the error when a module is missing.
    """
    global _report
    _report = {}
    started = time.perf_counter()
    distributions: dict[str, str] = json.loads(bytes.fromhex(distributions_hex)) if distributions_hex else {}
    missing_hint = (
        "Packages installed with pip in the old sandbox are not part of a snapshot: install them in this one "
        "(or build them into the image) and restore again"
    )
    try:
        shell = _shell()
        wanted: dict[str, str] = json.loads(bytes.fromhex(modules_hex))
        imported = {}
        for alias, name in wanted.items():
            try:
                imported[alias] = importlib.import_module(name)
            except Exception as exc:
                raise ImportError(
                    f"module {name!r} (as {alias!r}) of the snapshot cannot be imported here: {_why(exc)}; "
                    f"{_install_hint(name, distributions)}. {missing_hint}"
                ) from exc
        try:
            with open(path, "rb") as source:
                values = pickle.load(source)
        except ModuleNotFoundError as exc:  # a value's class lives in a module this sandbox lacks
            raise ImportError(
                f"a value of the snapshot needs module {exc.name!r}, which is not installed here; "
                f"{_install_hint(exc.name or '', distributions)}. {missing_hint}"
            ) from exc
        if not isinstance(values, dict):
            raise TypeError(f"the snapshot's pickle holds a {type(values).__name__}, not a namespace")
    finally:
        _discard(os.path.dirname(path))
    shell.user_ns.update(imported)
    shell.user_ns.update(values)
    _report = {"restored": len(values), "modules": len(imported), "seconds": round(time.perf_counter() - started, 3)}


def discard(directory: str) -> None:
    """Remove a snapshot's temp directory (after the host fetched its pickles)."""
    _discard(directory)


def _discard(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass
