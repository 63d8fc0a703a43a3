"""The tooling's own named queries (queries.sql beside this module), in the runtime's format."""

from __future__ import annotations

from functools import cache
from typing import LiteralString

from paystream.store.queries import named_queries


@cache
def _all() -> dict[str, LiteralString]:
    return named_queries("paystream_tooling", "queries.sql")


def query(name: str) -> LiteralString:
    """The text of the named query. Raises KeyError for a name queries.sql does not define."""
    return _all()[name]
