"""Generation speed: Kettle's engine against Hugging Face transformers' generate(), same weights.

    .venv/bin/python benchmarks/generate.py [--shapes gpt2 small] [--sampling greedy top-p]
        [--prompt-tokens 64] [--new-tokens 64] [--repeats 3] [--turns 10] [--threads N]
        [--device cpu] [--dtype float32]

For each shape (random weights, nothing downloaded; gpt2 is GPT-2 124M, small and tiny the presets
of 14M and 1.3M parameters, tiny-50k the tiny one with GPT-2's vocabulary) at batch 1: time to first token, decode
tokens/s (see measure_speed) and peak memory, greedy and with top-p
sampling (temperature 0.7, top_p 0.9), a fixed number of new tokens (end-of-text stops neither
side). The two sides' timed runs alternate in one process, so a busy machine slows both alike;
peak memory is measured in a fresh process per side (on CPU: peak RSS during the generation,
which includes PyTorch itself). Then time to first token per turn of a growing chat on the gpt2
shape: with prefix reuse, with the cache reset every turn, and transformers' prefill of the
whole conversation.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Developer convenience: GPT-2's tokenizer files from the shared folder when it exists.
if (ROOT.parent / "shared" / "tiktoken_cache").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(ROOT.parent / "shared" / "tiktoken_cache"))

TURN_USER = "Tell me one more thing about the portrait and the painter who stopped painting."


def _tiny_50k():
    from gpt.config import get_preset

    return get_preset("tiny").replace(vocab_size=50257)


# Shapes beside the presets. tiny-50k is issue 15's "tiny shape": the tiny preset (4 layers,
# context 256) with GPT-2's vocabulary, whose output head is most of what a token reads.
SHAPES = {"tiny-50k": _tiny_50k}


def build_model(shape: str, dtype_name: str, device: str):
    import torch

    from gpt.config import PRESETS, get_preset
    from gpt.model import GPT

    torch.manual_seed(0)
    config = get_preset(shape) if shape in PRESETS else SHAPES[shape]()
    model = GPT(config).eval()
    return model.to(device=device, dtype=getattr(torch, dtype_name))


def to_hf(model):
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt.checkpoint import dtype_name
    from gpt.hf import config_to_hf, kettle_state_to_hf

    dtype = model.wte.weight.dtype
    config = config_to_hf(model.config, dtype_name(dtype), eot_id=None)  # no tokenizer here
    hf = GPT2LMHeadModel(GPT2Config(**config))
    missing, unexpected = hf.load_state_dict(kettle_state_to_hf(model.weights()), strict=False)
    assert not unexpected and all(m == "lm_head.weight" or m.endswith("attn.bias") for m in missing), (
        missing,
        unexpected,
    )
    hf.tie_weights()
    return hf.to(device=model.wte.weight.device, dtype=dtype).eval()


def reset_peak_memory(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: restart the peak-RSS count


def peak_memory_mb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def prompt_ids(vocab_size: int, n: int) -> list[int]:
    import torch

    return torch.randint(0, min(vocab_size, 50000), (n,), generator=torch.Generator().manual_seed(1)).tolist()


def kettle_runner(model, n_prompt, sampling, *, compiled=False):
    """A function generating n new tokens with Kettle's engine from a fresh prefill (`compiled`:
    through its compiled decoding step, Engine.compile_decode)."""
    from gpt.engine import Engine
    from gpt.sampling import SamplingParams
    from gpt.tokenizer import gpt2_tokenizer

    engine = Engine(model, gpt2_tokenizer(), name="bench")
    engine.stop_ids = set()  # fixed length: end-of-text does not stop the benchmark
    if compiled:
        engine.compile_decode()
    ids = prompt_ids(model.config.vocab_size, n_prompt)

    def run(n_new):
        engine.reset()  # every run prefills the whole prompt
        r = engine.generate(ids, SamplingParams(max_new_tokens=n_new, seed=0, **SAMPLING[sampling]))
        assert r.new_tokens == n_new
        return r.token_ids

    return run


def hf_runner(model, n_prompt, sampling):
    """The same with transformers' generate() on the same weights."""
    import torch
    from transformers import GenerationConfig

    hf = to_hf(model)
    ids = torch.tensor([prompt_ids(model.config.vocab_size, n_prompt)], device=model.wte.weight.device)
    mask = torch.ones_like(ids)
    options = {"do_sample": True, "top_k": 0, **SAMPLING[sampling]} if sampling != "greedy" else {"do_sample": False}

    def run(n_new):
        config = GenerationConfig(max_new_tokens=n_new, eos_token_id=None, pad_token_id=0, **options)
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=mask, generation_config=config)
        new = out[0, ids.shape[1] :].tolist()
        assert len(new) == n_new, len(new)
        return new

    return run


