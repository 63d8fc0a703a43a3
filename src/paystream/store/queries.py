"""The named queries of the .sql files beside this module, read once, and how lists reach them.

A file holds queries one after another, each opened by a line `-- name --` and explained by the
comments under it. Queries take named parameters (`%(name)s`); none is ever built from strings.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from enum import Enum
from functools import cache
from importlib import resources
from typing import Any, LiteralString, TypeVar, cast, get_args, get_type_hints

import orjson
import psycopg
import psycopg_pool
from psycopg import AsyncConnection
from psycopg.rows import AsyncRowFactory, RowMaker, TupleRow

from paystream.errors import named
from paystream.text import visible

DATABASE_ERRORS = (psycopg.Error, psycopg_pool.PoolTimeout)
"""Whatever a call to the database raises. What one means is told by what the database does
(`away`, and the batch's write in paystream.pipeline), never by its class: psycopg raises a
value too wide for an index as an OperationalError and a read-only server as an InternalError.
Where no record is being written (positions, stamps, reports, watching), each means: not now,
retry later."""


def away(exc: BaseException) -> bool:
    """Whether the database, rather than the statement, failed: no connection came from the
    pool, or the connection broke (psycopg raises that with no SQLSTATE). An error with a
    SQLSTATE came from a server that answered, whatever its code says: a trigger can raise
    08006 or 57P01 as well as a server shutting down. Which it was, the write's probe tells
    (paystream.pipeline): a server that is going away does not take the probe either."""
    if isinstance(exc, psycopg_pool.PoolTimeout):
        return True
    if not isinstance(exc, psycopg.Error):
        return False
    state = exc.sqlstate
    if state is None:
        # A value the driver refuses to send (a NUL in text) is a DataError with no SQLSTATE
        # either; a lost connection is an OperationalError or an InterfaceError.
        return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
    return False


async def leave_refusing_server(
    pool: psycopg_pool.AsyncConnectionPool, exc: BaseException | None = None
) -> None:
    """Renew the pool's connections after a server that answers refused a write (`exc`, or the
    driver's error it wraps; None: the server said it takes no writes). They may lead to a
    server that no longer takes writes (a demoted primary, a standby) while the URL names
    another that does (its next host, with target_session_attrs=read-write): libpq chooses the
    host only when it opens a connection. An error from no server (`away`) leaves them."""
    if exc is not None:
        cause = exc if isinstance(exc, psycopg.Error) else exc.__cause__
        if not isinstance(cause, psycopg.Error) or away(cause):
            return
    await pool.drain()


_REFUSAL_CHARS = 300
"""The server's message in a description is cut to this: a trigger's may be of any length."""


def refusal(exc: psycopg.Error, conceal: str | None = None) -> str:
    """What the server said when it refused a statement, in words safe to keep and send: the
    error's class and SQLSTATE (`errors.named`) and the server's primary message, escaped, cut
    to a line, and with `conceal` (a card number the statement carried) written as `[card]`."""
    message = exc.diag.message_primary or str(exc).strip().partition("\n")[0]
    if conceal:
        message = message.replace(conceal, "[card]")
    words = visible(message)[:_REFUSAL_CHARS]
    return f"{named(exc)}: {words}"


Conn = AsyncConnection[TupleRow]
Row = TypeVar("Row")

_FILES = (
    "batch.sql",
    "kept.sql",
    "positions.sql",
    "reports.sql",
    "retention.sql",
    "session.sql",
)
_HEADER = re.compile(r"^-- ([a-z_]+) --$", re.MULTILINE)


def named_queries(package: str, *files: str) -> dict[str, LiteralString]:
    """Every query of the package's .sql files, by name. Raises ValueError for a name given
    twice."""
    found: dict[str, LiteralString] = {}
    for name in files:
        text = (resources.files(package) / name).read_text()
        parts = _HEADER.split(text)  # [preamble, name, body, name, body, ...]
        for query, body in zip(parts[1::2], parts[2::2], strict=True):
            if query in found:
                raise ValueError(f"query {query} is named twice ({name})")
            # The files are part of the package, never input: a literal as much as a string in
            # the source would be.
            found[query] = cast(LiteralString, body.strip())
    return found


@cache
def _all() -> dict[str, LiteralString]:
    return named_queries("paystream.store", *_FILES)


def query(name: str) -> LiteralString:
    """The text of the named query. Raises KeyError for a name no file defines."""
    return _all()[name]


def json(rows: object) -> str:
    """Lists travel as one JSON document that SQL unpacks with json_to_recordset: orjson encodes
    it in C, where psycopg would build each array element in Python (a quarter of the
    processor's time when profiled)."""
    return orjson.dumps(rows).decode()


def typed_row(cls: type[Row]) -> AsyncRowFactory[Row]:
    """A row factory making a dataclass by column name (as psycopg's class_row does), with each
    field typed as an enum made from its column's text: a value the enum does not know raises
    ValueError rather than travelling on as a string."""
    hints = get_type_hints(cls)
    enums: dict[str, type[Enum]] = {}
    for field in dataclasses.fields(cast(Any, cls)):
        for option in get_args(hints[field.name]) or (hints[field.name],):
            if isinstance(option, type) and issubclass(option, Enum):
                enums[field.name] = option

    def factory(cursor: Any) -> RowMaker[Row]:
        names = [column.name for column in cursor.description or ()]
        made: list[Callable[[Any], Any] | None] = [enums.get(name) for name in names]

        def make(values: Sequence[Any]) -> Row:
            return cls(
                **{
                    name: value if to is None or value is None else to(value)
                    for name, to, value in zip(names, made, values, strict=True)
                }
            )

        return make

    return factory


async def fetch_all(
    conn: Conn,
    row: AsyncRowFactory[Row],
    name: str,
    params: Mapping[str, object] | None = None,
) -> list[Row]:
    """Every row of the named query, each made by `row` (a psycopg row factory)."""
    cursor = conn.cursor(row_factory=row)
    await cursor.execute(query(name), params)
    return await cursor.fetchall()


async def fetch_one(
    conn: Conn,
    row: AsyncRowFactory[Row],
    name: str,
    params: Mapping[str, object] | None = None,
) -> Row | None:
    """The first row of the named query, made by `row`; None if there is none."""
    cursor = conn.cursor(row_factory=row)
    await cursor.execute(query(name), params)
    return await cursor.fetchone()
