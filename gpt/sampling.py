"""Sampling controls: the parameters, their validation, and the logit filters.

One decoding step turns the model's last logits into a token in this order:
  1. penalties (repetition over prompt + answer, presence and frequency over the answer so far),
  2. temperature (0 = greedy: the most likely token, no randomness),
  3. top-k, 4. top-p (nucleus), 5. min-p, each removing candidates (their logits become -inf),
  6. a draw from what is left, with the request's own torch.Generator so a seed reproduces.

Each parameter is declared once, as a SamplingParams field made by `param`: its type, default,
range and help, and where it is offered. PARAMS reads them back, and every place that offers
the parameters is built from it: validation here, the HTTP API's request fields (gpt/server.py),
the remote client's request body (gpt/service.py), `kettle generate`'s flags and the app's
sampling panel. A new parameter is one field here (and its use in Sampler).

torch is imported by the functions that use it: `kettle generate` builds its flags from PARAMS,
and `kettle --help` must not wait seconds for torch.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gpt.errors import KettleError

if TYPE_CHECKING:
    import torch

MAX_SEED = 2**63 - 1


def param(
    default,
    *,
    help: str,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    label: str | None = None,
    metavar: str | None = None,
    openai: str | None = None,
):
    """A SamplingParams field and what its Param says (see Param); a list default is copied
    for each SamplingParams."""
    meta = {
        "param": dict(help=help, low=low, high=high, low_open=low_open, label=label, metavar=metavar, openai=openai)
    }
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class SamplingParams:
    temperature: float = param(
        0.7, low=0, high=100, help="0 = greedy (deterministic)", label="Temperature (0 = greedy)", metavar="T"
    )
    top_k: int = param(0, low=0, help="keep the K most likely tokens (0 = off)", label="Top-k (0 = off)", metavar="K")
    top_p: float = param(
        1.0,
        low=0,
        high=1,
        low_open=True,
        help="keep the most likely tokens up to mass P",
        label="Top-p (1 = off)",
        metavar="P",
    )
    min_p: float = param(
        0.0,
        low=0,
        high=1,
        help="drop tokens under P x the best one's probability",
        label="Min-p (0 = off)",
        metavar="P",
    )
    repetition_penalty: float = param(
        1.0,
        low=0,
        high=10,
        low_open=True,
        help="> 1 discourages repeats (1 = off)",
        label="Repetition penalty (1 = off)",
        metavar="R",
    )
    presence_penalty: float = param(
        0.0, low=-2, high=2, metavar="X", help="subtracted once from the logit of a token already in the answer"
    )
    frequency_penalty: float = param(
        0.0, low=-2, high=2, metavar="X", help="subtracted from a token's logit for each time it is in the answer"
    )
    max_new_tokens: int = param(
        256, low=1, help="generate at most N new tokens", label="Max new tokens", metavar="N", openai="max_tokens"
    )
    seed: int | None = param(  # None: a fresh random seed (reported in the result)
        None,
        low=0,
        high=MAX_SEED,
        help="same seed + settings + model = same text",
        label="Seed (blank = random)",
        metavar="SEED",
    )
    stop: list[str] = param([], high=16, metavar="TEXT", help="stop when TEXT is generated (not included); repeatable")

    def validate(self) -> "SamplingParams":
        """Check every field; raises KettleError with the field's name and allowed range."""
        for p in PARAMS:
            p.check(getattr(self, p.name))
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SamplingParams":
        """Parameters from a JSON-like dict (missing keys keep their defaults), validated."""
        if not isinstance(data, dict):
            raise KettleError("sampling parameters must be an object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise KettleError(f"unknown sampling parameter {unknown[0]} (known: {', '.join(sorted(known))})")
        data = dict(data)
        if isinstance(data.get("stop"), str):
            data["stop"] = [data["stop"]]
        return cls(**data).validate()

    def replace(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes).validate()


@dataclass(frozen=True)
class Param:
    """One SamplingParams field as every place that offers it needs it."""

    name: str
    kind: type  # int or float; str for a list of strings
    help: str  # the `kettle generate` flag's help
    low: float | None = None  # None (an integer's only): no lower bound
    high: float | None = None  # None (an integer's only): no upper bound; for a list,
    # the most strings it holds
    low_open: bool = False  # low itself is out of range
    optional: bool = False  # None is a value (the seed: a fresh one each time)
    many: bool = False  # a list of kind (stop); a request may send a single string
    label: str | None = None  # its line in the app's sampling panel; None: not shown there
    metavar: str | None = None  # `kettle generate --NAME METAVAR`; None: no flag
    openai: str = ""  # its request field in the HTTP API (OpenAI's name)

    def check(self, value) -> None:
        """KettleError naming the parameter and its allowed range if `value` is not allowed."""
        if value is None and self.optional:
            return
        if self.many:
            _check_strings(self.name, value, most=self.high)
        elif self.kind is int:
            _check_int(self.name, value, low=self.low, high=self.high)
        else:
            _check_number(self.name, value, low=self.low, high=self.high, low_open=self.low_open)


def _params() -> tuple[Param, ...]:
    """SamplingParams' fields as Params, in their order; the kind comes from the annotation
    (float, int | None, list[str])."""
    hints = typing.get_type_hints(SamplingParams)
    out = []
    for f in dataclasses.fields(SamplingParams):
        meta = dict(f.metadata["param"])
        meta["openai"] = meta["openai"] or f.name
        hint = hints[f.name]
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        out.append(
            Param(
                name=f.name,
                kind=inner[0] if inner else hint,
                optional=type(None) in typing.get_args(hint),
                many=typing.get_origin(hint) is list,
                **meta,
            )
        )
    return tuple(out)


PARAMS = _params()


AS_TRAINED = "as-trained"
PRESETS: dict[str, SamplingParams] = {
    # Close to deterministic: good for facts, code and checking a fine-tune.
    "precise": SamplingParams(temperature=0.2, top_k=40, top_p=0.9, repetition_penalty=1.1),
    "balanced": SamplingParams(temperature=0.7, top_p=0.9, repetition_penalty=1.1),
    # min-p keeps high temperatures coherent: it cuts the tail relative to the best token.
    "creative": SamplingParams(temperature=1.0, top_p=0.98, min_p=0.05, repetition_penalty=1.05),
    # Greedy with every other control off (no penalty, no filter): how a fine-tune's verdict
    # reads answers (finetune.instruct.recalled), so a learned correction comes back word for word.
    AS_TRAINED: SamplingParams(temperature=0),
}


CHAT_PRESET = "balanced"  # what a new chat samples with, unless config.json says otherwise


def get_preset(name: str) -> SamplingParams:
    try:
        preset = PRESETS[name]
    except KeyError:
        raise KettleError(f"unknown sampling preset {name!r} (choose from {', '.join(PRESETS)})") from None
    return dataclasses.replace(preset, stop=list(preset.stop))


def _check_number(name, value, *, low, high, low_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise KettleError(f"{name} must be a number, got {value!r}")
    if (value <= low if low_open else value < low) or value > high:
        raise KettleError(f"{name} must be in {'(' if low_open else '['}{low}, {high}], got {value}")


def _check_int(name, value, *, low, high=None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise KettleError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        raise KettleError(f"{name} must be {'>= ' + str(low) if high is None else f'in [{low}, {high}]'}, got {value}")


def _check_strings(name, value, *, most):
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise KettleError(f"{name} must be a list of non-empty strings")
    if most is not None and len(value) > most:
        raise KettleError(f"{name} takes at most {most} strings, got {len(value)}")


# --- logit filters: [..., V] float logits in, same shape out, removed candidates at -inf ---------


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits (exactly k, even when several tie at the k-th value)."""
    import torch

    if k <= 0 or k >= logits.size(-1):
        return logits
    values, indices = torch.topk(logits, k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter(-1, indices, values)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probabilities add up to at least p."""
    import torch

    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # A token is dropped when the tokens ranked before it already reach p.
    before = probs.cumsum(dim=-1) - probs
    drop_sorted = before >= p
    drop_sorted[..., 0] = False  # the best token always stays
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the best token's."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_penalties(
    logits: torch.Tensor, params: SamplingParams, *, seen: torch.Tensor | None, counts: torch.Tensor | None
) -> torch.Tensor:
    """Penalise repeats. `seen` [V] bool marks tokens in the prompt or answer (repetition penalty,
    as in CTRL/Hugging Face: positive logits divided, negative multiplied); `counts` [V] holds how
    often each token occurs in the answer (presence and frequency penalties, as in OpenAI's API)."""
    import torch

    if params.repetition_penalty != 1.0 and seen is not None:
        penalised = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if counts is not None and (params.presence_penalty or params.frequency_penalty):
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0)
    return logits


NUCLEUS_CANDIDATES = 512
NUCLEUS_BUCKETS = 1024


def _nucleus_candidates(probs: torch.Tensor, top_p: float, *, min_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Enough of the most likely tokens to hold every token that both the top_p nucleus and
    min_p can keep (either one ending inside the candidates is enough), the most likely first."""
    k = min(NUCLEUS_CANDIDATES, probs.numel())
    top, ids = probs.topk(k)
    if k < probs.numel() and top.sum() < top_p * probs.sum() and top[-1] >= min_p * top[0]:
        return _flat_nucleus_candidates(probs, top_p)
    return top, ids


def _flat_nucleus_candidates(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The nucleus candidates of a flat distribution without sorting the vocabulary (sorting
    50k probabilities costs ~4 ms on a CPU, more than a small model's whole decoding step).

    Tokens go into buckets by log-probability. The buckets above the one where the nucleus ends
    hold less than top_p of the mass, so all their tokens are in it, in any order (the best one
    is put first); only the bucket where it ends (and, against rounding, the one below) is
    sorted. The nucleus rule, applied to the candidates in this order, keeps the same tokens as
    in fully sorted order."""
    import torch

    score = probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
    lo, hi = score.min(), score.max()
    if hi == lo:  # all equally likely: any order is sorted
        return probs, torch.arange(probs.numel(), device=probs.device)
    bucket = ((score - lo) * (NUCLEUS_BUCKETS / (hi - lo))).long().clamp_(0, NUCLEUS_BUCKETS - 1)
    mass = torch.zeros(NUCLEUS_BUCKETS, dtype=torch.float64, device=probs.device)
    mass.index_add_(0, bucket, probs.double())
    at_or_above = mass.flip(0).cumsum(0).flip(0)  # mass of the buckets >= b
    last = int(torch.nonzero(at_or_above >= top_p * mass.sum()).max())  # where the nucleus ends
    whole = torch.nonzero(bucket > last).flatten()
    if whole.numel():
        best = int(probs[whole].argmax())
        whole[[0, best]] = whole[[best, 0]]
    edge = torch.nonzero((bucket <= last) & (bucket >= last - 1)).flatten()
    edge_probs, order = probs[edge].sort(descending=True)
    return torch.cat([probs[whole], edge_probs]), torch.cat([whole, edge[order]])


# Grounded answers copy from their passages (CopyBias). Measured on the brewed starter, "What
# does X do?" about names it never learned, with X's documentation beside it: +5 logits let it
# wander off after a few words (0 of 20 first sentences exact), +15 copies (15 of 20).
COPY_BIAS = 15.0
COPY_MATCH = 8  # the longest tail of the answer looked up in the passages
# A passage the user taught (a correction, an approved answer: the first `taught` passages) is
# copied whole: its first token leads (FOLLOW_BIAS), and an answer that so far is its beginning,
# word for word, goes on with it to its end and stops there, nothing else drawn. At COPY_BIAS the
# starter that knows its lessons left a correction for its own lesson half way ("Call len():
# return the number of items." beside "Call len(my_list); it returns ...") or began with the
# lesson's documentation ranked second ("Reverse *IN PLACE*."): 9 of 20 corrections asked reworded
# came back; with the lead and the follow at +30, 20/20 greedy and 40/40 sampled, 10/10 in a 6-turn
# chat. Followed at +30, a model fine-tuned twice outweighed it ("Call list.copy(): remove and ..."
# beside "Call my_list.copy() or ..."): 5 new corrections asked reworded 8/10, sampled 9/15.
# Documentation keeps COPY_BIAS: followed as hard, the starter's answers to its own lessons,
# grounded, were no better (59 vs 60 of 120).
FOLLOW_BIAS = 30.0


class CopyBias:
    """Leans a grounded answer toward copying from its passages, as a pointer-generator copies:
    its first token toward each passage body's first (the best passage most, a taught one at
    FOLLOW_BIAS); while the answer is word for word a taught passage's beginning, that passage's
    next token and nothing else, and at its end only the end of the answer (a correction copied
    whole is the whole answer); else each next token toward what follows, in a passage, the
    longest tail of the answer found there (two tokens at least, so that one common word does not
    jump elsewhere), never across a sentence's or a line's end: there it only nudges the model
    toward ending its answer, and at the end of a passage pushes it to.

    bodies: each passage's answer part as token ids (gpt.engine.Engine.copy_bias makes them);
    open_: open_[b][j] is False where bodies[b][j] begins a new sentence or line; stops: the
    tokens that end an answer; taught: how many of the passages, the first ones, the user taught."""

    def __init__(self, bodies: list[list[int]], open_: list[list[bool]], stops: set[int], *, taught: int = 0):
        self.bodies = bodies
        self.open = open_
        self.stops = sorted(stops)
        self.taught = taught

    def apply(self, logits: torch.Tensor, answer: list[int]) -> torch.Tensor:
        import torch

        logits = logits.clone()
        if not answer:
            for rank, body in enumerate(self.bodies):
                if body:
                    logits[body[0]] += (FOLLOW_BIAS if rank < self.taught else COPY_BIAS) / (1 + rank)
            return logits
        n = len(answer)
        for body in self.bodies[: self.taught]:
            if body[:n] == answer:  # copying this taught passage from its beginning: on to its end
                keep = self.stops if n == len(body) else [body[n]]
                only = torch.full_like(logits, float("-inf"))
                only[keep] = logits[keep]
                return only
        for m in range(min(COPY_MATCH, len(answer)), min(2, len(answer)) - 1, -1):
            tail = answer[-m:]
            ends = [
                (rank, body, open_, j)
                for rank, (body, open_) in enumerate(zip(self.bodies, self.open))
                for j in range(m, len(body) + 1)
                if body[j - 1] == tail[-1] and body[j - m : j] == tail
            ]
            if not ends:
                continue
            # where passages alike part ("Call str.is" numeric / alnum), the better one leads
            follow: dict[int, float] = {}
            for rank, body, open_, j in ends:
                if j < len(body) and open_[j]:
                    follow[body[j]] = max(follow.get(body[j], 0.0), COPY_BIAS / (1 + rank))
            for token, bias in follow.items():
                logits[token] += bias
            if any(j == len(body) for _, body, _, j in ends):
                logits[self.stops] += COPY_BIAS
            elif not follow:  # a sentence or line ends here in the passage
                logits[self.stops] += COPY_BIAS / 3
            break
        return logits


class Sampler:
    """Picks each next token for one request; keeps the penalty state and the random generator."""

    def __init__(
        self,
        params: SamplingParams,
        vocab_size: int,
        device,
        prompt_ids: list[int],
        seed: int,
        *,
        copy: CopyBias | None = None,
    ):
        import torch

        self.copy = copy
        self.answer: list[int] = []  # what was chosen so far, kept for the copy bias only
        self.params = params
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.seen = self.counts = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            if prompt_ids:
                self.seen[torch.tensor(prompt_ids, device=device)] = True
        if params.presence_penalty or params.frequency_penalty:
            self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)

    def _adjusted(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits after the penalties and the copy bias."""
        logits = apply_penalties(logits.float(), self.params, seen=self.seen, counts=self.counts)
        return logits if self.copy is None else self.copy.apply(logits, self.answer)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [V] -> the chosen token id as a 0-d tensor (still on the device)."""
        p = self.params
        logits = self._adjusted(logits)
        token = logits.argmax() if p.greedy else self._draw(logits)
        self.observe(token)
        return token

    def log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """log_softmax [V] of the logits after the penalties, the temperature and the filters this
        request asked for (OpenAI's logprobs); a removed candidate is -inf. Greedy decoding reads
        them at temperature 1: its choice is their most likely token."""
        p = self.params
        logits = self._adjusted(logits) / (p.temperature or 1.0)
        logits = min_p_filter(top_p_filter(top_k_filter(logits, p.top_k), p.top_p), p.min_p)
        return logits.log_softmax(-1)

    def distribution(self, logits: torch.Tensor) -> torch.Tensor:
        """The probabilities [V] the next draw uses (penalties and filters applied)."""
        import torch

        probs, ids = self._candidates(self._adjusted(logits))
        probs = probs / probs.sum()
        return probs if ids is None else torch.zeros_like(logits, dtype=probs.dtype).scatter(0, ids, probs)

    def _draw(self, logits: torch.Tensor) -> torch.Tensor:
        import torch

        probs, ids = self._candidates(logits)
        cdf = probs.double().cumsum(0)
        u = torch.rand(1, generator=self.generator, dtype=torch.float64, device=cdf.device) * cdf[-1]
        i = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.numel() - 1)[0]
        return i if ids is None else ids[i]

    def _candidates(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Unnormalised probabilities of the tokens that can be drawn, and their ids (None: the
        whole vocabulary in order). The same as top_k_filter, top_p_filter and min_p_filter in
        turn, computed on the few candidates that can survive them: sorting the whole vocabulary
        (as top_p_filter does) and torch.multinomial cost milliseconds a token on a CPU, a top-k
        of a few hundred candidates and an inverse-CDF draw do not."""
        import torch

        p = self.params
        probs = (logits / p.temperature).softmax(-1)
        ids = None
        if 0 < p.top_k < probs.numel():
            probs, ids = probs.topk(p.top_k)  # sorted, most likely first
        if p.top_p < 1.0:
            total = probs.double().sum()  # the nucleus is a share of all the mass, not of the candidates'
            if ids is None:
                probs, ids = _nucleus_candidates(probs, p.top_p, min_p=p.min_p)
            # Drop a token when the tokens ranked before it already reach top_p of the mass
            # (summed in float64: over tens of thousands of tokens float32 sums drift by several).
            exact = probs.double()
            probs = probs * ((exact.cumsum(0) - exact) < p.top_p * total)
            probs[0] = probs[0].clamp(min=torch.finfo(probs.dtype).tiny)  # the best one stays
        if p.min_p > 0.0:
            probs = probs * (probs >= p.min_p * probs.max())
        return probs, ids

    def observe(self, token: torch.Tensor) -> None:
        if self.copy is not None:
            self.answer.append(int(token))
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1
