"""Kept records' raw bytes at rest: sealed with AES-256-GCM when PAYSTREAM_KEPT_KEY_FILE is set.

The raw bytes of a kept record are the message as it arrived, card number included. With a key
file, they are sealed before they are written and opened only to be replayed. The file holds one
key a line (32 random bytes in base64: `openssl rand -base64 32`); the last line is the newest
and seals every new row, every line opens. To rotate, append a new key and restart every
instance; drop an old line once no row names it
(`SELECT count(*) FROM paystream.kept_records WHERE raw_key = 'KEY_ID'`).

Each sealed row names its key by an id derived from the key (never the key), and binds the
ciphertext to its record's identity, so a sealed value moved to another row does not open.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from paystream.errors import ConfigurationError, SealedRecordUnreadable
from paystream.model import RecordId

_NONCE_BYTES = 12


def key_id(key: bytes) -> str:
    """A key's public name: the start of its SHA-256, stored beside each row it sealed."""
    return hashlib.sha256(b"paystream kept key\0" + key).hexdigest()[:16]


def _context(record: RecordId) -> bytes:
    return f"{record.topic}\0{record.partition}\0{record.offset}\0{record.timestamp_ms}".encode()


@dataclass(frozen=True, slots=True)
class Sealed:
    key: str
    value: bytes


class KeptCipher:
    """Seals with the newest key; opens with whichever key a row names."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise ValueError("at least one key")
        self._ciphers = {key_id(k): AESGCM(k) for k in keys}
        self.newest = key_id(keys[-1])

    def __repr__(self) -> str:
        return f"KeptCipher(keys={sorted(self._ciphers)}, newest={self.newest!r})"

    @classmethod
    def from_file(cls, path: Path) -> KeptCipher:
        """Read the key file, or say in one sentence what is wrong with it (never its content)."""
        where = f"PAYSTREAM_KEPT_KEY_FILE ({path})"
        try:
            lines = path.read_text().split()
        except OSError as exc:
            raise ConfigurationError(
                f"Cannot read {where}: {exc.strerror or type(exc).__name__}."
            ) from exc
        keys = []
        for number, line in enumerate(lines, start=1):
            try:
                key = base64.b64decode(line, validate=True)
            except binascii.Error:
                key = b""
            if len(key) != 32:
                raise ConfigurationError(
                    f"Key {number} of {where} is not 32 bytes in base64; make one with "
                    "`openssl rand -base64 32`."
                )
            keys.append(key)
        if not keys:
            raise ConfigurationError(f"{where} holds no key; add one (`openssl rand -base64 32`).")
        return cls(keys)

    def seal(self, record: RecordId, raw: bytes) -> Sealed:
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._ciphers[self.newest].encrypt(nonce, raw, _context(record))
        return Sealed(key=self.newest, value=nonce + sealed)

    def open(self, kept_id: int, record: RecordId, sealed: Sealed) -> bytes:
        cipher = self._ciphers.get(sealed.key)
        if cipher is None:
            raise SealedRecordUnreadable(
                f"Kept record {kept_id} is sealed with key {sealed.key}, which "
                "PAYSTREAM_KEPT_KEY_FILE does not hold; add that key to the file and try again."
            )
        nonce, body = sealed.value[:_NONCE_BYTES], sealed.value[_NONCE_BYTES:]
        try:
            return cipher.decrypt(nonce, body, _context(record))
        except InvalidTag as exc:
            raise SealedRecordUnreadable(
                f"Kept record {kept_id} does not open with key {sealed.key}: the row was "
                "altered or copied from another record; it is left as it is."
            ) from exc


def open_raw(
    cipher: KeptCipher | None, kept_id: int, record: RecordId, raw: bytes | None, key: str | None
) -> bytes | None:
    """A kept row's raw bytes as they arrived, opening them if they were sealed."""
    if raw is None or key is None:
        return raw
    if cipher is None:
        raise SealedRecordUnreadable(
            f"Kept record {kept_id} is sealed with key {key}; set PAYSTREAM_KEPT_KEY_FILE to a "
            "file holding that key to replay it."
        )
    return cipher.open(kept_id, record, Sealed(key=key, value=raw))
