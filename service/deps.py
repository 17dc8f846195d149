"""`Annotated` dependencies: the handlers that the lifespan put on `app.state`."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request

from memfit.config import Settings
from model_store import Store
from service.engine import Engine
from service.errors import ApiError
from service.metrics import Metrics
from workers.dispatch import Dispatcher


def _state(request: Request, name: str) -> Any:
    value = getattr(request.app.state, name, None)
    if value is None:
        raise ApiError(
            503, "not_ready", f"the server is starting: {name} is not loaded yet", None, {"Retry-After": "1"}
        )
    return value


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> Store:
    return _state(request, "store")


def get_engine(request: Request) -> Engine:
    return _state(request, "engine")


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_dispatcher(request: Request) -> Dispatcher:
    """The job dispatcher (workers.dispatch.Dispatcher): the embedded UpdateRunner, the distributed
    mode's CeleryDispatcher, or a LogDispatcher."""
    return _state(request, "dispatcher")


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
EngineDep = Annotated[Engine, Depends(get_engine)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]
