import pytest


# taskq runs on asyncio; anyio's pytest plugin (installed with taskq) runs
# the async tests and fixtures.
@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"
