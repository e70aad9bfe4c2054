import threading

import pytest
import torch

from gpt import native
from gpt.chat_template import render_message, render_prompt
from gpt.device import pick_device
from gpt.engine import Engine, GenerationResult, TextStream, _content_words, _from_answering_sentence
from gpt.errors import KettleError
from gpt.sampling import SamplingParams
from gpt.tokenizer import gpt2_tokenizer

GREEDY = SamplingParams(temperature=0, max_new_tokens=20)


@pytest.fixture
def engine(tiny_model_dir):
    return Engine.load(tiny_model_dir, device="cpu")


def run(stream):
    """All deltas and the final result of a stream."""
    items = list(stream)
    assert isinstance(items[-1], GenerationResult)
    assert all(isinstance(d, str) and d for d in items[:-1])
    return items[:-1], items[-1]


def greedy_without_cache(engine, ids, n):
    """The reference: recompute the whole sequence for every new token."""
    ids, out = list(ids), []
    with torch.inference_mode():
        for _ in range(n):
            token = int(engine.model(torch.tensor([ids]))[0, -1].argmax())
            if token in engine.stop_ids:
                break
            ids.append(token)
            out.append(token)
    return out


def test_greedy_with_kv_cache_equals_full_recompute(engine, verdict_text):
    tok = engine.tokenizer
    prompts = [
        tok.encode(verdict_text[:1]),
        tok.encode(verdict_text[:40]),
        tok.encode(verdict_text[500:900])[:70],
        tok.encode(verdict_text[:40]) + [5, 6],
    ]
    # One engine for all, so later prompts also run over a reused (rewound) cache.
    for ids, n in zip(prompts, [30, 12, 40, 25]):
        result = engine.generate(ids, GREEDY.replace(max_new_tokens=n))
        assert result.token_ids == greedy_without_cache(engine, ids, n)
        assert result.new_tokens == len(result.token_ids)
        assert result.text == tok.decode(result.token_ids)


def compiled_engine_matches_eager(model_dir, verdict_text, *, backend):
    """A compiled engine's greedy tokens and sampled tokens equal the eager engine's, for prompts
    that reuse its cache (rewound) and one whose answer runs into the context's end."""
    eager, compiled = Engine.load(model_dir, device="cpu"), Engine.load(model_dir, device="cpu")
    eager.speculation = None
    compiled.compile_decode(backend=backend)
    tok = eager.tokenizer
    long_prompt = tok.encode(verdict_text)[: eager.context_length - 6]
    cases = [
        (tok.encode(verdict_text[:40]), GREEDY.replace(max_new_tokens=30)),
        (tok.encode(verdict_text[:40]) + [5, 6], GREEDY.replace(max_new_tokens=20)),
        (tok.encode(verdict_text[300:700]), SamplingParams(temperature=0.9, top_k=50, seed=3, max_new_tokens=25)),
        (long_prompt, GREEDY.replace(max_new_tokens=20)),
    ]
    for ids, params in cases:
        assert compiled.generate(ids, params).token_ids == eager.generate(ids, params).token_ids
    return compiled


def test_compiled_decode_step_traces_as_one_graph_and_matches_eager(tiny_model_dir, verdict_text):
    # The eager backend runs dynamo's tracing (fullgraph: one graph, or an error) without the
    # minute inductor takes to compile; the slow test below compiles for real.
    torch._dynamo.reset()
    compiled = compiled_engine_matches_eager(tiny_model_dir, verdict_text, backend="eager")
    assert compiled._compiled is not None  # the decoding steps went through it
    assert compiled.speculation is None


@pytest.mark.slow
def test_inductor_compiled_decode_matches_eager(tiny_model_dir, verdict_text):
    torch._dynamo.reset()
    compiled_engine_matches_eager(tiny_model_dir, verdict_text, backend="inductor")


