"""Tests for stscreds.aws: clients and sessions from Credentials, against moto's S3 on loopback."""

from __future__ import annotations

import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import boto3
import pytest
from botocore.config import Config

from stscreds import Credentials
from stscreds.aws import DEFAULT_CONFIG, boto3_session, client

EXPIRATION = datetime.now(timezone.utc) + timedelta(hours=2)


def make_credentials(access_key_id: str = "ASIAEXAMPLE0000001") -> Credentials:
    return Credentials(
        access_key_id=access_key_id,
        secret_access_key="secret-" + access_key_id,
        session_token="token-" + access_key_id,
        expiration=EXPIRATION,
    )


@pytest.fixture
def isolated_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Conflicting environment credentials and empty config: only the Credentials may count."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAENVIRONMENTVALUE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "environment-secret")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def bucket(moto_sts: str) -> Iterator[str]:
    """A bucket with two objects in moto's S3 (moto accepts any credentials)."""
    name = f"bucket-{uuid.uuid4().hex[:12]}"
    s3 = boto3.client(
        "s3",
        endpoint_url=moto_sts,
        region_name="us-east-1",
        aws_access_key_id="AKIASETUP",
        aws_secret_access_key="setup",
    )
    s3.create_bucket(Bucket=name)
    s3.put_object(Bucket=name, Key="a.txt", Body=b"a")
    s3.put_object(Bucket=name, Key="b.txt", Body=b"b")
    yield name
    s3.close()


@pytest.mark.usefixtures("isolated_aws_env")
def test_client_lists_objects_with_the_given_credentials(moto_sts: str, bucket: str) -> None:
    credentials = make_credentials()
    s3 = client(credentials, "s3", region="us-east-1", endpoint_url=moto_sts)
    listed = s3.list_objects_v2(Bucket=bucket)
    assert [o["Key"] for o in listed["Contents"]] == ["a.txt", "b.txt"]
    signed_with = s3._request_signer._credentials
    assert signed_with.access_key == credentials.access_key_id
    assert signed_with.token == credentials.session_token


def test_client_is_reused_for_equal_arguments_only(moto_sts: str) -> None:
    credentials = make_credentials("ASIAREUSE000000001")
    first = client(credentials, "s3", region="us-east-1", endpoint_url=moto_sts)
    assert client(credentials, "s3", region="us-east-1", endpoint_url=moto_sts) is first
    assert (
        client(
            make_credentials("ASIAREUSE000000001"), "s3", region="us-east-1", endpoint_url=moto_sts
        )
        is first
    )  # equal credentials, another object
    assert (
        client(
            make_credentials("ASIAREUSE000000002"), "s3", region="us-east-1", endpoint_url=moto_sts
        )
        is not first
    )
    assert client(credentials, "s3", region="eu-west-1", endpoint_url=moto_sts) is not first
    assert client(credentials, "sqs", region="us-east-1") is not first
    # Extra create_client arguments are not part of the key: never reused.
    assert client(credentials, "s3", region="us-east-1", use_ssl=False) is not client(
        credentials, "s3", region="us-east-1", use_ssl=False
    )


def test_client_has_short_timeouts_and_merges_a_given_config() -> None:
    credentials = make_credentials("ASIACONFIG00000001")
    default = client(credentials, "s3", region="us-east-1")
    assert default.meta.config.connect_timeout == DEFAULT_CONFIG.connect_timeout == 2
    assert default.meta.config.read_timeout == 10
    custom = client(
        credentials, "s3", region="us-east-1", config=Config(read_timeout=30, s3={"x": 1})
    )
    assert custom.meta.config.read_timeout == 30
    assert custom.meta.config.connect_timeout == 2


def test_client_from_many_threads_at_once(moto_sts: str, bucket: str) -> None:
    """botocore sessions are not thread-safe; client() must be."""
    errors: list[BaseException] = []
    keys: list[list[str]] = []
    start = threading.Barrier(16)

    def work(i: int) -> None:
        try:
            start.wait()
            s3 = client(
                make_credentials(f"ASIATHREAD{i:08d}"),
                "s3",
                region="us-east-1",
                endpoint_url=moto_sts,
            )
            keys.append([o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]])
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert keys == [["a.txt", "b.txt"]] * 16


def test_client_refuses_anything_but_credentials() -> None:
    with pytest.raises(TypeError, match="Credentials"):
        client({"aws_access_key_id": "x"}, "s3")  # type: ignore[arg-type]


@pytest.mark.usefixtures("isolated_aws_env")
def test_boto3_session_lists_objects(moto_sts: str, bucket: str) -> None:
    credentials = make_credentials("ASIASESSION0000001")
    session = boto3_session(credentials, region="eu-west-1")
    assert session.region_name == "eu-west-1"
    frozen = session.get_credentials().get_frozen_credentials()
    assert frozen.access_key == credentials.access_key_id
    assert frozen.token == credentials.session_token
    s3 = session.client("s3", endpoint_url=moto_sts)
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]] == ["a.txt", "b.txt"]


def test_boto3_session_without_boto3_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # makes `import boto3` fail
    with pytest.raises(ImportError, match="pip install boto3"):
        boto3_session(make_credentials())
