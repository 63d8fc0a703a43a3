"""Sealing kept records' raw bytes: AES-GCM under rotating keys from a file."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from paystream.errors import ConfigurationError, SealedRecordUnreadable
from paystream.model import RecordId
from paystream.sealing import KeptCipher, key_id, open_raw

_RECORD = RecordId(topic="offline", partition=2, offset=41, timestamp_ms=1_700_000_000_000)
_RAW = b'{"payment_id": "p", "credit_card": "4111111111111111", "amount": 5}'


def _key_file(folder: Path, *keys: bytes) -> Path:
    path = folder / "kept.keys"
    path.write_text("".join(base64.b64encode(k).decode() + "\n" for k in keys))
    return path


def test_the_newest_key_seals_and_every_key_opens(tmp_path: Path) -> None:
    """After a rotation (a key appended), new rows are sealed with the new key, rows sealed with
    the old one still open, and neither holds the card number in clear."""
    old, new = os.urandom(32), os.urandom(32)
    sealed_before = KeptCipher.from_file(_key_file(tmp_path, old)).seal(_RECORD, _RAW)
    rotated = KeptCipher.from_file(_key_file(tmp_path, old, new))
    sealed_after = rotated.seal(_RECORD, _RAW)
    assert key_id(old) == sealed_before.key
    assert key_id(new) == sealed_after.key
    assert b"4111111111111111" not in sealed_before.value + sealed_after.value
    assert _RAW == rotated.open(1, _RECORD, sealed_before)
    assert _RAW == rotated.open(2, _RECORD, sealed_after)


def test_a_sealed_value_does_not_open_for_another_record() -> None:
    """A sealed value copied onto another row fails to open instead of replaying as that row."""
    cipher = KeptCipher([os.urandom(32)])
    sealed = cipher.seal(_RECORD, _RAW)
    elsewhere = RecordId(topic="offline", partition=2, offset=42, timestamp_ms=1_700_000_000_000)
    with pytest.raises(SealedRecordUnreadable, match="Kept record 9 does not open"):
        cipher.open(9, elsewhere, sealed)


def test_a_missing_key_is_one_sentence_naming_the_setting() -> None:
    """A row sealed with a key the file lacks, or a sealed row with no key file at all, says
    which key and which setting; a row stored in clear needs no key."""
    sealed = KeptCipher([os.urandom(32)]).seal(_RECORD, _RAW)
    other = KeptCipher([os.urandom(32)])
    with pytest.raises(SealedRecordUnreadable, match=f"key {sealed.key}, which PAYSTREAM_KEPT"):
        other.open(3, _RECORD, sealed)
    with pytest.raises(SealedRecordUnreadable, match="set PAYSTREAM_KEPT_KEY_FILE"):
        open_raw(None, 3, _RECORD, sealed.value, sealed.key)
    assert _RAW == open_raw(None, 3, _RECORD, _RAW, None)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "holds no key"),
        ("not base64 at all!\n", "Key 1 of PAYSTREAM_KEPT_KEY_FILE .* is not 32 bytes"),
        (base64.b64encode(b"short").decode(), "Key 1 of .* is not 32 bytes"),
    ],
)
def test_a_bad_key_file_is_a_configuration_error(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "kept.keys"
    path.write_text(content)
    with pytest.raises(ConfigurationError, match=message):
        KeptCipher.from_file(path)


def test_an_unreadable_key_file_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="Cannot read PAYSTREAM_KEPT_KEY_FILE"):
        KeptCipher.from_file(tmp_path / "missing.keys")


def test_keys_never_show_in_repr() -> None:
    key = os.urandom(32)
    cipher = KeptCipher([key])
    assert base64.b64encode(key).decode() not in repr(cipher)
    assert key.hex() not in repr(cipher)
    assert key_id(key) in repr(cipher)
