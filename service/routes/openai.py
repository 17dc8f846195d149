"""OpenAI-compatible /v1/chat/completions, /v1/completions and /v1/models (works with the official
`openai` client).

Model names: "memfit" is the active version; "memfit@N" pins retained version N. The memfit fields
`min_version` / `version` / `top_k` are accepted (the client's `extra_body`; declared and bounded in
the schema, other unknown fields are ignored). The answering version is in the
`X-Memfit-Version` header and in `system_fingerprint` ("memfit-v{N}").

Chat prompt: the tokenizer's chat template when it has one (`apply_chat_template` with the generation
prompt; `developer` messages are passed as `system`). Otherwise -- memfit's own models have none --
the fallback template, one line per message and an open assistant line::

    System: {content}
    User: {content}
    Assistant: {content}
    User: {content}
    Assistant:

with `developer` written as `System`. Under the fallback, generation also stops at "\\nUser:",
"\\nSystem:" and "\\nAssistant:" (the model would write the next turn; these do not count against
max_stop_sequences), and the answer's leading whitespace (after "Assistant:") is dropped.

Streams are OpenAI chunks, then `data: [DONE]`. With `stream_options.include_usage` every chunk has
`"usage": null` and one more chunk, with `usage` and empty `choices`, comes last before `[DONE]`;
without it no chunk carries usage; `stream_options` on a request that does not stream is a 422 (OpenAI
refuses it too). Errors are OpenAI's shape (service/errors.py), in-band in a stream
whose status line was sent already.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import JSONResponse

from memfit.config import Settings
from model_store import StoreError
from service.deps import EngineDep, SettingsDep, StoreDep
from service.engine import Engine
from service.engine_errors import EngineError
from service.errors import ApiError, as_api_error, openai_error_body
from service.generation import Delta, Prepared, SamplingParams
from service.routes.generate import admit, check_limits, complete, event_stream, open_stream, sse_event_schema
from service.schemas import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from service.security import Principal, require_role

router = APIRouter(prefix="/v1", tags=["openai"])
SSE_EVENT = sse_event_schema("each `data` a JSON chunk, the last one `[DONE]`")
STREAMS: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "JSON, or `text/event-stream` (ending with `data: [DONE]`) when stream is true",
        "headers": {"X-Memfit-Version": {"schema": {"type": "integer"}}},
        "content": {"text/event-stream": {"schema": SSE_EVENT}},
    }
}
ReadDep = Annotated[Principal, Depends(require_role("read"))]
MODEL = "memfit"
_PINNED = re.compile(r"^memfit@(\d{1,18})$")
COMPLETION_DEFAULT_TOKENS = 16  # OpenAI's default for /v1/completions

FALLBACK_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
FALLBACK_STOPS = ("\nUser:", "\nSystem:", "\nAssistant:")


def parse_model(name: str) -> int | None:
    """None for the active version, N for "memfit@N"; 404 naming `model` otherwise."""
    if name == MODEL:
        return None
    m = _PINNED.match(name)
    if m:
        return int(m.group(1))
    raise ApiError(
        404, "model_not_found", f"model {name!r} does not exist; use 'memfit' or 'memfit@N'", "model"
    )


def render_chat(tokenizer: Any, messages: list[ChatMessage]) -> tuple[str, list[str]]:
    """The prompt of a chat and the stop sequences its template implies (see the module docstring)."""
    if getattr(tokenizer, "chat_template", None):
        turns = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.content or ""}
            for m in messages
        ]
        try:
            prompt = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # e.g. a template that raises on roles out of order
            raise ApiError(
                422, "invalid_request", f"the model's chat template refused the messages: {e}", "messages"
            ) from None
        return str(prompt), []
    lines = [f"{FALLBACK_ROLES[m.role]}: {m.content or ''}" for m in messages]
    return "\n".join([*lines, "Assistant:"]), list(FALLBACK_STOPS)


# ---- shared by chat and completions -------------------------------------------------------------


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(s == "" for s in stops):
        raise ApiError(422, "invalid_request", "stop sequences must not be empty", "stop")
    return stops


def _params(
    body: CompletionRequest | ChatCompletionRequest, max_tokens: int, stop: list[str]
) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        stop=stop,
        seed=body.seed,
    )


async def _admit(
    engine: Engine,
    settings: Settings,
    body: CompletionRequest | ChatCompletionRequest,
    prompt: str,
    params: SamplingParams,
    prompt_field: str,
) -> Prepared:
    """`admit` with the model name's pin; errors about the prompt name `prompt_field`."""
    pinned = parse_model(body.model)
    version = body.version if pinned is None else pinned
    try:
        return await admit(
            engine,
            settings,
            prompt,
            params,
            version,
            body.min_version,
            "model" if pinned is not None else "version",
        )
    except (ApiError, EngineError) as e:
        if e.field == "prompt":
            e.field = prompt_field
        raise


