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


def render_npmrc(registry: str) -> str:
    """The image's global npmrc (npm's prefix is /usr/local)."""
    return "\n".join(
        [
            "; ipybox: the host's npm registry and the image's CA store. Written by `ipybox build`.",
            f"registry={registry}",
            f"cafile={CA_BUNDLE_IN_IMAGE}",
            "update-notifier=false",
            "fund=false",
            "audit=false",
            "",
        ]
    )
