"""API keys with hierarchical roles (read < write < admin), per-key rate limits, safe binding.

Keys come from ``MEMFIT_API_KEYS`` (a JSON object ``{"key": "role"}``) and/or
``MEMFIT_API_KEYS_FILE`` (lines ``<sha256-hex of the key> <role>``, ``#`` comments). Only sha256
digests are kept in memory; a presented key is hashed and compared with every stored digest in
constant time. Clients send ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``; a browser that
logged in at ``/dashboard/login`` sends the ``memfit_session`` cookie instead, which grants the read
role on GET/HEAD requests only (service/sessions.py).

With no keys configured every request is allowed, and :func:`check_bind` keeps ``memfit serve`` on
localhost unless ``--insecure`` is given.

Rate limits are token buckets per key *and per replica* (in process memory): with N API replicas a
key can make up to N x ``rate_limit_per_minute`` requests a minute in total.

Routes use the dependencies::

    from service.security import require_role, require_role_unless
    @router.post("/ingest", dependencies=[Depends(require_role("write"))])
    @router.get("/metrics", dependencies=[Depends(require_role_unless("public_metrics", "read"))])
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import math
import os
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from memfit.config import Settings, get_settings
from service.errors import ApiError, validate_id, validate_version_id
from service.sessions import COOKIE_NAME, SessionSigner

__all__ = [
    "ROLES",
    "ApiError",
    "KeyStore",
    "Principal",
    "RateLimiter",
    "check_bind",
    "get_keystore",
    "hash_key",
    "require_role",
    "require_role_unless",
    "validate_id",
    "validate_version_id",
]

ROLES: tuple[str, ...] = ("read", "write", "admin")
ROLE_RANK: dict[str, int] = {role: rank for rank, role in enumerate(ROLES)}
_HEX64 = frozenset("0123456789abcdef")
_RELOAD_CHECK_S = 1.0  # how often the keys file's mtime is looked at


def hash_key(key: str) -> str:
    """sha256 hex digest of a key: what a keys file line holds (``memfit`` never stores keys)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _check_role(role: object, where: str) -> str:
    if role not in ROLE_RANK:
        raise ValueError(f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
    return str(role)


@dataclass(frozen=True)
class Principal:
    """Who made a request: ``key_id`` is a short prefix of the key's sha256 (safe to log)."""

    key_id: str | None
    role: str
    authenticated: bool

    @property
    def name(self) -> str:
        return f"key:{self.key_id}" if self.key_id else "anonymous"


ANONYMOUS_ADMIN = Principal(key_id=None, role="admin", authenticated=False)
PUBLIC = Principal(key_id=None, role="read", authenticated=False)


class RateLimiter:
    """Token buckets keyed by key id: ``per_minute`` capacity, refilled at ``per_minute / 60``/s.

    Process-local (per replica). ``per_minute = 0`` disables limiting.
    """

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = int(per_minute)
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, last refill time)
        self._lock = threading.Lock()

    def acquire(self, key_id: str, cost: float = 1.0) -> float:
        """Take `cost` tokens (at most the capacity); 0.0 when allowed, else the seconds until they are
        available."""
        if self.per_minute <= 0:
            return 0.0
        capacity = float(self.per_minute)
        cost = min(float(cost), capacity)
        rate = capacity / 60.0
        now = self.clock()
        with self._lock:
            tokens, last = self._buckets.get(key_id, (capacity, now))
            tokens = min(capacity, tokens + (now - last) * rate)
            if tokens >= cost:
                self._buckets[key_id] = (tokens - cost, now)
                return 0.0
            self._buckets[key_id] = (tokens, now)
            return (cost - tokens) / rate


