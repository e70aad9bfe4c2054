"""Long fine-tuning runs on the real datasets (`./run-tests --slow`)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import ROOT, SHARED_DATA

pytestmark = pytest.mark.slow


def test_instruction_data_validation_loss_falls_steadily(tmp_path):
    from finetune.instruct import SFTConfig, SFTTrainer, holdout, prepare, resolve
    from gpt.config import GPTConfig
    from gpt.model import GPT
    from gpt.tokenizer import train_tokenizer

    entries = json.loads((SHARED_DATA / "instruction-data.json").read_text(encoding="utf-8"))
    conversations = [
        [
            {"role": "user", "content": e["instruction"] + (f"\n\n{e['input']}" if e["input"] else "")},
            {"role": "assistant", "content": e["output"]},
        ]
        for e in entries
    ]
    tokenizer = train_tokenizer([m["content"] for c in conversations for m in c], vocab_size=2048)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=2048, context_length=256, n_layer=4, n_head=4, n_embd=128))
    examples, stats = prepare(conversations, tokenizer, max_length=256, vocab_size=2048)
    train, val = holdout(examples, 0.1, seed=0)
    config = resolve(
        SFTConfig(lr=1e-3, epochs=4, eval_every=20, patience=3, until_learned=False), len(train), model=model.config
    )
    trainer = SFTTrainer(model, train, val, config, tokenizer.eot_id)
    trainer.run()
    vals = [h["val_loss"] for h in trainer.history if "val_loss" in h]
    print("validation losses:", [round(v, 3) for v in vals])
    # Measured: 6.23, 5.64, 5.38, 5.18, 5.09, 5.05, 5.05 (990 training examples, 4 epochs).
    assert len(vals) >= 6
    assert vals[-1] < vals[0] - 1.0
    # Steadily: every validation is lower than the one before, within a small wobble.
    assert all(b < a + 0.05 for a, b in zip(vals, vals[1:]))


def test_sms_spam_classifier_on_a_model_pretrained_here(tmp_path):
    """The book's chapter 6 on a small model pretrained here (on the SMS texts themselves, no
    labels), balanced classes, 70/10/20 split: the test accuracy must reach 90%."""
    from finetune.classify import ClassifyConfig, read_labeled, train_classifier
    from finetune.pretrain import TrainConfig, pretrain
    from gpt.checkpoint import load_model
    from gpt.config import GPTConfig

    rows = read_labeled(SHARED_DATA / "SMSSpamCollection")
    assert len(rows) == 5574 and {label for _, label in rows} == {"ham", "spam"}
    corpus = tmp_path / "sms.jsonl"
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text, _ in rows), encoding="utf-8")
    config = GPTConfig(vocab_size=1024, context_length=128, n_layer=2, n_head=2, n_embd=128)
    result = pretrain(
        corpus,
        tmp_path / "base",
        config=config,
        cfg=TrainConfig(
            max_steps=150,
            batch_tokens=4096,
            micro_batch_size=16,
            lr=2e-3,
            warmup_steps=10,
            eval_every=50,
            sample_every=0,
            checkpoint_every=1000,
        ),
        run_dir=tmp_path / "run",
        progress=False,
        register=False,
    )
    assert result.val_loss < result.initial_val_loss
    model, tokenizer = load_model(tmp_path / "base")
    _, labels, _, metrics = train_classifier(
        model,
        tokenizer,
        examples=rows,
        config=ClassifyConfig(trainable="all", epochs=5, lr=5e-4, batch_size=8, balance=True),
    )
    test = metrics["test"]
    print(
        f"pretrained val loss {result.initial_val_loss:.2f} -> {result.val_loss:.2f}; "
        f"SMS spam test accuracy {test['accuracy']:.2%} on {test['n']}, confusion {test['confusion']}"
    )
    # Measured: 97.3% (confusion [[152, 4], [4, 140]]) after 150 pretraining steps.
    assert metrics["counts"]["test"] == 300 and labels == ["ham", "spam"]
    assert test["accuracy"] >= 0.90


def test_torchrun_fine_tunes_with_ddp(tiny_model_dir, tmp_path):
    import os
    import subprocess
    import sys

    from data.store import open_store

    data = tmp_path / "data.json"
    data.write_text(
        json.dumps([{"instruction": f"Say {i}.", "input": "", "output": f"{i} it is."} for i in range(40)]),
        encoding="utf-8",
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    finetune = ["-m", "tui.cli", "finetune", "--model", str(tiny_model_dir), "--data", str(data), "--epochs", "2"]
    finetune += ["--no-progress", "--device", "cpu"]
    for launch, name in ((torchrun, "ddp"), ([sys.executable], "alone")):
        proc = subprocess.run(
            launch + finetune + ["--name", name],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            cwd=str(ROOT),
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"finished: model {name}" in proc.stdout
    with open_store() as store:
        ddp, alone = sorted(store.runs(), key=lambda r: r.id)
        assert ddp.status == alone.status == "finished"
        # each rank takes every other batch of an epoch (the examples: 40 and their other forms,
        # finetune.lessons), so two ranks take half the steps of one process, rounded up
        assert ddp.total_steps == 2 * math.ceil(alone.total_steps / 2 / 2)
        assert store.model_version("ddp").metrics["gate"] in ("passed", "regressed")
