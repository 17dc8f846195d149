"""The engine's errors (service/engine_errors.py) carry no HTTP; service/errors.py maps each to the
status and body the API has always answered with, in one table."""

from __future__ import annotations

import pytest

from service import engine_errors as ee
from service.errors import ENGINE_STATUS, ApiError, as_api_error


def test_every_engine_error_has_a_status():
    classes = {c for c in vars(ee).values() if isinstance(c, type) and issubclass(c, ee.EngineError)}
    assert classes - {ee.EngineError} == set(ENGINE_STATUS)


@pytest.mark.parametrize(
    "error, status, code, retry_after",
    [
        (ee.UnknownVersion("version 9 does not exist", "version"), 404, "version_not_found", None),
        (
            ee.VersionNotServable("rejected", "version", code="version_rejected"),
            409,
            "version_rejected",
            None,
        ),
        (ee.EmptyPrompt("prompt encodes to no tokens", "prompt"), 422, "invalid_request", None),
        (ee.PromptTooLong("prompt is 300 tokens", "prompt"), 413, "prompt_too_long", None),
        (ee.ShuttingDown("the server is shutting down", retry_after_s=1), 503, "unavailable", "1"),
        (ee.Overloaded("9 wait", "MEMFIT_MAX_WAITING", retry_after_s=1), 503, "overloaded", "1"),
        (ee.DeadlineExceeded("too slow", "MEMFIT_REQUEST_TIMEOUT_S", 1), 503, "deadline_exceeded", "1"),
        (ee.ClientDisconnected("gone"), 499, "client_disconnected", None),
        (ee.GenerationFailed("boom"), 500, "generation_failed", None),
    ],
)
def test_engine_errors_map_to_their_status(error, status, code, retry_after):
    api = as_api_error(error)
    assert isinstance(api, ApiError)
    assert (api.status, api.code, api.message, api.field) == (status, code, error.message, error.field)
    assert (api.headers or {}).get("Retry-After") == retry_after


def test_other_errors_are_not_the_clients():
    api = ApiError(409, "conflict", "x")
    assert as_api_error(api) is api
    assert as_api_error(RuntimeError("bug")) is None
