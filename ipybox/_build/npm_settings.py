"""The host's npm registry, passed into the image build as `/usr/local/etc/npmrc`.

`npx -y some-server` in a cell or as an MCP server fetches from npm's registry; behind a mirror the image
needs the host's. We ask the host's npm (`npm config get registry`) and fall back to the public registry
when there is no npm or no answer. Certificates come from the image's system store, which holds the host's
CA bundle (see pip_settings).
"""

from __future__ import annotations

import logging
import shutil
import subprocess

from .pip_settings import CA_BUNDLE_IN_IMAGE

logger = logging.getLogger(__name__)

PUBLIC_NPM_REGISTRY = "https://registry.npmjs.org/"


def read_npm_registry() -> str:
    """The host's npm registry URL (http(s) only), else `PUBLIC_NPM_REGISTRY`."""
    npm = shutil.which("npm")
    if npm is None:
        return PUBLIC_NPM_REGISTRY
    try:
        result = subprocess.run(
            [npm, "config", "get", "registry"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        logger.debug("npm config get registry failed, using the public registry: %s", exc)
        return PUBLIC_NPM_REGISTRY
    return npm_registry_from(result.stdout if result.returncode == 0 else "")


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
