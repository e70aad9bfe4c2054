"""`kettle import-hf`, `kettle export-hf`, `kettle export-gguf`, `kettle download`: getting models in and out."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import-hf", help="convert a Hugging Face GPT-2 directory into a Kettle model")
    p.add_argument("hf_dir", metavar="HF_DIR")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    p.set_defaults(func=import_hf_command)

    p = sub.add_parser("export-hf", help="write a Kettle model as a Hugging Face GPT-2 directory")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    p.set_defaults(func=export_hf_command)

    p = sub.add_parser("export-gguf", help="write a Kettle model as a GGUF file for llama.cpp, Ollama, LM Studio")
    p.add_argument("model_dir", metavar="MODEL")
    p.add_argument("out", metavar="OUT", help="the .gguf file; an Ollama Modelfile is written beside it")
    p.add_argument("--type", choices=["f32", "f16", "q8_0"], default="f16", help="weight type (default: f16)")
    p.add_argument("--force", action="store_true", help="replace OUT and its Modelfile if they exist")
    p.set_defaults(func=export_gguf_command)

    p = sub.add_parser("download", help="download a published GPT-2 checkpoint and convert it")
    p.add_argument("size", choices=["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"])
    p.add_argument("--out", metavar="DIR", help="model directory (default: KETTLE_HOME/models/SIZE)")
    p.add_argument("--force", action="store_true", help="replace the model directory if it exists")
    p.set_defaults(func=download_command)


def import_hf_command(args) -> int:
    from gpt.hf import import_hf

    out = import_hf(args.hf_dir, args.out_dir, overwrite=args.force)
    print(f"imported {args.hf_dir} -> {out}")
    announce_registration(out, "imported")
    return 0


def export_hf_command(args) -> int:
    from data.registry import resolve_model_dir
    from gpt.hf import export_hf

    out = export_hf(resolve_model_dir(args.model_dir), args.out_dir, overwrite=args.force)
    print(f"exported {args.model_dir} -> {out}")
    return 0


def export_gguf_command(args) -> int:
    from data.registry import resolve_model_dir
    from gpt.gguf_export import MODELFILE, export_gguf

    out = export_gguf(resolve_model_dir(args.model_dir), args.out, weights=args.type, overwrite=args.force)
    print(f"exported {args.model_dir} -> {out} ({args.type}), with {out.parent / MODELFILE} for `ollama create`")
    return 0


def download_command(args) -> int:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    from data.paths import models_dir
    from gpt.download import download_gpt2

    out = Path(args.out) if args.out else models_dir() / args.size
    with Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn()
    ) as progress:

        def progress_factory(name):
            task = progress.add_task(name, total=None)
            return lambda done, total: progress.update(task, completed=done, total=total)

        download_gpt2(args.size, out, progress_factory=progress_factory, overwrite=args.force)
    print(f"downloaded {args.size} -> {out}")
    announce_registration(out, "downloaded")
    return 0


def announce_registration(path: Path, kind: str) -> None:
    """Record the new model in the store, so the app lists it (and uses it when it has none)."""
    from data.store import open_store

    with open_store() as store:
        version, activated = store.register_model(path, kind)
    print(f"registered as model {version.name!r}" + (" (now the active model)" if activated else ""))
