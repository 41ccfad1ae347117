"""Tests for stscreds._region: which region a client gets when the caller names none."""

from __future__ import annotations

import botocore.session
import pytest

from stscreds._region import default_region


@pytest.fixture
def session(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> botocore.session.Session:
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", f"{tmp_path}/none")
    return botocore.session.Session()


def test_none_without_any_setting(session: botocore.session.Session) -> None:
    assert default_region(session) is None


def test_aws_default_region_and_aws_region(
    session: botocore.session.Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    assert default_region(session) == "eu-west-1"
    monkeypatch.setenv("AWS_REGION", "ap-south-1")  # the runtimes' variable wins
    assert default_region(session) == "ap-south-1"


@pytest.mark.parametrize(
    ("arn", "expected"),
    [
        ("arn:aws:kms:eu-central-1:123456789012:key/abc", "eu-central-1"),
        ("arn:aws-cn:kms:cn-north-1:123456789012:alias/x", "cn-north-1"),
        ("arn:aws:iam::123456789012:role/x", None),  # IAM ARNs name no region
        ("alias/x", None),
        ("1234abcd-12ab-34cd-56ef-1234567890ab", None),
    ],
)
def test_an_arn_names_its_region(
    session: botocore.session.Session, arn: str, expected: str | None
) -> None:
    assert default_region(session, arn) == expected
