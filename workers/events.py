"""Version events on Redis pub/sub: "version v is active now" to every API replica.

Integration points:
- `publish_active(url_or_client, active, **info) -> int`: send {"active": v, "time": ..., **info} on
  CHANNEL; returns the number of subscribers that got it. Called by a worker after each publish and by
  the API after an activation (rollback); a failed send is logged, never fatal: the store's ACTIVE
  pointer is the truth and every replica also polls it (service.engine's follow loop).
- `VersionSubscriber(url, on_active, current_active=None)`: a daemon thread for an API replica that
  calls `on_active(v)` for each message, and `on_active(current_active())` right after every
  (re)connect, so a replica that missed messages while Redis was away catches up from the store's
  ACTIVE pointer. `start()`, `stop()`, `connected`, `messages`, `last_error`.

Messages are hints: `on_active` should move to the store's ACTIVE (not blindly to `v`), which is what
the engine's switch-to-active does; an old or duplicated message is therefore harmless.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("memfit.workers.events")

CHANNEL = "memfit:versions"


def _client(url_or_client: Any):
    if isinstance(url_or_client, str):
        import redis

        return redis.Redis.from_url(url_or_client, socket_connect_timeout=3, socket_timeout=5)
    return url_or_client


def publish_active(url_or_client: Any, active: int, channel: str = CHANNEL, **info: Any) -> int:
    """Announce that `active` is the store's active version. Returns the receiver count (0 on error)."""
    msg = {
        "active": int(active),
        "time": time.time(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        **info,
    }
    try:
        return int(_client(url_or_client).publish(channel, json.dumps(msg, default=str)))
    except Exception as e:  # Redis down: replicas still follow ACTIVE by polling
        log.warning("version event for %s not sent (%s); replicas will follow by polling", active, e)
        return 0


class VersionSubscriber:
    """Background thread: subscribe to CHANNEL, call `on_active(v)` per message; reconnect forever."""

    def __init__(
        self,
        url: str,
        on_active: Callable[[int], Any],
        current_active: Callable[[], int] | None = None,
        channel: str = CHANNEL,
        reconnect_s: float = 0.5,
        max_reconnect_s: float = 5.0,
    ) -> None:
        self.url = url
        self.on_active = on_active
        self.current_active = current_active
        self.channel = channel
        self.reconnect_s = reconnect_s
        self.max_reconnect_s = max_reconnect_s
        self.connected = False
        self.messages = 0
        self.last_error: str | None = None
        self.last_message_at: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> VersionSubscriber:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="memfit-version-events", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 3.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _call(self, v: int) -> None:
        try:
            self.on_active(int(v))
        except Exception:  # a failing switch must not kill the subscriber; the poll loop retries
            log.exception("switching to version %s failed", v)

    def _catch_up(self) -> None:
        if self.current_active is None:
            return
        try:
            v = self.current_active()
        except Exception as e:
            log.warning("reading the store's active version failed: %s", e)
            return
        self._call(v)

    def _run(self) -> None:
        import redis

        delay = self.reconnect_s
        while not self._stop.is_set():
            client = None
            pubsub = None
            try:
                client = redis.Redis.from_url(
                    self.url, socket_connect_timeout=3, socket_timeout=None, health_check_interval=10
                )
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.channel)
                # Wait for the subscription to be confirmed, then catch up: anything published from
                # here on reaches us, anything before is in the store's ACTIVE pointer.
                deadline = time.monotonic() + 5
                while not pubsub.subscribed and time.monotonic() < deadline:
                    pubsub.get_message(timeout=0.1)
                pubsub.get_message(timeout=0)  # consumes the confirmation when it arrived
                self.connected = True
                self.last_error = None
                delay = self.reconnect_s
                self._catch_up()
                while not self._stop.is_set():
                    msg = pubsub.get_message(timeout=0.5)
                    if msg is None or msg.get("type") != "message":
                        continue
                    try:
                        data = json.loads(msg["data"])
                        v = int(data["active"])
                    except (ValueError, KeyError, TypeError) as e:
                        log.warning("ignoring malformed version event %r (%s)", msg.get("data"), e)
                        continue
                    self.messages += 1
                    self.last_message_at = time.time()
                    self._call(v)
            except Exception as e:  # connection lost or refused: back off, reconnect, catch up
                if self.connected or self.last_error != str(e):
                    log.warning("version events: %s; reconnecting", e)
                self.connected = False
                self.last_error = str(e)
                self._stop.wait(delay)
                delay = min(self.max_reconnect_s, delay * 2)
            finally:
                self.connected = False if self._stop.is_set() else self.connected
                for closer in (pubsub, client):
                    try:
                        if closer is not None:
                            closer.close()
                    except Exception:
                        pass
