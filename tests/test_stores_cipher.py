"""StoreCipher: AES-256-GCM sealing bound to the store key, key ring, plaintext rules."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest

from stscreds.stores import StoreCipher, generate_key

KEY = "0" * 64


def test_seal_then_open_round_trips_and_hides_the_plaintext() -> None:
    cipher = StoreCipher([generate_key()])
    sealed = cipher.seal(KEY, b"secret-access-key")
    assert b"secret-access-key" not in sealed
    assert cipher.open(KEY, sealed) == b"secret-access-key"
    assert cipher.seal(KEY, b"x") != cipher.seal(KEY, b"x")  # a fresh nonce each time


def test_a_value_copied_under_another_key_does_not_open() -> None:
    cipher = StoreCipher([generate_key()])
    sealed = cipher.seal(KEY, b"credentials of identity A")
    assert cipher.open("1" * 64, sealed) is None


@pytest.mark.parametrize("position", [0, 1, 5, 17, -1])
def test_any_flipped_byte_makes_the_value_not_open(position: int) -> None:
    cipher = StoreCipher([generate_key()])
    sealed = bytearray(cipher.seal(KEY, b"payload"))
    sealed[position] ^= 0x01
    assert cipher.open(KEY, bytes(sealed)) is None


def test_truncated_or_empty_values_do_not_open() -> None:
    cipher = StoreCipher([generate_key()])
    sealed = cipher.seal(KEY, b"payload")
    for value in (b"", sealed[:1], sealed[:20], sealed[:-1]):
        assert cipher.open(KEY, value) is None


def test_key_ring_first_key_seals_every_key_opens() -> None:
    old, new = generate_key(), generate_key()
    sealed_by_old = StoreCipher([old]).seal(KEY, b"v1")
    ring = StoreCipher([new, old])
    assert ring.open(KEY, sealed_by_old) == b"v1"
    assert StoreCipher([old]).open(KEY, ring.seal(KEY, b"v2")) is None  # sealed with new
    assert StoreCipher([new]).open(KEY, sealed_by_old) is None  # old key dropped: a miss


def test_keys_as_bytes_or_base64_are_the_same_key() -> None:
    raw = base64.b64decode(generate_key())
    sealed = StoreCipher([raw]).seal(KEY, b"v")
    assert StoreCipher([base64.b64encode(raw).decode()]).open(KEY, sealed) == b"v"


def test_without_keys_it_refuses_unless_plaintext_is_allowed() -> None:
    with pytest.raises(ValueError, match="encryption_keys"):
        StoreCipher()
    plain = StoreCipher(allow_plaintext=True)
    assert not plain.encrypts
    assert plain.open(KEY, plain.seal(KEY, b"v")) == b"v"


def test_plaintext_is_never_accepted_once_keys_are_set() -> None:
    # Unauthenticated plaintext planted by whoever can write to the store must not be served,
    # even while allow_plaintext=True is left on during a migration to encryption.
    planted = StoreCipher(allow_plaintext=True).seal(KEY, b'{"attacker": true}')
    assert StoreCipher([generate_key()], allow_plaintext=True).open(KEY, planted) is None
    assert StoreCipher([generate_key()]).open(KEY, planted) is None


@pytest.mark.parametrize(
    "bad",
    [b"short", "not base64!", base64.b64encode(b"x" * 16).decode(), 12345],
)
def test_bad_keys_are_rejected_without_echoing_them(bad: object) -> None:
    with pytest.raises(ValueError, match=r"encryption_keys\[0\]") as info:
        StoreCipher([bad])  # type: ignore[list-item]
    assert str(bad) not in str(info.value)


def test_repr_shows_no_key_material() -> None:
    key = generate_key()
    assert key not in repr(StoreCipher([key]))
    assert repr(StoreCipher([key])) == "StoreCipher(keys=1, allow_plaintext=False)"


def test_generate_key_gives_distinct_256_bit_keys() -> None:
    keys = {generate_key() for _ in range(50)}
    assert len(keys) == 50
    assert all(len(base64.b64decode(k)) == 32 for k in keys)


NAMES = ("0" * 64, "f|" + "0" * 64, "arn:aws:iam::123456789012:role/app|alice", "")


def test_store_key_is_a_deterministic_64_hex_digest_per_key_ring() -> None:
    key = generate_key()
    cipher = StoreCipher([key])
    for name in NAMES:
        digest = cipher.store_key(name)
        assert re.fullmatch(r"[0-9a-f]{64}", digest), name
        assert cipher.store_key(name) == digest  # deterministic
        assert StoreCipher([key]).store_key(name) == digest  # another worker, same ring
    assert len({cipher.store_key(name) for name in NAMES}) == len(NAMES)  # names differ


def test_store_key_depends_on_the_first_key_only() -> None:
    first, second, other = generate_key(), generate_key(), generate_key()
    ring = StoreCipher([first])
    for name in NAMES:
        # Other first keys: other names, so a store's names reveal nothing across deployments.
        assert StoreCipher([other]).store_key(name) != ring.store_key(name)
        assert StoreCipher([second, first]).store_key(name) != ring.store_key(name)
        # The same first key, whatever follows it, or however it is written: the same names.
        assert StoreCipher([first, second]).store_key(name) == ring.store_key(name)
        assert StoreCipher([first, other, second]).store_key(name) == ring.store_key(name)
        raw = base64.b64decode(first)
        assert StoreCipher([raw]).store_key(name) == ring.store_key(name)


def test_store_key_is_never_the_plain_sha256_of_the_name() -> None:
    # A plain digest of a role ARN or tenant name can be reversed with a word list.
    for cipher in (StoreCipher([generate_key()]), StoreCipher(allow_plaintext=True)):
        for name in NAMES:
            digest = cipher.store_key(name)
            assert digest != hashlib.sha256(name.encode()).hexdigest(), name
            assert digest != name


def test_a_keyless_cipher_still_names_by_a_digest() -> None:
    plain = StoreCipher(allow_plaintext=True)
    for name in NAMES:
        digest = plain.store_key(name)
        assert re.fullmatch(r"[0-9a-f]{64}", digest), name
        assert StoreCipher(allow_plaintext=True).store_key(name) == digest
    assert plain.store_key(NAMES[0]) != StoreCipher([generate_key()]).store_key(NAMES[0])
