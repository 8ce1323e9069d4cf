"""Building ipybox images (`ipybox build`).

`build_image` assembles a deterministic context from `ipybox/_image` (Dockerfile, core requirements,
server package), the user's dependencies and the host's pip settings, and builds it with the engine's
builder. See docs/build.md.
"""

from .base_image import DEFAULT_BASE_IMAGE, LOCAL_BASE_IMAGE
from .builder import BASE_IMAGE_ENV, build_image, default_base_image
from .events import BuildEvent

__all__ = [
    "BASE_IMAGE_ENV",
    "DEFAULT_BASE_IMAGE",
    "LOCAL_BASE_IMAGE",
    "BuildEvent",
    "build_image",
    "default_base_image",
]
