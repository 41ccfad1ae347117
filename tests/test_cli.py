"""Tests for stscreds.__main__: ``python -m stscreds keygen`` and ``jwks`` as real processes."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import jwt
import pytest

from stscreds._signing import SigningKey
from stscreds.stores import StoreCipher


def run_cli(*args: str | os.PathLike[str], umask: int | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m stscreds ARGS`` in a fresh interpreter, optionally under ``umask``."""
    command = [sys.executable, "-m", "stscreds", *map(str, args)]
    if umask is not None:
        command = ["sh", "-c", f'umask {umask:03o} && exec "$0" "$@"', *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def load_key(path: Path) -> SigningKey:
    return SigningKey.from_pem(path.read_bytes())


# --- keygen ----------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [None, 0o000, 0o022], ids=["inherited", "umask-000", "umask-022"])
def test_keygen_writes_a_key_readable_only_by_the_owner(tmp_path: Path, umask: int | None) -> None:
    out = tmp_path / "key.pem"
    result = run_cli("keygen", "--out", out, umask=umask)
    assert result.returncode == 0, result.stderr
    assert mode_of(out) == 0o600


def test_keygen_prints_the_kid_of_the_written_key(tmp_path: Path) -> None:
    out = tmp_path / "key.pem"
    result = run_cli("keygen", "--out", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n")
    assert result.stdout.strip() == load_key(out).kid
    assert result.stdout.count("\n") == 1
    assert load_key(out).alg == "RS256"


def test_keygen_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    out = tmp_path / "key.pem"
    out.write_text("precious existing content")
    result = run_cli("keygen", "--out", out)
    assert result.returncode == 1
    assert result.stdout == ""
    assert "--force" in result.stderr
    assert str(out) in result.stderr
    assert out.read_text() == "precious existing content"


def test_keygen_force_overwrites_and_tightens_mode(tmp_path: Path) -> None:
    out = tmp_path / "key.pem"
    out.write_text("old world-readable content that is longer than nothing")
    out.chmod(0o644)
    result = run_cli("keygen", "--out", out, "--force")
    assert result.returncode == 0, result.stderr
    assert mode_of(out) == 0o600
    assert result.stdout.strip() == load_key(out).kid
    assert b"old world-readable" not in out.read_bytes()


def test_keygen_two_runs_make_different_keys(tmp_path: Path) -> None:
    first, second = tmp_path / "a.pem", tmp_path / "b.pem"
    assert run_cli("keygen", "--out", first, "--alg", "ES256").returncode == 0
    assert run_cli("keygen", "--out", second, "--alg", "ES256").returncode == 0
    assert load_key(first).kid != load_key(second).kid


@pytest.mark.parametrize("alg", ["ES256", "ES384", "ES512"])
def test_keygen_with_ec_alg(tmp_path: Path, alg: str) -> None:
    out = tmp_path / "key.pem"
    result = run_cli("keygen", "--alg", alg, "--out", out)
    assert result.returncode == 0, result.stderr
    key = load_key(out)
    assert key.alg == alg
    assert result.stdout.strip() == key.kid


def test_keygen_has_no_kid_option_because_the_pem_cannot_carry_it(tmp_path: Path) -> None:
    # The kid printed must be the one `jwks` publishes for the file: the RFC 7638 thumbprint.
    result = run_cli("keygen", "--kid", "prod-2024-05", "--out", tmp_path / "key.pem")
    assert result.returncode == 2
    assert not (tmp_path / "key.pem").exists()


def test_keygen_does_not_write_through_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.pem"
    target.write_text("keep")
    link = tmp_path / "key.pem"
    link.symlink_to(target)
    result = run_cli("keygen", "--force", "--out", link)
    assert result.returncode == 1
    assert target.read_text() == "keep"


def test_keygen_rejects_unknown_alg(tmp_path: Path) -> None:
    out = tmp_path / "key.pem"
    result = run_cli("keygen", "--alg", "HS256", "--out", out)
    assert result.returncode == 2
    assert "HS256" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "where"),
    [
        pytest.param([], "missing-dir/key.pem", id="missing-directory"),
        pytest.param(["--force"], ".", id="force-onto-a-directory"),
    ],
)
def test_keygen_failures_exit_1_with_a_message_not_a_traceback(
    tmp_path: Path, extra: list[str], where: str
) -> None:
    result = run_cli("keygen", *extra, "--out", tmp_path / where)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("stscreds: ")


