"""The clients a triggerer's batches share: one MongoDB client, one HTTP session, connections read
at most every `CONNECTION_TTL_S`.

A worker runs one batch per process and opens its clients per task (`task_bodies.TaskClients`).
The triggerer runs every deferred batch in one process, on a pool of threads: opening per batch
there cost two connection look-ups (each a round trip through the triggerer's supervisor to the
api-server), a MongoDB handshake with its monitor threads and pool, and an HTTP session with its
connections, for every batch. `SharedClients` gives each batch the same store and the same
session instead; the batch logic is the same code either way (`task_bodies.process_batch`).

Why sharing is safe:

- `pymongo.MongoClient` is thread-safe and pools its connections; every write of a batch is an
  idempotent upsert whatever client sends it.
- A `requests.Session` is shared, never an `LLMClient`: each batch builds its own client (its
  rounds, its view of endpoint health, its idempotency keys) around the session. The session
  only pools connections: the API key travels per request (`auth=`), pacing and endpoint
  health are shared through MongoDB as between workers.
- What the connections say is read again once it is `CONNECTION_TTL_S` old, and at once after a
  batch that failed (the failure may have been the settings: a revoked key, a moved server).
  A client whose connection changed is replaced for the batches that start next, and closed
  when the last batch using it has finished with it: nothing is closed under a batch.
- Nothing of a job passes through them (job state stays in MongoDB): each triggerer, and a
  triggerer started again, builds its own on first use, so nothing assumes one machine.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from llm_batch import config
from llm_batch.store import JobStore

if TYPE_CHECKING:
    import requests
    from airflow.providers.mongo.hooks.mongo import MongoHook
    from pymongo import MongoClient

    from llm_hook.client import LLMClient
    from llm_hook.pacing import RateLimiter
    from llm_hook.settings import ClientSettings

T = TypeVar("T")


class Fresh(Generic[T]):
    """A value read at most every `ttl_s` seconds, and again after `expire`; thread-safe."""

    def __init__(
        self,
        read: Callable[[], T],
        ttl_s: float = config.CONNECTION_TTL_S,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read = read
        self._ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._value: T | None = None
        self._read_at = 0.0

    def get(self) -> T:
        """Return the value, reading it first if it is missing or `ttl_s` old."""
        with self._lock:
            # Under the lock: when it expires, one thread reads while the others wait for it.
            if self._value is None or self._clock() - self._read_at >= self._ttl_s:
                self._value = self._read()
                self._read_at = self._clock()
            return self._value

    def expire(self) -> None:
        """Make the next `get` read the value again."""
        with self._lock:
            self._value = None


@dataclass
class _Lent(Generic[T]):
    key: Hashable
    value: T
    users: int = 0
    retired: bool = False


class Shared(Generic[T]):
    """One value per key at a time, lent to many threads; a replaced one is closed when returned.

    `lease(key, build)` lends the current value if it was built for `key`, else builds a new one
    for this and later leases. The value it replaced is closed once its last lease ends.
    """

    def __init__(self, close: Callable[[T], None]) -> None:
        self._close = close
        self._lock = threading.Lock()
        self._current: _Lent[T] | None = None

    @contextmanager
    def lease(self, key: Hashable, build: Callable[[], T]) -> Iterator[T]:
        """Lend the value for `key` for the duration of the block."""
        with self._lock:
            lent = self._current
            if lent is None or lent.key != key:
                # Building a client opens no connection (pymongo connects in the background,
                # requests on first use): cheap enough to do under the lock.
                lent = _Lent(key, build())
                replaced, self._current = self._current, lent
                if replaced is not None:
                    replaced.retired = True
                    if replaced.users == 0:
                        self._close(replaced.value)
            lent.users += 1
        try:
            yield lent.value
        finally:
            with self._lock:
                lent.users -= 1
                last = lent.retired and lent.users == 0
            if last:
                self._close(lent.value)

    def close(self) -> None:
        """Close the current value once its leases end; the next lease builds a new one."""
        with self._lock:
            lent, self._current = self._current, None
            if lent is None:
                return
            lent.retired = True
            if lent.users:
                return
        self._close(lent.value)


@dataclass(frozen=True)
class MongoTarget:
    """What `mongo_default` says: the client's URI and options, and the database to use."""

    hook: MongoHook
    database: str
    key: str
    """What decides the client (URI and options): targets with equal keys share one."""

    @classmethod
    def read(cls, conn_id: str = config.MONGO_CONN_ID) -> MongoTarget:
        """Read the connection (MongoHook does in its constructor)."""
        from airflow.providers.mongo.hooks.mongo import MongoHook

        hook = MongoHook(mongo_conn_id=conn_id)
        key = json.dumps([hook.uri, hook.extras, hook.allow_insecure], sort_keys=True, default=str)
        return cls(hook, hook.connection.schema or config.DEFAULT_DATABASE, key)

    def connect(self) -> MongoClient[dict[str, Any]]:
        """Build a new client as the hook does (`get_conn` alone returns the one it built last)."""
        self.hook.client = None
        client: MongoClient[dict[str, Any]] = self.hook.get_conn()
        return client


