"""Command line: ``python -m stscreds keygen | jwks KEYFILE... | store-key | trust-policy |
check-trust-policy``.

``keygen`` writes a signing key, ``jwks`` prints the JWKS publishing keys, ``store-key`` prints
a key for encrypting a shared store, ``trust-policy`` prints the trust policy a role needs for
one subject, and ``check-trust-policy`` checks a role's trust policy (a file, stdin or the
role itself, read with your AWS credentials): exit 0 when it has no errors, 1 when it has,
2 when it cannot be checked.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import urllib.parse
from collections.abc import Sequence
from typing import Any

from ._signing import SigningKey
from .stores import generate_key
from .trust import check_trust_policy, recommended_trust_policy

_ALGS = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512")


def _keygen(args: argparse.Namespace) -> int:
    try:
        key = SigningKey.generate(args.alg)
    except ValueError as error:
        print(f"stscreds: {error}", file=sys.stderr)
        return 1
    # O_NOFOLLOW: never write a private key through a planted symlink.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    if args.force:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
    try:
        # Created 0600 from the start: the private key is never readable by others, not even
        # for the moment a chmod after writing would leave open.
        fd = os.open(args.out, flags, 0o600)
    except FileExistsError:
        print(f"stscreds: {args.out} exists (use --force to overwrite)", file=sys.stderr)
        return 1
    except OSError as error:
        if error.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink
            print(
                f"stscreds: {args.out} is a symlink: refusing to write through it", file=sys.stderr
            )
            return 1
        print(f"stscreds: {args.out}: {error.strerror}", file=sys.stderr)
        return 1
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(key.to_pem())
    print(key.kid)
    return 0


def _jwks(args: argparse.Namespace) -> int:
    keys = []
    for path in args.keyfiles:
        try:
            with open(path, "rb") as handle:
                keys.append(SigningKey.from_pem(handle.read()).public_jwk())
        except (OSError, ValueError) as error:
            print(f"stscreds: {path}: {error}", file=sys.stderr)
            return 1
    print(json.dumps({"keys": keys}, indent=2))
    return 0


def _store_key(args: argparse.Namespace) -> int:
    print(generate_key())
    return 0


def _trust_policy(args: argparse.Namespace) -> int:
    try:
        policy = recommended_trust_policy(
            issuer=args.issuer,
            subject=args.subject,
            account_id=args.account,
            provider_arn=args.provider_arn,
            audience=args.audience,
            partition=args.partition,
        )
    except ValueError as error:
        print(f"stscreds: {_as_option(str(error))}", file=sys.stderr)
        return 2
    print(json.dumps(policy, indent=2))
    return 0


# recommended_trust_policy's parameters, as the command line spells them.
_OPTIONS = {
    "issuer": "--issuer",
    "subject": "--subject",
    "account_id": "--account",
    "provider_arn": "--provider-arn",
    "audience": "--audience",
    "partition": "--partition",
}


def _as_option(message: str) -> str:
    """A ValueError's message with its leading parameter name as the option's."""
    name, colon, rest = message.partition(":")
    return f"{_OPTIONS[name]}:{rest}" if colon and name in _OPTIONS else message


class _Unusable(Exception):
    """The policy to check could not be read; the message says why."""


def _read_policy_file(path: str) -> tuple[str, str]:
    """The text of ``path`` (``-``: stdin) and how to name it."""
    if path == "-":
        return sys.stdin.read(), "stdin"
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read(), path
    except OSError as error:
        raise _Unusable(f"{path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise _Unusable(f"{path}: not UTF-8 text") from None


def _read_role_policy(args: argparse.Namespace) -> tuple[Any, str]:
    """The role's trust policy from IAM GetRole, with the caller's own AWS credentials."""
    import botocore.exceptions
    import botocore.session
    from botocore.config import Config

    # Short timeouts: a CI step should fail in seconds, not hang on a dead endpoint.
    config = Config(
        connect_timeout=5, read_timeout=15, retries={"max_attempts": 3, "mode": "standard"}
    )
    try:
        session = botocore.session.get_session()
        # IAM is global and signs for us-east-1 in the aws partition; other partitions need
        # their own region (--region cn-north-1, or the profile's).
        region = args.region or session.get_config_variable("region") or "us-east-1"
        client = session.create_client(
            "iam", region_name=region, endpoint_url=args.endpoint_url, config=config
        )
        role = client.get_role(RoleName=args.role_name)["Role"]
    except botocore.exceptions.ClientError as error:
        details = error.response.get("Error", {})
        code, message = details.get("Code", "Unknown"), details.get("Message", "")
        raise _Unusable(f"IAM GetRole {args.role_name}: {code}: {message}") from None
    except (botocore.exceptions.BotoCoreError, ValueError) as error:
        raise _Unusable(f"IAM GetRole {args.role_name}: {error}") from None
    document = _decoded_policy(role.get("AssumeRolePolicyDocument"))
    return document, f"role {role.get('Arn') or args.role_name}"


def _decoded_policy(document: Any) -> Any:
    """GetRole's AssumeRolePolicyDocument as a dict or JSON text for check_trust_policy."""
    if isinstance(document, str):
        # The IAM API sends the document URL-encoded; botocore decodes it into a dict, but
        # a client without that customization hands over the encoded text.
        return urllib.parse.unquote(document)
    return document


