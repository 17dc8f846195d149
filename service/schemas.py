"""Request and response schemas of the HTTP API (docs/contracts.md "HTTP"), with examples for /openapi.json.

Static bounds live here; bounds that come from Settings (max documents per request, max prompt
characters, ...) are checked in the routes so that they follow the running configuration, and their
errors name the setting.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.errors import ID_PATTERN

# Static upper bounds of integer request fields: a value past one is a 422 naming the field, never a
# value that a later step refuses (torch.Generator().manual_seed(2**64) raises, in a decoding thread).
MAX_INT64 = 2**63 - 1  # seeds and version ids
MAX_TOKENS = 1_000_000  # max_new_tokens / max_tokens (the running limit is max_new_tokens_limit)
MAX_TOP_K = 1_000_000  # above any vocabulary
MAX_TOP_T = 10_000_000  # memory slots (the route checks the model's own memory size)
MAX_UPDATE_STEPS = 10_000  # optimizer steps of one job (the job time limit bounds it too)
MAX_UPDATE_LR = 100_000.0  # 10x the default SGD lr (10000, scaled down per row by its IDF)

JobStatus = Literal["queued", "running", "succeeded", "rejected", "failed", "cancelled"]
VersionState = Literal["active", "retained", "rejected"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- errors -------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    code: str = Field(..., description="machine-readable: limit_exceeded, job_not_found, ...")
    message: str = Field(..., description="what went wrong, with the numbers and the limit")
    field: str | None = Field(None, description="the request field, header or setting at fault")


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body (docs/contracts.md "HTTP"): `{"error": {"code", "message", "field"}}`."""

    error: ErrorDetail


class OpenAIErrorDetail(BaseModel):
    message: str = Field(..., description="what went wrong, with the numbers and the limit")
    type: str = Field(
        ...,
        description="invalid_request_error, authentication_error, permission_error, rate_limit_error, server_error",
    )
    param: str | None = Field(None, description="the request field, header or setting at fault")
    code: str = Field(..., description="memfit's machine-readable code: limit_exceeded, model_not_found, ...")
    field: str | None = Field(None, description="the same as param (memfit's own error shape)")


class OpenAIErrorResponse(BaseModel):
    """Every 4xx/5xx body under /v1: OpenAI's `{"error": {"message", "type", "param", "code"}}`."""

    error: OpenAIErrorDetail


# ---- ingest -------------------------------------------------------------------------------------


class Fact(_Strict):
    question: str = Field(min_length=1, max_length=2000, description="a question the document answers")
    answer: str = Field(min_length=1, max_length=2000, description="its short answer")
    heldout_question: str | None = Field(
        None, max_length=2000, description="optional other wording, used only to measure learning"
    )


class Document(_Strict):
    id: str | None = Field(
        None, pattern=ID_PATTERN, description="document id (letters, digits, . _ : -); generated when absent"
    )
    text: str = Field(min_length=1, description="the text to learn")
    facts: list[Fact] = Field(default_factory=list, description="question/answer pairs it teaches (optional)")
    metadata: dict[str, Any] = Field(default_factory=dict, description="free-form, stored with the document")


