"""Tests for stscreds.trust: the recommended trust policy and the trust policy check."""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stscreds.trust import Finding, check_trust_policy, recommended_trust_policy

ISSUER = "https://app.example.com"
HOST = "app.example.com"
SUB = f"{HOST}:sub"
AUD = f"{HOST}:aud"
STS_AUD = "sts.amazonaws.com"
PROVIDER = f"arn:aws:iam::123456789012:oidc-provider/{HOST}"
OTHER_PROVIDER = "arn:aws:iam::123456789012:oidc-provider/token.actions.githubusercontent.com"
ACTION = "sts:AssumeRoleWithWebIdentity"


def statement(
    condition: dict[str, Any] | None = None,
    *,
    principal: Any = None,
    action: Any = ACTION,
    effect: str = "Allow",
    **extra: Any,
) -> dict[str, Any]:
    """An Allow statement for this issuer's provider, with ``condition``."""
    result: dict[str, Any] = {
        "Effect": effect,
        "Principal": {"Federated": PROVIDER} if principal is None else principal,
    }
    if action is not None:
        result["Action"] = action
    if condition is not None:
        result["Condition"] = condition
    result.update(extra)
    return result


def policy(*statements: dict[str, Any]) -> dict[str, Any]:
    return {"Version": "2012-10-17", "Statement": list(statements)}


def pinned(sub: Any = "tenant:acme", operator: str = "StringLike") -> dict[str, Any]:
    """Condition: aud exactly sts.amazonaws.com, sub under ``operator``."""
    if operator == "StringEquals":
        return {"StringEquals": {AUD: STS_AUD, SUB: sub}}
    return {"StringEquals": {AUD: STS_AUD}, operator: {SUB: sub}}


GOOD = policy(statement(pinned("tenant:acme", "StringEquals")))
ERROR, WARNING = "error", "warning"

