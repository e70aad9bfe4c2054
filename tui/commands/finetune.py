"""`kettle finetune ...` (instruction fine-tuning runs) and `kettle classify train|eval|predict`."""

from __future__ import annotations

import argparse

from tui.commands import flags


def _train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        metavar="M",
        help="base model: a model version name or id, a model directory, or a name under KETTLE_HOME/models",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--snapshot", type=flags.record_id, metavar="ID", help="a dataset snapshot of the store")
    src.add_argument(
        "--data", metavar="FILE", help="a dataset file: Alpaca JSON, ShareGPT, OpenAI chat JSONL or DPO pairs"
    )
    p.add_argument("--lora", action="store_true", help="train LoRA adapters instead of every weight")
    p.add_argument("--lora-rank", type=flags.positive_int, metavar="R", help="LoRA rank (default 8)")
    p.add_argument("--lora-alpha", type=flags.positive, metavar="A", help="LoRA alpha (default 16)")
    p.add_argument("--lora-dropout", type=flags.share, metavar="P", help="LoRA dropout (default 0)")
    p.add_argument(
        "--lora-targets",
        metavar="LIST",
        help="comma-separated layers: attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj (default all)",
    )
    p.add_argument(
        "--epochs", type=flags.positive_int, metavar="N", help="at most N epochs (default: from the data size)"
    )
    p.add_argument(
        "--lr",
        type=flags.positive,
        metavar="X",
        help="peak learning rate (default: from the model's width and the method)",
    )
    p.add_argument("--warmup", type=flags.count, metavar="N", help="warm-up steps (default: 5%% of the steps)")
    p.add_argument(
        "--batch-tokens", type=flags.positive_int, metavar="N", help="padded tokens per batch (default 8192)"
    )
    p.add_argument(
        "--max-batch-size", type=flags.positive_int, metavar="N", help="examples per batch (default: n/8, at most 32)"
    )
    p.add_argument(
        "--max-length", type=flags.positive_int, metavar="N", help="tokens per example (default: the context)"
    )
    p.add_argument(
        "--val-fraction",
        type=flags.share,
        metavar="F",
        help="held-out share of your examples (default 10%% from 100 examples on, none below)",
    )
    p.add_argument(
        "--replay",
        type=flags.count,
        metavar="N",
        help="examples of the base's own instruction data mixed into each epoch "
        "(default: 4 for each of yours; 0: none)",
    )
    p.add_argument(
        "--patience",
        type=flags.positive_int,
        metavar="N",
        help="validations without improvement before stopping (default 3)",
    )
    p.add_argument("--seed", type=flags.seed)
    p.add_argument("--name", help="the new model's name (default <base>-ft<run id>)")
    p.add_argument("--device", type=flags.device, default="auto", help="auto (default), cpu, cuda or mps")
    p.add_argument("--no-activate", action="store_true", help="do not make the new model active")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")


