"""Command line: ``python -m stscreds keygen | jwks KEYFILE... | store-key``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from ._signing import SigningKey
from .stores import generate_key

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
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
