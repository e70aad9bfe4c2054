"""Continuous batching: every request in flight decodes together, one batched step at a time.

At batch 1 each decoded token reads every weight once; a step for B rows reads them once for all
B, so serving several clients costs little more than serving one. The pieces:

- BatchedKVCache: keys and values of up to `max_rows` sequences (slots), each at its own
  position. A slot keeps what it held after its request leaves, so the next turn of a
  conversation (or another request with the same prompt, such as the n choices of one API
  call) reuses the longest shared prefix: from a free slot as it is, from a busy one by copying.
- Batch: the rows in flight, in slots 0..B-1. `add` prefills a new request alone (the engine's
  own prefill path, so its first logits are the ones it would get alone) and it joins at the next
  `step`; `step` samples every row's next token with the row's own Sampler (its seed gives the
  tokens it would give alone), lets finished and cancelled rows go at once, and runs one forward
  pass over the rest with a position per row (gpt.model's decoding step masks each row's keys
  past its own end).

Memory is bounded: at most `max_rows` rows, fewer where a whole-context row of keys and values
for each would pass `kv_budget` bytes. The caller (gpt.service) queues what does not fit, in order.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

import gpt.engine
from gpt.engine import GenerationResult, TextStream, TokenLogprob, _entry
from gpt.model import RowCache, common_prefix
from gpt.native import native_step
from gpt.sampling import MAX_SEED, CopyBias, Sampler, SamplingParams

MAX_BATCH = 16
KV_BUDGET_BYTES = 2 * 2**30


def row_bytes(config, dtype: torch.dtype) -> int:
    """Bytes of keys and values one whole-context row takes."""
    return 2 * config.n_layer * config.context_length * config.n_embd * torch.finfo(dtype).bits // 8


class BatchedKVCache:
    """Keys and values [n_layer, slot, n_head, context, head_dim], allocated as slots are needed
    (doubling), at most `max_rows`. `ids[s]` is exactly the tokens whose keys slot s holds."""

    def __init__(self, config, device, dtype, max_rows: int):
        self.config, self.device, self.dtype, self.max_rows = config, device, dtype, max_rows
        self.max_len = config.context_length
        self.k = self.v = None
        self.ids: list[list[int]] = []

    @property
    def slots(self) -> int:
        return len(self.ids)

    def reserve(self, slots: int) -> None:
        if slots <= self.slots:
            return
        c = self.config
        n = min(self.max_rows, max(slots, 2 * self.slots))
        shape = (c.n_layer, n, c.n_head, self.max_len, c.head_dim)
        k = torch.zeros(shape, device=self.device, dtype=self.dtype)
        v = torch.zeros(shape, device=self.device, dtype=self.dtype)
        if self.k is not None:
            k[:, : self.slots], v[:, : self.slots] = self.k, self.v
        self.k, self.v = k, v
        self.ids += [[] for _ in range(n - self.slots)]

    def swap(self, a: int, b: int) -> None:
        if a == b:
            return
        n = max(len(self.ids[a]), len(self.ids[b]))
        for t in (self.k, self.v):
            t[:, [a, b], :, :n] = t[:, [b, a], :, :n]
        self.ids[a], self.ids[b] = self.ids[b], self.ids[a]

    def place(self, slot: int, ids: list[int], *, reuse: bool) -> int:
        """Make `slot` (free) hold the longest prefix of `ids` that any slot holds, at most all
        but the last token (which must be fed to get the next logits); how many it holds."""
        common = 0
        if reuse:
            best = max(range(self.slots), key=lambda s: common_prefix(self.ids[s], ids))
            common = min(common_prefix(self.ids[best], ids), len(ids) - 1)
            if best > slot:  # a free slot: move it here whole
                self.swap(best, slot)
            elif best < slot and common:  # a busy one: copy the shared positions
                for t in (self.k, self.v):
                    t[:, slot, :, :common] = t[:, best, :, :common]
        self.ids[slot] = ids[:common]
        return common


class _SlotCache:
    """One slot as gpt.model's KVCache (a view: the model writes into the batched tensors)."""

    def __init__(self, cache: BatchedKVCache, slot: int):
        self.k, self.v = cache.k[:, slot : slot + 1], cache.v[:, slot : slot + 1]
        self.max_len, self.pos = cache.max_len, len(cache.ids[slot])


