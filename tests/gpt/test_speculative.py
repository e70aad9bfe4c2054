"""Speculative decoding is lossless: greedy tokens are the plain loop's, sampled tokens follow
the plain sampler's distribution (checked against the exact probabilities over many seeds)."""

import pytest
import torch
from scipy.stats import chisquare

from gpt.config import GPTConfig
from gpt.engine import Engine
from gpt.errors import KettleError
from gpt.model import GPT
from gpt.sampling import Sampler, SamplingParams
from gpt.speculative import DraftModel, PromptLookup, _Lookup

GREEDY = SamplingParams(temperature=0, max_new_tokens=40)


@pytest.fixture
def engine(long_context_model_dir):
    engine = Engine.load(long_context_model_dir, device="cpu")
    engine.stop_ids = set()  # random weights: run to the token limit
    engine._drafts_pay = True  # how speculation works, wherever the engine would decide it pays
    return engine


def test_a_cpu_engine_speculates_greedy_answers_where_checking_drafts_pays(engine, long_context_model_dir):
    # Engine.__init__: greedy decoding on the CPU, where a check of the drafts costs little more
    # than a step (measured at the first request, Engine._checking_drafts_pays); the answer's
    # figures report the drafts; the tokens are plain decoding's either way.
    assert isinstance(Engine.load(long_context_model_dir, device="cpu").speculation, PromptLookup)
    prompt = [5, 6, 7, 8, 9] * 6  # drafts on offer
    engine._drafts_pay = None
    r = engine.generate(prompt, GREEDY)
    assert isinstance(engine._drafts_pay, bool)
    for pays in (engine._drafts_pay, not engine._drafts_pay):
        engine._drafts_pay = pays
        r = engine.generate(prompt, GREEDY)
        assert (r.drafted_tokens > 0) == pays and 0 <= r.accepted_tokens <= r.drafted_tokens
        assert r.token_ids == plain(engine, prompt, GREEDY).token_ids


def draft_model(engine, seed=1, **changes):
    torch.manual_seed(seed)
    return GPT(engine.model.config.replace(**changes)).eval()


def plain(engine, prompt, params, **options):
    speculation, engine.speculation = engine.speculation, None
    try:
        return engine.generate(prompt, params, **options)
    finally:
        engine.speculation = speculation


def test_lookup_drafts_what_followed_the_longest_latest_match():
    lookup = _Lookup(PromptLookup(max_draft=3, max_ngram=3, min_ngram=2), [5, 1, 2, 3, 9, 1, 2, 4, 8, 0])
    lookup.extend([7, 1, 2])
    assert lookup.propose(8) == ([4, 8, 0], None)  # (1, 2) last seen before 4 8 0; capped at 3
    lookup.extend([4])
    assert lookup.propose(2) == ([8, 0], None)  # the 3-gram (1, 2, 4)
    lookup.extend([6])
    assert lookup.propose(8) == ([], None)  # (4, 6) never seen: no draft, a plain step


@pytest.mark.parametrize("changes", [{}, {"repetition_penalty": 1.3, "frequency_penalty": 0.5}, {"stop": ["e"]}])
def test_greedy_tokens_identical_to_plain_decoding(engine, verdict_text, changes):
    text = verdict_text[:300]
    prompt = engine.tokenizer.encode(text + "\n" + text[:60])  # an answer that copies the prompt
    params = GREEDY.replace(**changes)
    fast = engine.generate(prompt, params)
    slow = plain(engine, prompt, params)
    assert fast.token_ids == slow.token_ids and fast.text == slow.text
    assert fast.finish_reason == slow.finish_reason
    if not changes:
        assert fast.accepted_tokens > 0 and fast.to_dict()["acceptance_rate"] == fast.acceptance_rate
    # The cache holds exactly what the engine believes: the next turn reuses it correctly.
    more = prompt + fast.token_ids + engine.tokenizer.encode(" and then")
    assert engine.generate(more, params).token_ids == plain(engine, more, params).token_ids
    engine.reset()
    assert engine.generate(more, params).token_ids == plain(engine, more, params).token_ids