def test_no_command_is_a_usage_error() -> None:
    result = run_cli()
    assert result.returncode == 2
    assert "usage:" in result.stderr


# --- jwks ------------------------------------------------------------------------------------


@pytest.fixture
def two_keyfiles(tmp_path: Path) -> list[Path]:
    paths = []
    for alg in ("RS256", "ES256"):
        path = tmp_path / f"{alg}.pem"
        path.write_bytes(SigningKey.generate(alg).to_pem())
        paths.append(path)
    return paths


def test_jwks_prints_a_json_jwks_with_every_key(two_keyfiles: list[Path]) -> None:
    result = run_cli("jwks", *two_keyfiles)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert set(document) == {"keys"}
    assert [jwk["kid"] for jwk in document["keys"]] == [load_key(p).kid for p in two_keyfiles]
    assert document["keys"] == [load_key(p).public_jwk() for p in two_keyfiles]


def test_jwks_has_no_private_key_members(two_keyfiles: list[Path]) -> None:
    document = json.loads(run_cli("jwks", *two_keyfiles).stdout)
    for jwk in document["keys"]:
        assert not {"d", "p", "q", "dp", "dq", "qi"} & set(jwk)


def test_jwks_output_verifies_tokens_signed_by_the_keyfile(two_keyfiles: list[Path]) -> None:
    key = load_key(two_keyfiles[1])
    token = key.sign({"sub": "alice"})
    key_set = jwt.PyJWKSet.from_dict(json.loads(run_cli("jwks", *two_keyfiles).stdout))
    public = key_set[key.kid]
    assert jwt.decode(token, public.key, algorithms=[key.alg]) == {"sub": "alice"}


@pytest.mark.parametrize(
    "content",
    [
        pytest.param("not a key: distinctive-garbage-ZQ7X", id="garbage"),
        pytest.param(
            "-----BEGIN PRIVATE KEY-----\nZGlzdGluY3RpdmUtZ2FyYmFnZS1aUTdY\n"
            "-----END PRIVATE KEY-----\n",
            id="garbage-in-armor",
        ),
    ],
)
def test_jwks_bad_keyfile_fails_without_echoing_it(
    tmp_path: Path, two_keyfiles: list[Path], content: str
) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text(content)
    result = run_cli("jwks", two_keyfiles[0], bad)
    assert result.returncode == 1
    assert result.stdout == ""
    assert str(bad) in result.stderr
    assert "Traceback" not in result.stderr
    for line in content.splitlines():
        if not line.startswith("-----"):
            assert line not in result.stderr


def test_jwks_missing_keyfile_fails(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    result = run_cli("jwks", missing)
    assert result.returncode == 1
    assert result.stdout == ""
    assert str(missing) in result.stderr
    assert "Traceback" not in result.stderr


def test_jwks_requires_a_keyfile() -> None:
    result = run_cli("jwks")
    assert result.returncode == 2


# --- store-key -------------------------------------------------------------------------------


def test_store_key_prints_a_fresh_usable_aes256_key() -> None:
    first, second = run_cli("store-key"), run_cli("store-key")
    assert first.returncode == 0 and second.returncode == 0
    key = first.stdout.strip()
    assert key != second.stdout.strip()
    assert len(base64.b64decode(key)) == 32
    cipher = StoreCipher([key])
    assert cipher.open("k", cipher.seal("k", b"secret")) == b"secret"
