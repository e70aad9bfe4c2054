"""Decoding speed beside llama.cpp, the peer people run local models with on a CPU.

    .venv/bin/python benchmarks/llama_cpp.py [--shapes gpt2 4x256 starter] [--threads 1]
        [--prompt-tokens 64] [--new-tokens 128] [--rounds 5]

For each shape (random weights, "sharpened" so that greedy decoding has clear winners): the model
is saved as a Kettle model folder and exported with `kettle export-gguf` (f32 and q8_0); then
Kettle (fp32, and --quantize int8) and llama.cpp (f32, q8_0), through node-llama-cpp's prebuilt
CPU libraries (npm installs them once into ~/.cache/kettle-tests, as the slow GGUF test does),
decode the same prompt greedily at batch 1 on the same number of threads, in interleaved rounds
so a busy machine slows every side alike. Decode speed is (new tokens - 1) / the time after the
first token, on both sides; the median of the rounds is printed, and the ratios Kettle/llama.cpp.

Two Kettle rows: `engine` is the engine alone, one token a forward pass (speculation off) on the
asked threads; `generate` is the engine as `kettle generate` sets it up (its default threads and
speculation), beside llama.cpp on the same thread count.

Shapes: gpt2 is GPT-2 124M (GPT-2's vocabulary), 4x256 four layers of 256 with GPT-2's vocabulary,
starter the shape `kettle brew starter` trains on a CPU (4 x 128, 4,096 tokens, context 1,024)
with a tokenizer trained here.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
if (ROOT.parent / "shared" / "tiktoken_cache").is_dir():  # GPT-2's BPE offline, for developers
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(ROOT.parent / "shared" / "tiktoken_cache"))

NODE_LLAMA_CPP = "3.22.1"  # the slow GGUF test's version
DRIVER = Path(__file__).with_name("llama_cpp_driver.mjs")


def shape_config(name: str):
    from finetune.starter import MODEL_SHAPES
    from gpt.config import GPTConfig, get_preset

    if name == "gpt2":
        return get_preset("gpt2").replace(context_length=1024)
    if name == "4x256":
        return GPTConfig(vocab_size=50257, context_length=1024, n_layer=4, n_head=4, n_embd=256)
    if name == "starter":
        return MODEL_SHAPES["cpu"]
    raise SystemExit(f"unknown shape {name!r} (gpt2, 4x256, starter)")


def make_model(name: str, folder: Path) -> Path:
    """A model folder of the shape, its weights random but sharpened (as the GGUF test's): torch's
    and llama.cpp's sums differ in their last bits, which must not decide a near tie."""
    import torch

    from gpt.checkpoint import save_model
    from gpt.model import GPT
    from gpt.tokenizer import train_tokenizer

    config = shape_config(name)
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if p.ndim == 2 and key != "lm_head.weight":
                p.normal_(0.0, 0.3 if key in ("wte.weight", "wpe.weight") else 0.15)
    tokenizer = None
    if config.vocab_size < 50257:
        text = "\n".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "gpt").glob("*.py")))
        tokenizer = train_tokenizer([text], vocab_size=config.vocab_size)
    return save_model(model, folder / name, tokenizer=tokenizer)