SFT_FLAGS = {
    "epochs": "epochs",
    "lr": "lr",
    "warmup": "warmup_steps",
    "batch_tokens": "batch_tokens",
    "max_batch_size": "max_batch_size",
    "max_length": "max_length",
    "val_fraction": "val_fraction",
    "patience": "patience",
    "seed": "seed",
    "replay": "replay",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a model on a snapshot or a dataset file (full or LoRA)",
        description="Instruction fine-tuning as a resumable run recorded in the store. Ctrl-C or "
        "SIGTERM saves a checkpoint; `kettle finetune resume RUN` continues it. "
        "Under `torchrun --nproc_per_node N -m tui.cli finetune ...` it uses DDP.",
    )
    _train_options(p)
    p.set_defaults(func=finetune_command, run_id=None)
    actions = p.add_subparsers(dest="finetune_action", metavar="ACTION")
    run = actions.add_parser("run", help="start a run (the same as `kettle finetune OPTIONS`)")
    _train_options(run)
    run.add_argument("--run-id", type=flags.record_id, metavar="N", help="execute an already created, queued run")
    run.set_defaults(func=finetune_command)
    resume = actions.add_parser("resume", help="continue a cancelled or failed run")
    resume.add_argument("run", type=flags.record_id, metavar="RUN")
    resume.add_argument("--no-progress", action="store_true")
    resume.set_defaults(func=resume_command)
    ls = actions.add_parser("list", help="fine-tuning runs, newest first")
    ls.set_defaults(func=list_command)
    cancel = actions.add_parser("cancel", help="stop a running run (it saves a checkpoint)")
    cancel.add_argument("run", type=flags.record_id, metavar="RUN")
    cancel.set_defaults(func=cancel_command)
    merge = actions.add_parser("merge", help="merge a LoRA adapter (Kettle's or PEFT's) into a full model directory")
    merge.add_argument("--base", required=True, metavar="M", help="the base model the adapter was trained on")
    merge.add_argument("--adapter", required=True, metavar="DIR")
    merge.add_argument("--out", required=True, metavar="DIR")
    merge.set_defaults(func=merge_command)

    c = sub.add_parser("classify", help="classification fine-tuning (train, eval, predict)")
    cs = c.add_subparsers(dest="classify_action", metavar="ACTION", required=True)
    t = cs.add_parser("train", help="train an N-class classifier on a CSV/TSV of text and label")
    t.add_argument("--model", required=True, metavar="M", help="base model (directory or name)")
    t.add_argument("--data", required=True, metavar="FILE", help="CSV or TSV of text and label")
    t.add_argument("--out", required=True, metavar="DIR", help="the classifier directory to write")
    t.add_argument(
        "--trainable",
        default="last-1",
        metavar="WHICH",
        help="head, last-N (last N blocks + final norm + head), all, or lora (default last-1)",
    )
    t.add_argument("--balance", action="store_true", help="downsample classes to the smallest")
    t.add_argument("--epochs", type=flags.positive_int, default=5)
    t.add_argument("--lr", type=flags.positive, default=5e-5)
    t.add_argument("--batch-size", type=flags.positive_int, default=8)
    t.add_argument("--max-length", type=flags.positive_int, metavar="N", help="tokens per text (default: the longest)")
    t.add_argument("--seed", type=flags.seed, default=123)
    t.add_argument("--device", type=flags.device, default="auto")
    t.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue the stopped training of --out from its checkpoint (same model, data and settings)",
    )
    t.set_defaults(func=classify_train_command)
    e = cs.add_parser("eval", help="accuracy and confusion matrix of a classifier on a labelled file")
    e.add_argument("classifier", metavar="DIR")
    e.add_argument("--data", required=True, metavar="FILE")
    e.add_argument("--device", type=flags.device, default="auto")
    e.set_defaults(func=classify_eval_command)
    pr = cs.add_parser("predict", help="label texts (arguments, or one per line on stdin)")
    pr.add_argument("classifier", metavar="DIR")
    pr.add_argument("texts", nargs="*", metavar="TEXT")
    pr.add_argument("--device", type=flags.device, default="auto")
    pr.set_defaults(func=classify_predict_command)


def _spec(args):
    from finetune.jobs import JobSpec
    from finetune.lora import TARGETS, LoRAConfig
    from gpt.errors import KettleError

    if not args.model:
        raise KettleError("--model is required (the base model to fine-tune)")
    sft = {field: getattr(args, flag) for flag, field in SFT_FLAGS.items() if getattr(args, flag) is not None}
    lora_flags = (args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets)
    if any(v is not None for v in lora_flags) and not args.lora:
        raise KettleError("--lora-rank/--lora-alpha/--lora-dropout/--lora-targets need --lora")
    if args.lora:
        defaults = LoRAConfig()
        sft["lora"] = LoRAConfig(
            rank=args.lora_rank or defaults.rank,
            alpha=args.lora_alpha if args.lora_alpha is not None else defaults.alpha,
            dropout=args.lora_dropout if args.lora_dropout is not None else defaults.dropout,
            targets=tuple(t.strip() for t in args.lora_targets.split(",")) if args.lora_targets else TARGETS,
        ).to_dict()
    return JobSpec(
        model=args.model,
        snapshot_id=args.snapshot,
        data=args.data,
        sft=sft,
        name=args.name,
        device=args.device,
        activate=not args.no_activate,
    )


