"""Speculative decoding (prompt lookup) against plain decoding, side by side in one run.

    .venv/bin/python benchmarks/speculative.py [--shape gpt2] [--new-tokens 96] [--repeats 2]
        [--threads N] [--max-train-steps 200]

What is measured, honestly: the model is the `--shape` (default GPT-2 124M) in fp32, randomly
initialised and then trained in this run on two prompt + answer pairs until its greedy answers
are those answers, each token at SURE or more (a random model copies nothing, and there is no
trained 124M model offline):

- copy: "fix the spelling in this paragraph" followed by the paragraph corrected, so the answer
  copies the prompt but where a typo was fixed;
- no copy: "write another paragraph", answered with another paragraph of the story, which
  shares with its prompt only what two paragraphs of one story share by chance.

The weights only decide which tokens come out; the cost of a forward pass is the same for any
weights of the shape, so the speed ratios are those of a real model answering such prompts
with the same acceptance. Both modes run on the same engine, interleaved, best of `--repeats`
(after a warm-up), a fixed number of new tokens; the greedy tokens are compared. Each workload
is decoded greedy and sampled as the chat and `kettle generate` sample by default (seeded):
sampled speculation draws other tokens from the same distribution (tests/gpt/test_speculative.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
if (ROOT.parent / "shared" / "tiktoken_cache").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(ROOT.parent / "shared" / "tiktoken_cache"))

STORY = ROOT.parent / "shared" / "data" / "the-verdict.txt"
TYPOS = {
    " thought ": " thougt ",
    " his ": " hsi ",
    " been ": " bene ",
    " that ": " taht ",
    " would ": " woudl ",
    " painting": " paintng",
    " married ": " marryed ",
}


def workloads() -> dict[str, tuple[str, str]]:
    paragraphs = STORY.read_text(encoding="utf-8").split("\n\n")  # 9, 7, 11: 100-130 tokens
    fix = paragraphs[9]
    for right, wrong in TYPOS.items():
        fix = fix.replace(right, wrong)
    return {
        "copy": (f"Fix the spelling in this paragraph.\n\n{fix}\n\nFixed:\n", paragraphs[9]),
        "no copy": (f"Write another paragraph of the story.\n\n{paragraphs[7]}\n\nAnother:\n", paragraphs[11]),
    }


# Trained until each answer token is this likely at least: a model that copies a passage, or an
# answer it knows, is this sure of it; one trained only until its greedy answers were right
# sampled off them at the chat's temperature within a token or two, and drafted nothing.
SURE = 0.9


def train_to_answer(model, pairs, max_steps):
    """Train until every answer is the model's greedy continuation of its prompt, each of its
    tokens at SURE or more; the steps taken."""
    import torch

    seqs = [torch.tensor([p + a]) for p, a in pairs]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.0)
    for step in range(1, max_steps + 1):
        if step % 10 == 0:
            print(f"training to answer: step {step}", file=sys.stderr, flush=True)
        model.train()
        for x in seqs:
            logits = model(x[:, :-1])
            torch.nn.functional.cross_entropy(logits[0], x[0, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.eval()
        with torch.inference_mode():
            probs = [model(x)[0, len(p) - 1 : -1].softmax(-1) for (p, _), x in zip(pairs, seqs)]
            if all(
                prob.argmax(-1).tolist() == a and float(prob[range(len(a)), a].min()) >= SURE
                for (_, a), prob in zip(pairs, probs)
            ):
                return step
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="gpt2")
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="default: fitted to the machine's load")
    parser.add_argument("--max-train-steps", type=int, default=200)
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="a model directory: loaded when it exists, else written after training "
        "(training the 124M shape takes many minutes on a CPU)",
    )
    args = parser.parse_args(argv)

    import torch

    from gpt.checkpoint import load_model, save_model
    from gpt.config import get_preset
    from gpt.engine import Engine
    from gpt.model import GPT
    from gpt.quantize import decoding_layout
    from gpt.sampling import SamplingParams
    from gpt.speculative import PromptLookup
    from gpt.tokenizer import gpt2_tokenizer, train_tokenizer

    config = get_preset(args.shape)
    # GPT-2's tokenizer where the shape's vocabulary holds it; a smaller one (the tiny preset, the
    # starter's shape) gets a BPE of its own size trained here on the story.
    tokenizer = (
        gpt2_tokenizer()
        if config.vocab_size >= 50257
        else train_tokenizer([STORY.read_text(encoding="utf-8")], config.vocab_size, name="story")
    )
    texts = workloads()
    pairs = {name: (tokenizer.encode(p), tokenizer.encode(a)[: args.new_tokens]) for name, (p, a) in texts.items()}
    start = time.perf_counter()
    if args.model is not None and args.model.exists():
        model = load_model(args.model, torch.device("cpu"), dtype=torch.float32)[0]
        trained = f"earlier (loaded from {args.model})"
    else:
        torch.manual_seed(0)
        model = GPT(config)
        steps = train_to_answer(model, list(pairs.values()), args.max_train_steps)
        trained = f"{steps} steps" if steps else f"{args.max_train_steps} steps, answers NOT fully learnt"
        if args.model is not None:
            save_model(model, args.model)
    # laid out for decoding as Engine.load lays out a model folder's weights (gpt.quantize)
    engine = Engine(decoding_layout(model.eval()), tokenizer, name=args.shape)
    engine.stop_ids = set()  # fixed length: every run decodes --new-tokens
    engine.threads = args.threads
    samplings = {
        "greedy": SamplingParams(temperature=0, max_new_tokens=args.new_tokens),
        # `kettle generate`'s and the chat's own sampling, seeded so that each run draws alike
        "sampled": SamplingParams(seed=1, max_new_tokens=args.new_tokens),
    }
    print(
        f"{args.shape} shape fp32 ({model.num_params() / 1e6:.0f}M parameters), batch 1, "
        f"{args.new_tokens} new tokens; trained {trained} ({time.perf_counter() - start:.0f} s) to "
        f"give the workloads' answers ('answer learnt' says how far, greedy); best of {args.repeats} "
        f"after a warm-up; sampled: temperature {samplings['sampled'].temperature}, as a chat samples"
    )
    print(
        f"{'workload':9} {'prompt':>6} {'sampling':8} {'mode':14} {'decode tok/s':>12} {'accepted':>9} "
        f"{'answer learnt':>13}"
    )
    modes = {"plain": None, "prompt lookup": PromptLookup()}
    engine.speculate_sampled = True  # for the sampled rows; "plain" has no speculation at all
    engine.speculation = PromptLookup()
    engine.generate(pairs["copy"][0], samplings["greedy"].replace(max_new_tokens=2))
    decided = engine._drafts_pay
    engine._drafts_pay = True  # measured here whatever the engine decided
    for name, (prompt, answer) in pairs.items():
        for sampling, params in samplings.items():
            best, tokens, stats = {}, {}, {}
            for i in range(args.repeats + 1):
                for mode, speculation in modes.items():
                    engine.speculation = speculation
                    engine.reset()
                    r = engine.generate(prompt, params)
                    tokens[mode] = r.token_ids
                    stats[mode] = r
                    if i:
                        best[mode] = max(best.get(mode, 0.0), r.tokens_per_s)
            for mode in modes:
                r = stats[mode]
                rate = f"{r.acceptance_rate:.0%}" if r.drafted_tokens else "-"
                learnt = sum(a == b for a, b in zip(r.token_ids, answer))
                print(
                    f"{name:9} {len(prompt):6} {sampling:8} {mode:14} {best[mode]:12.1f} {rate:>9} "
                    f"{learnt:>6}/{len(answer)}"
                )
            # sampled speculation draws other tokens from the same distribution (tests/gpt/test_speculative.py)
            same = tokens["plain"] == tokens["prompt lookup"]
            same = f"; greedy tokens identical: {same}" if sampling == "greedy" else ""
            print(
                f"{name:9} {sampling} prompt lookup / plain: decode {best['prompt lookup'] / best['plain']:.2f}x "
                f"(target {'>= 2' if name == 'copy' else '>= 1.0'}x); drafted {stats['prompt lookup'].drafted_tokens}, "
                f"accepted {stats['prompt lookup'].accepted_tokens}{same}"
            )

    print(
        f"the engine's own decision on this machine and shape (Engine._checking_drafts_pays): "
        f"{'speculate' if decided else 'decode one token a step'}"
    )


if __name__ == "__main__":
    main()
