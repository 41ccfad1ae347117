"""Tests for stscreds._roles: Role validation, equality, identity keys, session names."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import re
import string
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from stscreds._roles import (
    RESERVED_CLAIMS,
    Role,
    RoleTemplate,
    identity_key,
    sanitize_session_name,
)

ARN = "arn:aws:iam::123456789012:role/app-reader"
OTHER_ARN = "arn:aws:iam::123456789012:role/app-writer"
POLICY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"}],
}
VALID_SESSION_NAME = re.compile(r"[\w+=,.@-]{2,64}", re.ASCII)


def assert_rejected(field: str, **kwargs: Any) -> ValueError:
    """Build a Role from ``kwargs`` and check it fails with a message naming ``field``."""
    kwargs.setdefault("arn", ARN)
    with pytest.raises(ValueError) as info:
        Role(**kwargs)
    assert str(info.value).startswith(f"{field}:"), str(info.value)
    return info.value


def as_json(claims: Any) -> str:
    """Claims as canonical JSON text, so list-vs-tuple or dict-vs-frozen copies compare equal."""
    return json.dumps(dict(claims), sort_keys=True)


# --- arn -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arn",
    [
        "arn:aws:iam::123456789012:role/app",
        "arn:aws-cn:iam::123456789012:role/app",
        "arn:aws-us-gov:iam::123456789012:role/app",
        "arn:aws:iam::000000000000:role/app",
        "arn:aws:iam::123456789012:role/service-role/app",
        "arn:aws:iam::123456789012:role/a/b/c/app",
        "arn:aws:iam::123456789012:role/name+with=all,legal.chars@and-_",
        "arn:aws:iam::123456789012:role/" + "r" * 64,
        "arn:aws:iam::123456789012:role/ab",
    ],
)
def test_valid_role_arns_are_accepted(arn: str) -> None:
    assert Role(arn).arn == arn


@pytest.mark.parametrize(
    "arn",
    [
        pytest.param("arn:aws:iam::12345678901:role/app", id="11-digit-account"),
        pytest.param("arn:aws:iam::1234567890123:role/app", id="13-digit-account"),
        pytest.param("arn:aws:iam::12345678901x:role/app", id="letter-in-account"),
        pytest.param("arn:aws:iam::١٢٣٤٥٦٧٨٩٠١٢:role/app", id="non-ascii-digits"),
        pytest.param("arn:aws:iam:::role/app", id="no-account"),
        pytest.param("arn:aws:iam::123456789012:user/alice", id="user-arn"),
        pytest.param("arn:aws:iam::123456789012:group/devs", id="group-arn"),
        pytest.param("arn:aws:iam::123456789012:policy/p", id="policy-arn"),
        pytest.param("arn:aws:sts::123456789012:assumed-role/app/sess", id="sts-assumed-role"),
        pytest.param("arn:aws:s3:::bucket/role/app", id="s3-service"),
        pytest.param("arn:aws:iam:us-east-1:123456789012:role/app", id="region-present"),
        pytest.param("arn:aws-foo:iam::123456789012:role/app", id="unknown-partition"),
        pytest.param("arn:aws:iam::123456789012:role/", id="empty-name"),
        pytest.param("arn:aws:iam::123456789012:role/" + "r" * 65, id="65-char-name"),
        pytest.param("arn:aws:iam::123456789012:role/bad name", id="space-in-name"),
        pytest.param("arn:aws:iam::123456789012:role/bad*name", id="star-in-name"),
        pytest.param(" " + ARN, id="leading-space"),
        pytest.param(ARN + "\n", id="trailing-newline"),
        pytest.param("", id="empty"),
        pytest.param("app-reader", id="bare-name"),
        pytest.param(None, id="none"),
        pytest.param(ARN.encode(), id="bytes"),
    ],
)
def test_invalid_role_arns_are_rejected(arn: Any) -> None:
    assert_rejected("arn", arn=arn)


# --- subject ---------------------------------------------------------------------------------


@pytest.mark.parametrize("subject", ["u", "user-42", "josé@example.com", "s" * 255, "a b/c:d"])
def test_valid_subjects_are_accepted(subject: str) -> None:
    assert Role(ARN, subject=subject).subject == subject


@pytest.mark.parametrize(
    "subject",
    [
        pytest.param("", id="empty"),
        pytest.param("s" * 256, id="256-chars"),
        pytest.param("user\n42", id="newline"),
        pytest.param("user\x00", id="nul"),
        pytest.param("user\x7f", id="del"),
        pytest.param("\tuser", id="tab"),
        pytest.param(42, id="int"),
        pytest.param(b"user", id="bytes"),
    ],
)
def test_invalid_subjects_are_rejected(subject: Any) -> None:
    assert_rejected("subject", subject=subject)


# --- session_name ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ab", "s" * 64, "a+b=c,d.e@f-g_h", "user@example.com", "42"])
def test_valid_session_names_are_accepted(name: str) -> None:
    assert Role(ARN, session_name=name).session_name == name


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("", id="empty"),
        pytest.param("a", id="1-char"),
        pytest.param("s" * 65, id="65-chars"),
        pytest.param("a b", id="space"),
        pytest.param("a/b", id="slash"),
        pytest.param("a:b", id="colon"),
        pytest.param("ab\n", id="trailing-newline"),
        pytest.param("sesión", id="latin-unicode-letter"),
        pytest.param("名前名前", id="cjk-letters"),
        pytest.param("ab٣", id="unicode-digit"),
        pytest.param(12, id="int"),
    ],
)
def test_invalid_session_names_are_rejected(name: Any) -> None:
    assert_rejected("session_name", session_name=name)


# --- duration_seconds ------------------------------------------------------------------------


@pytest.mark.parametrize("duration", [900, 3600, 43200])
def test_durations_in_range_are_accepted(duration: int) -> None:
    assert Role(ARN, duration_seconds=duration).duration_seconds == duration


def test_duration_defaults_to_one_hour() -> None:
    assert Role(ARN).duration_seconds == 3600


@pytest.mark.parametrize(
    "duration",
    [
        pytest.param(899, id="below-min"),
        pytest.param(43201, id="above-max"),
        pytest.param(0, id="zero"),
        pytest.param(-3600, id="negative"),
        pytest.param(True, id="bool"),
        pytest.param(3600.0, id="float"),
        pytest.param("3600", id="str"),
        pytest.param(None, id="none"),
    ],
)
def test_invalid_durations_are_rejected(duration: Any) -> None:
    assert_rejected("duration_seconds", duration_seconds=duration)


# --- policy ----------------------------------------------------------------------------------


def test_policy_dict_is_stored_as_json_text() -> None:
    role = Role(ARN, policy=POLICY)
    assert isinstance(role.policy, str)
    assert json.loads(role.policy) == POLICY


def test_policy_json_string_is_kept_verbatim() -> None:
    text = json.dumps(POLICY, indent=2)
    assert Role(ARN, policy=text).policy == text


def test_policy_defaults_to_none() -> None:
    assert Role(ARN).policy is None


@pytest.mark.parametrize(
    "policy",
    [
        pytest.param("[]", id="json-array"),
        pytest.param(json.dumps([POLICY]), id="json-array-of-policy"),
        pytest.param('"text"', id="json-string"),
        pytest.param("42", id="json-number"),
        pytest.param("null", id="json-null"),
        pytest.param("{not json", id="invalid-json"),
        pytest.param("", id="empty-string"),
        pytest.param({"Statement": object()}, id="non-serializable-dict"),
        pytest.param({"Resource": {1, 2}}, id="set-value"),
        pytest.param([POLICY], id="python-list"),
        pytest.param(42, id="int"),
    ],
)
def test_invalid_policies_are_rejected(policy: Any) -> None:
    assert_rejected("policy", policy=policy)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        pytest.param("policy", {"Condition": {"n": float("nan")}}, id="policy-dict-nan"),
        pytest.param("policy", '{"Condition": {"n": NaN}}', id="policy-text-nan"),
        pytest.param("policy", '{"Condition": {"n": Infinity}}', id="policy-text-infinity"),
        pytest.param("claims", {"score": float("inf")}, id="claims-infinity"),
        pytest.param("claims", {"score": float("nan")}, id="claims-nan"),
    ],
)
def test_non_finite_numbers_are_rejected_because_they_are_not_json(field: str, value: Any) -> None:
    assert_rejected(field, **{field: value})


@pytest.mark.parametrize(
    "policy",
    [
        pytest.param(
            '{"Version":"2012-10-17","Statement":[],"Statement":[{"Effect":"Allow"}]}',
            id="top-level",
        ),
        pytest.param(
            '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Effect":"Deny"}]}',
            id="nested",
        ),
        pytest.param('{"a":{"b":1,"c":{"d":1,"d":1}}}', id="deep-same-value"),
    ],
)
def test_policy_text_with_duplicate_keys_is_rejected(policy: str) -> None:
    # Python keeps the last duplicate: two different texts would be one identity.
    error = assert_rejected("policy", policy=policy)
    assert "duplicate key" in str(error)


def test_duplicate_key_message_is_capped() -> None:
    name = "k" * 500
    error = assert_rejected("policy", policy=f'{{"{name}":1,"{name}":2}}')
    assert len(str(error)) < 100


def test_same_key_in_different_objects_is_not_a_duplicate() -> None:
    text = '{"Statement":[{"Effect":"Allow"},{"Effect":"Deny"}],"Version":"2012-10-17"}'
    assert Role(ARN, policy=text).policy == text


LONE_SURROGATE = "\ud800"


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        pytest.param("subject", {"subject": "user-" + LONE_SURROGATE}, id="subject"),
        pytest.param("session_name", {"session_name": "s-" + LONE_SURROGATE}, id="session"),
        pytest.param("policy", {"policy": {"Sid": LONE_SURROGATE}}, id="policy-dict"),
        pytest.param("policy", {"policy": '{"Sid": "\\udc00"}'}, id="policy-text-escape"),
        pytest.param("policy", {"policy": '{"Sid": "' + LONE_SURROGATE + '"}'}, id="policy-text"),
        pytest.param("policy", {"policy": {LONE_SURROGATE: 1}}, id="policy-key"),
        pytest.param("claims", {"claims": {"tenant": "a" + LONE_SURROGATE}}, id="claims-value"),
        pytest.param("claims", {"claims": {LONE_SURROGATE: 1}}, id="claims-key"),
        pytest.param("claims", {"claims": {"t": [{"x": LONE_SURROGATE}]}}, id="claims-nested"),
    ],
)
def test_lone_surrogates_are_rejected_naming_the_field(field: str, kwargs: dict[str, Any]) -> None:
    # Accepted, they made identity_key raise UnicodeEncodeError on a request (a 500).
    assert_rejected(field, **kwargs)


def test_valid_non_ascii_text_is_accepted_and_keyed() -> None:
    role = Role(ARN, subject="ユーザー-😀", policy={"Sid": "é"}, claims={"name": "Zoë 😀"})
    assert len(key_of(role)) == 64


# --- claims ----------------------------------------------------------------------------------


def test_reserved_claims_are_the_registered_jwt_claims_stscreds_sets() -> None:
    assert frozenset({"iss", "sub", "aud", "exp", "iat", "nbf", "jti"}) == RESERVED_CLAIMS


@pytest.mark.parametrize("claim", sorted(RESERVED_CLAIMS))
def test_each_reserved_claim_is_rejected(claim: str) -> None:
    error = assert_rejected("claims", claims={"team": "a", claim: "override"})
    assert claim in str(error)


@pytest.mark.parametrize(
    "claims",
    [
        pytest.param({"team": object()}, id="non-serializable-value"),
        pytest.param({"team": {"a", "b"}}, id="set-value"),
        pytest.param({1: "a"}, id="int-key"),
        pytest.param({("a", "b"): "a"}, id="tuple-key"),
        pytest.param([("team", "a")], id="list-of-pairs"),
        pytest.param("team=a", id="string"),
    ],
)
def test_invalid_claims_are_rejected(claims: Any) -> None:
    assert_rejected("claims", claims=claims)


def test_claims_are_copied_from_the_callers_dict() -> None:
    original: dict[str, Any] = {"team": "a", "groups": ["x"], "meta": {"tier": 1}}
    role = Role(ARN, claims=original)
    twin = Role(ARN, claims={"team": "a", "groups": ["x"], "meta": {"tier": 1}})
    original["team"] = "b"
    original["extra"] = True
    original["groups"].append("y")
    original["meta"]["tier"] = 2
    expected = {"team": "a", "groups": ["x"], "meta": {"tier": 1}}
    assert as_json(role.claims) == as_json(expected)
    assert role == twin
    assert hash(role) == hash(twin)


def test_claims_mapping_is_read_only() -> None:
    role = Role(ARN, claims={"team": "a"})
    assert role.claims is not None
    with pytest.raises(TypeError):
        role.claims["team"] = "b"  # type: ignore[index]
    with pytest.raises(TypeError):
        del role.claims["team"]  # type: ignore[attr-defined]
    assert role.claims["team"] == "a"


def test_nested_claim_values_cannot_be_changed_through_the_role() -> None:
    role = Role(ARN, claims={"groups": ["readers"]})
    assert role.claims is not None
    # An immutable nested value (AttributeError/TypeError) is a fine way to fix this.
    with contextlib.suppress(AttributeError, TypeError):
        role.claims["groups"].append("admins")
    assert list(role.claims["groups"]) == ["readers"]


# --- frozen, equality, hashing ---------------------------------------------------------------


@pytest.mark.parametrize(
    "field", ["arn", "subject", "session_name", "duration_seconds", "policy", "claims"]
)
def test_role_fields_cannot_be_assigned_or_deleted(field: str) -> None:
    role = Role(ARN, subject="alice")
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(role, field, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        delattr(role, field)
    assert role.arn == ARN and role.subject == "alice"


def test_roles_are_hashable_and_usable_as_dict_keys() -> None:
    cache = {Role(ARN, subject="alice"): 1, Role(ARN, subject="bob"): 2}
    assert cache[Role(ARN, subject="alice")] == 1
    assert cache[Role(ARN, subject="bob")] == 2
    assert len({Role(ARN), Role(ARN), Role(OTHER_ARN)}) == 2


def test_policy_dict_equals_same_policy_as_json_string_with_other_key_order() -> None:
    as_dict = Role(ARN, policy=POLICY)
    reordered = {
        "Statement": [{"Resource": "*", "Action": "s3:GetObject", "Effect": "Allow"}],
        "Version": "2012-10-17",
    }
    as_text = Role(ARN, policy=json.dumps(reordered, indent=4))
    assert as_dict == as_text
    assert hash(as_dict) == hash(as_text)


def test_claims_key_order_does_not_matter() -> None:
    first = Role(ARN, claims={"a": 1, "b": {"x": 1, "y": 2}})
    second = Role(ARN, claims={"b": {"y": 2, "x": 1}, "a": 1})
    assert first == second
    assert hash(first) == hash(second)


@pytest.mark.parametrize(
    "changes",
    [
        {"arn": OTHER_ARN},
        {"subject": "bob"},
        {"session_name": "other-session"},
        {"duration_seconds": 900},
        {"policy": {**POLICY, "Version": "2008-10-17"}},
        {"claims": {"team": "b"}},
        {"claims": None},
        {"policy": None},
    ],
)
def test_roles_differing_in_any_field_are_not_equal(changes: dict[str, Any]) -> None:
    base = {
        "arn": ARN,
        "subject": "alice",
        "session_name": "session",
        "duration_seconds": 3600,
        "policy": POLICY,
        "claims": {"team": "a"},
    }
    assert Role(**base) != Role(**{**base, **changes})


def test_role_is_not_equal_to_other_types() -> None:
    role = Role(ARN)
    assert role != ARN
    assert role != (ARN,)
    assert role.__eq__(ARN) is NotImplemented


def test_repr_names_the_role_but_not_policy_or_claim_values() -> None:
    role = Role(
        ARN,
        subject="alice",
        policy={"Statement": [{"Resource": "arn:aws:s3:::secret-bucket-name"}]},
        claims={"tenant": "secret-tenant-value"},
    )
    text = repr(role)
    assert ARN in text and "alice" in text and "tenant" in text
    assert "secret-bucket-name" not in text
    assert "secret-tenant-value" not in text


# --- identity_key ----------------------------------------------------------------------------

KEY_DEFAULTS: dict[str, str] = {
    "issuer": "https://issuer.example.com",
    "audience": "sts.amazonaws.com",
    "sts_endpoint": "https://sts.us-east-1.amazonaws.com",
    "region": "us-east-1",
    "default_subject": "stscreds",
}
BASE_ROLE_FIELDS: dict[str, Any] = {
    "arn": ARN,
    "subject": "alice",
    "session_name": "alice",
    "duration_seconds": 3600,
    "policy": POLICY,
    "claims": {"team": "a"},
}


def key_of(role: Role | None = None, **overrides: str) -> str:
    return identity_key(role or Role(**BASE_ROLE_FIELDS), **{**KEY_DEFAULTS, **overrides})


ROLE_VARIANTS = {
    "subject": {"subject": "bob"},
    "policy": {"policy": {**POLICY, "Statement": []}},
    "claims": {"claims": {"team": "b"}},
    "session_name": {"session_name": "other"},
    "duration": {"duration_seconds": 7200},
    "arn": {"arn": OTHER_ARN},
}
INPUT_VARIANTS = {
    "issuer": {"issuer": "https://other-issuer.example.com"},
    "audience": {"audience": "other-audience"},
    "sts_endpoint": {"sts_endpoint": "https://sts.eu-west-1.amazonaws.com"},
    "region": {"region": "eu-west-1"},
}


@pytest.mark.parametrize("changes", ROLE_VARIANTS.values(), ids=ROLE_VARIANTS.keys())
def test_identity_key_differs_for_roles_differing_in_one_field(changes: dict[str, Any]) -> None:
    other = Role(**{**BASE_ROLE_FIELDS, **changes})
    assert key_of(other) != key_of()


@pytest.mark.parametrize("changes", INPUT_VARIANTS.values(), ids=INPUT_VARIANTS.keys())
def test_identity_key_differs_for_different_broker_inputs(changes: dict[str, str]) -> None:
    assert key_of(**changes) != key_of()


def test_identity_keys_of_all_variants_are_distinct() -> None:
    keys = {key_of()}
    keys |= {key_of(Role(**{**BASE_ROLE_FIELDS, **c})) for c in ROLE_VARIANTS.values()}
    keys |= {key_of(**c) for c in INPUT_VARIANTS.values()}
    assert len(keys) == 1 + len(ROLE_VARIANTS) + len(INPUT_VARIANTS)


def test_identity_key_is_equal_for_equal_inputs() -> None:
    first = Role(**BASE_ROLE_FIELDS)
    second = Role(
        **{
            **BASE_ROLE_FIELDS,
            "policy": json.dumps(POLICY, indent=2, sort_keys=True),
            "claims": dict(reversed(list(BASE_ROLE_FIELDS["claims"].items()))),
        }
    )
    assert first is not second
    assert key_of(first) == key_of(second)


def test_identity_key_fields_cannot_be_shifted_into_each_other() -> None:
    # A naive concatenation would give "a" + "bc" and "ab" + "c" the same encoding.
    assert key_of(Role(ARN, subject="ab", session_name="cde")) != key_of(
        Role(ARN, subject="abc", session_name="de")
    )
    assert key_of(region="us-east-1", sts_endpoint="x") != key_of(
        region="us-east-1x", sts_endpoint=""
    )


def test_identity_key_uses_the_names_actually_sent() -> None:
    implicit = Role(ARN)
    explicit = Role(ARN, subject="alice", session_name="alice")
    assert key_of(implicit, default_subject="alice") == key_of(explicit)
    assert key_of(Role(ARN, subject="alice")) == key_of(explicit)
    assert key_of(implicit, default_subject="bob") != key_of(explicit)
    # The default matters only to roles that do not name a subject.
    assert key_of(explicit, default_subject="bob") == key_of(explicit)


def test_identity_key_is_a_sha256_hex_digest_without_plain_text() -> None:
    key = key_of()
    assert re.fullmatch(r"[0-9a-f]{64}", key)
    for text in ("123456789012", "app-reader", "alice", "arn:", "issuer", "team"):
        assert text not in key


# --- sanitize_session_name -------------------------------------------------------------------

SESSION_NAME_INPUTS = [
    "",
    "a",
    "é",
    "ab",
    "alice@example.com",
    "first.last+tag@sub.example.co.uk",
    "josé.garcía@ejemplo.es",
    "名前",
    "用户名@例子.公司",
    "🙂",
    "🙂🙂🙂",
    "with space",
    "slash/and\\backslash",
    "tab\tnewline\n",
    "nul\x00",
    "colon:semicolon;",
    "x" * 200,
    "é" * 200,
    "https://idp.example.com/users/42?x=1#f",
    "CN=Alice,OU=Eng,O=Example",
]


def assert_valid_session_name(name: str) -> None:
    assert VALID_SESSION_NAME.fullmatch(name), repr(name)
    assert Role(ARN, session_name=name).session_name == name


@pytest.mark.parametrize("value", SESSION_NAME_INPUTS)
def test_sanitize_session_name_gives_a_valid_name(value: str) -> None:
    assert_valid_session_name(sanitize_session_name(value))


def test_sanitize_session_name_for_random_strings() -> None:
    rng = random.Random(20240501)
    alphabet = (
        "abcXYZ019_+=,.@-"  # allowed
        " /\\:;!?*#%&'\"<>()[]{}|~`^$\t\n\r\x00\x7f"  # ASCII not allowed
        "éüßñçøåЖж名前用户٣ꙮ🙂\u200b\u00a0"  # non-ASCII
    )
    for _ in range(2000):
        value = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 120)))
        assert_valid_session_name(sanitize_session_name(value))


@pytest.mark.parametrize("value", ["ab", "alice@example.com", "a+b=c,d.e@f-g_h", "s" * 64])
def test_sanitize_session_name_keeps_valid_names_unchanged(value: str) -> None:
    assert sanitize_session_name(value) == value


def test_sanitize_session_name_truncates_to_64_chars() -> None:
    assert sanitize_session_name("x" * 200) == "x" * 64


def test_sanitize_session_name_pads_short_values() -> None:
    assert len(sanitize_session_name("")) == 2
    assert sanitize_session_name("a").startswith("a")
    assert len(sanitize_session_name("a")) == 2


def test_sanitize_session_name_is_deterministic() -> None:
    for value in SESSION_NAME_INPUTS:
        assert sanitize_session_name(value) == sanitize_session_name(value)


# --- properties (hypothesis) -----------------------------------------------------------------


def policy_with_number(literal: str) -> str:
    """POLICY as JSON text with one condition number written exactly as ``literal``."""
    condition = {"NumericLessThan": {"s3:max-keys": "NUMBER"}}
    statement = {**POLICY["Statement"][0], "Condition": condition}
    return json.dumps({**POLICY, "Statement": [statement]}).replace('"NUMBER"', literal)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        pytest.param("1e400", "1e999", id="both-beyond-float-range"),
        pytest.param("10.00000000000000001", "10.0", id="beyond-float-precision"),
        pytest.param("9007199254740993.0", "9007199254740992.0", id="beyond-2**53"),
        pytest.param("10", '"10"', id="number-vs-string"),
    ],
)
def test_policies_differing_only_in_a_number_are_different_identities(
    first: str, second: str
) -> None:
    one = Role(ARN, policy=policy_with_number(first))
    other = Role(ARN, policy=policy_with_number(second))
    assert one.policy == policy_with_number(first)  # STS gets the text as given
    assert one != other
    assert key_of(one) != key_of(other)


@pytest.mark.parametrize(
    "spellings",
    [
        pytest.param(["10", "10.0", "1e1", "1.0E+1", "100e-1", "0.1e2", "1E01"], id="ten"),
        pytest.param(["0", "-0", "0.0", "-0.0", "0e5", "0E-7"], id="zero"),
    ],
)
def test_spellings_of_one_number_value_are_one_identity(spellings: list[str]) -> None:
    texts = [policy_with_number(spelling) for spelling in spellings]
    # The same documents as dicts: json.loads gives int 10 or float 10.0 / -0.0, and so on.
    roles = [Role(ARN, policy=text) for text in texts]
    roles += [Role(ARN, policy=json.loads(text)) for text in texts]
    assert all(role == roles[0] for role in roles)
    assert len({hash(role) for role in roles}) == 1
    assert len({key_of(role) for role in roles}) == 1


PROPERTY_SETTINGS = settings(max_examples=200, deadline=None)
#: For the tests that draw whole identities (policies and claims are slow to generate).
IDENTITY_SETTINGS = settings(PROPERTY_SETTINGS, max_examples=100)

NAME_CHARS = string.ascii_letters + string.digits + "_+=,.@-"
UNICODE = st.characters(codec="utf-8")  # every code point except (lone) surrogates
json_keys = st.text(UNICODE, max_size=8)
json_strings = st.text(UNICODE, max_size=12)

role_arns = st.builds(
    "arn:{}:iam::{}:role/{}{}".format,
    st.sampled_from(["aws", "aws-cn", "aws-us-gov"]),
    st.text(string.digits, min_size=12, max_size=12),
    st.one_of(  # the path: none, "/" or "[/]a/b/"
        st.just(""),
        st.just("/"),
        st.builds(
            lambda lead, parts: lead + "".join(part + "/" for part in parts),
            st.sampled_from(["", "/"]),
            st.lists(st.text(NAME_CHARS, min_size=1, max_size=12), min_size=1, max_size=3),
        ),
    ),
    st.text(NAME_CHARS, min_size=1, max_size=64),
)
subjects = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cc",)), min_size=1, max_size=255
)
session_names = st.text(NAME_CHARS, min_size=2, max_size=64)
durations = st.integers(900, 43200)
broker_texts = st.text(UNICODE, max_size=40)


def exact_number(sign: int, digits: list[int], exponent: int) -> Decimal:
    return Decimal((sign, tuple(digits), exponent))


#: Finite JSON numbers as exact Decimals: ints, floats (their shortest text), and numbers no
#: float holds (long, huge or tiny).
json_numbers = st.one_of(
    st.integers().map(Decimal),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda f: Decimal(repr(f))),
    st.builds(
        exact_number,
        st.integers(0, 1),
        st.lists(st.integers(0, 9), min_size=1, max_size=30),
        st.integers(-1000, 1000),
    ),
)


def json_trees(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(
        leaves,
        lambda children: (
            st.lists(children, max_size=4) | st.dictionaries(json_keys, children, max_size=4)
        ),
        max_leaves=6,
    )


#: Policies as JSON documents: dicts, lists, str, bool, None, and Decimal numbers.
policy_documents = st.dictionaries(
    json_keys, json_trees(st.none() | st.booleans() | json_numbers | json_strings), max_size=5
)
claim_values = json_trees(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | json_strings
)
claim_maps = st.dictionaries(
    json_keys.filter(lambda name: name not in RESERVED_CLAIMS), claim_values, max_size=5
)

JSON_SPACE = ["", "", "", " ", "  ", "\n", "\n    ", "\t", "\r\n"]


def spell_number(value: Decimal, rnd: random.Random) -> str:
    """A JSON number literal of exactly ``value``'s value, spelled one of many ways."""
    sign, digit_tuple, exponent = value.as_tuple()
    assert isinstance(exponent, int)
    digits = "".join(map(str, digit_tuple)).lstrip("0")
    if not digits:  # zero: any sign, exponent and number of fraction zeros
        sign, exponent = rnd.randint(0, 1), rnd.randint(-5, 5)
        mantissa = "0" + rnd.choice(["", ".0", ".000"])
    else:
        zeros = rnd.choice([0, 0, 1, 4])
        digits += "0" * zeros
        exponent -= zeros
        # The value is digits * 10**exponent; write it as mantissa * 10**shown.
        shown = rnd.choice(
            [
                0,
                exponent,
                exponent + len(digits) - 1,
                exponent + rnd.randint(-3, len(digits) + 3),
            ]
        )
        if abs(exponent - shown) > 30:  # keep the text short
            shown = exponent
        shift = exponent - shown
        if shift >= 0:
            mantissa = digits + "0" * shift + rnd.choice(["", "", ".0", ".00"])
        else:
            padded = digits.rjust(1 - shift, "0")
            mantissa = padded[:shift] + "." + padded[shift:]
        exponent = shown
    if exponent == 0 and rnd.random() < 0.5:
        suffix = ""
    else:
        suffix = (
            rnd.choice("eE")
            + ("-" if exponent < 0 else rnd.choice(["", "+"]))
            + rnd.choice(["", "0"])
            + str(abs(exponent))
        )
    return ("-" if sign else "") + mantissa + suffix