@dataclass
class KeyStore:
    """sha256 digest -> role, from settings; reloads the keys file when it changes."""

    digests: dict[str, str] = field(default_factory=dict)
    limiter: RateLimiter = field(default_factory=lambda: RateLimiter(0))
    keys_json: str | None = None
    keys_file: Path | None = None
    _file_mtime: float | None = None
    _last_check: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyStore:
        """Raises ValueError naming the problem (bad JSON, unknown role, malformed file line)."""
        store = cls(
            limiter=RateLimiter(settings.rate_limit_per_minute),
            keys_json=settings.api_keys,
            keys_file=Path(settings.api_keys_file) if settings.api_keys_file else None,
        )
        if store.keys_file is not None:
            try:  # the mtime before reading: an edit made while we read is picked up by maybe_reload
                store._file_mtime = os.stat(store.keys_file).st_mtime
            except OSError:
                pass  # _load reports the unreadable file
        store.digests = store._load()
        return store

    @property
    def enabled(self) -> bool:
        """True when at least one key is configured (then every protected route needs one)."""
        return bool(self.digests) or self.keys_file is not None or bool(self.keys_json)

    def _load(self) -> dict[str, str]:
        digests: dict[str, str] = {}
        if self.keys_json:
            try:
                data = json.loads(self.keys_json)
            except json.JSONDecodeError as e:
                raise ValueError(f"MEMFIT_API_KEYS is not valid JSON: {e}") from None
            if not isinstance(data, dict):
                raise ValueError('MEMFIT_API_KEYS must be a JSON object {"key": "read|write|admin"}')
            for i, (key, role) in enumerate(data.items()):
                if not key:
                    raise ValueError(f"MEMFIT_API_KEYS: entry {i} has an empty key")
                digests[hash_key(key)] = _check_role(role, f"MEMFIT_API_KEYS entry {i}")
        if self.keys_file is not None:
            digests.update(self._read_file(self.keys_file))
        return digests

    @staticmethod
    def _read_file(path: Path) -> dict[str, str]:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ValueError(f"MEMFIT_API_KEYS_FILE {path}: cannot read: {e.strerror or e}") from None
        digests: dict[str, str] = {}
        for lineno, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            where = f"{path}:{lineno}"
            if len(parts) != 2:
                raise ValueError(f"{where}: expected '<sha256-hex> <role>', got {len(parts)} fields")
            digest, role = parts[0].lower(), parts[1]
            if len(digest) != 64 or not set(digest) <= _HEX64:
                raise ValueError(f"{where}: {parts[0][:16]!r}... is not a 64-character sha256 hex digest")
            digests[digest] = _check_role(role, where)
        return digests

    def maybe_reload(self) -> None:
        """Pick up an edited keys file (e.g. a rotated Kubernetes Secret) without a restart.

        Checked at most once a second; a file that fails to parse keeps the previous keys.
        """
        if self.keys_file is None:
            return
        now = time.monotonic()
        if now - self._last_check < _RELOAD_CHECK_S:
            return
        with self._lock:
            if now - self._last_check < _RELOAD_CHECK_S:
                return
            self._last_check = now
            try:
                mtime = os.stat(self.keys_file).st_mtime
            except OSError:
                return
            if mtime == self._file_mtime:
                return
            try:
                self.digests = self._load()
                self._file_mtime = mtime
            except ValueError:
                pass  # keep serving with the old keys; the operator sees the error at the next start

    def role_of_key_id(self, key_id: str) -> str | None:
        """The role of the configured key whose digest starts with `key_id` (a dashboard session's
        key), or None once that key is gone; the lowest role if two keys share the prefix."""
        roles = [role for digest, role in self.digests.items() if digest.startswith(key_id)]
        return min(roles, key=ROLE_RANK.__getitem__) if roles and len(key_id) >= 12 else None

    def lookup(self, key: str) -> str | None:
        """The role of ``key``, or None. Constant-time over every stored digest."""
        presented = hash_key(key)
        found: str | None = None
        for digest, role in self.digests.items():
            if hmac.compare_digest(presented, digest):
                found = role
        return found


