"""`kettle finetune` and `kettle classify` from the command line."""

from __future__ import annotations

import json
import random

from data.paths import runs_dir
from data.store import open_store
from tui.cli import main


def _alpaca(path, n=12):
    path.write_text(
        json.dumps([{"instruction": f"Say {i}.", "input": "", "output": f"{i} it is."} for i in range(n)]),
        encoding="utf-8",
    )
    return path


def test_finetune_command_runs_and_reports(tiny_model_dir, tmp_path, capsys):
    data = _alpaca(tmp_path / "data.json")
    code = main(
        [
            "finetune",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(data),
            "--epochs",
            "1",
            "--lora",
            "--lora-rank",
            "2",
            "--name",
            "cli-model",
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "run 1 finished: model cli-model" in out and "gate" in out
    with open_store() as store:
        version = store.model_version("cli-model")
        assert version.hparams["lora"]["rank"] == 2 and version.hparams["epochs"] == 1
    assert main(["finetune", "list"]) == 0
    assert "cli-model" in capsys.readouterr().out


def test_finetune_command_errors_are_one_line(tiny_model_dir, tmp_path, capsys):
    data = _alpaca(tmp_path / "data.json")
    cases = [
        (["finetune", "--data", str(data)], "--model is required"),
        (["finetune", "--model", str(tiny_model_dir)], "exactly one of --snapshot ID or --data FILE"),
        (["finetune", "--model", str(tiny_model_dir), "--data", str(data), "--lora-rank", "4"], "need --lora"),
        (["finetune", "--model", str(tiny_model_dir), "--snapshot", "99"], "no dataset snapshot with id 99"),
        (["finetune", "--model", "nope", "--data", str(data)], "nope: no such model"),
        (["finetune", "resume", "7"], "no training run with id 7"),
        (["finetune", "cancel", "1"], "no training run with id 1"),  # the cases above left none
    ]
    for argv, message in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("kettle: error: ") and message in err and err.count("\n") == 1, err


def test_classify_train_eval_predict(tiny_model_dir, tmp_path, capsys):
    rng = random.Random(0)
    words = "the a of painter house light wall picture morning".split()
    lines = []
    for i in range(120):
        text = " ".join(rng.choice(words) for _ in range(5))
        lines.append(f"spam\t{text} WIN cash now" if i % 2 else f"ham\t{text}")
    data = tmp_path / "sms.tsv"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out_dir = tmp_path / "clf"
    assert (
        main(
            [
                "classify",
                "train",
                "--model",
                str(tiny_model_dir),
                "--data",
                str(data),
                "--out",
                str(out_dir),
                "--trainable",
                "all",
                "--lr",
                "1e-3",
                "--epochs",
                "3",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "test accuracy" in out and "true \\ pred" in out and out_dir.is_dir()
    assert main(["classify", "eval", str(out_dir), "--data", str(data), "--device", "cpu"]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert main(["classify", "predict", str(out_dir), "house WIN cash now", "--device", "cpu"]) == 0
    label, prob, text = capsys.readouterr().out.strip().split("\t")
    assert label == "spam" and 0.5 < float(prob) <= 1 and text == "house WIN cash now"
    assert main(["classify", "train", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out_dir)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert not list(runs_dir().glob("classify-*")), "a finished training keeps no checkpoint"


def _sms(path, n=60):
    rng = random.Random(0)
    words = "the a of painter house light wall picture morning".split()
    lines = [
        f"spam\t{' '.join(rng.choice(words) for _ in range(5))} WIN cash now"
        if i % 2
        else f"ham\t{' '.join(rng.choice(words) for _ in range(5))}"
        for i in range(n)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_classify_resume(tiny_model_dir, tmp_path, capsys):
    from finetune.classify import ClassifyConfig, default_checkpoint_dir, read_labeled, train_classifier
    from gpt.checkpoint import load_model

    data, out_dir = _sms(tmp_path / "sms.tsv"), tmp_path / "clf"
    argv = ["classify", "train", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out_dir)]
    argv += ["--trainable", "all", "--device", "cpu", "--epochs", "2"]
    assert main([*argv, "--resume"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kettle: error: --resume: no checkpoint for ") and err.count("\n") == 1, err
    assert not out_dir.exists()

    # What a training stopped after its first epoch left (the CLI's settings, one epoch).
    checkpoint = default_checkpoint_dir(out_dir)
    model, tokenizer = load_model(tiny_model_dir)
    config = ClassifyConfig(trainable="all", epochs=1)
    train_classifier(model, tokenizer, examples=read_labeled(data), config=config, checkpoint_dir=checkpoint)
    assert main(argv) == 1
    assert "--resume, or delete that folder" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "epoch 1:" in out and "epoch 2:" in out and out_dir.is_dir()
    assert not checkpoint.parent.exists()
