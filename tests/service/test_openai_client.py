"""The OpenAI-compatible routes through the official `openai` client, against a live uvicorn server.

One app (no update runner) runs in a uvicorn thread on a free port for the module; versions are
published straight into its store with synthetic deltas (nothing trains). Covered: chat and text
completions, plain and streamed, `stream_options.include_usage` on and off, the chat template
(the fallback, and a tokenizer's own), /v1/models with pinnable versions, and errors in OpenAI's
shape arriving as the client's exception classes with the field in `param`: 404, 409, 422, in-band
stream errors, and (an app with keys, over an in-process transport) 401 for no or an unknown key, 429
for a spent rate limit, 405, 413 and an unknown route.
"""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn

from memfit.config import Settings
from memlm.delta import LayerDelta, SlotDelta
from service.app import create_app
from service.routes.openai import FALLBACK_STOPS, render_chat
from service.schemas import ChatMessage
from tests.conftest import free_port

LIMIT = 20  # max_new_tokens_limit of the server
CHAT = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "What is the capital of France?"},
]
OPENAI_ERROR_KEYS = {"message", "type", "param", "code"}


def publish(store, state: str) -> int:
    """A version rewriting a few value rows with noise, not activated (`state`: "active" for a retained one, or "rejected")."""
    parent = store.active()
    idx = torch.arange(4, dtype=torch.int64)
    layers = {}
    for layer in store.table_info:
        old = store.rows_at(parent, {layer: idx})[layer]
        layers[layer] = LayerDelta(idx, old + torch.randn_like(old) * 5.0, old)
    return store.publish(SlotDelta(layers), parent, documents=[], activate=False, state=state)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    settings = Settings(
        model=tiny_model_dir,
        store=tmp_path_factory.mktemp("openai") / "store",
        redis_url=None,
        api_keys=None,
        api_keys_file=None,
        rate_limit_per_minute=0,
        max_new_tokens_limit=LIMIT,
        max_stop_sequences=2,
        follow_interval_s=0.05,
    )
    app = create_app(settings, start_runner=False)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, name="uvicorn-openai-test", daemon=True)
    thread.start()
    deadline = time.time() + 180
    while not srv.started:
        assert thread.is_alive() and time.time() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    retained = publish(app.state.store, "active")  # published, not activated: retained
    rejected = publish(app.state.store, "rejected")
    yield {"app": app, "url": f"http://127.0.0.1:{port}", "retained": retained, "rejected": rejected}
    srv.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def chat(client, **kw):
    args = {"model": "memfit", "messages": CHAT, "max_tokens": 8, "temperature": 0, **kw}
    return client.chat.completions.create(**args)


def complete(client, **kw):
    args = {"model": "memfit", "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0, **kw}
    return client.completions.create(**args)


# ---- chat ---------------------------------------------------------------------------------------


def test_chat_plain(server, client):
    r = chat(client)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.model == "memfit" and r.system_fingerprint == "memfit-v0"
    (choice,) = r.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert not any(s in choice.message.content for s in FALLBACK_STOPS)
    assert choice.message.content == choice.message.content.lstrip()
    # the fallback template (the tiny model's tokenizer has no chat template)
    prompt = "System: You answer in one word.\nUser: What is the capital of France?\nAssistant:"
    tokenizer = server["app"].state.engine.tokenizer
    assert r.usage.prompt_tokens == len(tokenizer.encode(prompt, add_special_tokens=False))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert 0 < r.usage.completion_tokens <= 8


def test_chat_stream_without_usage(client):
    plain = chat(client)
    chunks = list(chat(client, stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.usage is None for c in chunks)
    assert all(len(c.choices) == 1 for c in chunks)  # no usage chunk when not asked
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason


def test_chat_stream_include_usage(client):
    plain = chat(client)
    chunks = list(chat(client, stream=True, stream_options={"include_usage": True}))
    *body, last = chunks
    assert last.choices == [] and last.usage is not None
    assert last.usage.model_dump() == plain.usage.model_dump()
    assert all(c.usage is None and len(c.choices) == 1 for c in body)
    assert body[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert "".join(c.choices[0].delta.content or "" for c in body) == plain.choices[0].message.content
    # include_usage false is the same as not asking
    off = list(chat(client, stream=True, stream_options={"include_usage": False}))
    assert all(c.usage is None and len(c.choices) == 1 for c in off)


def test_chat_text_parts_and_max_completion_tokens(client):
    parts = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is the capital "},
                {"type": "text", "text": "of France?"},
            ],
        }
    ]
    joined = [{"role": "user", "content": "What is the capital of France?"}]
    a = chat(client, messages=parts, max_tokens=None, max_completion_tokens=3)
    b = chat(client, messages=joined, max_tokens=3)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.model_dump() == b.usage.model_dump() and a.usage.completion_tokens <= 3


