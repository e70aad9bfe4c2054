"""`kettle serve` against the official openai client, raw HTTP and RemoteService, on a real
uvicorn server on 127.0.0.1 with a tiny real model."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from data.registry import StoreCatalog
from gpt.engine import Engine
from gpt.errors import KettleError
from gpt.sampling import SamplingParams
from gpt.server import Grounding, build_server, grounded_options, grounding, listen
from gpt.service import Delta, Done, Error, InProcessService, RemoteService

KEY = "sk-test-kettle"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]


class RunningServer:
    def __init__(self, service, api_key, **options):
        self.service = service
        self.server = build_server(service, api_key, log_level="warning", **options)
        sock = listen("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.service.close()


@pytest.fixture(scope="module")
def server(long_context_model_dir):
    # The store's catalog, as `kettle serve` has: the tests switch to models in the models folder.
    service = InProcessService(str(long_context_model_dir), catalog=StoreCatalog())
    running = RunningServer(service, KEY)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def open_server(tiny_model_dir):
    """Without a key, as `kettle serve` runs by default, with one more origin and host allowed."""
    running = RunningServer(
        InProcessService(str(tiny_model_dir), catalog=StoreCatalog()),
        None,
        allow_origins=["http://localhost:3000"],
        allow_hosts=["kettle.lan"],
    )
    yield running
    running.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=30)


def http(server, method, path, **kw):
    headers = {"Authorization": f"Bearer {KEY}", **kw.pop("headers", {})}
    return httpx.request(method, server.url + path, headers=headers, **{"timeout": 30, **kw})


def store_with_correction(question: str, answer: str):
    """The store (open) after a user corrected the answer to `question` with `answer`, and the
    corrected message's id."""
    from data.store import open_store

    store = open_store()
    conv = store.create_conversation("lists")
    user = store.add_message(conv.id, "user", content=question)
    bot = store.add_message(conv.id, "assistant", content="No idea.", parent_id=user.id)
    store.set_label(bot.id, ideal=answer)
    return store, bot.id


