"""`kettle serve` under requests meant to hold it (huge conversations, huge prompts, many choices,
slow clients) and clients that pick any model it lists: a real uvicorn server on 127.0.0.1 with
tiny real models, raw HTTP and sockets."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from data.registry import StoreCatalog
from gpt.ollama import ChatBody
from gpt.ollama import router as ollama_router
from gpt.server import MAX_CHOICES, MAX_MESSAGES
from gpt.service import MAX_LOADED, InProcessService
from tests.gpt.test_server import CHAT, RunningServer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    # As `kettle serve` makes it: several models kept loaded, a short request timeout for the tests.
    service = InProcessService(str(tiny_model_dir), catalog=StoreCatalog(), max_loaded=MAX_LOADED)
    running = RunningServer(service, None, request_timeout=0.5, routers=[ollama_router(service)])
    yield running
    running.stop()


def post(server, path, body, timeout=30):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=data, headers={"Content-Type": "application/json"}, timeout=timeout)


class HealthWatch:
    """Polls /health on its own thread while a big request runs: the slowest answer it got."""

    def __init__(self, server):
        self.url, self.worst, self.checks, self.failed = server.url + "/health", 0.0, 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    client.get(self.url).raise_for_status()
                except httpx.HTTPError as exc:
                    self.failed.append(exc)
                self.worst, self.checks = max(self.worst, time.monotonic() - start), self.checks + 1
                time.sleep(0.02)

    def __enter__(self):
        self._thread.start()
        time.sleep(0.1)
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=60)
        assert not self.failed, self.failed


def test_a_conversation_of_200000_messages_is_refused_at_once_and_4096_are_answered(server):
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": "hi"} for i in range(200_000)]
    start = time.monotonic()
    with HealthWatch(server) as watch:
        r = post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 1}, timeout=15)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert f"at most {MAX_MESSAGES}, got 200000" in r.json()["error"]["message"]
    assert time.monotonic() - start < 5 and watch.worst < 1.0

    # As many as allowed: rendered in linear time (quadratic, 4096 messages took seconds more),
    # trimmed to the context, answered; /health answers meanwhile.
    with HealthWatch(server) as watch:
        r = post(
            server, "/v1/chat/completions", {"messages": messages[:MAX_MESSAGES], "truncate": True, "max_tokens": 2}
        )
    assert r.status_code == 200 and r.json()["kettle"]["dropped_tokens"] > 10_000
    assert watch.worst < 1.0, f"/health took {watch.worst:.2f} s while a 4096-message chat was prepared"


def test_an_ollama_chat_of_200000_messages_is_answered_from_its_newest_without_holding_the_others(server):
    """Ollama's API answers a chat too long for the context from its newest messages, as Ollama
    does (no cap refuses it): validating all 200,000 held every other client for 0.8-1.1 s."""
    system = [{"role": "system", "content": "Be brief."}]
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": "hi"} for i in range(200_001)]
    body = {"messages": system + turns, "stream": False, "options": {"num_predict": 1, "seed": 1}}
    data = json.dumps(body).encode()  # here, not while the watch runs in this process
    with HealthWatch(server) as watch:
        r = post(server, "/api/chat", data, timeout=60)
    assert r.status_code == 200 and r.json()["done"], r.text
    assert watch.worst < 1.0, f"/health took {watch.worst:.2f} s during /api/chat"
    # what is validated (on the event loop): the system prompt and the newest turns, not 200,000
    kept = ChatBody.model_validate(body).messages
    assert len(kept) == MAX_MESSAGES and kept[0].role == "system"
    assert [m.role for m in kept[1:]] == [t["role"] for t in turns[-MAX_MESSAGES + 1 :]]
    newest = post(server, "/api/chat", {**body, "messages": system + turns[-MAX_MESSAGES + 1 :]}, timeout=60)
    assert r.json()["message"] == newest.json()["message"]  # the same prompt: its newest turns


def test_tokenizing_two_megabytes_leaves_the_server_answering(server):
    rnd = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    text = " ".join("".join(rnd.choices(letters, k=rnd.randint(1, 12))) for _ in range(330_000))
    with HealthWatch(server) as watch:
        r = post(server, "/tokenize", {"prompt": text}, timeout=120)
    assert r.status_code == 200 and r.json()["count"] > 500_000
    # On the event loop this held every client for the whole tokenizing and JSON (3.3 s here).
    assert watch.checks >= 2 and watch.worst < 1.0, f"/health took {watch.worst:.2f} s during /tokenize"


def test_prompts_times_n_beyond_the_cap_are_a_400_at_once(server):
    ids = [1, 2, 3]
    for body, param in (
        ({"prompt": [ids] * 500, "n": 128}, "n"),  # 64,000 rows would run for an hour
        ({"prompt": [ids] * (MAX_CHOICES + 1)}, "prompt"),
        ({"prompt": ["a", "b", "c"], "n": 50}, "n"),
    ):
        start = time.monotonic()
        r = post(server, "/v1/completions", {**body, "max_tokens": 1}, timeout=15)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        assert f"at most {MAX_CHOICES}" in r.json()["error"]["message"] and time.monotonic() - start < 5
    r = post(server, "/v1/completions", {"prompt": [ids] * 2, "n": MAX_CHOICES // 2, "max_tokens": 1})
    assert r.status_code == 200 and len(r.json()["choices"]) == MAX_CHOICES  # the cap itself is served


def _slow_client(server, head: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=5)
    sock.sendall(head)
    return sock


def _closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> bool:
    """Whether the server closes `sock` within `seconds`, the client sending `trickle` a byte at
    a time meanwhile (which never completes a request)."""
    deadline = time.monotonic() + seconds
    sock.settimeout(0.1)
    for byte in trickle * 1000:
        if time.monotonic() > deadline:
            return False
        try:
            sock.sendall(bytes([byte]))
            if sock.recv(1024) == b"":
                return True
        except socket.timeout:
            continue
        except OSError:  # reset or broken pipe: closed by the server
            return True
    while time.monotonic() < deadline:
        try:
            if sock.recv(1024) == b"":
                return True
        except socket.timeout:
            continue
        except OSError:
            return True
    return False


def test_slow_clients_are_disconnected_and_answers_are_not(server):
    head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    idle = [_slow_client(server, b"") for _ in range(5)]  # connect, send nothing
    slow = [_slow_client(server, head) for _ in range(5)]  # headers, a byte at a time, forever
    body = [_slow_client(server, b"POST /tokenize HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n")]
    try:
        assert all(_closed_within(s, 3) for s in idle)
        assert all(_closed_within(s, 3, trickle=b"X-Slow: 1\r\n") for s in slow)
        assert _closed_within(body[0], 3, trickle=b"x")
    finally:
        for s in idle + slow + body:
            s.close()

    # A whole request is answered, however long its answer takes, and a kept-alive connection
    # serves the next request sent in time.
    with httpx.Client(base_url=server.url, timeout=60) as client:
        with client.stream("POST", "/v1/completions", json={"prompt": "a", "max_tokens": 50, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data:")
            time.sleep(1.0)  # a slow reader, past the request timeout: its answer is still whole
            assert [line for line in lines if line.startswith("data:")][-1] == "data: [DONE]"
        assert client.get("/health").status_code == 200


def test_every_listed_model_is_served_by_name_without_switching(server, tiny_gpt2_vocab_model_dir, make_model_dir):
    from data.paths import models_dir

    shutil.copytree(tiny_gpt2_vocab_model_dir, models_dir() / "other")
    make_model_dir(models_dir() / "third", seed=3)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=30)
    listed = [m.id for m in client.models.list().data]
    assert listed[0] == "tiny" and {"other", "third"} <= set(listed)
    for name in [*listed, *listed]:  # each loads on request; the least recently used makes room
        answer = client.chat.completions.create(model=name, messages=CHAT, max_tokens=2)
        assert answer.model == name
        assert client.completions.create(model=name, prompt="Once", max_tokens=2).model == name
        r = post(server, "/tokenize", {"prompt": "Once upon", "model": name})
        assert r.status_code == 200
    assert len(server.service._loaded) <= MAX_LOADED
    assert [m.id for m in client.models.list().data if m.model_extra["active"]] == ["tiny"]  # no switch
    with pytest.raises(openai.NotFoundError, match="GET /v1/models lists"):
        client.chat.completions.create(model="gpt-4", messages=CHAT, max_tokens=2)


def test_a_switch_on_kettle_serve_leaves_the_apps_active_model(tiny_model_dir, tiny_gpt2_vocab_model_dir):
    from data.store import open_store

    with open_store() as store:
        chosen = store.add_model_version("chosen", tiny_model_dir, kind="pretrained")
        store.add_model_version("other", tiny_gpt2_vocab_model_dir, kind="imported")
        store.activate_model(chosen.id)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tui.cli", "serve", "--port", "0"],  # no model: the app's active one
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        cwd=ROOT,
    )
    try:
        first = proc.stdout.readline()
        assert first.startswith("kettle: serving chosen at http://127.0.0.1:"), first + proc.stderr.read()
        url = first.split(" at ")[1].split()[0]
        r = httpx.post(url + "/models/switch", json={"model": "other"}, timeout=30)
        assert r.status_code == 200 and r.json()["active"]
        r = httpx.post(url + "/chat/completions", json={"messages": CHAT, "max_tokens": 2}, timeout=30)
        assert r.json()["model"] == "other"  # the server answers with its own choice
        with open_store() as store:
            assert store.active_model().name == "chosen"  # the app's stays the user's
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_a_request_for_many_choices_takes_turns_with_later_requests(server):
    big = {"prompt": "a", "n": MAX_CHOICES, "max_tokens": 60, "temperature": 1.0, "seed": 1}
    answers = {}

    def many():
        start = time.monotonic()
        answers["many"] = post(server, "/v1/completions", big, timeout=120), time.monotonic() - start

    assert post(server, "/v1/completions", {"prompt": "b", "max_tokens": 2}).status_code == 200  # loaded
    thread = threading.Thread(target=many)
    thread.start()
    time.sleep(0.2)  # its first rows are decoding
    start = time.monotonic()
    one = post(server, "/v1/completions", {"prompt": "b", "max_tokens": 2})
    one_s = time.monotonic() - start
    thread.join()
    r, many_s = answers["many"]
    assert r.status_code == 200 and len(r.json()["choices"]) == MAX_CHOICES and one.status_code == 200
    # Queued behind all 128 rows it waited for 8 batches of them; now for one row to finish.
    assert one_s < many_s / 3, f"one choice took {one_s:.2f} s beside {MAX_CHOICES} taking {many_s:.2f} s"


def test_detokenize_round_trips_and_refuses_ids_outside_the_vocabulary(server):
    text = "Once upon a time, Gisburn painted."
    tokens = post(server, "/tokenize", {"prompt": text}).json()["tokens"]
    assert post(server, "/detokenize", {"tokens": tokens}).json() == {"prompt": text}
    r = post(server, "/detokenize", {"tokens": [*tokens, 512]})  # the tiny model's vocabulary is 0..511
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens" and "0..511" in r.json()["error"]["message"]
