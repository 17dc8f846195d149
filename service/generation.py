"""One generation request, from admission to its last piece: what it asks (`SamplingParams`), its
admitted form bound to one version (`Prepared`), what it streams (`Delta`) and answers
(`Completion`), and its decoding row inside a batched wave (`Row`: sampling, stop sequences, text
pieces, metrics). service/engine.py batches the rows and runs the model; the errors a row can end
with are the engine's own (service/engine_errors.py).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from service.engine_errors import ClientDisconnected, DeadlineExceeded


class Decoder(Protocol):
    """What a row reads of the engine decoding it (service.engine.Engine)."""

    context_length: int | None
    eos_id: int | None
    tokenizer: Any
    metrics: Any


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
    # time.monotonic() after which the engine stops decoding it (None: no deadline); the route that
    # submitted it answers the client at the same moment (service/routes/generate.py)
    deadline: float | None = None
    timeout_s: float | None = None  # the setting the deadline came from (named in its error)

    def expired(self, now: float | None = None) -> bool:
        return self.deadline is not None and (time.monotonic() if now is None else now) >= self.deadline

    def gone(self) -> bool:
        """Cancelled (client gone, caller stopped) or past its deadline: not worth decoding."""
        return self.cancelled.is_set() or self.expired()


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

    @classmethod
    def of(cls, parts: list[str], version: int, final: Delta) -> Completion:
        """The whole answer of a stream: its pieces' text and the final (done) piece's figures."""
        return cls(
            text="".join(parts),
            version=version,
            finish_reason=final.finish_reason or "length",
            prompt_tokens=final.prompt_tokens,
            completion_tokens=final.completion_tokens,
        )


def sample_token(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    """One token id from the last position's logits (V,)."""
    if p.temperature <= 0:
        return int(logits.argmax())
    # float64 and the max subtracted first: a tiny temperature (1e-300 is a valid float > 0) makes the
    # best token's logit 0 and the others -inf, i.e. greedy, instead of inf/inf = nan (a 500)
    logits = logits.detach().to("cpu", torch.float64)  # the row's CPU generator samples (any device)
    logits = (logits - logits.max()) / p.temperature
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


class Row:
    """Decoding state of one request inside a batched wave: sampling, stop sequences, text pieces."""

    def __init__(self, engine: Decoder, req: Prepared, emit: Callable[[Any], None]) -> None:
        self.engine = engine
        self.req = req
        self.emit = emit
        p = req.params
        self.gen = None
        if p.temperature > 0:
            self.gen = torch.Generator().manual_seed(p.seed if p.seed is not None else secrets.randbits(63))
        self.max_new = p.max_new_tokens
        if engine.context_length:
            self.max_new = min(self.max_new, engine.context_length - len(req.prompt_ids))
        self.generated: list[int] = []
        self.emitted = 0  # characters of the decoded text already emitted
        self.holdback = max((len(s) for s in p.stop), default=1) - 1
        self.text = ""
        self.finish_reason = "length"
        self.t_first: float | None = None
        self.t_prev = 0.0
        self.done = False
        self.running = False  # counted in memfit_generation_requests_running

    def start(self) -> None:
        m = self.engine.metrics
        if m is not None:
            m.queue_time.observe(time.perf_counter() - self.req.admitted_at)
            if not self.running:
                self.running = True
                m.generation_running.inc()

    def _ended(self, reason: str) -> None:
        """The row leaves the batch: out of the running gauge, counted by finish reason."""
        m = self.engine.metrics
        if m is not None:
            if self.running:
                self.running = False
                m.generation_running.dec()
            m.generation_finished.labels(reason).inc()

    def _send(self, item: Any) -> None:
        try:
            self.emit(item)
        except Exception:  # the receiver is gone: stop decoding this row
            self.req.cancelled.set()

    def push(self, token: int) -> None:
        """Take the next sampled token; finishes the row on EOS, a stop sequence or the length limit."""
        m = self.engine.metrics
        now = time.perf_counter()
        if self.t_first is None:
            self.t_first = now
            if m is not None:
                m.ttft.observe(now - self.req.admitted_at)
        elif m is not None:
            m.inter_token.observe(now - self.t_prev)
        self.t_prev = now
        eos = self.engine.eos_id
        if eos is not None and token == eos:
            self.finish_reason = "stop"
            self.finish()
            return
        self.generated.append(token)
        text = self.engine.tokenizer.decode(self.generated, skip_special_tokens=True)
        stops = self.req.params.stop
        if stops:
            start = max(0, self.emitted - self.holdback)
            cut = min((i for i in (text.find(s, start) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                self.text = text[:cut]
                self.finish_reason = "stop"
                self.finish()
                return
        self.text = text
        safe = len(text) - self.holdback if stops else len(text)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            safe = min(safe, len(text) - 1)
        if safe > self.emitted:
            self._send(Delta(text[self.emitted : safe]))
            self.emitted = safe
        if len(self.generated) >= self.max_new:
            self.finish()

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        self._ended(self.finish_reason)
        if len(self.text) > self.emitted:
            self._send(Delta(self.text[self.emitted :]))
            self.emitted = len(self.text)
        self._record()
        self._send(
            Delta(
                "",
                done=True,
                finish_reason=self.finish_reason,
                prompt_tokens=len(self.req.prompt_ids),
                completion_tokens=len(self.generated),
            )
        )

    def stop(self, error: BaseException) -> None:
        """Stop decoding (client gone, deadline passed): the tokens count, the request gets `error`."""
        if self.done:
            return
        self.done = True
        self._ended(stopped_reason(error))
        self._record()
        self._send(error)

    def _record(self) -> None:
        m = self.engine.metrics
        n = len(self.generated)
        if m is not None:
            now = time.perf_counter()
            m.e2e.observe(now - self.req.admitted_at)
            m.prompt_tokens.inc(len(self.req.prompt_ids))
            m.generation_tokens.inc(n)
            m.generation_length.observe(n)
            if self.t_first is not None and n > 1:
                m.per_token.observe((now - self.t_first) / (n - 1))

    def fail(self, error: BaseException) -> None:
        if self.done:
            return
        self.done = True
        self._ended("error")
        self._send(error)


def deadline_error(req: Prepared) -> DeadlineExceeded:
    """A generation that ran past MEMFIT_REQUEST_TIMEOUT_S (its row has stopped)."""
    t = req.timeout_s
    what = f" within request_timeout_s = {t:g} s" if t is not None else " before its deadline"
    return DeadlineExceeded(
        f"the generation did not finish{what}; it was stopped (ask for fewer tokens, or retry later)",
        "MEMFIT_REQUEST_TIMEOUT_S",
        retry_after_s=1,
    )


def stopped_reason(error: BaseException) -> str:
    """The finish-reason label of a row stopped with `error`: deadline, cancelled or error."""
    code = getattr(error, "code", None)
    if code == "deadline_exceeded":
        return "deadline"
    if code == "client_disconnected":
        return "cancelled"
    return "error"


def cancelled_error() -> ClientDisconnected:
    """The request's client went away (an HTTP 499); nobody reads this answer."""
    return ClientDisconnected("the client closed the connection; the generation was stopped")
