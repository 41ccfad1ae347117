"""What a request needs credentials for (``Role``) and the digest that names one identity."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["RESERVED_CLAIMS", "Role", "RoleTemplate", "identity_key"]

_ROLE_ARN = re.compile(
    r"arn:(?:aws|aws-cn|aws-us-gov|aws-iso|aws-iso-[a-z]|aws-eusc):iam::\d{12}:"
    r"role/(?:/|/?[\x21-\x7e]+/)?[\w+=,.@-]{1,64}",
    re.ASCII,
)
_SESSION_NAME = re.compile(r"[\w+=,.@-]{2,64}", re.ASCII)
_SESSION_NAME_CHARS = re.compile(r"[^\w+=,.@-]", re.ASCII)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

#: Claims stscreds sets itself; a role's ``claims`` may not override them.
RESERVED_CLAIMS = frozenset({"iss", "sub", "aud", "exp", "iat", "nbf", "jti"})


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Python keeps the last of duplicate keys; what IAM makes of them is its own business.
    # Two different texts must not parse to one policy (and share one identity key).
    result: dict[str, Any] = {}
    for name, value in pairs:
        if name in result:
            shown = name if len(name) <= 40 else name[:37] + "..."
            raise _DuplicateKey(f"policy: duplicate key {shown!r}")
        result[name] = value
    return result


def _is_valid_unicode(text: str) -> bool:
    # Lone surrogates ("\ud800") are str but not Unicode text: they cannot be UTF-8 encoded
    # (the identity key), so a Role holding one would fail later, on a request.
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


class _FrozenDict(dict):  # type: ignore[type-arg]
    """A dict that refuses changes; still a dict, so json.dumps (and PyJWT) accept it."""

    __slots__ = ()

    def _read_only(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("claims are read-only")

    __setitem__ = __delitem__ = __ior__ = _read_only
    clear = pop = popitem = setdefault = update = _read_only

    def __reduce__(self) -> Any:
        return (_FrozenDict, (dict(self),))


#: Deepest nesting of objects and arrays accepted in a policy or in claims (IAM's policy
#: grammar needs about five levels); deeper input is refused, not a RecursionError.
MAX_DEPTH = 64


def _deep_freeze(value: Any, depth: int = 0) -> Any:
    if depth > MAX_DEPTH:
        raise ValueError(f"claims: nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, dict):
        return _FrozenDict({k: _deep_freeze(v, depth + 1) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_deep_freeze(v, depth + 1) for v in value)
    return value


_JSON_NUMBER = re.compile(r"(-?)(\d+)(?:\.(\d+))?(?:[eE]([+-]?\d+))?", re.ASCII)


class _Number:
    """A JSON number kept exact: float parsing would make 1e400 and 1e999 (both inf), or
    10.0 and 10.00000000000000001, one value while STS receives two different texts."""

    __slots__ = ("canonical",)

    def __init__(self, text: str) -> None:
        match = _JSON_NUMBER.fullmatch(text)
        if match is None:  # json only hands over valid number literals
            raise ValueError("policy: not valid JSON")
        sign, whole, fraction, exponent = match.groups()
        fraction = fraction or ""
        # Plain strings and ints, no Decimal (whose exponent limits 1e10**18 would hit):
        # digits without leading or trailing zeros, the zeros moved into the exponent, so
        # 10, 10.0 and 1e1 are one number, and 0, -0 and 0e5 another.
        digits = (whole + fraction).lstrip("0")
        significant = digits.rstrip("0")
        if not significant:
            self.canonical = "0e0"
            return
        scale = int(exponent or 0) - len(fraction) + len(digits) - len(significant)
        self.canonical = f"{sign}{significant}e{scale}"


def _tagged(value: Any, depth: int = 0) -> Any:
    # Strings and numbers prefixed by their kind, so the number 10 and the string "10"
    # (or "n10e0") can never encode alike.
    if isinstance(value, str):
        return "s" + value
    if isinstance(value, _Number):
        return "n" + value.canonical
    if depth >= MAX_DEPTH:
        raise ValueError(f"policy: nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, dict):
        return {name: _tagged(item, depth + 1) for name, item in value.items()}
    if isinstance(value, list):
        return [_tagged(item, depth + 1) for item in value]
    return value  # true, false, null


def _parse_policy(policy: str | Mapping[str, Any] | None) -> tuple[str | None, Any]:
    """Return the policy as sent to STS and its canonical form (for the identity key).

    The canonical form ignores key order and whitespace, and keeps every number's exact
    value: two texts share it only if they are the same JSON document.
    """
    if policy is None:
        return None, None
    if isinstance(policy, Mapping):
        try:
            text = json.dumps(dict(policy), separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError, RecursionError):
            raise ValueError("policy: not JSON-serializable") from None
    elif isinstance(policy, str):
        text = policy
    else:
        raise ValueError("policy: must be a JSON object or a JSON string of one")
    try:
        parsed = json.loads(
            text,
            parse_constant=_reject_constant,
            parse_float=_Number,
            parse_int=_Number,
            object_pairs_hook=_unique_keys,
        )
    except _DuplicateKey as error:
        raise ValueError(str(error)) from None
    except ValueError:
        raise ValueError("policy: not valid JSON") from None
    except RecursionError:
        raise ValueError(f"policy: nested more than {MAX_DEPTH} levels deep") from None
    if not isinstance(parsed, dict):
        raise ValueError("policy: must be a JSON object")
    return text, _tagged(parsed)


def _freeze_claims(claims: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    if claims is None:
        return None
    if not isinstance(claims, Mapping):
        raise ValueError("claims: must be a mapping")
    if not all(isinstance(k, str) for k in claims):
        raise ValueError("claims: keys must be strings")
    clash = RESERVED_CLAIMS.intersection(claims)
    if clash:
        raise ValueError(f"claims: may not override reserved claims {sorted(clash)}")
    try:
        # A JSON round trip both proves the claims serialize and detaches them from the
        # caller's objects, so a later mutation cannot change a Role that is already a key.
        copied = json.loads(json.dumps(dict(claims), allow_nan=False))
    except (TypeError, ValueError, RecursionError):
        raise ValueError("claims: not JSON-serializable") from None
    return MappingProxyType({name: _deep_freeze(value) for name, value in copied.items()})


def sanitize_session_name(value: str) -> str:
    """Turn any string into a valid RoleSessionName (2-64 chars of ``[\\w+=,.@-]``)."""
    cleaned = _SESSION_NAME_CHARS.sub("-", value)[:64]
    return cleaned if len(cleaned) >= 2 else (cleaned + "--")[:2]


_UNSET: Any = object()
#: How many validated Roles are remembered by their constructor arguments (see _Interned).
INTERN_SIZE = 4096
_PLAIN = frozenset({str, int, type(None)})


class _Interned(type):
    """``Role(...)`` called again with the same plain arguments returns the Role it made.

    A resolver that builds its Role per request (as the README's examples do) would otherwise
    validate the ARN, parse the policy and encode the identity on every request: about 20 us
    with a session policy, twice what the rest of the request costs. Roles are immutable, so
    handing out one instance is safe. Only calls whose arguments are exactly ``str`` (or
    ``None``) and an exact ``int`` duration, without ``claims``, are remembered: never a
    ``bool``, ``float`` or ``str`` subclass (which can compare equal to a plain value) nor a
    mapping. Any other call, and any call that raises, is validated in full as before.
    """

    _interned: dict[tuple[Any, ...], Any]

    def __init__(cls, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # One table per class: a subclass's call never returns a plain Role.
        cls._interned = {}

    # The parameters spelled out (not *args, **kwargs): binding them is the cheapest way in,
    # and positional and keyword spellings of one call share one entry.
    def __call__(
        cls,
        arn: Any = _UNSET,
        subject: Any = None,
        session_name: Any = None,
        duration_seconds: Any = 3600,
        policy: Any = None,
        claims: Any = None,
        *more: Any,
        **unknown: Any,
    ) -> Any:
        if (
            claims is None
            and arn.__class__ is str
            and duration_seconds.__class__ is int
            and (subject is None or subject.__class__ is str)
            and (policy is None or policy.__class__ is str)
            and (session_name is None or session_name.__class__ is str)
            and not more
            and not unknown
        ):
            key = (arn, subject, session_name, duration_seconds, policy)
            interned = cls._interned
            role = interned.get(key)
            if role is None:
                role = super().__call__(arn, subject, session_name, duration_seconds, policy)
                if len(interned) >= INTERN_SIZE:
                    # Oldest first (a dict keeps insertion order). Another thread may change
                    # the table meanwhile: then this one simply skips the eviction.
                    with contextlib.suppress(RuntimeError, StopIteration):
                        interned.pop(next(iter(interned)), None)
                interned[key] = role
            return role
        if arn is _UNSET:
            return super().__call__(*more, **unknown)  # Role's own error for a missing arn
        return super().__call__(
            arn, subject, session_name, duration_seconds, policy, claims, *more, **unknown
        )


@dataclass(frozen=True, eq=False)
class Role(metaclass=_Interned):
    """An IAM role to assume and everything that shapes the credentials for it; validated."""

    arn: str
    subject: str | None = None
    session_name: str | None = None
    duration_seconds: int = 3600
    policy: str | None = None
    claims: Mapping[str, Any] | None = None
    _shape: str = field(init=False, repr=False)
    _canonical: str = field(init=False, repr=False)
    _hash: int = field(init=False, repr=False)

    def __init__(
        self,
        arn: str,
        subject: str | None = None,
        session_name: str | None = None,
        duration_seconds: int = 3600,
        policy: str | Mapping[str, Any] | None = None,
        claims: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(arn, str) or not _ROLE_ARN.fullmatch(arn):
            raise ValueError(
                "arn: not an IAM role ARN (arn:<partition>:iam::<account>:role/<name>)"
            )
        if subject is not None and (
            not isinstance(subject, str) or not 1 <= len(subject) <= 255 or _CONTROL.search(subject)
        ):
            raise ValueError("subject: must be 1-255 characters without control characters")
        if session_name is not None and (
            not isinstance(session_name, str) or not _SESSION_NAME.fullmatch(session_name)
        ):
            raise ValueError("session_name: must be 2-64 characters of [\\w+=,.@-]")
        if (
            isinstance(duration_seconds, bool)
            or not isinstance(duration_seconds, int)
            or not 900 <= duration_seconds <= 43200
        ):
            raise ValueError("duration_seconds: must be an integer from 900 to 43200")
        policy_text, policy_parsed = _parse_policy(policy)
        frozen_claims = _freeze_claims(claims)
        # What shapes the credentials besides who asks: shared by every subject of the role.
        shape = _canonical_json(
            [
                arn,
                duration_seconds,
                policy_parsed,
                None if frozen_claims is None else dict(frozen_claims),
            ]
        )
        canonical = _canonical_json([subject, session_name, shape])
        if not _is_valid_unicode(canonical):
            # Rare: find the field to name (the ARN and session name patterns are ASCII).
            for name, value in (
                ("subject", subject or ""),
                ("policy", _canonical_json(policy_parsed)),
                ("claims", _canonical_json(None if frozen_claims is None else dict(frozen_claims))),
            ):
                if not _is_valid_unicode(value):
                    raise ValueError(f"{name}: must be valid Unicode (no lone surrogates)")
            raise ValueError("role: must be valid Unicode (no lone surrogates)")
        set_ = object.__setattr__
        set_(self, "arn", arn)
        set_(self, "subject", subject)
        set_(self, "session_name", session_name)
        set_(self, "duration_seconds", duration_seconds)
        set_(self, "policy", policy_text)
        set_(self, "claims", frozen_claims)
        set_(self, "_shape", shape)
        set_(self, "_canonical", canonical)
        set_(self, "_hash", hash(canonical))

    def effective_names(self, default_subject: str) -> tuple[str, str]:
        """The (subject, RoleSessionName) sent to STS, given the broker's default subject."""
        subject = self.subject or default_subject
        return subject, self.session_name or sanitize_session_name(subject)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not Role:
            return NotImplemented
        return self._canonical == other._canonical

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        parts = [f"arn={self.arn!r}"]
        if self.subject is not None:
            parts.append(f"subject={self.subject!r}")
        if self.session_name is not None:
            parts.append(f"session_name={self.session_name!r}")
        if self.duration_seconds != 3600:
            parts.append(f"duration_seconds={self.duration_seconds}")
        if self.policy is not None:
            parts.append("policy=...")
        if self.claims is not None:
            parts.append(f"claims={sorted(self.claims)}")
        return f"Role({', '.join(parts)})"


_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", re.ASCII)
#: What a template value may hold: IAM's name characters, so a value can neither add a path
#: to the ARN nor leave a JSON string in the policy.
_FIELD_VALUE = re.compile(r"[\w+=,.@-]{1,64}", re.ASCII)
#: Stands in for the value when a template is checked at construction.
_PROBE_VALUE = "123456789012"  # valid as an account id, a role name and in text


class RoleTemplate(dict[str | bytes, Role]):
    """A bounded map from one value (a tenant id) to its validated Role: ``template[value]``.

    ``RoleTemplate("arn:aws:iam::123456789012:role/tenant-{tenant}", subject="tenant:{tenant}",
    policy=...)`` builds the tenant's Role the first time a value is looked up and answers
    from a plain dict after that: a resolver that would build ``Role(...)`` per request pays a
    dict lookup instead. Keys are ``str`` or ``bytes`` (a header's raw value), 1-64 characters
    of ``[A-Za-z0-9_+=,.@-]``: the placeholder is replaced by text that cannot add a path to
    the ARN or end a JSON string in the policy. The template decides nothing about *who* may
    be which tenant: authenticate the request before you look its tenant up.
    """

    __slots__ = (
        "_arn",
        "_claims",
        "_duration",
        "_policy",
        "_session_name",
        "_subject",
        "field",
        "maxsize",
    )

    def __init__(
        self,
        arn: str,
        *,
        subject: str | None = None,
        session_name: str | None = None,
        duration_seconds: int = 3600,
        policy: str | Mapping[str, Any] | None = None,
        claims: Mapping[str, Any] | None = None,
        field: str = "tenant",
        maxsize: int = INTERN_SIZE,
    ) -> None:
        super().__init__()
        if not isinstance(field, str) or not _FIELD_NAME.fullmatch(field):
            raise ValueError("field: must be an identifier such as 'tenant'")
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError("maxsize: must be an integer >= 1")
        if isinstance(policy, Mapping):
            try:
                policy = json.dumps(dict(policy), separators=(",", ":"), allow_nan=False)
            except (TypeError, ValueError, RecursionError):
                raise ValueError("policy: not JSON-serializable") from None
        texts = {"arn": arn, "subject": subject, "session_name": session_name, "policy": policy}
        placeholder = "{" + field + "}"
        for name, text in texts.items():
            if text is None or not isinstance(text, str):
                continue  # Role's own validation names a wrong type below
            for found in _PLACEHOLDER.findall(text):
                if found != field:
                    raise ValueError(
                        f"{name}: unknown placeholder {{{found}}} (field is {field!r})"
                    )
        if not any(isinstance(t, str) and placeholder in t for t in texts.values()):
            raise ValueError(
                f"template: {placeholder} appears in none of arn, subject, session_name, policy"
            )
        self.field = field
        self.maxsize = maxsize
        self._arn = arn
        self._subject = subject
        self._session_name = session_name
        self._duration = duration_seconds
        self._policy = policy
        self._claims = claims
        self._build(_PROBE_VALUE)  # a bad ARN, policy or duration fails here, not on a request

    def _build(self, value: str) -> Role:
        placeholder = "{" + self.field + "}"

        def fill(text: str | None) -> str | None:
            return text.replace(placeholder, value) if isinstance(text, str) else text

        # type.__call__ skips Role's interning table: this dict is the only one keeping it.
        return type.__call__(  # type: ignore[no-any-return]
            Role,
            fill(self._arn),
            fill(self._subject),
            fill(self._session_name),
            self._duration,
            fill(self._policy),
            self._claims,
        )

    def __missing__(self, key: str | bytes) -> Role:
        if isinstance(key, bytes):
            try:
                value = bytes.decode(key, "ascii")
            except UnicodeDecodeError:
                value = ""
        elif isinstance(key, str):
            value = str.__str__(key)  # a StrEnum member's value, not its name
        else:
            raise TypeError(f"RoleTemplate keys must be str or bytes, not {type(key).__qualname__}")
        if key.__class__ is not bytes and key.__class__ is not str:
            # Stored under the plain value: the table holds only exact str and bytes keys.
            key = value
        if not _FIELD_VALUE.fullmatch(value):
            # The value came from a request: not echoed, so a header cannot write the log.
            raise ValueError(f"{self.field}: must be 1-64 characters of [A-Za-z0-9_+=,.@-]")
        role = self._build(value)
        if len(self) >= self.maxsize:
            # Oldest first; another thread changing the dict meanwhile only skips this eviction.
            with contextlib.suppress(RuntimeError, StopIteration, KeyError):
                dict.__delitem__(self, next(iter(self)))
        dict.__setitem__(self, key, role)
        return role

    def get(self, key: str | bytes, default: Any = None) -> Any:
        """The Role for ``key``, or ``default`` when no Role can be made from it."""
        try:
            return self[key]
        except (TypeError, ValueError):
            return default

    def _read_only(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("RoleTemplate is read-only: look a Role up with template[value]")

    __setitem__ = __delitem__ = __ior__ = _read_only
    setdefault = update = pop = popitem = _read_only

    def clear(self) -> None:
        """Forget every Role built so far (they are rebuilt on their next lookup)."""
        dict.clear(self)

    # A template is its own thing, not the dict of what it has built so far.
    __eq__ = object.__eq__
    __ne__ = object.__ne__
    __hash__ = object.__hash__  # type: ignore[assignment]

    def __reduce__(self) -> Any:
        return (_rebuild_template, (self._arn, self._kwargs()))

    def _kwargs(self) -> dict[str, Any]:
        return {
            "subject": self._subject,
            "session_name": self._session_name,
            "duration_seconds": self._duration,
            "policy": self._policy,
            "claims": None if self._claims is None else dict(self._claims),
            "field": self.field,
            "maxsize": self.maxsize,
        }

    def __repr__(self) -> str:
        parts = [repr(self._arn)]
        for name in ("subject", "session_name"):
            value = getattr(self, "_" + name)
            if value is not None:
                parts.append(f"{name}={value!r}")
        if self._duration != 3600:
            parts.append(f"duration_seconds={self._duration}")
        if self._policy is not None:
            parts.append("policy=...")
        if self._claims is not None:
            parts.append(f"claims={sorted(self._claims)}")
        parts.append(f"field={self.field!r}")
        return f"RoleTemplate({', '.join(parts)}) with {len(self)} built"


def _rebuild_template(arn: str, kwargs: dict[str, Any]) -> RoleTemplate:
    return RoleTemplate(arn, **kwargs)


def identity_key(
    role: Role,
    *,
    issuer: str,
    audience: str,
    sts_endpoint: str,
    region: str,
    default_subject: str,
) -> str:
    """Return the hex SHA-256 digest naming one identity: equal only for identical inputs.

    The subject and session name are the ones actually sent (after ``default_subject`` and
    the session name's default), so ``Role(arn)`` and ``Role(arn, subject=default_subject)``
    are one identity.
    """
    subject, session_name = role.effective_names(default_subject)
    encoded = _canonical_json(
        ["stscreds/1", issuer, audience, sts_endpoint, region, subject, session_name, role._shape]
    )
    return hashlib.sha256(encoded.encode()).hexdigest()
