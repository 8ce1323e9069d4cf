"""Docker label keys that mark what ipybox builds and starts.

Images and containers carry these so that `ipybox cleanup` and the container start-up can find them
without relying on names.
"""

IMAGE_LABEL = "ai.gradion.ipybox.image"
"""Present (value "true") on every image `ipybox build` produces."""

VERSION_LABEL = "ai.gradion.ipybox.version"
"""The ipybox package version that built the image or started the container."""

UID_LABEL = "ai.gradion.ipybox.uid"
"""UID the image's processes run as (0 for a root image)."""

GID_LABEL = "ai.gradion.ipybox.gid"
"""GID the image's processes run as (0 for a root image)."""

CONTAINER_LABEL = "ai.gradion.ipybox.container"
"""Present (value "true") on every container ExecutionContainer starts."""

HELPER_LABEL = "ai.gradion.ipybox.helper"
"""On a short-lived helper container (value: its job, e.g. "firewall"), beside CONTAINER_LABEL so that
`ipybox cleanup` finds it; it does not carry the sandbox's own labels, so listings by those count
sandboxes only. HELPER_OF_LABEL names the sandbox's container id."""

HELPER_OF_LABEL = "ai.gradion.ipybox.helper-of"

IDLE_TIMEOUT_LABEL = "ai.gradion.ipybox.idle-timeout"
"""A sandbox's `idle_timeout` in seconds (absent: none)."""

MAX_LIFETIME_LABEL = "ai.gradion.ipybox.max-lifetime"
"""A sandbox's `max_lifetime` in seconds (absent: none)."""

EXPIRES_LABEL = "ai.gradion.ipybox.expires"
"""Unix time at which a sandbox with `max_lifetime` ends itself (for a reaper of paused or wedged ones)."""

WORKSPACE_LABEL = "ai.gradion.ipybox.workspace"
"""On a named volume ipybox created for `workspace=` (value "true"); on a sandbox, the workspace it mounts."""

OWNER_LABEL = "ai.gradion.ipybox.owner"
"""On an owner-bound sandbox: `<boot id>:<pid>` of the process that started it (it holds the lease)."""

EXECUTOR_PORT = 8888
"""Container port of the Jupyter Kernel Gateway."""

RESOURCE_PORT = 8900
"""Container port of the resource server."""

EXECUTOR_SOCKET = "/run/ipybox/executor.sock"
"""Unix socket of the Kernel Gateway inside the container (besides its port); see ipybox._routes."""

RESOURCE_SOCKET = "/run/ipybox/resource.sock"
"""Unix socket of the resource server inside the container (besides its port)."""

TOKEN_PATH = "/run/ipybox/token"
"""Where the per-container secret is placed before start; the server reads and deletes it."""

READY_LINE = "IPYBOX_READY"
"""Printed on the container's stdout once both servers accept connections."""
