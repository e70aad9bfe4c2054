"""Serving throughput and latency: 1 client against 8 concurrent clients of `kettle serve`.

    .venv/bin/python benchmarks/serve.py [--clients 1 8] [--requests 3] [--new-tokens 64]
        [--rounds 2] [--preset small]

The `small` preset with random weights (a tokenizer trained on this repository's text; nothing
downloaded) is served by `kettle serve` in its own process. Each client sends --requests
non-streamed completions one after another (64-token answers, sampled with a seed per prompt);
the client counts alternate round after round in this one run, so a busy machine slows them
alike. Printed per client count: aggregate completion tok/s (median over rounds), p50 latency of
a request, and both as ratios to one client; then whether every answer's tokens are the ones the
same request gets served alone (the one-client rounds).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build_model(preset: str, directory: Path) -> Path:
    import torch

    from gpt.checkpoint import save_model
    from gpt.config import get_preset
    from gpt.model import GPT
    from gpt.tokenizer import train_tokenizer

    texts = [p.read_text(encoding="utf-8") for p in sorted(ROOT.glob("**/*.py"))[:200]]
    texts.append((ROOT / "README.md").read_text(encoding="utf-8"))
    torch.manual_seed(0)
    config = get_preset(preset)
    tokenizer = train_tokenizer(texts, vocab_size=min(2048, config.vocab_size))
    return save_model(GPT(config), directory / preset, tokenizer=tokenizer)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, home: Path):
    import httpx

    port = free_port()
    env = {**os.environ, "KETTLE_HOME": str(home)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tui.cli", "serve", str(model), "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("kettle serve did not start")


def prompt(i: int) -> tuple[str, int]:
    return f"Request {i}: tell me about the kettle and the tea number {i * 7}.", 1000 + i


def one_request(url: str, i: int, new_tokens: int) -> tuple[float, int, str]:
    import httpx

    text, seed = prompt(i)
    body = {"prompt": text, "max_tokens": new_tokens, "temperature": 0.8, "seed": seed}
    start = time.perf_counter()
    r = httpx.post(url + "/v1/completions", json=body, timeout=600)
    r.raise_for_status()
    data = r.json()
    return time.perf_counter() - start, data["usage"]["completion_tokens"], data["choices"][0]["text"]


def run_clients(url: str, clients: int, requests: int, new_tokens: int):
    """Every client sends its requests one after another; returns tok/s, latencies, answers."""

    def client(c: int):
        return [(i, *one_request(url, i, new_tokens)) for i in range(c * requests, (c + 1) * requests)]

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        done = [row for rows in pool.map(client, range(clients)) for row in rows]
    wall = time.perf_counter() - start
    return (sum(n for _, _, n, _ in done) / wall, [lat for _, lat, _, _ in done], {i: text for i, _, _, text in done})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--requests", type=int, default=3, help="per client")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--preset", default="small")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        model = build_model(args.preset, home)
        proc, url = start_server(model, home)
        try:
            one_request(url, 10**6, 4)  # warm up: the weights load on the first request
            speeds = {c: [] for c in args.clients}
            latencies = {c: [] for c in args.clients}
            answers = {c: {} for c in args.clients}
            for _ in range(args.rounds):
                for c in args.clients:
                    speed, lats, texts = run_clients(url, c, args.requests, args.new_tokens)
                    speeds[c].append(speed)
                    latencies[c] += lats
                    answers[c].update(texts)
            # Each request of the larger rounds served alone, one after another.
            alone = {i: one_request(url, i, args.new_tokens)[2] for i in sorted(set().union(*answers.values()))}
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    base = args.clients[0]
    print(
        f"kettle serve, preset {args.preset} (random weights), {args.new_tokens}-token answers, "
        f"{args.requests} requests per client, {args.rounds} rounds"
    )
    print(f"{'clients':>8} {'tok/s':>8} {'x':>6} {'p50 s':>7} {'x':>6}")
    for c in args.clients:
        speed, p50 = statistics.median(speeds[c]), statistics.median(latencies[c])
        print(
            f"{c:>8} {speed:>8.1f} {speed / statistics.median(speeds[base]):>6.2f} "
            f"{p50:>7.2f} {p50 / statistics.median(latencies[base]):>6.2f}"
        )
    same = sum(answers[c][i] == alone[i] for c in args.clients for i in answers[c])
    total = sum(len(answers[c]) for c in args.clients)
    print(f"answers identical to the same request served alone: {same}/{total}")


if __name__ == "__main__":
    main()
