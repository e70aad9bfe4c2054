"""Speculative decoding, lossless: guess the next tokens cheaply, check them all in one pass.

At batch 1 a decoding step reads every weight to produce one token; feeding k + 1 tokens through
the KV cache reads them once too and scores every position. Each round feeds the last decided
token and k drafted ones, then walks the k + 1 logits in order with the request's own Sampler:

- greedy: a draft token is kept while it is the argmax the plain loop would have picked (so the
  tokens are the plain loop's, token for token); the first mismatch, or the position after the
  last draft, gives the model's own token;
- sampled: the standard accept/reject rule (Leviathan et al. 2023, Chen et al. 2023): draft token
  d, drawn from q, is kept with probability min(1, p(d) / q(d)), where p is what the plain loop
  would draw from (penalties, temperature and filters applied); on a rejection the token is drawn
  from max(0, p - q), renormalised. The output then follows p exactly, whatever q is.

The cache is rewound past the rejected drafts, so it always holds exactly the decided tokens
but the newest one, which the next round feeds first. Drafters:

- PromptLookup: the continuation of the longest recent n-gram of the context that matches its
  last tokens (answers that repeat the question, corrected text, code); q is a point mass. With
  no match a round drafts nothing and is a plain decoding step.
- DraftModel: a smaller model with the same tokenizer proposes k tokens with its own KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpt.errors import KettleError
from gpt.model import GPT, KVCache, common_prefix
from gpt.sampling import Sampler, SamplingParams


@dataclass
class PromptLookup:
    """Draft up to `max_draft` tokens by copying what followed the last `max_ngram` ..
    `min_ngram` tokens where they occurred before (the longest match, then the latest)."""

    max_draft: int = 8
    max_ngram: int = 3
    min_ngram: int = 2  # a single repeated token is too weak a hint: most such drafts fail

    def begin(self, engine, prompt_ids: list[int], *, params: SamplingParams, sampler: Sampler) -> "_Lookup":
        return _Lookup(self, prompt_ids)


class _Lookup:
    """One request's n-gram index: for each n-gram, where the tokens after its latest occurrence
    start. Kept up to date as tokens are decided, so a lookup costs no scan of the context."""

    def __init__(self, config: PromptLookup, ids: list[int]):
        self.config = config
        self.history: list[int] = []
        self.index: dict[tuple[int, ...], int] = {}
        self.extend(ids)

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            end = len(self.history)
            for n in range(self.config.min_ngram, self.config.max_ngram + 1):
                if end >= n:
                    self.index[tuple(self.history[end - n : end])] = end
            self.history.append(token)

    def propose(self, k: int) -> tuple[list[int], None]:
        """Up to k tokens to follow the history, and their draft distributions (None: each a
        point mass on its token)."""
        h = self.history
        for n in range(min(self.config.max_ngram, len(h)), self.config.min_ngram - 1, -1):
            start = self.index.get(tuple(h[-n:]))
            if start is not None:
                return h[start : start + min(k, self.config.max_draft)], None
        return [], None


class DraftModel:
    """Draft with a smaller model (say GPT-2 124M for GPT-2 XL): greedy requests take its argmax,
    sampled ones draw from its distribution at the request's temperature and filters."""

    def __init__(self, model: GPT, max_draft: int = 4):
        self.model = model.eval()
        self.max_draft = max_draft

    def check(self, target: GPT, n_vocab: int) -> None:
        """Refuse a draft model that cannot stand in for `target` (its tokenizer's size is all
        that can be checked from here: the caller pairs models with the same tokenizer)."""
        if self.model.config.vocab_size < n_vocab:
            raise KettleError(
                f"the draft model's vocabulary ({self.model.config.vocab_size} tokens) "
                f"is smaller than the tokenizer's ({n_vocab}): not the same tokenizer"
            )
        if self.model.config.context_length < target.config.context_length:
            raise KettleError(
                f"the draft model's context ({self.model.config.context_length} tokens) "
                f"is shorter than the model's ({target.config.context_length})"
            )

    def begin(self, engine, prompt_ids: list[int], *, params: SamplingParams, sampler: Sampler) -> "_Draft":
        self.check(engine.model, engine.tokenizer.n_vocab)
        return _Draft(self, engine.tokenizer.n_vocab, prompt_ids, params, sampler)


