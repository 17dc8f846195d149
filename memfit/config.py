"""All memfit settings: one pydantic-settings class, environment prefix MEMFIT_, at the bottom of the
layers (model_store, workers, service and the command line import it; it imports memlm.paths only
when a default path is needed, so importing it loads neither torch nor transformers).

`Settings` is the only reader of `MEMFIT_*` variables, with these exceptions on purpose (each read
where there are no Settings, or must not validate them; tests/deploy/test_deploy_files.py and
tests/test_layers.py keep the list):

- `MEMFIT_HOME` (memlm.paths): the core finds its models without the service's configuration.
- `MEMFIT_API_KEY`, `MEMFIT_URL`, and `memfit store`'s `MEMFIT_STORE` / `MEMFIT_REDIS_URL`
  (memfit/commands): the client side and the offline operator commands, which must run with a
  server's configuration that does not validate here.
- `MEMFIT_CRASH_AT` (`crash_at()` below): a fault-injection hook of the crash tests, read at each
  crash point (the store writes without Settings) rather than once.
- `MEMFIT_BENCH_THREADS` (memfit/bench/serve.py): a benchmark's load, not a setting of memfit.

The fields are grouped by purpose (paths, serving, updates, gate, distributed, security), each group a
class that `Settings` combines; the groups only organise the fields: a field keeps its flat name
(`settings.gate_max_forgetting`, `Settings(gate_max_forgetting=...)`, `MEMFIT_GATE_MAX_FORGETTING`).
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"
CRASH_ENV = "MEMFIT_CRASH_AT"  # fault tests only (tests/faults/test_worker_kill.py, tests/model_store)
#: seconds between the soft time limit (a clean `SoftTimeLimitExceeded` in the task) and the hard one
SOFT_LIMIT_MARGIN_S = 60


def _default_model_dir() -> Path:
    from memlm.paths import default_model_dir  # imported when used: `import memfit.config` stays light

    return default_model_dir()


def _default_store_dir() -> Path:
    from memlm.paths import default_store_dir

    return default_store_dir()


class PathSettings(BaseModel):
    """Where things live."""

    model: Path = Field(
        default_factory=_default_model_dir, description="base model directory (seeds an empty store)"
    )
    store: Path = Field(default_factory=_default_store_dir, description="store directory")


class ServingSettings(BaseModel):
    """The API process: address, device, decoding, admission, request limits, shutdown, logs."""

    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8000, ge=1, le=65535, description="bind port")

    # serving and embedded updates (resolve_device below; `memfit worker` reads it too)
    device: str = Field(
        "auto",
        pattern=DEVICE_PATTERN,
        description="model device: cpu, cuda, cuda:N, or auto (CUDA when available); cuda absent -> error",
    )

    follow_interval_s: float = Field(0.25, gt=0, description="how often the active pointer is polled")
    generation_workers: int = Field(2, ge=1, description="threads running model work")
    max_batch_size: int = Field(16, ge=1, description="requests decoded together")
    # admission control: requests over these get a 503 with Retry-After instead of piling up
    max_waiting: int = Field(
        256, ge=1, description="generation requests waiting for a decoding slot above this -> 503"
    )
    request_timeout_s: float = Field(
        300.0, gt=0, description="a generation still running this long after admission is stopped (503)"
    )
    # 50: inside compose's stop_grace_period (60 s) and k8s' terminationGracePeriodSeconds (75 s = a 5 s
    # preStop + this + margin); tests/deploy/test_deploy_files.py checks the manifests keep it so
    shutdown_grace_s: int = Field(
        50, ge=0, description="on SIGTERM, seconds in-flight requests get to finish before they are cut"
    )

    # request limits (each a clear 413/422 naming the limit)
    max_documents_per_request: int = Field(256, ge=1)
    max_document_chars: int = Field(20_000, ge=1)
    max_facts_per_document: int = Field(64, ge=0)
    max_request_bytes: int = Field(4_000_000, ge=1)
    max_prompt_chars: int = Field(8_000, ge=1)
    max_new_tokens_limit: int = Field(512, ge=1)
    max_stop_sequences: int = Field(8, ge=0)
    min_version_wait_s: float = Field(10.0, ge=0, description="bounded wait of min_version before 503")

    # logs (memfit/logs.py)
    log_level: str = Field("INFO", description="root log level: DEBUG, INFO, WARNING, ERROR")
    log_format: Literal["json", "text"] = Field(
        "json", description="json: one JSON object per line (request_id, job_id, version); text: classic"
    )


class UpdatesSettings(BaseModel):
    """Update jobs, both modes: their queue, batching, time limit, attempts and default update settings."""

    max_queue_depth: int = Field(1000, ge=1, description="queued jobs above this -> 429 with Retry-After")
    task_time_limit_s: int = Field(
        1800,
        ge=1,
        description="time limit of one update job, both modes: past it the job fails at a step boundary",
    )
    # 8: on the default model a batch of 5 single-fact jobs learned all 5 in 4.6 s at 1.6% probe
    # forgetting; batches of 32 ran out of steps at ~70% learned and 22-27% forgetting (gate-rejected)
    max_batch_jobs: int = Field(8, ge=1, description="queued jobs merged into one update when they pile up")
    max_attempts: int = Field(
        3, ge=1, description="a job started this many times without finishing (its process died) fails"
    )

    # update defaults (overridable per request under "settings"); None: the model directory's
    # update_defaults.json (memlm.update_defaults, written by `memfit pretrain` from the preset), else
    # memlm.updater's defaults
    update_top_t: int | None = Field(
        None, description="None -> the model's update_defaults.json, else memlm's"
    )
    update_steps: int | None = None
    update_lr: float | None = None
    # protection (workers/preservation.py): None -> the model's update_defaults.json, else off
    update_preserve: bool | None = Field(
        None,
        description="keep the slots read by the known probe facts the gate does not measure out of every update",
    )
    update_shield: int | None = Field(
        None,
        ge=0,
        description="also keep out the slots read by N served-format texts of unused invented entities",
    )
    # repair (workers/repairing.py): None -> the model's update_defaults.json, else off
    update_repair: bool | None = Field(
        None,
        description="after an update, retrain beside it the facts earlier versions taught that read a row it wrote and lost",
    )


class GateSettings(BaseModel):
    """The evaluation gate every update passes before it is activated."""

    gate_enabled: bool = True
    # None: the base model's update_defaults.json (`memfit pretrain` writes what the preset's model was
    # measured to support), else the loose house thresholds of workers.gate.HOUSE_THRESHOLDS (0.10 /
    # 0.25 / +0.25), which models that forget several probe facts per update (the tiny preset) need
    gate_max_forgetting: float | None = Field(
        None, description="reject when forgetting vs parent exceeds this (None: the model's, else 0.10)"
    )
    gate_max_forgetting_base: float | None = Field(
        None, description="reject when forgetting vs base exceeds this (None: the model's, else 0.25)"
    )
    gate_max_ppl_increase: float | None = Field(
        None,
        description="reject when held-out perplexity rises more, relative (None: the model's, else 0.25)",
    )
    gate_probe_facts: int = Field(64, ge=0)
    gate_heldout_tokens: int = Field(2048, ge=0)
    probe_file: Path | None = Field(
        None, description="gate probe set: a JSON file like the model's probe.json (None -> the model's)"
    )


class DistributedSettings(BaseModel):
    """Distributed mode: Redis, Celery, job claims, and the worker's own /metrics."""

    redis_url: str | None = Field(None, description="set -> distributed mode (Celery on Redis)")
    # Redis' requirepass, kept out of the URL in the manifests: a secret file (compose, k8s volume) or
    # a variable (k8s secretKeyRef); put into redis_url (which every client is built from) at load
    redis_password_file: Path | None = Field(None, description="file holding the Redis password")
    redis_password: str | None = Field(None, description="the Redis password (prefer redis_password_file)")
    celery_queue: str = Field("memfit-updates", description="Celery queue of update tasks")
    visibility_timeout_s: int = Field(3600, description="Redis visibility timeout; above the longest update")
    claim_ttl_s: float = Field(60.0, gt=0, description="a dead worker's job claims lapse after this long")
    # every Redis client (queue, locks, claims, background table, events) fails after these instead of
    # hanging on a Redis that does not answer
    redis_connect_timeout_s: float = Field(3.0, gt=0, le=300, description="Redis TCP connect timeout")
    redis_socket_timeout_s: float = Field(5.0, gt=0, le=300, description="Redis reply timeout per command")
    redis_retry_s: float = Field(
        60.0,
        ge=0,
        description="a worker retries an unreachable Redis this long at publish before the job fails",
    )
    worker_metrics_port: int = Field(
        9101, ge=0, le=65535, description="Celery worker: /metrics HTTP port for Prometheus (0: off)"
    )

    @model_validator(mode="after")
    def _password_into_redis_url(self) -> DistributedSettings:
        password = self.redis_password or None
        if self.redis_password_file is not None:
            try:
                password = self.redis_password_file.read_text().strip() or None
            except OSError as e:
                raise ValueError(f"MEMFIT_REDIS_PASSWORD_FILE {self.redis_password_file}: {e}") from None
        if self.redis_url and password:
            self.redis_url = redis_url_with_password(self.redis_url, password)
        return self


