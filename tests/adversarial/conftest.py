"""The adversarial suite runs against real containers, with the integration suite's fixtures."""

from tests.integration.conftest import (  # noqa: F401  (fixtures are found by name)
    _engine_and_image_present,
    client,
    image,
    make_container,
    plain_server,
    shared_container,
)
