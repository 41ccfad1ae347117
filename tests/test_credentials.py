"""Tests for stscreds._credentials: Credentials are safe to print and usable by botocore."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta, timezone, tzinfo

import boto3
import botocore.session
import pytest

from stscreds._credentials import Credentials

ACCESS_KEY_ID = "ASIAEXAMPLEKEYID7Q2Z"
SECRET = "sEcReT/wJalrXUtnFEMI+K7MDENG+bPxRfiCYdistinctive"
TOKEN = "ToKeN//FwoGZXIvYXdzEBYaDHdistinctive+sessiontoken/value=="
EXPIRATION = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def make_credentials(expiration: datetime = EXPIRATION) -> Credentials:
    return Credentials(
        access_key_id=ACCESS_KEY_ID,
        secret_access_key=SECRET,
        session_token=TOKEN,
        expiration=expiration,
    )


@pytest.fixture
def isolated_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Point botocore at empty config and conflicting env credentials, so only kwargs count."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAENVIRONMENTVALUE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "environment-secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "environment-token")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("AWS_PROFILE", raising=False)


# --- printing never leaks --------------------------------------------------------------------


@pytest.mark.parametrize(
    "render",
    [
        pytest.param(repr, id="repr"),
        pytest.param(str, id="str"),
        pytest.param(lambda c: f"{c}", id="f-string"),
        pytest.param(lambda c: "%s %r" % (c, c), id="percent"),  # noqa: UP031
        pytest.param(lambda c: repr([c, {"creds": c}]), id="in-containers"),
    ],
)
def test_rendering_never_shows_secret_or_token(render) -> None:
    text = render(make_credentials())
    assert SECRET not in text
    assert TOKEN not in text
    assert "sEcReT" not in text
    assert "ToKeN" not in text


def test_repr_shows_access_key_tail_and_expiration_only() -> None:
    text = repr(make_credentials())
    assert text.startswith("Credentials(")
    assert ACCESS_KEY_ID[-4:] in text
    assert ACCESS_KEY_ID not in text
    assert EXPIRATION.isoformat() in text


def test_str_equals_repr() -> None:
    creds = make_credentials()
    assert str(creds) == repr(creds)


# --- expiration ------------------------------------------------------------------------------


def test_naive_expiration_is_rejected() -> None:
    with pytest.raises(ValueError) as info:
        make_credentials(datetime(2030, 1, 1, 0, 0, 0))
    assert str(info.value).startswith("expiration:")


class _NoOffset(tzinfo):
    """A tzinfo that does not know its offset: aware in form, naive in fact."""

    def utcoffset(self, dt: datetime | None) -> None:
        return None

    def dst(self, dt: datetime | None) -> None:
        return None

    def tzname(self, dt: datetime | None) -> None:
        return None


def test_expiration_with_unknown_offset_is_rejected() -> None:
    with pytest.raises(ValueError) as info:
        make_credentials(datetime(2030, 1, 1, tzinfo=_NoOffset()))
    assert str(info.value).startswith("expiration:")


@pytest.mark.parametrize(
    "zone",
    [
        timezone(timedelta(hours=2)),
        timezone(timedelta(hours=-7, minutes=-30)),
        timezone(timedelta(0), "Zulu"),
    ],
    ids=["plus-2h", "minus-7h30", "named-utc-offset"],
)
def test_aware_non_utc_expiration_is_converted_to_utc(zone: timezone) -> None:
    local = EXPIRATION.astimezone(zone)
    assert local.tzinfo is not timezone.utc
    creds = make_credentials(local)
    assert creds.expiration.tzinfo is timezone.utc
    assert creds.expiration == EXPIRATION
    assert creds.expiration.hour == EXPIRATION.hour


def test_utc_expiration_is_kept() -> None:
    assert make_credentials().expiration is EXPIRATION


def test_credentials_are_frozen() -> None:
    creds = make_credentials()
    with pytest.raises(dataclasses.FrozenInstanceError):
        creds.secret_access_key = "other"  # type: ignore[misc]
    assert creds.secret_access_key == SECRET


def test_equal_credentials_compare_equal_across_timezones() -> None:
    assert make_credentials() == make_credentials(
        EXPIRATION.astimezone(timezone(timedelta(hours=9)))
    )


# --- boto3/botocore --------------------------------------------------------------------------


def test_boto3_kwargs_has_exactly_the_three_credential_arguments() -> None:
    assert make_credentials().boto3_kwargs() == {
        "aws_access_key_id": ACCESS_KEY_ID,
        "aws_secret_access_key": SECRET,
        "aws_session_token": TOKEN,
    }


def test_boto3_kwargs_work_with_a_boto3_session(isolated_aws_env: None) -> None:
    session = boto3.Session(region_name="us-east-1", **make_credentials().boto3_kwargs())
    frozen = session.get_credentials().get_frozen_credentials()
    assert (frozen.access_key, frozen.secret_key, frozen.token) == (ACCESS_KEY_ID, SECRET, TOKEN)


def test_boto3_kwargs_work_with_a_boto3_client(isolated_aws_env: None) -> None:
    client = boto3.client("s3", region_name="us-east-1", **make_credentials().boto3_kwargs())
    frozen = client._request_signer._credentials.get_frozen_credentials()
    assert (frozen.access_key, frozen.secret_key, frozen.token) == (ACCESS_KEY_ID, SECRET, TOKEN)


def test_boto3_kwargs_work_with_a_botocore_client(isolated_aws_env: None) -> None:
    session = botocore.session.get_session()
    client = session.create_client(
        "s3", region_name="us-east-1", **make_credentials().boto3_kwargs()
    )
    frozen = client._request_signer._credentials.get_frozen_credentials()
    assert (frozen.access_key, frozen.secret_key, frozen.token) == (ACCESS_KEY_ID, SECRET, TOKEN)


# --- seconds_left ----------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [3600.0, 120.5, 0.0, -30.0])
def test_seconds_left_counts_from_now_to_expiration(offset: float) -> None:
    now = EXPIRATION.timestamp() - offset
    assert make_credentials().seconds_left(now) == pytest.approx(offset)


def test_seconds_left_is_independent_of_the_given_timezone() -> None:
    now = EXPIRATION.timestamp() - 900
    shifted = make_credentials(EXPIRATION.astimezone(timezone(timedelta(hours=-5))))
    assert shifted.seconds_left(now) == pytest.approx(900)
