"""SQLiteStore: the CredentialStore protocol in one SQLite file, for the workers of one host.

Design, in short:

- One WAL-mode database file, created 0600. SQLite gives the ``-wal`` and ``-shm`` files it
  creates the mode of the database file (and fchmods them, so the umask does not matter); the
  store also strips "other" bits from them after connecting, in case a build does not.
- Each store owns one thread (``ThreadPoolExecutor(max_workers=1)``) and one connection that
  only that thread opens, uses and closes. Every blocking SQLite call runs there, so the event
  loop never waits on disk or on another process's write lock, and the connection never
  crosses threads. Calls queue in order; each is a single short statement.
- Expiry is wall-clock time (``clock``, default ``time.time``): every worker on the host
  shares that clock, unlike ``time.monotonic``, which need not agree across processes.
- A lease is taken by one upsert whose update only applies to an expired lease or the same
  owner; SQLite serialises writers, so exactly one process sees its row change.
- SQLite cannot notify another process, so ``wait`` polls, every ``poll_interval``, one row
  per key in two primary-key lookups: a random token that ``notify`` rewrites, and the
  lease's current owner. It returns when either changed (a notify, or the lease was released,
  expired or taken over), when a ``notify`` in this store wakes it, or at the timeout.
"""

from __future__ import annotations

import asyncio
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar
from urllib.parse import quote

from ._cipher import StoreCipher
from ._waiters import consume, registered, wake

__all__ = ["SQLiteStore"]

_T = TypeVar("_T")
_Watch = tuple[int | None, str | None]  # (notify token, lease owner) of one key

_SCHEMA_VERSION = 1
_SCHEMA = (
    # WITHOUT ROWID: every lookup is by key, so the primary key is the only b-tree.
    "CREATE TABLE IF NOT EXISTS stscreds_values"
    " (key TEXT PRIMARY KEY, value BLOB NOT NULL, expires_at REAL NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS stscreds_leases"
    " (key TEXT PRIMARY KEY, owner TEXT NOT NULL, expires_at REAL NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS stscreds_notices"
    " (key TEXT PRIMARY KEY, token INTEGER NOT NULL, updated_at REAL NOT NULL) WITHOUT ROWID",
)
_GET = (
    "SELECT (SELECT value FROM stscreds_values WHERE key = :key AND expires_at > :now),"
    " (SELECT token FROM stscreds_notices WHERE key = :key)"
)
_PUT = (
    "INSERT INTO stscreds_values (key, value, expires_at) VALUES (:key, :value, :expires_at)"
    " ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at"
)
# The update applies only when the lease expired or is already ours, so of racing
# processes exactly one changes the row (rowcount 1); the others see rowcount 0.
_ACQUIRE = (
    "INSERT INTO stscreds_leases (key, owner, expires_at) VALUES (:key, :owner, :expires_at)"
    " ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at"
    " WHERE stscreds_leases.expires_at <= :now OR stscreds_leases.owner = excluded.owner"
)
_RELEASE = "DELETE FROM stscreds_leases WHERE key = :key AND owner = :owner"
_EXTEND = (
    "UPDATE stscreds_leases SET expires_at = :expires_at"
    " WHERE key = :key AND owner = :owner AND expires_at > :now"
)
_NOTIFY = (
    "INSERT INTO stscreds_notices (key, token, updated_at) VALUES (:key, random(), :now)"
    " ON CONFLICT (key) DO UPDATE SET token = excluded.token, updated_at = excluded.updated_at"
)
_WATCH = (
    "SELECT (SELECT token FROM stscreds_notices WHERE key = :key),"
    " (SELECT owner FROM stscreds_leases WHERE key = :key AND expires_at > :now)"
)
_CLEANUP = (
    "DELETE FROM stscreds_values WHERE expires_at <= :now",
    "DELETE FROM stscreds_leases WHERE expires_at <= :now",
    # A waiter compares tokens only while it waits (seconds): a minute-old one is dead.
    "DELETE FROM stscreds_notices WHERE updated_at <= :now - 60",
)
_CLEANUP_INTERVAL = 60.0
# Tokens that get() saw and wait() has not used yet; a bound so unused keys cannot pile up.
_SEEN_LIMIT = 4096


