"""Fixtures for decode tests; the pairs themselves are built in spec_pairs.py."""

import pytest
from spec_pairs import _target, make_draft


@pytest.fixture(scope="session")
def plain_target():
    return _target(seed=0)


@pytest.fixture(scope="session")
def bigram_target():
    return _target(seed=3, bigram=True)


@pytest.fixture(scope="session")
def draft_factory():
    return make_draft
