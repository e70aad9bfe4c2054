import dataclasses
import math
import re

import pytest
import torch
from conftest import ROOT

from gpt.errors import KettleError
from gpt.sampling import (
    PARAMS,
    PRESETS,
    Param,
    Sampler,
    SamplingParams,
    apply_penalties,
    get_preset,
    min_p_filter,
    top_k_filter,
    top_p_filter,
)


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(logits)).flatten().tolist())


@pytest.mark.parametrize("k", [1, 3, 10, 99])
def test_top_k_leaves_exactly_the_k_largest(k):
    logits = torch.randn(100, generator=torch.Generator().manual_seed(k))
    out = top_k_filter(logits, k)
    assert kept(out) == set(torch.topk(logits, k).indices.tolist())
    assert torch.equal(out[torch.isfinite(out)], logits[torch.isfinite(out)])  # survivors unchanged


def test_top_k_keeps_at_most_k_even_with_ties():
    logits = torch.tensor([1.0, 3.0, 3.0, 3.0, 0.5])
    out = top_k_filter(logits, 2)
    assert len(kept(out)) == 2 and kept(out) <= {1, 2, 3}


def test_top_k_off_and_batched():
    logits = torch.randn(2, 50)
    assert torch.equal(top_k_filter(logits, 0), logits)
    out = top_k_filter(logits, 4)
    assert (torch.isfinite(out).sum(-1) == 4).all()


def test_top_p_keeps_the_smallest_set_reaching_p_on_crafted_probabilities():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    assert kept(top_p_filter(logits, 0.45)) == {0}
    assert kept(top_p_filter(logits, 0.75)) == {0, 1}
    assert kept(top_p_filter(logits, 0.85)) == {0, 1, 2}
    assert kept(top_p_filter(logits, 0.99)) == {0, 1, 2, 3}
    assert kept(top_p_filter(logits, 1e-9)) == {0}  # the best token always stays
    shuffled = logits[torch.tensor([2, 0, 3, 1])]
    assert kept(top_p_filter(shuffled, 0.75)) == {1, 3}  # positions of 0.5 and 0.3


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.97])
def test_top_p_is_minimal_and_sufficient_on_random_logits(p):
    logits = torch.randn(500, generator=torch.Generator().manual_seed(int(p * 100))) * 3
    probs = logits.softmax(-1)
    keep = kept(top_p_filter(logits, p))
    ranked = probs.argsort(descending=True).tolist()
    assert set(ranked[: len(keep)]) == keep  # the most likely tokens, no gaps
    mass = probs[list(keep)].sum().item()
    smallest = min(probs[i].item() for i in keep)
    assert mass >= p - 1e-6
    assert mass - smallest < p  # one token fewer would not reach p


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5])
def test_min_p_drops_exactly_the_tokens_under_min_p_times_max(min_p):
    logits = torch.randn(300, generator=torch.Generator().manual_seed(7)) * 2
    probs = logits.softmax(-1)
    keep = kept(min_p_filter(logits, min_p))
    threshold = min_p * probs.max().item()
    assert keep == {i for i, q in enumerate(probs.tolist()) if q >= threshold}
    assert 0 < len(keep) < 300


def test_min_p_on_crafted_probabilities():
    logits = torch.tensor([0.6, 0.25, 0.1, 0.05]).log()
    assert kept(min_p_filter(logits, 0.2)) == {0, 1}  # 0.2 * 0.6 = 0.12
    assert kept(min_p_filter(logits, 0.05)) == {0, 1, 2, 3}


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([2.0, -2.0, 2.0, -2.0])
    seen = torch.tensor([True, True, False, False])
    out = apply_penalties(logits, SamplingParams(repetition_penalty=2.0), seen=seen, counts=None)
    assert out.tolist() == [1.0, -4.0, 2.0, -2.0]


def test_presence_and_frequency_penalties_use_answer_counts():
    logits = torch.zeros(3)
    counts = torch.tensor([0.0, 1.0, 3.0])
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits, params, seen=None, counts=counts)
    assert out.tolist() == [0.0, -0.75, -1.25]