# (policy, keyword arguments, the exact set of (severity, condition key) expected)
TABLE = [
    pytest.param(GOOD, {}, set(), id="good-exact-sub"),
    pytest.param(
        policy(
            statement(
                {"StringEquals": {f"https://{AUD}": STS_AUD, f"https://{SUB}": "tenant:acme"}}
            )
        ),
        {},
        {(ERROR, f"https://{AUD}"), (ERROR, f"https://{SUB}")},
        id="keys-with-the-scheme-admit-nothing",
    ),
    pytest.param(
        policy(
            statement(
                {
                    "StringEquals": {AUD: STS_AUD},
                    "StringNotEquals": {f"{HOST}/:sub": "tenant:evil"},
                }
            )
        ),
        {},
        {(ERROR, f"{HOST}/:sub"), (ERROR, SUB)},
        id="negated-misspelled-key-restricts-nothing",
    ),
    pytest.param(
        policy(statement({"StringEquals": {AUD: STS_AUD}})), {}, {(ERROR, SUB)}, id="missing-sub"
    ),
    pytest.param(
        policy(statement(None)), {}, {(ERROR, SUB), (WARNING, AUD)}, id="no-condition-at-all"
    ),
    pytest.param(
        policy(statement({"StringEquals": {AUD: STS_AUD}, "StringNotEquals": {SUB: "tenant:x"}})),
        {},
        {(ERROR, SUB)},
        id="sub-only-under-StringNotEquals",
    ),
    pytest.param(
        policy(statement({"StringEquals": {AUD: STS_AUD}, "StringNotLike": {SUB: "admin:*"}})),
        {},
        {(ERROR, SUB)},
        id="sub-only-under-StringNotLike",
    ),
    pytest.param(
        policy(statement({"StringEquals": {AUD: STS_AUD}, "Null": {SUB: "false"}})),
        {},
        {(ERROR, SUB)},
        id="sub-only-under-Null",
    ),
    pytest.param(policy(statement(pinned("*"))), {}, {(ERROR, SUB)}, id="sub-star"),
    pytest.param(policy(statement(pinned("tenant:*"))), {}, {(ERROR, SUB)}, id="sub-tenant-star"),
    pytest.param(
        policy(statement(pinned("tenant:acme*"))), {}, {(ERROR, SUB)}, id="sub-tenant-acme-star"
    ),
    pytest.param(
        policy(statement(pinned("t?nant:acme"))), {}, {(ERROR, SUB)}, id="sub-question-mark"
    ),
    pytest.param(
        policy(statement(pinned("tenant:*:admin"))), {}, {(ERROR, SUB)}, id="sub-wildcard-mid"
    ),
    pytest.param(
        policy(statement(pinned("tenant::*"))), {}, {(ERROR, SUB)}, id="sub-empty-segment"
    ),
    # Without a subject template nothing says where the tenant id sits: every wildcard is an
    # error, even as the whole last segment.
    pytest.param(
        policy(statement(pinned("tenant:acme:*"))),
        {},
        {(ERROR, SUB)},
        id="sub-last-segment-wildcard-without-template",
    ),
    pytest.param(
        policy(statement(pinned("tenant/acme/*"))),
        {},
        {(ERROR, SUB)},
        id="sub-slash-segment-wildcard-without-template",
    ),
    pytest.param(
        policy(statement(pinned("system:serviceaccount:*"))),
        {},
        {(ERROR, SUB)},
        id="eks-service-account-wildcard-without-template",
    ),
    pytest.param(
        policy(statement(pinned("app:tenant:*"))),
        {},
        {(ERROR, SUB)},
        id="app-tenant-wildcard-without-template",
    ),
    pytest.param(
        policy(statement(pinned("tenant:acme", "StringEquals"))),
        {},
        set(),
        id="good-StringEquals-exact",
    ),
    pytest.param(
        policy(statement(pinned("tenant:*", "StringEquals"))),
        {},
        set(),
        id="star-under-StringEquals-is-literal",
    ),
    pytest.param(
        policy(statement(pinned("tenant:acme"))), {}, set(), id="good-StringLike-no-wildcard"
    ),
    # Several exact subjects: without a template they may be one tenant's, a warning.
    pytest.param(
        policy(statement(pinned(["tenant:acme", "tenant:globex"], "StringEquals"))),
        {},
        {(WARNING, SUB)},
        id="list-of-exact-subs-without-template",
    ),
    pytest.param(
        policy(statement(pinned(["tenant:acme", "tenant:acme:admin"], "StringEquals"))),
        {},
        {(WARNING, SUB)},
        id="list-of-one-tenants-subs-without-template",
    ),
    pytest.param(
        policy(statement(pinned(["tenant:acme", "tenant:acme"], "StringEquals"))),
        {},
        set(),
        id="good-list-repeating-one-sub",
    ),
    pytest.param(
        policy(
            statement(pinned("tenant:acme", "StringEquals")),
            statement(pinned("tenant:globex", "StringEquals")),
        ),
        {},
        {(WARNING, SUB)},
        id="two-statements-different-subs-without-template",
    ),
    pytest.param(
        policy(
            statement(
                {
                    "StringEquals": {AUD: STS_AUD, SUB: ["tenant:acme", "tenant:globex"]},
                    "StringLike": {SUB: "tenant:a*"},
                }
            )
        ),
        {},
        set(),
        id="good-exact-list-narrowed-by-wildcard",
    ),
    pytest.param(
        policy(statement(pinned(["tenant:acme", "tenant:*"]))),
        {},
        {(ERROR, SUB)},
        id="list-with-one-wildcard",
    ),
    pytest.param(
        policy(statement(pinned("tenant:acme", "ForAnyValue:StringEquals"))),
        {},
        set(),
        id="good-ForAnyValue-StringEquals",
    ),
    pytest.param(
        policy(statement(pinned("tenant:*", "ForAnyValue:StringLike"))),
        {},
        {(ERROR, SUB)},
        id="ForAnyValue-StringLike-wildcard",
    ),
    pytest.param(
        policy(statement(pinned("tenant:*", "StringLikeIfExists"))),
        {},
        {(ERROR, SUB)},
        id="StringLikeIfExists-wildcard",
    ),
    pytest.param(
        policy(
            statement(
                {"StringEquals": {AUD: STS_AUD, SUB: "tenant:acme"}, "StringLike": {SUB: "*"}}
            )
        ),
        {},
        set(),
        id="wildcard-and-exact-both-required",
    ),
    pytest.param(
        policy(statement(pinned("tenant:acme", "StringEqualsIgnoreCase"))),
        {},
        {(WARNING, SUB)},
        id="sub-ignore-case-noted",
    ),
    pytest.param(
        policy(statement(pinned("${app.example.com:sub}"))),
        {},
        {(ERROR, SUB)},
        id="sub-policy-variable",
    ),
    pytest.param(
        policy(statement(pinned("tenant:acme${*}"))),
        {},
        set(),
        id="escaped-star-is-literal",
    ),
    # With the subject template: crossing means two tenants' subjects match.
    pytest.param(
        policy(statement(pinned("tenant:acme*"))),
        {"subject_template": "tenant:{tenant}"},
        {(ERROR, SUB)},
        id="template-prefix-crosses",
    ),
    pytest.param(
        policy(statement(pinned("tenant:acm?"))),
        {"subject_template": "tenant:{tenant}"},
        {(ERROR, SUB)},
        id="template-question-mark-crosses",
    ),
    pytest.param(
        policy(statement(pinned("*:acme"))),
        {"subject_template": "{tenant}:acme"},
        {(ERROR, SUB)},
        id="template-leading-star-crosses",
    ),
    pytest.param(
        policy(statement(pinned("tenant:*"))),
        {"subject_template": "tenant:{tenant}:{tenant}"},
        {(ERROR, SUB)},
        id="template-repeated-placeholder-crosses",
    ),
    pytest.param(
        policy(statement(pinned("tenant:acme:*"))),
        {"subject_template": "tenant:{tenant}:app"},
        set(),
        id="template-good-suffix-wildcard",
    ),
    pytest.param(
        policy(statement(pinned("app:tenant:*"))),
        {"subject_template": "app:tenant:{tenant}"},
        {(ERROR, SUB)},
        id="template-app-tenant-wildcard-crosses",
    ),
    pytest.param(
        policy(statement(pinned("system:serviceaccount:*"))),
        {"subject_template": "system:serviceaccount:{tenant}:app"},
        {(ERROR, SUB)},
        id="template-eks-namespace-wildcard-crosses",
    ),
    pytest.param(
        policy(statement(pinned("system:serviceaccount:acme:*"))),
        {"subject_template": "system:serviceaccount:{tenant}:app"},
        set(),
        id="template-good-eks-service-account-wildcard",
    ),
    pytest.param(
        policy(statement(pinned("t?nant:acme"))),
        {"subject_template": "tenant:{tenant}"},
        set(),
        id="template-wildcard-in-fixed-part-is-one-tenant",
    ),
    pytest.param(
        policy(statement(pinned("tenant:acme:*"))),
        {"subject_template": "tenant:{tenant}"},
        {(WARNING, SUB)},
        id="template-pattern-matches-nothing",
    ),
    pytest.param(
        policy(statement(pinned("tenat:acme", "StringEquals"))),
        {"subject_template": "tenant:{tenant}"},
        {(WARNING, SUB)},
        id="template-exact-typo-matches-nothing",
    ),
    pytest.param(
        policy(statement(pinned("tenant:acme", "StringEquals"))),
        {"subject_template": "tenant:{tenant}"},
        set(),
        id="template-good-exact",
    ),
    # With a template: the tenants whose subjects the whole policy admits, over all values of
    # a condition and all statements.
    pytest.param(
        policy(statement(pinned(["tenant:acme", "tenant:globex"], "StringEquals"))),
        {"subject_template": "tenant:{tenant}"},
        {(ERROR, SUB)},
        id="template-list-of-two-tenants",
    ),
    pytest.param(
        policy(statement(pinned(["tenant:acme", "tenant:globex"]))),
        {"subject_template": "tenant:{tenant}"},
        {(ERROR, SUB)},
        id="template-StringLike-list-of-two-tenants",
    ),
    pytest.param(
        policy(statement(pinned(["tenant:acme", "tenant:acme:admin"], "StringEquals"))),
        {"subject_template": "tenant:{tenant}:admin"},
        {(WARNING, SUB)},
        id="template-list-one-tenant-one-mismatch",
    ),
    pytest.param(
        policy(
            statement(pinned("tenant:acme", "StringEquals")),
            statement(pinned("tenant:globex", "StringEquals")),
        ),
        {"subject_template": "tenant:{tenant}"},
        {(ERROR, SUB)},
        id="template-two-statements-two-tenants",
    ),
    pytest.param(
        policy(
            statement(pinned("tenant:acme", "StringEquals")),
            statement(pinned("t?nant:globex")),
        ),
        {"subject_template": "tenant:{tenant}"},
        {(ERROR, SUB)},
        id="template-two-statements-exact-and-wildcard",
    ),
    pytest.param(
        policy(GOOD["Statement"][0], statement(pinned("tenant:acme", "StringEquals"))),
        {"subject_template": "tenant:{tenant}"},
        set(),
        id="template-good-two-statements-one-tenant",
    ),
    pytest.param(
        policy(
            GOOD["Statement"][0],
            statement(pinned("tenant:globex", "StringEquals"), effect="Deny"),
        ),
        {"subject_template": "tenant:{tenant}"},
        set(),
        id="template-deny-statement-not-collected",
    ),
    pytest.param(
        policy(
            GOOD["Statement"][0],
            statement(
                pinned("tenant:globex", "StringEquals"), principal={"Federated": OTHER_PROVIDER}
            ),
        ),
        {"subject_template": "tenant:{tenant}"},
        {(ERROR, None)},
        id="template-other-provider-statement-not-collected",
    ),
    pytest.param(
        policy(
            GOOD["Statement"][0],
            statement(pinned("tenant:globex", "StringEquals"), principal="*"),
        ),
        {"subject_template": "tenant:{tenant}"},
        {(ERROR, None), (ERROR, SUB)},
        id="template-principal-star-statement-collected",
    ),
    pytest.param(
        policy(
            statement(
                {
                    "StringEquals": {AUD: STS_AUD, SUB: ["tenant:acme", "tenant:globex"]},
                    "StringLike": {SUB: "tenant:a*"},
                }
            )
        ),
        {"subject_template": "tenant:{tenant}"},
        set(),
        id="template-good-exact-list-narrowed-by-wildcard",
    ),
    # With a template, case folding admits tenants RoleTemplate keeps apart.
    pytest.param(
        policy(statement(pinned("tenant:acme", "StringEqualsIgnoreCase"))),
        {"subject_template": "tenant:{tenant}"},
        {(ERROR, SUB)},
        id="template-ignore-case-two-tenants",
    ),
    pytest.param(
        policy(statement(pinned("TENANT:Acme", "StringEqualsIgnoreCase"))),
        {"subject_template": "tenant:{tenant}"},
        {(ERROR, SUB)},
        id="template-ignore-case-other-spelling",
    ),
    pytest.param(
        policy(statement(pinned("TENANT:1234", "StringEqualsIgnoreCase"))),
        {"subject_template": "tenant:{tenant}"},
        set(),
        id="template-good-ignore-case-tenant-without-letters",
    ),
    pytest.param(
        policy(
            statement(
                {
                    "StringEquals": {AUD: STS_AUD, SUB: "tenant:acme"},
                    "StringEqualsIgnoreCase": {SUB: "tenant:acme"},
                }
            )
        ),
        {"subject_template": "tenant:{tenant}"},
        set(),
        id="template-good-ignore-case-narrowed-by-exact",
    ),
    pytest.param(
        policy(
            statement(
                {
                    "StringEquals": {AUD: STS_AUD},
                    "StringLike": {SUB: "tenant:acme*"},
                    "StringNotLike": {SUB: "tenant:acme?*"},
                }
            )
        ),
        {"subject_template": "tenant:{tenant}"},
        {(ERROR, SUB)},
        id="template-negation-does-not-restrict",
    ),
    pytest.param(
        policy(statement({"StringEquals": {SUB: "tenant:acme"}, "StringLike": {SUB: "tenant:*"}})),
        {"subject_template": "tenant:{tenant}"},
        {(WARNING, AUD)},
        id="template-wildcard-and-exact-both-required",
    ),
    # The audience.
    pytest.param(
        policy(statement({"StringEquals": {AUD: "my-client", SUB: "tenant:acme"}})),
        {},
        {(ERROR, AUD)},
        id="wrong-audience",
    ),
    pytest.param(
        policy(statement({"StringEquals": {AUD: [STS_AUD, "my-client"], SUB: "tenant:acme"}})),
        {},
        {(ERROR, AUD)},
        id="extra-audience",
    ),
    pytest.param(
        policy(statement({"StringLike": {AUD: "sts.*"}, "StringEquals": {SUB: "tenant:acme"}})),
        {},
        {(ERROR, AUD)},
        id="audience-wildcard",
    ),
    pytest.param(
        policy(statement({"StringEquals": {SUB: "tenant:acme"}})),
        {},
        {(WARNING, AUD)},
        id="missing-audience-is-a-warning",
    ),
    pytest.param(
        policy(
            statement({"StringEquals": {SUB: "tenant:acme"}, "StringNotEquals": {AUD: "other"}})
        ),
        {},
        {(WARNING, AUD)},
        id="audience-only-negated",
    ),
    pytest.param(
        policy(
            statement(
                {
                    "StringEqualsIgnoreCase": {AUD: "STS.amazonaws.com"},
                    "StringEquals": {SUB: "tenant:acme"},
                }
            )
        ),
        {},
        set(),
        id="audience-ignore-case",
    ),
    pytest.param(
        policy(statement({"StringEquals": {AUD: "my-client", SUB: "tenant:acme"}})),
        {"audience": "my-client"},
        set(),
        id="custom-audience",
    ),
    # The principal.
    pytest.param(
        policy(statement(pinned("tenant:acme", "StringEquals"), principal="*")),
        {},
        {(ERROR, None)},
        id="principal-star",
    ),
    pytest.param(
        policy(statement(pinned("tenant:acme", "StringEquals"), principal={"Federated": "*"})),
        {},
        {(ERROR, None)},
        id="federated-star",
    ),
    pytest.param(
        policy(statement(principal="*")),
        {},
        {(ERROR, None), (ERROR, SUB), (WARNING, AUD)},
        id="principal-star-no-condition",
    ),
    pytest.param(
        policy(
            {
                "Effect": "Allow",
                "NotPrincipal": {"AWS": "arn:aws:iam::123456789012:root"},
                "Action": ACTION,
                "Condition": pinned("tenant:acme", "StringEquals"),
            }
        ),
        {},
        {(ERROR, None)},
        id="allow-not-principal",
    ),
    pytest.param(
        policy(
            statement(
                pinned("tenant:acme", "StringEquals"),
                principal={"Federated": [OTHER_PROVIDER, PROVIDER]},
            )
        ),
        {},
        set(),
        id="federated-list-with-ours",
    ),
    pytest.param(
        policy(statement(principal={"Federated": OTHER_PROVIDER}), GOOD["Statement"][0]),
        {},
        set(),
        id="other-provider-ignored",
    ),
    pytest.param(
        policy(statement(principal={"Federated": OTHER_PROVIDER})),
        {},
        {(ERROR, None)},
        id="only-other-provider",
    ),
    pytest.param(
        policy(
            statement(
                pinned("tenant:acme", "StringEquals"), principal={"Federated": OTHER_PROVIDER}
            )
        ),
        {},
        {(ERROR, None)},
        id="our-keys-under-other-provider",
    ),
    pytest.param(
        policy(statement(None, effect="Deny", principal="*"), GOOD["Statement"][0]),
        {},
        set(),
        id="deny-ignored",
    ),
    pytest.param(
        policy(statement(None, effect="Deny")), {}, {(ERROR, None)}, id="only-deny-trusts-nothing"
    ),
    # The action.
    pytest.param(
        policy(statement({"StringEquals": {AUD: STS_AUD}}, action="sts:*")),
        {},
        {(ERROR, SUB)},
        id="action-sts-star",
    ),
    pytest.param(
        policy(statement({"StringEquals": {AUD: STS_AUD}}, action="*")),
        {},
        {(ERROR, SUB)},
        id="action-star",
    ),
    pytest.param(
        policy(
            statement(
                {"StringEquals": {AUD: STS_AUD}}, action=["sts:TagSession", "sts:AssumeRole*"]
            )
        ),
        {},
        {(ERROR, SUB)},
        id="action-list-with-pattern",
    ),
    pytest.param(
        policy(statement({"StringEquals": {AUD: STS_AUD}}, action="STS:assumerolewithwebidentity")),
        {},
        {(ERROR, SUB)},
        id="action-case-insensitive",
    ),
    pytest.param(
        policy(statement(None, action=None, NotAction="sts:AssumeRole")),
        {},
        {(ERROR, SUB), (WARNING, AUD)},
        id="not-action-leaves-it-in",
    ),
    pytest.param(
        policy(statement(None, action=None, NotAction=["sts:AssumeRoleWith*"])),
        {},
        {(ERROR, None)},
        id="not-action-takes-it-out",
    ),
    pytest.param(
        policy(statement(None, action="sts:AssumeRole")),
        {},
        {(ERROR, None)},
        id="other-action-only",
    ),
    # The issuer's form, the partition, the document's form.
    pytest.param(
        policy(
            statement(
                {"StringEquals": {"example.com/app:aud": STS_AUD}},
                principal={"Federated": "arn:aws:iam::123456789012:oidc-provider/example.com/app"},
            )
        ),
        {"issuer": "https://example.com/app/"},
        {(ERROR, "example.com/app:sub")},
        id="issuer-with-path",
    ),
    pytest.param(
        policy(
            statement(
                {"StringEquals": {"example.com:8443:aud": STS_AUD, "example.com:8443:sub": "t:a"}},
                principal={"Federated": "arn:aws:iam::123456789012:oidc-provider/example.com:8443"},
            )
        ),
        {"issuer": "https://example.com:8443"},
        set(),
        id="issuer-with-port",
    ),
    pytest.param(
        policy(
            statement(
                {"StringEquals": {"example.com:8443:aud": STS_AUD, "example.com:sub": "t:a"}},
                principal={"Federated": "arn:aws:iam::123456789012:oidc-provider/example.com:8443"},
            )
        ),
        {"issuer": "https://example.com:8443"},
        {(ERROR, "example.com:8443:sub")},
        id="issuer-with-port-sub-key-without-port",
    ),
    pytest.param(
        policy(
            statement(
                pinned("tenant:acme", "StringEquals"),
                principal={"Federated": f"arn:aws-cn:iam::123456789012:oidc-provider/{HOST}"},
            )
        ),
        {},
        set(),
        id="aws-cn-partition",
    ),
    pytest.param(
        policy(
            statement(
                {"StringEquals": {"APP.Example.com:AUD": STS_AUD, "app.example.com:SUB": "t"}}
            )
        ),
        {},
        set(),
        id="condition-keys-ignore-case",
    ),
    pytest.param(
        {"Version": "2012-10-17", "Statement": statement(pinned("tenant:acme", "StringEquals"))},
        {},
        set(),
        id="single-statement-object",
    ),
    pytest.param(json.dumps(GOOD), {}, set(), id="json-text-good"),
    pytest.param(
        json.dumps(policy(statement({"StringEquals": {AUD: STS_AUD}}))),
        {},
        {(ERROR, SUB)},
        id="json-text-missing-sub",
    ),
    pytest.param(json.dumps(GOOD).encode(), {}, set(), id="json-bytes-good"),
]


