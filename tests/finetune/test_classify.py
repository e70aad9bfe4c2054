"""Classification fine-tuning: reading CSV/TSV, balancing, training, saving, predicting."""

from __future__ import annotations

import random

import pytest
import torch

from finetune.classify import (
    ClassifyConfig,
    balance,
    class_counts,
    format_confusion,
    load_classifier,
    make_classifier,
    predict,
    read_labeled,
    save_classifier,
    train_classifier,
)
from gpt.checkpoint import load_model
from gpt.errors import KettleError


def test_tsv_keeps_stray_quotes_and_finds_the_label_column(tmp_path):
    # The SMS Spam Collection's shape: label first, a tab, raw text with unbalanced quotes.
    path = tmp_path / "sms"
    path.write_text('ham\t"Hi there\nspam\tWIN a "prize now\nham\tok "fine" then\n', encoding="utf-8")
    assert read_labeled(path) == [('"Hi there', "ham"), ('WIN a "prize now', "spam"), ('ok "fine" then', "ham")]


def test_csv_with_header_and_quoted_commas(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('label,text\npos,"good, really good"\nneg,bad\n', encoding="utf-8")
    assert read_labeled(path) == [("good, really good", "pos"), ("bad", "neg")]


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "empty file"),
        ("a,x\nb\n", "line 2 has 1 columns"),
        ("only,one\nmore,one\n", "only one label"),
        ("text,label\n,pos\nfine,neg\n", "line 2 has an empty text"),
    ],
)
def test_bad_label_files(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(KettleError, match=message):
        read_labeled(path)
    with pytest.raises(KettleError, match="no such file"):
        read_labeled(tmp_path / "missing.csv")


def test_balance_downsamples_to_the_smallest_class():
    data = [(f"t{i}", "ham") for i in range(30)] + [(f"s{i}", "spam") for i in range(7)]
    assert class_counts(balance(data, seed=1)) == {"ham": 7, "spam": 7}


def _toy_examples(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    words = "the a of painter house light wall picture morning".split()
    out = []
    for i in range(n):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 8)))
        if i % 2:
            out.append((text + " WIN a cash prize now", "spam"))
        else:
            out.append((text, "ham"))
    return out


@pytest.mark.parametrize("trainable", ["head", "last-1", "all", "lora"])
def test_trainable_layers(tiny_model_dir, trainable):
    model, _ = load_model(tiny_model_dir)
    clf = make_classifier(model, 2, config=ClassifyConfig(trainable=trainable))
    names = {n for n, p in clf.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias"} <= names
    if trainable == "head":
        assert names == {"head.weight", "head.bias"}
    elif trainable == "last-1":
        assert any(n.startswith("gpt.h.1.") for n in names) and "gpt.ln_f.weight" in names
        assert not any(n.startswith("gpt.h.0.") for n in names)
    elif trainable == "all":
        assert "gpt.wte.weight" in names
    else:
        assert all("lora_" in n or n.startswith("head.") for n in names)
    with pytest.raises(KettleError, match="--trainable"):
        make_classifier(load_model(tiny_model_dir)[0], 2, config=ClassifyConfig(trainable="last-9"))


def test_train_save_load_predict(tiny_model_dir, tmp_path):
    model, tokenizer = load_model(tiny_model_dir)
    torch.manual_seed(0)
    config = ClassifyConfig(trainable="all", epochs=3, lr=1e-3, batch_size=8)
    steps = []
    clf, labels, max_length, metrics = train_classifier(
        model, tokenizer, examples=_toy_examples(200), config=config, on_step=lambda s, t, loss: steps.append(s)
    )
    assert labels == ["ham", "spam"] and steps[-1] == len(steps)
    assert metrics["counts"] == {"train": 140, "val": 20, "test": 40}
    test = metrics["test"]
    assert test["n"] == 40 and sum(map(sum, test["confusion"])) == 40
    assert test["accuracy"] >= 0.9
    assert "true \\ pred" in format_confusion(test["confusion"], labels)

    out = save_classifier(
        clf, tokenizer, labels=labels, max_length=max_length, directory=tmp_path / "clf", config=config, metrics=metrics
    )
    loaded, tok2, meta = load_classifier(out)
    texts = ["the painter wall WIN a cash prize now", "the morning light"]
    before = predict(clf, tokenizer, meta=meta, texts=texts)
    after = predict(loaded, tok2, meta=meta, texts=texts)
    assert [label for label, _ in after] == ["spam", "ham"]
    assert after == pytest.approx(before)
    with pytest.raises(KettleError, match="already exists"):
        save_classifier(clf, tokenizer, labels=labels, max_length=max_length, directory=out)
    with pytest.raises(KettleError, match="not a Kettle classifier"):
        load_classifier(tiny_model_dir)


def _train(model_dir, epochs: int, **kwargs):
    model, tokenizer = load_model(model_dir)
    config = ClassifyConfig(trainable="all", epochs=epochs, lr=1e-3, batch_size=16)
    return train_classifier(model, tokenizer, examples=_toy_examples(120), config=config, **kwargs)


def _same_run(resumed, straight) -> None:
    (clf, _, _, metrics), (clf0, _, _, metrics0) = resumed, straight
    state, state0 = clf.state_dict(), clf0.state_dict()
    assert state.keys() == state0.keys()
    assert all(torch.equal(state[k], state0[k]) for k in state), "the weights differ from the unstopped run's"
    assert metrics["history"] == metrics0["history"] and len(metrics["history"]) == 2
    assert metrics["test"] == metrics0["test"]


def test_resume_after_an_epoch_gives_the_unstopped_run(make_model_dir, tmp_path):
    # Dropout draws from torch's generator every step: the checkpoint must restore it exactly.
    model_dir = make_model_dir("classify-dropout", dropout=0.2)
    straight = _train(model_dir, 2)
    ckpt = tmp_path / "checkpoint"
    first = _train(model_dir, 1, checkpoint_dir=ckpt)
    assert len(first[3]["history"]) == 1 and (ckpt / "state.json").is_file()
    _same_run(_train(model_dir, 2, checkpoint_dir=ckpt, resume=True), straight)


def test_ctrl_c_mid_epoch_checkpoints_and_resumes_exactly(make_model_dir, tmp_path):
    import os
    import signal

    model_dir = make_model_dir("classify-dropout", dropout=0.2)
    straight = _train(model_dir, 2)
    ckpt = tmp_path / "checkpoint"

    def ctrl_c(step, total, loss):
        if step == 7:  # an epoch is 6 steps (84 training examples in 16s): one into the second
            os.kill(os.getpid(), signal.SIGINT)

    stopped = _train(model_dir, 2, checkpoint_dir=ckpt, on_step=ctrl_c)[3]
    assert stopped["interrupted"] and stopped["step"] == 7 and "test" not in stopped
    assert len(stopped["history"]) == 1
    steps = []
    resumed = _train(model_dir, 2, checkpoint_dir=ckpt, resume=True, on_step=lambda s, t, loss: steps.append(s))
    assert steps == list(range(8, 13))
    _same_run(resumed, straight)
    with pytest.raises(KettleError, match="other data or settings"):
        model, tokenizer = load_model(model_dir)
        config = ClassifyConfig(trainable="all", epochs=2, lr=1e-4, batch_size=16)
        train_classifier(model, tokenizer, examples=_toy_examples(120), config=config, checkpoint_dir=ckpt, resume=True)
