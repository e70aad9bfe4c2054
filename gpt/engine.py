"""Generation: prefill the prompt, then decode one token at a time over a preallocated KV cache.

    engine = Engine.load("path/to/model")
    for item in engine.stream_chat(messages, SamplingParams(temperature=0)):
        if isinstance(item, str): print(item, end="")   # text deltas
        else: result = item                              # the final GenerationResult

Prefix reuse: the engine remembers which token ids its cache holds. A new prompt that starts with
the same tokens (the next turn of a conversation) rewinds the cache to the shared prefix and
prefills only the rest, so time to first token does not grow with the conversation.

Context window (one rule): the answer gets its budget first, `min(max_new_tokens, context // 2)`
positions; the prompt must fit in the rest. A chat that is too long keeps its system prompt and
as many of the newest messages as fit, dropping whole messages oldest first (and an assistant
message left at the front, so the kept history starts with a user turn). If even the newest
message does not fit, or for a raw text prompt, the prompt keeps its last tokens. The result's
`dropped_tokens` says how many prompt tokens were left out. With `truncate=False` a prompt that
does not fit is refused instead (ContextLengthExceeded), which is what an API client expects.
Generation stops with "length" at max_new_tokens or when the context window is full.

Log-probabilities (`logprobs=N`): each answer token's, with the N most likely at its step, are
log_softmax of the logits after the request's penalties, temperature and filters (see
Sampler.log_probs), and so is the stop token that ended the answer (`stop_logprob`); `echo=True`
also scores the prompt (Engine.score_prompt), each token under the raw logits of the tokens
before it (nothing was sampled there), the first token having none.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import itertools
import random
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from gpt.chat_template import (
    QUESTION,
    fit_references,
    grounded,
    header_ids,
    render_message,
    render_prompt,
    stop_token_ids,
    validate_messages,
)
from gpt.device import pick_device, pick_dtype
from gpt.errors import KettleError
from gpt.model import GPT, KVCache, RowCache, common_prefix
from gpt.native import NativeStep, native_step
from gpt.sampling import MAX_SEED, CopyBias, Sampler, SamplingParams
from gpt.speculative import DraftModel, PromptLookup, Speculator
from gpt.threads import fit_threads
from gpt.tokenizer import Tokenizer


class ContextLengthExceeded(KettleError):
    """A prompt too long for the context window, where trimming it was not wanted."""

    code = "context_length_exceeded"


@dataclass
class TokenLogprob:
    token: int
    logprob: float | None  # None for a prompt's first token
    top: list[tuple[int, float]] = field(default_factory=list)  # most likely first


@dataclass
class GenerationResult:
    text: str
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int  # tokens the model saw as the prompt (after trimming)
    new_tokens: int  # tokens generated (an end-of-turn token is not counted)
    dropped_tokens: int = 0  # prompt tokens left out to fit the context window
    cached_tokens: int = 0  # prompt tokens reused from the previous request's KV cache
    ttft_s: float = 0.0  # time to first token, from the call to the first sampled token
    tokens_per_s: float = 0.0  # decode speed: tokens after the first / time after the first
    seed: int = 0  # the seed actually used; pass it back to reproduce the text
    threads: int = 0  # CPU threads the model ran on (0: a GPU)
    token_ids: list[int] = field(default_factory=list)
    drafted_tokens: int = 0  # tokens speculative decoding proposed (see gpt.speculative)
    accepted_tokens: int = 0  # of those, the ones the model kept
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry, when asked
    prompt_logprobs: list[TokenLogprob] | None = None  # one per prompt token, with echo
    # The stop token that ended the answer (finish "stop"; not in token_ids), when logprobs
    # were asked: an echoed prompt's scorer reads the token after it (lm-eval drops the last).
    stop_logprob: TokenLogprob | None = None

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    def to_dict(self) -> dict:
        return asdict(self) | {"acceptance_rate": self.acceptance_rate}


# A speculative round checks up to MAX_DRAFTS drafts (PromptLookup's max_draft); it pays where such
# a check costs at most CHECK_PAYS one-token steps (Engine._checking_drafts_pays).
MAX_DRAFTS = PromptLookup.max_draft
CHECK_PAYS = 4.0


class Engine:
    """One model, one KV cache, one request at a time (a lock serialises concurrent callers)."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, device: str | torch.device | None = None, name: str = "model"):
        if device is None:
            self.device = next(model.parameters()).device
        else:
            self.device = pick_device(device)
            model = model.to(self.device)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.stop_ids = stop_token_ids(tokenizer)
        self._assistant_header = header_ids("assistant", tokenizer)
        self._cache: KVCache | None = None
        self._cached_ids: list[int] = []  # exactly the tokens whose keys/values the cache holds
        self._lock = threading.Lock()
        # CPU threads for generating (None: fitted to the machine's load at each request, see
        # gpt.threads). Set to 1 while other work keeps the cores busy: then every parallel step
        # of 2+ threads waits for a thread the OS has parked, and decoding gets slower and
        # erratic (0.7 ms a token on one thread, 2-60 ms on two, for a 1M-parameter model beside
        # a training job on 2 cores).
        self.threads: int | None = None
        # Speculative decoding (gpt.speculative), or None for one token per forward pass. Greedy
        # answers on the CPU, where checking drafts pays (_checking_drafts_pays, measured at the
        # first request): prompt lookup with rounds that adapt their length and pause after
        # rejected drafts. Through PyTorch's step (no native kernel; benchmarks/speculative.py)
        # it decoded answers that copy their prompt 2.17-2.31x as fast at the starter's shape,
        # answers that copy nothing 1.01x (0.87x without the pause). Sampled answers
        # (speculate_sampled): 0.98-1.43x copying, 0.86-0.91x not; GPUs unmeasured: one token a step.
        self.speculation: PromptLookup | DraftModel | None = PromptLookup() if self.device.type == "cpu" else None
        self.speculate_sampled = False
        self._compiled: CompiledStep | None = None
        self._native: tuple[KVCache, NativeStep | None] | None = None  # gpt.native's step for the cache
        self._drafts_pay: bool | None = None  # measured at the first speculated request
        self._compile_backend: str | None = None  # set by compile_decode

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        device: str | torch.device | None = None,
        *,
        dtype: torch.dtype | None = None,
        quantize: str | None = None,
    ) -> "Engine":
        """`quantize` ("int8", gpt.quantize) runs on the CPU, which is then the default device."""
        from gpt.checkpoint import load_model
        from gpt.quantize import decoding_layout

        device = pick_device("cpu" if quantize and device is None else device)
        model, tokenizer = load_model(model_dir, device, dtype=dtype or pick_dtype(device), quantize=quantize)
        if device.type == "cpu" and not quantize and model.wte.weight.dtype == torch.float32:
            decoding_layout(model)
        return cls(model, tokenizer, name=Path(model_dir).name)

    def compile_decode(self, backend: str = "inductor") -> None:
        """Decode through a compiled step (CompiledStep), one token per forward pass: speculative
        decoding is turned off, its verifying passes would run uncompiled. The step compiles at
        the first token decoded (a minute or so on a CPU, where it needs a C++ compiler)."""
        self.speculation = None
        self._compile_backend = backend

    @property
    def context_length(self) -> int:
        return self.model.config.context_length

    def prompt_budget(self, params: SamplingParams) -> int:
        """How many prompt tokens fit once the answer has its budget (see the module docstring)."""
        return self.context_length - min(params.max_new_tokens, self.context_length // 2)

    # --- chat ------------------------------------------------------------------------------------

    def ground(
        self, messages: list[dict], references: list[str], params: SamplingParams, *, taught: int = 0
    ) -> tuple[list[dict], int]:
        """The conversation with as many `references` (best first; the first `taught` of them the
        user's own answers) as leave room for the newest question and the answer, and how many
        went in (gpt.chat_template.grounded)."""
        validate_messages(messages)
        users = [m for m in messages if m["role"] == "user"]
        if not references or not users:
            return messages, 0
        own = len(
            render_prompt(
                [*messages[:1], users[-1]] if messages[0]["role"] == "system" else [users[-1]], self.tokenizer
            )
        )
        budget = min(self.prompt_budget(params) - own, self.context_length // 2)
        kept = fit_references(references, self.tokenizer, budget)
        return grounded(messages, kept, taught=taught), len(kept)

    def copy_bias(self, messages: list[dict]) -> CopyBias | None:
        """The copy bias of a grounded conversation (its newest turn carries "references"): each
        passage's answer part (after its first line: a correction's question, a documented name's
        signature) as token ids, and where a new sentence or line begins in it."""
        references = messages[-1].get("references") if messages and messages[-1]["role"] == "user" else None
        if not references:
            return None
        bodies, open_ = [], []
        taught = messages[-1].get("taught", 0)
        asked = _content_words(messages[-1]["content"].rpartition(QUESTION)[2])
        for rank, reference in enumerate(references):
            head, _, rest = reference.partition("\n")
            # lines wrapped inside a paragraph (docstrings are) joined, as an answer writes them;
            # each paragraph encoded on its own, so that its last sentence's end is a token of
            # its own (not ".\n\n"), which an answer that stops there writes
            paragraphs = [" ".join(p.split()) for p in (rest or head).split("\n\n") if p.strip()]
            if rank >= taught:  # a document: from the sentence that answers the question
                paragraphs = _from_answering_sentence(paragraphs, asked)
            ids = []
            for i, paragraph in enumerate(paragraphs):
                ids += (self.tokenizer.encode("\n\n") if i else []) + self.tokenizer.encode(paragraph)
            texts = [self.tokenizer.decode([t]) for t in ids]
            bodies.append(ids)
            open_.append(
                [
                    j > 0
                    and "\n" not in texts[j]
                    and not (texts[j - 1].endswith((".", "!", "?")) and texts[j][:1].isspace())
                    for j in range(len(ids))
                ]
            )
        return CopyBias(bodies, open_, self.stop_ids, taught=taught)

    def chat_prompt(self, messages: list[dict], params: SamplingParams) -> tuple[list[int], int]:
        """The chat prompt's token ids trimmed to the window, and how many tokens were dropped."""
        validate_messages(messages)
        segments = [render_message(m, self.tokenizer) for m in messages]
        full = _joined(segments) + self._assistant_header  # not sum(): quadratic in the messages
        budget = self.prompt_budget(params)
        if len(full) <= budget:
            return full, 0
        system = segments[0] if messages and messages[0]["role"] == "system" else []
        first = 1 if system else 0
        used = len(system) + len(self._assistant_header)
        start = len(segments)
        while start > first and used + len(segments[start - 1]) <= budget:
            start -= 1
            used += len(segments[start])
        if start < len(segments) - 1 and messages[start]["role"] == "assistant":
            start += 1
        if start == len(segments):  # not even the newest message fits: keep the last tokens
            kept = full[-budget:]
        else:
            kept = system + _joined(segments[start:]) + self._assistant_header
        return kept, len(full) - len(kept)

    def stream_chat(
        self,
        messages: list[dict],
        params: SamplingParams,
        *,
        cancel: threading.Event | None = None,
        logprobs: int | None = None,
        truncate: bool = True,
    ) -> Iterator[str | GenerationResult]:
        """Answer the conversation as the assistant: text deltas, then a GenerationResult."""
        ids, dropped = self.chat_ids(messages, params, truncate=truncate)
        copy = self.copy_bias(messages)
        return self._generate(ids, params, cancel=cancel, dropped=dropped, logprobs=logprobs, copy=copy)

    def chat_ids(self, messages: list[dict], params: SamplingParams, *, truncate: bool = True) -> tuple[list[int], int]:
        """stream_chat's prompt ids and how many tokens were dropped (ContextLengthExceeded when
        some had to be and `truncate` is False); gpt.batching starts from here too."""
        params.validate()
        ids, dropped = self.chat_prompt(messages, params)
        if dropped and not truncate:
            self._too_long(len(ids) + dropped, params)
        return ids, dropped

    # --- raw text completion ---------------------------------------------------------------------

    def stream(
        self,
        prompt: list[int] | str,
        params: SamplingParams,
        *,
        cancel: threading.Event | None = None,
        logprobs: int | None = None,
        echo: bool = False,
        truncate: bool = True,
    ) -> Iterator[str | GenerationResult]:
        """Continue `prompt` (token ids or text): text deltas, then a GenerationResult."""
        ids, dropped = self.completion_ids(prompt, params, truncate=truncate)
        return self._generate(ids, params, cancel=cancel, dropped=dropped, logprobs=logprobs, echo=echo)

    def completion_ids(
        self, prompt: list[int] | str, params: SamplingParams, *, truncate: bool = True
    ) -> tuple[list[int], int]:
        """stream's prompt ids (trimmed to the window) and how many were dropped, as chat_ids."""
        params.validate()
        ids = self.prompt_ids(prompt)
        dropped = max(0, len(ids) - self.prompt_budget(params))
        if dropped and not truncate:
            self._too_long(len(ids), params)
        return ids[dropped:], dropped

    def prompt_ids(self, prompt: list[int] | str) -> list[int]:
        """A raw prompt's token ids, checked against the vocabulary (not trimmed)."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:  # GPT-2's convention: an unconditional sample starts at end-of-text
            ids = [self.tokenizer.eot_id]
        if max(ids) >= self.tokenizer.n_vocab or min(ids) < 0:
            raise KettleError(
                f"prompt holds token ids outside the model's vocabulary (0..{self.tokenizer.n_vocab - 1})"
            )
        return ids

    def score_prompt(self, ids: list[int], *, top: int = 0) -> list[TokenLogprob]:
        """Each of `ids` under the raw logits after the tokens before it (the first has none),
        as Hugging Face scores an export (lm-eval's `hf` model): log_softmax over the model's
        whole output, a padded vocabulary included (the `top` most likely are the tokenizer's
        ids). A prompt longer than the context is scored in windows of the context's length:
        from the start, each window feeds the next `context` tokens and scores the ones after
        them; the last ends at the prompt's end, reaching back as far as the context allows, and
        scores what is left. These are the windows of lm-eval's perplexity (rolling) scoring."""
        n, width = len(ids), self.context_length
        out = [TokenLogprob(ids[0], None)]
        done = 0  # ids[: done + 1] are scored
        with torch.inference_mode():
            while done < n - 1:
                start = done if done + width < n - 1 else max(0, n - 1 - width)
                window = ids[start : min(start + width, n - 1)]
                logits = self.model(torch.tensor([window], dtype=torch.long, device=self.device))[0]
                log_probs = logits.float().log_softmax(-1)[:, : self.tokenizer.n_vocab]
                end = start + len(window)
                out += [_entry(ids[p], log_probs[p - 1 - start], top=top) for p in range(done + 1, end + 1)]
                done = end
        return out

    def _too_long(self, prompt_tokens: int, params: SamplingParams):
        answer = self.context_length - self.prompt_budget(params)
        raise ContextLengthExceeded(
            f"the prompt is {prompt_tokens} tokens, but this model's context of "
            f"{self.context_length} tokens holds at most {self.context_length - answer} once the "
            f"answer has its {answer}"
        )

    def tokenize(self, text: str) -> list[int]:
        """`text`'s token ids with special-token strings as the special tokens (as Hugging Face
        tokenizers read them: what evaluation harnesses count with)."""
        return self.tokenizer.encoding.encode(text, allowed_special="all")

    def generate(
        self, prompt: list[int] | str, params: SamplingParams, *, cancel: threading.Event | None = None, **options
    ) -> GenerationResult:
        """`stream` without the deltas."""
        return _last(self.stream(prompt, params, cancel=cancel, **options))

    def generate_chat(
        self, messages: list[dict], params: SamplingParams, *, cancel: threading.Event | None = None, **options
    ) -> GenerationResult:
        return _last(self.stream_chat(messages, params, cancel=cancel, **options))

    def reset(self) -> None:
        """Forget the cached prefix (the next request prefills its whole prompt)."""
        with self._lock:
            self._cached_ids = []
            if self._cache is not None:
                self._cache.truncate(0)

    # --- the loop --------------------------------------------------------------------------------

    def _prefill(self, ids: list[int]) -> tuple[torch.Tensor, int]:
        """Bring the cache to hold `ids`, reusing the longest shared prefix; the last logits."""
        if self._cache is None:
            self._cache = KVCache(
                self.model.config, 1, max_len=self.context_length, device=self.device, dtype=self.model.wte.weight.dtype
            )
        # At least one token must be fed to get logits for the next one.
        common = min(common_prefix(self._cached_ids, ids), len(ids) - 1)
        self._cache.truncate(common)
        self._cached_ids = ids[:common]
        x = torch.tensor([ids[common:]], dtype=torch.long, device=self.device)
        logits = self._next_logits(x)
        self._cached_ids = list(ids)
        return logits, common

    def _next_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The logits [V] for the token after `x` (fed through the cache). Only the tokenizer's
        ids: a model's vocabulary may be larger (padded for speed, or a small corpus gave the
        tokenizer fewer merges than asked), and an id it cannot decode must never be drawn."""
        if x.size(1) == 1 and (step := self._native_step()) is not None:  # the whole step in one call
            logits = step([int(x)], [self._cache.pos])
            self._cache.pos += 1
            return logits[0, : self.tokenizer.n_vocab]
        if self._compile_backend is None or x.size(1) != 1:
            return self.model(x, self._cache, last_only=True)[0, -1, : self.tokenizer.n_vocab]
        if self._compiled is None or self._compiled.cache is not self._cache:
            self._compiled = CompiledStep(self.model, self._cache, backend=self._compile_backend)
        return self._compiled(x.view(1))[0, : self.tokenizer.n_vocab]

    def _check_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The logits [T, vocab] after each of the T tokens of `x` [1, T], fed through the cache
        (a speculative round's check): in one native call where the engine decodes natively."""
        step = self._native_step()
        if step is None:
            return self.model(x, self._cache)[0, :, : self.tokenizer.n_vocab]
        start, ids = self._cache.pos, x[0].tolist()
        logits = step(ids, list(range(start, start + len(ids))), [0] * len(ids))
        self._cache.pos += len(ids)
        return logits[:, : self.tokenizer.n_vocab]

    def _checking_drafts_pays(self) -> bool:
        """Whether a speculative round's check (the last token and MAX_DRAFTS drafts in one
        pass) costs at most CHECK_PAYS steps of one token, measured once on this machine and
        model, with the cache just prefilled (positions past it are written, then forgotten).
        Where a step streams weights from memory (GPT-2 124M, 4 x 256 with GPT-2's vocabulary,
        the native step here: a check costs 2.9 and 2.5 steps) a round that keeps 7 drafts is
        2.5-3x as fast as its tokens one by one; where the weights sit in the CPU's cache (the
        starter's shape: 6.2 steps) prompt lookup measured 1.23x on an answer that copies its
        prompt and 0.90x on one that does not (benchmarks/speculative.py)."""
        if self._drafts_pay is None:
            step, pos = self._native_step(), self._cache.pos
            if step is None or pos + MAX_DRAFTS + 1 > self._cache.max_len:
                return True  # PyTorch's step: measured to pay (see __init__), or no room to tell
            one, check = float("inf"), float("inf")
            for _ in range(3):
                start = time.perf_counter()
                step([0], [pos])
                middle = time.perf_counter()
                step([0] * (MAX_DRAFTS + 1), list(range(pos, pos + MAX_DRAFTS + 1)), [0] * (MAX_DRAFTS + 1))
                one, check = min(one, middle - start), min(check, time.perf_counter() - middle)
            self._drafts_pay = check <= CHECK_PAYS * one
        return self._drafts_pay

    def _native_step(self) -> NativeStep | None:
        """gpt.native's whole step on this engine's cache, or None where it cannot run."""
        if self._compile_backend is not None or self.device.type != "cpu":
            return None
        if self._native is None or self._native[0] is not self._cache:
            self._native = (self._cache, native_step(self.model, self._cache.k, self._cache.v))
        return self._native[1]

    def _generate(
        self,
        ids: list[int],
        params: SamplingParams,
        *,
        cancel: threading.Event | None,
        dropped: int,
        logprobs: int | None = None,
        echo: bool = False,
        copy: CopyBias | None = None,
    ) -> Iterator[str | GenerationResult]:
        seed = params.seed if params.seed is not None else random.SystemRandom().randrange(MAX_SEED)
        max_new = min(params.max_new_tokens, self.context_length - len(ids))
        start = time.perf_counter()
        on_cpu = self.device.type == "cpu"
        with self._lock, _torch_threads((self.threads or fit_threads()) if on_cpu else None):
            threads = torch.get_num_threads() if on_cpu else 0
            text = TextStream(self.tokenizer, params.stop)
            tokens: list[int] = []
            finish, cached, first_at = "length", 0, None
            sampler = None
            logits = None
            scored: list[TokenLogprob] | None = None if logprobs is None else []
            prompt_scored = self.score_prompt(ids, top=logprobs or 0) if echo else None
            stop_scored = None
            speculator, decided = None, []  # decided: tokens a speculative round chose ahead
            for _ in range(max_new):
                if cancel is not None and cancel.is_set():
                    finish = "cancelled"
                    break
                with torch.inference_mode():
                    if logits is None:
                        logits, cached = self._prefill(ids)
                        sampler = Sampler(params, logits.size(-1), self.device, ids, seed, copy=copy)
                        # the drafts are checked with the request's own sampler, copy bias
                        # and all: a grounded answer, which copies its passages, is speculated
                        speculate = self.speculation is not None and (params.greedy or self.speculate_sampled)
                        if speculate and self._checking_drafts_pays():
                            speculator = Speculator(
                                self,
                                self.speculation.begin(self, ids, params=params, sampler=sampler),
                                sampler,
                                params,
                                scored is not None,
                            )
                    more = len(tokens) + 1 < max_new
                    if decided:
                        tid, log_probs = decided.pop(0)
                    else:
                        if scored is not None:
                            log_probs = sampler.log_probs(logits)
                        token = sampler(logits)
                        if first_at is None:  # the first token itself, not the step queued after it
                            int(token)
                            first_at = time.perf_counter()
                        # Queue the next forward pass before reading the token back: on a GPU it
                        # then runs while the CPU decodes text and checks stop strings.
                        if more and speculator is None:
                            logits = self._next_logits(token.view(1, 1))
                        tid = int(token)
                    if more and speculator is not None and not decided:  # it caches what it keeps
                        decided = speculator.round(tid, max_new - len(tokens) - 1)
                if more and speculator is None:
                    self._cached_ids.append(tid)
                if tid in self.stop_ids:
                    finish = "stop"
                    if scored is not None:
                        stop_scored = _entry(tid, log_probs, top=logprobs)
                    break
                tokens.append(tid)
                if scored is not None:
                    scored.append(_entry(tid, log_probs, top=logprobs))
                delta = text.feed(tid)
                if delta:
                    yield delta
                if text.matched:
                    finish = "stop"
                    break
            tail = text.finish()
            if tail:
                yield tail
        end = time.perf_counter()
        decode_s = end - first_at if first_at is not None else 0.0
        yield GenerationResult(
            text=text.text,
            finish_reason=finish,
            prompt_tokens=len(ids),
            new_tokens=len(tokens),
            dropped_tokens=dropped,
            cached_tokens=cached,
            ttft_s=(first_at - start) if first_at is not None else end - start,
            tokens_per_s=(len(tokens) - 1) / decode_s if len(tokens) > 1 and decode_s > 0 else 0.0,
            seed=seed,
            threads=threads,
            token_ids=tokens,
            logprobs=scored,
            drafted_tokens=speculator.drafted if speculator else 0,
            accepted_tokens=speculator.accepted if speculator else 0,
            prompt_logprobs=prompt_scored,
            stop_logprob=stop_scored,
        )


class CompiledStep:
    """The batch-1 decoding step through torch.compile. Every step has the same shapes — the
    cache's whole length is attended (RowCache), the keys past the position masked, and the
    position is a tensor — so it compiles once, and on CUDA ("reduce-overhead") each step is one
    CUDA graph replayed: at batch 1 a small model's step is otherwise hundreds of tiny kernels
    launched one by one. Attending all of max_len costs a read of the whole cache per token
    where the eager step reads what is filled: at GPT-2 124M and its 1,024 positions, 75 MB
    next to the weights' 500."""

    def __init__(self, model: GPT, cache: KVCache, *, backend: str = "inductor"):
        self.model, self.cache = model, cache
        device = cache.k.device
        for t in (cache.k, cache.v):  # written in place each step: a CUDA graph's fixed inputs
            torch._dynamo.mark_static_address(t)
        self._pos = torch.zeros(1, dtype=torch.long, device=device)
        self._graphs = device.type == "cuda" and backend == "inductor"
        mode = "reduce-overhead" if self._graphs else None
        self._step = torch.compile(self._forward, backend=backend, mode=mode, fullgraph=True, dynamic=False)

    def _forward(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        rows = RowCache(self.cache.k, self.cache.v, pos=pos, span=self.cache.max_len)
        return self.model.lm_head(self.model.hidden_states(token.view(1, 1), rows))[:, -1]

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        """The logits [1, V] after `token` [1], fed at the cache's position (which moves on)."""
        self._pos.fill_(self.cache.pos)
        logits = self._step(token, self._pos)
        self.cache.pos += 1
        # A CUDA graph's output is overwritten by its next replay: the caller may keep this one.
        return logits.clone() if self._graphs else logits


class TextStream:
    """Turns generated token ids into text deltas.

    Bytes are decoded incrementally, so a character split over several tokens is shown once it
    is complete. Stop strings are found in the decoded text, also across token boundaries: text
    that could still be the start of a stop string is held back until the next tokens decide, and
    a matched stop string and everything after it is never emitted.
    """

    def __init__(self, tokenizer: Tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stop = stop
        self.longest = max((len(s) for s in stop), default=0)
        self.text = ""
        self.sent = 0
        self.matched: str | None = None

    def feed(self, token_id: int) -> str:
        """Add one token; returns the text that can be shown now."""
        if self.matched is not None:
            return ""
        piece = self.utf8.decode(self.tokenizer.decode_bytes([token_id]))
        scan_from = max(0, len(self.text) - self.longest + 1)
        self.text += piece
        if not self.stop:
            return self._emit(len(self.text))
        hits = [(i, s) for s in self.stop if (i := self.text.find(s, scan_from)) != -1]
        if hits:
            cut, self.matched = min(hits)
            self.text = self.text[:cut]
            return self._emit(cut)
        return self._emit(len(self.text) - self._partial_suffix())

    def finish(self) -> str:
        """Generation ended: unless a stop string matched, everything held back is text."""
        if self.matched is not None:
            return ""
        self.text += self.utf8.decode(b"", final=True)
        return self._emit(len(self.text))

    def _partial_suffix(self) -> int:
        """Length of the longest end of the text that begins some stop string."""
        for n in range(min(self.longest - 1, len(self.text) - self.sent), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def _emit(self, upto: int) -> str:
        upto = max(upto, self.sent)
        delta, self.sent = self.text[self.sent : upto], upto
        return delta


@contextlib.contextmanager
def _torch_threads(n: int | None):
    """PyTorch's intra-op thread count set to n for the block (a process-wide setting)."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _entry(token: int, log_probs: torch.Tensor, *, top: int) -> TokenLogprob:
    """`token`'s log-probability in `log_probs` [V] and the `top` most likely (none removed)."""
    values, ids = log_probs.topk(min(top, log_probs.numel()))
    return TokenLogprob(
        token, float(log_probs[token]), [(int(i), float(v)) for v, i in zip(values, ids) if v > float("-inf")]
    )


# Words a question is made of whatever it asks, left out when finding the sentence of a passage
# that answers it.
_ASKING = frozenset(
    "how what why when where which who whom does did should would could can the and for with you your that this "
    "from into about have has are was were will not use get make need want there their them they its it's "
    "is do i a an of to in on or be my me".split()
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9`\"'(])")


def _content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9_]+", text.lower()) if len(w) > 1 and w not in _ASKING}


def _from_answering_sentence(paragraphs: list[str], asked: set[str]) -> list[str]:
    """`paragraphs` from the sentence that holds the most of the question's words, where that is
    two words at least and more than the first sentence holds; as they are otherwise. A document
    says what it says in its own order: asked "How long should I steep zorblax tea?" beside a
    note whose first sentence warns about boiling water, the answer copied the warning."""
    sentences = [(i, s) for i, p in enumerate(paragraphs) for s in _SENTENCE_END.split(p)]
    if len(sentences) < 2 or not asked:
        return paragraphs
    held = [len(asked & _content_words(s)) for _, s in sentences]
    best = max(range(len(held)), key=lambda j: (held[j], -j))
    if best == 0 or held[best] < 2 or held[best] <= held[0]:
        return paragraphs
    at, sentence = sentences[best]
    rest = paragraphs[at]
    return [rest[rest.index(sentence) :], *paragraphs[at + 1 :]]


def _joined(segments: list[list[int]]) -> list[int]:
    return list(itertools.chain.from_iterable(segments))


def _last(items):
    tail = collections.deque(items, maxlen=1)  # runs the iterator to its end, keeping one item
    return tail[0] if tail else None
