"""Tests for stscreds._roles: Role validation, equality, identity keys, session names."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import re
from typing import Any

import pytest

from stscreds._roles import RESERVED_CLAIMS, Role, identity_key, sanitize_session_name

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