def node_llama_cpp() -> Path:
    """node-llama-cpp installed once into the user's cache folder (the slow GGUF test's place)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kettle-tests"
    folder = cache / f"node-llama-cpp-{NODE_LLAMA_CPP}"
    if not (folder / "node_modules" / "node-llama-cpp" / "package.json").exists():
        tmp = cache / f".node-llama-cpp-{os.getpid()}.tmp"
        packages = [f"node-llama-cpp@{NODE_LLAMA_CPP}", f"@node-llama-cpp/linux-x64@{NODE_LLAMA_CPP}"]
        subprocess.run(
            ["npm", "install", "--prefix", str(tmp), "--no-audit", "--no-fund", *packages, "--omit=optional"],
            check=True,
            env={**os.environ, "NODE_LLAMA_CPP_SKIP_DOWNLOAD": "true"},
        )
        os.replace(tmp, folder)
    return folder


class LlamaCpp:
    """The node driver, one request a line."""

    def __init__(self):
        self.child = subprocess.Popen(
            ["node", str(DRIVER), str(node_llama_cpp())], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def ask(self, request: dict) -> dict:
        self.child.stdin.write(json.dumps(request) + "\n")
        self.child.stdin.flush()
        line = self.child.stdout.readline()
        if not line:
            raise SystemExit("the llama.cpp driver stopped (see its error above)")
        return json.loads(line)

    def close(self):
        self.child.stdin.close()
        self.child.wait(timeout=60)


def kettle_engine(model_dir: Path, quantize: str | None, *, as_generate: bool, threads: int):
    from gpt.engine import Engine

    engine = Engine.load(model_dir, device="cpu", quantize=quantize)
    engine.stop_ids = set()  # a fixed number of tokens, as on llama.cpp's side
    if not as_generate:
        engine.speculation = None
        engine.threads = threads
    return engine


def kettle_run(engine, prompt: list[int], n_new: int) -> dict:
    from gpt.sampling import SamplingParams

    engine.reset()
    r = engine.generate(prompt, SamplingParams(max_new_tokens=n_new, temperature=0.0, seed=0))
    assert r.new_tokens == n_new, r.new_tokens
    return {"tokens": r.token_ids, "ttft_s": r.ttft_s, "decode_s": (n_new - 1) / r.tokens_per_s}


def measure(shape: str, args, llama: LlamaCpp, folder: Path) -> None:
    """Every side on one shape, interleaved; prints a line per side and the ratios."""
    import torch

    from gpt.checkpoint import load_model
    from gpt.engine import Engine
    from gpt.gguf_export import export_gguf

    model_dir = make_model(shape, folder)
    ggufs = {t: export_gguf(model_dir, folder / f"{shape}-{t}" / "model.gguf", weights=t) for t in ("f32", "q8_0")}
    for path in ggufs.values():
        llama.ask({"load": str(path), "context": args.prompt_tokens + args.new_tokens, "threads": args.threads})
    vocab = shape_config(shape).vocab_size // 2
    prompt = torch.randint(0, vocab, (args.prompt_tokens,), generator=torch.Generator().manual_seed(1)).tolist()
    engines = {
        "kettle fp32 engine": kettle_engine(model_dir, None, as_generate=False, threads=args.threads),
        "kettle int8 engine": kettle_engine(model_dir, "int8", as_generate=False, threads=args.threads),
        "kettle fp32 generate": kettle_engine(model_dir, None, as_generate=True, threads=args.threads),
    }
    sides = {name: functools.partial(kettle_run, e, prompt, args.new_tokens) for name, e in engines.items()}
    for t, path in ggufs.items():
        sides[f"llama.cpp {t}"] = functools.partial(
            llama.ask, {"run": str(path), "prompt": prompt, "new_tokens": args.new_tokens}
        )
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    for i in range(args.rounds + 1):
        for name, run in sides.items():
            result = run()
            if i:  # the first round warms up
                runs[name].append(result)
    # PyTorch's nn.Linear layers, as training leaves them: the tokens Kettle decoded before
    trained = Engine(*load_model(model_dir))
    trained.stop_ids, trained.speculation = set(), None
    before = kettle_run(trained, prompt, args.new_tokens)["tokens"]
    n = args.new_tokens
    tps = {name: statistics.median((n - 1) / r["decode_s"] for r in rs) for name, rs in runs.items()}
    ttft = {name: statistics.median(r["ttft_s"] for r in rs) * 1000 for name, rs in runs.items()}
    for name in sides:
        tokens = runs[name][0]["tokens"]
        same = sum(a == b for a, b in zip(tokens, runs["llama.cpp f32"][0]["tokens"]))
        mine = f", {sum(a == b for a, b in zip(tokens, before))}/{n} as nn.Linear" if name.startswith("kettle") else ""
        print(f"{shape:8} {name:22} {tps[name]:12.1f} {ttft[name]:8.1f}  {same}/{n} as llama.cpp f32{mine}")
    print(
        f"{shape:8} ratios: kettle fp32 / llama.cpp f32 {tps['kettle fp32 engine'] / tps['llama.cpp f32']:.2f}x, "
        f"kettle int8 / llama.cpp q8_0 {tps['kettle int8 engine'] / tps['llama.cpp q8_0']:.2f}x, "
        f"kettle generate / llama.cpp f32 {tps['kettle fp32 generate'] / tps['llama.cpp f32']:.2f}x"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["gpt2", "4x256", "starter"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    llama = LlamaCpp()
    print(
        f"batch 1, {args.threads} thread(s), prompt {args.prompt_tokens} tokens, {args.new_tokens} new, greedy; "
        f"median of {args.rounds} interleaved rounds (after one warm-up)"
    )
    print(f"{'shape':8} {'side':22} {'decode tok/s':>12} {'TTFT ms':>8}  tokens")
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes:
            measure(shape, args, llama, Path(tmp))
    llama.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