def get_keystore(request: Request) -> KeyStore:
    """The app's KeyStore, built from ``app.state.settings`` on first use and cached on app.state."""
    state = request.app.state
    store = getattr(state, "keystore", None)
    if store is None:
        settings = getattr(state, "settings", None) or get_settings()
        try:
            store = KeyStore.from_settings(settings)
        except ValueError as e:
            raise ApiError(500, "misconfigured", f"API key configuration: {e}") from None
        state.keystore = store
    return store


def get_sessions(request: Request) -> SessionSigner:
    """The app's dashboard session signer (service/sessions.py), made on first use."""
    state = request.app.state
    signer = getattr(state, "sessions", None)
    if signer is None:
        settings = getattr(state, "settings", None) or get_settings()
        signer = SessionSigner(settings.session_secret, settings.session_ttl_s)
        state.sessions = signer
    return signer


def _session_principal(request: Request, store: KeyStore, role: str) -> Principal | None:
    """The read principal of a valid dashboard session cookie on a GET/HEAD that needs at most read;
    None when there is no cookie or the request is not one a session may make; ApiError 401 for a
    cookie that is expired, forged, logged out or whose key was removed."""
    cookie = request.cookies.get(COOKIE_NAME)
    if not cookie or request.method not in ("GET", "HEAD") or ROLE_RANK[role] > ROLE_RANK["read"]:
        return None
    session = get_sessions(request).verify(cookie)
    if session is None or store.role_of_key_id(session.key_id) is None:
        raise ApiError(
            401,
            "unauthorized",
            "the dashboard session has expired or is no longer valid: log in again at /dashboard/login",
            field="Cookie",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return Principal(key_id=session.key_id, role="read", authenticated=True)


def _presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, value = auth.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise ApiError(
                401,
                "unauthorized",
                "Authorization header must be 'Bearer <key>'",
                field="Authorization",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return value.strip()
    key = request.headers.get("x-api-key")
    if key is not None:
        return key.strip() or None
    return None


def authenticate(request: Request, role: str) -> Principal:
    """The request's principal when its key grants at least ``role``; else ApiError 401/403/429."""
    store = get_keystore(request)
    store.maybe_reload()
    if not store.enabled:
        principal = ANONYMOUS_ADMIN
        request.state.principal = principal
        return principal
    key = _presented_key(request)
    if key is None:
        session = _session_principal(request, store, role)
        if session is not None:
            _rate_limit(store, session.key_id or "")
            request.state.principal = session
            return session
        raise ApiError(
            401,
            "unauthorized",
            "an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
            field="Authorization",
            headers={"WWW-Authenticate": "Bearer"},
        )
    granted = store.lookup(key)
    if granted is None:
        raise ApiError(
            401,
            "unauthorized",
            "unknown API key",
            field="Authorization",
            headers={"WWW-Authenticate": "Bearer"},
        )
    key_id = hash_key(key)[:12]
    if ROLE_RANK[granted] < ROLE_RANK[role]:
        raise ApiError(403, "forbidden", f"this API key has role '{granted}'; this endpoint needs '{role}'")
    _rate_limit(store, key_id)
    principal = Principal(key_id=key_id, role=granted, authenticated=True)
    request.state.principal = principal
    return principal


def _rate_limit(store: KeyStore, key_id: str) -> None:
    wait = store.limiter.acquire(key_id)
    if wait > 0:
        retry_after = max(1, math.ceil(wait))
        raise ApiError(
            429,
            "rate_limited",
            f"rate limit of {store.limiter.per_minute} requests per minute for this key exceeded; "
            f"retry in {retry_after} s",
            field="rate_limit_per_minute",
            headers={"Retry-After": str(retry_after)},
        )


# Declared for the OpenAPI schema only (the "Authorize" button of /docs and each operation's
# `security`); the headers themselves are read and checked by `authenticate`.
_bearer_scheme = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
_api_key_scheme = APIKeyHeader(name="X-API-Key", auto_error=False, description="the API key")
_BearerDoc = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer_scheme)]
_ApiKeyDoc = Annotated[str | None, Depends(_api_key_scheme)]