def test_sampler_seed_reproduces_and_respects_filters():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=1.5, top_k=5)
    draws = [[int(Sampler(params, 1000, "cpu", [], seed)(logits)) for _ in range(1)] for seed in range(200)]
    allowed = set(torch.topk(logits, 5).indices.tolist())
    assert {d[0] for d in draws} <= allowed
    assert len({d[0] for d in draws}) > 1  # it does sample
    a, b = Sampler(params, 1000, "cpu", [], 42), Sampler(params, 1000, "cpu", [], 42)
    assert [int(a(logits)) for _ in range(50)] == [int(b(logits)) for _ in range(50)]


def reference_distribution(logits, params):
    """The documented pipeline, written with the filter functions."""
    x = top_k_filter(logits / params.temperature, params.top_k)
    x = min_p_filter(top_p_filter(x, params.top_p), params.min_p)
    return x.softmax(-1)


@pytest.mark.parametrize(
    "scale, params",
    [
        (3.0, SamplingParams(temperature=0.8, top_k=6)),
        (3.0, SamplingParams(temperature=0.8, top_p=0.7)),  # nucleus inside the candidates
        (1.2, SamplingParams(temperature=1.0, top_p=0.6)),  # candidates hold < all the mass
        (0.3, SamplingParams(temperature=1.0, top_p=0.9)),  # flat: nucleus of > 512 tokens
        (0.3, SamplingParams(temperature=1.0, top_p=0.9, min_p=0.9)),  # flat, min_p decides
        (3.0, SamplingParams(temperature=1.0, top_k=50, top_p=0.8, min_p=0.1)),
        (3.0, SamplingParams(temperature=1.3, min_p=0.2)),
        (2.0, SamplingParams(temperature=1.0)),
    ],
)
def test_sampler_draws_follow_the_filtered_distribution(scale, params):
    logits = torch.randn(2000, generator=torch.Generator().manual_seed(3)) * scale
    expected = reference_distribution(logits, params)
    sampler = Sampler(params, 2000, "cpu", [], seed=11)
    assert torch.allclose(sampler.distribution(logits), expected, atol=1e-6)
    draws = torch.tensor([int(sampler(logits)) for _ in range(3000)])
    counts = torch.bincount(draws, minlength=2000).float() / len(draws)
    support = set(torch.nonzero(expected).flatten().tolist())
    assert set(draws.tolist()) <= support  # never a token the filters remove
    assert (counts - expected).abs().max() < 0.04  # and in the right proportions


def test_greedy_is_argmax_and_penalties_change_it():
    logits = torch.tensor([1.0, 3.0, 2.9])
    assert int(Sampler(SamplingParams(temperature=0), 3, "cpu", [], 0)(logits)) == 1
    penalised = Sampler(SamplingParams(temperature=0, repetition_penalty=1.5), 3, "cpu", [1], 0)
    assert int(penalised(logits)) == 2
    freq = Sampler(SamplingParams(temperature=0, frequency_penalty=1.0), 3, "cpu", [], 0)
    assert [int(freq(logits)) for _ in range(3)] == [1, 2, 1]  # 3.0 -> 2.0 after one use


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("top_p", 0.0, r"top_p must be in \(0, 1\], got 0.0"),
        ("top_p", 1.5, r"top_p must be in \(0, 1\]"),
        ("temperature", -0.1, r"temperature must be in \[0, 100\]"),
        ("temperature", math.nan, "temperature must be a number"),
        ("temperature", "hot", "temperature must be a number"),
        ("top_k", -1, "top_k must be >= 0"),
        ("top_k", 2.5, "top_k must be an integer"),
        ("min_p", 1.2, r"min_p must be in \[0, 1\]"),
        ("repetition_penalty", 0, r"repetition_penalty must be in \(0, 10\]"),
        ("presence_penalty", 3, r"presence_penalty must be in \[-2, 2\]"),
        ("frequency_penalty", -3, r"frequency_penalty must be in \[-2, 2\]"),
        ("max_new_tokens", 0, "max_new_tokens must be >= 1"),
        ("max_new_tokens", True, "max_new_tokens must be an integer"),
        ("seed", -1, "seed must be in"),
        ("stop", [""], "stop must be a list of non-empty strings"),
        ("stop", ["x"] * 17, "at most 16"),
    ],
)
def test_validation_names_the_field_and_range(field, value, message):
    with pytest.raises(KettleError, match=message):
        SamplingParams(**{field: value}).validate()


