"""The STS side: AssumeRoleWithWebIdentity over botocore, off the event loop, with a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import queue
import random
import re
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

import botocore.session
from botocore import UNSIGNED
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from botocore.parsers import ResponseParserError
from botocore.utils import parse_timestamp

from ._budget import StsBudget
from ._clock import StsClock, SystemClock
from ._credentials import Credentials
from ._errors import (
    _JWT_LIKE,
    CredentialsRejected,
    CredentialsUnavailable,
    STSUnavailable,
    _BadResponse,
    _Closed,
    _SigningUnavailable,
    _Timeout,
    _Unreachable,
)
from ._metrics import ExchangeOutcome

__all__ = [
    "NON_RECOVERABLE_CODES",
    "THROTTLING_CODES",
    "TRANSIENT_CODES",
    "StsExchanger",
    "classify_error",
]

logger = logging.getLogger("stscreds")

#: STS error codes retrying will not fix.
NON_RECOVERABLE_CODES = frozenset(
    {
        "AccessDenied",
        "IDPRejectedClaim",
        "InvalidIdentityToken",
        "MalformedPolicyDocument",
        "PackedPolicyTooLarge",
        "RegionDisabledException",
        "ExpiredTokenException",
    }
)
#: STS error codes worth retrying (within the exchange deadline).
TRANSIENT_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "IDPCommunicationError",
        "ServiceUnavailable",
        "InternalFailure",
        "InternalError",
        "RequestTimeout",
    }
)

#: STS error codes that mean "the account is over its rate": they tighten the STS budget.
THROTTLING_CODES = frozenset(
    {"Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException"}
)


#: STS refusals that a token dated on the wrong clock earns ("Token is expired", ...).
_CLOCK_REFUSALS = frozenset({"InvalidIdentityToken", "ExpiredTokenException"})
#: Seconds STS's clock offset must move between minting and the refusal to sign again.
_REMINT_SHIFT = 5.0


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def is_throttling(error: BaseException) -> bool:
    """True for an STS answer saying the account is calling too fast."""
    if not isinstance(error, ClientError):
        return False
    code = error.response.get("Error", {}).get("Code")
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return code in THROTTLING_CODES or status == 429


def sts_date(response: dict[str, Any]) -> float | None:
    """The POSIX time of an STS answer's HTTP ``Date`` header, or None."""
    try:
        value = response["ResponseMetadata"]["HTTPHeaders"]["date"]
        parsed = email.utils.parsedate_to_datetime(value)
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    if parsed.tzinfo is None:  # RFC 9110 dates are GMT; an odd server's too
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


def parse_sts_timestamp(value: Any) -> datetime:
    """A timestamp of an STS answer (``Expiration``), read as botocore's own parser reads it.

    STS writes ``2024-01-01T00:00:00Z``: that is read with ``datetime.fromisoformat`` (about
    1 us); anything else goes to botocore's parser (dateutil: about 60 us, a fifth of
    botocore's own work for a whole AssumeRoleWithWebIdentity call).
    """
    if type(value) is str and value.endswith("Z"):
        try:
            parsed = datetime.fromisoformat(value[:-1])
        except ValueError:
            pass
        else:
            if parsed.tzinfo is None:
                return parsed.replace(tzinfo=timezone.utc)
    botocores: datetime = parse_timestamp(value)
    return botocores


def classify_error(error: BaseException, role_arn: str | None = None) -> CredentialsUnavailable:
    """Map a botocore error to ``CredentialsRejected`` or ``STSUnavailable`` (no secrets)."""
    if isinstance(error, CredentialsUnavailable):
        return error
    if isinstance(error, ClientError):
        info = error.response.get("Error", {})
        code = info.get("Code") or None
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        message = f"STS {code or 'error'}: {info.get('Message') or 'no message'}"
        if code in NON_RECOVERABLE_CODES:
            return CredentialsRejected(message, code=code, role_arn=role_arn)
        if code in TRANSIENT_CODES or status >= 500 or status == 429:
            return STSUnavailable(message, code=code, role_arn=role_arn)
        # Any other 4xx (ValidationError, InvalidParameterValue...) is a request STS will
        # refuse again however often it is sent.
        return CredentialsRejected(message, code=code, role_arn=role_arn)
    if isinstance(error, ResponseParserError):
        return _BadResponse(
            "STS answered with a response that could not be parsed", role_arn=role_arn
        )
    if isinstance(error, BotoCoreError | OSError):
        # Connection refused/reset, DNS, connect and read timeouts: the endpoint, not the role.
        return _Unreachable(f"STS unreachable: {type(error).__name__}", role_arn=role_arn)
    return STSUnavailable(f"STS exchange failed: {type(error).__name__}", role_arn=role_arn)