# greedy, and what a chat uses (top_p sorts the vocabulary in transformers, not in Kettle).
SAMPLING = {"greedy": {"temperature": 0.0}, "top-p": {"temperature": 0.7, "top_p": 0.9}}
RUNNERS = {
    "kettle": kettle_runner,
    "transformers": hf_runner,
    "kettle+compile": functools.partial(kettle_runner, compiled=True),  # with --compile
}
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def measure_speed(shape, dtype, device, n_prompt, n_new, sampling, repeats, threads, names):
    """Both sides in one process, runs interleaved, so a busy machine slows both alike.

    Each side is timed the same way from outside: a run of 1 new token (the time to first
    token) and a run of n_new; decode speed = (n_new - 1) / the difference. Every figure is taken
    on two clocks: wall time, and the process's CPU time, which other programs on a busy machine
    disturb much less (with one thread, it is the work done)."""
    import torch

    torch.set_num_threads(threads)
    model = build_model(shape, dtype, device)
    runs = {name: RUNNERS[name](model, n_prompt, sampling) for name in names}
    best = {name: {} for name in runs}
    for i in range(repeats + 1):
        for name, run in runs.items():
            t0 = {c: clock() for c, clock in CLOCKS.items()}
            run(1)
            t1 = {c: clock() for c, clock in CLOCKS.items()}
            tokens = run(n_new)
            t2 = {c: clock() for c, clock in CLOCKS.items()}
            if i == 0:
                continue  # a warm-up round (and the compiled step's compilation)
            b = best[name]
            b["tokens"] = tokens
            for c in CLOCKS:
                ttft, total = t1[c] - t0[c], t2[c] - t1[c]
                b[f"ttft_{c}"] = min(b.get(f"ttft_{c}", ttft), ttft)
                b[f"tps_{c}"] = max(b.get(f"tps_{c}", 0.0), (n_new - 1) / max(total - ttft, 1e-9))
    best["floor"] = weights_floor(model)
    return best


def weights_floor(model, repeats=10):
    """Seconds per token that no batch-1 decoder can beat on this machine: the matrix-vector
    products with every weight matrix of the model (each read from memory once), and nothing
    else. The best of `repeats` passes."""
    import torch
    import torch.nn.functional as F

    matrices = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype, device=w.device) for w in matrices}
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            for w in matrices:
                F.linear(inputs[w.shape[1]], w)
            if w.device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
    return best


def measure_memory(name, shape, dtype, device, n_prompt, n_new, sampling):
    """Peak memory while one side generates, alone in its own process. The model it was
    converted from is freed first, so each side counts its own weights, cache and work."""
    import gc

    run = RUNNERS[name](build_model(shape, dtype, device), n_prompt, sampling)
    gc.collect()
    reset_peak_memory(device)
    run(n_new)
    return peak_memory_mb(device)


def measure_turns(dtype, device, n_turns, threads, answer_tokens=24):
    """TTFT per turn of a growing chat: prefix reuse, cache reset each turn, transformers."""
    import torch

    from gpt.chat_template import render_prompt
    from gpt.engine import Engine
    from gpt.sampling import SamplingParams
    from gpt.tokenizer import gpt2_tokenizer

    torch.set_num_threads(threads)
    model = build_model("gpt2", dtype, device)
    engine = Engine(model, gpt2_tokenizer(), name="gpt2")
    cold = Engine(model, gpt2_tokenizer(), name="gpt2")  # same weights, its own cache
    hf = to_hf(model)
    params = SamplingParams(temperature=0, max_new_tokens=answer_tokens)
    engine.generate("warm up", params.replace(max_new_tokens=2))
    messages = [{"role": "system", "content": "You are a helpful assistant who knows about art."}]
    rows = []
    for turn in range(1, n_turns + 1):
        messages.append({"role": "user", "content": f"{turn}. {TURN_USER}"})
        result = engine.generate_chat(messages, params)
        cold.reset()
        cold_result = cold.generate_chat(messages, params.replace(max_new_tokens=1))
        ids = torch.tensor([render_prompt(messages, engine.tokenizer)], device=device)
        with torch.inference_mode():
            start = time.perf_counter()
            hf(ids, use_cache=True)
            hf_prefill = time.perf_counter() - start
        rows.append(
            {
                "turn": turn,
                "prompt": result.prompt_tokens,
                "prefilled": result.prompt_tokens - result.cached_tokens,
                "reuse_ttft_s": result.ttft_s,
                "cold_ttft_s": cold_result.ttft_s,
                "hf_prefill_s": hf_prefill,
            }
        )
        messages.append({"role": "assistant", "content": result.text})
    return rows


