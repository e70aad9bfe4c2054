"""Fine-tuning speed and memory: full vs LoRA, Kettle vs Hugging Face transformers (+ peft).

    .venv/bin/python benchmarks/finetune.py [--data ../shared/data/instruction-data.json]
        [--layers 6] [--embd 384] [--heads 6] [--steps 6] [--batch-tokens 2048] [--threads 2]

The Alpaca entries are rendered in Kettle's chat format with GPT-2's tokenizer. First the padding
waste of Kettle's length-bucketed batches against random batches of the same token budget. Then
training steps on the same batches (random weights of the given shape, GPT-2's vocabulary,
AdamW): Kettle full, Kettle LoRA (rank 8 on all attention and MLP linears), transformers full
and transformers + peft LoRA with the same rank and targets. Each runs in its own process so that
its peak memory (peak RSS on CPU, which includes PyTorch itself) is its own; tokens/s counts real
(non-padding) tokens over the timed steps after one warm-up step.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import resource
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
if (ROOT.parent / "shared" / "tiktoken_cache").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(ROOT.parent / "shared" / "tiktoken_cache"))
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "instruction-data.json"


def load_examples(path: Path, context: int):
    from finetune.instruct import prepare
    from gpt.tokenizer import gpt2_tokenizer

    entries = json.loads(path.read_text(encoding="utf-8"))
    conversations = [
        [
            {"role": "user", "content": e["instruction"] + (f"\n\n{e['input']}" if e["input"] else "")},
            {"role": "assistant", "content": e["output"]},
        ]
        for e in entries
    ]
    examples, stats = prepare(conversations, gpt2_tokenizer(), max_length=context, vocab_size=50257)
    return examples, stats


def padding_report(examples, batch_tokens: int) -> tuple[float, float]:
    from finetune.instruct import make_batches, padding_waste

    bucketed = make_batches(examples, batch_tokens, max_batch_size=32, seed=0)
    shuffled = list(examples)
    random.Random(0).shuffle(shuffled)
    size = max(1, round(len(examples) / len(bucketed)))  # the same examples per batch on average
    plain = [shuffled[i : i + size] for i in range(0, len(shuffled), size)]
    return padding_waste(bucketed), padding_waste(plain)


def one_run(args, side: str, mode: str, queue) -> None:
    import torch
    import torch.nn.functional as F

    from finetune.instruct import IGNORE, collate, make_batches
    from finetune.lora import LoRAConfig, apply_lora
    from finetune.train import OptimizerSettings
    from gpt.config import GPTConfig
    from gpt.model import GPT

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    examples, _ = load_examples(Path(args.data), args.context)
    batches = make_batches(examples, args.batch_tokens, max_batch_size=32, seed=0)[: args.steps + 1]
    config = GPTConfig(
        vocab_size=50257, context_length=args.context, n_layer=args.layers, n_head=args.heads, n_embd=args.embd
    )
    model = GPT(config)
    lora = LoRAConfig(rank=8, alpha=16, dropout=0.05)
    if side == "kettle":
        if mode == "lora":
            apply_lora(model, lora)
        net = model.train()
    else:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from generate import to_hf

        net = to_hf(model).train()
        if mode == "lora":
            from peft import LoraConfig, get_peft_model

            net = get_peft_model(
                net,
                LoraConfig(
                    r=lora.rank,
                    lora_alpha=lora.alpha,
                    lora_dropout=lora.dropout,
                    fan_in_fan_out=True,
                    target_modules=["c_attn", "c_proj", "c_fc"],
                ),
            )
        del model
    # The same AdamW on both sides: GPT.configure_optimizers' groups, applied to the peer's
    # parameters too (it reads only .parameters()).
    settings = OptimizerSettings(lr=1e-4)
    optimizer = GPT.configure_optimizers(
        net, settings.weight_decay, settings.lr, betas=(settings.beta1, settings.beta2), device_type="cpu"
    )
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)

    def step(batch) -> float:
        ids, labels = collate(batch, pad_id=50256)
        logits = net(ids) if side == "kettle" else net(input_ids=ids).logits
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    step(batches[0])  # warm-up
    tokens = sum(len(e) for b in batches[1:] for e in b)
    start = time.perf_counter()
    for batch in batches[1:]:
        step(batch)
    seconds = time.perf_counter() - start
    queue.put(
        {
            "tokens_per_s": tokens / seconds,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "trainable": trainable,
            "tokens": tokens,
            "seconds": seconds,
        }
    )


def measure(args, side: str, mode: str) -> dict:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=one_run, args=(args, side, mode, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--embd", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each, best kept")
    args = parser.parse_args()

    examples, stats = load_examples(Path(args.data), args.context)
    bucketed, plain = padding_report(examples, args.batch_tokens)
    print(
        f"data: {stats['examples']} examples, {stats['tokens']:,} tokens ({stats['loss_tokens']:,} "
        f"in the loss), {stats['skipped_too_long']} longer than {args.context} skipped"
    )
    print(
        f"padding waste at {args.batch_tokens} tokens a batch: length-bucketed {bucketed:.1%}, "
        f"random batches {plain:.1%} ({plain / max(bucketed, 1e-9):.1f}x more)"
    )
    print(
        f"model: {args.layers} layers, {args.embd} wide, GPT-2 vocabulary; {args.steps} timed steps, "
        f"{args.threads} threads, best of {args.repeats}"
    )
    rows = {}
    # Rounds alternate the four runs, so a machine busy with something else slows all alike.
    for _ in range(args.repeats):
        for key in [(side, mode) for mode in ("full", "lora") for side in ("kettle", "transformers")]:
            r = measure(args, *key)
            best = rows.setdefault(key, r)
            rows[key] = {
                **r,
                "tokens_per_s": max(r["tokens_per_s"], best["tokens_per_s"]),
                "peak_mb": min(r["peak_mb"], best["peak_mb"]),
            }
    for (side, mode), r in rows.items():
        print(
            f"  {side:12s} {mode:4s}  {r['tokens_per_s']:8,.0f} tokens/s  peak {r['peak_mb']:7,.0f} MB  "
            f"{r['trainable']:>11,} trainable parameters"
        )
    for mode in ("full", "lora"):
        k, h = rows["kettle", mode], rows["transformers", mode]
        print(
            f"{mode}: Kettle / transformers speed {k['tokens_per_s'] / h['tokens_per_s']:.2f}x, "
            f"peak memory {k['peak_mb'] / h['peak_mb']:.2f}x"
        )
    k_full, k_lora = rows["kettle", "full"], rows["kettle", "lora"]
    print(
        f"Kettle LoRA vs full: speed {k_lora['tokens_per_s'] / k_full['tokens_per_s']:.2f}x, "
        f"peak memory {k_lora['peak_mb'] / k_full['peak_mb']:.2f}x"
    )


if __name__ == "__main__":
    main()