def render_json(value: Any, rnd: random.Random) -> str:
    """JSON text of ``value`` with random spacing, key order, escapes and number spellings."""

    def space() -> str:
        return rnd.choice(JSON_SPACE)

    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        value = Decimal(repr(value))
    if isinstance(value, Decimal):
        return spell_number(value, rnd)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=rnd.random() < 0.5)
    if isinstance(value, list | tuple):
        items = [space() + render_json(item, rnd) + space() for item in value]
        return "[" + (",".join(items) or space()) + "]"
    pairs = list(value.items())
    rnd.shuffle(pairs)
    items = [
        space() + render_json(name, rnd) + space() + ":" + space() + render_json(item, rnd)
        for name, item in pairs
    ]
    return "{" + (",".join(item + space() for item in items) or space()) + "}"


@PROPERTY_SETTINGS
@given(number=json_numbers, rnd=st.randoms(use_true_random=False))
def test_spell_number_helper_writes_the_exact_value_as_json(
    number: Decimal, rnd: random.Random
) -> None:
    text = spell_number(number, rnd)
    assert json.loads(text, parse_float=Decimal, parse_int=Decimal) == number


class NotPython(Exception):
    """A number of the document that no Python int or float writes as json.dumps text."""


def as_python(value: Any, rnd: random.Random) -> Any:
    """``value`` with int or float numbers that json.dumps writes as the same values."""
    if isinstance(value, Decimal):
        choices: list[Any] = []
        if value == value.to_integral_value() and value.adjusted() < 400:
            choices.append(int(value))
        as_float = float(value)
        if math.isfinite(as_float) and Decimal(repr(as_float)) == value:
            choices.append(as_float)
        if not choices:
            raise NotPython
        return rnd.choice(choices)
    if isinstance(value, list):
        return [as_python(item, rnd) for item in value]
    if isinstance(value, dict):
        pairs = list(value.items())
        rnd.shuffle(pairs)
        return {name: as_python(item, rnd) for name, item in pairs}
    return value