def test_greedy_matches_on_gpt2_vocabulary(tiny_gpt2_vocab_model_dir):
    engine = Engine.load(tiny_gpt2_vocab_model_dir)
    ids = engine.tokenizer.encode("The kettle is boiling and")
    result = engine.generate(ids, GREEDY.replace(max_new_tokens=15))
    assert result.token_ids == greedy_without_cache(engine, ids, 15)


def test_seeded_sampling_reproduces_exactly(engine, tiny_model_dir):
    params = SamplingParams(
        temperature=1.2,
        top_p=0.95,
        min_p=0.01,
        repetition_penalty=1.2,
        presence_penalty=0.3,
        frequency_penalty=0.2,
        max_new_tokens=30,
        seed=1234,
    )
    first = engine.generate("It was", params)
    again = Engine.load(tiny_model_dir).generate("It was", params)
    assert again.token_ids == first.token_ids and again.text == first.text
    assert first.seed == 1234
    other = engine.generate("It was", params.replace(seed=99))
    assert other.token_ids != first.token_ids
    # An unseeded run reports the seed it drew; passing it back reproduces it.
    free = engine.generate("It was", params.replace(seed=None))
    assert engine.generate("It was", params.replace(seed=free.seed)).token_ids == free.token_ids


def test_ids_past_the_tokenizer_are_never_drawn(trained_tokenizer):
    """A model whose vocabulary is larger than its tokenizer's (a preset asked for more tokens
    than a small corpus gave), even when those ids get the highest logits."""
    from gpt.config import GPTConfig
    from gpt.model import GPT

    torch.manual_seed(0)
    model = GPT(
        GPTConfig(vocab_size=trained_tokenizer.n_vocab + 100, context_length=64, n_layer=1, n_head=2, n_embd=16)
    )
    with torch.no_grad():
        model.lm_head.weight[trained_tokenizer.n_vocab :] = model.lm_head.weight[:100] * 50
    engine = Engine(model, trained_tokenizer)
    for seed in range(3):
        result = engine.generate("The", SamplingParams(temperature=1.0, max_new_tokens=20, seed=seed))
        assert max(result.token_ids) < trained_tokenizer.n_vocab and result.text


def test_length_limit_and_result_figures(engine):
    deltas, result = run(engine.stream("I had", GREEDY.replace(max_new_tokens=9)))
    assert result.finish_reason == "length" and result.new_tokens == 9
    assert "".join(deltas) == result.text
    assert result.prompt_tokens == len(engine.tokenizer.encode("I had"))
    assert result.ttft_s > 0 and result.tokens_per_s > 0


def test_generation_stops_when_the_context_window_is_full(engine, verdict_text):
    ids = engine.tokenizer.encode(verdict_text)[:60]
    result = engine.generate(ids, GREEDY.replace(max_new_tokens=100))
    assert result.prompt_tokens == 60 and result.dropped_tokens == 0
    assert result.finish_reason == "length" and result.new_tokens == 128 - 60


def test_stop_string_spanning_two_tokens_stops_with_it_removed(engine):
    ids = engine.tokenizer.encode("the picture")
    params = SamplingParams(temperature=1.0, seed=5, max_new_tokens=40)
    full = engine.generate(ids, params)
    pieces = [engine.tokenizer.decode([t]) for t in full.token_ids]
    # A stop string made of the end of one token and the start of the next.
    i = next(i for i in range(3, len(pieces) - 1) if all(len(p) >= 2 and p.isascii() for p in pieces[i : i + 2]))
    stop = pieces[i][-2:] + pieces[i + 1][:2]
    cut = full.text.find(stop)
    assert 0 <= cut <= len("".join(pieces[: i + 1]))
    deltas, result = run(engine.stream(ids, params.replace(stop=["zzzz", stop])))
    assert result.finish_reason == "stop"
    assert result.text == full.text[:cut]
    assert "".join(deltas) == result.text  # nothing of the stop string was ever streamed
    assert result.token_ids == full.token_ids[: len(result.token_ids)]