@pytest.mark.parametrize(("document", "kwargs", "expected"), TABLE)
def test_trust_policy_table(
    document: Any, kwargs: dict[str, Any], expected: set[tuple[str, str | None]]
) -> None:
    kwargs = {"issuer": ISSUER, **kwargs}
    findings = check_trust_policy(document, **kwargs)
    assert {(f.severity, f.key) for f in findings} == expected, [str(f) for f in findings]
    for finding in findings:
        assert isinstance(finding, Finding)
        if finding.key is not None:
            # The message says which condition key to fix.
            assert finding.message.startswith(f"{finding.key}: ")
            assert finding.key in str(finding)


def test_missing_sub_says_any_tenant_can_assume_the_role() -> None:
    [finding] = check_trust_policy(
        policy(statement({"StringEquals": {AUD: STS_AUD}}, Sid="Web")), issuer=ISSUER
    )
    assert (finding.severity, finding.statement, finding.sid, finding.key) == (
        ERROR,
        0,
        "Web",
        SUB,
    )
    assert "any tenant" in finding.message
    assert ISSUER in finding.message
    assert str(finding) == f"error: statement 0 (Sid Web): {finding.message}"


def test_findings_point_at_the_statement_that_has_the_problem() -> None:
    document = policy(
        GOOD["Statement"][0], statement({"StringEquals": {AUD: STS_AUD}}, Sid="Legacy")
    )
    [finding] = check_trust_policy(document, issuer=ISSUER)
    assert (finding.statement, finding.sid) == (1, "Legacy")
    assert str(finding).startswith("error: statement 1 (Sid Legacy): app.example.com:sub: ")