class SQLiteStore:
    """A CredentialStore in one SQLite file, shared by every process on the host that opens it.

    For ``uvicorn --workers N`` or gunicorn: stdlib ``sqlite3`` only, nothing to run. Values
    and leases expire by wall-clock time; waiters in other processes see a ``notify`` within
    about ``poll_interval`` seconds. Not for network file systems (SQLite's locks need one host).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        encryption_keys: Sequence[bytes | str] | None = None,
        allow_plaintext: bool = False,
        poll_interval: float = 0.05,
        busy_timeout: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cipher = StoreCipher(encryption_keys, allow_plaintext=allow_plaintext)
        if not _positive(poll_interval):
            raise ValueError("poll_interval: must be a positive number of seconds")
        if not (_positive(busy_timeout) or busy_timeout == 0):
            raise ValueError("busy_timeout: must be a number of seconds, 0 or more")
        #: The database file's absolute path (created 0600 if it did not exist).
        self.path = _create_file(path)
        self._poll_interval = float(poll_interval)
        # Writes hold SQLite's lock for microseconds; a lock held for longer means trouble,
        # and the broker would rather fail open than queue every request behind it.
        self._busy_timeout = float(busy_timeout)
        self._clock = clock
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._executor = _new_executor()
        # Opened, used and closed only on the executor's thread (check_same_thread holds).
        self._conn: sqlite3.Connection | None = None
        self._next_cleanup = -math.inf  # executor thread only
        self._inherited: list[sqlite3.Connection] = []
        self._closed = False
        self._seen: dict[str, int | None] = {}
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}

    async def get(self, key: str) -> bytes | None:
        """The value stored under ``key``, or None if there is none or it expired."""
        value, token = await self._run(lambda conn: self._get(conn, key))
        # wait() compares against this token, so a notify that lands between this read and
        # the wait is not missed.
        if len(self._seen) >= _SEEN_LIMIT:
            self._seen.pop(next(iter(self._seen)), None)
        self._seen[key] = token
        return value

    async def put(self, key: str, value: bytes, ttl: float) -> None:
        """Store exactly the bytes ``value`` under ``key`` for ``ttl`` seconds."""
        value = bytes(value)
        await self._run(lambda conn: self._put(conn, key, value, ttl))

    async def acquire(self, key: str, owner: str, ttl: float) -> bool:
        """Take the lease on ``key`` for ``ttl`` seconds if it is free, expired or ours."""
        return await self._run(lambda conn: self._acquire(conn, key, owner, ttl))

    async def release(self, key: str, owner: str) -> bool:
        """Give up the lease if ``owner`` holds it; True if it did."""
        return await self._run(lambda conn: self._release(conn, key, owner))

    async def extend(self, key: str, owner: str, ttl: float) -> bool:
        """Push the lease to ``ttl`` seconds from now if ``owner`` holds it and it is live."""
        return await self._run(lambda conn: self._extend(conn, key, owner, ttl))

    async def holder(self, key: str) -> str | None:
        """The owner of the live lease on ``key``, or None."""
        _token, owner = await self._run(lambda conn: self._read_watch(conn, key))
        return owner

    async def notify(self, key: str) -> None:
        """Wake this store's waiters on ``key`` now, other processes' at their next poll."""
        self._wake(key)
        await self._run(lambda conn: self._notify(conn, key))

    async def wait(self, key: str, timeout: float) -> None:
        """Return on a notify of ``key`` or a change of its lease, or after ``timeout`` seconds.

        Never returns later than ``timeout``, even when the database is slow or locked.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        with registered(self._waiters, key) as woken:
            seen = self._seen.pop(key, _UNSEEN)
            baseline = await self._watch(key, woken, deadline)
            if baseline is None or (seen is not _UNSEEN and seen != baseline[0]):
                return
            while not woken.done():
                pause = min(self._poll_interval, deadline - loop.time())
                if pause <= 0:
                    return
                await asyncio.wait((woken,), timeout=pause)
                if woken.done():
                    return
                if await self._watch(key, woken, deadline) != baseline:
                    return

    async def aclose(self) -> None:
        """Wake waiters, close the connection and stop the thread; later calls raise."""
        if self._closed:
            return
        self._closed = True
        for key in list(self._waiters):
            self._wake(key)
        if os.getpid() != self._pid:
            self._after_fork()
        executor = self._executor
        await asyncio.wrap_future(executor.submit(self._close))
        # Returns at once: the thread is idle now that the close ran last in its queue.
        executor.shutdown(wait=True)

    def __repr__(self) -> str:
        return f"SQLiteStore(path={self.path!r}, {self.cipher!r})"

    # --- on the event loop ------------------------------------------------------------------

    def _submit(self, job: Callable[[sqlite3.Connection], _T]) -> asyncio.Future[_T]:
        if self._closed:
            raise RuntimeError("SQLiteStore is closed")
        if os.getpid() != self._pid:
            self._after_fork()
        return asyncio.wrap_future(self._executor.submit(lambda: job(self._connection())))

    async def _run(self, job: Callable[[sqlite3.Connection], _T]) -> _T:
        # A cancelled caller does not stop the statement: it finishes on the thread, and its
        # result is dropped. Each statement is atomic, so nothing is left half done.
        return await self._submit(job)

    async def _watch(self, key: str, woken: asyncio.Future[None], deadline: float) -> _Watch | None:
        """The key's (token, owner), or None if woken or out of time before the answer."""
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            return None
        answer = self._submit(lambda conn: self._read_watch(conn, key))
        # Mark an abandoned answer's error as seen, so asyncio does not log it.
        answer.add_done_callback(consume)
        await asyncio.wait((answer, woken), timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        if woken.done() or not answer.done():
            return None
        return answer.result()

    def _wake(self, key: str) -> None:
        wake(self._waiters, key)

    def _after_fork(self) -> None:
        # A forked worker (gunicorn --preload) inherits this object, but not its thread, and
        # SQLite forbids using (or closing) a connection opened before fork: start afresh.
        with self._lock:
            if os.getpid() == self._pid:
                return
            if self._conn is not None:
                self._inherited.append(self._conn)  # kept referenced: never closed here
            self._conn = None
            self._next_cleanup = -math.inf
            self._waiters.clear()
            self._executor = _new_executor()
            self._pid = os.getpid()

    # --- on the store's thread --------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = self._open()
        return self._conn

    def _open(self) -> sqlite3.Connection:
        # Recreate the file 0600 if it vanished, and open with mode=rw so that SQLite itself
        # never creates it with the umask's permissions.
        _create_file(self.path)
        uri = "file:" + quote(self.path) + "?mode=rw"
        conn = sqlite3.connect(uri, uri=True, timeout=self._busy_timeout, isolation_level=None)
        try:
            self._use_wal(conn)
            # In WAL mode NORMAL never corrupts; a power cut may lose the last puts: a cache.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                (version,) = conn.execute("PRAGMA user_version").fetchone()
                if version > _SCHEMA_VERSION:
                    raise sqlite3.DatabaseError(
                        f"{self.path}: schema version {version} is newer than this stscreds"
                    )
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            _restrict_sidecars(self.path)
        except BaseException:
            conn.close()
            raise
        return conn

    def _use_wal(self, conn: sqlite3.Connection) -> None:
        # Switching a new file to WAL fails at once with "locked", without the busy handler,
        # while another process is opening it too: retry for the busy timeout ourselves.
        give_up_at = time.monotonic() + self._busy_timeout
        while True:
            try:
                (mode,) = conn.execute("PRAGMA journal_mode=WAL").fetchone()
                break
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() >= give_up_at:
                    raise
            time.sleep(0.005)  # on the store's thread, never the event loop
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"{self.path}: cannot use WAL (journal_mode={mode})")

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _get(self, conn: sqlite3.Connection, key: str) -> tuple[bytes | None, int | None]:
        value, token = conn.execute(_GET, {"key": key, "now": self._clock()}).fetchone()
        return (None if value is None else bytes(value)), token

    def _put(self, conn: sqlite3.Connection, key: str, value: bytes, ttl: float) -> None:
        now = self._clock()
        conn.execute(_PUT, {"key": key, "value": value, "expires_at": now + ttl})
        if now >= self._next_cleanup:
            self._next_cleanup = now + _CLEANUP_INTERVAL
            try:
                conn.execute("BEGIN IMMEDIATE")
                for statement in _CLEANUP:
                    conn.execute(statement, {"now": now})
                conn.execute("COMMIT")
            except sqlite3.OperationalError:
                # Best effort: the put succeeded; a busy database is cleaned next time.
                if conn.in_transaction:
                    conn.execute("ROLLBACK")

    def _acquire(self, conn: sqlite3.Connection, key: str, owner: str, ttl: float) -> bool:
        now = self._clock()
        params = {"key": key, "owner": owner, "expires_at": now + ttl, "now": now}
        return conn.execute(_ACQUIRE, params).rowcount == 1

    def _release(self, conn: sqlite3.Connection, key: str, owner: str) -> bool:
        return conn.execute(_RELEASE, {"key": key, "owner": owner}).rowcount == 1

    def _extend(self, conn: sqlite3.Connection, key: str, owner: str, ttl: float) -> bool:
        now = self._clock()
        params = {"key": key, "owner": owner, "expires_at": now + ttl, "now": now}
        return conn.execute(_EXTEND, params).rowcount == 1

    def _notify(self, conn: sqlite3.Connection, key: str) -> None:
        conn.execute(_NOTIFY, {"key": key, "now": self._clock()})

    def _read_watch(self, conn: sqlite3.Connection, key: str) -> _Watch:
        token, owner = conn.execute(_WATCH, {"key": key, "now": self._clock()}).fetchone()
        return token, owner


