"""Pretraining: next-token prediction on raw text, on one device or many (torchrun + DDP).

    kettle pretrain --data corpus/ --preset small --out my-model

A run keeps its state in a run directory (by default under KETTLE_HOME/runs):

    run.json          what was asked: corpus, model config, training config
    kettle-tokenizer.json  the tokenizer the shards were made with (none for GPT-2's)
    shards/           the corpus as token shards (finetune.corpus)
    checkpoint/       model/ (a model directory), trainer.pt (optimizer, RNG states), state.json
    metrics.jsonl     one JSON object per step, evaluation and sample
    loss.png          the loss curve, drawn at the end

Resuming restores weights, optimizer moments, the step (which fixes the learning rate and the
data position: batches are a pure function of the step) and the RNG states, so a resumed run
logs the same losses at the same steps as one that was never stopped.

Under `torchrun --nproc_per_node N` every rank trains on its own part of each batch; gradients
are averaged by DistributedDataParallel; only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from finetune import corpus
from finetune.train import (
    Display,
    Dist,
    OptimizerSettings,
    StopFlag,
    append_metrics,
    gathered_rng_states,
    init_distributed,
    load_checkpoint,
    lr_at,
    make_optimizer,
    plot_losses,
    prepare_training,
    save_checkpoint,
    set_rng_state,
    truncate_metrics,
)
from gpt.checkpoint import save_model
from gpt.config import GPTConfig
from gpt.device import autocast, peak_flops
from gpt.errors import KettleError
from gpt.files import atomic_write_text, check_writable, made_until_error, remove_stale_temporaries
from gpt.model import GPT
from gpt.threads import ThreadFitter
from gpt.tokenizer import (
    LEGACY_TOKENIZER_FILE,
    TOKENIZER_FILE,
    Tokenizer,
    gpt2_tokenizer,
    load_tokenizer,
    train_tokenizer,
)

GPT2_VOCAB = 50257


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_tokens: int | None = None  # tokens a step, all ranks together (None: step_tokens)
    micro_batch_size: int = 8  # windows per forward pass on one device
    lr: float = 6e-4
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = off
    loader: str = "random"  # random windows, or the book's sliding windows
    stride: int | None = None  # sliding windows: distance between starts (default: context)
    # Sequence-length warm-up: the first `short_share` of the steps train on windows of
    # `short_context` tokens (a divisor of the context; as many tokens a step), the rest on the
    # full context. Attention's cost grows with the window, and what short windows teach carries
    # over; the full-length steps train the later positions, whose embeddings start as the
    # trained ones stretched over the context (stretch_positions).
    short_context: int | None = None
    short_share: float = 0.0
    val_fraction: float = 0.1
    text_field: str = "text"  # JSONL corpora: the field holding the text
    eval_every: int = 100
    eval_batches: int = 10
    sample_every: int = 200  # 0 = no samples
    sample_tokens: int = 48
    sample_prompt: str = ""  # default: the start of the validation text
    checkpoint_every: int = 200
    max_time: float | None = None  # seconds; stop early (with a model) once spent
    seed: int = 1337
    compile: bool = False
    device: str = "auto"

    def validate(self) -> None:
        for name in ("max_steps", "batch_tokens", "micro_batch_size", "eval_every", "eval_batches", "checkpoint_every"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise KettleError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise KettleError(f"learning rate must be positive, got {self.lr}")
        if self.loader not in ("random", "sliding"):
            raise KettleError(f"unknown loader {self.loader!r} (choose random or sliding)")
        if not 0.0 <= self.val_fraction < 1.0:
            raise KettleError(f"val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.short_context is not None and self.short_context <= 0:
            raise KettleError(f"short-context must be positive, got {self.short_context}")
        if not 0.0 <= self.short_share <= 1.0:
            raise KettleError(f"short-share must be in [0, 1], got {self.short_share}")

    @property
    def optimizer(self) -> OptimizerSettings:
        """The optimizer's and schedule's part of these settings, as the toolkit takes them."""
        return OptimizerSettings(
            lr=self.lr,
            weight_decay=self.weight_decay,
            beta1=self.beta1,
            beta2=self.beta2,
            warmup_steps=self.warmup_steps,
            min_lr_ratio=self.min_lr_ratio,
        )


@dataclass
class PretrainResult:
    out: Path | None  # the model directory (None when interrupted)
    run_dir: Path
    step: int
    tokens: int
    train_loss: float | None
    val_loss: float | None
    initial_val_loss: float | None  # the untrained model's
    interrupted: bool = False
    elapsed: float = 0.0
    samples: list[str] = field(default_factory=list)
    rank: int = 0  # under torchrun, only rank 0 should report


# --- optimisation -------------------------------------------------------------------------------

DEFAULT_BATCH_TOKENS = 32768


def step_tokens(cfg: TrainConfig, train_tokens: int) -> int:
    """The tokens an optimizer step aims for: as set, else 32k (nanoGPT's small-scale figure)
    but never more than the training split: on a small corpus, a bigger batch only repeats its
    text within one step, at the full cost of each repeat."""
    if cfg.batch_tokens is not None:
        return cfg.batch_tokens
    return max(1, min(DEFAULT_BATCH_TOKENS, train_tokens))


def accumulation_steps(cfg: TrainConfig, context: int, *, world_size: int, train_tokens: int) -> int:
    per_pass = cfg.micro_batch_size * context * world_size
    return max(1, math.ceil(step_tokens(cfg, train_tokens) / per_pass))


@torch.no_grad()
def stretch_positions(model: GPT, trained: int) -> None:
    """The position embeddings of the whole context made from the first `trained` ones, linearly
    interpolated (as a vision transformer's are for a larger image): a model trained on short
    windows then meets positions that look like ones it knows, not random ones, on its first
    full-length step."""
    wpe = model.wpe.weight
    stretched = torch.nn.functional.interpolate(
        wpe[:trained].T[None].float(), size=wpe.shape[0], mode="linear", align_corners=True
    )
    wpe.copy_(stretched[0].T.to(wpe.dtype))


# --- the run directory --------------------------------------------------------------------------


def default_run_dir(out: Path) -> Path:
    from data.paths import runs_dir

    key = hashlib.sha256(str(out.expanduser().resolve()).encode()).hexdigest()[:8]
    return runs_dir(create=False) / f"pretrain-{out.name}-{key}"  # made when the run starts


# --- evaluation and samples ---------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model,
    stream: corpus.TokenStream,
    *,
    context: int,
    batch_size: int,
    n_batches: int,
    device: torch.device,
    dist: Dist,
) -> float | None:
    """Mean next-token loss over the first windows of the validation split (same every time)."""
    length = min(context, len(stream) - 1)
    if length < 1:
        return None
    n_windows = min(n_batches * batch_size, (len(stream) - 1) // length)
    mine = list(range(dist.rank, n_windows, dist.world_size))
    loss_sum, count = 0.0, 0
    model.eval()
    for i in range(0, len(mine), batch_size):
        rows = np.stack([stream.read(w * length, length + 1) for w in mine[i : i + batch_size]])
        t = torch.from_numpy(rows).to(device)
        with autocast(device):
            loss = model(t[:, :-1], targets=t[:, 1:])
        loss_sum += float(loss) * t[:, 1:].numel()
        count += t[:, 1:].numel()
    model.train()
    if dist.enabled:
        total = torch.tensor([loss_sum, count], device=device, dtype=torch.float64)
        torch.distributed.all_reduce(total)
        loss_sum, count = float(total[0]), int(total[1])
    return loss_sum / count if count else None


def sample(model: GPT, tokenizer: Tokenizer, *, prompt_ids: list[int], max_new_tokens: int, seed: int) -> str:
    """A short continuation of the prompt, to watch what the model has learnt so far."""
    from gpt.engine import Engine
    from gpt.sampling import SamplingParams

    prompt_ids = prompt_ids[-(model.config.context_length // 2) :] or [tokenizer.eot_id]
    params = SamplingParams(temperature=0.8, top_k=40, max_new_tokens=max_new_tokens, seed=seed)
    try:
        result = Engine(model, tokenizer).generate(prompt_ids, params)
    finally:
        model.train()  # the engine puts the model in eval mode
    return tokenizer.decode(prompt_ids) + result.text


# --- the run ------------------------------------------------------------------------------------


def _prepare_data(
    data: Path,
    run_dir: Path,
    *,
    config: GPTConfig,
    cfg: TrainConfig,
    tokenizer: Tokenizer | None,
    resume: bool,
    display: Display,
) -> Tokenizer:
    """Rank 0: the run's tokenizer (given, GPT-2's, or trained on the corpus) and its shards."""
    if resume:
        tokenizer = load_tokenizer(run_dir)
    elif tokenizer is None:
        if config.vocab_size >= GPT2_VOCAB:
            tokenizer = gpt2_tokenizer()
        else:
            display.print(f"training a {config.vocab_size}-token tokenizer on {data}")
            tokenizer = train_tokenizer(corpus.iter_texts(data, cfg.text_field), config.vocab_size)
    _check_vocabulary(tokenizer, config)
    if tokenizer.n_vocab < config.vocab_size and not resume:
        display.print(
            f"note: the tokenizer has {tokenizer.n_vocab:,} tokens (the corpus gave no more "
            f"merges); the model's other {config.vocab_size - tokenizer.n_vocab:,} ids are "
            "never generated"
        )
    if not resume:
        _clear_run_files(run_dir)
        tokenizer.save(run_dir)  # a no-op for GPT-2's, which is fetched by name
    shards = run_dir / "shards"
    if resume:
        if corpus.read_meta(shards).get("fingerprint") != corpus.fingerprint(data):
            raise KettleError(f"{data}: the corpus changed since the run started; start a new run")
    else:
        with _progress_bar(display, f"tokenizing {data.name}") as update:
            corpus.build_shards(
                data,
                tokenizer,
                out_dir=shards,
                val_fraction=cfg.val_fraction,
                text_field=cfg.text_field,
                on_progress=update,
            )
    if not resume:  # a corpus too small for the context fails now, not once training starts
        corpus.check_windows(corpus.read_meta(shards)["train_tokens"], config.context_length)
    return tokenizer


def _check_vocabulary(tokenizer: Tokenizer, config: GPTConfig) -> None:
    if tokenizer.n_vocab > config.vocab_size:
        raise KettleError(
            f"the tokenizer has {tokenizer.n_vocab} tokens but the model's vocabulary "
            f"only {config.vocab_size}; use a larger vocab_size or a smaller tokenizer"
        )


@contextlib.contextmanager
def _preparing(run_dir: Path, *, resume: bool):
    """The run directory while a run gets ready to train; a new run refused on the way (a
    tokenizer too big, a corpus too small for the context) leaves nothing: a folder this made
    is removed, Kettle's files in one that was there (a --run-dir the user named) are cleared."""
    if resume:
        run_dir.mkdir(parents=True, exist_ok=True)
        yield
        return
    existed = run_dir.exists()
    try:
        with made_until_error(run_dir):
            yield
    except BaseException:
        if existed:
            _clear_run_files(run_dir)
        raise


def _clear_run_files(run_dir: Path) -> None:
    """Remove what an earlier attempt that never reached a checkpoint left (only Kettle's own
    files: the run directory may be a folder the user named)."""
    for name in (TOKENIZER_FILE, LEGACY_TOKENIZER_FILE, "metrics.jsonl", "loss.png", "run.json"):
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "shards", ignore_errors=True)