def test_chat_uses_the_tokenizers_template(server, client):
    tokenizer = server["app"].state.engine.tokenizer
    template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    messages = [ChatMessage(role="developer", content="Be brief."), ChatMessage(role="user", content="Hi")]
    assert render_chat(tokenizer, messages) == (
        "System: Be brief.\nUser: Hi\nAssistant:",
        list(FALLBACK_STOPS),
    )
    tokenizer.chat_template = template
    try:
        prompt, stops = render_chat(tokenizer, messages)
        assert prompt == "<system>Be brief.</system>\n<user>Hi</user>\n<assistant>" and stops == []
        r = chat(client, messages=[m.model_dump(exclude_none=True) for m in messages], max_tokens=2)
        assert r.usage.prompt_tokens == len(tokenizer.encode(prompt, add_special_tokens=False))
    finally:
        tokenizer.chat_template = None


# ---- completions --------------------------------------------------------------------------------


def test_completions_plain_and_streamed(client):
    plain = complete(client)
    assert plain.object == "text_completion" and plain.system_fingerprint == "memfit-v0"
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    chunks = list(complete(client, stream=True))
    assert all(c.usage is None and len(c.choices) == 1 for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason

    *body, last = complete(client, stream=True, stream_options={"include_usage": True})
    assert last.choices == [] and last.usage.model_dump() == plain.usage.model_dump()
    assert "".join(c.choices[0].text for c in body) == plain.choices[0].text
    assert all(c.usage is None for c in body)


# ---- models and pinning -------------------------------------------------------------------------


def test_models_list_the_pinnable_versions(server, client):
    ids = [m.id for m in client.models.list()]
    assert ids[0] == "memfit"
    assert "memfit@0" in ids and f"memfit@{server['retained']}" in ids
    assert f"memfit@{server['rejected']}" not in ids  # rejected by the gate: not servable
    card = client.models.retrieve(f"memfit@{server['retained']}")
    assert card.id == f"memfit@{server['retained']}" and card.owned_by == "memfit"

    pinned = chat(client, model=f"memfit@{server['retained']}")
    assert pinned.model == f"memfit@{server['retained']}"
    assert pinned.system_fingerprint == f"memfit-v{server['retained']}"
    streamed = list(complete(client, model=f"memfit@{server['retained']}", stream=True))
    assert {c.system_fingerprint for c in streamed} == {f"memfit-v{server['retained']}"}

    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4")
    assert e.value.param == "model" and e.value.code == "model_not_found"
    with pytest.raises(openai.ConflictError) as e:
        chat(client, model=f"memfit@{server['rejected']}")
    assert e.value.param == "model" and e.value.code == "version_rejected"


# ---- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, kw, status, param",
    [
        (chat, {"max_tokens": 0}, 422, "max_tokens"),
        (chat, {"max_tokens": LIMIT + 1}, 422, "max_tokens"),  # over max_new_tokens_limit
        (chat, {"max_tokens": None, "max_completion_tokens": LIMIT + 1}, 422, "max_completion_tokens"),
        (chat, {"messages": []}, 422, "messages"),
        (chat, {"messages": [{"role": "tool", "content": "x"}]}, 422, "messages[0].role"),
        (
            chat,
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            422,
            "messages[0].content",
        ),
        (chat, {"n": 2}, 422, "n"),
        (chat, {"stop": ["a", "b", "c"]}, 422, "stop"),  # over max_stop_sequences
        (chat, {"temperature": 3}, 422, "temperature"),
        (chat, {"model": "gpt-4"}, 404, "model"),
        (chat, {"stream": True, "max_tokens": 0}, 422, "max_tokens"),
        (complete, {"max_tokens": 0}, 422, "max_tokens"),
        (complete, {"max_tokens": LIMIT + 1}, 422, "max_tokens"),
        (complete, {"stream": True, "seed": 2**64}, 422, "seed"),
        # OpenAI refuses stream_options when not streaming
        (chat, {"stream_options": {"include_usage": True}}, 422, "stream_options"),
        (complete, {"stream_options": {"include_usage": False}}, 422, "stream_options"),
    ],
)
def test_errors_arrive_as_the_clients_exceptions(client, call, kw, status, param):
    with pytest.raises(openai.APIStatusError) as e:
        result = call(client, **kw)
        list(result)  # a stream would raise on reading
    err = e.value
    assert err.status_code == status, err
    assert isinstance(err, openai.UnprocessableEntityError if status == 422 else openai.NotFoundError)
    assert err.param == param, err.body
    assert err.type == "invalid_request_error" and err.code
    assert OPENAI_ERROR_KEYS <= set(err.body) and err.body["message"] in err.message


def test_error_shapes_per_route_family(server):
    with httpx.Client(base_url=server["url"], timeout=30) as c:
        r = c.post("/v1/chat/completions", json={"model": "memfit", "messages": CHAT, "max_tokens": 0})
        assert r.status_code == 422
        body = r.json()
        assert set(body) == {"error"} and OPENAI_ERROR_KEYS <= set(body["error"])
        assert body["error"]["param"] == "max_tokens" and body["error"]["type"] == "invalid_request_error"
        r = c.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and OPENAI_ERROR_KEYS <= set(r.json()["error"])
        r = c.get("/v1/nothing-here")
        assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
        # routes outside /v1 keep memfit's shape
        r = c.post("/generate", json={"prompt": "Hi", "max_new_tokens": 0})
        assert r.status_code == 422
        assert r.json() == {
            "error": {
                "code": "invalid_request",
                "message": r.json()["error"]["message"],
                "field": "max_new_tokens",
            }
        }
        assert c.get("/jobs/j_missing").json()["error"].keys() == {"code", "message", "field"}


