"""The live engine: one loaded model, hot swap between store versions, and generation.

Consistency rule (docs/contracts.md "HTTP"): a request is served entirely by the version it was admitted
with. The value tables belong to `model_store.swap.LiveTables`; every forward pass (one decoding
step) runs under `live.swap_lock.read()`, so a swap (`write()`) happens only between steps. At each
step the request compares the live version with its own: when they differ (a swap happened since
admission, or the request pinned an older `version`) it passes `live.overlay_for(its version)` as the
model's `memory_overlay`, which makes the live tables read as its version's rows. A swap therefore
never waits for long generations to drain, and never changes the rows under a running request.

Continuous batching: `submit(request, emit)` queues a request; `settings.generation_workers` decoding
threads each take the oldest waiting request plus every other waiting one admitted with the same
version (up to `settings.max_batch_size`) and decode them together, left-padded, one forward pass per
step over a shared KV cache. Between two steps a running batch admits newly waiting requests of its
version into free rows: they are prefilled together (their own forward pass), their KV cache is
left-padded to the batch's length and concatenated, and finished rows leave the batch (their cache
rows are dropped, and columns that only padding holds are trimmed). A request therefore waits at most
one decoding step plus its prefill, not a whole batch. Requests of another version are never mixed
in: when one waits at the head of the queue the running batch stops admitting and drains. Pieces of
text go to each request's `emit` as they are decoded.

No request can stop serving: a row that cannot be built (or sampled) fails only its own request;
whatever escapes a wave fails that wave's requests and the thread goes on; a decoding thread that
dies anyway is recorded and started again by `check_decoders` (before each submit, and by /readyz,
which answers 503 when it found one dead). Admission control: at most `settings.max_waiting`
requests wait (`submit` raises Overloaded past it); a request past its `deadline` or
`cancelled` (client gone) is dropped from the queue, or its row stops at the next step.

The engine speaks no HTTP: what it refuses or stops is an error of service/engine_errors.py, and
service/errors.py maps those to statuses (503 + Retry-After for Overloaded, ...) in one place.

The other methods are blocking; the routes call them through `Engine.executor` (tokenising) or a
thread (store reads), never on the event loop.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.nn.functional as F

from memfit.config import Settings
from model_store import LiveTables, Store, StoreError, SwapResult, UnknownVersionError
from model_store.errors import CorruptVersionError
from service.engine_errors import (
    EmptyPrompt,
    GenerationFailed,
    Overloaded,
    PromptTooLong,
    ShuttingDown,
    UnknownVersion,
    VersionNotServable,
)
from service.generation import (
    Completion,
    Delta,
    Prepared,
    Row,
    SamplingParams,
    cancelled_error,
    deadline_error,
    sample_token,
    stopped_reason,
)

log = logging.getLogger("memfit.engine")


class Engine:
    def __init__(self, store: Store, model, tokenizer, settings: Settings, metrics=None) -> None:
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
        self.max_batch_size = settings.max_batch_size
        # admission control: at most this many requests wait for a decoding slot (503 past it)
        self.max_waiting: int | None = settings.max_waiting
        self._pending: list[tuple[Prepared, Callable[[Any], None]]] = []
        self._pending_cond = threading.Condition()
        self._closed = False
        self._draining = False  # close(drain_s): no new requests, the admitted ones finish
        self.waves = 0  # decoding waves started (a wave decodes up to max_batch_size requests together)
        self.forward_calls = 0  # forward passes run for generation (prefills and decoding steps)
        self.decode_steps = 0  # decoding steps (one forward pass over every running row)
        self.decode_rows = 0  # rows decoded, summed over decoding steps (/ decode_steps = mean batch)
        self.joined = 0  # requests admitted into an already running batch
        self.active_waves = 0  # waves decoding now
        self.rejected = 0  # requests refused because max_waiting requests were waiting
        self.decoder_restarts = 0  # decoding threads found dead and started again
        self.decoder_deaths: list[str] = []  # why each decoding thread died (the last 20)
        self._decoders_lock = threading.Lock()
        self._decoders = [self._start_decoder(i) for i in range(settings.generation_workers)]
        if metrics is not None and hasattr(metrics, "generation_waiting"):
            metrics.generation_waiting.set_function(lambda: float(len(self._pending)))

    @classmethod
    def from_store(cls, store: Store, settings: Settings, metrics=None, device: str = "cpu") -> Engine:
        import memlm

        model, tokenizer = memlm.load(store.base_dir, device)
        engine = cls(store, model, tokenizer, settings, metrics)
        engine.switch_to(store.active())
        return engine

    def close(self, drain_s: float = 0.0) -> None:
        """Stop: new requests get ShuttingDown at once; with `drain_s` > 0 the requests admitted
        already (decoding, or waiting for a slot) get up to that many seconds to finish first (the app
        passes MEMFIT_SHUTDOWN_GRACE_S). Whatever still waits then gets ShuttingDown."""
        if drain_s > 0:
            with self._pending_cond:
                self._draining = True
            if not self.wait_idle(drain_s):
                log.warning(
                    "shutdown: %d generation requests still running or waiting after %g s: cutting them",
                    self.active_waves + len(self._pending),
                    drain_s,
                )
        with self._pending_cond:
            self._closed = True
            pending, self._pending = self._pending, []
            self._pending_cond.notify_all()
        for _req, emit in pending:
            try:
                emit(ShuttingDown("the server is shutting down", retry_after_s=1))
            except Exception:
                pass
        self.executor.shutdown(wait=False, cancel_futures=True)

    # -- decoding threads --------------------------------------------------------------------------
    def _start_decoder(self, i: int) -> threading.Thread:
        t = threading.Thread(target=self._decoder_main, name=f"memfit-decode-{i}", daemon=True)
        t.start()
        return t

    def _decoder_main(self) -> None:
        """A decoding thread; what kills it is recorded for /readyz (and it is started again)."""
        try:
            self._decode_loop()
        except BaseException as e:
            name = threading.current_thread().name
            self.decoder_deaths = [*self.decoder_deaths[-19:], f"{name}: {type(e).__name__}: {e}"]
            log.critical("decoding thread %s died", name, exc_info=True)

    def check_decoders(self) -> list[str]:
        """Restart every decoding thread that is dead; returns one line per thread found dead (empty
        when all were alive). Called by /readyz, which then answers 503, and before each submit, so
        that a request never waits on a queue that nothing takes from."""
        if self._closed:
            return []
        dead: list[str] = []
        with self._decoders_lock:
            for i, t in enumerate(self._decoders):
                if t.is_alive():
                    continue
                why = next((d for d in reversed(self.decoder_deaths) if d.startswith(t.name + ":")), None)
                dead.append(f"{t.name} was dead ({why or 'exited'}); restarted")
                self._decoders[i] = self._start_decoder(i)
                self.decoder_restarts += 1
        if dead:
            log.error("decoding threads restarted: %s", "; ".join(dead))
        return dead

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
        """UnknownVersion or VersionNotServable unless `v` is a retained (published, not rejected,
        intact) version."""
        try:
            m = self.store.manifest(v)
        except UnknownVersionError:
            raise UnknownVersion(f"version {v} does not exist", "version") from None
        except CorruptVersionError as e:
            raise VersionNotServable(str(e), "version", code="version_corrupt") from None
        if m.get("state") == "rejected":
            raise VersionNotServable(
                f"version {v} was rejected by the evaluation gate", "version", code="version_rejected"
            )
        try:
            self.store.check_loadable(v)
        except StoreError as e:
            raise VersionNotServable(
                f"version {v} cannot be served: {e}", "version", code="version_unavailable"
            ) from None

    # -- generation ------------------------------------------------------------------------------
    def prepare(self, prompt: str, params: SamplingParams, version: int | None = None) -> Prepared:
        """Tokenise and admit: the request is served by `version` or the version live now."""
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        if not ids:
            raise EmptyPrompt("prompt encodes to no tokens", "prompt")
        if self.context_length and len(ids) >= self.context_length:
            raise PromptTooLong(
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

    # -- dynamic batching -------------------------------------------------------------------------
    def submit(self, req: Prepared, emit: Callable[[Any], None]) -> None:
        """Queue `req` for decoding. `emit` is called from a decoding thread with each Delta (the last
        has done=True) or with an exception. Concurrent requests of one version are decoded together
        (up to settings.max_batch_size rows per forward pass). ShuttingDown when the engine is
        closing, Overloaded when settings.max_waiting requests wait already."""
        self.check_decoders()
        with self._pending_cond:
            if self._closed or self._draining:
                raise ShuttingDown("the server is shutting down", retry_after_s=1)
            if self.max_waiting is not None and len(self._pending) >= self.max_waiting:
                self.rejected += 1
                raise self.overloaded()
            self._pending.append((req, emit))
            self._pending_cond.notify()

    def overloaded(self) -> Overloaded:
        return Overloaded(
            f"{len(self._pending)} generation requests wait for a decoding slot; "
            f"max_waiting = {self.max_waiting} (MEMFIT_MAX_WAITING): retry later",
            "MEMFIT_MAX_WAITING",
            retry_after_s=1,
        )

    @property
    def waiting(self) -> int:
        """Requests waiting for a decoding slot."""
        return len(self._pending)

    def is_full(self) -> bool:
        return self.max_waiting is not None and len(self._pending) >= self.max_waiting

    def cancel(self, req: Prepared) -> None:
        """Stop work on `req`: out of the queue if it waits, else its row stops at the next step."""
        req.cancelled.set()
        with self._pending_cond:
            before = len(self._pending)
            self._pending[:] = [item for item in self._pending if item[0] is not req]
            dropped = before - len(self._pending)
        if dropped and self.metrics is not None:  # it never reached a decoding row
            self.metrics.generation_finished.labels("cancelled").inc(dropped)

    def _take_wave(self) -> list[tuple[Prepared, Callable[[Any], None]]] | None:
        """The oldest pending request and up to max_batch_size - 1 more admitted with its version."""
        with self._pending_cond:
            while True:
                while not self._pending and not self._closed:
                    self._pending_cond.wait()
                if self._closed:
                    return None
                self._drop_gone_locked()
                if self._pending:
                    break
            version = self._pending[0][0].version
            return self._take_locked(version, self.max_batch_size)

    def _drop_gone_locked(self) -> None:
        """Under _pending_cond: drop waiting requests that were cancelled or ran past their deadline;
        each gets a final error (its caller has usually answered already and ignores it)."""
        if not any(item[0].gone() for item in self._pending):
            return
        keep = []
        for req, emit in self._pending:
            if not req.gone():
                keep.append((req, emit))
                continue
            error = deadline_error(req) if req.expired() else cancelled_error()
            if self.metrics is not None:
                self.metrics.generation_finished.labels(stopped_reason(error)).inc()
            try:
                emit(error)
            except Exception:
                pass
        self._pending[:] = keep

    def _take_locked(self, version: int, room: int) -> list[tuple[Prepared, Callable[[Any], None]]]:
        """Under _pending_cond: remove and return up to `room` pending requests of `version`."""
        wave: list[tuple[Prepared, Callable[[Any], None]]] = []
        rest: list[tuple[Prepared, Callable[[Any], None]]] = []
        for item in self._pending:
            if item[0].version == version and len(wave) < room:
                wave.append(item)
            else:
                rest.append(item)
        self._pending[:] = rest
        return wave

    def _take_joiners(self, version: int, room: int) -> list[tuple[Prepared, Callable[[Any], None]]]:
        """Waiting requests of `version` that may join a running batch: none when the batch is full,
        the engine is closing, or a request of another version waits at the head of the queue (the
        batch then drains so that a decoding thread takes it)."""
        if room <= 0 or not self._pending:  # unlocked peek: a miss only delays a join by one step
            return []
        with self._pending_cond:
            self._drop_gone_locked()
            if self._closed or not self._pending or self._pending[0][0].version != version:
                return []
            return self._take_locked(version, room)

    def _rows(self, items: list[tuple[Prepared, Callable[[Any], None]]]) -> list[Row]:
        """The decoding rows of `items`. A request whose row cannot be built (e.g. a seed that
        torch.Generator refuses) gets the error alone; the others go on."""
        rows = []
        for req, emit in items:
            try:
                rows.append(Row(self, req, emit))
            except Exception as e:
                log.exception("a generation request could not start")
                if self.metrics is not None:
                    self.metrics.generation_finished.labels("error").inc()
                try:
                    emit(
                        GenerationFailed(
                            f"generation could not start for this request: {type(e).__name__}: {e}",
                        )
                    )
                except Exception:
                    pass
        return rows

    def _decode_loop(self) -> None:
        while True:
            wave = self._take_wave()
            if wave is None:
                return
            seen: list[Row] = []  # every row the wave decoded, joiners included
            self.waves += 1
            self.active_waves += 1
            try:
                rows = self._rows(wave)
                seen.extend(rows)
                if rows:
                    self._decode(rows, seen)
            except BaseException as e:  # reported to every unfinished request of the wave
                log.exception("generation failed")
                for row in seen:
                    row.fail(e)
            finally:
                self.active_waves -= 1

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """True once no wave is decoding and nothing waits (tests and benchmarks)."""
        deadline = time.monotonic() + timeout
        while self.active_waves or self._pending:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)
        return True

    def _forward(self, version: int, ids: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        """One forward pass under swap_lock.read(), on the live tables or the version's row overlay;
        the last position's logits (B, V)."""
        with self.live.swap_lock.read():
            overlay = self._overlay(version)
            extra = {"memory_overlay": overlay} if overlay else {}
            out = self.model(ids, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1, **extra)
        self.forward_calls += 1
        return out.logits[:, -1]

    def _prefill(self, rows: list[Row], version: int, device, pad: int):
        """Prefill `rows` together (left padded); each takes its first token. -> (cache, mask (B, S)
        of the cached positions, next ids (B, 1))."""
        from transformers.cache_utils import DynamicCache

        width = max(len(r.req.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r.req.prompt_ids)
            ids[i, width - n :] = torch.tensor(r.req.prompt_ids, dtype=torch.long)
            mask[i, width - n :] = 1
        ids, mask = ids.to(device), mask.to(device)  # (B, T) left padded
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(rows))
        for r in rows:
            r.start()
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(version, ids, mask, cache)  # (B, V)
        return cache, mask, self._sample_rows(rows, logits, device, pad)

    @staticmethod
    def _sample_rows(rows: list[Row], logits: torch.Tensor, device, pad: int) -> torch.Tensor:
        nxt = []
        for i, r in enumerate(rows):
            if r.done:
                nxt.append(pad)
                continue
            try:
                token = sample_token(logits[i], r.req.params, r.gen)
            except Exception as e:  # this row's sampling failed: it alone ends in the error
                log.exception("sampling failed for one row")
                r.fail(e)
                nxt.append(pad)
                continue
            nxt.append(token)
            r.push(token)
        return torch.tensor(nxt, dtype=torch.long, device=device).unsqueeze(1)  # (B, 1)

    @staticmethod
    def _cache_tensors(cache) -> list[tuple[Any, str]]:
        return [(layer, name) for layer in cache.layers for name in ("keys", "values")]

    def _select(self, cache, mask: torch.Tensor, nxt: torch.Tensor, keep: list[int]):
        """Keep batch rows `keep`, then trim leading columns that are padding in every kept row."""
        idx = torch.tensor(keep, dtype=torch.long, device=mask.device)
        mask, nxt = mask.index_select(0, idx), nxt.index_select(0, idx)
        real = mask.any(0).nonzero()
        lead = int(real[0]) if real.numel() else 0
        for layer, name in self._cache_tensors(cache):
            t = getattr(layer, name)  # (B, nh, S, hs)
            setattr(layer, name, t.index_select(0, idx)[:, :, lead:])
        return mask[:, lead:], nxt

    def _merge(self, a, mask_a: torch.Tensor, nxt_a: torch.Tensor, b, mask_b: torch.Tensor, nxt_b):
        """Concatenate batch b below batch a; the shorter one is left-padded (masked) to the longer."""
        S = max(mask_a.shape[1], mask_b.shape[1])
        pa, pb = S - mask_a.shape[1], S - mask_b.shape[1]
        for (la, name), (lb, _) in zip(self._cache_tensors(a), self._cache_tensors(b)):
            ta, tb = getattr(la, name), getattr(lb, name)  # (B, nh, S_a|S_b, hs)
            setattr(la, name, torch.cat([F.pad(ta, (0, 0, pa, 0)), F.pad(tb, (0, 0, pb, 0))], dim=0))
        mask = torch.cat([F.pad(mask_a, (pa, 0)), F.pad(mask_b, (pb, 0))], dim=0)  # (B_a + B_b, S)
        return a, mask, torch.cat([nxt_a, nxt_b], dim=0)

    @torch.no_grad()
    def _decode(self, rows: list[Row], seen: list[Row]) -> None:
        """Continuous batched decoding of rows that share one version, with a KV cache; rows of the
        version that wait in the queue join between steps, finished rows leave."""
        version = rows[0].req.version
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        cache, mask, nxt = self._prefill(rows, version, device, pad)  # mask: (B, S) cached positions
        while True:
            now = time.monotonic()
            for r in rows:  # a row whose client is gone, or past its deadline, stops here
                if r.done:
                    continue
                if r.req.cancelled.is_set():
                    r.stop(cancelled_error())
                elif r.req.expired(now):
                    r.stop(deadline_error(r.req))
            keep = [i for i, r in enumerate(rows) if not r.done]
            if len(keep) < len(rows):
                if keep:
                    mask, nxt = self._select(cache, mask, nxt, keep)
                rows = [rows[i] for i in keep]
            joiners = self._take_joiners(version, self.max_batch_size - len(rows))
            new = self._rows(joiners) if joiners else []
            if new:
                self.joined += len(new)
                seen.extend(new)
                c2, m2, n2 = self._prefill(new, version, device, pad)
                if rows:
                    cache, mask, nxt = self._merge(cache, mask, nxt, c2, m2, n2)
                else:
                    cache, mask, nxt = c2, m2, n2
                rows = rows + new
                continue  # drop the rows the prefill finished, then decode
            if not rows:
                return
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)  # (B, S + 1)
            logits = self._forward(version, nxt, mask, cache)
            self.decode_steps += 1
            self.decode_rows += len(rows)
            nxt = self._sample_rows(rows, logits, device, pad)

    def stream(self, req: Prepared) -> Iterator[Delta]:
        """Blocking iterator over a request's Deltas (the last has done=True). The decoding rows
        count themselves in memfit_generation_requests_running (not the time spent waiting)."""
        m = self.metrics
        if m is None:
            yield from self._stream(req)
            return
        try:
            yield from self._stream(req)
        except Exception:
            m.generation_errors.inc()
            raise

    def _stream(self, req: Prepared) -> Iterator[Delta]:
        q: queue.Queue[Any] = queue.Queue()
        self.submit(req, q.put)
        try:
            while True:
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.done:
                    return
        finally:
            req.cancelled.set()  # a caller that stops early frees its row at the next step

    def complete(self, req: Prepared) -> Completion:
        parts: list[str] = []
        final: Delta | None = None
        for d in self.stream(req):
            if d.done:
                final = d
            else:
                parts.append(d.text)
        assert final is not None
        return Completion.of(parts, req.version, final)
