"""LocalSTS: a strict, in-process STS that speaks the real AWS STS Query protocol.

Only ``Action=AssumeRoleWithWebIdentity`` is implemented, but that action is
implemented the way AWS does it: the web identity token is verified against the
issuer's JWKS (given directly, or discovered via ``/.well-known/openid-configuration``
and cached), parameters are validated, and the answer is the real STS XML (success or
``ErrorResponse``) with the real HTTP status, so an unmodified botocore client
pointed at ``LocalSTS.url`` parses it exactly as it would parse AWS.

Unlike moto (which accepts any token), this server fails loudly on anything AWS
would reject, and it can inject faults (throttling, 5xx, slowness, hangs, raw malformed
answers) and skew: the ``Date`` header and ``Expiration`` both come from the injectable clock.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import math
import re
import secrets
import socket
import string
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qs, urlsplit
from xml.sax.saxutils import escape

import jwt

if TYPE_CHECKING:
    from .._broker import CredentialBroker
    from .._signing import SigningKey

__all__ = [
    "DEFAULT_ISSUER",
    "KEY_FETCH_FAILED",
    "LocalSTS",
    "RecordedCall",
    "STSError",
    "build_success_xml",
]

ACTION = "AssumeRoleWithWebIdentity"
API_VERSION = "2011-06-15"
XMLNS = "https://sts.amazonaws.com/doc/2011-06-15/"
ALGORITHMS = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512")
KEY_FETCH_FAILED = (
    "Couldn't retrieve verification key from your identity provider,  please reference "
    "AssumeRoleWithWebIdentity documentation for requirements"
)
_ROLE_ARN = re.compile(r"arn:(aws[a-z-]*):iam::(\d{12}):role/(?:[\w+=,.@-]+/)*([\w+=,.@-]{1,64})")
_SESSION_NAME = re.compile(r"[\w+=,.@-]{2,64}", re.ASCII)
#: The issuer of brokers made by :meth:`LocalSTS.make_broker` unless told otherwise.
DEFAULT_ISSUER = "http://127.0.0.1/stscreds-test"
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_UNSET: Any = object()
_S = TypeVar("_S", bound="LocalSTS")


class STSError(Exception):
    """An error answered as an STS ``ErrorResponse`` (Type is derived from the status)."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.status = code, message, status


@dataclass
class RecordedCall:
    """One AssumeRoleWithWebIdentity request as seen (and answered) by the server."""

    role_arn: str | None
    session_name: str | None
    duration: int | None
    policy: str | None
    claims: dict[str, Any] | None = None  # only set once the token verified
    token_header: dict[str, Any] | None = None
    credentials: dict[str, str] | None = None  # only set on success
    status: int = 0
    error_code: str | None = None
    request_id: str = ""
    params: dict[str, str] = field(default_factory=dict)
    expiration: float | None = None  # POSIX time of the answered Expiration (success only)
    raw: bool = False  # answered by a respond_raw() fault (body as given, nothing processed)


@dataclass(frozen=True)
class _Raw:
    body: bytes
    status: int
    content_type: str


def _random(alphabet: str, n: int) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


def _new_credentials() -> tuple[str, str, str]:
    """Fresh (AccessKeyId, SecretAccessKey, SessionToken) shaped like AWS's."""
    return (
        "ASIA" + _random(string.ascii_uppercase + string.digits, 16),
        _random(string.ascii_letters + string.digits + "+/", 40),
        base64.b64encode(secrets.token_bytes(384)).decode(),
    )


