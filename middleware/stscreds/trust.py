"""Write the trust policy a role needs for stscreds' tokens, and check the one it has.

The classic web identity federation mistake is a role trust policy that conditions on
``aud`` but not on ``sub``: every token the issuer signs then assumes the role, so one
tenant's request gets another tenant's credentials. :func:`check_trust_policy` finds that
(and a ``sub`` wildcard that reaches across tenants, a wrong ``aud``, a principal that trusts
every identity provider); :func:`recommended_trust_policy` writes a policy that passes.
``python -m stscreds trust-policy`` and ``check-trust-policy`` do the same from a shell.

The checker reads the policy as IAM would for ``sts:AssumeRoleWithWebIdentity`` with one of
the issuer's tokens. It does not call AWS and does not replace IAM Access Analyzer: it knows
what stscreds sends (``iss``, ``sub``, ``aud``) and what a tenant's subject looks like.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ._signing import validate_issuer

__all__ = ["Finding", "check_trust_policy", "recommended_trust_policy"]

_ACTION = "sts:AssumeRoleWithWebIdentity"
_DEFAULT_AUDIENCE = "sts.amazonaws.com"
_PARTITION = re.compile(r"aws|aws-cn|aws-us-gov|aws-iso|aws-iso-[a-z]|aws-eusc", re.ASCII)
_ACCOUNT = re.compile(r"\d{12}", re.ASCII)
# Any partition and account: a policy copied between accounts still trusts the same issuer.
_PROVIDER_ARN = re.compile(r"arn:([a-z][a-z-]*):iam::(\d{12}):oidc-provider/(.+)", re.ASCII)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", re.ASCII)
# What RoleTemplate accepts for a placeholder value (stscreds._roles._FIELD_VALUE).
_VALUE_CHARS = string.ascii_letters + string.digits + "_+=,.@-"
_VALUE_MAX = 64
# Characters tried for the part of a placeholder value no pattern names: two of them, so that
# a `?` or `*` over "any other character" still yields two different values.
_SPARE_CHARS = "xyzqjkwvbcdfghlmnprst" + string.digits + "_+=,.@-" + string.ascii_uppercase
# Bound on the witness search (automaton steps, about a second at worst); real trust policy
# patterns stay far below it.
_SEARCH_BUDGET = 100_000

#: How bad a finding is: "error" fails the check, "warning" does not.
Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Finding:
    """One problem in a trust policy: how bad it is, where it is and what it lets happen."""

    #: ``"error"``: a token can assume a role it should not (or none can); ``"warning"``: worth
    #: a look, not a hole.
    severity: Severity
    #: Index of the statement in ``Statement``; ``None`` for the policy as a whole.
    statement: int | None
    #: The statement's ``Sid``, if it has one.
    sid: str | None
    #: The condition key concerned (``"app.example.com:sub"``), or ``None``.
    key: str | None
    #: What is wrong and what to do; starts with ``key`` when there is one.
    message: str

    def __str__(self) -> str:
        """``error: statement 0 (Sid X): app.example.com:sub: ...``, as the CLI prints it."""
        if self.statement is None:
            return f"{self.severity}: {self.message}"
        where = f"statement {self.statement}"
        if self.sid:
            where += f" (Sid {self.sid})"
        return f"{self.severity}: {where}: {self.message}"


def _provider_id(issuer: str) -> str:
    """``host[:port][/path]`` of an issuer: the IAM OIDC provider's name and key prefix."""
    return validate_issuer(issuer).split("://", 1)[1]