class UpdateOverrides(_Strict):
    """Per-job overrides of the update settings (memlm.updater.UpdateSettings) that a write key may set.

    An allow-list, each field bounded: any other name (including the trainer's internal fields such as
    `adam_eps`) and any value out of range is a 422 naming `settings.<field>`. The bounds keep one job's
    memory and compute within what a replica or worker can take (batch_size x max_seq_len tokens per
    step, paraphrases / question_rewrites / replay multiply the examples); `steps` is bounded again by
    the job time limit (MEMFIT_TASK_TIME_LIMIT_S). `method` "all" (every slot, the dense baseline) is
    not offered: it breaks the sparse-update guarantee."""

    top_t: int | None = Field(
        None, ge=1, le=MAX_TOP_T, description="memory slots trained (paper: 500 for facts)"
    )
    steps: int | None = Field(None, ge=1, le=MAX_UPDATE_STEPS, description="optimizer steps")
    lr: float | None = Field(
        None,
        gt=0,
        le=MAX_UPDATE_LR,
        description="learning rate (plain SGD; default 10000 with idf_lr_power 1)",
    )
    optimizer: Literal["sgd", "adam"] | None = Field(None, description="plain SGD or a row-local Adam")
    method: Literal["tfidf", "tf", "random"] | None = Field(None, description="slot ranking")
    batch_size: int | None = Field(None, ge=1, le=64, description="sequences per step")
    loss_reduction: Literal["sum", "mean"] | None = None
    early_stop: bool | None = Field(None, description="stop once every fact of the update is answered")
    check_every: int | None = Field(None, ge=1, le=1000, description="steps between early-stop checks")
    extra_steps: int | None = Field(None, ge=0, le=1000, description="steps after the early stop fires")
    grad_clip: float | None = Field(None, gt=0, le=1e6, description="clip the rows' gradient norm")
    max_row_change: float | None = Field(None, gt=0, le=1000, description="cap each row's change / its norm")
    max_df: float | None = Field(
        None, gt=0, le=1, description="never select slots read by more of the background"
    )
    idf_lr_power: float | None = Field(
        None, ge=0, le=8, description="row step scaled by (idf / idf_max) ** this"
    )
    replay: int | None = Field(None, ge=0, le=256, description="background sequences kept by a KL term")
    replay_weight: float | None = Field(None, ge=0, le=1000, description="weight of that KL term")
    seed: int | None = Field(None, ge=0, le=MAX_INT64, description="random-t selection and paraphrase order")
    max_seq_len: int | None = Field(None, ge=16, le=512, description="tokens per training example")
    paraphrases: int | None = Field(None, ge=0, le=8, description="model-free paraphrases per chunk")
    question_rewrites: int | None = Field(None, ge=0, le=16, description="training wordings per fact")
    train_text: bool | None = Field(None, description="train a document's text too when it has facts")


class IngestRequest(_Strict):
    documents: list[Document] = Field(min_length=1, description="documents to teach the model")
    settings: UpdateOverrides | None = Field(None, description="update settings for this job")

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "documents": [
                        {
                            "id": "doc-42",
                            "text": "The capital of Zorbania is Quillton.",
                            "facts": [{"question": "What is the capital of Zorbania?", "answer": "Quillton"}],
                            "metadata": {"source": "wiki"},
                        }
                    ],
                    "settings": {"top_t": 500, "steps": 30},
                }
            ]
        },
    )


class IngestResponse(BaseModel):
    job_id: str = Field(examples=["j_3f2a9c0d1e2b4a5c"])
    status: JobStatus = Field(examples=["queued"])
    documents: list[str] = Field(default_factory=list, examples=[["doc-42"]])
    dispatch: Literal["sent", "pending"] | None = Field(
        None,
        examples=["sent"],
        description='"sent": handed to the update runner / queue; "pending": recorded, but the update '
        "queue (Redis) is unreachable: the replicas' sweep sends it once Redis answers; null on an "
        "Idempotent-Replayed answer (this request dispatched nothing)",
    )


# ---- jobs ---------------------------------------------------------------------------------------


class JobOut(BaseModel):
    job_id: str
    status: JobStatus
    version: int | None = Field(None, description="the version this job published (also when rejected)")
    parent: int | None = Field(None, description="the version it was trained from")
    documents: list[str] = Field(default_factory=list)
    settings: dict[str, Any] = Field(default_factory=dict)
    timings: dict[str, Any] = Field(
        default_factory=dict, description="seconds: queued, training, evaluation, publish, total"
    )
    evaluation: dict[str, Any] = Field(default_factory=dict)
    progress: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None
    created_at: float | None = None
    updated_at: float | None = None
    attempts: int = 0
    request_id: str | None = Field(None, description="X-Request-ID of the ingest that created the job")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "job_id": "j_3f2a9c0d1e2b4a5c",
                    "status": "succeeded",
                    "version": 7,
                    "parent": 6,
                    "documents": ["doc-42"],
                    "settings": {},
                    "timings": {
                        "queued": 0.01,
                        "training": 2.1,
                        "evaluation": 0.6,
                        "publish": 0.05,
                        "total": 2.8,
                    },
                    "evaluation": {"learning": 1.0, "forgetting": 0.0, "perplexity_change": 0.002},
                    "progress": {"phase": "done"},
                    "error": None,
                    "created_at": 1764115200.0,
                    "updated_at": 1764115203.0,
                    "attempts": 1,
                }
            ]
        }
    )