def _check(spec) -> None:
    from data.store import open_store
    from finetune.jobs import check_spec

    with open_store() as store:
        check_spec(store, spec)


def finetune_command(args) -> int:
    import torch

    from data.store import open_store
    from finetune.jobs import create_run, execute
    from finetune.train import init_distributed

    if args.run_id is not None:
        run_id = args.run_id
    else:
        spec = _spec(args)
        _check(spec)  # on every rank: each one exits with the same one line
        dist, _ = init_distributed(spec.device)
        run_id = None
        if dist.main:
            with open_store() as store:
                run_id = create_run(store, spec).id
        if dist.enabled:  # every rank trains the run rank 0 created
            box = [run_id]
            torch.distributed.broadcast_object_list(box, src=0)
            run_id = box[0]
    return _report(execute(run_id, progress=not args.no_progress))


def resume_command(args) -> int:
    from finetune.jobs import execute

    return _report(execute(args.run, resume=True, progress=not args.no_progress))


def _report(run) -> int:
    from data.store import open_store
    from finetune.verdict import summary_lines

    if run.status == "cancelled":
        print(
            f"run {run.id} stopped at step {run.step}/{run.total_steps}; "
            f"continue it with `kettle finetune resume {run.id}`"
        )
        return 130
    if run.output_model_id is None:  # a DDP rank other than 0
        return 0
    with open_store() as store:
        version = store.model_version(run.output_model_id)
        active = store.active_model()
    print(f"run {run.id} finished: model {version.name} at {version.path}")
    for line in summary_lines(version.metrics):
        print(line)
    if version.status == "regressed":
        print("the new model regressed against its base: it was NOT made active")
    elif active is not None and active.id == version.id:
        print("it is now the active model")
    return 0


