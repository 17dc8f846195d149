"""`memfit serve`: run the API (embedded mode unless MEMFIT_REDIS_URL is set).

Embedded: one process holds the API, the live model and an update runner; jobs and documents live in
the store's log on local disk. With no model at the default location the default model is built
first (`make run` relies on this). A store whose base differs from an explicit --model is an error.
"""

from __future__ import annotations

import sys
from pathlib import Path

from memfit.commands import settings_from_args


def usage_lines(base: str) -> list[str]:
    return [
        "try it:",
        f"  curl -s {base}/ingest -H 'Content-Type: application/json' -H 'Idempotency-Key: demo-1' \\",
        """    -d '{"documents": [{"id": "zorbania", "text": "The capital of Zorbania is Quillton.", """
        """"facts": [{"question": "What is the capital of Zorbania?", "answer": "Quillton"}]}]}'""",
        f"  curl -s {base}/jobs/JOB_ID",
        f"  curl -s {base}/generate -H 'Content-Type: application/json' \\",
        """    -d '{"prompt": "Question: What is the capital of Zorbania?\\nAnswer:", "max_new_tokens": 16, "stop": ["\\n"]}'""",
        f"  curl -s {base}/versions",
        f"  curl -s -X POST {base}/versions/0/activate      # roll back to the base model",
        f"  docs: {base}/docs   metrics: {base}/metrics",
    ]


def run(args) -> int:
    from memfit.logs import configure_logging

    settings = settings_from_args(args)
    configure_logging(settings.log_level, settings.log_format)  # JSON lines (docs/observability.md)
    problem = _mode_problem(settings)
    if problem:
        return _refuse(problem)

    from memfit.config import DeviceUnavailable, resolve_device

    try:  # before anything loads: MEMFIT_DEVICE=cuda on a machine without one is a clear error
        device = resolve_device(settings.device)
    except DeviceUnavailable as e:
        return _refuse(str(e))

    from service.security import check_bind

    host, warning = check_bind(settings, args.host, args.insecure)
    if warning:
        print(warning, file=sys.stderr)
    problem = _ensure_model(settings)
    if problem:
        return _refuse(problem)

    from service.app import StoreSetupError, open_store

    try:
        store = open_store(settings)
    except StoreSetupError as e:
        return _refuse(str(e))
    print(
        f"store {store.root} (active version {store.active()}), base model {store.base_dir}, device {device}",
        flush=True,
    )
    _serve(settings, host)
    return 0


def _refuse(problem: str) -> int:
    print(f"memfit serve: {problem}", file=sys.stderr)
    return 2


def _mode_problem(settings) -> str | None:
    """With MEMFIT_REDIS_URL set, why the distributed mode cannot run here (None: it can, or embedded)."""
    if not settings.redis_url:
        return None
    try:
        import workers.distributed  # noqa: F401  (lazy: only the distributed mode needs Celery)
    except ImportError as e:
        return (
            f"MEMFIT_REDIS_URL is set, but the distributed mode is not available here ({e}).\n"
            "Unset MEMFIT_REDIS_URL to run in embedded mode."
        )
    return None


def _ensure_model(settings) -> str | None:
    """Without a store and without a model at the default location, build the default model first
    (`make run` relies on this); an explicit --model that is missing is an error (returned)."""
    from model_store.tables import has_weights

    store_exists = (settings.store / "store.json").exists()
    if store_exists or has_weights(settings.model):
        return None
    if "model" in settings.model_fields_set:
        return f"no model at {settings.model} (config.json + model.safetensors)"
    from memfit.extras import check

    problem = check("pretrain", "building the default model")
    if problem:
        return f"no model at {settings.model}; {problem}"
    from memfit.commands.pretrain import build

    print(
        f"no model at {settings.model}: building the default model first "
        "(about 26 minutes on 2 CPU cores, once; `memfit pretrain` does the same)",
        flush=True,
    )
    if build("default", Path(settings.model)) != 0:
        return f"building the default model into {settings.model} failed (see the output above)"
    return None


def _serve(settings, host: str) -> None:
    """Print the try-it lines and run the app under uvicorn until shutdown."""
    import uvicorn

    from service.app import create_app

    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    base = f"http://{shown}:{settings.port}"
    print("\n".join(usage_lines(base)), flush=True)
    app = create_app(settings)
    uvicorn.run(
        app,
        host=host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        log_config=None,  # uvicorn's loggers propagate to the JSON handler of configure_logging
        access_log=False,  # memfit.logs.RequestIdMiddleware logs each request (with its X-Request-ID)
        timeout_graceful_shutdown=settings.shutdown_grace_s,
    )
