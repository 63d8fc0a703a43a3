"""Text from peers (record fields, headers, HTTP answers), made safe to store, log and show.

PostgreSQL text cannot hold U+0000 at all, and the other control characters rewrite terminals,
split log lines and hide what an operator reads; none belongs in an identifier.
"""

from __future__ import annotations

import re

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # Unicode's Cc: C0, DEL and C1


def control_at(text: str) -> int | None:
    """The position of the first control character in `text`, or None if it holds none."""
    if text.isascii() and text.isprintable():  # the common case, without the regex
        return None
    found = _CONTROL.search(text)
    return None if found is None else found.start()


def visible(text: str) -> str:
    """`text` with each control character written as its escape (`\\u0000`): printable, and
    storable in any text column."""
    if control_at(text) is None:
        return text
    return _CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def codepoint(char: str) -> str:
    """How a description names a character without writing it: `U+0000`."""
    return f"U+{ord(char):04X}"
