"""Ollama's API in `kettle serve` (gpt/ollama.py), driven by the real `ollama` Python client and
oterm's Ollama code path against a real server on 127.0.0.1: every answer is the one Kettle's
engine gives for the same settings."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys

import httpx
import pytest
from test_server import RunningServer, store_with_correction

from gpt.engine import Engine
from gpt.ollama import router
from gpt.sampling import SamplingParams
from gpt.service import InProcessService

ollama = pytest.importorskip("ollama")

KEY = "ollama-test-key"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine.load(tiny_model_dir)


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    service = InProcessService(str(tiny_model_dir))
    service.load()  # as kettle serve does before it listens: /api/ps lists it from the start
    running = serve(service, KEY)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.url, headers={"Authorization": f"Bearer {KEY}"})


def serve(service, key) -> RunningServer:
    """The server `kettle serve` runs: OpenAI's API and Ollama's."""
    return RunningServer(service, key, routers=[router(service)])


def greedy(n: int, **more) -> SamplingParams:
    return SamplingParams(temperature=0, max_new_tokens=n, **more)


def test_chat_and_generate_answer_as_kettle_does_whole_and_streamed(client, engine):
    options = {"temperature": 0, "num_predict": 8}
    want = engine.generate_chat(CHAT, greedy(8))
    answer = client.chat(model="tiny", messages=CHAT, options=options, keep_alive="5m")
    assert answer.message.role == "assistant" and answer.message.content == want.text
    assert answer.done and answer.done_reason == ("length" if want.finish_reason == "length" else "stop")
    assert answer.model == "tiny" and answer.created_at.endswith("Z")
    assert answer.eval_count == want.new_tokens and answer.prompt_eval_count == want.prompt_tokens
    assert answer.total_duration >= answer.prompt_eval_duration > 0 and answer.eval_duration >= 0
    assert answer.load_duration >= 0

    chunks = list(client.chat(model="tiny:latest", messages=CHAT, options=options, stream=True))
    assert "".join(c.message.content for c in chunks) == want.text
    assert [c.done for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].eval_count == want.new_tokens and chunks[-1].message.content == ""

    # generate: the prompt (with its system prompt) as a one-turn chat, or raw text continued.
    turn = engine.generate_chat(CHAT, greedy(6))
    reply = client.generate(
        model="tiny", system=CHAT[0]["content"], prompt=CHAT[1]["content"], options={**options, "num_predict": 6}
    )
    assert reply.response == turn.text and reply.done and reply.eval_count == turn.new_tokens
    raw = engine.generate("I had always thought", greedy(6))
    pieces = list(
        client.generate(
            model="tiny", prompt="I had always thought", raw=True, stream=True, options={**options, "num_predict": 6}
        )
    )
    assert "".join(p.response for p in pieces) == raw.text and pieces[-1].done
    assert client.generate(model="tiny", prompt="", keep_alive=0).done_reason == "load"  # loads, says so


def test_options_map_onto_kettle_sampling(client, engine):
    options = {"temperature": 0.9, "top_k": 20, "top_p": 0.8, "min_p": 0.01, "seed": 7, "num_predict": 10,
               "repeat_penalty": 1.3, "presence_penalty": 0.4, "frequency_penalty": 0.2, "stop": ["\n\n"],
               "num_ctx": 4096, "num_thread": 2, "mirostat": 0, "repeat_last_n": -1}  # fmt: skip
    want = engine.generate_chat(
        CHAT,
        SamplingParams(temperature=0.9, top_k=20, top_p=0.8, min_p=0.01, seed=7, max_new_tokens=10,
                       repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.2, stop=["\n\n"]),
    )  # fmt: skip
    assert client.chat(model="tiny", messages=CHAT, options=options).message.content == want.text
    # num_predict -1 (Ollama's default): until the context is full (half of it is the answer's).
    until_full = client.generate(model="tiny", prompt="Hi", raw=True, options={"temperature": 0, "num_predict": -1})
    assert until_full.response == engine.generate("Hi", greedy(engine.context_length)).text


def test_a_null_option_is_one_not_given_as_ollama_reads_it(server, engine):
    """Ollama skips an option whose value is null; Kettle answered 400 ("top_k must be an integer,
    got None") to a client that sends every option it knows, the unset ones as null."""
    nulls = dict.fromkeys(("top_k", "top_p", "stop", "seed", "repeat_penalty", "mirostat", "num_ctx", "repeat_last_n"))
    body = {
        "model": "tiny",
        "prompt": "Hi",
        "raw": True,
        "stream": False,
        "options": {"temperature": 0, "num_predict": 6, **nulls},
    }
    got = httpx.post(server.url + "/api/generate", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert got.status_code == 200, got.text
    assert got.json()["response"] == engine.generate("Hi", greedy(6)).text


@pytest.mark.parametrize(
    "call, status, says",
    [
        (dict(model="nope"), 404, 'model "nope" not found'),
        (dict(options={"mirostat": 2}), 400, "options.mirostat"),
        (dict(options={"temprature": 1}), 400, "options.temprature: unknown option"),
        (dict(options={"temperature": "hot"}), 400, "options: temperature"),
        (dict(options={"repeat_penalty": 1.2, "repeat_last_n": 64}), 400, "options.repeat_last_n"),
        (dict(think=True), 400, "does not support thinking"),
        (dict(format="json"), 400, "format"),
        (
            dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]),
            400,
            "does not support tools",
        ),
        (dict(messages=[{"role": "user", "content": "Hi", "images": ["aGk="]}]), 400, "images"),
    ],
)
def test_what_kettle_cannot_do_is_refused_in_ollamas_error_shape(client, call, status, says):
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(**{"model": "tiny", "messages": CHAT, **call})
    assert caught.value.status_code == status and says in caught.value.error