def _usage(d: Any) -> dict[str, int]:
    return {
        "prompt_tokens": d.prompt_tokens,
        "completion_tokens": d.completion_tokens,
        "total_tokens": d.prompt_tokens + d.completion_tokens,
    }


def _in_band_error(e: Exception) -> dict[str, Any]:
    known = as_api_error(e)
    if known is not None:
        return openai_error_body(known.status, known.code, known.message, known.field)
    return openai_error_body(500, "internal_error", f"generation failed: {type(e).__name__}")


def _include_usage(body: CompletionRequest | ChatCompletionRequest) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def _check_stream_options(body: CompletionRequest | ChatCompletionRequest) -> None:
    """OpenAI refuses `stream_options` on a request that does not stream; so does this server."""
    if body.stream_options is not None and not body.stream:
        raise ApiError(
            422, "invalid_request", "stream_options is only allowed when stream is true", "stream_options"
        )


# ---- routes -------------------------------------------------------------------------------------


def _model_cards(store) -> list[ModelCard]:
    created = int(store.info.get("created_at", time.time()))
    cards = [ModelCard(id=MODEL, created=created)]
    try:
        versions = store.versions()
    except StoreError:
        versions = []
    for m in versions:
        if m.get("state") in ("active", "retained"):
            ts = m.get("created_at") or created
            cards.append(ModelCard(id=f"{MODEL}@{m['id']}", created=int(float(ts))))
    return cards


@router.get("/models", response_model=ModelList, summary="Models: 'memfit' and each pinnable version")
async def list_models(store: StoreDep, _: ReadDep) -> ModelList:
    return ModelList(data=await asyncio.to_thread(_model_cards, store))


