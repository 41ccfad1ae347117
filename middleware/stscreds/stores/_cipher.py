"""Encryption at rest for shared stores: AES-256-GCM with a key ring."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["StoreCipher", "generate_key"]

_SEALED, _PLAIN = b"\x01", b"\x00"
_KEY_ID_LEN, _NONCE_LEN = 4, 12


def generate_key() -> str:
    """A new random 256-bit store encryption key, base64-encoded."""
    return base64.b64encode(AESGCM.generate_key(bit_length=256)).decode()


def _decode_key(key: bytes | str, index: int) -> bytes:
    if isinstance(key, str):
        try:
            raw = base64.b64decode(key.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"encryption_keys[{index}]: not valid base64") from None
    elif isinstance(key, bytes | bytearray):
        raw = bytes(key)
    else:
        raise ValueError(f"encryption_keys[{index}]: must be bytes or a base64 string")
    if len(raw) != 32:
        raise ValueError(f"encryption_keys[{index}]: must be 32 bytes (AES-256)")
    return raw


class StoreCipher:
    """Seals store values with the first key and opens them with any key of the ring.

    Associated data binds each value to its store key, so a value copied under another key
    fails to open. Without keys it refuses to exist unless ``allow_plaintext=True``.
    """

    __slots__ = ("_names", "_ring", "allow_plaintext")

    def __init__(
        self, keys: Sequence[bytes | str] | None = None, *, allow_plaintext: bool = False
    ) -> None:
        if isinstance(keys, bytes | str):
            keys = [keys]
        keys = list(keys or [])
        if not keys and not allow_plaintext:
            raise ValueError(
                "encryption_keys: a shared store needs at least one key "
                "(stscreds.stores.generate_key()), or allow_plaintext=True"
            )
        ring: list[tuple[bytes, AESGCM]] = []
        for index, key in enumerate(keys):
            raw = _decode_key(key, index)
            # A short public fingerprint picks the key on open; it reveals nothing of the key.
            ring.append(
                (hashlib.sha256(b"stscreds-key-id" + raw).digest()[:_KEY_ID_LEN], AESGCM(raw))
            )
        self._ring = ring
        self.allow_plaintext = allow_plaintext
        # Store key names are keyed digests: a digest of a tenant name or role ARN alone can
        # be reversed with a word list. Derived from the first (newest) key, so all values
        # under one set of names are sealed with one key; a rotation renames them once.
        first = _decode_key(keys[0], 0) if keys else b""
        self._names = hmac.new(first, b"stscreds/store-key-names/v1", hashlib.sha256).digest()

    @property
    def encrypts(self) -> bool:
        """True when values are encrypted (there is at least one key)."""
        return bool(self._ring)

    def store_key(self, name: str) -> str:
        """The key under which ``name`` is kept in the store: an HMAC under a key derived
        from the encryption keys, so names reveal nothing to someone who can list keys."""
        return hmac.new(self._names, name.encode(), hashlib.sha256).hexdigest()

    def seal(self, key: str, plaintext: bytes) -> bytes:
        """Encrypt ``plaintext`` for storage under ``key``."""
        if not self._ring:
            return _PLAIN + plaintext
        key_id, aead = self._ring[0]
        nonce = os.urandom(_NONCE_LEN)
        return _SEALED + key_id + nonce + aead.encrypt(nonce, plaintext, _aad(key))

    def open(self, key: str, value: bytes) -> bytes | None:
        """The plaintext of ``value`` stored under ``key``, or None if it does not open."""
        if value[:1] == _PLAIN:
            # Plaintext is unauthenticated: with keys configured, anyone who can write to the
            # store could plant credentials that way. Only a keyless store reads it.
            return value[1:] if self.allow_plaintext and not self._ring else None
        if value[:1] != _SEALED or len(value) < 1 + _KEY_ID_LEN + _NONCE_LEN + 16:
            return None
        key_id = value[1 : 1 + _KEY_ID_LEN]
        nonce = value[1 + _KEY_ID_LEN : 1 + _KEY_ID_LEN + _NONCE_LEN]
        for candidate_id, aead in self._ring:
            if candidate_id == key_id:
                try:
                    return aead.decrypt(nonce, value[1 + _KEY_ID_LEN + _NONCE_LEN :], _aad(key))
                except InvalidTag:
                    return None
        return None

    def __repr__(self) -> str:
        return f"StoreCipher(keys={len(self._ring)}, allow_plaintext={self.allow_plaintext})"


def _aad(key: str) -> bytes:
    return b"stscreds/store/v1|" + key.encode()