def test_text_stream_holds_back_a_possible_stop_string_until_resolved():
    tok = gpt2_tokenizer()
    stream = TextStream(tok, ["User:"])
    out = [stream.feed(t) for t in tok.encode("Hi Us")]
    assert "".join(out) == "Hi "  # "Us" might begin "User:"
    assert stream.feed(tok.encode("ually")[0]) != ""  # it did not: released
    stream = TextStream(tok, ["User:"])
    deltas = [stream.feed(t) for t in tok.encode("Hi User: more")]
    assert "".join(deltas) == "Hi " and stream.matched == "User:" and stream.text == "Hi "
    assert stream.finish() == ""
    stream = TextStream(tok, ["END"])
    deltas = [stream.feed(t) for t in tok.encode("ok EN")] + [stream.finish()]
    assert "".join(deltas) == "ok EN"  # held back, then flushed at the end


def test_text_stream_never_splits_a_utf8_character():
    tok = gpt2_tokenizer()
    text = "tea 🍵 and 日本語 ☕"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # the emoji and kanji span several byte tokens
    stream = TextStream(tok, [])
    deltas = [stream.feed(t) for t in ids] + [stream.finish()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_stops_at_end_of_turn_token(tiny_model_dir):
    engine = Engine.load(tiny_model_dir)
    model = engine.model
    end = engine.tokenizer.special_id("<|end|>")
    with torch.no_grad():  # make <|end|> the most likely token everywhere
        model.ln_f.weight.zero_()
        model.ln_f.bias.copy_(torch.randn(model.config.n_embd))
        model.wte.weight[end] = model.ln_f.bias * 100
    deltas, result = run(engine.stream_chat([{"role": "user", "content": "Hi"}], GREEDY))
    assert result.finish_reason == "stop" and result.new_tokens == 0 and result.text == ""
    assert deltas == []


def test_cancel_stops_within_one_token(engine):
    full = engine.generate("She", GREEDY.replace(max_new_tokens=30))
    cancel = threading.Event()
    seen = []
    for item in engine.stream("She", GREEDY.replace(max_new_tokens=30), cancel=cancel):
        if isinstance(item, str):
            seen.append(item)
            cancel.set()
        else:
            result = item
    assert len(seen) == 1 and result.finish_reason == "cancelled"
    # Exactly the tokens up to the first visible text, not one more.
    stream, n = TextStream(engine.tokenizer, []), 0
    while not stream.feed(full.token_ids[n]):
        n += 1
    assert result.token_ids == full.token_ids[: n + 1]
    cancel = threading.Event()
    cancel.set()
    deltas, result = run(engine.stream("She", GREEDY, cancel=cancel))
    assert deltas == [] and result.finish_reason == "cancelled" and result.new_tokens == 0


def count_prefill(engine):
    """Records how many tokens each forward pass feeds the model (through PyTorch or in one
    native step: both are Engine._next_logits)."""
    fed = []
    feed = engine._next_logits

    def counted(x):
        fed.append(x.shape[1])
        return feed(x)

    engine._next_logits = counted
    return fed


def test_prefix_reuse_prefills_only_the_new_tokens(engine, tiny_model_dir):
    engine.speculation = None  # one token per decoding step (speculation feeds drafts too)
    fed = count_prefill(engine)
    turn1 = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who painted it?"}]
    r1 = engine.generate_chat(turn1, GREEDY)
    assert r1.cached_tokens == 0 and fed[0] == r1.prompt_tokens
    turn2 = turn1 + [{"role": "assistant", "content": r1.text}, {"role": "user", "content": "And why did he stop?"}]
    fed.clear()
    r2 = engine.generate_chat(turn2, GREEDY)
    prompt1 = render_prompt(turn1, engine.tokenizer)
    assert r2.cached_tokens >= len(prompt1)
    assert fed[0] == r2.prompt_tokens - r2.cached_tokens
    assert fed[0] <= len(render_prompt(turn2, engine.tokenizer)) - len(prompt1)
    assert all(n == 1 for n in fed[1:])  # then one token per step
    # Reusing the cache changes nothing in the answer.
    fresh = Engine.load(tiny_model_dir).generate_chat(turn2, GREEDY)
    assert fresh.token_ids == r2.token_ids and fresh.cached_tokens == 0
    # The same prompt again: everything but the last token is reused.
    fed.clear()
    again = engine.generate_chat(turn2, GREEDY)
    assert again.cached_tokens == again.prompt_tokens - 1 and fed[0] == 1
    assert again.token_ids == r2.token_ids
    # A different conversation shares nothing useful and still answers correctly.
    other = [{"role": "user", "content": "Something else entirely."}]
    r3 = engine.generate_chat(other, GREEDY)
    assert r3.token_ids == Engine.load(tiny_model_dir).generate_chat(other, GREEDY).token_ids


def conversation(n_turns):
    messages = [{"role": "system", "content": "You answer about the painting."}]
    for i in range(n_turns):
        messages.append({"role": "user", "content": f"Question {i}: what did Gisburn paint then?"})
        messages.append({"role": "assistant", "content": f"Answer {i}: a portrait of his wife."})
    messages.append({"role": "user", "content": "And finally?"})
    return messages


def test_over_long_conversation_keeps_system_prompt_and_newest_turns(engine):
    tok = engine.tokenizer
    messages = conversation(12)
    params = GREEDY.replace(max_new_tokens=32)
    budget = 128 - 32
    seg = [render_message(m, tok) for m in messages]
    header = render_prompt([], tok)
    full = render_prompt(messages, tok)
    assert len(full) > 128
    # The documented rule, computed by hand: newest whole messages that fit, starting at a user turn.
    start = len(seg)
    while start > 1 and len(seg[0]) + sum(map(len, seg[start - 1 :])) + len(header) <= budget:
        start -= 1
    if messages[start]["role"] == "assistant":
        start += 1
    expected = seg[0] + sum(seg[start:], []) + header
    ids, dropped = engine.chat_prompt(messages, params)
    assert ids == expected and dropped == len(full) - len(expected)
    assert len(ids) <= budget and messages[start]["role"] == "user" and start > 2
    result = engine.generate_chat(messages, params)
    assert result.dropped_tokens == dropped and result.prompt_tokens == len(ids)
    assert result.prompt_tokens + result.new_tokens <= 128
    # A short conversation is not touched.
    assert engine.chat_prompt(messages[:3], params) == (render_prompt(messages[:3], tok), 0)


def test_a_conversation_of_100000_messages_is_trimmed_in_linear_time(engine):
    import time

    messages = conversation(50_000)
    start = time.monotonic()
    ids, dropped = engine.chat_prompt(messages, GREEDY.replace(max_new_tokens=32))
    # Joined with sum() it took 30 s (quadratic: 40,000 messages took 5 s, 4,000 took 0.05 s).
    assert time.monotonic() - start < 5
    system = render_message(messages[0], engine.tokenizer)
    assert len(ids) <= 96 and dropped > 1_000_000 and ids[: len(system)] == system  # the system prompt kept


def test_answer_budget_is_capped_at_half_the_window(engine):
    messages = conversation(12)
    ids, _ = engine.chat_prompt(messages, GREEDY.replace(max_new_tokens=1000))
    assert 50 < len(ids) <= 64
    result = engine.generate_chat(messages, SamplingParams(temperature=0, max_new_tokens=1000))
    assert result.prompt_tokens + result.new_tokens <= 128
    assert result.finish_reason in ("length", "stop")


def test_newest_message_longer_than_the_window_keeps_its_last_tokens(engine, verdict_text):
    messages = [{"role": "system", "content": "Summarise."}, {"role": "user", "content": verdict_text[:3000]}]
    full = render_prompt(messages, engine.tokenizer)
    ids, dropped = engine.chat_prompt(messages, GREEDY.replace(max_new_tokens=28))
    assert ids == full[-100:] and dropped == len(full) - 100


def test_raw_prompt_trimming_empty_prompt_and_bad_ids(engine, verdict_text):
    ids = engine.tokenizer.encode(verdict_text[:3000])
    result = engine.generate(ids, GREEDY.replace(max_new_tokens=8))
    assert result.prompt_tokens == 120 and result.dropped_tokens == len(ids) - 120
    assert engine.generate("", GREEDY.replace(max_new_tokens=3)).prompt_tokens == 1
    with pytest.raises(KettleError, match="outside the model's vocabulary"):
        engine.generate([1, 99999], GREEDY)
    with pytest.raises(KettleError, match="top_p must be in"):
        engine.stream("x", SamplingParams(top_p=0))
    with pytest.raises(KettleError, match="message 0: role"):
        engine.stream_chat([{"role": "robot", "content": "x"}], GREEDY)


def test_device_choice():
    assert pick_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert pick_device() in (torch.device("cpu"), torch.device("mps"))
        with pytest.raises(KettleError, match="no CUDA GPU"):
            pick_device("cuda")
    with pytest.raises(KettleError, match="unknown device"):
        pick_device("toaster")


def test_kettle_generate_command(tiny_model_dir, capsys, monkeypatch):
    from tui.cli import main

    argv = [
        "generate",
        str(tiny_model_dir),
        "It was",
        "--temperature",
        "0.9",
        "--top-k",
        "20",
        "--top-p",
        "0.9",
        "--min-p",
        "0.02",
        "--repetition-penalty",
        "1.1",
        "--seed",
        "7",
        "--max-new-tokens",
        "12",
    ]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    expected = Engine.load(tiny_model_dir).generate(
        "It was",
        SamplingParams(
            temperature=0.9, top_k=20, top_p=0.9, min_p=0.02, repetition_penalty=1.1, seed=7, max_new_tokens=12
        ),
    )
    assert out == expected.text + "\n"
    assert "seed 7" in err and "tokens/s" in err
    assert main(argv + ["--stream"]) == 0
    assert capsys.readouterr().out == out  # streamed deltas add up to the same text
    assert (
        main(
            [
                "generate",
                str(tiny_model_dir),
                "Hi",
                "--chat",
                "--system",
                "Be brief.",
                "--temperature",
                "0",
                "--max-new-tokens",
                "5",
                "--stop",
                "e",
            ]
        )
        == 0
    )
    chat = Engine.load(tiny_model_dir).generate_chat(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        SamplingParams(temperature=0, max_new_tokens=5, stop=["e"]),
    )
    assert capsys.readouterr().out == chat.text + "\n"
    # A greedy answer on the CPU is speculated (Engine.speculation): its figures say how many of
    # the drafted tokens the model kept. Through PyTorch's step (no native kernel), where checking
    # drafts always pays; the native step decides by measuring (test_speculative.py).
    monkeypatch.setenv("KETTLE_NATIVE", "0")
    native._library.cache_clear()
    try:
        repeated = "It was a dream. " * 8
        assert main(["generate", str(tiny_model_dir), repeated, "--temperature", "0", "--max-new-tokens", "24"]) == 0
        greedy = Engine.load(tiny_model_dir).generate(repeated, SamplingParams(temperature=0, max_new_tokens=24))
    finally:
        native._library.cache_clear()
    assert greedy.drafted_tokens
    assert f"speculative drafts kept {greedy.accepted_tokens}/{greedy.drafted_tokens}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, code, message",
    [  # 2: argparse checks the flag's own range
        (["--top-p", "0"], 2, "kettle generate: error: argument --top-p: must be in (0, 1]"),
        (["--max-new-tokens", "0"], 2, "argument --max-new-tokens: must be >= 1"),
        (["--system", "x"], 1, "kettle: error: --system needs --chat"),
        (["--device", "toaster"], 2, "argument --device: unknown device"),
    ],
)
def test_kettle_generate_rejects_bad_flags(tiny_model_dir, capsys, extra, code, message):
    from tui.cli import main

    try:
        status = main(["generate", str(tiny_model_dir), "x", *extra])
    except SystemExit as exc:
        status = exc.code
    assert status == code and message in capsys.readouterr().err


