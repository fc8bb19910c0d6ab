"""Fixtures of the REST API tests."""

from tests.support.api import generous_rates

__all__ = ["generous_rates"]  # a fixture: pytest finds it by name in this conftest