# botocore's DEBUG logging writes request parameters (botocore.endpoint: "Making request ...
# with params", the WebIdentityToken included) and raw response bodies (botocore.parsers:
# "Response body", with SecretAccessKey and SessionToken). These loggers get a filter that
# cuts those values out of the few records holding them.
# botocore.endpoint and botocore.auth also log every signed request of any client (headers,
# canonical request): the session token is the X-Amz-Security-Token header there.
_SECRET_LOGGERS = ("botocore.endpoint", "botocore.parsers", "botocore.auth")
_SECRET_MARKERS = (
    "SecretAccessKey",
    "SessionToken",
    "WebIdentityToken",
    "eyJ",
    "X-Amz-Security-Token",
    "x-amz-security-token",
    # KMS Sign (a KMSSigningKey): its request's Message and its answer's Signature together
    # are a usable token.
    "TrentService.Sign",
    '"Signature"',
)
_REDACTED_NAMES = "SecretAccessKey|SessionToken|WebIdentityToken"
_SECRET_PATTERNS = (
    # XML elements: <SecretAccessKey>...</SecretAccessKey>
    (re.compile(rf"<({_REDACTED_NAMES})>.*?</\1>", re.DOTALL), r"<\1><redacted></\1>"),
    # Form-encoded bodies: WebIdentityToken=...&
    (re.compile(rf"\b({_REDACTED_NAMES})=[^&\s'\"]*"), r"\1=<redacted>"),
    # Reprs of dicts and JSON: 'SessionToken': '...' / "SessionToken": "..."
    (
        re.compile(rf"""(['"]?)\b({_REDACTED_NAMES})\1(\s*[:=]\s*)(['"])(?:(?!\4).)*\4"""),
        r"\1\2\1\3\4<redacted>\4",
    ),
    # The session token as a request header or query parameter, in any of botocore's forms:
    # 'X-Amz-Security-Token': b'...', x-amz-security-token:... and X-Amz-Security-Token=...
    (
        re.compile(r"""(x-amz-security-token['"]?\s*[:=]\s*b?['"]?)[^'"\s&,}]+""", re.IGNORECASE),
        r"\1<redacted>",
    ),
    # A KMS Sign answer's signature (base64 JSON in the response body).
    (re.compile(r"""("Signature"\s*:\s*")[^"]*"""), r"\1<redacted>"),
    (_JWT_LIKE, "<redacted>"),
)
# A KMS Sign request's message: the token's signed part, base64 (only in Sign requests: other
# APIs' "Message" fields, error messages among them, are kept).
_KMS_SIGN_MESSAGE = re.compile(r"""("Message"\s*:\s*")[^"]*""")


def redact_secrets(text: str) -> str:
    """``text`` with STS secrets (access key secrets, session tokens, JWTs) cut out."""
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    if "TrentService.Sign" in text:
        text = _KMS_SIGN_MESSAGE.sub(r"\1<redacted>", text)
    return text


class SecretsFilter(logging.Filter):
    """Redacts STS secrets in the records of botocore's loggers that log bodies.

    A logger's filters run only for records it is enabled for, so with DEBUG off (the usual
    production setting) this costs nothing; with it on, only records holding one of the
    markers are rewritten. A record's exception is cut down to its type and redacted message:
    its traceback's frames hold the request body (the token) in their locals, which handlers
    that show locals (rich, error trackers) would print.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken record is the handler's business
            return True
        exc_info = record.exc_info
        if exc_info and exc_info[1] is not None:
            error = exc_info[1]
            message = f"{message} ({type(error).__name__}: {error})"
            record.exc_info = None
            record.exc_text = None
            record.msg, record.args = message, ()
        if any(marker in message for marker in _SECRET_MARKERS):
            record.msg = redact_secrets(message)
            record.args = ()
        return True


_SECRETS_FILTER = SecretsFilter()


def install_log_filter() -> None:
    """Put the secrets filter on botocore's body-logging loggers (once; idempotent)."""
    for name in _SECRET_LOGGERS:
        log = logging.getLogger(name)
        if _SECRETS_FILTER not in log.filters:
            log.addFilter(_SECRETS_FILTER)


