"""The live engine: one loaded model, hot swap between store versions, and generation.

Consistency rule (CONTRACTS.md "HTTP"): a request is served entirely by the version it was admitted
with. The value tables belong to `model_store.swap.LiveTables`; every forward pass (one decoding
step) runs under `live.swap_lock.read()`, so a swap (`write()`) happens only between steps. At each
step the request compares the live version with its own: when they differ (a swap happened since
admission, or the request pinned an older `version`) it passes `live.overlay_for(its version)` as the
model's `memory_overlay`, which makes the live tables read as its version's rows. A swap therefore
never waits for long generations to drain, and never changes the rows under a running request.

All methods here are blocking; the routes call them through `Engine.executor` (model work) or a
thread (store reads), never on the event loop.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model_store import LiveTables, Store, StoreError, SwapResult, UnknownVersionError
from model_store.errors import CorruptVersionError
from service.errors import ApiError

log = logging.getLogger("memfit.engine")


@dataclass
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Prepared:
    """A request admitted to a version, with its prompt tokenised."""

    prompt_ids: list[int]
    version: int
    params: SamplingParams
    admitted_at: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class Delta:
    """One streamed piece of text (`text` may be "" on the final event)."""

    text: str
    done: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Completion:
    text: str
    version: int
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def load_model(model_dir: str | Path, device: str = "cpu"):
    """The model and tokenizer of a model directory (a store's base), in eval mode, frozen."""
    from transformers import AutoModelForCausalLM

    import memlm  # noqa: F401  (registers the memory-layer model with the Auto classes)
    from memlm.tokenizer import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    tokenizer = load_tokenizer(model_dir)
    return model, tokenizer


def _sample(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    """One token id from the last position's logits (V,)."""
    if p.temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / p.temperature
    if p.top_k and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        cum = probs.cumsum(-1)
        drop = cum - probs > p.top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen))


