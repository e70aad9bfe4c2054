"""`kettle pretrain` (train a GPT on raw text) and `kettle tokenizer train`."""

from __future__ import annotations

import argparse
from pathlib import Path

from tui.commands import flags

# How much of the corpus the compression report reads: enough for a stable figure, quick to encode.
REPORT_CHARS = 20_000_000


def register(sub: argparse._SubParsersAction) -> None:
    from gpt.config import PRESETS  # a dataclass module: no torch at start-up

    p = sub.add_parser(
        "pretrain",
        help="train a GPT on a text corpus (runs under torchrun for many devices)",
        description="Next-token pretraining on text files, a folder of them, or JSONL. "
        "Ctrl-C saves a checkpoint; --resume continues it exactly.",
    )
    p.add_argument("--data", metavar="PATH", help="text file, folder of .txt/.md/.rst/.jsonl, or JSONL")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--preset", metavar="NAME", choices=list(PRESETS), help=f"model shape: {', '.join(PRESETS)}")
    shape.add_argument("--config", metavar="FILE", help="model config JSON (GPTConfig fields)")
    p.add_argument("--out", metavar="DIR", required=True, help="the model directory to write")
    p.add_argument("--max-steps", type=flags.positive_int, metavar="N", help="optimizer steps (default 1000)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run for --out from its checkpoint, with its recorded settings (--max-steps may extend it)",
    )
    p.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="'gpt2', or a tokenizer file / model directory (default: GPT-2's for "
        "GPT-2-sized vocabularies, else one trained on the corpus)",
    )
    p.add_argument("--context", type=flags.positive_int, metavar="N", help="context length (overrides the preset)")
    p.add_argument(
        "--batch-tokens",
        type=flags.positive_int,
        metavar="N",
        help="tokens per optimizer step (default 32768, or the training split if smaller)",
    )
    p.add_argument("--micro-batch", type=flags.positive_int, metavar="N", help="windows per forward pass (default 8)")
    p.add_argument("--lr", type=flags.positive, help="peak learning rate (default 6e-4)")
    p.add_argument("--warmup", type=flags.count, metavar="N", help="warm-up steps (default 20)")
    p.add_argument("--weight-decay", type=flags.number(0), help="AdamW weight decay on matrices (default 0.1)")
    p.add_argument("--dropout", type=flags.share, help="dropout (overrides the preset)")
    p.add_argument(
        "--loader", choices=["random", "sliding"], help="random windows (default) or the book's sliding windows"
    )
    p.add_argument("--stride", type=flags.positive_int, metavar="N", help="sliding windows: distance between starts")
    p.add_argument("--val-fraction", type=flags.share, help="share of the corpus held out (default 0.1)")
    p.add_argument("--text-field", metavar="NAME", help="JSONL field holding the text (default text)")
    p.add_argument("--eval-every", type=flags.positive_int, metavar="N")
    p.add_argument("--sample-every", type=flags.count, metavar="N", help="0 = no samples")
    p.add_argument("--checkpoint-every", type=flags.positive_int, metavar="N")
    p.add_argument("--max-time", type=flags.positive, metavar="SECONDS", help="stop early once this much time is spent")
    p.add_argument("--seed", type=flags.seed)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--device", type=flags.device, help="auto (default), cpu, cuda or mps")
    p.add_argument("--run-dir", metavar="DIR", help="where checkpoints and logs go (default KETTLE_HOME/runs/...)")
    p.set_defaults(func=pretrain_command)

    tok = sub.add_parser("tokenizer", help="tokenizer tools")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", metavar="COMMAND", required=True)
    t = tok_sub.add_parser("train", help="train a byte-level BPE tokenizer on a corpus")
    t.add_argument("--data", metavar="PATH", required=True)
    t.add_argument("--vocab-size", type=int, metavar="N", required=True)
    t.add_argument("--out", metavar="DIR", required=True, help="folder to write kettle-tokenizer.json into")
    t.add_argument("--text-field", metavar="NAME", default="text")
    t.add_argument(
        "--pattern",
        choices=["llama3", "kettle"],
        default="llama3",
        help="how text is split before BPE: Llama 3's (numbers in 1-3 digits; the default, which llama.cpp "
        "runs, so export-gguf takes it) or Kettle's older one (1-2 digits; no GGUF export)",
    )
    t.add_argument("--force", action="store_true", help="replace DIR if it exists")
    t.set_defaults(func=tokenizer_train_command)


TRAIN_FLAGS = {  # flag attribute -> TrainConfig field
    "max_steps": "max_steps",
    "batch_tokens": "batch_tokens",
    "micro_batch": "micro_batch_size",
    "lr": "lr",
    "warmup": "warmup_steps",
    "weight_decay": "weight_decay",
    "loader": "loader",
    "stride": "stride",
    "val_fraction": "val_fraction",
    "text_field": "text_field",
    "eval_every": "eval_every",
    "sample_every": "sample_every",
    "checkpoint_every": "checkpoint_every",
    "max_time": "max_time",
    "seed": "seed",
    "device": "device",
}