@router.get("/models/{model}", response_model=ModelCard, summary="One model: 'memfit' or 'memfit@N'")
async def get_model(
    model: Annotated[str, Path(max_length=64, description="'memfit' or 'memfit@N'")],
    store: StoreDep,
    _: ReadDep,
) -> ModelCard:
    parse_model(model)
    for card in await asyncio.to_thread(_model_cards, store):
        if card.id == model:
            return card
    raise ApiError(404, "model_not_found", f"model {model!r} is not a pinnable version", "model")


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    summary="OpenAI chat completion",
    responses=STREAMS,
)
async def chat_completions(
    request: Request, body: ChatCompletionRequest, engine: EngineDep, settings: SettingsDep, _: ReadDep
):
    if body.tools:
        raise ApiError(422, "unsupported", "tools (function calling) are not supported", "tools")
    if body.logprobs:
        raise ApiError(422, "unsupported", "logprobs are not supported", "logprobs")
    _check_stream_options(body)
    stop = _stops(body.stop)
    if body.max_completion_tokens is not None:
        max_tokens, max_field = body.max_completion_tokens, "max_completion_tokens"
    else:
        max_tokens, max_field = body.max_tokens or settings.max_new_tokens_limit, "max_tokens"
    loop = asyncio.get_running_loop()
    prompt, template_stops = await loop.run_in_executor(
        engine.executor, render_chat, engine.tokenizer, body.messages
    )
    check_limits(settings, prompt, max_tokens, stop, names=("messages", max_field, "stop"))
    params = _params(body, max_tokens, stop + [s for s in template_stops if s not in stop])
    prepared = await _admit(engine, settings, body, prompt, params, "messages")
    lstrip = bool(template_stops)  # the fallback template: the answer follows "Assistant:"

    cid = "chatcmpl-" + uuid.uuid4().hex[:24]
    base = {
        "id": cid,
        "object": "chat.completion.chunk" if body.stream else "chat.completion",
        "created": int(time.time()),
        "model": body.model,
        "system_fingerprint": f"memfit-v{prepared.version}",
    }
    headers = {"X-Memfit-Version": str(prepared.version)}
    if not body.stream:
        c = await complete(engine, settings, prepared, request)
        message = {"role": "assistant", "content": c.text.lstrip() if lstrip else c.text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": c.finish_reason}
        return JSONResponse({**base, "choices": [choice], "usage": _usage(c)}, headers=headers)

    include_usage = _include_usage(body)
    started = False

    def chunk(delta: dict[str, str], finish: str | None = None) -> dict[str, Any]:
        obj: dict[str, Any] = {
            **base,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            obj["usage"] = None
        return obj

    def render(d: Delta) -> list[dict[str, Any]]:
        nonlocal started, lstrip
        out = []
        if not started:  # OpenAI's first chunk names the role
            started = True
            out.append(chunk({"role": "assistant", "content": ""}))
        text = d.text
        if lstrip and text:
            text = text.lstrip()
            lstrip = not text
        if text:
            out.append(chunk({"content": text}))
        if d.done:
            out.append(chunk({}, d.finish_reason))
            if include_usage:
                out.append({**base, "choices": [], "usage": _usage(d)})
        return out

    deltas = open_stream(engine, settings, prepared, request)  # 503 here when the queue is full
    return event_stream(deltas, render, _in_band_error, headers, b"data: [DONE]\n\n")


@router.post(
    "/completions",
    response_model=CompletionResponse,
    summary="OpenAI text completion",
    responses=STREAMS,
)
async def completions(
    request: Request, body: CompletionRequest, engine: EngineDep, settings: SettingsDep, _: ReadDep
):
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise ApiError(422, "invalid_request", "prompt: exactly one string prompt is supported", "prompt")
        prompt = prompt[0]
    if not prompt:
        raise ApiError(422, "invalid_request", "prompt must not be empty", "prompt")
    if body.echo:
        raise ApiError(422, "unsupported", "echo is not supported", "echo")
    _check_stream_options(body)
    stop = _stops(body.stop)
    max_tokens = body.max_tokens
    if max_tokens is None or "max_tokens" not in body.model_fields_set:
        max_tokens = min(max_tokens or COMPLETION_DEFAULT_TOKENS, settings.max_new_tokens_limit)
    check_limits(settings, prompt, max_tokens, stop, names=("prompt", "max_tokens", "stop"))
    prepared = await _admit(engine, settings, body, prompt, _params(body, max_tokens, stop), "prompt")
    base = {
        "id": "cmpl-" + uuid.uuid4().hex[:24],
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.model,
        "system_fingerprint": f"memfit-v{prepared.version}",
    }
    headers = {"X-Memfit-Version": str(prepared.version)}
    if not body.stream:
        c = await complete(engine, settings, prepared, request)
        choice = {"text": c.text, "index": 0, "logprobs": None, "finish_reason": c.finish_reason}
        return JSONResponse({**base, "choices": [choice], "usage": _usage(c)}, headers=headers)

    include_usage = _include_usage(body)

    def chunk(text: str, finish: str | None) -> dict[str, Any]:
        obj = {**base, "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}
        if include_usage:
            obj["usage"] = None
        return obj

    def render(d: Delta) -> list[dict[str, Any]]:
        if d.done:
            out = [chunk("", d.finish_reason)]
            if include_usage:
                out.append({**base, "choices": [], "usage": _usage(d)})
            return out
        return [chunk(d.text, None)] if d.text else []

    deltas = open_stream(engine, settings, prepared, request)  # 503 here when the queue is full
    return event_stream(deltas, render, _in_band_error, headers, b"data: [DONE]\n\n")
