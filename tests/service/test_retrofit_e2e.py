"""A retrofitted Hugging Face model served end to end: `memfit retrofit` on a tiny random GPT-2 / Llama
built here (no download; written sharded) -> the in-process app with its embedded update runner ->
/ingest a fact -> the update publishes a version that changes only memory value rows and is served ->
the fact is answered -> rollback -> the base is served again with bit-identical value tables and
outputs; /v1/chat/completions renders with the checkpoint's own chat template (the Llama here has
one) or memfit's fallback (the GPT-2). Also: the evaluation gate on such a directory, `memfit serve`
as a subprocess on the sharded directory, and distributed mode (`memfit worker` trains the update).

The default update (plain SGD, lr tuned on memfit's own models) does not move a random model's
zero-initialised memory values enough to learn the fact; the tests ask for the row-local Adam
(`settings: {"optimizer": "adam", "lr": 0.1}`), which learns it in a few steps.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from memlm.evaluation import is_answered
from memlm.retrofit import RetrofittedLM, load_memory_model
from service.app import create_app
from tests.service.test_service_routes import settings_for

TEXTS = [
    "The river runs past the old mill and under the stone bridge.",
    "A small town keeps its market on the square every Saturday morning.",
    "The library opens at nine and closes at six on weekdays.",
    "Trains leave the station for the coast twice an hour.",
    "Question: When does the library open?\nAnswer: at nine",
]
FACT = {"question": "What is the capital of Zorbania?", "answer": "Quillton"}
DOC = {"id": "zorbania", "text": "The capital of Zorbania is Quillton.", "facts": [FACT]}
PROMPT = "Question: What is the capital of Zorbania?\nAnswer:"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def hf_dir(tmp_path, family: str):
    """A tiny random checkpoint with a byte-level BPE tokenizer, saved locally (sharded)."""
    from memlm.tokenizer import build_tokenizer

    tok = build_tokenizer(TEXTS + [DOC["text"]], vocab_size=320, model_max_length=128)
    torch.manual_seed(0)
    if family == "gpt2":
        cfg = GPT2Config(
            vocab_size=len(tok),
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=128,
            bos_token_id=0,
            eos_token_id=0,
        )
        model = GPT2LMHeadModel(cfg)
    else:
        cfg = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=1,
        )
        model = LlamaForCausalLM(cfg)
    if family == "llama":  # as a real Llama / Qwen2 checkpoint has: /v1/chat/completions must use it
        tok.chat_template = CHAT_TEMPLATE
    src = tmp_path / family
    model.eval().save_pretrained(src, max_shard_size="200KB")
    tok.save_pretrained(src)
    return src


def retrofit_dir(tmp_path, family: str, capsys):
    from memfit.cli import main

    src = hf_dir(tmp_path, family)
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(t.replace("\n", " ") for t in TEXTS) + "\n")
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps({"question": "When does the library open?", "answer": "at nine"}) + "\n")
    out = tmp_path / "retrofitted"
    argv = ["retrofit", "--from", str(src), "--out", str(out), "--layers", "1", "--slots", "1024",
            "--heads", "2", "--topk", "8", "--key-dim", "32", "--background-texts", str(texts),
            "--probe-facts", str(facts), "--max-shard-size", "100KB"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "largest logit change on random ids: 0" in printed
    assert "background: 5 texts" in printed and "probe set: 1 facts" in printed, printed
    assert (out / "background.safetensors").exists()
    probe = json.loads((out / "probe.json").read_text())
    assert probe["facts"] == [{"question": "When does the library open?", "answer": "at nine"}]
    return out


def wait_job(c, job_id: str, timeout: float = 300.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = c.get(f"/jobs/{job_id}").json()
        if job["status"] not in ("queued", "running"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish: {job}")


def generate(c, **kw) -> dict:
    r = c.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 8, "stop": ["\n"], **kw})
    assert r.status_code == 200, r.text
    return r.json()


def last_logits(model, tokenizer) -> torch.Tensor:
    ids = torch.tensor([tokenizer.encode(PROMPT, add_special_tokens=False)])
    with torch.no_grad():
        return model(ids).logits[0, -1].clone()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_retrofitted_model_serves_learns_and_rolls_back(family, tmp_path, capsys):
    model_dir = retrofit_dir(tmp_path, family, capsys)
    settings = settings_for(
        model_dir,
        tmp_path / "store",
        gate_enabled=False,
        max_documents_per_request=4,
        max_document_chars=2000,
        max_new_tokens_limit=32,
    )
    app = create_app(settings, start_runner=True)
    with TestClient(app, raise_server_exceptions=False) as c:
        store, engine = app.state.store, app.state.engine
        assert isinstance(engine.model, RetrofittedLM)
        assert len(list(store.base_dir.glob("model-*.safetensors"))) > 1  # the sharded base was seeded
        base_tables = {k: t.clone() for k, t in engine.model.value_tables().items()}
        frozen = {k: v.clone() for k, v in engine.model.state_dict().items() if ".memory.values." not in k}
        before = generate(c)
        base = before["version"]
        # the chat endpoint renders with the checkpoint's own chat template (kept by `memfit retrofit`),
        # else with memfit's plain fallback (service/routes/openai.py)
        question = [{"role": "user", "content": FACT["question"]}]
        chat = c.post("/v1/chat/completions", json={"model": "memfit", "messages": question, "max_tokens": 2})
        assert chat.status_code == 200, chat.text
        assert engine.tokenizer.chat_template == (CHAT_TEMPLATE if family == "llama" else None)
        rendered = (
            f"<|user|>{FACT['question']}\n<|assistant|>"
            if family == "llama"
            else f"User: {FACT['question']}\nAssistant:"
        )
        used = len(engine.tokenizer.encode(rendered, add_special_tokens=False))
        assert chat.json()["usage"]["prompt_tokens"] == used, (family, chat.json())
        logits_before = last_logits(engine.model, engine.tokenizer)

        # the default plain SGD (lr tuned on memfit's own models) barely moves the zero-initialised values
        # of a random model; a row-local Adam learns the fact in a few steps
        body = {"documents": [DOC], "settings": {"optimizer": "adam", "lr": 0.1}}
        r = c.post("/ingest", json=body, headers={"Idempotency-Key": f"retrofit-{family}"})
        assert r.status_code == 202, r.text
        job = wait_job(c, r.json()["job_id"])
        assert job["status"] == "succeeded", job
        v = job["version"]
        assert v > base and job["parent"] == base

        after = generate(c, min_version=v)  # served by the engine once it swapped to v
        assert after["version"] == v
        # the update wrote value rows of the memory layer only, and the engine serves them
        assert all(".mlp.memory.values.weight" in k for k in store.value_keys.values()), store.value_keys
        delta = store.load_delta(v)
        assert set(delta.layers) == set(base_tables) == {1}
        for layer, t in engine.model.value_tables().items():
            rows = (t != base_tables[layer]).any(-1).nonzero().flatten()
            assert rows.numel() > 0
            assert set(rows.tolist()) <= set(delta.layers[layer].indices.tolist())  # only the delta's rows
        for k, t in engine.model.state_dict().items():  # every other weight bit-identical
            if ".memory.values." not in k:
                assert torch.equal(t, frozen[k]), k
        learned = is_answered(after["text"], FACT["answer"])
        assert learned, (after, json.dumps(job))  # the tiny random model learns the fact in its memory

        # rollback: the base is active and served again, value tables and outputs bit-identical
        assert c.post(f"/versions/{base}/activate", json={"why": "retrofit rollback"}).status_code == 200
        rolled = generate(c)
        assert rolled["version"] == base and rolled["text"] == before["text"]
        assert not is_answered(rolled["text"], FACT["answer"])
        for k, t in engine.model.value_tables().items():
            assert torch.equal(t, base_tables[k]), k
        assert torch.equal(last_logits(engine.model, engine.tokenizer), logits_before)
        # pinning the new version still answers from its row overlay
        assert generate(c, version=v)["text"] == after["text"]

    fresh = load_memory_model(model_dir).eval()  # the directory on disk is untouched by serving
    for k, t in fresh.value_tables().items():
        assert torch.equal(t, base_tables[k]), k


@pytest.mark.integration
def test_memfit_serve_starts_on_a_sharded_retrofitted_directory(tmp_path, capsys):
    """The real command line: `memfit serve --model DIR` seeds its store from the sharded directory."""
    from tests.service.conftest import ServerProcess

    model_dir = retrofit_dir(tmp_path, "gpt2", capsys)
    assert not (model_dir / "model.safetensors").exists()
    server = ServerProcess(model_dir, tmp_path / "store", tmp_path).start()
    try:
        with server.client() as c:
            r = c.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 4})
            assert r.status_code == 200, r.text
            assert r.json()["version"] == 0 and r.json()["usage"]["completion_tokens"] >= 1
            assert c.get("/versions").json()["active"] == 0
    finally:
        server.kill()


@pytest.mark.integration
def test_retrofitted_model_in_distributed_mode(redis_server, tmp_path, capsys):
    """`memfit worker` (Celery, Redis) trains the update of a retrofitted model; the API replica serves it."""
    from model_store import Store
    from tests.workers.test_distributed import FAST_ENV, Proc, Server

    model_dir = retrofit_dir(tmp_path, "gpt2", capsys)
    store = tmp_path / "store"
    Store.init(store, model_dir)
    env = {**FAST_ENV, "MEMFIT_HOME": str(tmp_path / "home"), "MEMFIT_REDIS_URL": redis_server.url}
    procs: list[Proc] = []
    try:
        worker = Proc("worker", ["worker", "--model", str(model_dir), "--store", str(store)], env, tmp_path)
        procs.append(worker)
        api = Server("api", model_dir, store, env, tmp_path)
        procs.append(api)
        worker.wait_log(" ready.", timeout=180)
        api.wait_ready(180)
        before = api.ask(PROMPT)
        r = api.ingest([DOC], settings={"optimizer": "adam", "lr": 0.1}, key="retrofit-distributed")
        assert r.status_code == 202, r.text
        (job,) = api.wait_jobs([r.json()["job_id"]], timeout=300)
        assert job["status"] == "succeeded", (job, worker.log()[-3000:])
        deadline = time.time() + 5  # the worker records its pid in the timings just after the status
        while "worker_pid" not in api.job(job["job_id"])["timings"] and time.time() < deadline:
            time.sleep(0.05)
        assert api.job(job["job_id"])["timings"]["worker_pid"] == worker.pid  # trained in the worker
        v = job["version"]
        deadline = time.time() + 30
        while (got := api.ask(PROMPT))["version"] != v and time.time() < deadline:
            time.sleep(0.1)
        assert got["version"] == v and is_answered(got["text"], FACT["answer"]), got
        assert (
            api.http.post(f"/versions/{before['version']}/activate", json={"why": "rollback"}).status_code
            == 200
        )
        rolled = api.ask(PROMPT)
        assert rolled["version"] == before["version"] and rolled["text"] == before["text"]
    finally:
        for p in reversed(procs):
            p.stop()


def test_the_gate_judges_a_retrofitted_models_update(tmp_path, capsys):
    """The evaluation gate on a retrofitted directory: its probe.json (written by `memfit retrofit`) gives
    the probe facts and held-out texts; an update within the thresholds is activated, one past them is
    published as `rejected`, never served nor pinnable, and the active version stays."""
    model_dir = retrofit_dir(tmp_path, "gpt2", capsys)
    settings = settings_for(
        model_dir,
        tmp_path / "store",
        gate_enabled=True,
        gate_max_ppl_increase=1e6,  # a random model's perplexity moves a lot: the first update passes
        max_documents_per_request=4,
        max_document_chars=2000,
        max_new_tokens_limit=32,
    )
    app = create_app(settings, start_runner=True)
    update = {"optimizer": "adam", "lr": 0.1}
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/ingest", json={"documents": [DOC], "settings": update})
        job = wait_job(c, r.json()["job_id"])
        assert job["status"] == "succeeded", job
        gate = job["evaluation"]["gate"]
        assert gate["enabled"] and gate["passed"] and gate["reasons"] == [], gate
        assert job["evaluation"]["perplexity"] > 0  # measured on the held-out texts of probe.json
        v = job["version"]
        assert generate(c, min_version=v)["version"] == v

        settings.gate_max_ppl_increase = -1.0  # any perplexity change is now past the threshold
        other = {"id": "brindle", "text": "The capital of Brindle is Oskaro.",
                 "facts": [{"question": "What is the capital of Brindle?", "answer": "Oskaro"}]}  # fmt: skip
        r = c.post("/ingest", json={"documents": [other], "settings": update})
        job = wait_job(c, r.json()["job_id"])
        assert job["status"] == "rejected", job
        assert not job["evaluation"]["gate"]["passed"]
        assert "gate_max_ppl_increase" in " ".join(job["evaluation"]["gate"]["reasons"]), job
        rejected = job["version"]
        versions = c.get("/versions").json()
        assert versions["active"] == v
        assert {m["id"]: m["state"] for m in versions["versions"]}[rejected] == "rejected"
        assert f"memfit@{rejected}" not in [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert generate(c)["version"] == v
        assert c.post("/generate", json={"prompt": PROMPT, "version": rejected}).status_code == 409
