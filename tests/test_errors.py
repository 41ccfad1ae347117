"""Tests for stscreds._errors: redaction and the CredentialsUnavailable family."""

from __future__ import annotations

import base64
import json

import pytest

from stscreds._errors import (
    CredentialsRejected,
    CredentialsUnavailable,
    STSUnavailable,
    redact,
)

ERROR_CLASSES = [CredentialsUnavailable, CredentialsRejected, STSUnavailable]
ROLE_ARN = "arn:aws:iam::123456789012:role/app"


def b64url_json(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


def make_jwt(subject: str = "alice") -> str:
    """A JWT-shaped string (header.payload.signature), as STS might quote back."""
    header = b64url_json({"alg": "RS256", "kid": "k1", "typ": "JWT"})
    payload = b64url_json({"sub": subject, "aud": "sts.amazonaws.com", "exp": 1_700_000_000})
    signature = base64.urlsafe_b64encode(b"\xfb\xff" * 64).rstrip(b"=").decode()
    return f"{header}.{payload}.{signature}"


TOKEN = make_jwt("secret-subject")


def assert_no_token(text: str) -> None:
    assert TOKEN not in text
    for part in TOKEN.split("."):
        assert part not in text
    assert "eyJ" not in text


# --- redact ----------------------------------------------------------------------------------


def test_redact_removes_a_jwt_and_keeps_the_rest() -> None:
    message = f"Token {TOKEN} is expired (request id 42)"
    assert redact(message) == "Token <redacted> is expired (request id 42)"


def test_redact_removes_every_jwt() -> None:
    message = f"first={make_jwt('a')}, second={make_jwt('b')};"
    assert redact(message) == "first=<redacted>, second=<redacted>;"


@pytest.mark.parametrize(
    "fragment",
    [
        pytest.param(TOKEN.split(".")[0], id="header-only"),
        pytest.param(".".join(TOKEN.split(".")[:2]) + ".", id="unsigned"),
        pytest.param(".".join(TOKEN.split(".")[:2]), id="header-and-payload"),
    ],
)
def test_redact_removes_jwt_fragments(fragment: str) -> None:
    cleaned = redact(f"STS quoted [{fragment}] back")
    assert_no_token(cleaned)
    assert cleaned.startswith("STS quoted [") and cleaned.endswith("] back")


@pytest.mark.parametrize(
    "message",
    [
        "",
        "Not authorized to perform sts:AssumeRoleWithWebIdentity",
        "Rate exceeded",
        "eyJ alone is too short to be a token",
        "Couldn't retrieve verification key from your identity provider",
    ],
)
def test_redact_leaves_ordinary_messages_alone(message: str) -> None:
    assert redact(message) == message


def test_redact_keeps_messages_up_to_the_cap() -> None:
    message = "x" * 300
    assert redact(message) == message


@pytest.mark.parametrize("length", [301, 1000, 100_000])
def test_redact_caps_long_messages(length: int) -> None:
    cleaned = redact("y" * length)
    assert len(cleaned) == 300
    assert cleaned.endswith("...")
    assert cleaned.startswith("y" * 297)


def test_redact_removes_a_jwt_that_straddles_the_cap() -> None:
    cleaned = redact("z" * 290 + TOKEN + " tail")
    assert_no_token(cleaned)
    assert len(cleaned) <= 300


def test_redact_removes_a_jwt_at_the_end_of_a_long_message() -> None:
    cleaned = redact("w" * 5000 + TOKEN)
    assert_no_token(cleaned)
    assert len(cleaned) == 300


# --- the exception family --------------------------------------------------------------------


@pytest.mark.parametrize("cls", [CredentialsRejected, STSUnavailable])
def test_specific_errors_are_credentials_unavailable(cls: type[CredentialsUnavailable]) -> None:
    assert issubclass(cls, CredentialsUnavailable)
    with pytest.raises(CredentialsUnavailable):
        raise cls("nope")


def test_credentials_unavailable_is_an_exception() -> None:
    assert issubclass(CredentialsUnavailable, Exception)


@pytest.mark.parametrize(
    ("cls", "status"),
    [(CredentialsUnavailable, 503), (CredentialsRejected, 502), (STSUnavailable, 503)],
)
def test_status_codes(cls: type[CredentialsUnavailable], status: int) -> None:
    assert cls.status_code == status
    assert cls("x").status_code == status


@pytest.mark.parametrize("cls", ERROR_CLASSES)
def test_errors_carry_code_and_role_arn(cls: type[CredentialsUnavailable]) -> None:
    error = cls("Not authorized", code="AccessDenied", role_arn=ROLE_ARN)
    assert error.code == "AccessDenied"
    assert error.role_arn == ROLE_ARN
    assert error.message == "Not authorized"
    assert str(error) == "Not authorized"


@pytest.mark.parametrize("cls", ERROR_CLASSES)
def test_code_and_role_arn_default_to_none(cls: type[CredentialsUnavailable]) -> None:
    error = cls("timed out")
    assert error.code is None
    assert error.role_arn is None


@pytest.mark.parametrize("cls", ERROR_CLASSES)
def test_message_is_redacted_everywhere(cls: type[CredentialsUnavailable]) -> None:
    error = cls(f"Invalid token {TOKEN}", code="InvalidIdentityToken")
    for text in (error.message, str(error), repr(error), repr(error.args)):
        assert_no_token(text)
    assert "Invalid token <redacted>" in str(error)


@pytest.mark.parametrize("cls", ERROR_CLASSES)
def test_repr_names_class_message_and_code(cls: type[CredentialsUnavailable]) -> None:
    error = cls("Rate exceeded", code="Throttling")
    assert repr(error) == f"{cls.__name__}('Rate exceeded', code='Throttling')"


@pytest.mark.parametrize("cls", ERROR_CLASSES)
def test_message_is_capped(cls: type[CredentialsUnavailable]) -> None:
    assert len(str(cls("m" * 10_000))) == 300


@pytest.mark.parametrize("cls", ERROR_CLASSES)
def test_copy_is_a_new_instance_with_equal_content(cls: type[CredentialsUnavailable]) -> None:
    try:
        raise cls(f"bad token {TOKEN}", code="InvalidIdentityToken", role_arn=ROLE_ARN)
    except CredentialsUnavailable as raised:
        original = raised
    copy = original._copy()
    assert copy is not original
    assert type(copy) is cls
    assert (copy.message, copy.code, copy.role_arn) == (
        original.message,
        original.code,
        original.role_arn,
    )
    assert str(copy) == str(original)
    assert repr(copy) == repr(original)
    assert copy.status_code == original.status_code
    # A fresh instance starts without the original's traceback or chained context.
    assert original.__traceback__ is not None
    assert copy.__traceback__ is None
    assert copy.__context__ is None