@dataclass
class Request:
    ids: list[int]  # the prompt, trimmed to the window (Engine.chat_ids ...)
    dropped: int
    params: SamplingParams
    cancel: threading.Event
    on_text: Callable[[str], None]
    on_done: Callable[[GenerationResult], None]
    on_error: Callable[[str], None]  # a step failed (a bug): the request is over
    logprobs: int | None = None
    # echo: the whole prompt to score (Engine.score_prompt), which may be longer than `ids`, its
    # end that fits beside the answer; score_only: nothing is generated (max_tokens 0).
    echo: list[int] | None = None
    score_only: bool = False
    copy: CopyBias | None = None  # a grounded answer's lean toward its passages (Engine.copy_bias)


class _Row:
    """One request's decoding state (the per-token rules are Engine._generate's)."""

    def __init__(self, req: Request, batch: "Batch", start: float, seed: int, threads: int):
        self.req, self.start, self.seed, self.threads = req, start, seed, threads
        self.text = TextStream(batch.engine.tokenizer, req.params.stop)
        self.max_new = min(req.params.max_new_tokens, batch.engine.context_length - len(req.ids))
        self.tokens: list[int] = []
        self.scored: list[TokenLogprob] | None = None if req.logprobs is None else []
        self.prompt_scored = self.stop_scored = None
        self.cached = 0
        self.logits = self.sampler = self.first_at = self.finish = None
        self.token = self.log_probs = None

    def sample(self) -> None:
        if self.scored is not None:
            self.log_probs = self.sampler.log_probs(self.logits)
        self.token = self.sampler(self.logits)

    def take(self, tid: int, stop_ids) -> None:
        """The sampled token read back: a stop token, a delta, a stop string or the budget."""
        if self.first_at is None:
            self.first_at = time.perf_counter()
        if tid in stop_ids:
            self.finish = "stop"
            if self.scored is not None:
                self.stop_scored = _entry(tid, self.log_probs, top=self.req.logprobs)
            return
        self.tokens.append(tid)
        if self.scored is not None:
            self.scored.append(_entry(tid, self.log_probs, top=self.req.logprobs))
        delta = self.text.feed(tid)
        if delta:
            self.req.on_text(delta)
        if self.text.matched:
            self.finish = "stop"
        elif len(self.tokens) >= self.max_new:
            self.finish = "length"

    def result(self) -> GenerationResult:
        end = time.perf_counter()
        decode_s = end - self.first_at if self.first_at is not None else 0.0
        n = len(self.tokens)
        return GenerationResult(
            text=self.text.text,
            finish_reason=self.finish,
            prompt_tokens=len(self.req.ids),
            new_tokens=n,
            dropped_tokens=self.req.dropped,
            cached_tokens=self.cached,
            ttft_s=(self.first_at if self.first_at is not None else end) - self.start,
            tokens_per_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
            seed=self.seed,
            threads=self.threads,
            token_ids=self.tokens,
            logprobs=self.scored,
            prompt_logprobs=self.prompt_scored,
            stop_logprob=self.stop_scored,
        )


