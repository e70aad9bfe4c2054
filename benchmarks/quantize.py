"""int8 weights (`--quantize int8`, gpt/quantize.py) against fp32: decode speed and perplexity.

    .venv/bin/python benchmarks/quantize.py [--shape gpt2] [--model DIR] [--threads 1]
        [--prompt-tokens 64] [--new-tokens 64] [--repeats 3]

Speed: a model of the shape (random weights, GPT-2 124M by default) saved as a model directory
and loaded from it twice, as fp32 and with quantize="int8", then greedy decoding at batch 1 with
Kettle's engine, a fixed number of new tokens, the two sides' runs alternating in one process so
a busy machine slows both alike; decode tokens/s = (n_new - 1) / (time for n_new - time for 1),
on the wall clock and the process's CPU clock. Quality: held-out perplexity of a trained model
(default: the brewed starter under $KETTLE_HOME, else /tmp/brewhome) on the Python modules the
starter's brew holds out (finetune.starter), fp32 and int8, and how often both pick the same next token;
and int8 as decoding computes it (a few positions a call: gpt.native's weight-only int8 kernel).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
if (ROOT.parent / "shared" / "tiktoken_cache").is_dir():  # GPT-2's tokenizer files, offline
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(ROOT.parent / "shared" / "tiktoken_cache"))

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def decode_speed(shape: str, n_prompt: int, n_new: int, repeats: int) -> dict[str, dict]:
    """Best decode tokens/s per side and clock (see the module docstring)."""
    import torch

    from gpt.checkpoint import load_model, save_model
    from gpt.config import get_preset
    from gpt.engine import Engine
    from gpt.model import GPT
    from gpt.sampling import SamplingParams

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        # GPT-2's vocabulary (its tokenizer is what a model folder without one uses)
        save_model(GPT(dataclasses.replace(get_preset(shape), vocab_size=50257)), Path(tmp) / "model")
        engines = {
            name: Engine(*load_model(Path(tmp) / "model", quantize=q), name=name)
            for name, q in (("fp32", None), ("int8", "int8"))
        }
    ids = torch.randint(0, 50000, (n_prompt,), generator=torch.Generator().manual_seed(1)).tolist()
    best: dict[str, dict] = {name: {} for name in engines}
    for i in range(repeats + 1):
        for name, engine in engines.items():
            engine.stop_ids = set()  # a fixed length: end-of-text stops neither side

            def run(n, engine=engine):
                engine.reset()
                r = engine.generate(ids, SamplingParams(max_new_tokens=n, temperature=0.0, seed=0))
                assert r.new_tokens == n

            t0 = {c: clock() for c, clock in CLOCKS.items()}
            run(1)
            t1 = {c: clock() for c, clock in CLOCKS.items()}
            run(n_new)
            t2 = {c: clock() for c, clock in CLOCKS.items()}
            if i == 0:
                continue  # warm-up
            for c in CLOCKS:
                decode = (t2[c] - t1[c]) - (t1[c] - t0[c])
                tps = (n_new - 1) / max(decode, 1e-9)
                best[name][c] = max(best[name].get(c, 0.0), tps)
    return best


def heldout_ids(tokenizer) -> list[int]:
    from finetune.starter import held_out_groups, python_corpus

    docs = python_corpus()
    held = held_out_groups(docs)
    ids: list[int] = []
    for doc in docs:
        if doc.group in held:
            ids += tokenizer.encode(doc.text) + [tokenizer.eot_id]
    return ids


def perplexity(model_dir: Path, max_tokens: int) -> dict:
    """Held-out perplexity fp32 and int8, and the share of positions where both agree on the
    most likely next token."""
    import torch

    from gpt.checkpoint import load_model
    from gpt.model import KVCache
    from gpt.quantize import NATIVE_ROWS

    models = {name: load_model(model_dir, quantize=q)[0] for name, q in (("fp32", None), ("int8", "int8"))}
    tokenizer = load_model(model_dir)[1]
    ids = torch.tensor(heldout_ids(tokenizer)[: max_tokens + 1])
    context = models["fp32"].config.context_length
    n = (len(ids) - 1) // context
    x, y = ids[: n * context].view(n, context), ids[1 : n * context + 1].view(n, context)
    loss = {name: 0.0 for name in models}
    same = 0
    with torch.inference_mode():
        for start in range(0, n, 16):
            xb, yb = x[start : start + 16], y[start : start + 16]
            logits = {name: m(xb) for name, m in models.items()}
            for name, lg in logits.items():
                loss[name] += float(torch.nn.functional.cross_entropy(lg.flatten(0, 1), yb.flatten(), reduction="sum"))
            same += int((logits["fp32"].argmax(-1) == logits["int8"].argmax(-1)).sum())
        # as decoding computes it: a few positions a call on the KV cache, so every int8 layer
        # runs gpt.native's weight-only kernel (where the machine has it), not the prompt's
        decoded, step = 0.0, NATIVE_ROWS
        int8 = models["int8"]
        for row in range(n):
            cache = KVCache(int8.config, batch_size=1)
            for start in range(0, context, step):
                lg = int8(x[row : row + 1, start : start + step], cache)
                decoded += float(
                    torch.nn.functional.cross_entropy(lg[0], y[row, start : start + step], reduction="sum")
                )
    tokens = n * context
    return {
        "tokens": tokens,
        "agree": same / tokens,
        **{name: math.exp(total / tokens) for name, total in loss.items()},
        "int8 decoding": math.exp(decoded / tokens),
    }


def default_model() -> Path | None:
    from data.paths import models_dir

    for candidate in (models_dir() / "starter", Path("/tmp/brewhome/models/starter")):
        if (candidate / "config.json").is_file():
            return candidate
    return None


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="gpt2", help="preset for the speed run (default gpt2: 124M)")
    parser.add_argument(
        "--model", type=Path, help="trained model directory for perplexity (default: the brewed starter)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--heldout-tokens", type=int, default=65536, help="the first N held-out tokens for perplexity")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model_dir = args.model or default_model()
    if model_dir is None:
        print("perplexity: no trained model (brew the starter or pass --model DIR)")
    else:
        p = perplexity(model_dir, args.heldout_tokens)
        print(
            f"held-out perplexity ({model_dir}, {p['tokens']:,} tokens): fp32 {p['fp32']:.4f}, "
            f"int8 {p['int8']:.4f} ({p['int8'] / p['fp32'] - 1:+.2%}); same next token "
            f"{p['agree']:.1%}; int8 as decoding computes it {p['int8 decoding']:.4f} "
            f"({p['int8 decoding'] / p['fp32'] - 1:+.2%})",
            flush=True,
        )
    speed = decode_speed(args.shape, args.prompt_tokens, args.new_tokens, args.repeats)
    for c in CLOCKS:
        print(
            f"decode {args.shape}, batch 1, {args.threads} thread(s), {c} clock: fp32 "
            f"{speed['fp32'][c]:.1f} tok/s, int8 {speed['int8'][c]:.1f} tok/s "
            f"({speed['int8'][c] / speed['fp32'][c]:.2f}x)"
        )


if __name__ == "__main__":
    main()
