"""Write the trust policy a role needs for stscreds' tokens, and check the one it has.

The classic web identity federation mistake is a role trust policy that conditions on
``aud`` but not on ``sub``: every token the issuer signs then assumes the role, so one
tenant's request gets another tenant's credentials. :func:`check_trust_policy` finds that,
and a policy whose ``sub`` values (over all its values and statements) admit more than one
tenant's subject, a ``sub`` wildcard it cannot judge without the subject template, a wrong
``aud``, a principal that trusts every identity provider; :func:`recommended_trust_policy`
writes a policy that passes. ``python -m stscreds trust-policy`` and ``check-trust-policy``
do the same from a shell.

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


_States = frozenset[int]
_Relation = tuple[_States, ...]


class _Glob:
    """A StringLike pattern as an automaton over positions in its tokens.

    With ``fold`` (StringEqualsIgnoreCase) a literal also matches its other case.
    """

    __slots__ = ("fold", "folded", "size", "start", "tokens")

    def __init__(self, tokens: tuple[_Token, ...], *, fold: bool = False) -> None:
        self.tokens = tokens
        self.fold = fold
        self.folded = tuple(char.lower() for _, char in tokens) if fold else ()
        self.size = len(tokens)
        self.start = self.closure({0})

    def text(self) -> str:
        """The literal text (of a pattern without wildcards)."""
        return "".join(char for _, char in self.tokens)

    def matches(self, text: str) -> bool:
        return self.size in self.run(self.start, text)

    def closure(self, states: set[int] | _States) -> _States:
        reached = set(states)
        for q in sorted(reached):
            while q < self.size and self.tokens[q][0] == _ANY:
                q += 1
                reached.add(q)
        return frozenset(reached)

    def step(self, states: _States, char: str) -> _States:
        moved: set[int] = set()
        lower = char.lower() if self.fold else char
        for q in states:
            if q == self.size:
                continue
            kind, literal = self.tokens[q]
            if kind == _ANY:
                moved.add(q)
            elif kind == _ONE or literal == char or (self.fold and self.folded[q] == lower):
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
        # A case-folding pattern names both cases of its letters.
        named |= {
            variant
            for glob in globs
            if glob.fold
            for kind, char in glob.tokens
            if kind == _LITERAL
            for variant in (char.lower(), char.upper())
            if len(variant) == 1
        }
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


def _misspelled_keys(statement: Mapping[str, Any], host: str) -> list[tuple[str, str, bool]]:
    """Condition keys meant for this issuer's ``aud``/``sub`` but spelled as IAM never sets
    them (``https://app.example.com:sub``, ``app.example.com/:sub``): (key, the right key,
    whether the operator is one that never matches a key IAM does not set)."""
    block = statement.get("Condition", {})
    found: list[tuple[str, str, bool]] = []
    if not isinstance(block, Mapping):
        return found
    for operator, entries in block.items():
        if not isinstance(entries, Mapping) or not isinstance(operator, str):
            continue
        # A missing key makes StringEquals/StringLike false, but a negated operator or an
        # ...IfExists one true.
        never = "Not" not in operator and not operator.endswith("IfExists")
        for key in entries:
            if not isinstance(key, str):
                continue
            prefix, colon, claim = key.rpartition(":")
            if not colon or claim.lower() not in ("sub", "aud"):
                continue
            bare = prefix.lower().split("://", 1)[-1].rstrip("/")
            right = f"{host}:{claim.lower()}"
            if bare == host.lower() and key.lower() != right.lower():
                found.append((key, right, never))
    return found


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


@dataclass(frozen=True)
class _Value:
    """One value of a ``sub`` condition, as the pattern it is."""

    text: str  # as the policy writes it
    glob: _Glob
    variable: bool  # holds a policy variable: taken to match anything


@dataclass(frozen=True)
class _Admitted:
    """A subject a statement admits, and the condition value that admits it."""

    subject: str  # what tells subjects apart: the tenant value with a template, else the subject
    shown: str  # the subject, as a finding shows it
    statement: int
    sid: str | None
    operator: str
    value: str


def check_trust_policy(
    policy: str | bytes | Mapping[str, Any],
    *,
    issuer: str,
    audience: str = _DEFAULT_AUDIENCE,
    subject_template: str | None = None,
) -> list[Finding]:
    """The problems in a role trust policy for stscreds' tokens from ``issuer``.

    ``policy`` is the trust policy as a dict or JSON text. An empty list means: a statement
    lets the issuer's tokens assume the role, each such statement restricts ``sub``, all of
    them together admit one tenant's subjects, and ``aud`` is exactly ``audience``.

    With ``subject_template`` (RoleTemplate's ``subject``, e.g. ``"tenant:{tenant}"``) the
    check collects the tenant values whose subjects the policy admits, over every value of
    every ``sub`` condition and every statement that trusts the issuer: two or more are an
    error (a ``StringLike`` pattern that two tenants' subjects match, two exact subjects of
    different tenants, a ``StringEqualsIgnoreCase`` subject whose tenant id has letters:
    ``acme`` and ``ACME`` are different tenants to RoleTemplate).

    Without ``subject_template`` the checker cannot know where the tenant id sits in a
    subject: a ``*`` or ``?`` wildcard in a ``StringLike`` ``sub`` value is an error (unless
    a condition of exact subjects in the same statement bounds what it admits), and two or
    more different exact subjects are a warning (they may be one tenant's, or not).
    Raises ``ValueError`` for a policy that is not one.
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
    admitted: list[_Admitted] = []
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
        misspelled = _misspelled_keys(statement, host)
        for wrong, right, never in misspelled:
            effect = (
                "this condition is never true and the statement admits no token"
                if never
                else "this condition is always true and restricts nothing"
            )
            report.add(
                "error",
                wrong,
                f"IAM never sets this condition key, so {effect}; for this issuer IAM sets "
                f"{right!r} (the issuer URL without its scheme and without a trailing slash): "
                "write that",
            )
        # A claim whose misspelled key makes the statement admit nothing is reported above,
        # not also as a missing condition (which says any token is admitted).
        meant = {right for _, right, never in misspelled if never}
        sub_conditions = conditions[sub_key.lower()]
        if sub_key in meant and not sub_conditions:
            subjects: list[_Admitted] = []
        else:
            subjects = _check_subject(report, sub_conditions, sub_key, issuer, template, variables)
        if principal != "other":  # a statement that never admits the issuer's tokens
            admitted.extend(subjects)
        if not (aud_key in meant and not conditions[aud_key.lower()]):
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
    findings.extend(_check_one_tenant(admitted, sub_key, template))
    return findings


def _check_subject(
    report: _Report,
    conditions: list[_Condition],
    key: str,
    issuer: str,
    template: _Template | None,
    variables: bool,
) -> list[_Admitted]:
    """Report what is wrong with one statement's ``sub`` conditions on their own; return the
    subjects it admits, for :func:`_check_one_tenant` (none where an error already says
    that the statement admits too much)."""
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
        return []

    # Each condition as patterns (a list of values: any may match); a value with a policy
    # variable is reported and then taken to match anything.
    groups: list[list[_Value]] = []
    for condition in restricting:
        fold = condition.kind == "ignorecase"
        if fold and template is None:
            report.add(
                "warning",
                key,
                f"{condition.operator} also admits subjects that differ only in case (a "
                "tenant 'acme' and a tenant 'ACME'); use StringEquals if tenant ids are "
                "case-sensitive (pass --subject-template, subject_template=, to check)",
            )
        group = []
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
                group.append(_Value(value, _Glob(((_ANY, ""),)), variable=True))
            else:
                group.append(_Value(value, _Glob(tokens, fold=fold), variable=False))
        groups.append(group)

    if template is None:
        return _subjects_without_template(report, restricting, groups, key, issuer)
    return _subjects_of_template(report, restricting, groups, key, template)


def _subjects_without_template(
    report: _Report,
    restricting: list[_Condition],
    groups: list[list[_Value]],
    key: str,
    issuer: str,
) -> list[_Admitted]:
    """Without a template nothing says where a subject holds the tenant id, so a wildcard
    cannot be judged: each is an error, unless a condition of exact subjects only bounds the
    statement (its conditions all have to hold). Returns the exact subjects admitted."""
    for condition, group in zip(restricting, groups, strict=True):
        if any(v.variable or _has_wildcard(v.glob.tokens) for v in group):
            continue
        # This condition bounds the statement: its subjects that every other condition
        # (possibly) admits. A case-folding value is compared without case throughout.
        admitted = []
        for value in group:
            subject = value.glob.text()
            if all(
                any(
                    other is group
                    or v.variable
                    or (_Glob(v.glob.tokens, fold=True) if value.glob.fold else v.glob).matches(
                        subject
                    )
                    for v in other
                )
                for other in groups
            ):
                compared = subject.lower() if value.glob.fold else subject
                admitted.append(
                    _Admitted(
                        compared,
                        value.text,
                        report.index,
                        report.sid,
                        condition.operator,
                        value.text,
                    )
                )
        return admitted

    for condition, group in zip(restricting, groups, strict=True):
        for value in group:
            if value.variable or not _has_wildcard(value.glob.tokens):
                continue
            if all(kind == _ANY for kind, _ in value.glob.tokens):
                what = (
                    f"admits every subject: any token from {issuer}, any tenant's, can assume "
                    "this role; use the exact subject"
                )
            else:
                what = (
                    "has a wildcard, which cannot be checked without the subject template "
                    "(where in the subject the tenant id sits): it may match other tenants' "
                    "subjects; pass --subject-template (subject_template=) to check it "
                    "exactly, or use exact subjects"
                )
            report.add("error", key, f"{condition.operator} {value.text!r} {what}")
    return []


def _subjects_of_template(
    report: _Report,
    restricting: list[_Condition],
    groups: list[list[_Value]],
    key: str,
    template: _Template,
) -> list[_Admitted]:
    """Each value against the template: an error when the subjects of two tenant values
    match it (and every other condition of the statement). Returns the tenant values each
    admits otherwise."""
    admitted: list[_Admitted] = []
    for position, (condition, group) in enumerate(zip(restricting, groups, strict=True)):
        others = [[v.glob for v in other] for other in groups[:position] + groups[position + 1 :]]
        for value in group:
            if value.variable:
                continue
            alone = template.values(value.glob, [], limit=1)
            if alone == []:
                report.add(
                    "warning",
                    key,
                    f"{condition.operator} {value.text!r} matches no subject of the template "
                    f"{template.text!r}: no tenant can use this value",
                )
                continue
            tenants = template.values(value.glob, others) if alone is not None else None
            if tenants is None:
                report.add(
                    "error",
                    key,
                    f"{condition.operator} {value.text!r} is too complex to check against "
                    f"{template.text!r}; use the exact subject",
                )
            elif len(tenants) >= 2 and value.glob.fold:
                first, second = (template.subject(t) for t in _case_pair(value, others, template))
                report.add(
                    "error",
                    key,
                    f"{condition.operator} {value.text!r} admits subjects that differ only in "
                    f"case, {first!r} and {second!r}: RoleTemplate makes them for two "
                    f"different tenants of {template.text!r}, so one tenant's token can assume "
                    "the other's role; use StringEquals",
                )
            elif len(tenants) >= 2:
                first, second = (template.subject(t) for t in tenants[:2])
                report.add(
                    "error",
                    key,
                    f"{condition.operator} {value.text!r} matches more than one tenant's subject "
                    f"(both {first!r} and {second!r} fit {template.text!r}): one tenant's "
                    "token can assume another tenant's role; use the exact subject",
                )
            else:
                admitted.extend(
                    _Admitted(
                        tenant,
                        template.subject(tenant),
                        report.index,
                        report.sid,
                        condition.operator,
                        value.text,
                    )
                    for tenant in tenants
                )
    return admitted


def _case_pair(value: _Value, others: Sequence[Sequence[_Glob]], template: _Template) -> list[str]:
    """Two tenant values a case-folding value admits: its own spelling first when it is one,
    then another case of it."""
    exact = _Glob(value.glob.tokens)
    spelled = template.values(exact, others, limit=1) or []
    if spelled:
        for other in (spelled[0].upper(), spelled[0].lower(), spelled[0].swapcase()):
            subject = template.subject(other)
            if (
                other != spelled[0]
                and value.glob.matches(subject)
                and all(any(glob.matches(subject) for glob in group) for group in others)
            ):
                return [spelled[0], other]
    found = template.values(value.glob, others) or []
    return [*spelled, *(t for t in found if t not in spelled)][:2]


def _check_one_tenant(
    admitted: list[_Admitted], key: str, template: _Template | None
) -> list[Finding]:
    """The subjects the whole policy admits, over all values and statements, are one
    tenant's: with a template, two tenant values are an error; without, two different exact
    subjects are a warning."""
    first: dict[str, _Admitted] = {}
    for subject in admitted:
        first.setdefault(subject.subject, subject)
    if len(first) < 2:
        return []
    one, two = list(first.values())[:2]

    def where(subject: _Admitted) -> str:
        text = f"{subject.operator} {subject.value!r}"
        if one.statement != two.statement:
            text += f" in statement {subject.statement}"
        return text

    if template is not None:
        severity: Severity = "error"
        message = (
            f"{key}: the policy admits the subjects of more than one tenant: {one.shown!r} "
            f"and {two.shown!r}; a role should trust one tenant's subject, but each of these "
            f"tenants' tokens can assume this one ({where(one)}; {where(two)}): keep only "
            "the subject of the role's own tenant"
        )
    else:
        severity = "warning"
        more = f" and {len(first) - 2} more" if len(first) > 2 else ""
        message = (
            f"{key}: the policy admits {len(first)} different exact subjects: {one.shown!r} "
            f"and {two.shown!r}{more} ({where(one)}; {where(two)}); if they belong to "
            "different tenants, each tenant's token can assume the other's role: pass the "
            "subject template (--subject-template, subject_template=) to check"
        )
    return [Finding(severity, two.statement, two.sid, key, message)]


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