@dataclass(frozen=True, slots=True)
class ExchangeRequest:
    """One AssumeRoleWithWebIdentity call's parameters (the token is never printed)."""

    role_arn: str
    session_name: str
    duration_seconds: int
    policy: str | None

    def params(self, token: str) -> dict[str, Any]:
        params: dict[str, Any] = {
            "RoleArn": self.role_arn,
            "RoleSessionName": self.session_name,
            "WebIdentityToken": token,
            "DurationSeconds": self.duration_seconds,
        }
        if self.policy is not None:
            params["Policy"] = self.policy
        return params


class StsExchanger:
    """Trades web identity tokens for credentials with one unsigned botocore STS client.

    Blocking botocore calls run on a dedicated bounded thread pool, each exchange has one
    overall deadline, and transient errors are retried with jittered backoff inside it.

    ``max_workers`` (64 by default) bounds the calls in flight: 50 identities at once against
    an STS 30 ms away go out together, not in waves of 8. The threads start at the pool's first
    use, not one by one from the event loop, and one of them at a time runs the Python-heavy
    part of a call (signing, botocore building the request, parsing the answer), so the pool
    competes with the event loop for the GIL like one thread, however many calls are waiting.
    """

    def __init__(
        self,
        *,
        region: str = "us-east-1",
        endpoint_url: str | None = None,
        connect_timeout: float = 2.0,
        read_timeout: float = 5.0,
        deadline: float = 10.0,
        max_attempts: int = 3,
        max_workers: int = 64,
        retry_base_delay: float = 0.2,
        sts_clock: StsClock | None = None,
        budget: StsBudget | None = None,
    ) -> None:
        if not isinstance(region, str) or not region:
            raise ValueError("region: must be a non-empty string")
        for name, value in (
            ("connect_timeout", connect_timeout),
            ("read_timeout", read_timeout),
            ("deadline", deadline),
        ):
            if not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"{name}: must be a positive number of seconds")
        if not isinstance(max_attempts, int) or max_attempts < 1:
            raise ValueError("max_attempts: must be an integer >= 1")
        if not isinstance(max_workers, int) or max_workers < 1:
            raise ValueError("max_workers: must be an integer >= 1")
        install_log_filter()
        from . import __version__

        self._session = botocore.session.get_session()
        # The regional endpoint keeps STS traffic (and its failures) in the app's region.
        self._session.set_config_variable("sts_regional_endpoints", "regional")
        # A session of our own: its parser reads STS's timestamps without dateutil.
        self._session.get_component("response_parser_factory").set_parser_defaults(
            timestamp_parser=parse_sts_timestamp
        )
        self._config = Config(
            signature_version=UNSIGNED,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            # stscreds retries itself, inside its own deadline; botocore must not add more.
            retries={"total_max_attempts": 1},
            max_pool_connections=max_workers,
            # A fixed User-Agent: botocore otherwise assembles its own twice per call (a third
            # of its work for an AssumeRoleWithWebIdentity call, on the GIL).
            user_agent=f"{self._session.user_agent()} stscreds/{__version__}",
        )
        self.region = region
        self._requested_endpoint = endpoint_url
        self._gate = _Gate()
        # None after a fork: the next call makes a new client (see reset_after_fork).
        self._client: BaseClient | None = self._new_client()
        self._client_lock = threading.Lock()
        # Clients dropped at fork: kept referenced, never closed or finalized in the child.
        self._stale_clients: list[BaseClient] = []
        self.endpoint_url: str = self._client.meta.endpoint_url
        #: The endpoint's host name (a span attribute).
        self.host: str = urlsplit(self.endpoint_url).hostname or ""
        if urlsplit(self.endpoint_url).scheme != "https" and not _is_loopback(self.host):
            # AssumeRoleWithWebIdentity is unsigned: the token is the authentication, and the
            # answer holds the credentials. Over http both cross the network in clear.
            logger.warning(
                "sts_endpoint_url %s is not https: tokens and credentials cross the network "
                "in clear; use https (http is for a local STS on loopback)",
                self.endpoint_url,
            )
        self.deadline = float(deadline)
        self.max_attempts = max_attempts
        self.retry_base_delay = retry_base_delay
        self._pool = StsPool(max_workers)
        #: STS's clock, learned from the Date header of every answer.
        self.sts_clock = sts_clock if sts_clock is not None else StsClock(SystemClock())
        #: The gate every call (first attempt or retry) passes; None: no gate.
        self.budget = budget
        #: True once close() has run: the pool takes no more work.
        self.closed = False
        #: HTTP requests sent to STS, by operation (counted on the pool's threads).
        self.calls: dict[str, int] = {"AssumeRoleWithWebIdentity": 0, "GetCallerIdentity": 0}
        self._calls_lock = threading.Lock()

    async def exchange(
        self,
        request: ExchangeRequest,
        mint: Callable[[], str],
        *,
        background: bool = False,
        outcome: ExchangeOutcome | None = None,
    ) -> Credentials:
        """Mint a token with ``mint`` and call AssumeRoleWithWebIdentity, both on the pool.

        Every attempt first takes a token from the STS budget (``background`` refreshes yield
        to requests). Raises CredentialsRejected or STSUnavailable; never blocks the loop.
        ``outcome`` (if given) counts the attempts that reached STS.
        """
        if outcome is None:
            outcome = ExchangeOutcome()
        loop = asyncio.get_running_loop()
        deadline_at = loop.time() + self.deadline
        # Signing (RSA: a quarter of a millisecond of CPU) runs on the pool, in the first
        # attempt's job and inside the deadline (behind hung STS calls the pool may be full);
        # retries send the same token. One job per attempt, not one to sign and one to call:
        # each hop to a pool thread and back costs the event loop a wake-up and a GIL
        # hand-over, which in a burst of many identities are the scarce thing.
        params: dict[str, Any] | None = None
        gate = self._gate
        sts_clock = self.sts_clock
        budget = self.budget
        # The same deadline for the pool's threads: a job that waited for a thread, or a
        # signature (KMS) that took the rest of it, never calls STS for a caller gone.
        deadline_mono = time.monotonic() + self.deadline
        # STS's clock offset the token was dated with; whether it was signed again.
        minted_offset = 0.0
        reminted = False
        # True while a token is being signed (a deadline hit then is the signer's).
        signing = False
        # Calls that reached STS (outcome.attempts): failed signatures send none.
        sent = 0

        def attempt_call() -> dict[str, Any]:
            nonlocal params, minted_offset, signing, sent
            if budget is not None and params is None:
                # A call the budget would hold back costs no signature (KMS: a request, and
                # money). Only a look: the token is taken as the call goes out, below.
                wait = budget.check(background=background)
                if wait > 0:
                    raise _Refused(wait)
            gate.enter()
            # A remote signer (KMS) steps off the gate while its request is signed and sent.
            _held.gate = gate
            signed = False
            try:
                if params is None:
                    minted_offset = sts_clock.offset
                    signing = True
                    try:
                        token = mint()
                    finally:
                        signing = False
                    params = request.params(token)
                    signed = True
                if self.closed or time.monotonic() >= deadline_mono:
                    raise _Abandoned(signed)
                if budget is not None:
                    # Taken here, on the thread, as the call goes out: a burst queued on the
                    # pool passes one by one, after the answers that closed it, and a budget
                    # that closed while this token was signed holds the call back.
                    wait = budget.acquire(background=background)
                    if wait > 0:
                        raise _Refused(wait)
                sent += 1
                return self._call(params)
            finally:
                _held.gate = None
                gate.leave()

        attempt = 0
        last: CredentialsUnavailable | None = None
        try:
            while True:
                attempt += 1
                if self.closed:
                    raise _Closed("credential broker is closed", role_arn=request.role_arn)
                remaining = deadline_at - loop.time()
                if remaining <= 0:
                    raise _Timeout(
                        f"STS did not answer within {self.deadline:g}s", role_arn=request.role_arn
                    )
                try:
                    response = await asyncio.wait_for(
                        loop.run_in_executor(self._pool, attempt_call), remaining
                    )
                except _Refused as refused:
                    if last is not None:
                        raise last._copy(retry_after=refused.wait) from None
                    raise BudgetRefused(
                        f"STS is throttling: holding calls back for {refused.wait:.1f}s",
                        code="Throttling",
                        role_arn=request.role_arn,
                        retry_after=refused.wait,
                    ) from None
                except (asyncio.TimeoutError, _Abandoned) as timed_out:
                    if self.closed:
                        raise _Closed(
                            "credential broker is closed", role_arn=request.role_arn
                        ) from None
                    if signing or (isinstance(timed_out, _Abandoned) and timed_out.signed):
                        raise _SigningUnavailable(
                            f"signing the token did not finish within {self.deadline:g}s",
                            role_arn=request.role_arn,
                        ) from None
                    raise _Timeout(
                        f"STS did not answer within {self.deadline:g}s", role_arn=request.role_arn
                    ) from None
                except Exception as exc:
                    if params is None:
                        if not isinstance(exc, CredentialsUnavailable):
                            raise  # minting failed (a bug, not STS): as it came, never retried
                        # A remote signer (KMS) failed: classified like STS's own errors, and
                        # retried the same way when transient; the next attempt signs again.
                        error = exc._copy(role_arn=request.role_arn)
                    else:
                        error = classify_error(exc, request.role_arn)
                        if (
                            not reminted
                            and error.code in _CLOCK_REFUSALS
                            and abs(sts_clock.offset - minted_offset) > _REMINT_SHIFT
                        ):
                            # The refusal's Date header moved what is known of STS's clock:
                            # the token was dated on a clock STS does not share (a cold
                            # process minutes off). Sign again on STS's time, once, inside the
                            # deadline; it is not one of the max_attempts.
                            reminted = True
                            params = None
                            attempt -= 1
                            continue
                    if isinstance(error, CredentialsRejected) or attempt >= self.max_attempts:
                        raise error from None
                    delay = random.uniform(0.5, 1.0) * self.retry_base_delay * 2 ** (attempt - 1)  # noqa: S311
                    if loop.time() + delay >= deadline_at:
                        raise error from None
                    logger.debug(
                        "transient STS error %s for %s, retry %d in %.2fs",
                        error.code or error.reason or type(error).__name__,
                        request.role_arn,
                        attempt,
                        delay,
                    )
                    last = error
                    if params is not None and abs(sts_clock.offset - minted_offset) > _REMINT_SHIFT:
                        # The failed answer taught STS's clock: the retry's token is dated on it.
                        params = None
                    await asyncio.sleep(delay)
                    continue
                return _credentials_from(response)
        finally:
            # However the exchange ends (cancellation included): the calls STS received.
            outcome.attempts = sent

    def _new_client(self) -> BaseClient:
        client = self._session.create_client(
            "sts",
            region_name=self.region,
            endpoint_url=self._requested_endpoint,
            config=self._config,
        )
        # The gate is left while the request is on the wire and taken again for the answer.
        events = client.meta.events
        events.register("before-send.sts.AssumeRoleWithWebIdentity", self._gate.leave)
        events.register("before-parse.sts.AssumeRoleWithWebIdentity", self._gate.enter)
        return client

    async def learn_clock(self) -> bool:
        """Learn STS's clock from one cheap unsigned call (``GetCallerIdentity``, which STS
        refuses without a signature, with its Date header); True if it is known now."""
        loop = asyncio.get_running_loop()
        with contextlib.suppress(Exception):  # no clock learned: the local clock stands in
            await asyncio.wait_for(loop.run_in_executor(self._pool, self._probe), self.deadline)
        return self.sts_clock.known

    def _probe(self) -> None:
        client = self._get_client()
        local = self.sts_clock.local
        self._count("GetCallerIdentity")
        sent_at = local.time()
        try:
            response: dict[str, Any] = client.get_caller_identity()
        except ClientError as error:
            self._observe(error.response, sent_at, local.time())
            return
        self._observe(response, sent_at, local.time())

    def _count(self, operation: str) -> None:
        # On the pool's threads: += alone could lose a count between two of them.
        with self._calls_lock:
            self.calls[operation] += 1

    def _get_client(self) -> BaseClient:
        client = self._client
        if client is None:
            with self._client_lock:
                client = self._client
                if client is None:
                    client = self._client = self._new_client()
        return client

    def _call(self, params: dict[str, Any]) -> dict[str, Any]:
        client = self._get_client()
        local = self.sts_clock.local
        self._count("AssumeRoleWithWebIdentity")
        gate = self._gate
        gate.enter()
        sent_at = local.time()
        try:
            response: dict[str, Any] = client.assume_role_with_web_identity(**params)
        except ClientError as error:
            gate.leave()
            # An error answer carries STS's clock too (and is when it matters most).
            self._observe(error.response, sent_at, local.time())
            if self.budget is not None and is_throttling(error):
                # Here on the thread, as the answer arrives: calls queued behind it on the
                # pool must meet a closed budget, not wait for the event loop to notice.
                self.budget.throttled()
            raise
        except BaseException:
            gate.leave()
            raise
        gate.leave()
        self._observe(response, sent_at, local.time())
        if self.budget is not None:
            self.budget.succeeded()
        return response

    def _observe(self, response: dict[str, Any], sent_at: float, received_at: float) -> None:
        date = sts_date(response)
        if date is not None:
            self.sts_clock.observe(date, sent_at, received_at)

    def reset_after_fork(self) -> None:
        """In a forked child: a new thread pool (the parent's threads do not exist here) and,
        on the next exchange, a new client (the parent's shares its HTTP connections).

        Nothing here touches the old client: closing it takes urllib3's locks, which a parent
        thread may have held at the moment of the fork (held forever in the child).
        """
        self._pool = StsPool(self._pool.max_workers)
        self._client_lock = threading.Lock()
        self._calls_lock = threading.Lock()
        # A parent's thread may have held the gate; the new client registers the new one.
        self._gate = _Gate()
        if self._client is not None:
            self._stale_clients.append(self._client)
        self._client = None

    def close(self) -> None:
        """Release the thread pool and the HTTP connections."""
        self.closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._client is not None:
            self._client.close()