class _Unseen:
    """Marks a key whose token get() has not recorded."""


_UNSEEN = _Unseen()


def _positive(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def _new_executor() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="stscreds-sqlite")


def _create_file(path: str | os.PathLike[str]) -> str:
    """Create the database file with mode 0600 unless it exists; a clear error if it cannot."""
    name = os.fspath(path)
    if not isinstance(name, str) or not name or name == ":memory:" or name.startswith("file:"):
        raise ValueError(
            "path: must be a file path the workers share (use MemoryStore within one process)"
        )
    try:
        # O_CREAT with 0600: the umask can only remove bits, so the file is never readable
        # by others, even for the moment before SQLite first opens it.
        fd = os.open(name, os.O_RDWR | os.O_CREAT, 0o600)
    except FileNotFoundError:
        directory = os.path.dirname(os.path.abspath(name))
        raise ValueError(f"path: directory {directory!r} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"path: {name!r} is a directory") from None
    os.close(fd)
    # Absolute, so a later chdir cannot make the connection (opened lazily) a different file.
    return os.path.abspath(name)


def _restrict_sidecars(path: str) -> None:
    """Take the "other" permission bits off the -wal and -shm files, if SQLite left any."""
    for suffix in ("-wal", "-shm"):
        try:
            mode = os.stat(path + suffix).st_mode & 0o777
            if mode & 0o007:
                os.chmod(path + suffix, mode & 0o770)
        except OSError:
            # Absent (nothing to protect) or another user's file (theirs to set).
            pass