def recommended_trust_policy(
    *,
    issuer: str,
    subject: str,
    account_id: str | None = None,
    provider_arn: str | None = None,
    audience: str = _DEFAULT_AUDIENCE,
    partition: str = "aws",
) -> dict[str, Any]:
    """The trust policy admitting exactly ``subject``'s tokens from ``issuer`` for ``audience``.

    Name the IAM OIDC provider by ``account_id`` (with ``partition``) or by its full
    ``provider_arn`` (which carries its own partition), not both. Raises ``ValueError``
    naming the parameter for anything IAM or stscreds would refuse, and for a subject with
    ``*`` or ``?``: a recommendation admits one exact subject.
    """
    host = _provider_id(issuer)
    if not isinstance(subject, str) or not 1 <= len(subject) <= 255 or _CONTROL.search(subject):
        raise ValueError("subject: must be 1-255 characters without control characters")
    if "*" in subject or "?" in subject:
        raise ValueError("subject: must be one exact subject, without the wildcards * and ?")
    if "${" in subject:
        # IAM reads ${...} in a 2012-10-17 policy as a policy variable, not as text.
        raise ValueError("subject: must not contain '${' (IAM reads it as a policy variable)")
    if not isinstance(audience, str) or not audience or _CONTROL.search(audience):
        raise ValueError("audience: must be a non-empty string without control characters")
    if not isinstance(partition, str) or not _PARTITION.fullmatch(partition):
        raise ValueError("partition: must be an AWS partition such as aws, aws-cn, aws-us-gov")
    if (account_id is None) == (provider_arn is None):
        raise ValueError("account_id, provider_arn: pass exactly one of them")
    if account_id is not None:
        if not isinstance(account_id, str) or not _ACCOUNT.fullmatch(account_id):
            raise ValueError("account_id: must be a 12-digit AWS account id, as a string")
        arn = f"arn:{partition}:iam::{account_id}:oidc-provider/{host}"
    else:
        match = _PROVIDER_ARN.fullmatch(provider_arn) if isinstance(provider_arn, str) else None
        if match is None or not _PARTITION.fullmatch(match.group(1)):
            raise ValueError(
                "provider_arn: must be arn:<partition>:iam::<account>:oidc-provider/<host>"
            )
        if partition != "aws" and match.group(1) != partition:
            raise ValueError(f"provider_arn: is in partition {match.group(1)}, not {partition}")
        if match.group(3) != host:
            raise ValueError(
                f"provider_arn: names oidc-provider/{match.group(3)}, "
                f"not this issuer's oidc-provider/{host}"
            )
        arn = match.group(0)
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"Federated": arn},
                "Action": _ACTION,
                "Condition": {
                    "StringEquals": {f"{host}:aud": audience, f"{host}:sub": subject},
                },
            }
        ],
    }


# --- patterns ---------------------------------------------------------------------------------

_LITERAL, _ONE, _ANY = 0, 1, 2
_Token = tuple[int, str]