def test_from_dict_round_trip_and_errors():
    params = SamplingParams(temperature=0.3, top_k=7, seed=9, stop=["\n\n"])
    assert SamplingParams.from_dict(params.to_dict()) == params
    assert SamplingParams.from_dict({"stop": "END"}).stop == ["END"]
    with pytest.raises(KettleError, match="unknown sampling parameter top_q"):
        SamplingParams.from_dict({"top_q": 0.5})
    with pytest.raises(KettleError, match="top_p must be in"):
        SamplingParams.from_dict({"top_p": 2})


def test_presets_are_valid_and_copies():
    for name in PRESETS:
        get_preset(name).validate()
    p = get_preset("creative")
    p.stop.append("x")
    assert PRESETS["creative"].stop == []
    with pytest.raises(KettleError, match="unknown sampling preset"):
        get_preset("wild")


def test_the_readme_names_the_presets_the_app_offers():
    listed = re.search(r"presets ((?:[\w-]+ / )*[\w-]+)", (ROOT / "README.md").read_text(encoding="utf-8"))
    assert listed.group(1).split(" / ") == list(PRESETS)


@pytest.mark.parametrize("kind", ["gaussian", "ties", "one token dominates a flat tail"])
def test_the_nucleus_of_a_flat_vocabulary_is_exact_without_a_full_sort(kind):
    """A flat distribution over GPT-2's 50k tokens takes the bucketed path; it must keep the
    same tokens as the sorted rule computed in float64 (with ties, as many tied tokens)."""
    g = torch.Generator().manual_seed(5)
    logits = {
        "gaussian": torch.randn(50257, generator=g) * 0.5,
        "ties": torch.randint(0, 6, (50257,), generator=g).float() * 0.2,
        "one token dominates a flat tail": torch.cat([torch.tensor([9.0]), torch.randn(50256, generator=g) * 0.1]),
    }[kind]
    for top_p in (0.3, 0.9, 0.999):
        params = SamplingParams(temperature=0.7, top_p=top_p)
        got = Sampler(params, 50257, "cpu", [], seed=0).distribution(logits)
        expected = reference_distribution(logits.double(), params).float()
        assert int((got > 0).sum()) == int((expected > 0).sum())
        assert torch.allclose(got.sort().values, expected.sort().values, atol=1e-7)
        if kind == "gaussian":  # no ties: the very same tokens
            assert torch.equal(got > 0, expected > 0)


# --- the parameter table: every parameter reaches every place that offers it ------------------


def _changed(p: Param):
    """A valid value of parameter `p` other than its default."""
    default = getattr(SamplingParams(), p.name)
    if p.many:
        return ["x", "y"]
    if p.kind is int:
        return default + 1 if default is not None else p.low + 7
    # A small step, which the server's narrower OpenAI ranges (temperature <= 2) allow too.
    return next(v for v in (default + 0.25, default - 0.25) if _allowed(p, v))


def _allowed(p: Param, value) -> bool:
    try:
        p.check(value)
    except KettleError:
        return False
    return True


def _all_changed() -> SamplingParams:
    params = SamplingParams(**{p.name: _changed(p) for p in PARAMS}).validate()
    assert all(getattr(params, p.name) != getattr(SamplingParams(), p.name) for p in PARAMS)
    return params


def test_the_table_is_every_field_in_order():
    assert [p.name for p in PARAMS] == [f.name for f in dataclasses.fields(SamplingParams)]