class StsPool(Executor):
    """The threads STS calls run on: up to ``max_workers``, all started at the first job, by
    the pool's own first thread.

    ThreadPoolExecutor starts a thread per submit while none is idle, and the submitter waits
    in ``Thread.start`` until the new thread runs. Here the submitter is the event loop: in a
    burst of many identities that wait is for the GIL, behind every busy STS thread (64 such
    starts held the loop 80-300 ms in all, 1,000 identities at once), and starting all of them
    from the loop at the first job held it 7 ms, at an app's start-up (its warm-up). This
    pool's first job starts one thread, which starts the others and then works like them: the
    loop waits for that one start only. Jobs wait in ``_work_queue`` meanwhile.

    Threads are daemons (an STS call still waiting at exit does not hold the process up) and
    end after ``shutdown``, or once the pool is garbage.
    """

    def __init__(self, max_workers: int, name: str = "stscreds-sts") -> None:
        self.max_workers = max_workers
        self._name = name
        self._work_queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        #: The threads started so far.
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._shutdown = False
        # Garbage (no shutdown): a sentinel ends the threads, which hold the queue, not the pool.
        weakref.finalize(self, self._work_queue.put, None)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._work_queue.put((future, fn, args, kwargs))
            first = None if self._threads else self._thread(0)
        if first is not None:
            first.start()
        return future

    def _thread(self, index: int) -> threading.Thread:
        thread = threading.Thread(
            target=_start_and_work if index == 0 else _work,
            args=(weakref.ref(self), self._work_queue) if index == 0 else (self._work_queue,),
            name=f"{self._name}_{index}",
            daemon=True,
        )
        self._threads.append(thread)
        return thread

    def _start_next(self) -> bool:
        """Start one more thread (in the pool's first thread); False when there are enough."""
        with self._lock:
            if self._shutdown or len(self._threads) >= self.max_workers:
                return False
            thread = self._thread(len(self._threads))
        thread.start()
        return True

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                while True:
                    try:
                        job = self._work_queue.get_nowait()
                    except queue.Empty:
                        break
                    if job is not None:
                        job[0].cancel()
            self._work_queue.put(None)  # passed on from thread to thread: each one ends
            threads = list(self._threads)
        if wait:
            for thread in threads:
                if thread is not threading.current_thread():
                    thread.join()


