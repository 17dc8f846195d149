"""What the engine refuses or stops, in its own terms: no HTTP here.

The engine (service/engine.py) raises these, or hands them to a request's stream; service/errors.py
(`ENGINE_STATUS`, `as_api_error`) is the one place they become an HTTP status and body. Each class has
its error `code` (part of the API: docs/api.md); `field` names the request field or the setting at
fault, `retry_after_s` says when trying again makes sense (the answer's Retry-After).
"""

from __future__ import annotations


class EngineError(Exception):
    code = "generation_failed"

    def __init__(
        self,
        message: str,
        field: str | None = None,
        retry_after_s: int | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.retry_after_s = retry_after_s
        if code is not None:
            self.code = code

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!r}, {self.message!r}, field={self.field!r})"


class UnknownVersion(EngineError):
    """A pinned version the store does not have."""

    code = "version_not_found"


class VersionNotServable(EngineError):
    """A pinned version that exists but cannot be served: `version_corrupt`, `version_rejected` (by
    the evaluation gate) or `version_unavailable` (its files cannot be loaded)."""


class EmptyPrompt(EngineError):
    """A prompt that encodes to no tokens."""

    code = "invalid_request"


class PromptTooLong(EngineError):
    """A prompt that leaves no room in the model's context."""

    code = "prompt_too_long"


class ShuttingDown(EngineError):
    """The engine is closing: no new requests, the waiting ones are answered with this."""

    code = "unavailable"


class Overloaded(EngineError):
    """MEMFIT_MAX_WAITING requests wait for a decoding slot already."""

    code = "overloaded"


class DeadlineExceeded(EngineError):
    """The generation ran past MEMFIT_REQUEST_TIMEOUT_S; its row has stopped."""

    code = "deadline_exceeded"


class ClientDisconnected(EngineError):
    """The request's client went away; nobody reads this answer."""

    code = "client_disconnected"


class GenerationFailed(EngineError):
    """The model work of one request failed (the others go on)."""

    code = "generation_failed"