def test_openai_client_chat_and_completions_streaming_and_not(client, long_context_model_dir):
    engine = Engine.load(long_context_model_dir)
    args = dict(temperature=0.9, top_p=0.95, seed=7, max_tokens=10)
    expected = engine.generate_chat(CHAT, SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_new_tokens=10))

    whole = client.chat.completions.create(model="long", messages=CHAT, **args)
    assert whole.choices[0].message.content == expected.text
    assert whole.choices[0].finish_reason == "length" and whole.model == "long"
    assert whole.usage.prompt_tokens == expected.prompt_tokens and whole.usage.completion_tokens == 10
    assert whole.usage.total_tokens == expected.prompt_tokens + 10

    chunks = list(
        client.chat.completions.create(
            messages=CHAT, stream=True, model="long", stream_options={"include_usage": True}, **args
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text and len([c for c in chunks if c.choices]) > 3
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10  # the include_usage chunk comes last

    expected = engine.generate("Once upon a time", SamplingParams(temperature=0, max_new_tokens=8, stop=["zz"]))
    plain = client.completions.create(model="long", prompt="Once upon a time", temperature=0, max_tokens=8, stop="zz")
    assert plain.choices[0].text == expected.text and plain.usage.completion_tokens == 8
    streamed = list(
        client.completions.create(
            model="long", prompt="Once upon a time", temperature=0, max_tokens=8, stop=["zz"], stream=True
        )
    )
    assert "".join(c.choices[0].text for c in streamed) == expected.text

    models = client.models.list().data
    assert models[0].id == "long" and models[0].active
    assert client.models.retrieve("long").id == "long"


def test_kettle_sampling_extensions_reach_the_engine_and_the_seed_reproduces(client, long_context_model_dir):
    engine = Engine.load(long_context_model_dir)
    base = dict(temperature=1.2, seed=7)

    def local(**extra):
        return engine.generate_chat(CHAT, SamplingParams(max_new_tokens=12, **base, **extra)).text

    def served(**extra):
        return (
            client.chat.completions.create(model="long", messages=CHAT, max_tokens=12, **base, extra_body=extra)
            .choices[0]
            .message.content
        )

    plain = local()
    assert served() == plain
    # Each setting alone changes the seeded answer in process, and the server's answer with it is
    # the engine's with it: a server that dropped the setting would answer `plain`.
    for extra in (
        {"top_k": 2},
        {"min_p": 0.5},
        {"repetition_penalty": 3.0},
        {"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.3},
    ):
        expected = local(**extra)
        assert expected != plain, extra
        assert served(**extra) == expected, extra

    args = dict(
        model="long",
        messages=CHAT,
        temperature=1.2,
        max_tokens=12,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.3},
    )
    first = client.chat.completions.create(**args)
    seed = first.model_extra["kettle"]["seed"]  # the seed a request without one got
    again = client.chat.completions.create(seed=seed, **args)
    assert again.choices[0].message.content == first.choices[0].message.content


def test_api_key_is_enforced(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.get(server.url + "/v1/models", headers=headers)
        assert r.status_code == 401
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == "invalid_api_key"
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": CHAT})
    assert r.status_code == 401
    no_key = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        no_key.chat.completions.create(model="long", messages=CHAT, max_tokens=2)
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}  # readiness: no key


def test_every_v1_path_asks_for_the_key_first(server):
    for method, path in (
        ("GET", "/v1/nothing-here"),
        ("GET", "/v1"),
        ("POST", "/v1/models/switch"),
        ("DELETE", "/v1/models"),
    ):
        r = httpx.request(method, server.url + path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (method, path)
    assert httpx.get(server.url + "/nothing-here").status_code == 404  # outside /v1: no key
    # A browser's CORS preflight carries no key: it is answered for an allowed origin.
    r = httpx.options(
        server.url + "/v1/chat/completions",
        headers={
            "Origin": server.url,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_a_key_in_the_query_string_never_reaches_the_access_log(server):
    access = logging.getLogger("uvicorn.access")
    level, lines = access.level, _Lines()
    access.setLevel(logging.INFO)
    access.addHandler(lines)
    try:
        r = httpx.get(server.url + f"/v1/models?api_key={KEY}&limit=2")
    finally:
        access.removeHandler(lines)
        access.setLevel(level)
    assert r.status_code == 401  # only the Authorization header counts
    assert len(lines.lines) == 1 and "/v1/models?api_key=REDACTED&limit=2" in lines.lines[0]
    assert KEY not in lines.lines[0]


def test_the_app_takes_its_key_from_the_environment(server, monkeypatch, capsys):
    from tui.cli import build_parser, main
    from tui.commands.serve import api_key

    assert "$KETTLE_API_KEY" in build_parser().format_help()
    monkeypatch.setenv("KETTLE_API_KEY", KEY)
    assert RemoteService(server.url, api_key(None)).load().name == "long"
    assert api_key("given") == "given"  # the flag wins
    assert main(["--server", server.url, "--api-key", " "]) == 1  # never "no key"
    assert capsys.readouterr().err == "kettle: error: --api-key must not be empty\n"


def test_web_pages_cannot_drive_a_keyless_server(open_server, tiny_gpt2_vocab_model_dir):
    from data.paths import models_dir

    shutil.copytree(tiny_gpt2_vocab_model_dir, models_dir() / "other")
    url, port = open_server.url, open_server.url.rsplit(":", 1)[1]
    switch = url + "/v1/models/switch"
    # What a page sends without a preflight: text/plain, a form's encoding, no type at all.
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        r = httpx.post(
            switch, content=b'{"model": "other"}', headers={"Content-Type": content_type} if content_type else {}
        )
        assert r.status_code == 415 and "Content-Type: application/json" in r.json()["error"]["message"]
    # A page from another origin, JSON or not, and its preflight.
    r = httpx.post(switch, json={"model": "other"}, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
    assert "--allow-origin http://evil.example" in r.json()["error"]["message"]
    r = httpx.options(switch, headers={"Origin": "null", "Access-Control-Request-Method": "POST"})
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    # DNS rebinding: evil.example resolves to 127.0.0.1, so to the browser it is the page's own.
    for host in (
        f"evil.example:{port}",
        "evil.example",
        "127.0.0.1:1",
        f"localhost.evil.example:{port}",
        f"evil.example@127.0.0.1:{port}",
    ):
        r = httpx.post(switch, json={"model": "other"}, headers={"Host": host})
        assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed", host
    assert httpx.get(url + "/health", headers={"Host": f"evil.example:{port}"}).status_code == 403
    assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "tiny"  # nothing switched

    # This machine's names, the allowed ones and programs (no Origin, Host 127.0.0.1:PORT) pass.
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "kettle.lan", "KETTLE.lan:9999"):
        assert httpx.get(url + "/v1/models", headers={"Host": host}).status_code == 200, host
    for origin in (url, f"http://localhost:{port}", "http://localhost:3000"):
        r = httpx.get(url + "/v1/models", headers={"Origin": origin})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*", origin
    r = httpx.options(
        url + "/v1/chat/completions",
        headers={
            "Origin": "http://localhost:3000",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert r.status_code == 200 and "POST" in r.headers["access-control-allow-methods"]
    r = httpx.post(
        url + "/v1/chat/completions",
        json={"messages": CHAT, "max_tokens": 2},
        headers={"Origin": "http://localhost:3000"},
        timeout=30,
    )  # a generation: not httpx's 5 s
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30)
    assert client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2).model == "tiny"
    remote = RemoteService(url)
    assert remote.load().name == "tiny"
    assert asyncio.run(remote.switch_model("other")).name == "other"
    assert asyncio.run(remote.switch_model("tiny")).name == "tiny"


@pytest.mark.parametrize(
    "body, status, param, message",
    [
        (b"{not json", 400, None, "not valid JSON"),
        (b"[]", 400, None, "must be a JSON object"),
        (b"{}", 400, "messages", "missing required argument: messages"),
        ({"messages": "hi"}, 400, "messages", "valid list"),
        ({"messages": CHAT, "temperature": "hot"}, 400, "temperature", "valid number"),
        ({"messages": CHAT, "top_p": 1.5}, 400, "top_p", "top_p must be in (0, 1], got 1.5"),
        ({"messages": CHAT, "max_tokens": 0}, 400, "max_tokens", "max_tokens must be >= 1"),
        ({"messages": CHAT, "temperature": -1}, 400, "temperature", "temperature must be in"),
        ({"messages": CHAT, "seed": -5}, 400, "seed", "seed must be in"),
        ({"messages": CHAT, "stop": 5}, 400, "stop", "string or a valid list"),
        ({"messages": CHAT, "n": 0}, 400, "n", "n must be in [1, 128], got 0"),
        ({"messages": CHAT, "temperature": 2.5}, 400, "temperature", "temperature must be in [0, 2]"),
        ({"messages": CHAT, "top_logprobs": 3}, 400, "top_logprobs", "needs logprobs: true"),
        (
            {"messages": CHAT, "logprobs": True, "top_logprobs": 21},
            400,
            "top_logprobs",
            "top_logprobs must be in [0, 20]",
        ),
        ({"messages": CHAT, "tools": [{"type": "function"}]}, 400, "tools", "not supported"),
        ({"messages": CHAT, "temprature": 0.5}, 400, "temprature", "unrecognized request argument"),
        ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role", "system, user or assistant"),
        ({"messages": [{"role": "user", "content": 3}]}, 400, "messages[0].content", "valid string"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]},
            400,
            "messages[1].role",
            "may only come first",
        ),
        ({"messages": CHAT, "model": "gpt-4"}, 404, "model", "GET /v1/models lists the models"),
        pytest.param(
            b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            400,
            None,
            "nested too deeply",
            id="deeply-nested",
        ),
    ],
)
def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(server, body, status, param, message):
    kw = (
        {"content": body, "headers": {"Content-Type": "application/json"}}
        if isinstance(body, bytes)
        else {"json": body}
    )
    for stream in (False, True):
        if stream and not isinstance(body, bytes):
            kw = {"json": {**body, "stream": True}}
        r = http(server, "POST", "/v1/chat/completions", **kw)
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert message in error["message"] and error["param"] == param
        assert error["type"] == "invalid_request_error"
    ok = http(server, "POST", "/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2})
    # Still serving (unseeded sampling on a random model may end the turn at once: ~5% of runs).
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 2


def test_other_bad_requests(server, client):
    assert http(server, "GET", "/v1/nothing-here").json()["error"]["message"].startswith("no such endpoint")
    r = http(server, "POST", "/v1/completions", json={"prompt": []})
    assert r.status_code == 400 and "at least one prompt" in r.json()["error"]["message"]
    r = http(server, "POST", "/v1/completions", content=b" " * (9 << 20), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "over 8 MiB" in r.json()["error"]["message"]
    r = http(server, "POST", "/v1/completions", json={"prompt": "a", "logprobs": 6})
    assert r.status_code == 400 and "logprobs must be in [0, 5]" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="frequency_penalty"):
        client.chat.completions.create(model="long", messages=CHAT, frequency_penalty=5)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    # Token ids as a prompt work; ids outside the vocabulary are an error, not a crash.
    assert client.completions.create(model="long", prompt=[5, 6, 7], max_tokens=2).usage.prompt_tokens == 3
    with pytest.raises(openai.BadRequestError, match="vocabulary"):
        client.completions.create(model="long", prompt=[999999], max_tokens=2)
    with pytest.raises(openai.APIError, match="vocabulary"):  # found after the stream started
        list(client.completions.create(model="long", prompt=[999999], max_tokens=2, stream=True))


def test_a_client_that_disconnects_mid_stream_cancels_its_generation(server, caplog):
    caplog.set_level(logging.INFO, logger="kettle.server")
    body = {"messages": CHAT, "temperature": 0, "max_tokens": 1500, "stream": True}
    with httpx.stream(
        "POST", server.url + "/v1/chat/completions", json=body, timeout=30, headers={"Authorization": f"Bearer {KEY}"}
    ) as r:
        data = []
        for line in r.iter_lines():
            if line.startswith("data:"):
                data.append(line)
            if len(data) == 4:
                break
    # The connection is closed: the server notices and stops the generation within a token.
    deadline = time.monotonic() + 15
    while not any("finish cancelled" in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, "the generation was not cancelled"
        time.sleep(0.05)
    line = next(r.getMessage() for r in caplog.records if "finish cancelled" in r.getMessage())
    new_tokens = int(line.split(" + ")[1].split()[0])
    assert new_tokens < 1000, line  # of the 1500 asked for

    # Without streaming too: a client that gives up waiting cancels its generation.
    caplog.clear()
    with pytest.raises(httpx.ReadTimeout):
        # eight choices of the whole context's worth of tokens: longer than the client waits, however
        # fast the machine (one such answer took under 0.2 s in one native step a token)
        body = {"prompt": "Hi", "max_tokens": 2040, "temperature": 0, "n": 8}
        http(server, "POST", "/v1/completions", json=body, timeout=0.2)
    deadline = time.monotonic() + 15
    while not any("finish cancelled" in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, "the generation was not cancelled"
        time.sleep(0.05)
    ok = http(server, "POST", "/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert ok.status_code == 200


def test_switching_the_served_model_without_restart(server, client, tiny_gpt2_vocab_model_dir):
    from data.paths import models_dir

    shutil.copytree(tiny_gpt2_vocab_model_dir, models_dir() / "finetuned-v2")
    broken = models_dir() / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "long" and {"finetuned-v2", "broken"} <= set(ids)

    r = http(server, "POST", "/v1/models/switch", json={"model": "finetuned-v2"})
    assert r.status_code == 200 and r.json()["id"] == "finetuned-v2" and r.json()["active"]
    answer = http(server, "POST", "/v1/chat/completions", json={"messages": CHAT, "max_tokens": 3}).json()  # no model
    assert answer["model"] == "finetuned-v2"
    # Any model listed is served on request, without switching (the served one stays as it is).
    assert client.chat.completions.create(messages=CHAT, max_tokens=3, model="long").model == "long"
    assert client.models.list().data[0].id == "finetuned-v2"

    r = http(server, "POST", "/v1/models/switch", json={"model": "broken"})
    assert r.status_code == 400 and "still serving 'finetuned-v2'" in r.json()["error"]["message"]
    r = http(server, "POST", "/v1/models/switch", json={"model": "/etc"})  # never arbitrary paths
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(server.url + "/v1/models/switch", json={"model": "long"})
    assert r.status_code == 401

    r = http(server, "POST", "/v1/models/switch", json={"model": "long"})  # and back again
    assert r.status_code == 200
    assert client.chat.completions.create(messages=CHAT, max_tokens=2, model="long").model == "long"


def test_model_names_never_resolve_to_the_working_directory(
    server, client, tiny_gpt2_vocab_model_dir, tmp_path, monkeypatch
):
    from data.paths import models_dir
    from data.registry import resolve_model_dir

    shutil.copytree(tiny_gpt2_vocab_model_dir, models_dir() / "tests")
    (tmp_path / "tests").mkdir()  # a folder that happens to share the model's name
    (tmp_path / "tests" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    r = http(server, "POST", "/v1/models/switch", json={"model": "tests"})
    try:
        assert r.status_code == 200, r.text
        # The models folder's model: GPT-2's vocabulary, which the long model does not have.
        assert client.completions.create(model="tests", prompt=[50000], max_tokens=1).usage.prompt_tokens == 1
    finally:
        assert http(server, "POST", "/v1/models/switch", json={"model": "long"}).status_code == 200
    # A body's path is never opened, not even one to a real model.
    r = http(server, "POST", "/v1/models/switch", json={"model": str(tiny_gpt2_vocab_model_dir)})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    # On the command line a name is the models folder's too; a path is still a path.
    assert resolve_model_dir("tests") == models_dir() / "tests"
    assert StoreCatalog().resolve("tests").path == str((models_dir() / "tests").resolve())
    with pytest.raises(KettleError, match="config.json"):
        StoreCatalog().resolve("./tests")


async def test_remote_service_matches_in_process(server, long_context_model_dir):
    remote = RemoteService(server.url + "/v1", api_key=KEY)
    local = InProcessService(str(long_context_model_dir))
    try:
        params = SamplingParams(temperature=0.8, top_k=40, seed=99, max_new_tokens=10, stop=["qq"])
        for run in (lambda s: s.stream_chat(CHAT, params), lambda s: s.complete("I had", params)):
            results = []
            for service in (local, remote):
                events = [e async for e in run(service)]
                assert isinstance(events[-1], Done) and all(isinstance(e, Delta) for e in events[:-1])
                assert "".join(e.text for e in events[:-1]) == events[-1].result.text
                results.append(events[-1])
            assert results[0].result.text == results[1].result.text
            for field in ("finish_reason", "prompt_tokens", "new_tokens", "seed"):
                assert getattr(results[0].result, field) == getattr(results[1].result, field)
            assert results[1].model == "long"

        assert [m.name for m in await remote.list_models() if m.active] == ["long"]
        assert (await asyncio.to_thread(RemoteService(server.url, KEY).load)).name == "long"
        with pytest.raises(KettleError, match="API key"):
            await asyncio.to_thread(RemoteService(server.url, "wrong").load)
        bad = [e async for e in remote.stream_chat(CHAT, {"top_p": 3})]
        assert isinstance(bad[0], Error) and "top_p" in bad[0].message
        wrong_key = RemoteService(server.url, api_key="nope")
        events = [e async for e in wrong_key.stream_chat(CHAT, params)]
        assert isinstance(events[0], Error) and "API key" in events[0].message

        # Cancelling a remote request closes its stream; the server stops generating.
        long = SamplingParams(temperature=0, max_new_tokens=1500)
        seen, done = 0, None
        async for event in remote.stream_chat(CHAT, long, request_id="x"):
            if isinstance(event, Delta):
                seen += 1
                if seen == 3:
                    remote.cancel("x")
            else:
                done = event
        assert done.result.finish_reason == "cancelled" and done.result.text
        started = time.monotonic()
        # seeded: unseeded, it may sample the end token first and end at once
        quick = [e async for e in remote.complete("Hi", SamplingParams(max_new_tokens=2, seed=99))]
        assert quick[-1].result.new_tokens == 2 and time.monotonic() - started < 5
    finally:
        local.close()


async def test_remote_service_without_a_server():
    remote = RemoteService("http://127.0.0.1:9")  # nothing listens on the discard port
    events = [e async for e in remote.stream_chat(CHAT, SamplingParams())]
    assert len(events) == 1 and isinstance(events[0], Error)
    assert "http://127.0.0.1:9" in events[0].message
    with pytest.raises(KettleError, match="cannot reach the Kettle server"):
        await remote.list_models()
    with pytest.raises(KettleError, match="cannot reach the Kettle server"):
        await asyncio.to_thread(remote.load)


def test_kettle_serve_command(tiny_model_dir, kettle_home, capsys):
    from tui.cli import main

    assert main(["serve", "/no/such/model"]) == 1
    assert "kettle: error: /no/such/model: no such model" in capsys.readouterr().err
    assert main(["serve", str(tiny_model_dir), "--api-key", " "]) == 1
    assert "--api-key must not be empty" in capsys.readouterr().err
    taken = listen("127.0.0.1", 0)
    try:
        assert main(["serve", str(tiny_model_dir), "--port", str(taken.getsockname()[1])]) == 1
        assert "cannot listen on 127.0.0.1" in capsys.readouterr().err
    finally:
        taken.close()

    assert main(["serve", str(tiny_model_dir), "--allow-origin", "localhost:3000"]) == 1
    assert "--allow-origin: 'localhost:3000' is not an origin like http://localhost:3000" in capsys.readouterr().err
    config = kettle_home / "config.json"
    config.write_text('{"serve": {"allow_hosts": "kettle.lan"}}')
    assert main(["serve", str(tiny_model_dir)]) == 1
    assert capsys.readouterr().err == f'kettle: error: {config}: "serve" "allow_hosts" must be a list of strings\n'

    config.write_text('{"serve": {"allow_hosts": ["kettle.lan"]}}')
    env = {**os.environ, "KETTLE_API_KEY": KEY, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tui.cli",
            "serve",
            str(tiny_model_dir),
            "--port",
            "0",
            "--allow-origin",
            "http://localhost:3000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )
    try:
        first = proc.stdout.readline()
        assert first.startswith("kettle: serving tiny at http://127.0.0.1:"), first + proc.stderr.read()
        url = first.split(" at ")[1].split()[0]
        assert httpx.get(url + "/models").status_code == 401  # the key from the environment
        client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
        assert client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=3).usage.completion_tokens <= 3
        key = {"Authorization": f"Bearer {KEY}"}
        for headers, status in (
            ({"Host": "kettle.lan"}, 200),
            ({"Origin": "http://localhost:3000"}, 200),
            ({"Host": "evil.example"}, 403),
            ({"Origin": "http://evil.example"}, 403),
        ):
            assert httpx.get(url + "/models", headers={**key, **headers}).status_code == status, headers
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_completions_score_prompts_as_evaluation_harnesses_ask(server, long_context_model_dir):
    engine = Engine.load(long_context_model_dir)
    prompts = [engine.tokenizer.encode("I had always thought"), engine.tokenizer.encode("She said")]
    # lm-evaluation-harness's loglikelihood request: a batch of token-id prompts, echoed, scored.
    body = {"prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True}
    r = http(server, "POST", "/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    for prompt, choice in zip(prompts, choices):
        expected = engine.generate(prompt, SamplingParams(temperature=0, max_new_tokens=1), logprobs=1, echo=True)
        lp = choice["logprobs"]
        assert choice["text"] == engine.tokenizer.decode(prompt) + expected.text
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        want = [e.logprob for e in expected.prompt_logprobs[1:] + expected.logprobs]
        assert lp["token_logprobs"][1:] == pytest.approx(want, abs=1e-5)
        assert len(lp["tokens"]) == len(prompt) + 1 == len(lp["text_offset"])
        for top, token, value in zip(lp["top_logprobs"][1:], lp["tokens"][1:], lp["token_logprobs"][1:]):
            assert top[token] == value and 1 <= len(top) <= 2  # the top one and the chosen one
    # A list of texts: one choice per prompt, in order; a plain answer carries no logprobs.
    r = http(server, "POST", "/v1/completions", json={"prompt": ["I had", "She"], "max_tokens": 3, "temperature": 0})
    texts = [c["text"] for c in r.json()["choices"]]
    assert texts == [engine.generate(p, SamplingParams(temperature=0, max_new_tokens=3)).text for p in ("I had", "She")]
    assert r.json()["choices"][0]["logprobs"] is None
    assert r.json()["usage"]["completion_tokens"] == 6


def test_n_choices_and_chat_logprobs(server, client, long_context_model_dir):
    engine = Engine.load(long_context_model_dir)
    params = dict(temperature=1.0, top_k=30, max_new_tokens=6)
    answer = client.chat.completions.create(
        model="long",
        messages=CHAT,
        n=3,
        seed=11,
        max_tokens=6,
        temperature=1.0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"top_k": 30},
    )
    assert [c.index for c in answer.choices] == [0, 1, 2]
    for j, choice in enumerate(answer.choices):  # choice j: seed + j, the same as asked alone
        alone = engine.generate_chat(CHAT, SamplingParams(seed=11 + j, **params), logprobs=2)
        assert choice.message.content == alone.text
        assert [t.logprob for t in choice.logprobs.content] == pytest.approx(
            [e.logprob for e in alone.logprobs], abs=1e-5
        )
        assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    assert len({c.message.content for c in answer.choices}) > 1
    assert answer.usage.prompt_tokens == alone.prompt_tokens  # the prompt once, not per choice
    assert answer.model_extra["kettle"]["seed"] == 11
    # Streamed: each choice's chunks carry its index; its logprobs come with its last chunk.
    chunks = list(
        client.chat.completions.create(
            model="long",
            messages=CHAT,
            n=2,
            seed=11,
            stream=True,
            max_tokens=6,
            temperature=1.0,
            logprobs=True,
            extra_body={"top_k": 30},
        )
    )
    for j in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == j]
        assert "".join(c.delta.content or "" for c in mine) == answer.choices[j].message.content
        assert [t.token for t in mine[-1].logprobs.content] == [t.token for t in answer.choices[j].logprobs.content]


def test_a_prompt_too_long_is_a_400_unless_the_client_asks_to_truncate(server, client):
    long_chat = [{"role": "user", "content": "word " * 3000}]
    for stream in (False, True):
        r = http(
            server, "POST", "/v1/chat/completions", json={"messages": long_chat, "max_tokens": 10, "stream": stream}
        )
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
        assert "context of 2048 tokens" in error["message"] and '"truncate": true' in error["message"]
    with pytest.raises(openai.BadRequestError, match="holds at most 2047") as caught:
        client.completions.create(model="long", prompt=[5] * 2048, max_tokens=1)
    assert caught.value.code == "context_length_exceeded"
    r = http(server, "POST", "/v1/chat/completions", json={"messages": long_chat, "max_tokens": 2, "truncate": True})
    assert r.status_code == 200 and r.json()["kettle"]["dropped_tokens"] > 0


# Request bodies as these clients send them (recorded from their HTTP traffic), replayed.
OTERM_BODY = {  # oterm 0.x through pydantic-ai's OpenAIChatModel, an "openai-compat" provider
    "messages": [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hello"}],
    "model": "tiny",
    "stream": True,
    "stream_options": {"include_usage": True},
    "temperature": 0.7,
    "top_p": 0.9,
    "chat_template_kwargs": {"enable_thinking": False},
    "parallel_tool_calls": False,
}
LLM_CHAT_BODY = {  # `llm -m kettle "Hello"` (extra-openai-models.yaml, api_base to the server)
    "model": "tiny",
    "messages": [{"role": "user", "content": "Hello"}],
    "stream": True,
    "stream_options": {"include_usage": True},
}
LLM_COMPLETION_BODY = {  # a completion model of llm's (completion: true), with -o logprobs 2
    "model": "tiny",
    "prompt": "Hello",
    "stream": True,
    "logprobs": 2,
    "stream_options": {"include_usage": True},
}


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/chat/completions", OTERM_BODY),
        ("/v1/chat/completions", LLM_CHAT_BODY),
        ("/v1/completions", LLM_COMPLETION_BODY),
        (
            "/v1/chat/completions",
            {
                "messages": CHAT,
                "user": "u-1",
                "store": False,
                "metadata": {"app": "x"},
                "service_tier": "auto",
                "max_tokens": 2,
            },
        ),
    ],
)
def test_recorded_client_requests_are_answered(open_server, path, body):
    r = httpx.post(open_server.url + path, json=body, timeout=30)
    assert r.status_code == 200, r.text
    if body.get("stream"):
        lines = [line for line in r.text.splitlines() if line.startswith("data:")]
        assert lines[-1] == "data: [DONE]" and '"usage"' in lines[-2]


def test_each_model_is_listed_once(tiny_gpt2_vocab_model_dir):
    from data.paths import models_dir
    from data.store import open_store

    path = models_dir() / "mine"
    shutil.copytree(tiny_gpt2_vocab_model_dir, path)
    with open_store() as store:
        store.add_model_version("mine", path, kind="imported")
    # Served by path: the same model as the store's version.
    running = RunningServer(InProcessService(str(path), catalog=StoreCatalog()), None)
    try:
        ids = [m["id"] for m in httpx.get(running.url + "/v1/models").json()["data"]]
        assert ids == ["mine"]
    finally:
        running.stop()


def test_chat_is_grounded_in_the_store_by_default_and_names_its_sources(chat_model_dir, kettle_home):
    """kettle serve's grounding: a reworded question gets the user's correction from the store,
    the response says so in "sources" (which OpenAI's client ignores); "ground": false answers
    from the model alone; "references" grounds in passages of the client's own."""
    import openai

    from tui.commands.serve import store_retriever

    answer = "Call my_list.reverse() to reverse it in place."
    store, corrected = store_with_correction("How do I reverse a list?", answer)
    service = InProcessService(str(chat_model_dir))
    running = RunningServer(service, None, retrieve=store_retriever(store, service.load()))
    try:
        question = {"messages": [{"role": "user", "content": "How can I reverse a Python list?"}], "temperature": 0}
        body = http(running, "POST", "/v1/chat/completions", json={**question, "max_tokens": 30}).json()
        assert body["choices"][0]["message"]["content"] == answer
        assert body["sources"][0]["kind"] == "correction" and body["sources"][0]["ref"] == corrected
        plain = http(running, "POST", "/v1/chat/completions", json={**question, "max_tokens": 30, "ground": False})
        assert plain.json()["choices"][0]["message"]["content"] != answer and plain.json()["sources"] == []
        given = {**question, "max_tokens": 30, "ground": False, "references": ["Q?\nUse reversed(xs)."]}
        assert http(running, "POST", "/v1/chat/completions", json=given).json()["choices"][0]["message"]["content"] == (
            "Use reversed(xs)."
        )
        assert http(running, "POST", "/v1/chat/completions", json={**given, "taught": -1}).status_code == 400
        # the store's correction is the user's own answer, copied whole; a client's passages are
        # taught as far as it says
        assert grounded_options(store_retriever(store, service.load())(question["messages"]))["taught"] == 1
        given_two = Grounding(references=["Q?\nUse reversed(xs).", "list.reverse\n\nReverse."], taught=1)
        assert grounded_options(asyncio.run(grounding(None, given_two, [])))["taught"] == 1
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="none")
        model = client.models.list().data[0].id
        chunks = list(client.chat.completions.create(model=model, stream=True, max_tokens=30, **question))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == answer
        assert chunks[-1].model_extra["sources"][0]["kind"] == "correction"
    finally:
        running.stop()
        store.close()


def test_every_connection_sends_its_writes_at_once(open_server):
    """TCP_NODELAY on the server's side of each connection: asyncio sets it only where a
    socket's protocol number says TCP, and socket.create_server's say 0, so each request after
    the first on a kept-alive connection (as OpenAI's and Ollama's clients keep theirs) waited
    ~44 ms for the client's delayed ACK before the end of its response went out."""
    import socket

    with httpx.Client(base_url=open_server.url, timeout=30) as client:
        for _ in range(3):  # one connection, kept alive
            assert client.get("/health").status_code == 200
        connections = list(open_server.server.server_state.connections)
        assert connections
        for protocol in connections:
            sock = protocol.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), "Nagle's delay is on"