class _Draft:
    def __init__(self, config: DraftModel, n_vocab: int, ids: list[int], params: SamplingParams, sampler: Sampler):
        model = config.model
        self.model, self.max_draft, self.n_vocab = model, config.max_draft, n_vocab
        self.cache = KVCache(
            model.config,
            1,
            max_len=model.config.context_length,
            device=model.wte.weight.device,
            dtype=model.wte.weight.dtype,
        )
        self.cached: list[int] = []  # the tokens the draft's cache holds
        self.history = list(ids)
        # Any q keeps the output lossless; penalties would need their own state, so q has none.
        self.sampler = (
            None
            if params.greedy
            else Sampler(
                params.replace(repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0),
                self.n_vocab,
                model.wte.weight.device,
                [],
                0,
            )
        )
        if self.sampler is not None:
            self.sampler.generator = sampler.generator  # one seed reproduces the whole answer

    def extend(self, tokens: list[int]) -> None:
        self.history.extend(tokens)

    def propose(self, k: int) -> tuple[list[int], list[torch.Tensor] | None]:

        k = min(k, self.max_draft)
        if k == 0:
            return [], None
        common = min(common_prefix(self.cached, self.history), len(self.history) - 1)
        self.cache.truncate(common)
        x = self.history[common:]
        self.cached = list(self.history)
        drafts, dists = [], []
        for i in range(k):
            logits = self.model(torch.tensor([x], device=self.cache.k.device), self.cache, last_only=True)[
                0, -1, : self.n_vocab
            ]
            if self.sampler is None:
                token = int(logits.argmax())
            else:
                q = self.sampler.distribution(logits)
                token = int(torch.multinomial(q, 1, generator=self.sampler.generator))
                dists.append(q)
            drafts.append(token)
            if i + 1 < k:
                x = [token]
                self.cached.append(token)
        return drafts, dists if self.sampler is not None else None


MAX_PAUSE = 32  # tokens decoded one at a time after rejected drafts, at most (Speculator.pause)


class Speculator:
    """Decides the tokens of one request a round at a time (see the module docstring)."""

    def __init__(self, engine, drafter, sampler: Sampler, params: SamplingParams, want_logprobs: bool):
        self.engine, self.drafter, self.sampler = engine, drafter, sampler
        self.greedy, self.want_logprobs = params.greedy, want_logprobs
        self.drafted = self.accepted = 0
        # Drafts to ask for next round: two more after a round that kept them all, one more than
        # were kept after one that did not. A rejected draft costs a position of the pass for
        # nothing: on text that copies nothing rounds shrink at once to one draft, which costs
        # little more than a plain step, and they grow back as soon as drafts are kept.
        self.draft_len: int | None = None  # None: as many as the drafter offers
        # After a round whose drafts were all rejected, the next rounds draft nothing, twice as
        # many after each such round in a row (up to MAX_PAUSE): on text that copies nothing the
        # rejected passes cost more than speculation won (greedy 0.87x plain at the starter's
        # shape); a draft kept ends the pause.
        self.pause = self.misses = 0

    def round(self, last: int, budget: int) -> list[tuple[int, torch.Tensor | None]]:
        """Feed `last` (decided, not yet cached) and drafts; 1 to `budget` newly decided tokens,
        each with its log-probabilities when asked for. The newest is not fed yet."""
        engine, sampler = self.engine, self.sampler
        self.drafter.extend([last])
        want = budget - 1 if self.draft_len is None else min(budget - 1, self.draft_len)
        drafts, q = ([], None) if self.pause else self.drafter.propose(want)
        self.pause = max(0, self.pause - 1)
        cache = engine._cache
        start = cache.pos
        x = torch.tensor([[last] + drafts], dtype=torch.long, device=engine.device)
        logits = engine._check_logits(x)
        decided = []
        for i, row in enumerate(logits):
            log_probs = sampler.log_probs(row) if self.want_logprobs else None
            if i == len(drafts):  # past the drafts: the model's own next token
                decided.append((int(sampler(row)), log_probs))
                break
            token = self._check(row, drafts[i], q=None if q is None else q[i])
            decided.append((token, log_probs))
            if token != drafts[i]:
                break
        kept = len(decided) - 1  # the drafts accepted
        self.drafted += len(drafts)
        self.accepted += kept
        if drafts:
            self.draft_len = len(drafts) + 2 if kept == len(drafts) else kept + 1
            self.misses = 0 if kept else self.misses + 1
            self.pause = min(MAX_PAUSE, 2**self.misses - 1) if self.misses else 0
        cache.truncate(start + 1 + kept)
        engine._cached_ids.extend([last] + drafts[:kept])
        self.drafter.extend([t for t, _ in decided[:-1]])
        return decided

    def _check(self, logits: torch.Tensor, draft: int, *, q: torch.Tensor | None) -> int:
        """The token decided at this position given the draft token (drawn from q; None: a
        point mass): the draft itself when accepted."""
        sampler = self.sampler
        if self.greedy:
            return int(sampler(logits))
        p = sampler.distribution(logits)
        q_draft = 1.0 if q is None else float(q[draft])
        u = float(torch.rand(1, generator=sampler.generator, dtype=torch.float64, device=p.device))
        if u * q_draft < float(p[draft]):
            token = draft
        else:
            if q is None:
                residual = p.clone()
                residual[draft] = 0.0
            else:
                residual = (p - q).clamp_(min=0.0)
            token = int(torch.multinomial(residual, 1, generator=sampler.generator))
        sampler.observe(torch.tensor(token, device=p.device))
        return token