def test_greedy_with_a_draft_model_and_logprobs(engine, verdict_text):
    prompt = engine.tokenizer.encode(verdict_text[:200])
    engine.speculation = DraftModel(draft_model(engine), max_draft=3)
    fast = engine.generate(prompt, GREEDY, logprobs=2)
    slow = plain(engine, prompt, GREEDY)
    assert fast.token_ids == slow.token_ids
    assert fast.drafted_tokens > 0
    engine.speculation = DraftModel(engine.model)  # the model as its own draft: all accepted
    same = engine.generate(prompt, GREEDY, logprobs=2)
    assert same.token_ids == slow.token_ids and same.acceptance_rate == 1.0
    reference = plain(engine, prompt, GREEDY.replace(), logprobs=2)
    for a, b in zip(same.logprobs, reference.logprobs):
        assert a.token == b.token and a.logprob == pytest.approx(b.logprob, abs=1e-4)


def test_a_draft_model_for_another_tokenizer_is_refused(engine):
    engine.speculation = DraftModel(draft_model(engine, vocab_size=100))
    with pytest.raises(KettleError, match=r"^the draft model's vocabulary \(100 tokens\) is smaller"):
        engine.generate([1, 2, 3], GREEDY)


def exact_distribution(engine, prompt, params, n):
    """P(first n answer tokens) for every sequence the plain sampler can draw, by recomputing."""
    probs = {(): 1.0}
    with torch.inference_mode():
        for _ in range(n):
            nxt = {}
            for seq, p in probs.items():
                logits = engine.model(torch.tensor([prompt + list(seq)]))[0, -1, : engine.tokenizer.n_vocab]
                dist = Sampler(params, logits.numel(), "cpu", [], 0).distribution(logits)
                for t in torch.nonzero(dist).flatten().tolist():
                    nxt[seq + (t,)] = p * float(dist[t])
            probs = nxt
    return probs


def sharp(seed, config):
    """A random model with its embeddings scaled up: peaked next-token distributions, which
    accept some drafts and reject others (at the usual init they are nearly uniform)."""
    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():
        model.wte.weight.mul_(4.0)
    return model


@pytest.mark.parametrize("drafter", ["lookup", "draft model"])
def test_sampled_tokens_follow_the_plain_distribution(trained_tokenizer, drafter):
    config = GPTConfig(vocab_size=512, context_length=128, n_layer=2, n_head=2, n_embd=32)
    engine = Engine(sharp(0, config), trained_tokenizer)
    engine.stop_ids = set()
    params = SamplingParams(temperature=1.0, top_k=3, max_new_tokens=3)
    base = [7, 19, 42]
    # The model's own greedy path, then the start again: lookup drafts the path.
    prompt = base + plain(engine, base, GREEDY.replace(max_new_tokens=6)).token_ids + base
    if drafter == "lookup":
        engine.speculation = PromptLookup(min_ngram=1)
    else:
        engine.speculation = DraftModel(sharp(3, config), max_draft=2)
    engine.speculate_sampled = True
    exact = exact_distribution(engine, prompt, params, 3)
    runs = 600
    counts = dict.fromkeys(exact, 0)
    drafted = accepted = 0
    for seed in range(runs):
        r = engine.generate(prompt, params.replace(seed=seed))
        counts[tuple(r.token_ids)] += 1  # a sequence the plain sampler cannot draw: KeyError
        drafted, accepted = drafted + r.drafted_tokens, accepted + r.accepted_tokens
    assert 0 < accepted < drafted  # both the accept and the reject rule were exercised
    total = sum(exact.values())
    total_variation = sum(abs(counts[k] / runs - p / total) for k, p in exact.items()) / 2
    assert total_variation < 0.08, total_variation
    # Chi-square over the sequences expected 5+ times, the rarer ones pooled into one bin.
    common = [k for k, p in exact.items() if p / total * runs >= 5]
    observed = [counts[k] for k in common] + [runs - sum(counts[k] for k in common)]
    expected = [exact[k] / total * runs for k in common]
    expected.append(runs - sum(expected))
    assert chisquare(observed, expected).pvalue > 1e-3
    # Sampled output is reproducible from its seed, as without speculation.
    assert (
        engine.generate(prompt, params.replace(seed=5)).token_ids
        == engine.generate(prompt, params.replace(seed=5)).token_ids
    )


