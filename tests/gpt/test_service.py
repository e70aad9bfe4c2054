"""InProcessService from an asyncio loop: streaming, queueing beyond the batch, cancel, models."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys

import pytest
import torch

from data.registry import StoreCatalog
from gpt.catalog import PathCatalog
from gpt.engine import Engine
from gpt.errors import KettleError
from gpt.native import NativeStep
from gpt.sampling import SamplingParams
from gpt.service import Delta, Done, Error, InProcessService

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]


@pytest.fixture
def service(long_context_model_dir):
    svc = InProcessService(str(long_context_model_dir))
    yield svc
    svc.close()


def count_forward_calls(service, monkeypatch) -> list[int]:
    """Counts the model's forward passes (one per decoded token) by observing the real model,
    through PyTorch or in one native step (gpt.native)."""
    service.load()
    calls = [0]

    def hook(module, args):
        calls[0] += 1

    service._engine.model.register_forward_pre_hook(hook)
    step = NativeStep.__call__

    def counted(self, tokens, positions, slots=None):
        calls[0] += 1
        return step(self, tokens, positions, slots)

    monkeypatch.setattr(NativeStep, "__call__", counted)
    return calls


async def collect(events):
    out = []
    async for event in events:
        out.append(event)
    return out


async def test_streams_deltas_that_add_up_to_the_engines_answer(service, long_context_model_dir):
    params = SamplingParams(temperature=0.8, top_k=50, seed=1234, max_new_tokens=12)
    events = await collect(service.stream_chat(CHAT, params))
    deltas, done = events[:-1], events[-1]
    assert isinstance(done, Done) and all(isinstance(e, Delta) for e in deltas) and deltas
    assert "".join(d.text for d in deltas) == done.result.text
    assert done.model == "long" and service.active_model.name == "long"
    assert done.result.new_tokens == 12 and done.result.finish_reason == "length"
    assert done.result.prompt_tokens > 0 and done.result.seed == 1234
    # The same request straight on a fresh engine gives the same text: the service adds no noise.
    direct = Engine.load(long_context_model_dir).generate_chat(CHAT, params)
    assert direct.text == done.result.text

    raw = await collect(service.complete("I had always", params))
    assert isinstance(raw[-1], Done) and raw[-1].result.new_tokens == 12
    assert "".join(e.text for e in raw[:-1]) == raw[-1].result.text


async def test_cancel_stops_within_one_token(service, monkeypatch):
    calls = count_forward_calls(service, monkeypatch)
    params = SamplingParams(temperature=0, max_new_tokens=1000)
    seen, done = 0, None
    async for event in service.stream_chat(CHAT, params, request_id="r1"):
        if isinstance(event, Delta):
            seen += 1
            if seen == 3:
                at_cancel = calls[0]
                service.cancel("r1")
        else:
            done = event
    assert isinstance(done, Done) and done.result.finish_reason == "cancelled"
    assert calls[0] - at_cancel <= 1  # at most the forward pass already under way
    assert done.result.new_tokens < 1000


async def test_the_event_loop_keeps_running_while_the_model_generates(service):
    events = []

    async def consume():
        params = SamplingParams(temperature=0, max_new_tokens=1000)
        async for event in service.stream_chat(CHAT, params, request_id="ui"):
            events.append(event)

    task = asyncio.create_task(consume())
    while not events:  # other coroutines (a UI's key presses, redraws) run meanwhile
        await asyncio.sleep(0.001)
    for _ in range(3):
        await asyncio.sleep(0.001)
    service.cancel("ui")
    await task
    # Had generation blocked the loop, all 1000 tokens would be done before cancel() could run.
    assert events[-1].result.finish_reason == "cancelled" and events[-1].result.new_tokens < 1000


async def test_leaving_the_loop_early_cancels(service, monkeypatch):
    calls = count_forward_calls(service, monkeypatch)
    events = service.stream_chat(CHAT, SamplingParams(temperature=0, max_new_tokens=1000))
    async for _ in events:
        break
    await events.aclose()
    before = calls[0]
    # The worker is free again at once: the next request runs, and the old one made no progress.
    done = (await collect(service.complete("Hello", SamplingParams(temperature=0, max_new_tokens=2))))[-1]
    assert done.result.new_tokens == 2
    assert calls[0] - before <= 1 + 2  # at most one stray step of the old request, plus the new


async def test_requests_beyond_the_batch_wait_in_order_and_queued_ones_can_be_cancelled(long_context_model_dir):
    service = InProcessService(str(long_context_model_dir), max_batch=1)  # room for one row
    try:
        await _wait_in_order(service)
    finally:
        service.close()


async def _wait_in_order(service):
    order: list[tuple[str, object]] = []

    async def run(rid, params, events_of=service.stream_chat):
        async for event in events_of(CHAT, params, request_id=rid):
            order.append((rid, event))
            if rid == "a" and isinstance(event, Delta) and sum(r == "a" for r, _ in order) == 2:
                service.cancel("b")  # b is queued behind a: it must never start
                service.cancel("a")

    long = SamplingParams(temperature=0, max_new_tokens=1000)
    short = SamplingParams(temperature=0, max_new_tokens=3)
    await asyncio.gather(run("a", long), run("b", long), run("c", short))
    done = {rid: e for rid, e in order if isinstance(e, Done)}
    assert done["a"].result.finish_reason == "cancelled"
    assert done["b"].result.finish_reason == "cancelled" and done["b"].result.new_tokens == 0
    assert done["c"].result.new_tokens == 3
    # Nothing of c arrives before a has finished: a full batch, then the queue in order.
    first_c = next(i for i, (rid, _) in enumerate(order) if rid == "c")
    last_a = max(i for i, (rid, _) in enumerate(order) if rid == "a")
    assert last_a < first_c


async def test_bad_parameters_and_messages_give_an_error_event(service):
    events = await collect(service.stream_chat(CHAT, SamplingParams(top_p=1.5)))
    assert events == [Error("top_p must be in (0, 1], got 1.5")]
    events = await collect(service.stream_chat([{"role": "robot", "content": "hi"}], SamplingParams()))
    assert len(events) == 1 and isinstance(events[0], Error) and "role" in events[0].message
    # ...and the worker is still there for the next request.
    events = await collect(service.complete("Hi", SamplingParams(max_new_tokens=2)))
    assert isinstance(events[-1], Done)


@pytest.mark.parametrize("catalog", [StoreCatalog(), PathCatalog()], ids=["store", "paths"])
def test_bad_model_names_fail_where_given(catalog):
    with pytest.raises(KettleError, match="no such model"):
        InProcessService("no-such-model", catalog=catalog)
    with pytest.raises(KettleError, match="no model is active"):
        InProcessService(catalog=catalog)  # the store has no active model yet; a path catalog none


async def test_follows_the_store_lists_models_and_switches_without_restart(
    tiny_model_dir, tiny_gpt2_vocab_model_dir, tmp_path
):
    from data.paths import models_dir
    from data.store import open_store

    with open_store() as store:
        v1 = store.add_model_version("base-v1", tiny_model_dir, kind="pretrained")
        v2 = store.add_model_version("ft-v2", tiny_gpt2_vocab_model_dir, kind="finetuned", parent_id=v1.id)
        store.activate_model(v1.id)
    shutil.copytree(tiny_model_dir, models_dir() / "local-copy")
    broken = models_dir() / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")

    service = InProcessService(catalog=StoreCatalog())  # no model: the store's active one
    try:
        events = await collect(service.stream_chat(CHAT, SamplingParams(max_new_tokens=2)))
        assert events[-1].model == "base-v1"
        models = {m.name: m for m in await service.list_models()}
        assert set(models) == {"base-v1", "ft-v2", "local-copy", "broken"}
        assert models["base-v1"].active and not models["ft-v2"].active
        assert models["ft-v2"].source == "store" and models["ft-v2"].kind == "finetuned"
        assert models["local-copy"].source == "directory"

        info = await service.switch_model("ft-v2")
        assert info.name == "ft-v2" and service.active_model.name == "ft-v2"
        events = await collect(service.stream_chat(CHAT, SamplingParams(max_new_tokens=2)))
        assert events[-1].model == "ft-v2"
        with open_store() as store:  # the store agrees, so the next start serves ft-v2 too
            assert store.active_model().id == v2.id

        with pytest.raises(KettleError, match="config.json"):
            await service.switch_model("broken")
        assert service.active_model.name == "ft-v2"  # a failed switch keeps the old model
        events = await collect(service.stream_chat(CHAT, SamplingParams(max_new_tokens=2)))
        assert events[-1].model == "ft-v2"

        await service.switch_model("local-copy")
        assert [m.name for m in await service.list_models() if m.active] == ["local-copy"]
    finally:
        service.close()


@pytest.fixture
def two_threads(monkeypatch):
    """An idle two-core machine as gpt.threads would see it (the test workers keep each other
    busy, and each runs on one thread)."""
    import gpt.engine

    monkeypatch.setattr(gpt.engine, "fit_threads", lambda: 2)
    yield 2


async def test_generation_uses_one_cpu_thread_while_a_training_job_runs(
    long_context_model_dir, two_threads, monkeypatch
):
    """A fine-tuning job takes every core; decoding beside it on several threads waits on parked
    threads, so the service decodes on one until the job's process is gone. The store's catalog
    asks through one store it keeps open, never opening one per request."""
    import data.registry
    from data.store import open_store

    opened = []
    monkeypatch.setattr(data.registry, "open_store", lambda *args, **kw: opened.append(args) or open_store(*args, **kw))
    service = InProcessService(str(long_context_model_dir), catalog=StoreCatalog())
    params = SamplingParams(temperature=0, max_new_tokens=3)
    before = torch.get_num_threads()
    try:
        assert (await collect(service.stream_chat(CHAT, params)))[-1].result.threads == two_threads
        job = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            with open_store() as store:
                run = store.create_run("finetune")
                store.update_run(run.id, status="running", pid=job.pid)
            assert (await collect(service.stream_chat(CHAT, params)))[-1].result.threads == 1
            assert torch.get_num_threads() == before  # restored after the request
        finally:
            job.kill()
            job.wait()
        assert (await collect(service.stream_chat(CHAT, params)))[-1].result.threads == two_threads
    finally:
        service.close()
    assert len(opened) == 1  # one store, opened once it existed, for every request after


async def test_a_huge_prompt_is_tokenized_beside_the_answers_in_flight(service, long_context_model_dir, verdict_text):
    import time

    huge = verdict_text * 250  # 5 MB: tokenizing it takes about half a second
    params = SamplingParams(temperature=0, max_new_tokens=3)
    arrivals = []

    async def running():
        async for _event in service.complete("a", SamplingParams(temperature=0, max_new_tokens=1500)):
            arrivals.append(time.monotonic())

    async def huge_prompt():
        while len(arrivals) < 10:
            await asyncio.sleep(0.01)
        return (await collect(service.complete(huge, params)))[-1]

    _, done = await asyncio.gather(running(), huge_prompt())
    # The same answer as a prompt built on the worker (Engine alone), the rows in flight decoding
    # meanwhile: on the worker it held them for the whole tokenizing (270 ms for 4 MB here).
    expected = Engine.load(long_context_model_dir).generate(huge, params)
    assert done.result.token_ids == expected.token_ids and done.result.dropped_tokens == expected.dropped_tokens
    # tokenizing it on the loop would hold every other answer ~0.5 s; a loaded CI machine's
    # scheduling alone gave a 0.154 s gap
    assert len(arrivals) == 1501 and max(b - a for a, b in zip(arrivals, arrivals[1:])) < 0.3


async def test_a_grounded_chat_copies_its_reference_and_says_it_used_it(chat_model_dir):
    """The app's way: it chooses the passages, the service grounds the answer in them."""
    service = InProcessService(str(chat_model_dir))
    try:
        answer = "Call my_list.reverse() to reverse it in place."
        question = [{"role": "user", "content": "How can I reverse a list?"}]
        params = SamplingParams(temperature=0, max_new_tokens=30)
        events = [e async for e in service.stream_chat(question, params, references=[f"Reverse a list?\n{answer}"])]
        done = events[-1]
        assert isinstance(done, Done) and done.result.text == answer and done.references_used == 1
        plain = [e async for e in service.stream_chat(question, params)][-1]
        assert plain.result.text != answer and plain.references_used == 0
    finally:
        service.close()
