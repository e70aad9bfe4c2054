#!/usr/bin/env bash
# Every GPU figure in one run, under 8 minutes on one GPU (random weights, nothing downloaded,
# nothing read from the network; a throw-away KETTLE_HOME):
#
#   1. pretraining, the 124M shape (GPT-2's), bf16 autocast + TF32 + fused AdamW, eager and
#      torch.compile: tokens/s and MFU against the device's peak (gpt.device.peak_flops);
#   2. decode tok/s of the 124M shape in bf16 at batch 1 and batch 8 (greedy, the model's own
#      KV-cache step), and batch 1 through Kettle's engine beside transformers' generate(),
#      eager and with its compiled step (Engine.compile_decode: one CUDA graph a token);
#   3. fine-tuning tok/s on the 124M shape, full and LoRA (rank 8, every linear), bf16 autocast;
#   4. the app's generation path: InProcessService (what `kettle` and `kettle serve` use) on the
#      GPU, one request, then 8 at once: time to first token and tokens/s.
#
#     benchmarks/gpu.sh            # PYTHON=... to use another interpreter than .venv/bin/python
#
# Without a CUDA GPU it stops at once with one line saying so (exit status 2).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export KETTLE_HOME=$(mktemp -d)
trap 'rm -rf "$KETTLE_HOME"' EXIT
# GPT-2's tokenizer files (for the engine-vs-transformers row) from the shared folder when there.
[ -d ../shared/tiktoken_cache ] && export TIKTOKEN_CACHE_DIR=${TIKTOKEN_CACHE_DIR:-$(cd ../shared/tiktoken_cache && pwd)}

"$PY" - <<'EOF' || exit 2
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"benchmarks/gpu.sh: PyTorch {torch.__version__} sees no CUDA GPU "
             f"(CUDA build: {torch.version.cuda or 'no'}); this script measures GPU figures only")
print(f"GPU: {torch.cuda.get_device_name()}, PyTorch {torch.__version__}, CUDA {torch.version.cuda}")
EOF

section() { echo; echo "== $1"; }
SECONDS=0

section "1. pretraining, 124M shape, 16 x 1024 tokens a step (bf16 autocast, TF32, fused AdamW)"
timeout 300 "$PY" - <<'EOF'
import sys
sys.path.insert(0, "benchmarks")
import train  # its measure(): Kettle's own training step, MFU from finetune.pretrain's peak table

train.SHAPES["gpt2"] = ("gpt2", 16, 1024)  # a GPU-sized batch: its CPU one, 4 x 256, starves a GPU
rows = [train.measure(impl, "gpt2", steps=10, warmup=3, device_name="cuda")
        for impl in ("kettle", "kettle+compile")]
print(train._table(rows, rows[0]["tokens_per_s"]))
EOF

section "2. decode, 124M shape, bf16, greedy, 64-token prompt, 128 new tokens"
timeout 120 "$PY" - <<'EOF'
import time
import torch
from gpt.config import get_preset
from gpt.model import GPT, KVCache

torch.manual_seed(0)
model = GPT(get_preset("gpt2")).to("cuda", torch.bfloat16).eval()
for batch in (1, 8):
    prompt = torch.randint(0, 50257, (batch, 64), device="cuda")
    best = 0.0
    for _ in range(3):
        cache = KVCache(model.config, batch, max_len=256, device="cuda", dtype=torch.bfloat16)
        with torch.inference_mode():
            token = model(prompt, cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(128):
                token = model(token, cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
        best = max(best, 128 / (time.perf_counter() - start))
    print(f"batch {batch}: {best:8.1f} steps/s = {best * batch:8.1f} tok/s in aggregate")
EOF
if [ -n "${TIKTOKEN_CACHE_DIR:-}" ]; then
  timeout 240 "$PY" benchmarks/generate.py --shapes gpt2 --sampling greedy --device cuda \
    --dtype bfloat16 --new-tokens 128 --turns 0 --repeats 2 --compile
else
  echo "(Kettle's engine vs transformers skipped: GPT-2's tokenizer files are not here; set TIKTOKEN_CACHE_DIR)"
fi

section "3. fine-tuning, 124M shape, bf16 autocast, 8 x 512 tokens a step: full and LoRA"
timeout 120 "$PY" - <<'EOF'
import time
import torch
from finetune.lora import LoRAConfig, apply_lora
from gpt.config import get_preset
from gpt.device import autocast
from gpt.model import GPT
from finetune.train import OptimizerSettings, make_optimizer, prepare_training

device = torch.device("cuda")
prepare_training(device)
data = torch.randint(0, 50257, (13, 8, 513), device=device)
for mode in ("full", "lora"):
    torch.manual_seed(0)
    model = GPT(get_preset("gpt2")).to(device)
    if mode == "lora":
        apply_lora(model, LoRAConfig(rank=8, alpha=16, dropout=0.0))
    model.train()
    optimizer = make_optimizer(model, OptimizerSettings(lr=1e-4), device=device)
    for i, batch in enumerate(data):
        if i == 3:  # after the warm-up steps
            torch.cuda.synchronize()
            start = time.perf_counter()
        with autocast(device):
            loss = model(batch[:, :-1], targets=batch[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    torch.cuda.synchronize()
    tokens = 10 * data.shape[1] * (data.shape[2] - 1)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{mode:5}: {tokens / (time.perf_counter() - start):10,.0f} tok/s "
          f"({trainable:,} trainable parameters, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB)")
    del model, optimizer
    torch.cuda.reset_peak_memory_stats()
EOF

section "4. the app's generation: InProcessService on the GPU, 124M shape, 128-token answers"
timeout 120 "$PY" - <<'EOF'
import asyncio
import torch
from pydoc_data.topics import topics
from data.paths import models_dir
from gpt.checkpoint import save_model
from gpt.config import get_preset
from gpt.model import GPT
from gpt.sampling import SamplingParams
from gpt.service import Done, Error, InProcessService
from gpt.tokenizer import train_tokenizer

torch.manual_seed(0)
tokenizer = train_tokenizer(list(topics.values())[:200], vocab_size=1024)
path = models_dir() / "gpu-bench"
save_model(GPT(get_preset("gpt2")), path, tokenizer=tokenizer)
service = InProcessService(str(path), device="cuda")
params = SamplingParams(temperature=0, repetition_penalty=1.0, max_new_tokens=128)


async def ask(i):
    async for event in service.stream_chat([{"role": "user", "content": f"question {i}"}], params):
        if isinstance(event, Error):
            raise SystemExit(f"the service failed: {event.message}")
        if isinstance(event, Done):
            return event.result


async def main():
    await ask(0)  # load and warm up
    for clients in (1, 8):
        loop = asyncio.get_running_loop()
        start = loop.time()
        results = await asyncio.gather(*(ask(i) for i in range(clients)))
        wall = loop.time() - start
        tokens = sum(r.new_tokens for r in results)
        print(f"{clients} client(s): {tokens / wall:8.1f} tok/s in aggregate, TTFT "
              f"{max(r.ttft_s for r in results) * 1000:6.1f} ms (worst), one answer "
              f"{results[0].tokens_per_s:7.1f} tok/s")


asyncio.run(main())
service.close()
EOF

echo
echo "all GPU figures in ${SECONDS} s"