class _Scripted:
    """A drafter that proposes the plain loop's own next tokens (right) or each plus one
    (wrong), and records how many it was asked for each round."""

    def __init__(self, truth: list[int], prompt_len: int, n_vocab: int, right: bool):
        self.truth, self.prompt_len, self.n_vocab, self.right = truth, prompt_len, n_vocab, right
        self.asked: list[int] = []

    def begin(self, engine, prompt_ids, *, params, sampler):
        self.history = list(prompt_ids)
        return self

    def extend(self, tokens):
        self.history.extend(tokens)

    def propose(self, k):
        self.asked.append(k)
        at = len(self.history) - self.prompt_len
        nxt = self.truth[at : at + min(k, 4)]
        return ([t if self.right else (t + 1) % self.n_vocab for t in nxt], None)


def test_rounds_shrink_after_rejected_drafts_and_grow_after_kept_ones(engine, verdict_text):
    prompt = engine.tokenizer.encode(verdict_text[:200])
    truth = plain(engine, prompt, GREEDY).token_ids
    wrong = _Scripted(truth, len(prompt), engine.tokenizer.n_vocab, right=False)
    engine.speculation = wrong
    assert engine.generate(prompt, GREEDY).token_ids == truth
    assert wrong.asked[1:4] == [1, 1, 1]  # none kept: one draft a round from then on
    right = _Scripted(truth, len(prompt), engine.tokenizer.n_vocab, right=True)
    engine.speculation = right
    assert engine.generate(prompt, GREEDY).token_ids == truth
    assert right.asked[1:3] == [6, 6]  # all 4 offered were kept: two more asked next round


def test_a_grounded_answer_is_speculated_and_its_tokens_are_the_plain_loops(engine):
    """A grounded answer copies its passage (gpt.sampling.CopyBias): prompt lookup drafts it,
    and the drafts are checked with the copy bias applied, so the tokens are those of plain
    decoding with the bias, greedy; sampled too, where the bias forces a taught passage."""
    from gpt.chat_template import grounded

    passage = "Call my_list.reverse() to reverse the list in place, or reversed(xs) for a new one."
    question = [{"role": "user", "content": "How can I reverse a list?"}]
    for taught in (0, 1):
        messages = grounded(question, [f"How do I reverse a list?\n{passage}"], taught=taught)
        fast = engine.generate_chat(messages, GREEDY)
        speculation, engine.speculation = engine.speculation, None
        try:
            slow = engine.generate_chat(messages, GREEDY)
        finally:
            engine.speculation = speculation
        assert fast.token_ids == slow.token_ids and fast.accepted_tokens > 10, taught
        assert fast.text.startswith(passage[:40])
    engine.speculate_sampled = True
    sampled = engine.generate_chat(messages, SamplingParams(temperature=0.7, seed=3, max_new_tokens=40))
    assert sampled.text.startswith(passage[:60]) and sampled.accepted_tokens > 10  # taught: copied whole


class WrongDrafts:
    """A drafter whose every draft is one token off the one the model decides next."""

    def __init__(self, expected: list[int]):
        self.expected = expected

    def begin(self, engine, prompt_ids, *, params, sampler):
        self.decided = 0
        return self

    def extend(self, tokens):
        self.decided += len(tokens)

    def propose(self, k):
        return [self.expected[self.decided] + 1], None


def test_rejected_drafts_pause_drafting_and_a_kept_one_resumes_it(engine):
    prompt = [5, 6, 7, 8, 9]
    expected = plain(engine, prompt, GREEDY.replace(max_new_tokens=80)).token_ids
    engine.speculation = WrongDrafts(expected)
    r = engine.generate(prompt, GREEDY.replace(max_new_tokens=80))
    assert r.token_ids == expected
    # rounds after 1, 2, 4, 8, 16, 32 plain steps: seven drafts in 80 tokens, not one a token
    assert r.accepted_tokens == 0 and r.drafted_tokens <= 7
    engine.speculation = PromptLookup()
    copying = engine.generate([5, 6, 7, 8, 9] * 6, GREEDY)  # drafts kept: no pause
    assert copying.accepted_tokens > 0 and copying.drafted_tokens > 7