class SecuritySettings(BaseModel):
    """API keys, what is public, rate limits, and the dashboard's session cookies."""

    api_keys: str | None = Field(None, description='JSON object {"key": "read|write|admin"}')
    api_keys_file: Path | None = Field(None, description="lines 'sha256-hex role'")
    public_metrics: bool = Field(True, description="/metrics without a key")
    public_health: bool = Field(True, description="/healthz and /readyz without a key")
    rate_limit_per_minute: int = Field(600, ge=0, description="per key and replica; 0 disables")
    ingest_bytes_per_minute: int = Field(
        10_000_000,
        ge=0,
        description="document bytes (UTF-8 text and facts) per key and replica a minute; 0 disables",
    )
    # dashboard login (service/sessions.py): a key exchanged for a read-only session cookie
    session_ttl_s: int = Field(8 * 3600, ge=1, description="dashboard session lifetime in seconds")
    session_secret: str | None = Field(
        None, description="HMAC secret of session cookies; set the same on every replica (unset: per process)"
    )


class Settings(
    PathSettings,
    ServingSettings,
    UpdatesSettings,
    GateSettings,
    DistributedSettings,
    SecuritySettings,
    BaseSettings,
):
    """Every setting, read from `MEMFIT_<FIELD>` (or given as keyword arguments, which win)."""

    model_config = SettingsConfigDict(env_prefix="MEMFIT_", extra="ignore")