def require_role(role: str) -> Callable[[Request], Coroutine[Any, Any, Principal]]:
    """FastAPI dependency: the request needs a key with at least ``role`` (read < write < admin).

    Returns the :class:`Principal` (also on ``request.state.principal``; ``principal.name`` is what
    the activation log records as "who").
    """
    _check_role(role, "require_role")

    async def dependency(
        request: Request, _bearer: _BearerDoc = None, _api_key: _ApiKeyDoc = None
    ) -> Principal:
        return authenticate(request, role)

    dependency.__name__ = f"require_{role}"
    dependency.memfit_role = role  # type: ignore[attr-defined]  # read by tests and the OpenAPI docs
    dependency.memfit_public_flag = None  # type: ignore[attr-defined]
    return dependency


def require_role_unless(
    flag_name: str, role: str = "read"
) -> Callable[[Request], Coroutine[Any, Any, Principal]]:
    """Like :func:`require_role`, but open when the settings flag ``flag_name`` is true.

    ``require_role_unless("public_metrics")`` for /metrics, ``require_role_unless("public_health")``
    for /healthz and /readyz.
    """
    _check_role(role, "require_role_unless")
    if flag_name not in Settings.model_fields:
        raise ValueError(f"require_role_unless: {flag_name!r} is not a Settings field")

    async def dependency(
        request: Request, _bearer: _BearerDoc = None, _api_key: _ApiKeyDoc = None
    ) -> Principal:
        settings = getattr(request.app.state, "settings", None) or get_settings()
        if getattr(settings, flag_name):
            principal = PUBLIC
            request.state.principal = principal
            return principal
        return authenticate(request, role)

    dependency.__name__ = f"require_{role}_unless_{flag_name}"
    dependency.memfit_role = role  # type: ignore[attr-defined]
    dependency.memfit_public_flag = flag_name  # type: ignore[attr-defined]
    return dependency


# ---------------------------------------------------------------------------------------------
# binding


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(settings: Settings, host: str | None, insecure: bool) -> tuple[str, str | None]:
    """The host ``memfit serve`` may bind, and a warning to print (or None).

    - keys configured: ``host`` (default ``settings.host``) as asked; the key configuration is
      checked here so that a bad keys file fails at start, not at the first request.
    - no keys, loopback host: allowed, with a note that every request is allowed.
    - no keys, any other host: SystemExit with the reason, unless ``insecure``, then a warning.
    """
    host = host or settings.host
    try:
        store = KeyStore.from_settings(settings)
    except ValueError as e:
        raise SystemExit(f"memfit serve: API key configuration: {e}") from None
    if store.enabled:
        return host, None
    if is_loopback(host):
        return host, (
            f"no API keys configured (MEMFIT_API_KEYS / MEMFIT_API_KEYS_FILE): every request is allowed, "
            f"so the server listens on {host} only"
        )
    if not insecure:
        raise SystemExit(
            f"memfit serve: refusing to listen on {host} without API keys: anyone who can reach it could "
            "ingest documents and roll back versions. Configure keys (MEMFIT_API_KEYS_FILE or "
            "MEMFIT_API_KEYS, see docs/deploy.md), bind 127.0.0.1, or pass --insecure."
        )
    return host, (
        f"WARNING: --insecure: listening on {host} without API keys; anyone who can reach this port has "
        "admin rights (ingest, activate, revert)"
    )


def route_role(route: Any) -> tuple[str, str | None] | None:
    """(role, public flag) that a FastAPI route requires through these dependencies, or None."""
    stack = list(getattr(getattr(route, "dependant", None), "dependencies", []))
    while stack:
        dep = stack.pop()
        role = getattr(dep.call, "memfit_role", None)
        if role is not None:
            return role, dep.call.memfit_public_flag
        stack.extend(dep.dependencies)
    return None