class JobList(BaseModel):
    jobs: list[JobOut]


# ---- generation -------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class GenerateRequest(_Strict):
    prompt: str = Field(min_length=1, description="text to continue")
    max_new_tokens: int = Field(
        32, ge=1, le=MAX_TOKENS, description="tokens to generate at most (bounded by max_new_tokens_limit)"
    )
    temperature: float = Field(0.0, ge=0.0, le=10.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    top_k: int = Field(0, ge=0, le=MAX_TOP_K, description="0 = no top-k cut")
    stop: list[str] = Field(default_factory=list, description="stop sequences (not included in the text)")
    seed: int | None = Field(None, ge=0, le=MAX_INT64, description="sampling seed (reproducible output)")
    stream: bool = Field(False, description="server-sent events: {token} events, then {done: true, ...}")
    min_version: int | None = Field(
        None,
        ge=0,
        le=MAX_INT64,
        description="wait (bounded) until this version is in this replica's active chain",
    )
    version: int | None = Field(
        None, ge=0, le=MAX_INT64, description="serve with this retained version (row overlay)"
    )

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("stop")
    @classmethod
    def _nonempty_stop(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError("stop sequences must not be empty")
        return v

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "prompt": "Question: What is the capital of Zorbania?\nAnswer:",
                    "max_new_tokens": 16,
                    "stop": ["\n"],
                },
                {
                    "prompt": "The capital of France is",
                    "temperature": 0.7,
                    "top_p": 0.9,
                    "seed": 1,
                    "stream": True,
                },
            ]
        },
    )


class GenerateResponse(BaseModel):
    text: str
    version: int
    finish_reason: Literal["stop", "length"]
    usage: Usage

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "text": " Quillton",
                    "version": 7,
                    "finish_reason": "stop",
                    "usage": {"prompt_tokens": 14, "completion_tokens": 3},
                }
            ]
        }
    )


# ---- versions ---------------------------------------------------------------------------------


class VersionOut(BaseModel):
    id: int
    parent: int | None
    created_at: float | str | None = None
    job_id: str | None = None
    documents: list[str] = Field(default_factory=list)
    slots_changed: int = 0
    reach: float | None = Field(
        None,
        description="share of the gate's probe prompts (prompt + greedy answer under the parent) that read "
        "a memory row this version changed; probes outside it answer bit-identically (None: not measured)",
    )
    evaluation: dict[str, Any] = Field(default_factory=dict)
    active: bool = False
    state: VersionState
    label: str | None = None

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": 7,
                    "parent": 6,
                    "created_at": 1764115203.0,
                    "job_id": "j_3f2a9c0d1e2b4a5c",
                    "documents": ["doc-42"],
                    "slots_changed": 500,
                    "reach": 0.05,
                    "evaluation": {"learning": 1.0, "forgetting": 0.0},
                    "active": True,
                    "state": "active",
                    "label": None,
                }
            ]
        }
    )


class VersionList(BaseModel):
    active: int
    versions: list[VersionOut]


class ActivateRequest(_Strict):
    why: str | None = Field(None, max_length=500, description="recorded in the activation log")
    force: bool = Field(False, description="activate a version the evaluation gate rejected, anyway")


class ActivateResponse(BaseModel):
    active: int = Field(examples=[6])
    previous: int = Field(examples=[7])


class RevertRequest(_Strict):
    why: str | None = Field(None, max_length=500)


class RevertResponse(BaseModel):
    document: str
    status: Literal["reverted", "queued"]
    version: int | None = Field(None, description="the new active version (exact revert)")
    job_id: str | None = Field(None, description="the retrain job (document shared its version)")


# ---- health -----------------------------------------------------------------------------------


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    ready: bool
    model_loaded: bool
    store_readable: bool
    active_version: int | None = None
    mode: Literal["embedded", "distributed"] = "embedded"
    redis: str | None = Field(None, description="'ok', an error, or null when not configured")
    device: str | None = Field(
        None, description="where the model runs (MEMFIT_DEVICE resolved): cpu, cuda, cuda:N"
    )
    detail: str | None = None