def test_no_statement_finding_names_the_issuer() -> None:
    [finding] = check_trust_policy(
        policy(statement(principal={"Federated": OTHER_PROVIDER})), issuer=ISSUER
    )
    assert (finding.statement, finding.sid, finding.key) == (None, None, None)
    assert f"no statement lets {ISSUER} assume this role" in finding.message
    assert str(finding) == f"error: {finding.message}"


def test_audience_findings_name_both_audiences() -> None:
    document = policy(statement({"StringEquals": {AUD: "my-client", SUB: "tenant:acme"}}))
    [finding] = check_trust_policy(document, issuer=ISSUER)
    assert "'my-client'" in finding.message
    assert f"stscreds sends '{STS_AUD}'" in finding.message


def glob_regex(pattern: str) -> re.Pattern[str]:
    return re.compile(
        "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    )


@pytest.mark.parametrize(
    ("pattern", "template"),
    [
        ("tenant:*", "tenant:{tenant}"),
        ("tenant:acme*", "tenant:{tenant}"),
        ("tenant:a?me", "tenant:{tenant}"),
        ("*-prod", "org:{org}-prod"),
        ("org:*:env:prod", "org:{org}:env:prod"),
        ("*a*b*", "{t}"),
        ("x:*", "x:{t}:{t}"),
    ],
)
def test_template_witnesses_are_two_tenants_that_really_match(pattern: str, template: str) -> None:
    [finding] = check_trust_policy(
        policy(statement(pinned(pattern))), issuer=ISSUER, subject_template=template
    )
    witnesses = re.search(r"both '([^']*)' and '([^']*)'", finding.message)
    assert witnesses is not None, finding.message
    placeholder = re.search(r"\{\w+\}", template)
    assert placeholder is not None
    shape = re.compile(
        re.escape(template).replace(re.escape(placeholder.group(0)), r"([\w+=,.@-]{1,64})")
    )
    values = []
    for subject in witnesses.groups():
        assert glob_regex(pattern).fullmatch(subject)
        match = shape.fullmatch(subject)
        assert match is not None
        values.append(match.group(1))
    assert values[0] != values[1]


@settings(max_examples=300, deadline=None)
@given(
    pattern=st.text(alphabet="ab:*?", min_size=1, max_size=6),
    template=st.sampled_from(["{t}", "a:{t}", "{t}:b", "{t}a{t}"]),
)
def test_template_verdict_agrees_with_brute_force(pattern: str, template: str) -> None:
    # Every value of up to 4 characters over a, b and a letter no pattern names.
    values = [
        "".join(chars) for size in range(1, 5) for chars in itertools.product("abx", repeat=size)
    ]
    regex = glob_regex(pattern)
    matching = [v for v in values if regex.fullmatch(template.replace("{t}", v))]
    findings = check_trust_policy(
        policy(statement(pinned(pattern))), issuer=ISSUER, subject_template=template
    )
    verdicts = {f.severity for f in findings if f.key == SUB}
    if len(matching) >= 2:
        assert verdicts == {ERROR}, (matching, findings)
    elif verdicts == {WARNING}:
        assert matching == []  # "matches no subject" is never said of a usable pattern
    elif not verdicts:
        assert len(matching) <= 1


OPERATORS = ["StringLike", "StringEquals", "StringEqualsIgnoreCase"]
# A statement's sub conditions: operator -> values (any may match); all operators must hold.
SUB_CONDITIONS = st.dictionaries(
    st.sampled_from(OPERATORS),
    st.lists(st.text(alphabet="abA:*?", min_size=1, max_size=5), min_size=1, max_size=2),
    min_size=1,
    max_size=2,
)


def admits(statements: list[dict[str, list[str]]], subject: str) -> bool:
    """What IAM does with the sub conditions of these statements, by regex."""

    def one(operator: str, value: str) -> bool:
        if operator == "StringLike":
            return glob_regex(value).fullmatch(subject) is not None
        if operator == "StringEquals":
            return value == subject
        return value.lower() == subject.lower()

    return any(
        all(any(one(operator, v) for v in values) for operator, values in conditions.items())
        for conditions in statements
    )


def sub_policy(statements: list[dict[str, list[str]]]) -> dict[str, Any]:
    built = []
    for conditions in statements:
        condition: dict[str, Any] = {op: {SUB: values} for op, values in conditions.items()}
        condition.setdefault("StringEquals", {})[AUD] = STS_AUD
        built.append(statement(condition))
    return policy(*built)


def tenant_value(template: str, subject: str) -> str | None:
    """The placeholder value of ``template`` that makes ``subject``, if one does."""
    first, *rest = template.split("{t}")
    shape = re.escape(first)
    for index, part in enumerate(rest):
        shape += (r"([A-Za-z0-9_+=,.@-]{1,64})" if index == 0 else r"\1") + re.escape(part)
    match = re.fullmatch(shape, subject)
    return None if match is None else match.group(1)


WITNESSES = [
    re.compile(r"\(both '([^']*)' and '([^']*)' fit"),
    re.compile(r"differ only in case, '([^']*)' and '([^']*)'"),
    re.compile(r"more than one tenant: '([^']*)' and '([^']*)'"),
]


@settings(max_examples=300, deadline=None)
@given(
    statements=st.lists(SUB_CONDITIONS, min_size=1, max_size=2),
    template=st.sampled_from(["{t}", "a:{t}", "{t}:b", "{t}a{t}"]),
)
def test_policy_verdict_with_template_agrees_with_brute_force(
    statements: list[dict[str, list[str]]], template: str
) -> None:
    # Over all values and statements: two tenants admitted is an error, and the two tenants
    # an error names are admitted and different.
    values = [
        "".join(chars) for size in range(1, 5) for chars in itertools.product("abAx", repeat=size)
    ]
    matching = [v for v in values if admits(statements, template.replace("{t}", v))]
    findings = check_trust_policy(sub_policy(statements), issuer=ISSUER, subject_template=template)
    errors = [f for f in findings if f.key == SUB and f.severity == ERROR]
    if len(matching) >= 2:
        assert errors, (matching, findings)
    if not errors:
        assert len(matching) <= 1, findings
    for finding in errors:
        for witness in WITNESSES:
            if found := witness.search(finding.message):
                subjects = found.groups()
                tenants = {tenant_value(template, subject) for subject in subjects}
                assert None not in tenants and len(tenants) == 2, finding.message
                assert all(admits(statements, subject) for subject in subjects), finding.message
                break
        else:
            assert "too complex" in finding.message, finding.message


@settings(max_examples=300, deadline=None)
@given(statements=st.lists(SUB_CONDITIONS, min_size=1, max_size=2))
def test_policy_verdict_without_template_agrees_with_brute_force(
    statements: list[dict[str, list[str]]],
) -> None:
    # Without a template: no error only when every admitted subject is (but for case) one of
    # the policy's exact values, and more than one admitted subject is at least a warning.
    subjects = [
        "".join(chars) for size in range(1, 5) for chars in itertools.product("abA:x", repeat=size)
    ]
    matching = [s for s in subjects if admits(statements, s)]
    findings = check_trust_policy(sub_policy(statements), issuer=ISSUER)
    verdicts = {f.severity for f in findings if f.key == SUB}
    if ERROR not in verdicts:
        exact = {
            v.lower()
            for conditions in statements
            for operator, values in conditions.items()
            for v in values
            if operator != "StringLike" or not set(v) & set("*?")
        }
        assert all(s.lower() in exact for s in matching), (matching, findings)
    if len(matching) >= 2:
        assert verdicts, (matching, findings)


def test_a_pattern_too_complex_to_search_is_an_error_not_a_pass() -> None:
    pattern = "*a*b*c*d*e*f*g*h*i*j*k*l*m*n*o*"
    findings = check_trust_policy(
        policy(statement(pinned(pattern))), issuer=ISSUER, subject_template="x{t}y{t}"
    )
    assert [(f.severity, f.key) for f in findings] == [(ERROR, SUB)]
    assert "too complex" in findings[0].message


def test_wildcard_without_template_says_to_pass_the_template() -> None:
    [finding] = check_trust_policy(
        policy(statement(pinned("system:serviceaccount:*"))), issuer=ISSUER
    )
    assert (finding.severity, finding.key) == (ERROR, SUB)
    assert finding.message.startswith(f"{SUB}: StringLike 'system:serviceaccount:*' ")
    assert "cannot be checked without the subject template" in finding.message
    assert "--subject-template (subject_template=)" in finding.message
    assert "exact subjects" in finding.message


def test_two_tenants_finding_names_both_and_their_statements() -> None:
    document = policy(
        statement(pinned("tenant:acme", "StringEquals"), Sid="Acme"),
        statement(pinned("tenant:globex", "StringEquals"), Sid="Globex"),
    )
    [finding] = check_trust_policy(document, issuer=ISSUER, subject_template="tenant:{tenant}")
    assert (finding.severity, finding.statement, finding.sid, finding.key) == (
        ERROR,
        1,
        "Globex",
        SUB,
    )
    assert (
        "admits the subjects of more than one tenant: 'tenant:acme' and 'tenant:globex'; "
        "a role should trust one tenant's subject"
    ) in finding.message
    assert "statement 0" in finding.message
    assert str(finding).startswith(f"error: statement 1 (Sid Globex): {SUB}: ")


def test_several_exact_subjects_without_template_is_a_warning_naming_them() -> None:
    document = policy(statement(pinned(["tenant:acme", "tenant:globex"], "StringEquals")))
    [finding] = check_trust_policy(document, issuer=ISSUER)
    assert (finding.severity, finding.key) == (WARNING, SUB)
    assert "'tenant:acme' and 'tenant:globex'" in finding.message
    assert "different tenants" in finding.message
    assert "--subject-template" in finding.message


def test_ignore_case_with_template_names_both_spellings() -> None:
    [finding] = check_trust_policy(
        policy(statement(pinned("tenant:acme", "StringEqualsIgnoreCase"))),
        issuer=ISSUER,
        subject_template="tenant:{tenant}",
    )
    assert (finding.severity, finding.key) == (ERROR, SUB)
    assert "'tenant:acme' and 'tenant:ACME'" in finding.message


def test_policy_variables_are_text_before_version_2012() -> None:
    # Without Version 2012-10-17, IAM does not substitute ${...}: the value is literal text.
    document = {"Statement": [statement(pinned("${app.example.com:sub}", "StringEquals"))]}
    assert check_trust_policy(document, issuer=ISSUER) == []


@pytest.mark.parametrize(
    ("document", "message"),
    [
        pytest.param("{not json", "not valid JSON", id="not-json"),
        pytest.param("[]", "must be a JSON object", id="json-array"),
        pytest.param(42, "must be a JSON object", id="not-a-mapping"),
        pytest.param({"Version": "2012-10-17"}, "has no Statement", id="no-statement"),
        pytest.param({"Statement": "Allow"}, "Statement must be", id="statement-string"),
        pytest.param({"Statement": []}, "Statement must be", id="statement-empty"),
        pytest.param({"Statement": [1]}, "Statement 0 is not an object", id="statement-number"),
        pytest.param(
            policy(statement(None, Condition=["StringEquals"])),
            "Condition must be an object",
            id="condition-list",
        ),
        pytest.param(
            policy(statement({"StringEquals": "x"})),
            "Condition StringEquals must be an object",
            id="operator-not-object",
        ),
        pytest.param(
            policy(statement({"StringEquals": {SUB: {"a": 1}}})),
            "values must be strings",
            id="value-object",
        ),
    ],
)
def test_malformed_policies_raise_value_error(document: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        check_trust_policy(document, issuer=ISSUER)
    assert str(caught.value).startswith("policy: ")


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [
        ({"issuer": "http://app.example.com"}, "issuer"),
        ({"issuer": "https://app.example.com/?x=1"}, "issuer"),
        ({"audience": ""}, "audience"),
        ({"subject_template": "tenant:acme"}, "subject_template"),
        ({"subject_template": "{org}:{tenant}"}, "subject_template"),
    ],
)
def test_check_validates_its_arguments(kwargs: dict[str, Any], parameter: str) -> None:
    with pytest.raises(ValueError, match=f"^{parameter}: "):
        check_trust_policy(GOOD, **{"issuer": ISSUER, **kwargs})


# --- recommended_trust_policy ------------------------------------------------------------------


def test_recommended_policy_is_the_documented_one() -> None:
    assert recommended_trust_policy(
        issuer=ISSUER, subject="tenant:acme", account_id="123456789012"
    ) == {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"Federated": PROVIDER},
                "Action": ACTION,
                "Condition": {"StringEquals": {AUD: STS_AUD, SUB: "tenant:acme"}},
            }
        ],
    }