def list_command(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from data.store import open_store
    from finetune.jobs import RUN_KIND, reap_dead_runs

    with open_store() as store:
        reap_dead_runs(store)
        runs = [r for r in store.runs() if r.kind == RUN_KIND]
        table = Table("run", "status", "base", "step", "loss", "val loss", "model", "error")
        for r in runs:
            metrics = store.run_metrics(r.id)
            loss = next((m["loss"] for _, m in reversed(metrics) if "loss" in m), None)
            val = next((m["val_loss"] for _, m in reversed(metrics) if "val_loss" in m), None)
            out = store.model_version(r.output_model_id).name if r.output_model_id else ""
            table.add_row(
                str(r.id),
                r.status,
                r.config.get("spec", {}).get("model", ""),
                f"{r.step}/{r.total_steps or '?'}",
                "" if loss is None else f"{loss:.3f}",
                "" if val is None else f"{val:.3f}",
                out,
                r.error or "",
            )
    Console().print(table)
    return 0


def cancel_command(args) -> int:
    from data.store import open_store
    from finetune.jobs import cancel_run
    from gpt.errors import KettleError

    with open_store() as store:
        if not cancel_run(store, args.run):
            raise KettleError(f"run {args.run} is not running ({store.run(args.run).status})")
    print(f"asked run {args.run} to save a checkpoint and stop")
    return 0


def merge_command(args) -> int:
    from data.registry import resolve_model_dir
    from finetune.lora import merge_adapter

    out = merge_adapter(resolve_model_dir(args.base), args.adapter, out_dir=args.out)
    print(f"merged model written to {out}")
    return 0


# --- classification ------------------------------------------------------------------------------


def classify_train_command(args) -> int:
    import shutil
    from pathlib import Path

    from data.registry import resolve_model_dir
    from finetune.classify import (
        ClassifyConfig,
        class_counts,
        default_checkpoint_dir,
        format_confusion,
        read_labeled,
        save_classifier,
        train_classifier,
    )
    from finetune.train import CHECKPOINT_STATE, Display
    from gpt.checkpoint import load_model
    from gpt.device import pick_device
    from gpt.errors import KettleError
    from gpt.files import remove_stale_temporaries

    device = pick_device(args.device)
    examples = read_labeled(args.data)
    config = ClassifyConfig(
        trainable=args.trainable,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        max_length=args.max_length,
        balance=args.balance,
        seed=args.seed,
    )
    if Path(args.out).exists() and not args.overwrite:
        raise KettleError(f"{args.out}: already exists (choose another --out, or --overwrite)")
    # Only once every flag and the data are known good: a refused command changes nothing (no
    # run folder made under KETTLE_HOME/runs).
    checkpoint = default_checkpoint_dir(args.out)
    remove_stale_temporaries(checkpoint.parent)  # a killed checkpoint write's leftovers
    if args.resume and not (checkpoint / CHECKPOINT_STATE).exists():
        raise KettleError(f"--resume: no checkpoint for {args.out} (nothing to resume; start without --resume)")
    if not args.resume and checkpoint.exists():
        raise KettleError(
            f"{checkpoint.parent} holds the checkpoint of a stopped training of {args.out}: continue it "
            "with --resume, or delete that folder to start over"
        )
    model, tokenizer = load_model(resolve_model_dir(args.model), device=device)
    print(f"{len(examples)} examples: " + ", ".join(f"{k} {v}" for k, v in class_counts(examples).items()))
    display = None

    def on_step(step, total, loss):
        nonlocal display
        if display is None:
            display = Display(True, total, 0, "classifier")
        display.step(step, loss, tokens_per_s=0.0, mfu=None)

    try:
        clf, labels, max_length, metrics = train_classifier(
            model,
            tokenizer,
            examples=examples,
            config=config,
            device=device,
            on_step=on_step,
            checkpoint_dir=checkpoint,
            resume=args.resume,
        )
    finally:
        if display is not None:
            display.close()
    if metrics.get("interrupted"):
        print(
            f"stopped at step {metrics['step']} of {metrics['total_steps']}; checkpoint saved in {checkpoint}\n"
            "continue with the same command and --resume"
        )
        return 130
    for h in metrics["history"]:
        print(f"epoch {h['epoch']}: validation loss {h['val_loss']:.4f}, accuracy {h['val_accuracy']:.1%}")
    test = metrics["test"]
    print(f"test accuracy {test['accuracy']:.2%} on {test['n']} examples")
    print(format_confusion(test["confusion"], labels))
    save_classifier(
        clf,
        tokenizer,
        labels=labels,
        max_length=max_length,
        directory=args.out,
        config=config,
        metrics=metrics,
        overwrite=args.overwrite,
    )
    shutil.rmtree(checkpoint.parent, ignore_errors=True)  # kept until now: a failed save costs no training
    print(f"classifier saved to {args.out}")
    return 0


def classify_eval_command(args) -> int:
    from finetune.classify import encode, evaluate, format_confusion, load_classifier, read_labeled
    from gpt.device import pick_device

    device = pick_device(args.device)
    model, tokenizer, meta = load_classifier(args.classifier, device)
    labels = meta["labels"]
    encoded = encode(read_labeled(args.data), tokenizer, labels=labels, max_length=meta["max_length"])
    result = evaluate(model, encoded, n_classes=len(labels), device=device)
    print(f"accuracy {result['accuracy']:.2%} on {result['n']} examples (loss {result['loss']:.4f})")
    print(format_confusion(result["confusion"], labels))
    return 0


def classify_predict_command(args) -> int:
    import sys

    from finetune.classify import load_classifier, predict
    from gpt.device import pick_device
    from gpt.errors import KettleError

    texts = args.texts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise KettleError("no texts to classify (give them as arguments or on stdin)")
    device = pick_device(args.device)
    model, tokenizer, meta = load_classifier(args.classifier, device)
    for text, (label, prob) in zip(texts, predict(model, tokenizer, meta=meta, texts=texts, device=device)):
        print(f"{label}\t{prob:.3f}\t{text}")
    return 0