def test_list_show_ps_version_and_the_context_length_everywhere(client, server, tiny_model_dir):
    from gpt.checkpoint import read_meta

    config = read_meta(tiny_model_dir)[1]
    (listed,) = client.list().models
    assert listed.model == "tiny" and listed.size > (tiny_model_dir / "model.safetensors").stat().st_size > 0
    assert listed.details.family == "gpt2" and listed.details.format == "safetensors" and len(listed.digest) == 64
    shown = client.show("tiny")
    assert shown.modelinfo["gpt2.context_length"] == config.context_length == 128
    assert shown.modelinfo["general.parameter_count"] == Engine.load(tiny_model_dir).model.num_params()
    assert shown.capabilities == ["completion"] and "stop " in shown.parameters
    assert shown.template.endswith("<|assistant|>") and "{{ .Content }}<|end|>" in shown.template
    (running,) = client.ps().models
    assert running.model == "tiny" and running.context_length == 128
    headers = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(server.url + "/api/version", headers=headers).json()["version"]
    assert httpx.get(server.url + "/v1/models", headers=headers).json()["data"][0]["max_model_len"] == 128
    # The API key guards Ollama's endpoints as it does OpenAI's.
    with pytest.raises(ollama.ResponseError) as caught:
        ollama.Client(host=server.url).list()
    assert caught.value.status_code == 401


def test_the_root_says_ollama_is_running_as_ollama_does(server):
    """Clients probe the root (the `ollama` CLI's heartbeat with HEAD, others compare GET's text):
    it answered a JSON string, quoted, and refused HEAD with a 405."""
    got = httpx.get(server.url + "/")
    assert (got.status_code, got.text) == (200, "Ollama is running")
    assert got.headers["content-type"] == "text/plain; charset=utf-8"
    assert httpx.head(server.url + "/").status_code == 200


def test_a_request_naming_another_listed_model_loads_it(tiny_model_dir, tiny_gpt2_vocab_model_dir):
    from data.paths import models_dir
    from data.registry import StoreCatalog

    shutil.copytree(tiny_model_dir, models_dir() / "tiny")
    shutil.copytree(tiny_gpt2_vocab_model_dir, models_dir() / "other")
    running = serve(InProcessService("tiny", catalog=StoreCatalog()), None)
    try:
        client = ollama.Client(host=running.url)
        assert {m.model for m in client.list().models} == {"tiny", "other"}
        answer = client.chat(model="other", messages=CHAT, options={"temperature": 0, "num_predict": 5})
        assert answer.message.content == Engine.load(tiny_gpt2_vocab_model_dir).generate_chat(CHAT, greedy(5)).text
        assert [m.model for m in client.ps().models] == ["other"]  # one kept loaded: tiny made room
        # Loaded for the request, not switched to: requests naming no model still get the server's.
        assert httpx.get(running.url + "/v1/models").json()["data"][0]["id"] == "tiny"
    finally:
        running.stop()