@pytest.mark.parametrize(
    ("issuer", "kwargs"),
    [
        (ISSUER, {"account_id": "123456789012"}),
        (ISSUER + "/", {"provider_arn": PROVIDER}),
        ("https://example.com/app", {"account_id": "000000000001", "audience": "my-client"}),
        ("https://example.com:8443", {"account_id": "123456789012", "partition": "aws-cn"}),
        ("http://127.0.0.1:8080", {"account_id": "123456789012", "partition": "aws-us-gov"}),
        (
            ISSUER,
            {
                "provider_arn": f"arn:aws-cn:iam::123456789012:oidc-provider/{HOST}",
                "partition": "aws-cn",
            },
        ),
    ],
)
def test_recommended_policy_passes_the_check(issuer: str, kwargs: dict[str, Any]) -> None:
    document = recommended_trust_policy(issuer=issuer, subject="tenant:acme", **kwargs)
    audience = kwargs.get("audience", STS_AUD)
    assert check_trust_policy(document, issuer=issuer, audience=audience) == []
    assert check_trust_policy(json.dumps(document), issuer=issuer, audience=audience) == []
    assert (
        check_trust_policy(
            document, issuer=issuer, audience=audience, subject_template="tenant:{tenant}"
        )
        == []
    )
    # ... and it is not a policy that passes for anyone: another audience fails.
    assert check_trust_policy(document, issuer=issuer, audience="elsewhere") != []