def render_policy(document: Any, rnd: random.Random) -> Any:
    """``document`` as a Role's policy argument: a dict of Python values, or JSON text."""
    if document is None:
        return None
    if rnd.random() < 0.4:
        with contextlib.suppress(NotPython):
            return as_python(document, rnd)
    return rnd.choice(JSON_SPACE) + render_json(document, rnd) + rnd.choice(JSON_SPACE)


def reshuffle(value: Any, rnd: random.Random) -> Any:
    """``value`` with dict keys in another order and some lists as tuples (one JSON value)."""
    if isinstance(value, dict):
        pairs = list(value.items())
        rnd.shuffle(pairs)
        return {name: reshuffle(item, rnd) for name, item in pairs}
    if isinstance(value, list | tuple):
        items = [reshuffle(item, rnd) for item in value]
        return tuple(items) if rnd.random() < 0.5 else items
    return value


def json_document(value: Any) -> Any:
    """A parsed JSON value, comparable exactly: numbers (Decimal) by value, true is not 1."""
    if value is None or isinstance(value, bool):
        return ("literal", value)
    if isinstance(value, Decimal):
        return ("number", value)
    if isinstance(value, str):
        return ("string", value)
    if isinstance(value, list):
        return ("array", [json_document(item) for item in value])
    return ("object", {name: json_document(item) for name, item in value.items()})


