"""Dashboard sessions: a browser exchanges an API key for a signed, HttpOnly, SameSite=Strict cookie.

`POST /dashboard/login` (service/routes/dashboard.py) checks the key and sets `memfit_session`, whose
value is `v1.<session id>.<key id>.<expiry>.<signature>`: the key id is the first 12 hex digits of the
key's sha256 (what the logs show, never the key), the expiry a Unix time, and the signature an
HMAC-SHA256 under `MEMFIT_SESSION_SECRET` (a random secret per process when unset, so then a session
is valid only on the replica that made it: set the secret on every replica behind a load balancer).

A session grants the **read role only**, and only for GET/HEAD requests (service/security.py), so
the dashboard's charts work from a plain browser while its activate/revert buttons still need an
admin key typed into the page. It ends at its expiry (`MEMFIT_SESSION_TTL_S`), at logout (this
replica forgets it at once; the browser deletes the cookie), or when its key is removed from the key
configuration (checked on every request).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass

COOKIE_NAME = "memfit_session"
_VERSION = "v1"


@dataclass(frozen=True)
class Session:
    session_id: str
    key_id: str
    expires: int


class SessionSigner:
    def __init__(self, secret: str | bytes | None, ttl_s: int) -> None:
        if secret is None or secret == "":
            secret = secrets.token_bytes(32)
        self.secret = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
        self.ttl_s = int(ttl_s)
        self._revoked: dict[str, int] = {}  # session id -> expiry (kept until then)
        self._lock = threading.Lock()

    def _sign(self, payload: str) -> str:
        mac = hmac.new(self.secret, payload.encode("ascii"), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")

    def issue(self, key_id: str, now: float | None = None) -> tuple[str, Session]:
        """A cookie value for a session of `key_id`, valid for ttl_s seconds."""
        now = time.time() if now is None else now
        session = Session(secrets.token_hex(8), key_id, int(now) + self.ttl_s)
        payload = f"{_VERSION}.{session.session_id}.{session.key_id}.{session.expires}"
        return f"{payload}.{self._sign(payload)}", session

    def verify(self, value: str | None, now: float | None = None) -> Session | None:
        """The session of a cookie value, or None (malformed, forged, expired or logged out)."""
        if not value or len(value) > 256:
            return None
        parts = value.split(".")
        if len(parts) != 5 or parts[0] != _VERSION:
            return None
        payload = ".".join(parts[:4])
        if not hmac.compare_digest(self._sign(payload), parts[4]):
            return None
        try:
            expires = int(parts[3])
        except ValueError:
            return None
        now = time.time() if now is None else now
        if expires <= now:
            return None
        with self._lock:
            if parts[1] in self._revoked:
                return None
        return Session(parts[1], parts[2], expires)

    def revoke(self, session: Session, now: float | None = None) -> None:
        """Logout: this process rejects the session from now on (until its expiry)."""
        now = time.time() if now is None else now
        with self._lock:
            for sid in [s for s, exp in self._revoked.items() if exp <= now]:
                del self._revoked[sid]
            self._revoked[session.session_id] = session.expires
