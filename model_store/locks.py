"""The store's writer lock: exactly one writer (publish, activate, gc) at a time.

One interface, two implementations:
- `FileWriterLock(path)`: an OS file lock (filelock); embedded mode and several processes on one host.
  The kernel drops it when its holder dies, so a SIGKILLed writer never leaves the store locked.
- `RedisWriterLock(url_or_client, name)`: `SET name token NX PX ttl` to take it, a token-checked Lua
  delete to release it (a holder whose lease expired can never release someone else's lock); for
  workers on several machines writing one shared store. redis is imported lazily.

Both are re-entrant within one thread (nested `with lock:` blocks are fine).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from .errors import LockTimeout

log = logging.getLogger("memfit.store.lock")


class WriterLock:
    """Context manager interface: `with lock: ...` or acquire(timeout) / release()."""

    def acquire(self, timeout: float | None = None) -> None:
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> WriterLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


class FileWriterLock(WriterLock):
    def __init__(self, path: str | Path, timeout: float = 600.0) -> None:
        from filelock import FileLock

        self.path = Path(path)
        self.timeout = timeout
        self._lock = FileLock(str(self.path), thread_local=True)

    def acquire(self, timeout: float | None = None) -> None:
        from filelock import Timeout

        t = self.timeout if timeout is None else timeout
        try:
            self._lock.acquire(timeout=t)
        except Timeout as e:
            raise LockTimeout(f"store writer lock {self.path} not acquired within {t} s") from e

    def release(self) -> None:
        self._lock.release()


_RELEASE_LUA = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""
_EXTEND_LUA = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""


def redis_lock_name(base_id: str) -> str:
    """The Redis writer lock of the stores with this base: one name for every process (API replicas,
    workers, the CLI) that writes to them."""
    return f"memfit:store:{base_id[:16]}:writer"


class RedisWriterLock(WriterLock):
    """Distributed writer lock on Redis (`SET NX PX` + token-checked release).

    `ttl_s` bounds how long a dead holder blocks others; a holder doing long work calls `extend()`.
    A client built from a URL has connect and reply timeouts (`socket_connect_timeout`,
    `socket_timeout`): a Redis that does not answer raises redis' TimeoutError instead of hanging.
    `retry_unavailable_s`: how long `acquire` and `release` keep retrying while Redis is unreachable
    (a worker about to publish rides out a blip; 0, the API's choice, fails at once so the route
    answers 503). A release that still cannot reach Redis is logged, not raised: the work under the
    lock is done, and the lease lapses by itself after `ttl_s`.
    """

    def __init__(
        self,
        url_or_client: Any,
        name: str = "memfit:store:writer",
        ttl_s: float = 120.0,
        timeout: float = 600.0,
        poll_s: float = 0.05,
        socket_timeout: float = 5.0,
        socket_connect_timeout: float = 3.0,
        retry_unavailable_s: float = 0.0,
    ) -> None:
        if isinstance(url_or_client, str):
            import redis  # lazy: the store never needs redis otherwise

            self.client = redis.Redis.from_url(
                url_or_client, socket_timeout=socket_timeout, socket_connect_timeout=socket_connect_timeout
            )
        else:
            self.client = url_or_client
        self.name = name
        self.ttl_ms = int(ttl_s * 1000)
        self.timeout = timeout
        self.poll_s = poll_s
        self.retry_unavailable_s = float(retry_unavailable_s)
        self._local = threading.local()

    def _retrying(self, fn: Any, what: str) -> Any:
        """fn(), retried with backoff while Redis is unreachable, for up to retry_unavailable_s."""
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        deadline = time.monotonic() + self.retry_unavailable_s
        delay = 0.2
        while True:
            try:
                return fn()
            except (RedisConnectionError, RedisTimeoutError) as e:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning(
                    "redis writer lock %r: %s unreachable (%s); retrying in %.1f s", self.name, what, e, delay
                )
                time.sleep(delay)
                delay = min(2.0, delay * 2)

    def _state(self) -> tuple[str | None, int]:
        return getattr(self._local, "token", None), getattr(self._local, "depth", 0)

    def acquire(self, timeout: float | None = None) -> None:
        token, depth = self._state()
        if token is not None:
            self._local.depth = depth + 1
            return
        t = self.timeout if timeout is None else timeout
        token = uuid.uuid4().hex
        deadline = time.monotonic() + t
        while True:
            if self._retrying(lambda: self.client.set(self.name, token, nx=True, px=self.ttl_ms), "acquire"):
                self._local.token = token
                self._local.depth = 1
                return
            if time.monotonic() >= deadline:
                raise LockTimeout(f"redis writer lock {self.name!r} not acquired within {t} s")
            time.sleep(self.poll_s)

    def release(self) -> None:
        token, depth = self._state()
        if token is None:
            raise RuntimeError(f"redis writer lock {self.name!r} released but not held")
        if depth > 1:
            self._local.depth = depth - 1
            return
        self._local.token = None
        self._local.depth = 0
        try:
            self._retrying(lambda: self.client.eval(_RELEASE_LUA, 1, self.name, token), "release")
        except Exception as e:  # the work under the lock is done; the lease lapses after ttl_s
            log.warning(
                "redis writer lock %r not released (%s); it lapses in %d ms", self.name, e, self.ttl_ms
            )

    def extend(self) -> bool:
        token, _ = self._state()
        if token is None:
            return False
        return bool(self.client.eval(_EXTEND_LUA, 1, self.name, token, self.ttl_ms))

    def held(self) -> bool:
        token, _ = self._state()
        if token is None:
            return False
        cur = self.client.get(self.name)
        return cur is not None and (cur.decode() if isinstance(cur, bytes) else cur) == token