_Job = tuple["Future[Any]", Callable[..., Any], tuple[Any, ...], dict[str, Any]]


def _start_and_work(pool: weakref.ref[StsPool], work_queue: queue.SimpleQueue[_Job | None]) -> None:
    """The pool's first thread: starts the others (each start waits for that thread to run,
    here rather than on the event loop), then works like them."""
    while True:
        owner = pool()
        started = owner is not None and owner._start_next()
        owner = None  # the pool stays collectable while this thread works
        if not started:
            break
    _work(work_queue)


def _work(work_queue: queue.SimpleQueue[_Job | None]) -> None:
    while True:
        job = work_queue.get()
        if job is None:
            work_queue.put(None)  # for the next thread
            return
        future, fn, args, kwargs = job
        del job
        if future.set_running_or_notify_cancel():  # False: cancelled while it waited
            try:
                result = fn(*args, **kwargs)
            except BaseException as error:
                future.set_exception(error)
            else:
                future.set_result(result)
                del result
        del future, fn, args, kwargs


class _Gate:
    """Lets one STS thread at a time run the Python-heavy parts of an exchange.

    Up to ``max_workers`` calls may wait on STS at once, but signing, botocore building the
    request and parsing the answer need the GIL, and CPython hands the GIL over unfairly: with
    dozens of threads wanting it, the event loop waited hundreds of milliseconds for its turn
    (1,000 identities at once, 64 threads). Behind this gate the pool as a whole asks for the
    GIL like one thread, so the loop gets its share. A thread leaves the gate while its request
    is on the wire (botocore's ``before-send``) and takes it again for the answer
    (``before-parse``); the per-thread flag makes enter and leave idempotent.
    """

    __slots__ = ("_held", "_lock")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held = threading.local()

    def enter(self, **kwargs: Any) -> None:
        if not getattr(self._held, "value", False):
            self._lock.acquire()
            self._held.value = True

    def leave(self, **kwargs: Any) -> None:
        if getattr(self._held, "value", False):
            self._held.value = False
            self._lock.release()


