"""The host's npm registry, passed into the image build as `/usr/local/etc/npmrc`, and npm's CA file.

`npx -y some-server` in a cell or as an MCP server fetches from npm's registry; behind a mirror the image
needs the host's. We ask the host's npm (`npm config get registry cafile`) and fall back to the public
registry when there is no npm or no answer. Certificates come from the image's system store, which holds
the host's CA bundles: pip's (see pip_settings) and npm's `cafile` when it names another file (a proxy
that only npm is configured for).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

from .pip_settings import CA_BUNDLE_IN_IMAGE

logger = logging.getLogger(__name__)

PUBLIC_NPM_REGISTRY = "https://registry.npmjs.org/"


def read_npm_registry() -> str:
    """The host's npm registry URL (http(s) only), else `PUBLIC_NPM_REGISTRY`."""
    return read_npm_settings()[0]


def read_npm_settings() -> tuple[str, Path | None]:
    """The host's npm registry (as `read_npm_registry`) and its `cafile` when that is an existing file."""
    npm = shutil.which("npm")
    if npm is None:
        return PUBLIC_NPM_REGISTRY, None
    try:
        result = subprocess.run(
            [npm, "config", "get", "registry", "cafile"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        logger.debug("npm config get failed, using the public registry: %s", exc)
        return PUBLIC_NPM_REGISTRY, None
    return npm_settings_from(result.stdout if result.returncode == 0 else "")


def npm_settings_from(output: str) -> tuple[str, Path | None]:
    """Registry and CA file of `npm config get registry cafile` output (`key=value` lines)."""
    values = dict(line.split("=", 1) for line in output.splitlines() if "=" in line)
    cafile = values.get("cafile", "").strip()
    path = Path(cafile) if cafile.startswith("/") else None
    return npm_registry_from(values.get("registry", "")), path if path is not None and path.is_file() else None


def npm_registry_from(output: str) -> str:
    """The registry of `npm config get registry` output; the public one unless it is an http(s) URL."""
    value = output.strip()
    if not value.startswith(("http://", "https://")) or any(c.isspace() for c in value):
        return PUBLIC_NPM_REGISTRY
    return value if value.endswith("/") else value + "/"


NPM_GLOBAL_PREFIX = "/opt/ipybox/npm-global"
"""Where `npm install -g` puts packages: owned by the sandbox user, its `bin` on PATH (Dockerfile)."""


def render_npmrc(registry: str) -> str:
    """The image's global npmrc, `/usr/local/etc/npmrc`: npm finds it from node's own prefix (/usr/local),
    so the `prefix` set in it moves global installs without moving the file."""
    return "\n".join(
        [
            "; ipybox: the host's npm registry and the image's CA store. Written by `ipybox build`.",
            f"registry={registry}",
            f"cafile={CA_BUNDLE_IN_IMAGE}",
            "; global installs (npm install -g) into a directory the sandbox user owns: no root needed",
            f"prefix={NPM_GLOBAL_PREFIX}",
            "update-notifier=false",
            "fund=false",
            "audit=false",
            "",
        ]
    )