@lru_cache
def get_settings() -> Settings:
    return Settings()


def soft_limit_s(hard: int) -> int:
    """Seconds before the hard limit (MEMFIT_TASK_TIME_LIMIT_S) at which an update is told to stop:
    SOFT_LIMIT_MARGIN_S, or a quarter of the hard limit when that is shorter (a 30 s limit must not
    cancel every job after 1 s). The Celery task's soft limit and the worker's own deadline."""
    return max(1, int(hard - min(SOFT_LIMIT_MARGIN_S, hard / 4)))


def redis_url_with_password(url: str, password: str) -> str:
    """`url` with `password` in it, unless it carries one already (redis://:pw@host:port/db)."""
    from urllib.parse import quote, urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password or not parts.hostname:
        return url
    user = quote(parts.username, safe="") if parts.username else ""
    netloc = f"{user}:{quote(password, safe='')}@{parts.netloc.rsplit('@', 1)[-1]}"
    return urlunsplit(parts._replace(netloc=netloc))


def redacted(url: str | None) -> str | None:
    """`url` with its password replaced by ***, for messages."""
    from urllib.parse import urlsplit, urlunsplit

    if not url:
        return url
    parts = urlsplit(url)
    if not parts.password:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)))


# ==== MEMFIT_DEVICE ==============================================================================
# `cpu`, `cuda` (the current CUDA device), `cuda:N`, or `auto` (the default: CUDA when torch sees a GPU,
# else the CPU), for serving (the engine) and updates (the pipeline). A CUDA device that is asked for
# and absent is a clear error at start-up (`DeviceUnavailable`), never a silent fall back to the CPU.
# torch is imported only when a device is resolved, so importing this module stays cheap.


class DeviceUnavailable(RuntimeError):
    """MEMFIT_DEVICE names a device this machine does not have (the message says what to do)."""


def resolve_device(setting: str | None) -> str:
    """The torch device string for a MEMFIT_DEVICE value ('auto' -> 'cuda' or 'cpu')."""
    value = (setting or "auto").strip().lower()
    if not re.match(DEVICE_PATTERN, value):
        raise ValueError(f"MEMFIT_DEVICE must be cpu, cuda, cuda:N or auto, got {setting!r}")
    if value == "cpu":
        return "cpu"
    import torch

    available = torch.cuda.is_available()
    if value == "auto":
        return "cuda" if available else "cpu"
    if not available:
        why = (
            "this torch build has no CUDA support"
            if torch.version.cuda is None
            else "no CUDA device is visible"
        )
        raise DeviceUnavailable(
            f"MEMFIT_DEVICE={value} but {why} (torch {torch.__version__}): install a CUDA build of torch "
            "(make install TORCH_INDEX=... / docker build --build-arg VARIANT=cuda), check the driver and "
            "CUDA_VISIBLE_DEVICES, or set MEMFIT_DEVICE=cpu (or auto)"
        )
    if ":" in value:
        index, count = int(value.split(":", 1)[1]), torch.cuda.device_count()
        if index >= count:
            raise DeviceUnavailable(
                f"MEMFIT_DEVICE={value} but only {count} CUDA device(s) are visible (cuda:0 to cuda:{count - 1})"
            )
    return value


def crash_at() -> str | None:
    """MEMFIT_CRASH_AT, read now (crash tests set it per process; a store writes without Settings)."""
    return os.environ.get(CRASH_ENV)