def test_chat_is_grounded_in_the_store_as_the_openai_api_is(chat_model_dir, kettle_home):
    """/api/chat grounds as /v1/chat/completions does (gpt.server.Grounding): a reworded question
    gets the user's correction from the store, the passage named in the last object's "sources",
    whole or streamed, where the ollama client reads the answer and ignores it; "ground": false
    answers from the model alone; "references" grounds in passages of the client's own."""
    from tui.commands.serve import store_retriever

    answer = "Call my_list.reverse() to reverse it in place."
    store, corrected = store_with_correction("How do I reverse a list?", answer)
    service = InProcessService(str(chat_model_dir))
    running = RunningServer(service, None, routers=[router(service)], retrieve=store_retriever(store, service.load()))
    try:
        ask = {
            "messages": [{"role": "user", "content": "How can I reverse a Python list?"}],
            "options": {"temperature": 0, "num_predict": 30},
            "stream": False,
        }

        def chat(**body) -> dict:
            return httpx.post(running.url + "/api/chat", json={**ask, **body}, timeout=60).json()

        grounded = chat()
        assert grounded["message"]["content"] == answer
        source = grounded["sources"][0]
        assert source["kind"] == "correction" and source["ref"] == corrected and "reference" not in source
        plain = chat(ground=False)
        assert plain["message"]["content"] != answer and plain["sources"] == []
        given = chat(ground=False, references=["Q?\nUse reversed(xs)."])
        assert given["message"]["content"] == "Use reversed(xs)." and given["sources"][0]["kind"] == "given"

        with httpx.stream("POST", running.url + "/api/chat", json={**ask, "stream": True}, timeout=60) as response:
            lines = [json.loads(line) for line in response.iter_lines() if line]
        assert "".join(line["message"]["content"] for line in lines) == answer
        assert lines[-1]["done"] and lines[-1]["sources"] == grounded["sources"]
        assert not any("sources" in line for line in lines[:-1])
        client = ollama.Client(host=running.url)
        name = client.list().models[0].model
        chunks = list(client.chat(model=name, messages=ask["messages"], options=ask["options"], stream=True))
        assert "".join(c.message.content for c in chunks) == answer and chunks[-1].done
    finally:
        running.stop()
        store.close()


def test_oterm_finds_and_chats_with_the_model_over_its_native_ollama_connection(server, engine, monkeypatch):
    pytest.importorskip("oterm")
    monkeypatch.setenv("OLLAMA_API_KEY", KEY)  # what oterm's ollama client and its chat send
    from oterm.agent import get_agent
    from oterm.config import envConfig
    from oterm.providers import list_models
    from oterm.providers import ollama as oterm_ollama
    from oterm.providers.capabilities import _get_ollama_capabilities

    monkeypatch.setattr(envConfig, "OLLAMA_URL", server.url)
    monkeypatch.setattr(envConfig, "OLLAMA_API_KEY", KEY)
    assert list_models("ollama") == ["tiny"]
    assert oterm_ollama.running_context_length("tiny") == 128
    capabilities = _get_ollama_capabilities("tiny")
    assert not (capabilities.supports_tools or capabilities.supports_thinking or capabilities.supports_vision)
    agent = get_agent("ollama", "tiny", system=CHAT[0]["content"], parameters={"temperature": 0, "max_tokens": 8})
    result = asyncio.run(agent.run(CHAT[1]["content"]))
    assert result.output == engine.generate_chat(CHAT, greedy(8)).text


def test_kettle_serve_ollama_listens_on_ollamas_port(tiny_model_dir):
    import socket

    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 11434)) == 0:
            pytest.skip("something already listens on 127.0.0.1:11434")
    env = {**os.environ, "KETTLE_API_KEY": KEY, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tui.cli", "serve", str(tiny_model_dir), "--ollama"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        first = proc.stdout.readline()
        assert "http://127.0.0.1:11434" in first, first + proc.stderr.read()
        client = ollama.Client(headers={"Authorization": f"Bearer {KEY}"})  # the client's default host
        assert [m.model for m in client.list().models] == ["tiny"]
        assert client.generate(model="tiny", prompt="Hi", options={"num_predict": 3}).eval_count <= 3
    finally:
        proc.terminate()
        proc.wait(timeout=20)