def read_llm_settings(conn_id: str = config.LLM_CONN_ID) -> ClientSettings:
    """Read the LLM connection's settings."""
    from llm_hook import LLMHook
    from llm_hook.settings import ClientSettings

    return ClientSettings.from_connection(LLMHook.get_connection(conn_id))


def _close_mongo(client: MongoClient[dict[str, Any]]) -> None:
    client.close()


def _close_session(session: requests.Session) -> None:
    session.close()


class SharedClients:
    """Stores and LLM clients for batches run on many threads of one process (the triggerer).

    :param pool_maxsize: HTTP connections kept alive per LLM host: the batches in flight at
        once (the triggerer's batch threads).
    :param ttl_s: how long what the connections say is reused before they are read again.
    :param clock: monotonic seconds, for the `ttl_s`.
    """

    def __init__(
        self,
        *,
        pool_maxsize: int,
        ttl_s: float = config.CONNECTION_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool_maxsize = pool_maxsize
        self._mongo_target = Fresh(MongoTarget.read, ttl_s, clock=clock)
        self._llm_settings = Fresh(read_llm_settings, ttl_s, clock=clock)
        self._mongo_clients: Shared[MongoClient[dict[str, Any]]] = Shared(_close_mongo)
        self._sessions: Shared[requests.Session] = Shared(_close_session)

    @contextmanager
    def store(self) -> Iterator[JobStore]:
        """Lend a store on the shared MongoDB client of the connection as last read."""
        target = self._mongo_target.get()
        try:
            with self._mongo_clients.lease(target.key, target.connect) as client:
                yield JobStore(client[target.database])
        except Exception:
            self.expire()
            raise

    @contextmanager
    def llm_client(self, rate_limiter: RateLimiter) -> Iterator[LLMClient]:
        """Lend a client of its own around the shared HTTP session of the connection's endpoints."""
        from llm_hook.client import POOL_HOSTS, LLMClient, new_session

        settings = self._llm_settings.get()
        endpoints = tuple(endpoint.url for endpoint in settings.endpoint_list())
        hosts = max(len(endpoints), POOL_HOSTS)
        try:
            with self._sessions.lease(
                endpoints, lambda: new_session(self._pool_maxsize, hosts)
            ) as session:
                # Nothing to close after: the client holds no resource but the session.
                yield LLMClient(settings, session=session, rate_limiter=rate_limiter)
        except Exception:
            self.expire()
            raise

    def expire(self) -> None:
        """Make the next batch read both connections again."""
        self._mongo_target.expire()
        self._llm_settings.expire()

    def close(self) -> None:
        """Close the shared clients once the batches using them have finished."""
        self._mongo_clients.close()
        self._sessions.close()