def in_child(fn, *args):
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(fn, args)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["gpt2", "small", "tiny", "tiny-50k"])
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sampling", nargs="+", choices=list(SAMPLING), default=list(SAMPLING))
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--compile", action="store_true", help="also Kettle's compiled decoding step")
    args = parser.parse_args(argv)
    names = ["kettle", "transformers"] + (["kettle+compile"] if args.compile else [])

    print(
        f"device {args.device}, {args.dtype}, {args.threads} threads, batch 1, "
        f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, best of {args.repeats}"
    )
    print(
        f"{'shape':8} {'sampling':8} {'engine':13} {'TTFT ms':>8} {'decode tok/s':>13} "
        f"{'TTFT cpu-ms':>11} {'decode tok/cpu-s':>16} {'peak MB':>8}"
    )
    for shape in args.shapes:
        for sampling in args.sampling:
            common = (shape, args.dtype, args.device, args.prompt_tokens, args.new_tokens, sampling)
            speed = in_child(measure_speed, *common, args.repeats, args.threads, names)
            floor = speed.pop("floor")
            for name, r in speed.items():
                peak = in_child(measure_memory, name, *common)
                print(
                    f"{shape:8} {sampling:8} {name:13} {r['ttft_wall'] * 1000:8.1f} {r['tps_wall']:13.1f} "
                    f"{r['ttft_cpu'] * 1000:11.1f} {r['tps_cpu']:16.1f} {peak:8.0f}"
                )
            ours, theirs = speed["kettle"], speed["transformers"]
            if args.compile:
                built = speed["kettle+compile"]
                print(
                    f"{shape:8} {sampling:8} compiled/eager: decode {built['tps_wall'] / ours['tps_wall']:.2f}x, "
                    f"{built['tps_wall'] * floor:.0%} of the floor below; tokens identical "
                    f"{built['tokens'] == ours['tokens']}"
                )
            line = (
                f"{shape:8} {sampling:8} kettle/transformers: decode {ours['tps_wall'] / theirs['tps_wall']:.2f}x "
                f"(cpu time {ours['tps_cpu'] / theirs['tps_cpu']:.2f}x), "
                f"TTFT {ours['ttft_wall'] / theirs['ttft_wall']:.2f}x "
                f"(cpu time {ours['ttft_cpu'] / theirs['ttft_cpu']:.2f}x, lower is better)"
            )
            if sampling == "greedy":  # same weights, same greedy choices: checks the conversion too
                same = next(
                    (i for i, (a, b) in enumerate(zip(ours["tokens"], theirs["tokens"])) if a != b), len(ours["tokens"])
                )
                line += f"; greedy tokens identical for {same}/{args.new_tokens}"
            print(line)
            print(
                f"{shape:8} {sampling:8} weights-only floor (each weight matrix times one vector, nothing "
                f"else): {1 / floor:.1f} tok/s; kettle reaches {ours['tps_wall'] * floor:.0%} of it, "
                f"transformers {theirs['tps_wall'] * floor:.0%}, so at most "
                f"{1 / (floor * theirs['tps_wall']):.2f}x transformers is possible here "
                f"(target for the small shapes: kettle >= 50%)"
            )

    if args.turns:
        rows = in_child(measure_turns, args.dtype, args.device, args.turns, args.threads)
        print("\ngpt2 shape, growing chat (answers of up to 24 tokens): time to first token per turn")
        print(
            f"{'turn':>4} {'prompt':>7} {'prefilled':>9} {'reuse ms':>9} {'no reuse ms':>12} "
            f"{'transformers prefill ms':>24}"
        )
        for r in rows:
            print(
                f"{r['turn']:4} {r['prompt']:7} {r['prefilled']:9} {r['reuse_ttft_s'] * 1000:9.1f} "
                f"{r['cold_ttft_s'] * 1000:12.1f} {r['hf_prefill_s'] * 1000:24.1f}"
            )
        first, last = rows[0], rows[-1]
        print(
            f"turn {last['turn']} / turn 1 time to first token: {last['reuse_ttft_s'] / first['reuse_ttft_s']:.2f}x "
            f"with prefix reuse (target <= 1.5x), {last['cold_ttft_s'] / first['cold_ttft_s']:.2f}x without"
        )


if __name__ == "__main__":
    main()