# ---- OpenAI-compatible ------------------------------------------------------------------------


class StreamOptions(BaseModel):
    """OpenAI's `stream_options` (read only when `stream` is true)."""

    model_config = ConfigDict(extra="ignore")

    include_usage: bool | None = Field(
        None, description="end the stream with one more chunk: `usage`, and `choices` empty"
    )


class _MemfitExtras(BaseModel):
    """memfit's fields on the OpenAI requests (the openai client's extra_body), one definition for both."""

    top_k: int | None = Field(None, ge=0, le=MAX_TOP_K, description="memfit: top-k cut (0 or null = none)")
    version: int | None = Field(
        None, ge=0, le=MAX_INT64, description="memfit: serve with this retained version (as model memfit@N)"
    )
    min_version: int | None = Field(
        None, ge=0, le=MAX_INT64, description="memfit: wait (bounded) until this version is served here"
    )


class CompletionRequest(_MemfitExtras):
    """The subset of OpenAI's /v1/completions this server honours; unknown fields are ignored."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [{"model": "memfit", "prompt": "The capital of France is", "max_tokens": 16}]
        },
    )

    model: str = Field(description="'memfit' (the active version) or 'memfit@N' (retained version N)")
    prompt: str | list[str] = Field(description="one prompt (a list of one is accepted)")
    max_tokens: int | None = Field(16, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    n: int | None = Field(1, ge=1, le=1, description="only 1 is supported")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_INT64)
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=0, description="not supported")
    best_of: int | None = Field(None, ge=1, le=1, description="only 1 is supported")
    suffix: str | None = Field(None, max_length=0, description="not supported")
    user: str | None = None


class CompletionChoice(BaseModel):
    text: str
    index: int = 0
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None
    system_fingerprint: str | None = Field(None, description="memfit-v{version}: the version that answered")


CHAT_ROLES = ("system", "developer", "user", "assistant")


def _content_text(v: Any) -> Any:
    """A message's content as one string: OpenAI's list of parts is accepted when all are text."""
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, list):
        texts = []
        for i, part in enumerate(v):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"part {i} is {kind!r}: only text parts are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise ValueError("content must be a string or a list of text parts")


class ChatMessage(BaseModel):
    """One message of a chat; `developer` is read as `system`. Tool messages are not supported."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | None = Field(
        None, description='a string, or a list of {"type": "text", "text"} parts (joined)'
    )
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text(cls, v: Any) -> Any:
        return _content_text(v)


class ChatCompletionRequest(_MemfitExtras):
    """The subset of OpenAI's /v1/chat/completions this server honours; unknown fields are ignored."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [
                {
                    "model": "memfit",
                    "messages": [{"role": "user", "content": "Where was Goju Theipouquis born?"}],
                    "max_tokens": 16,
                },
                {
                    "model": "memfit@3",
                    "messages": [{"role": "user", "content": "Hi"}],
                    "stream": True,
                    "stream_options": {"include_usage": True},
                },
            ]
        },
    )

    model: str = Field(description="'memfit' (the active version) or 'memfit@N' (retained version N)")
    messages: list[ChatMessage] = Field(min_length=1, description="the conversation so far")
    max_tokens: int | None = Field(
        None, ge=1, le=MAX_TOKENS, description="tokens to generate at most (default: max_new_tokens_limit)"
    )
    max_completion_tokens: int | None = Field(
        None, ge=1, le=MAX_TOKENS, description="the newer name of max_tokens (wins when both are given)"
    )
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    n: int | None = Field(1, ge=1, le=1, description="only 1 is supported")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_INT64)
    presence_penalty: float | None = Field(0.0, ge=0.0, le=0.0, description="not supported (0 only)")
    frequency_penalty: float | None = Field(0.0, ge=0.0, le=0.0, description="not supported (0 only)")
    logprobs: bool | None = Field(False, description="not supported (false only)")
    top_logprobs: int | None = Field(None, ge=0, le=0, description="not supported")
    tools: list[dict[str, Any]] | None = Field(None, description="not supported (absent or empty only)")
    user: str | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage
    system_fingerprint: str | None = Field(None, description="memfit-v{version}: the version that answered")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "memfit"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