class Batch:
    """The rows in flight on one engine's model (see the module docstring). One thread drives it."""

    def __init__(self, engine, max_batch: int = MAX_BATCH, kv_budget: int = KV_BUDGET_BYTES):
        model = engine.model
        dtype = model.wte.weight.dtype
        self.engine = engine
        self.capacity = max(1, min(max_batch, kv_budget // row_bytes(model.config, dtype)))
        self.cache = BatchedKVCache(model.config, engine.device, dtype, self.capacity)
        self.rows: list[_Row] = []  # rows[i] is in slot i
        self._threads_before: int | None = None
        self._native = None  # gpt.native's step for the cache's tensors; False: it cannot run

    @property
    def full(self) -> bool:
        return len(self.rows) >= self.capacity

    def add(self, req: Request) -> None:
        """Prefill `req` in the next free slot; it decodes from the next step on (a score_only
        request is answered at once and never joins)."""
        start = time.perf_counter()
        engine, params = self.engine, req.params
        seed = params.seed if params.seed is not None else random.SystemRandom().randrange(MAX_SEED)
        threads = self._set_threads()
        row = _Row(req, self, start, seed, threads)
        slot = len(self.rows)
        self.cache.reserve(slot + 1)
        try:
            with torch.inference_mode():
                if req.echo is not None:
                    row.prompt_scored = engine.score_prompt(req.echo, top=req.logprobs or 0)
                if req.score_only:
                    row.finish = "length"
                    self._restore_threads()
                    req.on_done(row.result())
                    return
                row.cached = self.cache.place(slot, req.ids, reuse=True)
                fed = req.ids[row.cached :]
                x = torch.tensor([fed], dtype=torch.long, device=engine.device)
                view = _SlotCache(self.cache, slot)
                logits = engine.model(x, view, last_only=True)[0, :, : engine.tokenizer.n_vocab]
                self.cache.ids[slot] = list(req.ids)
                row.logits = logits[-1]
                row.sampler = Sampler(params, row.logits.size(-1), engine.device, req.ids, seed, copy=req.copy)
        except BaseException:
            self.cache.ids[slot] = []  # whatever it wrote is no prefix of anything
            self._restore_threads()
            raise
        self.rows.append(row)

    def step(self) -> None:
        """One token for every row: cancelled rows leave, the others sample, those with budget
        left run one batched forward pass, and finished rows leave with their result."""
        for row in [r for r in self.rows if r.req.cancel.is_set()]:
            row.finish = "cancelled"
            self._leave(row)
        stop_ids = self.engine.stop_ids
        with torch.inference_mode():
            for row in self.rows:
                row.sample()
            for row in [r for r in self.rows if len(r.tokens) + 1 >= r.max_new]:
                row.take(int(row.token), stop_ids)  # its last token (finished): nothing to feed
                self._leave(row)
            if not self.rows:
                return
            # Queue the forward pass before reading the tokens back: on a GPU it then runs while
            # the CPU decodes text and checks stop strings.
            cache = self.cache
            lengths = [len(cache.ids[s]) for s in range(len(self.rows))]
            if (step := self._native_step()) is not None:  # the whole step in one call
                logits = step([int(row.token) for row in self.rows], lengths)[:, : self.engine.tokenizer.n_vocab]
            else:
                x = torch.stack([row.token for row in self.rows]).view(-1, 1)
                pos = torch.tensor(lengths, device=cache.device)
                rows = RowCache(cache.k, cache.v, pos=pos, span=max(lengths) + 1)
                logits = self.engine.model(x, rows, last_only=True)[:, -1, : self.engine.tokenizer.n_vocab]
            for slot, row in enumerate(self.rows):
                row.logits = logits[slot]
                tid = int(row.token)
                cache.ids[slot].append(tid)
                row.take(tid, stop_ids)
        for row in [r for r in self.rows if r.finish]:
            self._leave(row)

    def _native_step(self):
        """gpt.native's whole step on this batch's cache tensors (rebuilt when they grow), or None."""
        if self.engine.device.type != "cpu":
            return None
        if self._native is None or (self._native and self._native.k is not self.cache.k):
            self._native = native_step(self.engine.model, self.cache.k, self.cache.v) or False
        return self._native or None

    def fail(self, message: str) -> None:
        """Drop every row after a step failed (a bug), telling each request `message`."""
        rows, self.rows = self.rows, []
        self._restore_threads()
        for slot in range(self.cache.slots):  # a half-done step leaves no prefix to trust
            self.cache.ids[slot] = []
        for row in rows:
            row.req.on_error(message)

    def _leave(self, row: _Row) -> None:
        """Move the row's slot to the end of the batch (keeping its contents for reuse), then
        finish it: the last row out restores the thread count before its Done is seen."""
        i, last = self.rows.index(row), len(self.rows) - 1
        self.cache.swap(i, last)
        self.rows[i], self.rows[last] = self.rows[last], self.rows[i]
        self.rows.pop()
        if not self.rows:
            self._restore_threads()
        tail = row.text.finish()
        if tail:
            row.req.on_text(tail)
        row.req.on_done(row.result())

    # -- CPU threads (see Engine.threads): set when the batch starts, restored when it empties --

    def _set_threads(self) -> int:
        if self.engine.device.type != "cpu":
            return 0
        if self._threads_before is None:
            self._threads_before = torch.get_num_threads()
        torch.set_num_threads(self.engine.threads or gpt.engine.fit_threads())
        return torch.get_num_threads()

    def _restore_threads(self) -> None:
        if self._threads_before is not None and not self.rows:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None