def test_kettle_generate_unknown_model(capsys):
    from tui.cli import main

    assert main(["generate", "no-such-model", "x"]) == 1
    assert "no-such-model: no such model" in capsys.readouterr().err


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0, max_new_tokens=6),
        SamplingParams(
            temperature=0.7,
            top_k=20,
            top_p=0.9,
            min_p=0.02,
            repetition_penalty=1.3,
            presence_penalty=0.5,
            frequency_penalty=0.4,
            seed=3,
            max_new_tokens=6,
        ),
    ],
)
def test_logprobs_are_log_softmax_of_a_direct_forward_pass_after_the_filters(engine, params):
    from gpt.sampling import apply_penalties, min_p_filter, top_k_filter, top_p_filter

    prompt = engine.tokenizer.encode("She had always thought")
    result = engine.generate(prompt, params, logprobs=4, echo=True)
    ids = prompt + result.token_ids
    with torch.inference_mode():
        logits = engine.model(torch.tensor([ids]))[0, :, : engine.tokenizer.n_vocab].float()
    # The prompt: raw log_softmax; its first token has none.
    raw = logits.log_softmax(-1)
    assert [e.token for e in result.prompt_logprobs] == prompt and result.prompt_logprobs[0].logprob is None
    for i, entry in enumerate(result.prompt_logprobs[1:]):
        assert entry.logprob == pytest.approx(float(raw[i, prompt[i + 1]]), abs=1e-4)
        assert [t for t, _ in entry.top] == raw[i].topk(4).indices.tolist()
    # The answer: penalties, temperature, top-k, top-p, min-p, then log_softmax (OpenAI's definition).
    assert len(result.logprobs) == len(result.token_ids) > 0
    counts = torch.zeros(engine.tokenizer.n_vocab)
    for step, entry in enumerate(result.logprobs):
        at = len(prompt) + step - 1
        seen = torch.zeros(engine.tokenizer.n_vocab, dtype=torch.bool)
        seen[ids[: at + 1]] = True
        x = apply_penalties(logits[at], params, seen=seen, counts=counts) / (params.temperature or 1.0)
        x = min_p_filter(top_p_filter(top_k_filter(x, params.top_k), params.top_p), params.min_p)
        expected = x.log_softmax(-1)
        assert entry.token == result.token_ids[step]
        assert entry.logprob == pytest.approx(float(expected[entry.token]), abs=1e-4)
        assert len(entry.top) <= 4 and all(v > float("-inf") for _, v in entry.top)
        for token, value in entry.top:
            assert value == pytest.approx(float(expected[token]), abs=1e-4)
        if params.greedy:  # the greedy choice is the most likely token
            assert entry.top[0][0] == entry.token
        counts[entry.token] += 1