def policy_document(policy: Any) -> Any:
    """The JSON document STS receives for a policy argument."""
    if policy is None:
        return None
    text = policy if isinstance(policy, str) else json.dumps(policy)
    return json_document(json.loads(text, parse_float=Decimal, parse_int=Decimal))


def claims_text(claims: Any) -> str | None:
    # JSON text, not Python equality: 1, 1.0 and True are equal in Python, not in a JWT.
    return None if claims is None else json.dumps(claims, sort_keys=True)


@dataclasses.dataclass
class KeyInput:
    """Everything identity_key depends on: a Role's arguments and the broker's settings."""

    arn: str
    subject: str | None
    session_name: str | None
    duration_seconds: int
    policy: Any
    claims: Any
    issuer: str
    audience: str
    sts_endpoint: str
    region: str
    default_subject: str

    def role(self) -> Role:
        return Role(
            self.arn,
            self.subject,
            self.session_name,
            self.duration_seconds,
            self.policy,
            self.claims,
        )

    def key(self) -> str:
        return identity_key(
            self.role(),
            issuer=self.issuer,
            audience=self.audience,
            sts_endpoint=self.sts_endpoint,
            region=self.region,
            default_subject=self.default_subject,
        )

    def role_fields(self) -> tuple[Any, ...]:
        """Equal exactly for equal Roles (the subject and session name as given)."""
        return (
            self.arn,
            self.subject,
            self.session_name,
            self.duration_seconds,
            policy_document(self.policy),
            claims_text(self.claims),
        )

    def identity(self) -> tuple[Any, ...]:
        """Equal exactly for one identity; defined without the code under test's encoding."""
        subject = self.subject or self.default_subject
        session_name = self.session_name or sanitize_session_name(subject)
        return (
            self.arn,
            subject,
            session_name,
            self.duration_seconds,
            policy_document(self.policy),
            claims_text(self.claims),
            self.issuer,
            self.audience,
            self.sts_endpoint,
            self.region,
        )