class _Variable(Exception):
    """A value uses a policy variable: what it matches depends on the request."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _tokens(value: str, *, like: bool, variables: bool) -> tuple[_Token, ...]:
    """``value`` as literal characters and (for StringLike) the wildcards ``?`` and ``*``.

    In a 2012-10-17 policy ``${*}``, ``${?}`` and ``${$}`` stand for those characters, and any
    other ``${...}`` is a policy variable (raises ``_Variable``).
    """
    tokens: list[_Token] = []
    i = 0
    while i < len(value):
        char = value[i]
        if variables and value.startswith("${", i) and (end := value.find("}", i + 2)) != -1:
            inner = value[i + 2 : end]
            if inner not in ("*", "?", "$"):
                raise _Variable(value[i : end + 1])
            tokens.append((_LITERAL, inner))
            i = end + 1
            continue
        if like and char == "*":
            tokens.append((_ANY, ""))
        elif like and char == "?":
            tokens.append((_ONE, ""))
        else:
            tokens.append((_LITERAL, char))
        i += 1
    return tuple(tokens)


def _has_wildcard(tokens: Sequence[_Token]) -> bool:
    return any(kind != _LITERAL for kind, _ in tokens)


def _pins_one_tenant(tokens: Sequence[_Token]) -> bool:
    """The rule without a subject template: wildcards only as the whole last segment.

    Segments are separated by ``:`` or ``/``. ``tenant:acme:*`` passes: two fixed segments,
    then a wildcard alone, and no tenant id can contain ``:`` or ``/`` (RoleTemplate refuses
    them), so no other tenant's subject starts with ``tenant:acme:``. ``tenant:*``,
    ``tenant:acme*``, ``t?nant:acme`` and ``*`` fail.
    """
    if not _has_wildcard(tokens):
        return True
    segments: list[list[_Token]] = [[]]
    for token in tokens:
        if token[0] == _LITERAL and token[1] in ":/":
            segments.append([])
        else:
            segments[-1].append(token)
    *fixed, last = segments
    return (
        len(last) == 1
        and last[0][0] != _LITERAL
        and len(fixed) >= 2
        and all(segment and not _has_wildcard(segment) for segment in fixed)
    )


_States = frozenset[int]
_Relation = tuple[_States, ...]


class _Glob:
    """A StringLike pattern as an automaton over positions in its tokens."""

    __slots__ = ("size", "start", "tokens")

    def __init__(self, tokens: tuple[_Token, ...]) -> None:
        self.tokens = tokens
        self.size = len(tokens)
        self.start = self.closure({0})

    def closure(self, states: set[int] | _States) -> _States:
        reached = set(states)
        for q in sorted(reached):
            while q < self.size and self.tokens[q][0] == _ANY:
                q += 1
                reached.add(q)
        return frozenset(reached)

    def step(self, states: _States, char: str) -> _States:
        moved: set[int] = set()
        for q in states:
            if q == self.size:
                continue
            kind, literal = self.tokens[q]
            if kind == _ANY:
                moved.add(q)
            elif kind == _ONE or literal == char:
                moved.add(q + 1)
        return self.closure(moved)

    def run(self, states: _States, text: str) -> _States:
        for char in text:
            if not states:
                break
            states = self.step(states, char)
        return states

    # A value v fills a template's parts: parts[0] + v + parts[1] (+ v + parts[2] ...). With
    # one occurrence, the positions reached after parts[0] + v say everything (a "relation" of
    # one entry). With more, v is read from every position at once (what each start position
    # reaches after v), and the subject is replayed through that relation.

    def initial(self, parts: Sequence[str]) -> _Relation:
        if len(parts) == 2:
            return (self.run(self.start, parts[0]),)
        return tuple(self.closure({q}) for q in range(self.size + 1))

    def extend(self, relation: _Relation, char: str) -> _Relation:
        return tuple(self.step(states, char) for states in relation)

    def accepts(self, relation: _Relation, parts: Sequence[str]) -> bool:
        """Whether the subject made of ``parts`` and the value behind ``relation`` matches."""
        if len(parts) == 2:
            return self.size in self.run(relation[0], parts[1])
        states = self.run(self.start, parts[0])
        for part in parts[1:]:
            states = frozenset().union(*(relation[q] for q in states))
            states = self.run(states, part)
        return self.size in states


class _Template:
    """A subject template such as ``tenant:{tenant}`` (RoleTemplate's ``subject``)."""

    __slots__ = ("parts", "text")

    def __init__(self, text: str) -> None:
        if not isinstance(text, str):
            raise ValueError("subject_template: must be a string such as 'tenant:{tenant}'")
        names = set(_PLACEHOLDER.findall(text))
        if len(names) != 1:
            raise ValueError(
                "subject_template: must hold one placeholder, such as 'tenant:{tenant}'"
            )
        self.text = text
        self.parts = text.split("{" + names.pop() + "}")

    def subject(self, value: str) -> str:
        return value.join(self.parts)

    def values(
        self, target: _Glob, others: Sequence[Sequence[_Glob]], limit: int = 2
    ) -> list[str] | None:
        """Up to ``limit`` placeholder values whose subjects match ``target`` and one pattern
        of each of ``others``; None when the search gives up (too complex a pattern).

        A breadth-first search over values by length, on the product of the patterns'
        automata. Characters no pattern names behave alike, so the alphabet is the named
        ones plus two spares; two values per state and length are kept, which is all that
        finding two witnesses needs.
        """
        globs = [target, *(glob for group in others for glob in group)]
        named = {char for glob in globs for kind, char in glob.tokens if kind == _LITERAL}
        # Spares first: witnesses read 'tenant:x' rather than 'tenant:a'.
        alphabet = [char for char in _SPARE_CHARS if char not in named][:2]
        alphabet += sorted(named & set(_VALUE_CHARS))

        def accepted(relations: tuple[_Relation, ...]) -> bool:
            if not target.accepts(relations[0], self.parts):
                return False
            index = 1
            for group in others:
                found = False
                for glob in group:
                    found = found or glob.accepts(relations[index], self.parts)
                    index += 1
                if not found:
                    return False
            return True

        def alive(relations: tuple[_Relation, ...]) -> bool:
            # A relation with no reachable position can never match again.
            if not any(relations[0]):
                return False
            index = 1
            for group in others:
                if not any(any(relations[index + i]) for i in range(len(group))):
                    return False
                index += len(group)
            return True

        found: list[str] = []
        layer: dict[tuple[_Relation, ...], list[str]] = {
            tuple(glob.initial(self.parts) for glob in globs): [""]
        }
        budget = _SEARCH_BUDGET
        for _length in range(_VALUE_MAX):
            budget -= len(layer) * len(alphabet)
            if budget < 0:
                return None
            following: dict[tuple[_Relation, ...], list[str]] = {}
            for relations, words in layer.items():
                for char in alphabet:
                    moved = tuple(
                        glob.extend(relation, char)
                        for glob, relation in zip(globs, relations, strict=True)
                    )
                    if not alive(moved):
                        continue
                    kept = following.setdefault(moved, [])
                    for word in words:
                        if len(kept) < 2:
                            kept.append(word + char)
            for relations, words in following.items():
                if accepted(relations):
                    found.extend(words[: limit - len(found)])
                    if len(found) >= limit:
                        return found
            if not following:
                break
            layer = following
        return found


# --- reading a policy ---------------------------------------------------------------------------


def _load(policy: str | bytes | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(policy, str | bytes):
        try:
            policy = json.loads(policy)
        except json.JSONDecodeError as error:
            raise ValueError(f"policy: not valid JSON ({error})") from None
        except (UnicodeDecodeError, RecursionError):
            raise ValueError("policy: not valid JSON") from None
    if not isinstance(policy, Mapping):
        raise ValueError("policy: must be a JSON object with a Statement")
    if "Statement" not in policy:
        raise ValueError("policy: has no Statement")
    return policy


def _statements(policy: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    statements = policy["Statement"]
    if isinstance(statements, Mapping):
        statements = [statements]
    if not isinstance(statements, list) or not statements:
        raise ValueError("policy: Statement must be an object or a non-empty list of objects")
    for index, statement in enumerate(statements):
        if not isinstance(statement, Mapping):
            raise ValueError(f"policy: Statement {index} is not an object")
    return statements


def _strings(value: Any) -> list[str]:
    """A policy element that is a string or a list of strings, as a list (others dropped)."""
    items = value if isinstance(value, list) else [value]
    return [item for item in items if isinstance(item, str)]


def _action_matches(pattern: str) -> bool:
    # Action names are case-insensitive and may hold * and ? (sts:*, sts:AssumeRole*); the
    # automaton, not a regex, so that a pattern of many stars cannot backtrack for long.
    glob = _Glob(_tokens(pattern.lower(), like=True, variables=False))
    return glob.size in glob.run(glob.start, _ACTION.lower())


def _covers_action(statement: Mapping[str, Any]) -> bool:
    if "Action" in statement:
        return any(_action_matches(p) for p in _strings(statement["Action"]))
    if "NotAction" in statement:
        return not any(_action_matches(p) for p in _strings(statement["NotAction"]))
    return False


def _names_provider(arn: str, host: str) -> bool:
    match = _PROVIDER_ARN.fullmatch(arn)
    return match is not None and match.group(3).lower() == host.lower()


def _principal(statement: Mapping[str, Any], host: str) -> tuple[str, str]:
    """``"everyone"``, ``"ours"`` (this issuer's provider) or ``"other"``, and what says so."""
    if "NotPrincipal" in statement:
        # Allow + NotPrincipal trusts everyone it does not name.
        excluded = statement["NotPrincipal"]
        if isinstance(excluded, Mapping) and any(
            _names_provider(arn, host) for arn in _strings(excluded.get("Federated"))
        ):
            return "other", "NotPrincipal"
        return "everyone", "NotPrincipal (everyone it does not name)"
    principal = statement.get("Principal")
    if principal == "*":
        return "everyone", 'Principal "*"'
    if not isinstance(principal, Mapping):
        return "other", "Principal"
    federated = _strings(principal.get("Federated"))
    if "*" in federated:
        return "everyone", '"Federated": "*"'
    if any(_names_provider(arn, host) for arn in federated):
        return "ours", "Federated"
    return "other", "Principal"


@dataclass(frozen=True)
class _Condition:
    """One ``operator: {key: values}`` entry naming the subject or the audience."""

    operator: str
    kind: str | None  # "equals", "ignorecase", "like"; None: does not restrict the key
    values: tuple[str, ...]


def _kind(operator: str) -> str | None:
    """How ``operator`` restricts a key to its values; None when it does not.

    The set prefixes and ``IfExists`` change nothing for ``sub`` and ``aud``, which every
    token carries. Negated operators, ``Null`` and non-string operators leave the key free.
    """
    base = operator.lower()
    for prefix in ("foranyvalue:", "forallvalues:"):
        base = base.removeprefix(prefix)
    base = base.removesuffix("ifexists")
    return {
        "stringequals": "equals",
        "stringequalsignorecase": "ignorecase",
        "stringlike": "like",
    }.get(base)


def _conditions(
    statement: Mapping[str, Any], index: int, keys: Sequence[str]
) -> dict[str, list[_Condition]]:
    """The conditions on each of ``keys`` (lower case; IAM condition keys ignore case)."""
    found: dict[str, list[_Condition]] = {key: [] for key in keys}
    block = statement.get("Condition", {})
    if not isinstance(block, Mapping):
        raise ValueError(f"policy: Statement {index}: Condition must be an object")
    for operator, entries in block.items():
        if not isinstance(entries, Mapping):
            raise ValueError(f"policy: Statement {index}: Condition {operator} must be an object")
        for key, raw in entries.items():
            if not isinstance(key, str) or key.lower() not in found:
                continue
            items = raw if isinstance(raw, list) else [raw]
            values = []
            for item in items:
                if isinstance(item, bool):
                    values.append("true" if item else "false")
                elif isinstance(item, str | int | float):
                    values.append(str(item))
                else:
                    raise ValueError(
                        f"policy: Statement {index}: Condition {operator} {key}: "
                        "values must be strings"
                    )
            found[key.lower()].append(_Condition(operator, _kind(operator), tuple(values)))
    return found


# --- the check ----------------------------------------------------------------------------------


class _Report:
    def __init__(self, index: int, sid: str | None) -> None:
        self.index = index
        self.sid = sid
        self.findings: list[Finding] = []

    def add(self, severity: Severity, key: str | None, message: str) -> None:
        text = f"{key}: {message}" if key else message
        self.findings.append(Finding(severity, self.index, self.sid, key, text))


def check_trust_policy(
    policy: str | bytes | Mapping[str, Any],
    *,
    issuer: str,
    audience: str = _DEFAULT_AUDIENCE,
    subject_template: str | None = None,
) -> list[Finding]:
    """The problems in a role trust policy for stscreds' tokens from ``issuer``.

    ``policy`` is the trust policy as a dict or JSON text. An empty list means: a statement
    lets the issuer's tokens assume the role, each such statement pins ``sub`` so that no
    other tenant's subject matches, and ``aud`` is exactly ``audience``. With
    ``subject_template`` (RoleTemplate's ``subject``, e.g. ``"tenant:{tenant}"``) a ``sub``
    pattern is an error when two tenants' subjects match it; without one, a wildcard is
    accepted only as the whole last ``:``/``/`` segment after two fixed ones
    (``tenant:acme:*``). Raises ``ValueError`` for a policy that is not one.
    """
    host = _provider_id(issuer)
    issuer = validate_issuer(issuer)
    if not isinstance(audience, str) or not audience:
        raise ValueError("audience: must be a non-empty string")
    template = None if subject_template is None else _Template(subject_template)
    document = _load(policy)
    statements = _statements(document)
    variables = document.get("Version") == "2012-10-17"
    sub_key, aud_key = f"{host}:sub", f"{host}:aud"

    findings: list[Finding] = []
    trusted = 0
    for index, statement in enumerate(statements):
        if statement.get("Effect") != "Allow" or not _covers_action(statement):
            continue  # Deny only takes away; other actions are not ours to judge
        conditions = _conditions(statement, index, [sub_key.lower(), aud_key.lower()])
        principal, source = _principal(statement, host)
        if principal == "other" and not any(conditions.values()):
            continue  # another identity provider's statement
        trusted += 1
        sid = statement.get("Sid")
        report = _Report(index, sid if isinstance(sid, str) else None)
        if principal == "everyone":
            report.add(
                "error",
                None,
                f"{source} trusts every identity provider: name this issuer's IAM OIDC "
                f'provider instead, "Federated": "arn:aws:iam::<account>:oidc-provider/{host}"',
            )
        elif principal == "other":
            report.add(
                "error",
                None,
                f"conditions on {host} keys, but the principal is not its IAM OIDC provider "
                f"(arn:aws:iam::<account>:oidc-provider/{host}): this statement never admits "
                "the issuer's tokens",
            )
        _check_subject(report, conditions[sub_key.lower()], sub_key, issuer, template, variables)
        _check_audience(report, conditions[aud_key.lower()], aud_key, audience, variables)
        findings.extend(report.findings)
    if not trusted:
        findings.insert(
            0,
            Finding(
                "error",
                None,
                None,
                None,
                f"no statement lets {issuer} assume this role: none allows {_ACTION} to "
                f'"Federated": "arn:aws:iam::<account>:oidc-provider/{host}"',
            ),
        )
    return findings


def _check_subject(
    report: _Report,
    conditions: list[_Condition],
    key: str,
    issuer: str,
    template: _Template | None,
    variables: bool,
) -> None:
    restricting = [c for c in conditions if c.kind is not None]
    if not restricting:
        if conditions:
            operators = ", ".join(sorted({c.operator for c in conditions}))
            how = f"only {operators} names the subject, which does not restrict it"
        else:
            how = "no condition restricts the subject"
        report.add(
            "error",
            key,
            f"{how}: any token from {issuer}, any tenant's, can assume this role; add "
            f'"StringEquals": {{"{key}": "<the exact subject>"}}',
        )
        return

    # Each condition as patterns (a list of values: any may match); a value with a policy
    # variable is reported and then taken to match anything.
    groups: list[list[_Glob]] = []
    shown: list[list[str]] = []
    unknown: list[list[bool]] = []
    for condition in restricting:
        if condition.kind == "ignorecase":
            report.add(
                "warning",
                key,
                f"{condition.operator} also admits subjects that differ only in case (a "
                "tenant 'acme' and a tenant 'ACME'); use StringEquals if tenant ids are "
                "case-sensitive",
            )
        globs, texts, flags = [], [], []
        for value in condition.values:
            try:
                tokens = _tokens(value, like=condition.kind == "like", variables=variables)
            except _Variable as variable:
                report.add(
                    "error",
                    key,
                    f"{condition.operator} {value!r} uses the policy variable "
                    f"{variable.name}, whose value comes from the request: it may admit any "
                    "tenant's subject; use the exact subject",
                )
                tokens = ((_ANY, ""),)
                flags.append(True)
            else:
                flags.append(False)
            globs.append(_Glob(tokens))
            texts.append(value)
        groups.append(globs)
        shown.append(texts)
        unknown.append(flags)

    if template is None:
        _check_subject_rule(report, restricting, groups, unknown, key, issuer)
        return
    for position, condition in enumerate(restricting):
        others = groups[:position] + groups[position + 1 :]
        for glob, value, is_variable in zip(
            groups[position], shown[position], unknown[position], strict=True
        ):
            if is_variable:
                continue
            alone = template.values(glob, [], limit=1)
            if alone == []:
                report.add(
                    "warning",
                    key,
                    f"{condition.operator} {value!r} matches no subject of the template "
                    f"{template.text!r}: no tenant can use this value",
                )
                continue
            if not _has_wildcard(glob.tokens):
                continue  # an exact subject is at most one tenant's
            tenants = template.values(glob, others) if alone is not None else None
            if tenants is None:
                report.add(
                    "error",
                    key,
                    f"{condition.operator} {value!r} is too complex to check against "
                    f"{template.text!r}; use the exact subject",
                )
            elif len(tenants) >= 2:
                first, second = (template.subject(t) for t in tenants[:2])
                report.add(
                    "error",
                    key,
                    f"{condition.operator} {value!r} matches more than one tenant's subject "
                    f"(both {first!r} and {second!r} fit {template.text!r}): one tenant's "
                    "token can assume another tenant's role; use the exact subject",
                )


def _check_subject_rule(
    report: _Report,
    restricting: list[_Condition],
    groups: list[list[_Glob]],
    unknown: list[list[bool]],
    key: str,
    issuer: str,
) -> None:
    """Without a template: every value of one condition pins a tenant, or each offending
    wildcard is an error (the conditions of a statement all have to hold)."""
    if any(
        not any(flags) and all(_pins_one_tenant(glob.tokens) for glob in globs)
        for globs, flags in zip(groups, unknown, strict=True)
    ):
        return
    for condition, globs, flags in zip(restricting, groups, unknown, strict=True):
        for glob, value, is_variable in zip(globs, condition.values, flags, strict=True):
            if is_variable or _pins_one_tenant(glob.tokens):
                continue
            if all(kind == _ANY for kind, _ in glob.tokens):
                what = f"admits every subject: any token from {issuer}, any tenant's, can "
                what += "assume this role"
            else:
                what = (
                    "may match other tenants' subjects: without a subject template, a "
                    "wildcard passes only as the whole last ':' or '/' segment after two "
                    "fixed ones, such as 'tenant:acme:*'"
                )
            report.add(
                "error",
                key,
                f"{condition.operator} {value!r} {what}; use the exact subject (or check "
                "against the subject template)",
            )


def _check_audience(
    report: _Report,
    conditions: list[_Condition],
    key: str,
    audience: str,
    variables: bool,
) -> None:
    restricting = [c for c in conditions if c.kind is not None]
    if not restricting:
        report.add(
            "warning",
            key,
            "no condition restricts the audience: only the IAM OIDC provider's client id "
            f'list limits it; add "StringEquals": {{"{key}": "{audience}"}}',
        )
        return
    for condition in restricting:
        values = list(condition.values)
        try:
            tokens = [
                _tokens(v, like=condition.kind == "like", variables=variables) for v in values
            ]
        except _Variable as variable:
            report.add(
                "error",
                key,
                f"{condition.operator} uses the policy variable {variable.name}; use "
                f"StringEquals {audience!r}",
            )
            continue
        if any(_has_wildcard(t) for t in tokens):
            report.add(
                "error",
                key,
                f"{condition.operator} {_listed(values)} trusts every audience that matches "
                f"the wildcard; stscreds sends {audience!r}: use StringEquals {audience!r}",
            )
            continue
        texts = ["".join(char for _, char in t) for t in tokens]
        if condition.kind == "ignorecase":
            same = [t for t in texts if t.lower() == audience.lower()]
        else:
            same = [t for t in texts if t == audience]
        extra = [t for t in texts if t not in same]
        if not same:
            report.add(
                "error",
                key,
                f"{condition.operator} trusts audience {_listed(extra)}; stscreds sends "
                f"{audience!r}: this statement refuses its tokens",
            )
        elif extra:
            report.add(
                "error",
                key,
                f"{condition.operator} also trusts audience {_listed(extra)}; stscreds sends "
                f"{audience!r}: tokens the issuer signs for other audiences can assume this "
                "role too",
            )


def _listed(values: Sequence[str]) -> str:
    return ", ".join(repr(v) for v in values)