def test_a_prompt_too_long_is_refused_unless_it_may_be_trimmed(engine):
    from gpt.engine import ContextLengthExceeded

    params = SamplingParams(temperature=0, max_new_tokens=10)
    ids = list(range(5, 5 + engine.prompt_budget(params) + 1))
    with pytest.raises(
        ContextLengthExceeded,
        match=r"the prompt is 119 tokens, but this model's "
        r"context of 128 tokens holds at most 118",
    ):
        engine.stream(ids, params, truncate=False)
    assert engine.generate(ids, params).dropped_tokens == 1  # the app's default: trimmed
    assert engine.generate(ids[1:], params).dropped_tokens == 0
    long_chat = [{"role": "user", "content": "word " * 200}]
    with pytest.raises(ContextLengthExceeded):
        engine.stream_chat(long_chat, params, truncate=False)
    assert engine.generate_chat(long_chat, params).dropped_tokens > 0


def test_a_grounded_answer_copies_its_passage_and_stops_at_its_end(chat_model_dir):
    """The copy bias: a model that knows nothing (random weights) answers from the passage put
    beside the question, word for word, and ends where the passage does; ungrounded, it does not."""
    from gpt.chat_template import grounded

    engine = Engine.load(chat_model_dir, device="cpu")
    question = [{"role": "user", "content": "How can I reverse a list?"}]
    answer = "Call my_list.reverse() to reverse it in place."
    messages, used = engine.ground(question, [f"How do I reverse a list?\n{answer}"], SamplingParams(max_new_tokens=40))
    assert used == 1 and messages == grounded(question, [f"How do I reverse a list?\n{answer}"])
    for params in (SamplingParams(temperature=0, max_new_tokens=40), SamplingParams(seed=3, max_new_tokens=40)):
        result = engine.generate_chat(messages, params)
        assert (result.text, result.finish_reason) == (answer, "stop")
    assert engine.generate_chat(question, SamplingParams(temperature=0, max_new_tokens=40)).text != answer
    # a taught passage (the user's correction) is marked as such for the copy bias, as far as it fits
    fits = SamplingParams(max_new_tokens=40)
    messages, _ = engine.ground(question, [f"Reverse?\n{answer}", "list.reverse\n\nReverse."], fits, taught=1)
    assert (messages[-1]["taught"], engine.copy_bias(messages).taught) == (1, 1)
    assert engine.copy_bias(engine.ground(question, ["list.reverse\n\nReverse."], fits)[0]).taught == 0
    # a documented name: the answer part is the documentation after its signature line, its
    # wrapped lines joined, and the first sentence comes back
    doc = "textwrap.dedent(text)\n\nRemove any common leading whitespace from\nevery line in `text`."
    messages, _ = engine.ground(
        [{"role": "user", "content": "What does textwrap.dedent do?"}], [doc], SamplingParams(max_new_tokens=40)
    )
    text = engine.generate_chat(messages, SamplingParams(temperature=0, max_new_tokens=40)).text
    assert text == "Remove any common leading whitespace from every line in `text`."