# Small pools, so that two independent draws are often one identity (or one Role).
SMALL_DOMAIN: dict[str, list[Any]] = {
    "arn": [ARN, OTHER_ARN],
    "subject": [None, "alice", "bob", "Alice Smith"],
    "session_name": [None, "alice", "Alice-Smith"],
    "duration_seconds": [900, 3600],
    "policy": [
        None,
        {},
        POLICY,
        {"n": Decimal("10")},
        {"n": Decimal("1E+1")},
        {"n": Decimal("10.00000000000000001")},
        {"n": "10"},
        {"n": Decimal("1e400")},
        {"n": Decimal("1e999")},
        {"n": Decimal("9007199254740993")},
        {"n": Decimal("9007199254740992")},
        {"n": True},
        {"n": Decimal(1)},
        {"n": None},
        {"n": [Decimal(0), "a"]},
        {"n": [Decimal("-0.0"), "a"]},
    ],
    "claims": [
        None,
        {},
        {"team": "a"},
        {"team": "b"},
        {"n": 1},
        {"n": 1.0},
        {"n": True},
        {"n": "1"},
        {"x": {"a": 1, "b": [1, 2]}},
        {"x": {"b": [1, 2], "a": 1}},
    ],
    "issuer": ["https://a.example.com", "https://b.example.com"],
    "audience": ["sts.amazonaws.com", "other"],
    "sts_endpoint": ["https://sts.amazonaws.com", "https://sts.eu-west-1.amazonaws.com"],
    "region": ["us-east-1", "eu-west-1"],
    "default_subject": ["alice", "stscreds"],
}


def small_input(choice: dict[str, int], rnd: random.Random) -> KeyInput:
    values = {name: pool[choice[name]] for name, pool in SMALL_DOMAIN.items()}
    values["policy"] = render_policy(values["policy"], rnd)
    values["claims"] = reshuffle(values["claims"], rnd)
    return KeyInput(**values)


@IDENTITY_SETTINGS
@given(data=st.data(), rnd=st.randoms(use_true_random=False))
def test_identity_key_is_equal_exactly_for_one_identity(
    data: st.DataObject, rnd: random.Random
) -> None:
    first = {name: data.draw(st.sampled_from(range(len(p)))) for name, p in SMALL_DOMAIN.items()}
    redrawn = data.draw(st.sets(st.sampled_from(sorted(SMALL_DOMAIN)), max_size=3))
    second = {
        name: data.draw(st.sampled_from(range(len(SMALL_DOMAIN[name])))) if name in redrawn else i
        for name, i in first.items()
    }
    one, other = small_input(first, rnd), small_input(second, rnd)
    assert (one.key() == other.key()) == (one.identity() == other.identity())
    role, other_role = one.role(), other.role()
    assert (role == other_role) == (one.role_fields() == other.role_fields())
    if role == other_role:
        assert hash(role) == hash(other_role)


@dataclasses.dataclass
class Case:
    """A KeyInput and the policy document and claims its policy and claims are renderings of."""

    input: KeyInput
    document: Any  # JSON tree with Decimal numbers, or None
    claims: Any  # plain dicts and lists, or None


@st.composite
def cases(draw: st.DrawFn, rnd: random.Random) -> Case:
    document = draw(st.none() | policy_documents)
    claims = draw(st.none() | claim_maps)
    key_input = KeyInput(
        arn=draw(role_arns),
        subject=draw(st.none() | subjects),
        session_name=draw(st.none() | session_names),
        duration_seconds=draw(durations),
        policy=render_policy(document, rnd),
        claims=reshuffle(claims, rnd),
        issuer=draw(broker_texts),
        audience=draw(broker_texts),
        sts_endpoint=draw(broker_texts),
        region=draw(broker_texts),
        default_subject=draw(subjects),
    )
    return Case(key_input, document, claims)


REWRITES = [
    "policy",
    "claims",
    "implicit-subject",
    "implicit-session-name",
    "unused-default-subject",
]


def rewritten(case: Case, how: str, data: st.DataObject, rnd: random.Random) -> Case:
    """``case`` with its inputs written another way that names the same identity."""
    key_input = case.input
    subject = key_input.subject or key_input.default_subject
    if how == "policy":
        changes: dict[str, Any] = {"policy": render_policy(case.document, rnd)}
    elif how == "claims":
        changes = {"claims": reshuffle(case.claims, rnd)}
    elif how == "implicit-subject":  # the default subject is the subject sent
        if key_input.subject is None:
            changes = {"subject": key_input.default_subject}
        else:
            changes = {"subject": None, "default_subject": key_input.subject}
    elif how == "implicit-session-name":  # the session name derived from the subject
        implied = sanitize_session_name(subject)
        if key_input.session_name is None:
            changes = {"session_name": implied}
        else:
            changes = {"session_name": None} if key_input.session_name == implied else {}
    else:  # unused-default-subject
        changes = {"default_subject": data.draw(subjects)} if key_input.subject else {}
    return dataclasses.replace(case, input=dataclasses.replace(key_input, **changes))


