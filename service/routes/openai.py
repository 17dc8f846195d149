"""OpenAI-compatible /v1/completions and /v1/models (works with the official `openai` client).

Model names: "memfit" is the active version; "memfit@N" pins retained version N. The memfit fields
`min_version` / `version` / `top_k` are accepted (the client's `extra_body`; declared and bounded in
the schema, other unknown fields are ignored). The answering version is in the
`X-Memfit-Version` header and in `system_fingerprint` ("memfit-v{N}").
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from model_store import StoreError
from service.deps import EngineDep, SettingsDep, StoreDep
from service.engine import SamplingParams
from service.errors import ApiError
from service.routes.generate import admit, check_limits, complete, open_stream, sse, stream_error
from service.schemas import CompletionRequest, CompletionResponse, ModelCard, ModelList
from service.security import Principal, require_role

router = APIRouter(prefix="/v1", tags=["openai"])
# OpenAPI < 3.2: the schema of an event stream describes one event
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "description": "each `data` a JSON completion chunk, the last one `[DONE]`",
        },
        "event": {"type": "string"},
    },
}
ReadDep = Annotated[Principal, Depends(require_role("read"))]
MODEL = "memfit"
_PINNED = re.compile(r"^memfit@(\d{1,18})$")


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


@router.get("/models", response_model=ModelList, summary="Models: 'memfit' and each retained version")
def list_models(store: StoreDep, _: ReadDep) -> ModelList:
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
    return ModelList(data=cards)


@router.post(
    "/completions",
    response_model=CompletionResponse,
    summary="OpenAI text completion",
    responses={
        200: {
            "description": "JSON, or `text/event-stream` (ending with `data: [DONE]`) when stream is true",
            "content": {"text/event-stream": {"schema": SSE_EVENT}},
        }
    },
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
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if any(s == "" for s in stop):
        raise ApiError(422, "invalid_request", "stop sequences must not be empty", "stop")
    max_tokens = body.max_tokens or 16
    if "max_tokens" not in body.model_fields_set:
        max_tokens = min(max_tokens, settings.max_new_tokens_limit)
    check_limits(settings, prompt, max_tokens, stop, names=("prompt", "max_tokens", "stop"))
    pinned = parse_model(body.model)
    version = body.version
    if pinned is not None:
        version = pinned
    min_version = body.min_version
    params = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        stop=stop,
        seed=body.seed,
    )
    prepared = await admit(
        engine, settings, prompt, params, version, min_version, "model" if pinned is not None else "version"
    )
    cid = "cmpl-" + uuid.uuid4().hex[:24]
    created = int(time.time())
    fingerprint = f"memfit-v{prepared.version}"
    headers = {"X-Memfit-Version": str(prepared.version)}
    if not body.stream:
        c = await complete(engine, settings, prepared, request)
        out = {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": body.model,
            "system_fingerprint": fingerprint,
            "choices": [{"text": c.text, "index": 0, "logprobs": None, "finish_reason": c.finish_reason}],
            "usage": {
                "prompt_tokens": c.prompt_tokens,
                "completion_tokens": c.completion_tokens,
                "total_tokens": c.prompt_tokens + c.completion_tokens,
            },
        }
        return JSONResponse(out, headers=headers)

    def chunk(text: str, finish: str | None, usage: dict | None = None) -> bytes:
        obj = {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": body.model,
            "system_fingerprint": fingerprint,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
        }
        if usage is not None:
            obj["usage"] = usage
        return sse(obj)

    deltas = open_stream(engine, settings, prepared, request)  # 503 here when the queue is full

    async def events() -> AsyncIterator[bytes]:
        try:
            async for d in deltas:
                if d.done:
                    usage = {
                        "prompt_tokens": d.prompt_tokens,
                        "completion_tokens": d.completion_tokens,
                        "total_tokens": d.prompt_tokens + d.completion_tokens,
                    }
                    yield chunk("", d.finish_reason, usage)
                elif d.text:
                    yield chunk(d.text, None)
        except Exception as e:  # the status line is sent already: report in-band
            error = stream_error(e)
            error["type"] = (
                "server_error" if not isinstance(e, ApiError) or e.status >= 500 else "invalid_request_error"
            )
            yield sse({"error": error})
        yield b"data: [DONE]\n\n"

    headers.update({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