@contextlib.contextmanager
def _progress_bar(display: Display, label: str):
    if not display.enabled:
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    with Progress(
        TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(), transient=True
    ) as progress:
        task = progress.add_task(label, total=None)
        yield lambda done, total: progress.update(task, completed=done, total=total)


def pretrain(
    data: str | Path | None,
    out: str | Path,
    *,
    config: GPTConfig | None = None,
    cfg: TrainConfig | None = None,
    tokenizer: Tokenizer | None = None,
    resume: bool = False,
    run_dir: str | Path | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    display_label: str = "pretraining",
    register: bool = True,
    max_steps: int | None = None,
    console=None,
) -> PretrainResult:
    """Train a GPT on the corpus at `data` and save it as the model directory `out`.

    With `resume`, the run recorded in the run directory continues from its checkpoint with its
    recorded corpus, config and settings (`data`, `config`, `cfg` are ignored); `max_steps` may
    extend it.
    `on_step(step, loss)` is called after every optimizer step (rank 0). With `register`, the
    model is recorded in the store as a "pretrained" model version. `console` (rich): where the
    progress goes, for a caller that prints its own lines meanwhile.
    """
    out = Path(out).expanduser()
    run_dir = Path(run_dir) if run_dir else default_run_dir(out)
    cfg = cfg or TrainConfig()
    ckpt_dir = run_dir / "checkpoint"
    if resume:
        if not (ckpt_dir / "state.json").exists():
            raise KettleError(f"--resume: no checkpoint in {run_dir} (nothing to resume; start without --resume)")
        try:
            recorded = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
            config = GPTConfig.from_dict(recorded["model_config"], source=str(run_dir / "run.json"))
            cfg = TrainConfig(**recorded["train_config"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise KettleError(f"{run_dir / 'run.json'}: cannot read the run's settings ({exc})") from None
        if max_steps is not None:
            cfg = dataclasses.replace(cfg, max_steps=max_steps)
        data = Path(recorded["data"])
    else:
        if config is None or data is None:
            raise KettleError("pretrain needs a corpus and a model config (or --resume)")
        data = Path(data).expanduser()
        if out.exists():
            raise KettleError(f"{out}: already exists (choose another --out)")
        check_writable(out)  # before the work, not once it is done
        if tokenizer is not None:
            _check_vocabulary(tokenizer, config)
        if ckpt_dir.exists():
            raise KettleError(
                f"{run_dir} already holds a checkpoint for {out}: continue it with "
                "--resume, or delete that folder to start over"
            )
    cfg.validate()
    if cfg.short_context and config.context_length % cfg.short_context:
        raise KettleError(
            f"short-context {cfg.short_context} does not divide the context length {config.context_length}"
        )
    corpus.check_corpus(data)  # a missing, empty or binary corpus fails before any work
    dist, device = init_distributed(cfg.device)
    display = Display(progress and dist.main, cfg.max_steps, cfg.max_time, display_label, console)
    try:
        if dist.main:
            with _preparing(run_dir, resume=resume):
                remove_stale_temporaries(run_dir)  # a killed checkpoint write's leftovers
                tokenizer = _prepare_data(
                    data, run_dir, config=config, cfg=cfg, tokenizer=tokenizer, resume=resume, display=display
                )
            if not resume:
                atomic_write_text(
                    run_dir / "run.json",
                    json.dumps(
                        {
                            "data": str(data.resolve()),
                            "out": str(out.resolve()),
                            "model_config": config.to_dict(),
                            "train_config": dataclasses.asdict(cfg),
                        },
                        indent=2,
                    )
                    + "\n",
                )
        dist.barrier()
        if not dist.main:
            tokenizer = load_tokenizer(run_dir)
        return _train(
            data,
            out,
            run_dir=run_dir,
            config=config,
            cfg=cfg,
            tokenizer=tokenizer,
            resume=resume,
            dist=dist,
            device=device,
            display=display,
            on_step=on_step,
            register=register,
        )
    finally:
        display.close()


def _train(data, out, *, run_dir, config, cfg, tokenizer, resume, dist, device, display, on_step, register):
    ckpt_dir = run_dir / "checkpoint"
    metrics_path = run_dir / "metrics.jsonl"
    train_stream = corpus.TokenStream(run_dir / "shards", "train")
    val_stream = corpus.TokenStream(run_dir / "shards", "val")
    context = config.context_length
    accum = accumulation_steps(cfg, context, world_size=dist.world_size, train_tokens=len(train_stream))

    def windows(batch: int, length: int) -> corpus.WindowLoader:
        return corpus.WindowLoader(
            train_stream,
            batch,
            length,
            cfg.stride,
            mode=cfg.loader,
            seed=cfg.seed,
            rank=dist.rank,
            world_size=dist.world_size,
            accum_steps=accum,
        )

    loader = windows(cfg.micro_batch_size, context)
    tokens_per_step = loader.step_batch * context
    short_until, short_loader = 0, None
    if cfg.short_context and cfg.short_share and cfg.short_context < context:
        short_until = round(cfg.max_steps * cfg.short_share)
        short_loader = windows(cfg.micro_batch_size * (context // cfg.short_context), cfg.short_context)

    prepare_training(device)
    torch.manual_seed(cfg.seed + dist.rank)
    step, initial_val, elapsed_before = 0, None, 0.0
    if resume:
        trainer, state, model = load_checkpoint(ckpt_dir, device)
        if state["world_size"] != dist.world_size or state["step_batch"] != loader.step_batch:
            display.print(
                f"note: resuming with {dist.world_size} process(es) and {loader.step_batch} "
                "windows per step; the data order follows the new layout"
            )
        step, initial_val = state["step"], state.get("initial_val_loss")
        elapsed_before = state.get("elapsed", 0.0)
    else:
        model = GPT(config).to(device)
    model.train()
    raw_model = model
    optimizer = make_optimizer(raw_model, cfg.optimizer, device=device)
    if resume:
        optimizer.load_state_dict(trainer["optimizer"])
        rng = trainer["rng"]
        set_rng_state(rng[dist.rank] if dist.rank < len(rng) else rng[0])
        if dist.main:
            truncate_metrics(metrics_path, step)
    if cfg.compile:
        model = torch.compile(model)
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    peak = peak_flops(device)
    prompt_ids = (
        tokenizer.encode(cfg.sample_prompt)
        if cfg.sample_prompt
        else val_stream.read(0, min(8, len(val_stream))).tolist()
        if len(val_stream)
        else train_stream.read(0, 8).tolist()
    )

    def log(record: dict) -> None:
        if dist.main:
            append_metrics(metrics_path, record)

    def run_eval(at: int) -> float | None:
        val = evaluate(
            model,
            val_stream,
            context=context,
            batch_size=cfg.micro_batch_size,
            n_batches=cfg.eval_batches,
            device=device,
            dist=dist,
        )
        if val is not None:
            log({"step": at, "val_loss": val, "val_ppl": math.exp(min(val, 50))})
            display.print(f"step {at}: val loss {val:.3f}, perplexity {math.exp(min(val, 50)):,.1f}")
        return val

    def checkpoint(at: int) -> None:
        rng = gathered_rng_states(dist)
        if dist.main:
            save_checkpoint(
                ckpt_dir,
                {"optimizer": optimizer.state_dict(), "rng": rng},
                state={
                    "step": at,
                    "tokens": at * tokens_per_step,
                    "world_size": dist.world_size,
                    "step_batch": loader.step_batch,
                    "initial_val_loss": initial_val,
                    "elapsed": elapsed_before + time.perf_counter() - started,
                    "scheduler": {"kind": "warmup-cosine", "step": at, "lr": optimizer.param_groups[0]["lr"]},
                    "data": {"loader": cfg.loader, "next_step": at, "seed": cfg.seed},
                },
                model=raw_model,
                tokenizer=tokenizer,
            )
        dist.barrier()

    started = time.perf_counter()
    val_loss = None
    if not resume:
        initial_val = val_loss = run_eval(0)
    display.step(step, None, tokens_per_s=None, mfu=None, elapsed=elapsed_before)
    samples: list[str] = []
    train_loss = None
    interrupted = False
    with StopFlag() as stop, ThreadFitter(device.type == "cpu") as threads:
        while step < cfg.max_steps:
            threads.update()
            t0 = time.perf_counter()
            lr = lr_at(
                step,
                cfg.optimizer,
                max_steps=cfg.max_steps,
                max_time=cfg.max_time,
                elapsed=elapsed_before + t0 - started,
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            if short_loader is not None and step == short_until:
                stretch_positions(raw_model, cfg.short_context)
            windows = short_loader if step < short_until else loader
            for micro in range(accum):
                x, y = windows.batch(step, micro)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                sync = dist.enabled and micro < accum - 1
                with model.no_sync() if sync else contextlib.nullcontext(), autocast(device):
                    loss = model(x, targets=y)  # in chunks: the full logits would dominate memory
                (loss / accum).backward()
                loss_sum += loss.detach()
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
            )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            train_loss = float(dist.mean(loss_sum / accum))
            step += 1
            dt = time.perf_counter() - t0
            tps = tokens_per_step / dt
            mfu = (
                raw_model.estimate_mfu(tps, seq_len=windows.max_length, peak_flops=peak * dist.world_size)
                if peak
                else None
            )
            log(
                {
                    "step": step,
                    "loss": train_loss,
                    "lr": lr,
                    "tokens": step * tokens_per_step,
                    "tokens_per_s": tps,
                    "window": windows.max_length,  # the loss steps down where the windows lengthen
                    "grad_norm": float(grad_norm) if grad_norm is not None else None,
                    **({"mfu": mfu} if mfu is not None else {}),
                }
            )
            display.step(
                step, train_loss, tokens_per_s=tps, mfu=mfu, elapsed=elapsed_before + time.perf_counter() - started
            )
            if on_step and dist.main:
                on_step(step, train_loss)
            if not math.isfinite(train_loss):
                raise KettleError(
                    f"the loss became {train_loss} at step {step}; lower the learning rate (--lr) and start again"
                )
            out_of_time = dist.any(
                cfg.max_time is not None and elapsed_before + time.perf_counter() - started > cfg.max_time, device
            )
            last = step == cfg.max_steps or out_of_time
            if step % cfg.eval_every == 0 or last:
                val_loss = run_eval(step)
            if dist.main and cfg.sample_every and (step % cfg.sample_every == 0 or last):
                try:
                    text = sample(
                        raw_model,
                        tokenizer,
                        prompt_ids=prompt_ids,
                        max_new_tokens=cfg.sample_tokens,
                        seed=cfg.seed + step,
                    )
                except Exception as exc:  # a look at the model must never cost the run its result
                    log({"step": step, "sample_error": f"{type(exc).__name__}: {exc}"})
                    display.print(f"step {step}: no sample ({type(exc).__name__}: {exc})")
                else:
                    samples.append(text)
                    log({"step": step, "sample": text})
                    display.print(f"step {step} sample: {text!r}")
            if dist.any(stop.requested, device):
                checkpoint(step)
                interrupted = True
                break
            if out_of_time:
                display.print(f"time budget of {cfg.max_time:.0f}s spent at step {step}")
                break
            if step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
                checkpoint(step)
    elapsed = elapsed_before + time.perf_counter() - started
    result = PretrainResult(
        None,
        run_dir,
        step,
        step * tokens_per_step,
        train_loss,
        val_loss,
        initial_val,
        interrupted,
        elapsed,
        samples,
        dist.rank,
    )
    if interrupted:
        return result
    checkpoint(step)  # a finished run can still be extended with --resume --max-steps
    if dist.main:
        summary = {
            "data": str(data),
            "steps": step,
            "tokens": result.tokens,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "initial_val_loss": initial_val,
            "elapsed_s": round(elapsed, 1),
            "run_dir": str(run_dir),
            "train_config": dataclasses.asdict(cfg),
        }
        save_model(
            raw_model,
            out,
            tokenizer=tokenizer,
            overwrite=resume,
            extra_files={"training.json": json.dumps(summary, indent=2) + "\n"},
        )
        plot_losses(metrics_path, run_dir / "loss.png")
        result.out = out
        if register:
            from data.store import open_store

            with open_store() as store:
                store.register_model(
                    out,
                    "pretrained",
                    activate_if_none=False,
                    hparams={"config": config.to_dict(), "train": dataclasses.asdict(cfg)},
                    metrics={"train_loss": train_loss, "val_loss": val_loss, "steps": step, "tokens": result.tokens},
                )
    dist.barrier()
    return result
