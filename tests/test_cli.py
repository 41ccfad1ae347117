"""Tests for stscreds.__main__: ``python -m stscreds keygen`` and ``jwks`` as real processes."""

from __future__ import annotations

import base64
import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import jwt
import pytest

from stscreds._signing import SigningKey
from stscreds.stores import StoreCipher


def run_cli(
    *args: str | os.PathLike[str],
    umask: int | None = None,
    stdin: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run ``python -m stscreds ARGS`` in a fresh interpreter, optionally under ``umask``,
    with ``stdin`` as its input and ``env`` added to the environment."""
    command = [sys.executable, "-m", "stscreds", *map(str, args)]
    if umask is not None:
        command = ["sh", "-c", f'umask {umask:03o} && exec "$0" "$@"', *command]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        input=stdin,
        env=None if env is None else {**os.environ, **env},
    )


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
    assert result.stderr == f"stscreds: {link} is a symlink: refusing to write through it\n"


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


# --- trust-policy ----------------------------------------------------------------------------

ISSUER = "https://app.example.com"
PROVIDER = "arn:aws:iam::123456789012:oidc-provider/app.example.com"


def trust_policy(subject: str = "tenant:acme") -> dict:
    result = run_cli(
        "trust-policy", "--issuer", ISSUER, "--account", "123456789012", "--subject", subject
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_trust_policy_prints_the_recommended_policy_as_indented_json() -> None:
    result = run_cli(
        "trust-policy", "--issuer", ISSUER, "--provider-arn", PROVIDER, "--subject", "tenant:acme"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith('{\n  "Version": "2012-10-17"')
    document = json.loads(result.stdout)
    [statement] = document["Statement"]
    assert statement["Principal"] == {"Federated": PROVIDER}
    assert statement["Condition"] == {
        "StringEquals": {
            "app.example.com:aud": "sts.amazonaws.com",
            "app.example.com:sub": "tenant:acme",
        }
    }
    assert document == trust_policy()


def test_trust_policy_output_checks_clean(tmp_path: Path) -> None:
    path = tmp_path / "trust.json"
    result = run_cli(
        "trust-policy",
        *("--issuer", "https://example.com/app", "--account", "123456789012"),
        *("--subject", "tenant:acme", "--audience", "my-client", "--partition", "aws-cn"),
    )
    assert result.returncode == 0, result.stderr
    path.write_text(result.stdout)
    check = run_cli(
        "check-trust-policy",
        path,
        *("--issuer", "https://example.com/app", "--audience", "my-client"),
        *("--subject-template", "tenant:{tenant}"),
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.startswith("ok: ")
    assert check.stdout.count("\n") == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["--account", "123"], "--account", id="short-account"),
        pytest.param(["--account", "123456789012", "--subject", "t:*"], "--subject", id="wildcard"),
        pytest.param(
            ["--account", "123456789012", "--partition", "x"], "--partition", id="partition"
        ),
        pytest.param(["--provider-arn", "arn:aws:iam::1:x"], "--provider-arn", id="bad-arn"),
    ],
)
def test_trust_policy_bad_input_exits_2_with_a_message(args: list[str], message: str) -> None:
    if "--subject" not in args:
        args = [*args, "--subject", "tenant:acme"]
    result = run_cli("trust-policy", "--issuer", ISSUER, *args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(f"stscreds: {message}: ")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["--issuer", ISSUER, "--subject", "s"], id="no-account-or-arn"),
        pytest.param(
            [
                "--issuer",
                ISSUER,
                "--subject",
                "s",
                "--account",
                "123456789012",
                "--provider-arn",
                PROVIDER,
            ],
            id="account-and-arn",
        ),
        pytest.param(["--account", "123456789012", "--subject", "s"], id="no-issuer"),
    ],
)
def test_trust_policy_usage_errors_exit_2(args: list[str]) -> None:
    result = run_cli("trust-policy", *args)
    assert result.returncode == 2
    assert "usage:" in result.stderr


# --- check-trust-policy ----------------------------------------------------------------------


def open_policy(tmp_path: Path) -> Path:
    """A trust policy that checks aud but not sub: any tenant's token assumes the role."""
    path = tmp_path / "open.json"
    document = trust_policy()
    del document["Statement"][0]["Condition"]["StringEquals"]["app.example.com:sub"]
    document["Statement"][0]["Sid"] = "Web"
    path.write_text(json.dumps(document))
    return path


def test_check_trust_policy_good_file_exits_0(tmp_path: Path) -> None:
    path = tmp_path / "trust.json"
    path.write_text(json.dumps(trust_policy()))
    result = run_cli("check-trust-policy", path, "--issuer", ISSUER)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("ok: ")
    assert str(path) in result.stdout
    assert result.stderr == ""


def test_check_trust_policy_bad_file_exits_1_with_one_line_per_finding(tmp_path: Path) -> None:
    result = run_cli("check-trust-policy", open_policy(tmp_path), "--issuer", ISSUER)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: statement 0 (Sid Web): app.example.com:sub: ")
    assert "any tenant" in lines[0]
    assert "ok:" not in result.stdout


def test_check_trust_policy_warnings_alone_exit_0(tmp_path: Path) -> None:
    document = trust_policy()
    del document["Statement"][0]["Condition"]["StringEquals"]["app.example.com:aud"]
    path = tmp_path / "trust.json"
    path.write_text(json.dumps(document))
    result = run_cli("check-trust-policy", path, "--issuer", ISSUER)
    assert result.returncode == 0
    warning, ok = result.stdout.splitlines()
    assert warning.startswith("warning: statement 0: app.example.com:aud: ")
    assert ok.startswith("ok: ") and ok.endswith("(1 warning)")


def test_check_trust_policy_subject_template_finds_a_crossing_wildcard(tmp_path: Path) -> None:
    document = trust_policy()
    condition = document["Statement"][0]["Condition"]
    condition["StringLike"] = {
        "app.example.com:sub": condition["StringEquals"].pop("app.example.com:sub") + "*"
    }
    path = tmp_path / "trust.json"
    path.write_text(json.dumps(document))
    result = run_cli(
        "check-trust-policy", path, "--issuer", ISSUER, "--subject-template", "tenant:{tenant}"
    )
    assert result.returncode == 1
    assert "'tenant:acme*'" in result.stdout
    assert "more than one tenant" in result.stdout


def test_check_trust_policy_reads_stdin(tmp_path: Path) -> None:
    good = run_cli("check-trust-policy", "-", "--issuer", ISSUER, stdin=json.dumps(trust_policy()))
    assert good.returncode == 0, good.stdout + good.stderr
    assert "stdin" in good.stdout
    bad = run_cli(
        "check-trust-policy", "-", "--issuer", ISSUER, stdin=open_policy(tmp_path).read_text()
    )
    assert bad.returncode == 1
    assert "app.example.com:sub" in bad.stdout


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param("{not json", "not valid JSON", id="not-json"),
        pytest.param("[1, 2]", "must be a JSON object", id="not-a-policy"),
        pytest.param('{"Version": "2012-10-17"}', "has no Statement", id="no-statement"),
    ],
)
def test_check_trust_policy_unusable_input_exits_2(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "trust.json"
    path.write_text(content)
    result = run_cli("check-trust-policy", path, "--issuer", ISSUER)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("stscreds: ")
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_check_trust_policy_unreadable_file_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    result = run_cli("check-trust-policy", missing, "--issuer", ISSUER)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(f"stscreds: {missing}: ")
    assert "Traceback" not in result.stderr


def test_check_trust_policy_bad_issuer_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "trust.json"
    path.write_text(json.dumps(trust_policy()))
    result = run_cli("check-trust-policy", path, "--issuer", "http://app.example.com")
    assert result.returncode == 2
    assert result.stderr.startswith("stscreds: issuer: ")


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["--issuer", ISSUER], id="neither-file-nor-role"),
        pytest.param(["trust.json", "--role-name", "r", "--issuer", ISSUER], id="file-and-role"),
        pytest.param(["trust.json"], id="no-issuer"),
        pytest.param(["trust.json", "--issuer", ISSUER, "--region", "us-east-1"], id="region"),
        pytest.param(["trust.json", "--issuer", ISSUER, "--bogus"], id="unknown-option"),
    ],
)
def test_check_trust_policy_usage_errors_exit_2(tmp_path: Path, args: list[str]) -> None:
    (tmp_path / "trust.json").write_text(json.dumps(trust_policy()))
    args = [str(tmp_path / a) if a == "trust.json" else a for a in args]
    result = run_cli("check-trust-policy", *args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "usage:" in result.stderr


@pytest.fixture
def moto_iam(moto_sts: str) -> str:
    """moto's server on 127.0.0.1 (conftest's, for the session): it answers IAM too."""
    return moto_sts


# Fake credentials for moto, and no shared config or credentials file of the user's.
FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


def create_role(endpoint: str, name: str, document: dict) -> None:
    import botocore.session

    session = botocore.session.Session()
    iam = session.create_client(
        "iam",
        region_name="us-east-1",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(document))


def test_check_trust_policy_reads_a_role_from_iam(tmp_path: Path, moto_iam: str) -> None:
    create_role(moto_iam, "tenant-acme", trust_policy())
    create_role(moto_iam, "tenant-open", json.loads(open_policy(tmp_path).read_text()))

    good = run_cli(
        "check-trust-policy",
        "--role-name",
        "tenant-acme",
        "--issuer",
        ISSUER,
        "--endpoint-url",
        moto_iam,
        env=FAKE_AWS,
    )
    assert good.returncode == 0, good.stdout + good.stderr
    assert good.stdout.startswith("ok: ")
    assert "role/tenant-acme" in good.stdout

    bad = run_cli(
        "check-trust-policy",
        "--role-name",
        "tenant-open",
        "--issuer",
        ISSUER,
        "--endpoint-url",
        moto_iam,
        "--region",
        "us-east-1",
        env=FAKE_AWS,
    )
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert bad.stdout.startswith("error: statement 0 (Sid Web): app.example.com:sub: ")


def test_check_trust_policy_missing_role_exits_2_with_the_aws_error(moto_iam: str) -> None:
    result = run_cli(
        "check-trust-policy",
        "--role-name",
        "no-such-role",
        "--issuer",
        ISSUER,
        "--endpoint-url",
        moto_iam,
        env=FAKE_AWS,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("stscreds: IAM GetRole no-such-role: NoSuchEntity: ")
    assert "Traceback" not in result.stderr


def test_check_trust_policy_unreachable_iam_exits_2() -> None:
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run_cli(
        "check-trust-policy",
        "--role-name",
        "r",
        "--issuer",
        ISSUER,
        "--endpoint-url",
        f"http://127.0.0.1:{port}",
        env=FAKE_AWS,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("stscreds: IAM GetRole r: ")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("encoded", [False, True], ids=["decoded-dict", "url-encoded-text"])
def test_get_role_policy_document_is_checked_in_either_form(tmp_path: Path, encoded: bool) -> None:
    from urllib.parse import quote

    from stscreds.__main__ import _decoded_policy
    from stscreds.trust import check_trust_policy

    for document, errors in (
        (trust_policy(), 0),
        (json.loads(open_policy(tmp_path).read_text()), 1),
    ):
        value = quote(json.dumps(document)) if encoded else document
        findings = check_trust_policy(_decoded_policy(value), issuer=ISSUER)
        assert sum(f.severity == "error" for f in findings) == errors
