"""Every op test runs with its outputs poisoned (see tests.ops.cases.poisoned)."""
import pytest

from tests.ops.cases import poisoned


@pytest.fixture(autouse=True)
def poison():
    with poisoned():
        yield
