"""CPU threads: Kettle's own choice against fixed 1 and 2 threads, idle and beside a busy process.

    .venv/bin/python benchmarks/threads.py                 # the starter's shape, idle and busy
    .venv/bin/python benchmarks/threads.py --seconds 4 --busy 0 1 2

For each load (0, 1 or 2 background processes, each a plain Python busy loop) it measures, each
in a fresh process (OpenMP's settings are read when torch starts):
- training: tokens/s of full training steps (forward, loss, backward, AdamW) of the starter's
  shape (4 layers, 128 wide, vocabulary 4096) on 16 x 256 tokens, as the brew runs them;
- decoding: tokens/s of greedy batch-1 decoding with the KV cache (Kettle's Engine).
Configurations: "kettle" (what Kettle does unasked: gpt.threads picks the count, OMP_WAIT_POLICY
passive), and torch with 1 and 2 threads and OpenMP's default (active) waiting. It prints tok/s
(the median of --rounds runs, taken in turns) and the ratio kettle / best of {1, 2}; the target
is >= 0.9 under every load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ("kettle", "1", "2")


def worker(config: str, task: str, seconds: float) -> dict:
    """Runs in the measuring process: one task for about `seconds`, after a warm-up."""
    sys.path.insert(0, str(ROOT))
    import torch
    import torch.nn.functional as F

    from finetune.train import OptimizerSettings, make_optimizer, prepare_training
    from gpt.config import GPTConfig
    from gpt.model import GPT
    from gpt.threads import ThreadFitter

    device = torch.device("cpu")
    prepare_training(device)
    used: list[int] = []  # threads each generation ran on (the engine's own choice)
    if config != "kettle":
        torch.set_num_threads(int(config.rstrip("pa")))
    torch.manual_seed(0)
    shape = GPTConfig(vocab_size=4096, context_length=256, n_layer=4, n_head=4, n_embd=128, qkv_bias=False)
    model = GPT(shape)
    if task == "train":
        fitter = ThreadFitter(config == "kettle")
        opt = make_optimizer(model, OptimizerSettings(lr=1e-3), device=device)
        x = torch.randint(0, shape.vocab_size, (16, 257))

        def step() -> int:
            fitter.update()
            loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return 16 * 256
    else:
        from finetune.starter import stdlib_sources
        from gpt.engine import Engine
        from gpt.sampling import SamplingParams
        from gpt.tokenizer import train_tokenizer

        # A tokenizer as large as the model's vocabulary, so that every sampled id decodes.
        tokenizer = train_tokenizer((d.text for d in stdlib_sources()[:300]), shape.vocab_size)
        model.eval()
        engine = Engine(model, tokenizer)
        if config != "kettle":
            engine.threads = int(config.rstrip("pa"))  # fixed: the engine does not fit it
        params = SamplingParams(temperature=0, max_new_tokens=128)

        def step() -> int:
            result = engine.generate([1, 2, 3], params)
            used.append(result.threads)
            return result.new_tokens

    for _ in range(3):
        step()
    tokens, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        tokens += step()
    threads = max(set(used), key=used.count) if used else torch.get_num_threads()
    return {"tok_s": tokens / (time.perf_counter() - started), "threads": threads}


def run(config: str, task: str, seconds: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    policy = {"p": "PASSIVE", "a": "ACTIVE"}.get(config[-1])  # "2": OpenMP's default waiting
    if config != "kettle" and policy:
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run(
        [sys.executable, __file__, "--worker", config, task, str(seconds)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=4.0, help="measuring time per configuration")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each configuration (median shown)")
    ap.add_argument("--busy", type=int, nargs="+", default=[0, 1], help="background busy loops")
    ap.add_argument("--tasks", nargs="+", default=["train", "decode"])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), help="also 1p, 2p (passive waiting)")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        config, task, seconds = args.worker
        print(json.dumps(worker(config, task, float(seconds))))
        return
    print(f"cores usable: {len(os.sched_getaffinity(0))}; shape: starter (4x128, vocab 4096)")
    for busy in args.busy:
        loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
        try:
            time.sleep(1.0)
            for task in args.tasks:
                # Rounds of every configuration in turn; the median of each (the machine drifts).
                rounds = [{c: run(c, task, args.seconds) for c in args.configs} for _ in range(args.rounds)]
                results = {
                    c: sorted((r[c] for r in rounds), key=lambda x: x["tok_s"])[args.rounds // 2] for c in args.configs
                }
                best = max(results["1"]["tok_s"], results["2"]["tok_s"])
                figures = "  ".join(f"{c}: {r['tok_s']:8,.0f} tok/s ({r['threads']}t)" for c, r in results.items())
                ratio = f"kettle/best = {results['kettle']['tok_s'] / best:.2f}" if "kettle" in results else ""
                print(f"busy {busy}  {task:6s}  {figures}  {ratio}", flush=True)
        finally:
            for p in loops:
                p.kill()


if __name__ == "__main__":
    main()