def test_recommended_policy_with_provider_arn_keeps_the_arn() -> None:
    arn = f"arn:aws-us-gov:iam::123456789012:oidc-provider/{HOST}"
    document = recommended_trust_policy(issuer=ISSUER, subject="s", provider_arn=arn)
    assert document["Statement"][0]["Principal"] == {"Federated": arn}


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [
        ({"issuer": "http://app.example.com"}, "issuer"),
        ({"issuer": "ftp://app.example.com"}, "issuer"),
        ({"issuer": "https://app.example.com#x"}, "issuer"),
        ({"subject": ""}, "subject"),
        ({"subject": "tenant:*"}, "subject"),
        ({"subject": "tenant:acm?"}, "subject"),
        ({"subject": "tenant:\nacme"}, "subject"),
        ({"subject": "tenant:${aws:username}"}, "subject"),
        ({"subject": "x" * 256}, "subject"),
        ({"audience": ""}, "audience"),
        ({"partition": "azure"}, "partition"),
        ({"account_id": "12345"}, "account_id"),
        ({"account_id": 123456789012}, "account_id"),
        ({"account_id": "12345678901a"}, "account_id"),
        ({"account_id": None}, "account_id, provider_arn"),
        ({"provider_arn": PROVIDER}, "account_id, provider_arn"),
        ({"account_id": None, "provider_arn": "arn:aws:iam::1:oidc-provider/x"}, "provider_arn"),
        ({"account_id": None, "provider_arn": OTHER_PROVIDER}, "provider_arn"),
        ({"account_id": None, "provider_arn": PROVIDER, "partition": "aws-cn"}, "provider_arn"),
    ],
)
def test_recommended_policy_refuses_bad_input(kwargs: dict[str, Any], parameter: str) -> None:
    arguments = {
        "issuer": ISSUER,
        "subject": "tenant:acme",
        "account_id": "123456789012",
        **kwargs,
    }
    with pytest.raises(ValueError, match=f"^{re.escape(parameter)}: "):
        recommended_trust_policy(**arguments)


def test_recommended_policy_error_names_the_other_provider() -> None:
    with pytest.raises(
        ValueError, match=re.escape("oidc-provider/token.actions.githubusercontent.com")
    ):
        recommended_trust_policy(issuer=ISSUER, subject="s", provider_arn=OTHER_PROVIDER)
