"""Assembling the Docker build context: a deterministic tar of the Dockerfile and its inputs.

Same inputs give the same bytes (sorted entries, fixed mtime/owner/mode), so the legacy builder's layer
cache hits on every unchanged `COPY` and a no-change rebuild takes seconds.
"""

from __future__ import annotations

import gzip
import io
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from .._errors import BuildError
from .._version import __version__
from .npm_settings import PUBLIC_NPM_REGISTRY, render_npmrc
from .pip_settings import PipSettings, render_pip_conf, render_uv_toml
from .user import SandboxUser

IMAGE_DIR = Path(__file__).resolve().parent.parent / "_image"
"""Holds the Dockerfile, its requirement files and the ipybox_server package."""

IMAGE_FILES = ("Dockerfile", "requirements-core.txt", "requirements-user.txt", "tools.txt", "kernel-constraints.txt")
"""Files of `IMAGE_DIR` copied into the context as they are."""

SERVER_PACKAGE = "ipybox_server"


def build_args(base_image: str, user: SandboxUser) -> dict[str, str]:
    """The Dockerfile's `ARG` values."""
    return {
        "BASE_IMAGE": base_image,
        "IPYBOX_UID": str(user.uid),
        "IPYBOX_GID": str(user.gid),
        "IPYBOX_HOME": user.home,
        "IPYBOX_VERSION": __version__,
    }


def context_files(
    requirements: Sequence[str],
    pip: PipSettings,
    image_dir: Path = IMAGE_DIR,
    npm_registry: str = PUBLIC_NPM_REGISTRY,
    npm_cafile: Path | None = None,
) -> dict[str, bytes]:
    """Maps each path in the build context to its content.

    `host/` holds the configuration files rendered from the host's settings: pip.conf, uv.toml, npmrc and,
    when pip or npm names one, the CA bundle (ca.pem: pip's, then npm's if it is another file; the image
    adds the certificates its store lacks, so one in both counts once).

    Raises:
        BuildError: a file of the image directory (or the CA bundle) cannot be read.
    """
    try:
        files = {name: (image_dir / name).read_bytes() for name in IMAGE_FILES}
        constraints = kernel_constraints(files["kernel-constraints.txt"].decode())
        files["dependencies.txt"] = "".join(f"{r}\n" for r in requirements).encode()
        files["host/pip.conf"] = render_pip_conf(pip).encode()
        files["host/uv.toml"] = render_uv_toml(pip, constraints).encode()
        files["host/npmrc"] = render_npmrc(npm_registry).encode()
        bundles = [pip.cert] if pip.cert is not None else []
        if npm_cafile is not None and npm_cafile not in bundles:
            bundles.append(npm_cafile)
        if bundles:
            files["host/ca.pem"] = b"\n".join(bundle.read_bytes().rstrip(b"\n") + b"\n" for bundle in bundles)
        for path in _server_files(image_dir / SERVER_PACKAGE):
            files[path.relative_to(image_dir).as_posix()] = path.read_bytes()
    except OSError as exc:
        raise BuildError(f"Cannot assemble the build context: {exc}") from exc
    return files


def kernel_constraints(text: str) -> list[str]:
    """The requirement lines of kernel-constraints.txt (comments and blank lines dropped)."""
    return [line.split("#", 1)[0].strip() for line in text.splitlines() if line.split("#", 1)[0].strip()]


def _server_files(root: Path) -> Iterator[Path]:
    if not root.is_dir():
        raise BuildError(f"The server package is missing: {root}")
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).parts
        # Bytecode is compiled inside the image; host caches would only make the context non-deterministic.
        if any(part == "__pycache__" or part.startswith(".") for part in relative) or path.suffix == ".pyc":
            continue
        if path.is_file():
            yield path


def context_tar(files: dict[str, bytes]) -> bytes:
    """A gzipped tar of `files`, byte-identical for identical input.

    Every parent directory gets its own entry, and `ipybox_server/` is always present, so `COPY` of an
    empty server package still works.
    """
    directories = {SERVER_PACKAGE}
    for name in files:
        parts = name.split("/")[:-1]
        directories.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name in sorted(directories | set(files)):
            info = tarfile.TarInfo(name)
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            if name in files:
                info.mode = 0o644
                info.size = len(files[name])
                tar.addfile(info, io.BytesIO(files[name]))
            else:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
    return gzip.compress(buffer.getvalue(), mtime=0)