def test_error_in_a_started_stream_is_raised_by_the_client(server, client):
    settings = server["app"].state.settings
    before = settings.request_timeout_s
    settings.request_timeout_s = 1e-9  # the deadline passes once the status line is sent
    try:
        with pytest.raises(openai.APIError) as e:
            list(chat(client, stream=True))
    finally:
        settings.request_timeout_s = before
    assert not isinstance(e.value, openai.APIStatusError)  # in-band: the status was 200
    assert e.value.code == "deadline_exceeded" and e.value.type == "server_error"
    assert "request_timeout_s" in e.value.message


def test_openapi_documents_the_openai_routes(server):
    spec = httpx.get(server["url"] + "/openapi.json", timeout=30).json()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/models/{model}"):
        assert path in spec["paths"], path
    chat_op = spec["paths"]["/v1/chat/completions"]["post"]
    assert "text/event-stream" in chat_op["responses"]["200"]["content"]
    ref = chat_op["responses"]["422"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.endswith("/OpenAIErrorResponse")
    assert spec["components"]["schemas"]["ChatCompletionRequest"].get("examples")
    generate_422 = spec["paths"]["/generate"]["post"]["responses"]["422"]["content"]["application/json"]
    assert generate_422["schema"]["$ref"].endswith("/ErrorResponse")


# ---- keys, limits and methods: the same shape, the client's exception classes ------------------


@pytest.fixture(scope="module")
def keyed(tiny_model_dir, tmp_path_factory):
    """An app with API keys and a one-request-a-minute bucket, called through the client over an
    in-process transport (TestClient is an httpx.Client)."""
    from fastapi.testclient import TestClient

    settings = Settings(
        model=tiny_model_dir,
        store=tmp_path_factory.mktemp("openai-keyed") / "store",
        redis_url=None,
        api_keys='{"k-read": "read", "k-spent": "read"}',
        api_keys_file=None,
        rate_limit_per_minute=1,
        max_new_tokens_limit=LIMIT,
        max_request_bytes=4000,
    )
    app = create_app(settings, start_runner=False)
    with TestClient(app, raise_server_exceptions=False) as http:
        yield lambda key: openai.OpenAI(
            base_url="http://testserver/v1", api_key=key, max_retries=0, http_client=http
        )


def assert_openai_error(err: openai.APIStatusError, status: int, type_: str, code: str, param) -> None:
    assert err.status_code == status, err
    assert set(err.response.json()) == {"error"} and OPENAI_ERROR_KEYS <= set(err.body), err.body
    assert (err.type, err.code, err.param) == (type_, code, param), err.body


def test_auth_errors_under_v1_are_openais(keyed):
    ok = chat(keyed("k-read"), max_tokens=2)  # the key works: the errors below are the key's
    assert ok.choices[0].finish_reason in ("stop", "length")
    for call in (chat, complete, lambda c: c.models.list()):
        with pytest.raises(openai.AuthenticationError) as e:
            call(keyed("not-a-key"))
        assert_openai_error(e.value, 401, "authentication_error", "unauthorized", "Authorization")
        assert e.value.response.headers["WWW-Authenticate"] == "Bearer"
    with pytest.raises(openai.AuthenticationError) as e:  # no key sent at all
        list(chat(keyed("unused"), stream=True, extra_headers={"Authorization": openai.Omit()}))
    assert_openai_error(e.value, 401, "authentication_error", "unauthorized", "Authorization")


def test_rate_limit_under_v1_is_openais(keyed):
    client = keyed("k-spent")
    client.models.list()  # the bucket's one request
    with pytest.raises(openai.RateLimitError) as e:
        chat(client)
    assert_openai_error(e.value, 429, "rate_limit_error", "rate_limited", "rate_limit_per_minute")
    assert int(e.value.response.headers["Retry-After"]) >= 1


def test_method_body_size_and_route_errors_under_v1_are_openais(keyed):
    client = keyed("k-read")
    with pytest.raises(openai.APIStatusError) as e:
        client.delete("/models", cast_to=object)
    assert_openai_error(e.value, 405, "invalid_request_error", "method_not_allowed", None)
    with pytest.raises(openai.NotFoundError) as e:
        client.get("/embeddings", cast_to=object)
    assert_openai_error(e.value, 404, "invalid_request_error", "not_found", None)
    with pytest.raises(openai.APIStatusError) as e:
        chat(client, messages=[{"role": "user", "content": "x" * 5000}])
    assert_openai_error(e.value, 413, "invalid_request_error", "payload_too_large", "max_request_bytes")