# The gate the current pool thread holds for an exchange, for remote signers to step off.
_held = threading.local()


def _step_off_gate(**kwargs: Any) -> None:
    gate: _Gate | None = getattr(_held, "gate", None)
    if gate is not None:
        gate.leave()


def _step_on_gate(**kwargs: Any) -> None:
    gate: _Gate | None = getattr(_held, "gate", None)
    if gate is not None:
        gate.enter()


#: The botocore events between which a remote signer's call is off the gate.
OFF_GATE_AT, ON_GATE_AT = "before-sign", "before-parse"


def off_gate_on_the_wire(client: BaseClient, event: str) -> None:
    """Make ``client`` (a botocore client called while a token is minted, e.g. KMS ``Sign``)
    leave the exchange's gate while its request ``event`` (``"kms.Sign"``) is signed and on
    the wire, and take it again for the answer.

    Without it, one remote signature at a time would go out across every identity. Signing
    is off the gate too: that is when botocore fetches or refreshes the client's own AWS
    credentials (IMDS, the container endpoint: a network call of its own).
    """
    client.meta.events.register(f"{OFF_GATE_AT}.{event}", _step_off_gate)
    client.meta.events.register(f"{ON_GATE_AT}.{event}", _step_on_gate)


def step_off_gate() -> None:
    """Leave the exchange's gate, if this thread holds one (for blocking work in a signer)."""
    _step_off_gate()


class BudgetRefused(STSUnavailable):
    """The STS budget held the call back (STS throttled lately); it never reached STS."""

    reason = "BudgetRefused"


class _Abandoned(Exception):
    """An attempt found its exchange past the deadline (or the exchanger closed) once its
    token was signed: STS is not called for a caller that is gone. ``signed``: this attempt
    signed the token (so the signature is what took the time)."""

    def __init__(self, signed: bool) -> None:
        super().__init__(signed)
        self.signed = signed


class _Refused(Exception):
    """The STS budget held a call back; ``wait``: seconds until it may go."""

    def __init__(self, wait: float) -> None:
        super().__init__(wait)
        self.wait = wait


def _credentials_from(response: dict[str, Any]) -> Credentials:
    try:
        raw = response["Credentials"]
        return Credentials(
            access_key_id=raw["AccessKeyId"],
            secret_access_key=raw["SecretAccessKey"],
            session_token=raw["SessionToken"],
            expiration=raw["Expiration"],
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        raise _BadResponse("STS answered without usable credentials") from None
