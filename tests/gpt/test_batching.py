"""Continuous batching (gpt.batching) through InProcessService and the HTTP server: rows join and
leave a running batch, and every request's tokens are the ones it gets served alone."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import torch

from gpt.batching import row_bytes
from gpt.engine import Engine
from gpt.native import NativeStep
from gpt.sampling import SamplingParams
from gpt.server import build_server, listen
from gpt.service import Delta, Done, InProcessService

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]
# Different prompts, lengths and sampling settings (greedy, seeded draws, penalties, a stop string).
# Long enough that every request is still decoding when the last one joins, however fast a step
# (a native step a token decodes the tiny model's tokens in a fraction of a millisecond).
REQUESTS = [
    ("complete", "I had always thought", dict(temperature=0, max_new_tokens=400)),
    ("chat", CHAT, dict(temperature=0.8, top_k=50, seed=7, max_new_tokens=300)),
    (
        "complete",
        "She",
        dict(temperature=1.0, top_p=0.9, repetition_penalty=1.3, presence_penalty=0.5, seed=3, max_new_tokens=120),
    ),
    (
        "chat",
        [{"role": "user", "content": "Hello there, how are you today?"}],
        dict(temperature=0.7, min_p=0.05, frequency_penalty=0.4, seed=99, max_new_tokens=250, stop=["e"]),
    ),
    ("complete", [5, 6, 7, 8, 9, 10], dict(temperature=0, max_new_tokens=80)),
]


def batch_shapes(service, monkeypatch) -> list[tuple[int, int]]:
    """The input shape of every forward pass of the service's real model: [1, T] prefills,
    [B, 1] batched steps (through PyTorch, or in one native step: gpt.native)."""
    service.load()
    shapes = []
    service._engine.model.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    step = NativeStep.__call__

    def recorded(self, tokens, positions, slots=None):
        shapes.append((len(tokens), 1) if slots is None else (1, len(tokens)))  # rows, or one row's tokens
        return step(self, tokens, positions, slots)

    monkeypatch.setattr(NativeStep, "__call__", recorded)
    return shapes


def events_of(service, kind, payload, params, rid=None):
    go = service.stream_chat if kind == "chat" else service.complete
    return go(payload, SamplingParams(**params), request_id=rid)


async def collect(events):
    return [event async for event in events]


def alone(engine, kind, payload, params):
    go = engine.generate_chat if kind == "chat" else engine.generate
    return go(payload, SamplingParams(**params))


async def test_rows_join_and_leave_and_keep_the_tokens_they_get_alone(long_context_model_dir, monkeypatch):
    service = InProcessService(str(long_context_model_dir))
    try:
        shapes = batch_shapes(service, monkeypatch)
        results: dict[int, list] = {}
        first_rows = asyncio.Event()

        async def run(i, kind, payload, params):
            results[i] = []
            async for event in events_of(service, kind, payload, params, f"r{i}"):
                results[i].append(event)
                if i == 0 and sum(isinstance(e, Delta) for e in results[0]) == 3:
                    first_rows.set()

        async def cancelled_one():  # leaves the batch midway; the others must not notice
            events = []
            async for event in events_of(service, "chat", CHAT, dict(temperature=0, max_new_tokens=1000), "gone"):
                events.append(event)
                if len(events) == 4:
                    service.cancel("gone")
            return events

        head = asyncio.create_task(run(0, *REQUESTS[0]))
        await first_rows.wait()  # the rest join a batch already decoding
        *_, gone = await asyncio.gather(head, *(run(i, *r) for i, r in enumerate(REQUESTS) if i), cancelled_one())
    finally:
        service.close()
    assert gone[-1].result.finish_reason == "cancelled" and gone[-1].result.new_tokens < 1000
    engine = Engine.load(long_context_model_dir)
    for i, (kind, payload, params) in enumerate(REQUESTS):
        done = results[i][-1]
        assert isinstance(done, Done), done
        expected = alone(engine, kind, payload, params)
        assert done.result.token_ids == expected.token_ids, i
        assert done.result.text == expected.text == "".join(e.text for e in results[i][:-1])
        assert done.result.finish_reason == expected.finish_reason
        assert done.result.prompt_tokens == expected.prompt_tokens
        assert done.result.seed == params.get("seed", done.result.seed)
    steps = [b for b, t in shapes if t == 1]
    assert max(steps) == len(REQUESTS) + 1  # all in flight together, the cancelled one too
    assert steps[0] == 1 and steps[-1] < max(steps)  # rows joined one decoding alone, and left


async def test_the_batch_and_the_kv_budget_bound_the_rows_and_the_rest_wait_in_order(
    long_context_model_dir, monkeypatch
):
    from gpt.checkpoint import read_meta

    config = read_meta(long_context_model_dir)[1]
    service = InProcessService(
        str(long_context_model_dir), kv_budget=2 * row_bytes(config, torch.float32) + 1
    )  # two rows fit
    try:
        shapes = batch_shapes(service, monkeypatch)
        order = []

        async def run(i):
            params = dict(temperature=0, max_new_tokens=6 + 3 * i)
            async for event in events_of(service, "complete", f"Story {i}:", params):
                order.append((i, event))
            return event

        dones = await asyncio.gather(*(run(i) for i in range(5)))
    finally:
        service.close()
    assert [d.result.new_tokens for d in dones] == [6 + 3 * i for i in range(5)]
    assert max(b for b, t in shapes if t == 1) == 2
    started = [i for n, (i, _) in enumerate(order) if all(j != i for j, _ in order[:n])]
    assert started == [0, 1, 2, 3, 4]  # queued requests start in the order they came


async def test_the_next_turn_reuses_the_cached_prefix(long_context_model_dir):
    service = InProcessService(str(long_context_model_dir))
    try:
        params = dict(temperature=0, max_new_tokens=5)
        first = (await collect(events_of(service, "chat", CHAT, params)))[-1].result
        turn = CHAT + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And then?"}]
        second = (await collect(events_of(service, "chat", turn, params)))[-1].result
    finally:
        service.close()
    assert second.cached_tokens >= first.prompt_tokens
    assert second.token_ids == alone(Engine.load(long_context_model_dir), "chat", turn, params).token_ids


def test_n_choices_are_rows_of_one_batch_over_one_prefill(long_context_model_dir, monkeypatch):
    service = InProcessService(str(long_context_model_dir))
    shapes = batch_shapes(service, monkeypatch)
    server = build_server(service, None, log_level="warning")
    sock = listen("127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        # 1,000 tokens each: the last rows join the first before it is done, however busy the machine
        # (60 were done in one native step a token before the fourth choice was queued, on CI)
        body = {
            "model": "long",
            "messages": CHAT,
            "n": 4,
            "seed": 5,
            "max_tokens": 1000,
            "temperature": 1.0,
            "top_k": 40,
        }
        r = httpx.post(f"http://127.0.0.1:{sock.getsockname()[1]}/v1/chat/completions", json=body, timeout=60)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        service.close()
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    prompt = r.json()["usage"]["prompt_tokens"]
    assert [t for b, t in shapes if t > 1] == [prompt]  # the prompt prefilled once, for all four
    assert max(b for b, t in shapes if t == 1) == 4  # the choices decode together
    engine = Engine.load(long_context_model_dir)
    for j, choice in enumerate(choices):
        expected = engine.generate_chat(
            CHAT, SamplingParams(temperature=1.0, top_k=40, seed=5 + j, max_new_tokens=1000)
        )
        assert choice["message"]["content"] == expected.text