def _check_trust_policy(args: argparse.Namespace) -> int:
    if (args.file is None) == (args.role_name is None):
        args.parser.error("give exactly one of FILE (or - for stdin) and --role-name")
    if args.file is not None and (args.endpoint_url or args.region):
        args.parser.error("--endpoint-url and --region go with --role-name")
    try:
        if args.file is not None:
            policy, source = _read_policy_file(args.file)
        else:
            policy, source = _read_role_policy(args)
        findings = check_trust_policy(
            policy,
            issuer=args.issuer,
            audience=args.audience,
            subject_template=args.subject_template,
        )
    except (_Unusable, ValueError) as error:
        print(f"stscreds: {error}", file=sys.stderr)
        return 2
    for finding in findings:
        print(finding)
    errors = sum(finding.severity == "error" for finding in findings)
    if errors:
        return 1
    warnings = len(findings)
    note = f" ({warnings} warning{'s' if warnings != 1 else ''})" if warnings else ""
    print(f"ok: no errors in the trust policy of {source} for {args.issuer}{note}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the stscreds command line; returns the exit status."""
    parser = argparse.ArgumentParser(prog="stscreds", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    keygen = commands.add_parser("keygen", help="write a new private signing key (mode 0600)")
    keygen.add_argument("--alg", default="RS256", choices=_ALGS)
    keygen.add_argument("--out", "-o", default="stscreds-key.pem", help="file to write")
    keygen.add_argument("--force", action="store_true", help="overwrite an existing file")
    keygen.set_defaults(run=_keygen)
    jwks = commands.add_parser("jwks", help="print the JWKS publishing the given keys")
    jwks.add_argument("keyfiles", nargs="+", metavar="KEYFILE")
    jwks.set_defaults(run=_jwks)
    store_key = commands.add_parser(
        "store-key", help="print a new base64 AES-256 key for encrypting a shared store"
    )
    store_key.set_defaults(run=_store_key)
    trust_policy = commands.add_parser(
        "trust-policy", help="print the trust policy a role needs for one subject's tokens"
    )
    trust_policy.add_argument("--issuer", required=True, help="the issuer URL (https://...)")
    provider = trust_policy.add_mutually_exclusive_group(required=True)
    provider.add_argument("--account", help="12-digit account id of the IAM OIDC provider")
    provider.add_argument("--provider-arn", help="ARN of the IAM OIDC provider")
    trust_policy.add_argument("--subject", required=True, help="the exact sub of the tokens")
    trust_policy.add_argument(
        "--audience",
        default="sts.amazonaws.com",
        help="the broker's audience (default: %(default)s)",
    )
    trust_policy.add_argument(
        "--partition", default="aws", help="partition of the provider ARN (with --account)"
    )
    trust_policy.set_defaults(run=_trust_policy)
    check = commands.add_parser(
        "check-trust-policy",
        help="check a role's trust policy for the issuer's tokens (exit 0 ok, 1 errors)",
        description="Check a role's trust policy (FILE, - for stdin, or --role-name read "
        "with your AWS credentials) for the issuer's tokens. Prints one line per finding. "
        "Exit status: 0 no errors (warnings allowed), 1 errors, 2 the policy could not be "
        "read or checked.",
    )
    check.add_argument("file", nargs="?", metavar="FILE", help="the policy as JSON (- for stdin)")
    check.add_argument("--issuer", required=True, help="the issuer URL (https://...)")
    check.add_argument(
        "--audience",
        default="sts.amazonaws.com",
        help="the broker's audience (default: %(default)s)",
    )
    check.add_argument(
        "--subject-template",
        help="the subjects the issuer signs, as RoleTemplate's subject: tenant:{tenant}; "
        "without it any sub wildcard is an error (where the tenant sits is unknown)",
    )
    check.add_argument("--role-name", help="read the trust policy of this IAM role instead")
    check.add_argument("--endpoint-url", help="IAM endpoint (with --role-name)")
    check.add_argument(
        "--region", help="region to sign IAM calls for (default: your profile's, else us-east-1)"
    )
    check.set_defaults(run=_check_trust_policy, parser=check)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