def node_paths(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(value, dict):
        for name, item in value.items():
            yield from node_paths(item, (*path, name))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from node_paths(item, (*path, index))


def replaced(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = replaced(value[path[0]], path[1:], new)
    return copy


def nudged(number: Decimal) -> Decimal:
    """A number that differs from ``number`` only far beyond any float's precision."""
    sign, digits, exponent = number.as_tuple()
    assert isinstance(exponent, int)
    return Decimal((sign, (*digits, *(0,) * 20, 1), exponent - 21))


def different_json(value: Any, data: st.DataObject, number: type) -> Any:
    """A JSON value unlike ``value``; new numbers are ``number`` (Decimal or int)."""
    options: list[Any]
    if value is None:
        options = [False, number(0), "null"]
    elif isinstance(value, bool):
        options = [not value, number(int(value)), str(value).lower()]
    elif isinstance(value, Decimal):
        options = [nudged(value), str(value)]
        if not value.is_zero():
            sign, digits, exponent = value.as_tuple()
            assert isinstance(exponent, int)
            options += [Decimal((sign, digits, exponent + 1)), value.copy_negate()]
    elif isinstance(value, int):
        options = [value + 1, str(value)] + ([float(value)] if abs(value) < 2**53 else [])
    elif isinstance(value, float):
        options = [math.nextafter(value, 0.0) if value else 5e-324, repr(value)]
        options += [int(value)] if value.is_integer() else []
    elif isinstance(value, str):
        options = [value + "x", None, value[:-1] if value else number(0)]
    elif isinstance(value, list):
        options = [[*value, None], value[:-1] if value else {}]
    else:
        extra = data.draw(
            json_keys.filter(lambda name: name not in value and name not in RESERVED_CLAIMS)
        )
        options = [{**value, extra: None}, dict(list(value.items())[:-1]) if value else []]
    return data.draw(st.sampled_from(options))


def different_tree(value: Any, data: st.DataObject, number: type) -> Any:
    """``value`` (a JSON object) with one node replaced by a different JSON value."""
    path = data.draw(st.sampled_from(list(node_paths(value))))
    new = different_json(_at(value, path), data, number)
    if not path and not isinstance(new, dict):  # the root stays an object
        return {**value, "x" + "".join(value): None}
    return replaced(value, path, new)


def _at(value: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        value = value[step]
    return value


CHANGES = [
    "arn",
    "subject",
    "default_subject",
    "session_name",
    "duration_seconds",
    "policy",
    "claims",
    "issuer",
    "audience",
    "sts_endpoint",
    "region",
]


def changed(case: Case, what: str, data: st.DataObject, rnd: random.Random) -> Case:
    """``case`` with one input changed so that it names another identity."""
    key_input = case.input
    subject = key_input.subject or key_input.default_subject
    session_name = key_input.session_name or sanitize_session_name(subject)
    document, claims = case.document, case.claims
    if what == "subject":
        changes: dict[str, Any] = {"subject": data.draw(subjects.filter(lambda s: s != subject))}
    elif what == "default_subject":  # the subject sent is the (changed) default
        other = data.draw(subjects.filter(lambda s: s != subject))
        changes = {"subject": None, "default_subject": other}
    elif what == "session_name":
        changes = {"session_name": data.draw(session_names.filter(lambda s: s != session_name))}
    elif what == "duration_seconds":
        changes = {what: data.draw(durations.filter(lambda d: d != key_input.duration_seconds))}
    elif what == "arn":
        changes = {what: data.draw(role_arns.filter(lambda arn: arn != key_input.arn))}
    elif what == "policy":
        document = {} if document is None else different_tree(document, data, Decimal)
        if data.draw(st.booleans()) and case.document is not None:
            document = None
        changes = {"policy": render_policy(document, rnd)}
    elif what == "claims":
        claims = {} if claims is None else different_tree(claims, data, int)
        if data.draw(st.booleans()) and case.claims is not None:
            claims = None
        changes = {"claims": reshuffle(claims, rnd)}
    else:  # a broker input
        old = getattr(key_input, what)
        changes = {what: data.draw(broker_texts.filter(lambda text: text != old))}
    return Case(dataclasses.replace(key_input, **changes), document, claims)


@IDENTITY_SETTINGS
@given(data=st.data(), rnd=st.randoms(use_true_random=False))
def test_identity_key_is_kept_by_rewrites_of_the_same_inputs(
    data: st.DataObject, rnd: random.Random
) -> None:
    case = data.draw(cases(rnd))
    other = case
    for how in data.draw(st.lists(st.sampled_from(REWRITES), min_size=1, max_size=4)):
        other = rewritten(other, how, data, rnd)
    assert other.input.identity() == case.input.identity()  # the rewrite is one by definition
    assert other.input.key() == case.input.key()
    one, another = case.input.role(), other.input.role()
    assert (one == another) == (case.input.role_fields() == other.input.role_fields())
    if one == another:
        assert hash(one) == hash(another)


@IDENTITY_SETTINGS
@given(data=st.data(), rnd=st.randoms(use_true_random=False), what=st.sampled_from(CHANGES))
def test_identity_key_is_changed_by_any_change_of_one_input(
    data: st.DataObject, rnd: random.Random, what: str
) -> None:
    case = data.draw(cases(rnd))
    other = changed(case, what, data, rnd)
    # ...however the changed inputs are written.
    for how in data.draw(st.lists(st.sampled_from(REWRITES), max_size=3)):
        other = rewritten(other, how, data, rnd)
    assert other.input.identity() != case.input.identity()  # the change is one by definition
    assert other.input.key() != case.input.key()


@PROPERTY_SETTINGS
@given(
    broker=st.fixed_dictionaries(
        {name: broker_texts for name in ("issuer", "audience", "sts_endpoint", "region")}
    ),
    field=st.sampled_from(["issuer", "audience", "sts_endpoint", "region"]),
    data=st.data(),
)
def test_identity_key_changes_with_each_broker_input(
    broker: dict[str, str], field: str, data: st.DataObject
) -> None:
    key_input = KeyInput(
        ARN, "alice", None, 3600, POLICY, {"team": "a"}, **broker, default_subject="x"
    )
    old = broker[field]
    new = data.draw(broker_texts | st.text(UNICODE, min_size=1, max_size=3).map(old.__add__))
    assume(new != old)
    assert dataclasses.replace(key_input, **{field: new}).key() != key_input.key()


junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=20),
    st.binary(max_size=8),
    st.lists(st.integers() | st.text(max_size=5), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=3),
)
#: JSON number literals of any size, exponents far beyond what a float (or Decimal) holds.
number_literals = st.from_regex(
    r"-?(0|[1-9][0-9]{0,30})(\.[0-9]{1,30})?([eE][+-]?[0-9]{1,25})?", fullmatch=True
) | st.builds(
    "{}e{}".format,
    st.sampled_from(["0", "-0.0", "1", "-2.5"]),
    st.integers() | st.integers(-(10**30), 10**30),
)

junk_policies = st.one_of(
    junk,
    st.text(max_size=40),
    number_literals.map(lambda number: '{"n": ' + number + "}"),
    st.builds(render_json, policy_documents, st.randoms(use_true_random=False)),
    st.sampled_from(
        [
            "[]",
            '"{}"',
            '{"a": NaN}',
            '{"a": -Infinity}',
            '{"a": 1, "a": 1}',
            '{"a": "\\ud800"}',
            "{\"a\": '1'}",
            '{"a": 01}',
            '{"a": 1.}',
        ]
    ),
    st.dictionaries(
        st.text(max_size=5) | st.integers(-2, 2) | st.none() | st.booleans(),
        st.floats()
        | st.text(max_size=5)
        | st.integers()
        | st.sets(st.integers(), max_size=2)
        | st.just(Decimal(1))
        | json_trees(st.integers() | st.text(max_size=3)),
        max_size=3,
    ),
)
junk_claims = st.one_of(
    junk,
    claim_maps,
    st.dictionaries(
        st.sampled_from(sorted(RESERVED_CLAIMS)) | st.text(max_size=5) | st.integers(),
        st.floats()
        | st.text(max_size=5)
        | st.integers()
        | st.sets(st.integers(), max_size=2)
        | claim_values,
        max_size=3,
    ),
)
junk_arns = st.one_of(
    role_arns,
    st.builds(
        lambda arn, at, text: arn[:at] + text + arn[at:],
        role_arns,
        st.integers(0, 100),
        st.text(max_size=2),
    ),
    st.text(max_size=80),
    junk,
)


@PROPERTY_SETTINGS
@given(
    arn=junk_arns,
    subject=st.one_of(st.none(), subjects, st.text(st.characters(), max_size=300), junk),
    session_name=st.one_of(st.none(), session_names, st.text(max_size=70), junk),
    duration_seconds=st.one_of(durations, st.integers(), junk),
    policy=st.one_of(st.none(), junk_policies),
    claims=st.one_of(st.none(), junk_claims),
)
def test_role_validation_raises_only_value_error(
    arn: Any, subject: Any, session_name: Any, duration_seconds: Any, policy: Any, claims: Any
) -> None:
    arguments = (arn, subject, session_name, duration_seconds, policy, claims)
    try:
        role = Role(*arguments)
    except ValueError:
        return
    key = identity_key(role, **KEY_DEFAULTS)
    assert re.fullmatch(r"[0-9a-f]{64}", key)
    again = Role(*arguments)
    assert again == role
    assert hash(again) == hash(role)
    assert identity_key(again, **KEY_DEFAULTS) == key


@PROPERTY_SETTINGS
@given(literal=number_literals)
def test_policy_numbers_of_any_size_are_kept_or_rejected_with_value_error(literal: str) -> None:
    policy = '{"n": ' + literal + "}"
    try:
        role = Role(ARN, policy=policy)
    except ValueError:
        return
    assert role.policy == policy
    assert re.fullmatch(r"[0-9a-f]{64}", key_of(role))


def nested_lists(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


@settings(PROPERTY_SETTINGS, max_examples=50)
@given(
    depth=st.sampled_from([10, 300, 600, 1000, 3000]) | st.integers(1, 3000),
    form=st.sampled_from(["policy text", "policy dict", "claims"]),
)
def test_deeply_nested_policy_or_claims_are_kept_or_rejected_with_value_error(
    depth: int, form: str
) -> None:
    if form == "policy text":
        arguments: dict[str, Any] = {"policy": '{"a": ' + "[" * depth + "]" * depth + "}"}
    else:
        arguments = {form.split()[0]: {"a": nested_lists(depth)}}
    try:
        role = Role(ARN, **arguments)
    except ValueError:
        return
    assert re.fullmatch(r"[0-9a-f]{64}", key_of(role))


#: Distinctive values: "§" appears in no ARN, session name, subject or claim name below.
secrets = st.lists(
    st.text(string.ascii_letters + string.digits, min_size=8, max_size=16).map("§{}§".format),
    min_size=3,
    max_size=3,
    unique=True,
)
names = st.text(NAME_CHARS, min_size=1, max_size=8)
#: JSON trees whose leaves (ints) and some keys (ints) stand for the secrets to hide in them.
secret_holders = st.recursive(
    st.integers(0, 2),
    lambda children: (
        st.lists(children, min_size=1, max_size=3)
        | st.dictionaries(names | st.integers(0, 2), children, min_size=1, max_size=3)
    ),
    max_leaves=6,
)


def holding(tree: Any, markers: list[str]) -> Any:
    """``tree`` with every int replaced by that marker."""
    if isinstance(tree, int):
        return markers[tree]
    if isinstance(tree, str):
        return tree
    if isinstance(tree, list):
        return [holding(item, markers) for item in tree]
    return {holding(name, markers): holding(item, markers) for name, item in tree.items()}


@IDENTITY_SETTINGS
@given(
    markers=secrets,
    policy=st.dictionaries(names | st.integers(0, 2), secret_holders, max_size=3),
    claims=st.dictionaries(names.filter(lambda n: n not in RESERVED_CLAIMS), secret_holders),
    arn=role_arns,
    subject=st.none()
    | st.text(
        st.characters(codec="utf-8", exclude_categories=("Cc",), exclude_characters="§"),
        min_size=1,
        max_size=40,
    ),
    session_name=st.none() | session_names,
    rnd=st.randoms(use_true_random=False),
)
def test_repr_never_shows_policy_or_claim_values(
    markers: list[str],
    policy: dict[Any, Any],
    claims: dict[str, Any],
    arn: str,
    subject: str | None,
    session_name: str | None,
    rnd: random.Random,
) -> None:
    role = Role(
        arn,
        subject=subject,
        session_name=session_name,
        policy=render_policy(holding(policy, markers), rnd),
        claims=holding(claims, markers),
    )
    for text in (repr(role), str(role)):
        assert role.arn in text
        for marker in markers:
            assert marker not in text


# --- regressions from the property tests ----------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("0e1000000000000000000", "0"),
        ("1e999999999999999999", "0.1e1000000000000000000"),
        ("10e999999999999999999", "1e1000000000000000000"),
    ],
)
def test_numbers_beyond_decimals_exponent_limits_are_exact_values(first: str, second: str) -> None:
    assert Role(ARN, policy=f'{{"n": {first}}}') == Role(ARN, policy=f'{{"n": {second}}}')