def test_every_parameter_goes_to_the_server_and_back():
    from gpt.server import ChatRequest, CompletionRequest, sampling_params
    from gpt.service import params_to_openai

    params = _all_changed()
    body = params_to_openai(params)
    assert set(body) == {p.openai for p in PARAMS}
    chat = ChatRequest.model_validate({"messages": [{"role": "user", "content": "Hi"}], **body})
    assert sampling_params(chat, chat.max_tokens) == params
    completion = CompletionRequest.model_validate({"prompt": "Hi", **body})
    assert sampling_params(completion, completion.max_tokens) == params


def test_every_parameter_with_a_flag_is_a_generate_flag():
    from tui.cli import build_parser
    from tui.commands.generate import sampling_params

    params = _all_changed()
    argv = []
    for p in PARAMS:
        if p.metavar:
            value = getattr(params, p.name)
            for one in value if p.many else [value]:
                argv += ["--" + p.name.replace("_", "-"), str(one)]
    args = build_parser().parse_args(["generate", "MODEL", "PROMPT", *argv])
    flagged = {p.name for p in PARAMS if p.metavar}
    assert sampling_params(args) == SamplingParams().replace(**{name: getattr(params, name) for name in flagged})


async def test_every_parameter_with_a_label_is_in_the_sampling_panel():
    from textual.app import App
    from textual.widgets import Input, Label

    from tui.widgets.sampling import SamplingPanel

    class PanelApp(App):
        def compose(self):
            yield SamplingPanel()

    params = _all_changed()
    async with PanelApp().run_test() as pilot:
        panel = pilot.app.query_one(SamplingPanel)
        panel.show(params, "")
        labels = {str(label.content) for label in panel.query(Label)}
        inputs = {
            i.id.removeprefix("param-"): i.value for i in panel.query(Input) if i.id and i.id.startswith("param-")
        }
    shown = [p for p in PARAMS if p.label]
    assert shown and {p.label for p in shown} <= labels
    assert inputs == {p.name: str(getattr(params, p.name)) for p in shown}


def test_the_table_loads_without_torch():
    """`kettle generate` builds its flags from PARAMS, and `kettle --help` must stay instant."""
    import subprocess
    import sys

    code = "import sys, gpt.sampling; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False"]


def test_a_grounded_answer_keeps_copying_its_best_passage_over_what_the_model_prefers():
    """A model that learned its own answer (a lesson) prefers it by a wide margin, and a second
    passage (the lesson's documentation) begins with that answer's word: the best passage, the
    user's correction, is still begun and copied to its end, however much the model would rather
    say something else once it has begun, under greedy and sampled choice."""
    from gpt.sampling import CopyBias

    correction, lesson_doc, stop = [11, 12, 13, 14], [21, 22], 0
    copy = CopyBias([correction, lesson_doc], [[False, True, True, True], [False, True]], {stop}, taught=1)
    first = {21: 10.0}  # its lesson's first word
    then = {12: -6.0, 31: 50.0}  # far off the correction's second
    for params in (SamplingParams(temperature=0), SamplingParams(seed=1, temperature=0.7)):
        sampler = Sampler(params, 40, "cpu", [], params.seed or 0, copy=copy)
        answer = []
        for _ in range(6):
            logits = torch.zeros(40)
            for token, value in (then if answer else first).items():
                logits[token] = value
            token = int(sampler(logits))
            if token == stop:
                break
            answer.append(token)
        assert answer == correction


def test_where_two_passages_alike_part_the_better_ranked_one_is_followed():
    """The starter's lessons on str.isnumeric and str.isalnum both begin "Call str.is": with the
    one asked about retrieved first, the answer went on as the other, which the model preferred."""
    from gpt.sampling import CopyBias

    best, alike = [1, 2, 3, 4], [1, 2, 3, 5]
    copy = CopyBias([best, alike], [[False, True, True, True]] * 2, {0})
    logits = torch.zeros(8)
    logits[5] = 3.0  # the model would rather go on as the second passage
    assert int(copy.apply(logits, [1, 2, 3]).argmax()) == 4
    assert int(copy.apply(logits, [9, 2, 3]).argmax()) == 4  # a tail found in both, however begun