class Engine:
    def __init__(self, store: Store, model, tokenizer, settings, metrics=None) -> None:
        self.store = store
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.metrics = metrics
        self.live = LiveTables(store, model.value_tables(), 0)
        self.executor = ThreadPoolExecutor(
            max_workers=settings.generation_workers, thread_name_prefix="memfit-generate"
        )
        self.context_length = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
        self.eos_id = tokenizer.eos_token_id
        self._chain_cache: tuple[int, frozenset[int]] | None = None
        self._swap_listeners: list[Callable[[SwapResult], None]] = []
        self.last_follow_error: str | None = None

    @classmethod
    def from_store(cls, store: Store, settings, metrics=None, device: str = "cpu") -> Engine:
        model, tokenizer = load_model(store.base_dir, device)
        engine = cls(store, model, tokenizer, settings, metrics)
        engine.switch_to(store.active())
        return engine

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    # -- versions --------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return self.live.version

    def add_swap_listener(self, fn: Callable[[SwapResult], None]) -> None:
        self._swap_listeners.append(fn)

    def switch_to(self, version: int) -> SwapResult:
        """Hot swap the live tables to `version` (rows that differ only; readers pause for the copy)."""
        result = self.live.switch_to(version)
        if result.from_version != result.to_version:
            log.info(
                "swapped %d -> %d: %d rows, %.1f ms (readers paused %.2f ms)",
                result.from_version,
                result.to_version,
                result.rows_written,
                result.seconds * 1e3,
                result.pause_seconds * 1e3,
            )
            if self.metrics is not None:
                self.metrics.swaps.inc()
                self.metrics.swap_duration.observe(result.seconds)
                self.metrics.swap_rows.inc(result.rows_written)
                self.metrics.swap_pause.observe(result.pause_seconds)
            for fn in list(self._swap_listeners):
                try:
                    fn(result)
                except Exception:
                    log.exception("swap listener failed")
        if self.metrics is not None:
            self.metrics.active_version.set(self.live.version)
        return result

    def follow_active(self) -> SwapResult | None:
        """Switch to the store's ACTIVE version if it moved (CLI rollbacks, other writers)."""
        try:
            target = self.store.active()
            if target == self.live.version:
                self.last_follow_error = None
                return None
            result = self.switch_to(target)
            self.last_follow_error = None
            return result
        except (StoreError, OSError) as e:
            msg = f"cannot follow the active version: {e}"
            if msg != self.last_follow_error:
                log.error("%s (still serving version %d)", msg, self.live.version)
            self.last_follow_error = msg
            return None

    def live_chain(self) -> frozenset[int]:
        v = self.live.version
        cached = self._chain_cache
        if cached is not None and cached[0] == v:
            return cached[1]
        chain = frozenset(self.store.chain(v))
        self._chain_cache = (v, chain)
        return chain

    def min_version_state(self, v: int) -> str:
        """'ready' (v is in this replica's active chain), 'pending' (not published yet, or published in
        the store's active chain but not swapped in here yet), 'rejected', or 'off_chain'."""
        if v in self.live_chain():
            return "ready"
        try:
            m = self.store.manifest(v)
        except UnknownVersionError:
            return "pending"
        if m.get("state") == "rejected":
            return "rejected"
        try:
            if v in self.store.chain(self.store.active()):
                return "pending"
        except StoreError:
            return "pending"
        return "off_chain"

    def check_pinnable(self, v: int) -> None:
        """ApiError unless `v` is a retained (published, not rejected, intact) version."""
        try:
            m = self.store.manifest(v)
        except UnknownVersionError:
            raise ApiError(404, "version_not_found", f"version {v} does not exist", "version") from None
        except CorruptVersionError as e:
            raise ApiError(409, "version_corrupt", str(e), "version") from None
        if m.get("state") == "rejected":
            raise ApiError(
                409, "version_rejected", f"version {v} was rejected by the evaluation gate", "version"
            )
        try:
            self.store.check_loadable(v)
        except StoreError as e:
            raise ApiError(
                409, "version_unavailable", f"version {v} cannot be served: {e}", "version"
            ) from None

    # -- generation ------------------------------------------------------------------------------
    def prepare(self, prompt: str, params: SamplingParams, version: int | None = None) -> Prepared:
        """Tokenise and admit: the request is served by `version` or the version live now."""
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        if not ids:
            raise ApiError(422, "invalid_request", "prompt encodes to no tokens", "prompt")
        if self.context_length and len(ids) >= self.context_length:
            raise ApiError(
                413,
                "prompt_too_long",
                f"prompt is {len(ids)} tokens; the model's context is {self.context_length} tokens "
                "(prompt + generated)",
                "prompt",
            )
        return Prepared(ids, self.live.version if version is None else int(version), params)

    def _overlay(self, version: int):
        """Under swap_lock.read(): None when the live tables are `version`, else its row overlay."""
        if version == self.live.version:
            return None
        return self.live.overlay_for(version) or None

    def stream(self, req: Prepared) -> Iterator[Delta]:
        """Decode token by token; yields text pieces, then a final Delta(done=True)."""
        m = self.metrics
        if m is None:
            yield from self._stream(req)
            return
        m.queue_time.observe(time.perf_counter() - req.admitted_at)
        m.generation_running.inc()
        try:
            yield from self._stream(req)
        except Exception:
            m.generation_errors.inc()
            raise
        finally:  # also when the client goes away and the generator is closed
            m.generation_running.dec()

    @torch.no_grad()
    def _stream(self, req: Prepared) -> Iterator[Delta]:
        from transformers.cache_utils import DynamicCache

        p = req.params
        gen = None
        if p.temperature > 0:
            gen = torch.Generator().manual_seed(p.seed if p.seed is not None else secrets.randbits(63))
        device = next(self.model.parameters()).device
        cache = DynamicCache(config=self.model.config)
        step_ids = torch.tensor([req.prompt_ids], dtype=torch.long, device=device)
        max_new = p.max_new_tokens
        if self.context_length:
            max_new = min(max_new, self.context_length - len(req.prompt_ids))
        generated: list[int] = []
        emitted = 0  # characters of the decoded text already yielded
        holdback = max((len(s) for s in p.stop), default=1) - 1
        finish = "length"
        text = ""
        t_first: float | None = None
        t_prev = 0.0  # when the previous token was decoded (inter-token latency)
        m = self.metrics
        for _ in range(max_new):
            if req.cancelled.is_set():
                break
            with self.live.swap_lock.read():
                overlay = self._overlay(req.version)
                extra = {"memory_overlay": overlay} if overlay else {}
                out = self.model(step_ids, cache=cache, use_cache=True, logits_to_keep=1, **extra)
            token = _sample(out.logits[0, -1], p, gen)
            if t_first is None:
                t_first = time.perf_counter()
                if m is not None:
                    m.ttft.observe(t_first - req.admitted_at)
            elif m is not None:
                m.inter_token.observe(time.perf_counter() - t_prev)
            t_prev = time.perf_counter()
            if self.eos_id is not None and token == self.eos_id:
                finish = "stop"
                break
            generated.append(token)
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            if p.stop:
                cut = min(
                    (i for i in (text.find(s, max(0, emitted - holdback)) for s in p.stop) if i >= 0),
                    default=-1,
                )
                if cut >= 0:
                    text = text[:cut]
                    finish = "stop"
                    break
            safe = len(text) - holdback if p.stop else len(text)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
                safe = min(safe, len(text) - 1)
            if safe > emitted:
                yield Delta(text[emitted:safe])
                emitted = safe
            step_ids = torch.tensor([[token]], dtype=torch.long, device=device)
        if len(text) > emitted:
            yield Delta(text[emitted:])
        if m is not None:
            now = time.perf_counter()
            m.e2e.observe(now - req.admitted_at)
            m.prompt_tokens.inc(len(req.prompt_ids))
            m.generation_tokens.inc(len(generated))
            m.generation_length.observe(len(generated))
            if t_first is not None and len(generated) > 1:
                m.per_token.observe((now - t_first) / (len(generated) - 1))
        yield Delta(
            "",
            done=True,
            finish_reason=finish,
            prompt_tokens=len(req.prompt_ids),
            completion_tokens=len(generated),
        )

    def complete(self, req: Prepared) -> Completion:
        parts: list[str] = []
        final: Delta | None = None
        for d in self.stream(req):
            if d.done:
                final = d
            else:
                parts.append(d.text)
        assert final is not None
        return Completion(
            text="".join(parts),
            version=req.version,
            finish_reason=final.finish_reason or "length",
            prompt_tokens=final.prompt_tokens,
            completion_tokens=final.completion_tokens,
        )


def retry_after_seconds(wait_s: float) -> str:
    return str(max(1, math.ceil(wait_s)))