@pytest.mark.parametrize("depth", [65, 500, 5000])
@pytest.mark.parametrize("field", ["policy-text", "policy-dict", "claims"])
def test_nesting_beyond_the_limit_is_a_value_error(depth: int, field: str) -> None:
    nested: Any = []
    for _ in range(depth):
        nested = [nested]
    options: dict[str, Any] = {
        "policy-text": {"policy": '{"a": ' + "[" * depth + "]" * depth + "}"},
        "policy-dict": {"policy": {"a": nested}},
        "claims": {"claims": {"a": nested}},
    }[field]
    with pytest.raises(ValueError, match=field.split("-")[0]):
        Role(ARN, **options)


def test_nesting_up_to_the_limit_is_accepted() -> None:
    assert Role(ARN, policy='{"a": ' + "[" * 63 + "]" * 63 + "}").policy is not None


# --- interning: Role(...) with the same plain arguments returns the Role it made -------------

INTERN_ARN = "arn:aws:iam::123456789012:role/interned"
INTERN_POLICY = (
    '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:*","Resource":"*"}]}'
)


def full_path(*args: Any, **kwargs: Any) -> Role:
    """A Role validated in full, bypassing the interning table."""
    return type.__call__(Role, *args, **kwargs)  # type: ignore[no-any-return]


def test_the_same_plain_arguments_give_the_same_role() -> None:
    # New str objects each time, as a resolver building them from a header makes.
    def build() -> Role:
        tenant = "".join(["ac", "me"])
        return Role(f"{INTERN_ARN}-{tenant}", subject=f"tenant:{tenant}", policy=INTERN_POLICY)

    first = build()
    assert build() is first
    # Positional and keyword spellings of one call share the entry.
    assert Role(f"{INTERN_ARN}-acme", "tenant:acme", None, 3600, INTERN_POLICY) is first
    assert first == full_path(f"{INTERN_ARN}-acme", subject="tenant:acme", policy=INTERN_POLICY)
    assert (
        first._canonical
        == full_path(f"{INTERN_ARN}-acme", subject="tenant:acme", policy=INTERN_POLICY)._canonical
    )


def test_invalid_arguments_are_refused_every_time_even_next_to_a_cached_equal_value() -> None:
    Role(INTERN_ARN, duration_seconds=3600)  # cached
    for _ in range(2):
        with pytest.raises(ValueError, match="duration_seconds"):
            Role(INTERN_ARN, duration_seconds=3600.0)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="arn"):
            Role("arn:aws:iam::123:role/short-account")
        with pytest.raises(ValueError, match="subject"):
            Role(INTERN_ARN, subject="")
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        Role(INTERN_ARN, tenant="acme")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="arn"):
        Role()  # type: ignore[call-arg]


def test_only_plain_arguments_are_interned() -> None:
    class Text(str):
        pass

    plain = Role(INTERN_ARN, subject="s")
    # A str subclass equal to the plain value is validated in full: an equal Role, not the same.
    other = Role(Text(INTERN_ARN), subject=Text("s"))
    assert other == plain and other is not plain
    # Claims (a mapping) and a mapping policy are never interned.
    claims = {"tenant": "acme"}
    assert Role(INTERN_ARN, claims=claims) is not Role(INTERN_ARN, claims=claims)
    policy = json.loads(INTERN_POLICY)
    assert Role(INTERN_ARN, policy=policy) is not Role(INTERN_ARN, policy=policy)
    assert Role(INTERN_ARN, policy=policy) == Role(INTERN_ARN, policy=INTERN_POLICY)


def test_the_interning_table_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from stscreds import _roles

    monkeypatch.setattr(_roles, "INTERN_SIZE", 8)
    table = Role._interned  # type: ignore[attr-defined]
    monkeypatch.setattr(Role, "_interned", {})
    for i in range(50):
        Role(INTERN_ARN, subject=f"s{i}")
        assert len(Role._interned) <= 8  # type: ignore[attr-defined]
    # The newest stay; the oldest were dropped (and are simply made again when asked for).
    newest = Role(INTERN_ARN, subject="s49")
    assert Role(INTERN_ARN, subject="s49") is newest
    assert Role(INTERN_ARN, subject="s0") == full_path(INTERN_ARN, subject="s0")
    assert table is not Role._interned  # type: ignore[attr-defined]


@settings(max_examples=200, deadline=None)
@given(
    subject=st.one_of(st.none(), st.text(min_size=1, max_size=40)),
    duration=st.integers(min_value=800, max_value=44000),
)
def test_an_interned_role_is_the_role_validation_would_make(
    subject: str | None, duration: int
) -> None:
    try:
        expected = full_path(INTERN_ARN, subject=subject, duration_seconds=duration)
    except ValueError as error:
        with pytest.raises(ValueError, match=re.escape(str(error))):
            Role(INTERN_ARN, subject=subject, duration_seconds=duration)
        return
    role = Role(INTERN_ARN, subject=subject, duration_seconds=duration)
    assert role == expected and role._canonical == expected._canonical
    assert Role(INTERN_ARN, subject=subject, duration_seconds=duration) is role


# --- RoleTemplate: one validated Role per tenant value, looked up like a dict ---------------

TEMPLATE_ARN = "arn:aws:iam::123456789012:role/tenant-{tenant}"
TEMPLATE_POLICY = (
    '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:GetObject",'
    '"Resource":"arn:aws:s3:::data/tenants/{tenant}/*"}]}'
)


def tenant_template(**kwargs: Any) -> RoleTemplate:
    kwargs.setdefault("subject", "tenant:{tenant}")
    kwargs.setdefault("policy", TEMPLATE_POLICY)
    return RoleTemplate(TEMPLATE_ARN, **kwargs)


