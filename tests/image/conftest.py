"""Fixtures of the image tests (marker `image`, `make test-image`): the engine and the built image.
They fail, not skip, when the image is missing: `make test-image` builds it first."""

from __future__ import annotations

import pytest

from tests.image.engine import IMAGE, Engine


@pytest.fixture(scope="session")
def engine() -> Engine:
    return Engine()


@pytest.fixture(scope="session")
def image(engine) -> str:
    found = engine("image", "inspect", IMAGE, check=False)
    assert found.returncode == 0, f"no image {IMAGE}: build it with `make image` (ERW_TEST_IMAGE names another)"
    return IMAGE