def _iso8601(ts: float) -> str:
    return datetime.fromtimestamp(math.floor(ts), tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class LocalSTS:
    """Threaded HTTP server on 127.0.0.1 (free port) emulating STS AssumeRoleWithWebIdentity.

    It trusts one OIDC provider (like an IAM OIDC provider in an AWS account): an ``issuer``
    and either its JWKS given directly (``jwks=``, :meth:`trust`) or, with ``jwks=None``, the
    JWKS discovered over HTTP from ``<issuer>/.well-known/openid-configuration`` and cached
    for its ``max-age`` (at most ``jwks_cache_max`` seconds; ``jwks_cache=False`` refetches on
    every call). Configuration and fault knobs may be changed while the server runs.
    """

    def __init__(
        self,
        *,
        issuer: str | None = None,
        jwks: Callable[[], dict[str, Any]] | dict[str, Any] | None = None,
        audiences: Iterable[str] = ("sts.amazonaws.com",),
        clock: Callable[[], float] = time.time,
        leeway: float = 0.0,
        jwks_cache: bool = True,
        jwks_cache_max: float = 3600.0,
    ) -> None:
        self._jwks_lock = threading.Lock()
        self.issuer: str | None = None
        self.jwks_source: Callable[[], dict[str, Any]] | None = None
        self.audiences: list[str] = []
        self.jwks_cache = jwks_cache
        """Cache a discovered JWKS (for its ``max-age``); False refetches it on every call."""
        self.jwks_cache_max = jwks_cache_max
        """Longest a discovered JWKS is cached (seconds); also the time without ``max-age``."""
        # (issuer, cached until (clock time), JWKS) of the last discovery, while cacheable.
        self._jwks_cached: tuple[str, float, dict[str, Any]] | None = None
        self.configure(issuer=issuer, jwks=jwks, audiences=audiences)
        self.clock = clock
        self.leeway = leeway  # seconds of skew tolerated for exp/nbf/iat
        self.delay: float = 0.0
        self.reject_roles: set[str] = set()
        self.send_date: bool = True
        """Send the ``Date`` response header (taken from ``clock``); False omits it entirely."""
        self.grant_seconds: int | None = None
        """If set, the granted lifetime is ``min(DurationSeconds, grant_seconds)``."""
        self.expiration: Callable[[float, int], float] | None = None
        """If set, ``(now, requested duration) -> POSIX Expiration``; wins over grant_seconds."""
        self.jwks_cache_control: str | None = None
        """``Cache-Control`` of the last JWKS fetched by discovery."""
        self.jwks_fetches = 0
        """JWKS documents fetched by discovery (cache hits not counted)."""
        self.discovery_error: str | None = None
        """Why the last discovery failed (AWS only says KEY_FETCH_FAILED); None after a success."""
        self.internal_errors: list[BaseException] = []  # bugs in this server, not in callers
        self.url = ""
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._released = threading.Event()
        self._released.set()
        # (remaining calls or None for always, what to answer instead of processing)
        self._fault: tuple[int | None, STSError | _Raw] | None = None
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self.reset()

    # -- configuration -------------------------------------------------------------------

    def configure(
        self,
        *,
        issuer: str | None = _UNSET,
        jwks: Callable[[], dict[str, Any]] | dict[str, Any] | None = _UNSET,
        audiences: Iterable[str] = _UNSET,
    ) -> None:
        """Set the registered OIDC provider. Omitted arguments keep their value.

        With ``jwks=None`` keys are discovered from ``<issuer>/.well-known/openid-configuration``
        (then its ``jwks_uri``), which needs a loopback issuer; a dict is served as-is, a
        callable is called per request. Changing the issuer or the JWKS empties the JWKS cache.
        """
        new_issuer = self.issuer if issuer is _UNSET else issuer
        if jwks is _UNSET:
            source = self.jwks_source
        else:
            source = (lambda: jwks) if isinstance(jwks, dict) else jwks
        if source is None and new_issuer is not None and not _is_loopback(new_issuer):
            # Discovery makes real HTTP requests; never let a test reach the internet.
            raise ValueError(f"test issuer must be a loopback URL, got {new_issuer!r}")
        self.issuer, self.jwks_source = new_issuer, source
        if issuer is not _UNSET or jwks is not _UNSET:
            self.forget_jwks()
        if audiences is not _UNSET:
            self.audiences = list(audiences)

    def trust(self: _S, broker: CredentialBroker, *, discover: bool = False) -> _S:
        """Register ``broker``'s issuer and audience; verify with its live JWKS (or discovery)."""
        # broker.jwks is called per request, so the broker's key rotation is followed as is.
        self.configure(
            issuer=broker.issuer,
            jwks=None if discover else broker.jwks,
            audiences=[broker.audience],
        )
        return self

    def make_broker(
        self,
        *,
        issuer: str = DEFAULT_ISSUER,
        signing_keys: Sequence[SigningKey] | None = None,
        discover: bool = False,
        **options: Any,
    ) -> CredentialBroker:
        """A CredentialBroker using this STS and trusted by it (a fresh ES256 key by default).

        ``options`` go to :class:`~stscreds.CredentialBroker`; ``discover=True`` makes this
        STS fetch the keys from the issuer, which must then serve them (a real server).
        Close the broker when done.
        """
        from .._broker import CredentialBroker
        from .._signing import SigningKey

        if not self.url:
            raise RuntimeError("start() the LocalSTS before making a broker for it")
        keys = [SigningKey.generate("ES256")] if signing_keys is None else list(signing_keys)
        options.setdefault("sts_endpoint_url", self.url)
        broker = CredentialBroker(issuer=issuer, signing_keys=keys, **options)
        try:
            self.trust(broker, discover=discover)
        except BaseException:
            broker.close()
            raise
        return broker

    def forget_jwks(self) -> None:
        """Drop the cached discovered JWKS (as if AWS's cache had expired)."""
        with self._jwks_lock:
            self._jwks_cached = None

    @property
    def hang(self) -> bool:
        """While True, requests are held (after being counted) until released or stopped."""
        return not self._released.is_set()

    @hang.setter
    def hang(self, value: bool) -> None:
        if value:
            self._released.clear()
        else:
            self._released.set()

    def release(self) -> None:
        """Let held requests proceed (same as ``hang = False``)."""
        self.hang = False

    def fail_next(
        self,
        n: int = 1,
        code: str = "Throttling",
        status: int = 400,
        message: str = "Rate exceeded",
    ) -> None:
        """Answer the next ``n`` calls with the given STS error instead of processing them."""
        with self._lock:
            self._fault = (n, STSError(code, message, status))

    def fail_always(
        self,
        code: str = "ServiceUnavailable",
        status: int = 503,
        message: str = "Service unavailable",
    ) -> None:
        """Answer every call with the given error until :meth:`clear_faults`."""
        with self._lock:
            self._fault = (None, STSError(code, message, status))

    def respond_raw(
        self,
        body: bytes,
        status: int = 200,
        n: int | None = 1,
        content_type: str = "text/xml",
    ) -> None:
        """Answer the next ``n`` calls (every call if None) with exactly ``body`` and ``status``.

        Counted like other faults (``calls``, a :class:`RecordedCall` with ``raw=True``) but
        never as a success; replaces any pending fault and is cleared by :meth:`clear_faults`.
        """
        if n is not None and n < 1:
            raise ValueError(f"n must be None or >= 1, got {n}")
        if not 200 <= status < 600 or status in (204, 304):
            raise ValueError(f"status {status} cannot carry a body")
        with self._lock:
            self._fault = (n, _Raw(bytes(body), status, content_type))

    def clear_faults(self) -> None:
        """Drop any pending fail_next/fail_always/respond_raw fault."""
        with self._lock:
            self._fault = None

    # -- recording -----------------------------------------------------------------------

    def reset(self) -> None:
        """Forget recorded calls and counters (configuration and faults are kept)."""
        with self._lock:
            self.calls = 0
            self.successes = 0
            self.connections_accepted = 0  # TCP connections; stays 1 while keep-alive works
            self.requests: list[RecordedCall] = []

    def calls_for(self, role_arn: str) -> int:
        """Number of answered calls for ``role_arn``."""
        return len(self.requests_for(role_arn))

    def requests_for(self, role_arn: str) -> list[RecordedCall]:
        """The answered calls for ``role_arn``, oldest first."""
        with self._lock:
            return [r for r in self.requests if r.role_arn == role_arn]

    def wait_for_calls(self, n: int, timeout: float = 5.0) -> bool:
        """Block until at least ``n`` calls have arrived (e.g. are held by ``hang``)."""
        with self._arrived:
            return self._arrived.wait_for(lambda: self.calls >= n, timeout)

    # -- lifecycle -----------------------------------------------------------------------

    def start(self: _S) -> _S:
        """Listen on a free 127.0.0.1 port (see ``url``) and serve in a daemon thread."""
        if self._httpd is not None:
            raise RuntimeError("already started")
        self._stopping.clear()
        httpd = _Server(("127.0.0.1", 0), _Handler)
        httpd.sts = self
        self._httpd = httpd
        self.url = f"http://127.0.0.1:{httpd.server_address[1]}"
        # A short poll interval keeps stop() (hence every fixture teardown) fast.
        self._thread = threading.Thread(
            target=httpd.serve_forever, args=(0.05,), name="LocalSTS", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, interrupt held/delayed requests, close sockets and join all threads."""
        httpd, thread = self._httpd, self._thread
        if httpd is None or thread is None:
            return
        self._stopping.set()
        self._released.set()
        httpd.shutdown()
        thread.join()
        # Handler threads idling on keep-alive connections only notice EOF; force it so
        # server_close() (which joins handler threads) cannot block on a client's pool.
        # SHUT_RD, not SHUT_RDWR: a request woken above must still be able to write its
        # answer (SHUT_RDWR truncated it and botocore then reported code "503", no body).
        with self._lock:
            conns = list(self._connections)
        for conn in conns:
            with contextlib.suppress(OSError):  # already closed by the client
                conn.shutdown(socket.SHUT_RD)
        httpd.server_close()
        self._httpd = self._thread = None

    def __enter__(self: _S) -> _S:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- request processing --------------------------------------------------------------

    def _handle(self, params: dict[str, str], request_id: str) -> tuple[int, bytes, str]:
        """Process one request; returns (status, body, content type). Raises nothing."""
        action, version = params.get("Action"), params.get("Version")
        if action != ACTION or version != API_VERSION:
            msg = f"Could not find operation {action} for version {version}"
            err = STSError("InvalidAction", msg)
            return err.status, _error_xml(err, request_id), "text/xml"
        with self._arrived:
            self.calls += 1
            self._arrived.notify_all()
        self._released.wait()
        if self.delay > 0:
            self._stopping.wait(self.delay)
        if self._stopping.is_set():
            err = STSError("ServiceUnavailable", "Server is shutting down", 503)
            return err.status, _error_xml(err, request_id), "text/xml"

        rec = RecordedCall(
            role_arn=params.get("RoleArn"),
            session_name=params.get("RoleSessionName"),
            duration=None,
            policy=params.get("Policy"),
            request_id=request_id,
            params=params,
        )
        content_type = "text/xml"
        try:
            raw = self._take_fault()
            if raw is not None:
                rec.status, rec.raw = raw.status, True
                body, content_type = raw.body, raw.content_type
            else:
                body = self._assume(params, rec)
                rec.status = 200
        except STSError as err:
            rec.status, rec.error_code = err.status, err.code
            body = _error_xml(err, request_id)
        except Exception as exc:  # a bug here must surface as a 500, and in internal_errors
            self.internal_errors.append(exc)
            bug = STSError("InternalFailure", f"LocalSTS bug: {exc!r}", 500)
            rec.status, rec.error_code = bug.status, bug.code
            body = _error_xml(bug, request_id)
        with self._lock:
            self.requests.append(rec)
            self.successes += rec.status == 200 and not rec.raw
        return rec.status, body, content_type

    def _take_fault(self) -> _Raw | None:
        """Consume one pending fault: raise an STSError one, return a raw one."""
        with self._lock:
            if self._fault is None:
                return None
            remaining, fault = self._fault
            if remaining is not None:
                self._fault = (remaining - 1, fault) if remaining > 1 else None
        if isinstance(fault, _Raw):
            return fault
        raise STSError(fault.code, fault.message, fault.status)

    def _expiration(self, now: float, duration: int) -> float:
        if self.expiration is not None:
            return self.expiration(now, duration)
        if self.grant_seconds is not None:
            return now + min(duration, self.grant_seconds)
        return now + duration

    def _date_header_time(self) -> float:
        try:
            return self.clock()
        except Exception as exc:  # a broken test clock must not drop the connection
            self.internal_errors.append(exc)
            return time.time()

    def _assume(self, params: dict[str, str], rec: RecordedCall) -> bytes:
        # Parameter validation comes before token verification, as on AWS.
        role_arn, session, token = rec.role_arn, rec.session_name, params.get("WebIdentityToken")
        for name, value in (
            ("roleArn", role_arn),
            ("roleSessionName", session),
            ("webIdentityToken", token),
        ):
            if value is None:
                raise STSError(
                    "ValidationError",
                    f"1 validation error detected: Value null at "
                    f"'{name}' failed to satisfy constraint: Member must not be null",
                )
        assert role_arn is not None and session is not None and token is not None
        arn = _ROLE_ARN.fullmatch(role_arn)
        if arn is None:
            raise STSError("ValidationError", f"{role_arn} is invalid")
        if not _SESSION_NAME.fullmatch(session):
            raise STSError(
                "ValidationError",
                f"1 validation error detected: Value '{session}' at "
                "'roleSessionName' failed to satisfy constraint: Member must satisfy "
                r"regular expression pattern: [\w+=,.@-]*",
            )
        raw_duration = params.get("DurationSeconds", "3600")
        try:
            duration = int(raw_duration)
        except ValueError:
            raise STSError("ValidationError", f"Invalid DurationSeconds {raw_duration!r}") from None
        rec.duration = duration
        if not 900 <= duration <= 43200:
            bound = (
                "greater than or equal to 900" if duration < 900 else "less than or equal to 43200"
            )
            raise STSError(
                "ValidationError",
                f"1 validation error detected: Value '{duration}' at "
                "'durationSeconds' failed to satisfy constraint: Member must have value "
                f"{bound}",
            )

        claims, aud = self._verify(token, rec)
        if role_arn in self.reject_roles:
            raise STSError(
                "AccessDenied", "Not authorized to perform sts:AssumeRoleWithWebIdentity", 403
            )

        now = self.clock()
        expiration = math.floor(self._expiration(now, duration))
        key_id, secret, session_token = _new_credentials()
        creds = {
            "AccessKeyId": key_id,
            "SecretAccessKey": secret,
            "SessionToken": session_token,
            "Expiration": _iso8601(expiration),
        }
        rec.credentials, rec.expiration = creds, float(expiration)
        return build_success_xml(
            expiration,
            creds["AccessKeyId"],
            creds["SecretAccessKey"],
            creds["SessionToken"],
            role_arn=role_arn,
            session_name=session,
            subject=claims["sub"],
            audience=aud,
            issuer=str(claims["iss"]),
            request_id=rec.request_id,
        )

    def _verify(self, token: str, rec: RecordedCall) -> tuple[dict[str, Any], str]:
        """Verify the token like AWS: signature via JWKS kid, then iss, aud, sub and times."""

        def invalid(message: str) -> STSError:
            return STSError("InvalidIdentityToken", message)

        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise invalid(
                "The ID Token provided is not a valid JWT. (You may see this error if "
                "you sent an Access Token)"
            ) from None
        rec.token_header = header
        iss = unverified.get("iss")
        if self.issuer is None or iss != self.issuer:
            raise invalid(f"No OpenIDConnect provider found in your account for {iss}")
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in ALGORITHMS:
            raise invalid(f"Unsupported token signing algorithm {alg}")
        keys = self._jwks().get("keys", [])
        jwk = next((k for k in keys if isinstance(k, dict) and k.get("kid") == kid), None)
        if kid is None or jwk is None:
            raise invalid(f"No matching key found in your identity provider's JWKS for kid {kid}")
        if jwk.get("alg", alg) != alg:
            raise invalid(f"Key {kid} is for {jwk['alg']}, token is signed with {alg}")
        try:
            key = jwt.PyJWK(jwk, algorithm=alg)
            # Time claims are checked below against our own (injectable) clock.
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                options={
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                    "verify_aud": False,
                    "verify_iss": False,
                },
            )
        except jwt.PyJWTError as exc:
            raise invalid(f"Token signature verification failed: {exc}") from None
        rec.claims = claims

        auds = claims.get("aud")
        auds = [auds] if isinstance(auds, str) else auds if isinstance(auds, list) else []
        aud = next((a for a in auds if a in self.audiences), None)
        if aud is None:
            raise invalid("Incorrect token audience")
        if not isinstance(claims.get("sub"), str) or not claims["sub"]:
            raise invalid("Token is missing the sub claim")
        now = self.clock()
        for name in ("exp", "iat", "nbf"):
            if name in claims and not isinstance(claims[name], (int, float)):
                raise invalid(f"Token claim {name} is not a number")
        if "exp" not in claims:
            raise invalid("Token is missing the exp claim")
        if claims["exp"] <= now - self.leeway:
            raise invalid("Token is expired")
        if claims.get("iat", now) > now + self.leeway or claims.get("nbf", now) > now + self.leeway:
            raise invalid("Token is not yet valid (iat/nbf in the future)")
        if claims.get("iat", claims["exp"]) > claims["exp"]:
            raise invalid("Token iat is after exp")
        return claims, aud

    def _jwks(self) -> dict[str, Any]:
        if self.jwks_source is not None:
            return self.jwks_source()
        issuer = self.issuer
        assert issuer is not None
        now = self.clock() if self.jwks_cache else 0.0
        with self._jwks_lock:
            cached = self._jwks_cached
        if self.jwks_cache and cached is not None and cached[0] == issuer and now < cached[1]:
            return cached[2]
        try:
            document, cache_control, pragma = self._discover(issuer)
        except _DiscoveryFailed as exc:
            self.discovery_error = str(exc)
            raise STSError("InvalidIdentityToken", KEY_FETCH_FAILED) from None
        with self._lock:
            self.jwks_fetches += 1
            self.jwks_cache_control = cache_control
        # AWS refuses (KEY_FETCH_FAILED) a JWKS its answer forbids caching.
        directives = {d.strip().lower() for d in (cache_control or "").split(",")}
        max_age = _max_age(directives)
        if directives & {"no-cache", "no-store"} or max_age == 0 or "no-cache" in pragma.lower():
            self.discovery_error = (
                f"the JWKS may not be cached (Cache-Control: {cache_control}, Pragma: {pragma})"
            )
            raise STSError("InvalidIdentityToken", KEY_FETCH_FAILED)
        self.discovery_error = None
        if self.jwks_cache:
            ttl = self.jwks_cache_max if max_age is None else min(max_age, self.jwks_cache_max)
            with self._jwks_lock:
                # Unless the provider was reconfigured meanwhile.
                if self.issuer == issuer and self.jwks_source is None:
                    self._jwks_cached = (issuer, now + ttl, document)
        return document

    @staticmethod
    def _discover(issuer: str) -> tuple[dict[str, Any], str | None, str]:
        """Fetch the issuer's OpenID configuration, then its JWKS; raise _DiscoveryFailed."""
        # AWS discovers the JWKS through the issuer's OpenID configuration.
        # An empty ProxyHandler keeps HTTP(S)_PROXY env vars from hijacking loopback fetches.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        url = issuer.rstrip("/") + "/.well-known/openid-configuration"
        try:
            # Only loopback http(s) URLs get here: the issuer (configure) and jwks_uri (below).
            with opener.open(url, timeout=5) as resp:
                jwks_uri = json.load(resp)["jwks_uri"]
            if not isinstance(jwks_uri, str) or not _is_loopback(jwks_uri):
                raise _DiscoveryFailed(f"{url}: jwks_uri {jwks_uri!r} is not a loopback URL")
            url = jwks_uri
            with opener.open(url, timeout=5) as resp:
                cache_control = resp.headers.get("Cache-Control")
                pragma = resp.headers.get("Pragma") or ""
                document = json.load(resp)
        except _DiscoveryFailed:
            raise
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise _DiscoveryFailed(f"GET {url}: {exc!r}") from None
        if not isinstance(document, dict):
            raise _DiscoveryFailed(f"GET {url}: not a JSON object")
        return document, cache_control, pragma


class _DiscoveryFailed(Exception):
    """Discovery of the issuer's JWKS failed (the message says where and why)."""


def _is_loopback(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and parts.hostname in _LOOPBACK


def _max_age(directives: set[str]) -> float | None:
    """The ``max-age`` of a set of Cache-Control directives (None if absent or invalid)."""
    for directive in directives:
        name, _, value = directive.partition("=")
        if name.strip() == "max-age":
            try:
                return max(0, int(value.strip().strip('"')))
            except ValueError:
                return None
    return None


def build_success_xml(
    expiration: float | None,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
    session_token: str | None = None,
    *,
    omit: Iterable[str] = (),
    role_arn: str = "arn:aws:iam::123456789012:role/test",
    session_name: str = "session",
    subject: str = "user",
    audience: str = "sts.amazonaws.com",
    issuer: str = "http://127.0.0.1/issuer",
    request_id: str | None = None,
) -> bytes:
    """Real STS AssumeRoleWithWebIdentity success XML (as LocalSTS answers it).

    Credential values default to fresh random ones; ``expiration=None`` or naming a
    ``Credentials`` child in ``omit`` leaves that element out (for :meth:`LocalSTS.respond_raw`).
    """
    key_id, secret, token = _new_credentials()
    creds = {
        "AccessKeyId": key_id if access_key_id is None else access_key_id,
        "SecretAccessKey": secret if secret_access_key is None else secret_access_key,
        "SessionToken": token if session_token is None else session_token,
        "Expiration": None if expiration is None else _iso8601(expiration),
    }
    omitted = set(omit)
    creds = {k: v for k, v in creds.items() if v is not None and k not in omitted}
    arn = _ROLE_ARN.fullmatch(role_arn)
    if arn is None:
        raise ValueError(f"not a role ARN: {role_arn!r}")
    partition, account, role_name = arn.groups()
    role_id = "AROA" + hashlib.sha256(role_arn.encode()).hexdigest()[:17].upper()
    issuer_host = issuer.split("://", 1)[-1]
    fields = {
        "Credentials": creds,
        "SubjectFromWebIdentityToken": subject,
        "AssumedRoleUser": {
            "AssumedRoleId": f"{role_id}:{session_name}",
            "Arn": f"arn:{partition}:sts::{account}:assumed-role/{role_name}/{session_name}",
        },
        "Provider": f"arn:{partition}:iam::{account}:oidc-provider/{issuer_host}",
        "Audience": audience,
    }
    return (
        f'<{ACTION}Response xmlns="{XMLNS}"><{ACTION}Result>{_xml(fields)}</{ACTION}Result>'
        f"<ResponseMetadata><RequestId>{request_id or uuid.uuid4()}</RequestId>"
        f"</ResponseMetadata></{ACTION}Response>"
    ).encode()


def _xml(value: Any) -> str:
    if isinstance(value, dict):
        return "".join(f"<{k}>{_xml(v)}</{k}>" for k, v in value.items())
    return escape(str(value))


def _error_xml(err: STSError, request_id: str) -> bytes:
    kind = "Receiver" if err.status >= 500 else "Sender"
    return (
        f'<ErrorResponse xmlns="{XMLNS}"><Error><Type>{kind}</Type><Code>{escape(err.code)}'
        f"</Code><Message>{escape(err.message)}</Message></Error>"
        f"<RequestId>{request_id}</RequestId></ErrorResponse>"
    ).encode()


class _Server(ThreadingHTTPServer):
    # Non-daemon handler threads so server_close() joins them: no thread outlives stop().
    daemon_threads = False
    block_on_close = True
    # A burst of exchanges connects at once; the default backlog (5) makes the kernel drop
    # connection attempts, which the client retries a second later.
    request_queue_size = 128
    sts: LocalSTS

    def process_request(self, request: Any, client_address: Any) -> None:
        # Tracked here, in the accept thread, so stop() sees every connection once
        # serve_forever() has returned (tracking in the handler thread would race).
        with self.sts._lock:
            self.sts._connections.add(request)
            self.sts.connections_accepted += 1
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.sts._lock:
            self.sts._connections.discard(request)
        super().shutdown_request(request)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like AWS; botocore pools connections
    # Headers and body go out in two sends: with Nagle and delayed ACKs the second waited
    # ~40 ms on every call.
    disable_nagle_algorithm = True
    server: _Server

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode("utf-8", "replace")
        self._respond(body)

    def do_GET(self) -> None:  # STS also accepts the Query API as a GET query string
        self._respond("")

    def _respond(self, body: str) -> None:
        query = urlsplit(self.path).query
        params = {k: v[-1] for k, v in parse_qs(query + "&" + body, keep_blank_values=True).items()}
        request_id = str(uuid.uuid4())
        status, payload, content_type = self.server.sts._handle(params, request_id)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("x-amzn-RequestId", request_id)
        self.end_headers()
        self.wfile.write(payload)

    def send_response(self, code: int, message: str | None = None) -> None:
        if self.server.sts.send_date:
            super().send_response(code, message)  # Date via date_time_string() below
            return
        # BaseHTTPRequestHandler.send_response() minus the Date header.
        self.log_request(code)
        self.send_response_only(code, message)
        self.send_header("Server", self.version_string())

    def date_time_string(self, timestamp: float | None = None) -> str:
        # The Date header tells the server's (injectable, possibly skewed) time, like AWS's.
        if timestamp is None:
            timestamp = self.server.sts._date_header_time()
        return super().date_time_string(timestamp)

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except (ConnectionError, TimeoutError):  # client went away (e.g. cancelled); not a bug
            self.close_connection = True