def pretrain_command(args) -> int:
    from finetune.pretrain import TrainConfig, pretrain
    from gpt.config import GPTConfig, get_preset
    from gpt.errors import KettleError

    overrides = {field: getattr(args, flag) for flag, field in TRAIN_FLAGS.items() if getattr(args, flag) is not None}
    if args.compile:
        overrides["compile"] = True
    cfg = TrainConfig(**overrides)
    config = None
    if not args.resume:
        if not args.data:
            raise KettleError("--data is required (the corpus to train on)")
        if not args.preset and not args.config:
            raise KettleError("give --preset NAME or --config FILE (the model's shape)")
        config = get_preset(args.preset) if args.preset else GPTConfig.from_file(args.config)
        changes = {k: v for k, v in (("context_length", args.context), ("dropout", args.dropout)) if v is not None}
        config = config.replace(**changes) if changes else config
    result = pretrain(
        args.data,
        args.out,
        config=config,
        cfg=cfg,
        tokenizer=_tokenizer(args.tokenizer),
        resume=args.resume,
        run_dir=args.run_dir,
        max_steps=args.max_steps,
    )
    if result.rank != 0:
        return 130 if result.interrupted else 0
    if result.interrupted:
        print(
            f"stopped at step {result.step}; checkpoint saved in {result.run_dir / 'checkpoint'}\n"
            f"continue with: kettle pretrain --out {args.out} --resume"
        )
        return 130
    val = (
        f", val loss {result.val_loss:.3f} (untrained {result.initial_val_loss:.3f})"
        if result.val_loss is not None and result.initial_val_loss is not None
        else ""
    )
    if result.train_loss is None:  # a resumed run that had its steps: only the model was written
        print(f"nothing left to train at step {result.step}: the model was written from its checkpoint")
    else:
        print(
            f"trained {result.step} steps, {result.tokens:,} tokens in {result.elapsed:.0f}s: "
            f"loss {result.train_loss:.3f}{val}"
        )
    print(
        f"model: {result.out}\nloss curve: {result.run_dir / 'loss.png'}\nmetrics: {result.run_dir / 'metrics.jsonl'}"
    )
    return 0


def _tokenizer(spec: str | None):
    if spec is None:
        return None
    from gpt.tokenizer import TOKENIZER_FILE, gpt2_tokenizer, load_tokenizer_file, tokenizer_path

    if spec == "gpt2":
        return gpt2_tokenizer()
    path = Path(spec).expanduser()
    if path.is_dir():  # a model or `tokenizer train` directory, of this Kettle or an older one
        path = tokenizer_path(path) or path / TOKENIZER_FILE  # the latter: "not found", named
    return load_tokenizer_file(path)


def tokenizer_train_command(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from finetune.corpus import iter_texts
    from gpt.errors import KettleError
    from gpt.files import atomic_directory
    from gpt.tokenizer import SPLIT_PATTERNS, TOKENIZER_FILE, gpt2_tokenizer, train_tokenizer

    out = Path(args.out).expanduser()
    if out.exists() and not args.force:
        raise KettleError(f"{out}: already exists (choose another --out, or --force)")
    console = Console(stderr=True)
    with console.status(f"training a {args.vocab_size}-token BPE on {args.data}"):
        tokenizer = train_tokenizer(
            iter_texts(args.data, args.text_field), args.vocab_size, pattern=SPLIT_PATTERNS[args.pattern]
        )
    if tokenizer.n_vocab < args.vocab_size:
        console.print(
            f"note: {tokenizer.n_vocab:,} tokens, not {args.vocab_size:,}: the corpus gave "
            "no more merges (more text gives more)"
        )
    with atomic_directory(out, overwrite=args.force) as tmp:
        tokenizer.save(tmp)
    sample = _corpus_sample(args.data, args.text_field)
    n_bytes = len(sample.encode("utf-8"))
    table = Table(title=f"compression on {n_bytes:,} bytes of {args.data}")
    for column in ("tokenizer", "vocabulary", "tokens", "bytes/token"):
        table.add_column(column, justify="right")
    rows = [("trained", tokenizer)]
    try:
        rows.append(("GPT-2", gpt2_tokenizer()))
    except KettleError as exc:  # offline without GPT-2's files: report ours alone
        console.print(f"no GPT-2 comparison: {exc}")
    for name, tok in rows:
        n = max(1, len(tok.encode(sample)))
        table.add_row(name, f"{tok.n_vocab:,}", f"{n:,}", f"{n_bytes / n:.2f}")
    Console().print(table)
    print(f"tokenizer: {out / TOKENIZER_FILE}")
    return 0


def _corpus_sample(path: str, text_field: str) -> str:
    from finetune.corpus import iter_texts

    parts, size = [], 0
    for text in iter_texts(path, text_field):
        parts.append(text)
        size += len(text)
        if size >= REPORT_CHARS:
            break
    return "".join(parts)[:REPORT_CHARS]