def test_a_grounded_answer_copies_the_sentence_of_a_document_that_answers(chat_model_dir):
    """A document says what it says in its own order: asked how long to steep a tea beside a
    note whose first sentence warns about boiling water, the answer copied the warning (seen in
    tmux). A model that knows nothing answers with the sentence holding the question's words."""
    engine = Engine.load(chat_model_dir, device="cpu")
    note = (
        "Zorblax tea\nNever use boiling water: it makes zorblax tea bitter. Steep zorblax tea for seven "
        "minutes at 80 degrees. Serve it with honey."
    )
    greedy = SamplingParams(temperature=0, max_new_tokens=40)
    question = [{"role": "user", "content": "How long should I steep zorblax tea?"}]
    messages, _ = engine.ground(question, [note], greedy)
    assert engine.generate_chat(messages, greedy).text.startswith("Steep zorblax tea for seven minutes at 80 degrees.")
    # where no later sentence holds more of the question than the first, the passage is as it is
    paragraphs = [note.partition("\n")[2]]
    assert _from_answering_sentence(paragraphs, _content_words("What is zorblax tea?")) == paragraphs
    assert _from_answering_sentence(paragraphs, _content_words("How long to steep it?")) == paragraphs  # one word
    # what the user taught is copied whole, from its beginning, whatever the question's words
    messages, _ = engine.ground(
        [{"role": "user", "content": "How long should I steep zorblax tea?"}], [note], greedy, taught=1
    )
    assert engine.generate_chat(messages, greedy).text.startswith("Never use boiling water")