def test_a_template_builds_the_role_its_fields_describe() -> None:
    template = tenant_template()
    role = template["acme"]
    expected = full_path(
        "arn:aws:iam::123456789012:role/tenant-acme",
        subject="tenant:acme",
        policy=TEMPLATE_POLICY.replace("{tenant}", "acme"),
    )
    assert role == expected and role._canonical == expected._canonical
    assert role.policy == TEMPLATE_POLICY.replace("{tenant}", "acme")
    # Built once: the same object from a str or the header's raw bytes, a plain dict hit after.
    assert template["acme"] is role
    assert template[b"acme"] == role
    assert template[b"acme"] is template[b"acme"]
    assert template.get("acme") is role
    assert "acme" in template and len(template) == 2
    # Tenants are different identities.
    assert template["globex"] != role


def test_a_template_value_is_limited_to_iam_name_characters() -> None:
    template = tenant_template()
    # Each would change what the Role means: another ARN path, a broken-out policy string,
    # control characters in the subject.
    for value in [
        "a/b",
        "../admin",
        'x"}]},{"Effect":"Allow","Action":"*","Resource":"*',
        "a\\b",
        "tab\there",
        "",
        "x" * 65,
        "é",
        b"\xff",
        b"a:b",
    ]:
        with pytest.raises(ValueError, match=r"^tenant: must be 1-64 characters") as info:
            template[value]
        # The request's value is not echoed into the message (nor into a log).
        shown = value.decode("latin-1") if isinstance(value, bytes) else value
        assert not shown or shown not in str(info.value)
        assert template.get(value) is None
        assert template.get(value, "none") == "none"
    assert len(template) == 0
    for ok in ["a", "acme-01", "A_b+c=d,e.f@g", "x" * 57]:  # tenant- + 57 = 64, IAM's limit
        assert template[ok].arn == f"arn:aws:iam::123456789012:role/tenant-{ok}"


def test_a_template_key_must_be_str_or_bytes() -> None:
    template = tenant_template()
    for key in [3, 1.5, None, ("acme",)]:
        with pytest.raises(TypeError, match=r"RoleTemplate keys must be str or bytes, not"):
            template[key]  # type: ignore[index]
        assert template.get(key) is None  # type: ignore[arg-type]


def test_a_str_subclass_key_is_stored_as_its_plain_value() -> None:
    import enum

    class Tenant(enum.StrEnum):
        ACME = "acme"

    template = tenant_template()
    role = template[Tenant.ACME]
    assert role.arn.endswith("tenant-acme")
    assert [key.__class__ for key in template] == [str]
    assert template["acme"] is role


def test_a_template_is_checked_when_it_is_made() -> None:
    with pytest.raises(ValueError, match=r"^subject: unknown placeholder \{tenat\}"):
        RoleTemplate(TEMPLATE_ARN, subject="tenant:{tenat}")
    with pytest.raises(ValueError, match=r"^template: \{tenant\} appears in none of"):
        RoleTemplate("arn:aws:iam::123456789012:role/fixed", subject="everyone")
    with pytest.raises(ValueError, match=r"^arn:"):
        RoleTemplate("arn:aws:iam::12345:role/tenant-{tenant}")
    with pytest.raises(ValueError, match=r"^duration_seconds:"):
        tenant_template(duration_seconds=60)
    with pytest.raises(ValueError, match=r"^policy: must be a JSON object"):
        tenant_template(policy="{tenant}")
    with pytest.raises(ValueError, match=r"^field:"):
        tenant_template(field="not an identifier")
    for size in [0, -1, True, 1.5]:
        with pytest.raises(ValueError, match=r"^maxsize:"):
            tenant_template(maxsize=size)
    with pytest.raises(ValueError, match=r"^claims:"):
        tenant_template(claims={"sub": "override"})


def test_a_template_may_name_the_account_and_its_own_field() -> None:
    template = RoleTemplate(
        "arn:aws:iam::{account}:role/stscreds-access", subject="customer:{account}", field="account"
    )
    role = template["210987654321"]
    assert role.arn == "arn:aws:iam::210987654321:role/stscreds-access"
    assert role.subject == "customer:210987654321"
    with pytest.raises(ValueError, match=r"^arn:"):
        template["not-an-account"]  # a valid value, but no valid ARN: Role's own message


def test_a_mapping_policy_and_static_claims() -> None:
    policy = json.loads(TEMPLATE_POLICY)
    template = RoleTemplate(
        TEMPLATE_ARN, subject="tenant:{tenant}", policy=policy, claims={"tier": "gold"}
    )
    role = template["acme"]
    assert (
        json.loads(role.policy or "")["Statement"][0]["Resource"]
        == "arn:aws:s3:::data/tenants/acme/*"
    )
    assert dict(role.claims or {}) == {"tier": "gold"}
    assert role == tenant_template(claims={"tier": "gold"})["acme"]


def test_a_template_is_read_only_and_bounded() -> None:
    template = tenant_template(maxsize=3)
    for name in ["a1", "a2", "a3", "a4", "a5"]:
        template[name]
        assert len(template) <= 3
    assert list(template) == ["a3", "a4", "a5"]  # the oldest went first
    assert template["a1"].arn.endswith("tenant-a1")  # and is simply built again
    other = tenant_template()
    with pytest.raises(TypeError, match="read-only"):
        template["x"] = other["x"]
    for method, args in [
        ("__delitem__", ("a4",)),
        ("setdefault", ("x", None)),
        ("update", ({},)),
        ("pop", ("a4",)),
        ("popitem", ()),
        ("__ior__", ({},)),
    ]:
        with pytest.raises(TypeError, match="read-only"):
            getattr(template, method)(*args)
    template.clear()
    assert len(template) == 0


def test_templates_compare_by_identity_and_pickle_by_definition() -> None:
    import pickle

    first, second = tenant_template(), tenant_template()
    assert first != second and first == first
    assert len({first, second}) == 2
    first["acme"]
    copy = pickle.loads(pickle.dumps(first))
    assert len(copy) == 0 and copy["acme"] == first["acme"]
    assert "tenant-{tenant}" in repr(first) and "policy=..." in repr(first)
    assert TEMPLATE_POLICY not in repr(first)


@settings(max_examples=200, deadline=None)
@given(value=st.text(max_size=70) | st.binary(max_size=70))
def test_a_template_role_is_the_role_of_its_filled_fields(value: str | bytes) -> None:
    template = tenant_template()
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    if not re.fullmatch(r"[\w+=,.@-]{1,64}", text, re.ASCII) or "\ufffd" in text:
        with pytest.raises(ValueError):
            template[value]
        return
    role = template[value]
    assert role == full_path(
        TEMPLATE_ARN.replace("{tenant}", text),
        subject=f"tenant:{text}",
        policy=TEMPLATE_POLICY.replace("{tenant}", text),
    )


def readme_resolvers() -> list[tuple[str, Any]]:
    """Each README snippet's ``TENANT_ROLE`` and ``resolve_role``, executed as written."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    found = []
    for block in re.findall(r"```python\n(.*?)```", readme, re.DOTALL):
        if "TENANT_ROLE = RoleTemplate(" not in block:
            continue
        start = block.index("TENANT_ROLE = RoleTemplate(")
        end = block.index("\n\n", block.index("def resolve_role", start))
        namespace: dict[str, Any] = {"Role": Role, "RoleTemplate": RoleTemplate}
        exec(block[start:end], namespace)  # the README's own code
        found.append((block[start:end], namespace["resolve_role"]))
    return found


def test_the_readme_resolvers_do_what_the_readme_says() -> None:
    resolvers = readme_resolvers()
    assert len(resolvers) == 3  # Starlette, FastAPI, Flask
    expected = full_path("arn:aws:iam::123456789012:role/tenant-acme", subject="tenant:acme")
    for source, resolve in resolvers:
        wsgi = "environ" in source

        def request(tenant: bytes | None, wsgi: bool = wsgi) -> Any:
            if wsgi:
                return {} if tenant is None else {"HTTP_X_TENANT": tenant.decode("latin-1")}
            return {"headers": [] if tenant is None else [(b"x-tenant", tenant)]}

        assert resolve(request(b"acme")) == expected
        assert resolve(request(b"acme")) is resolve(request(b"acme"))
        for bad in [None, b"", b"a/b", b"x" * 65, b'"}']:
            assert resolve(request(bad)) is None, (source, bad)
