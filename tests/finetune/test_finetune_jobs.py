"""Fine-tuning runs: store records, lineage, gate, card, cancel/resume, failures."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import pytest
import torch

from data.paths import models_dir, runs_dir
from finetune import allocator
from finetune.jobs import (
    CHECKPOINT_DIR,
    JobSpec,
    cancel_run,
    create_run,
    execute,
    reap_dead_runs,
    run_dir,
    start_finetune,
)
from gpt.checkpoint import load_model
from gpt.errors import KettleError
from tests.conftest import old_snapshot


def glibc() -> bool:
    return allocator.process_env({}).get("GLIBC_TUNABLES") == allocator.TUNABLE


TOPICS = [
    "kettle",
    "teapot",
    "mug",
    "stove",
    "spoon",
    "sugar",
    "milk",
    "lemon",
    "honey",
    "biscuit",
    "saucer",
    "tray",
    "napkin",
    "oven",
    "pan",
    "whisk",
    "ladle",
    "sieve",
    "grater",
    "jar",
]
# The mechanics of a run (records, lineage, card), fast: tests of what the defaults teach are in
# test_finetune_train.py and test_loop.py. A held-out share, as a user with many examples gets.
FAST = {"lr": 3e-3, "epochs": 5, "eval_every": 5, "val_fraction": 0.1}


@pytest.fixture
def base(tmp_path, make_model_dir, store):
    """A tiny random model, registered as the store's model version "base"."""
    path = make_model_dir(tmp_path / "base", context_length=64, n_embd=64)
    store.add_model_version("base", path, kind="pretrained")
    return path


def _snapshot(store, n=20) -> int:
    """n conversations whose answers the user corrected (the ideal answer is what trains)."""
    for i, topic in enumerate(TOPICS[:n]):
        conv = store.create_conversation()
        q = store.add_message(conv.id, "user", content=f"What is a {topic}?")
        a = store.add_message(conv.id, "assistant", content="I do not know.", parent_id=q.id)
        store.set_label(a.id, ideal=f"A {topic} is item number {i} in my kitchen.")
    return store.create_snapshot(name="corrections").id


def _run(store, spec: JobSpec, **kwargs):
    run = create_run(store, spec)
    return execute(run.id, progress=False, **kwargs)


def test_finished_run_registers_a_model_with_lineage_card_and_gate(store, base):
    snap = _snapshot(store)
    run = _run(store, JobSpec(model="base", snapshot_id=snap, sft=FAST))
    assert run.status == "finished" and run.step == run.total_steps > 0 and not run.error
    version = store.model_version(run.output_model_id)
    assert version.name == f"base-ft{run.id}" and version.kind == "finetuned"
    assert version.parent_id == store.model_version("base").id
    assert version.snapshot_id == snap and version.run_id == run.id
    assert version.hparams["mode"] == "full" and version.hparams["lr"] == 3e-3
    assert version.hparams["source"]["hash"] == store.snapshot(snap).content_hash
    m = version.metrics
    assert m["held_out"] == 2 and m["train"] == 18
    assert m["gate_new_loss"] < m["gate_parent_loss"] and m["gate"] == "passed"
    assert version.status == "ok" and store.active_model().id == version.id

    # What the app polls: progress rows with loss, speed and ETA, validation losses, the gate.
    rows = store.run_metrics(run.id)
    assert any({"loss", "tokens_per_s", "eta_s"} <= set(r) for _, r in rows)
    assert any("val_loss" in r for _, r in rows) and any("gate_new_loss" in r for _, r in rows)

    out = models_dir() / version.name
    assert str(out) == version.path
    card = (out / "card.md").read_text()
    assert (
        "| Verdict | regression gate: passed |" in card
        and "your corrections: " in card
        and store.snapshot(snap).content_hash[:16] in card
    )
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    model, _ = load_model(out)  # a complete model directory
    assert not (run_dir(run.id) / CHECKPOINT_DIR).exists()


def test_lora_run_keeps_its_adapter_beside_the_merged_model(store, base):
    from finetune.lora import load_adapter

    spec = JobSpec(
        model=str(base),
        snapshot_id=_snapshot(store),
        name="with-lora",
        sft={
            **FAST,
            "lr": 1e-2,
            "lora": {"rank": 4, "alpha": 8, "dropout": 0.0, "targets": ["attn.c_attn", "mlp.c_fc"]},
        },
    )
    run = _run(store, spec)
    version = store.model_version("with-lora")
    assert version.hparams["mode"] == "lora" and version.parent_id == store.model_version("base").id
    adapter = models_dir() / "with-lora" / "adapter"
    assert (adapter / "adapter.safetensors").stat().st_size < (base / "model.safetensors").stat().st_size / 4
    merged, _ = load_model(models_dir() / "with-lora")
    wrapped, _ = load_model(base)
    load_adapter(wrapped, adapter)
    ids = torch.randint(0, 512, (1, 16))
    torch.testing.assert_close(merged(ids), wrapped(ids), atol=1e-5, rtol=1e-5)
    assert run.status == "finished"


def test_a_worse_model_is_marked_and_not_activated(store, base):
    store.activate_model(store.model_version("base").id)
    # One huge step wrecks the model: it must be recorded, but never served automatically.
    spec = JobSpec(
        model="base",
        snapshot_id=_snapshot(store),
        sft={"lr": 0.5, "epochs": 1, "warmup_steps": 1, "eval_every": 1, "grad_clip": 0.0},
    )
    run = _run(store, spec)
    version = store.model_version(run.output_model_id)
    assert version.metrics["gate"] == "regressed" and version.status == "regressed"
    m = version.metrics  # few examples, none held out: the examples themselves show it
    assert m["gate_parent_loss"] is None and m["train_loss_after"] > m["train_loss_before"]
    assert "trained on worse" in " ".join(m["gate_reasons"])
    assert store.active_model().name == "base"


def test_sigterm_then_resume_reaches_the_uninterrupted_loss(store, base):
    snap = _snapshot(store)
    spec = dict(model="base", snapshot_id=snap, sft={**FAST, "epochs": 4})
    straight = _run(store, JobSpec(**spec))

    def terminate_at_step_7(p):
        if p.step == 7:
            os.kill(os.getpid(), signal.SIGTERM)

    stopped = _run(store, JobSpec(**spec), on_step=terminate_at_step_7)
    assert stopped.status == "cancelled" and stopped.step == 7
    assert (run_dir(stopped.id) / CHECKPOINT_DIR).exists() and stopped.output_model_id is None
    with pytest.raises(KettleError, match="resume it"):
        execute(stopped.id, progress=False)
    resumed = execute(stopped.id, resume=True, progress=False)
    assert resumed.status == "finished" and resumed.step == straight.step
    a = store.model_version(straight.output_model_id).metrics
    b = store.model_version(resumed.output_model_id).metrics
    assert b["last_loss"] == pytest.approx(a["last_loss"], rel=1e-6)
    assert b["gate_new_loss"] == pytest.approx(a["gate_new_loss"], rel=1e-6)
    losses_a = [r["loss"] for _, r in store.run_metrics(straight.id) if "loss" in r]
    assert losses_a  # the progress rows exist for both runs


def test_a_checkpoint_an_older_kettle_left_is_refused_in_one_line(store, base):
    run = create_run(store, JobSpec(model="base", snapshot_id=_snapshot(store)))
    store.update_run(run.id, status="cancelled")
    (run_dir(run.id) / "checkpoint.pt").write_bytes(b"an older Kettle's trainer state")
    with pytest.raises(KettleError, match=r"older Kettle \(checkpoint\.pt\).*start it again"):
        execute(run.id, resume=True, progress=False)
    assert store.run(run.id).status == "failed" and "\n" not in store.run(run.id).error


def _assert_failed(store, run_id, reason):
    run = store.run(run_id)
    assert run.status == "failed" and reason in run.error
    assert run.output_model_id is None
    assert [v.name for v in store.model_versions()] == ["base"]  # nothing half-registered
    assert not [p for p in models_dir().iterdir()]


def test_bad_inputs_fail_the_run_with_the_reason(store, base, tmp_path):
    empty = store.create_snapshot(name="empty").id
    cases = [
        (JobSpec(model="base", snapshot_id=empty), "dataset is empty"),
        (JobSpec(model="no-such-model", snapshot_id=empty), "no such model"),
    ]
    only_questions = tmp_path / "questions.jsonl"
    only_questions.write_text(json.dumps({"conversations": [{"from": "human", "value": "hi?"}]}) + "\n")
    cases.append((JobSpec(model="base", data=str(only_questions)), "line 1: 'conversations' has no assistant message"))
    with pytest.raises(KettleError, match="unknown fine-tuning settings: epoch"):
        create_run(store, JobSpec(model="base", snapshot_id=empty, sft={"epoch": 3}))
    for spec, reason in cases:
        run = create_run(store, spec)
        with pytest.raises(KettleError, match=reason):
            execute(run.id, progress=False)
        _assert_failed(store, run.id, reason)


def test_the_app_start_refuses_what_the_run_would_refuse_and_records_nothing(store, base):
    """start_finetune (the app's Ctrl+G) checks as `kettle finetune` does: a run that could only
    fail used to be recorded as failed, with its runs/finetune-N folder left behind."""
    snapshot = _snapshot(store)
    for sft, says in (
        ({"max_length": 1}, "longer than the context of 1 tokens"),
        ({"val_fraction": 0.99}, "no training examples left after holding out"),
        ({"lora": {"rank": 100000}}, "--lora-rank 100000 exceeds the model's width"),
    ):
        with pytest.raises(KettleError, match=says):
            start_finetune(JobSpec(model="base", snapshot_id=snapshot, sft=sft), store)
    assert store.runs() == [] and not runs_dir(create=False).exists()


def test_an_older_snapshot_holding_an_example_no_model_can_learn_from_trains_without_it(store, base):
    """A snapshot an older Kettle sealed with an answer before any question (issue 22, item 1):
    its export skips that example, but a fine-tune trained on an answer to nothing, and on an
    empty example refused the whole snapshot ("a training conversation needs at least one
    assistant message"), in the sheet's estimate too."""
    from finetune.jobs import check_spec, load_conversations
    from finetune.plan import make_plan

    good = store.snapshot_examples(_snapshot(store, n=4))
    examples = [*good, {"messages": [{"role": "assistant", "content": "Hello."}]}, {"messages": []}]
    sid = old_snapshot(store, examples)
    spec = JobSpec(model="base", snapshot_id=sid, sft=FAST)
    check_spec(store, spec)
    conversations, source = load_conversations(store, spec)
    assert conversations == [e["messages"] for e in good]
    assert source["skipped"] == {"starts with an answer, not a question": 1, "holds no messages": 1}
    assert make_plan(store, "base", snapshot_id=sid).n_examples == len(good)


def test_out_of_memory_fails_cleanly_and_resume_checks_the_vocabulary(store, base, tiny_gpt2_vocab_model_dir):
    spec = JobSpec(model=str(base), snapshot_id=_snapshot(store), sft=FAST)
    run = create_run(store, spec)

    def out_of_memory(p):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(KettleError, match="out of memory"):
        execute(run.id, progress=False, on_step=out_of_memory)
    _assert_failed(store, run.id, "out of memory")
    # The base directory now holds a model with GPT-2's vocabulary: the run's tokenised data no
    # longer fits it, and resuming says so instead of training on garbage.
    shutil.rmtree(base)
    shutil.copytree(tiny_gpt2_vocab_model_dir, base)
    with pytest.raises(KettleError, match="another vocabulary"):
        execute(run.id, resume=True, progress=False)
    _assert_failed(store, run.id, "another vocabulary")


def test_separate_process_records_progress_and_stops_on_cancel(store, base):
    spec = JobSpec(
        model="base",
        snapshot_id=_snapshot(store),
        device="cpu",
        sft={"lr": 3e-3, "epochs": 400, "val_fraction": 0.0, "until_learned": False},
    )  # trains all 400 epochs unless cancelled: one that learns early may be past its loop when cancelled
    run_id = start_finetune(spec, store)
    deadline = time.monotonic() + 60
    while store.run(run_id).step < 3:
        assert time.monotonic() < deadline, open(store.run(run_id).log_path).read()
        assert store.run(run_id).status in ("queued", "running"), open(store.run(run_id).log_path).read()
        time.sleep(0.1)
    run = store.run(run_id)
    assert run.status == "running" and run.pid and run.total_steps % 400 == 0  # 400 epochs
    if glibc():  # it started with the allocator setting that keeps a training step's memory down
        assert allocator.TUNABLE.encode() in open(f"/proc/{run.pid}/environ", "rb").read()
    assert cancel_run(store, run_id)
    while store.run(run_id).status == "running":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    run = store.run(run_id)
    assert run.status == "cancelled" and 3 <= run.step < run.total_steps
    assert (run_dir(run_id) / CHECKPOINT_DIR).exists()


def test_a_run_whose_process_died_is_marked_failed(store, base):
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    run = create_run(store, JobSpec(model="base", snapshot_id=_snapshot(store, 3)))
    store.update_run(run.id, status="running", pid=gone.pid)
    assert reap_dead_runs(store) == [run.id]
    assert store.run(run.id).status == "failed" and "killed" in store.run(run.id).error
    assert not cancel_run(store, run.id)


def test_the_gate_reads_answers_to_the_bases_own_questions(store, tmp_path, make_model_dir):
    """A base taught its own questions, fine-tuned hard on one correction whose answer loops, with
    none of its own examples replayed: the correction takes over its other answers. The losses
    alone would not name them; the probe counts the loops, leaks and lost answers, and the gate's
    reasons name the questions and what the model now answers."""
    from finetune.instruct import SFTConfig, SFTTrainer, prepare, resolve
    from finetune.replay import REPLAY_FILE, replay_text
    from gpt.checkpoint import save_model

    def qa(question, answer):
        return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]

    taught = [qa(f"What is a {t}?", f"A {t} is item number {i} in my kitchen.") for i, t in enumerate(TOPICS[:8])]
    unseen = [qa(f"What is a {t}?", f"A {t} is item number {i + 8} in my kitchen.") for i, t in enumerate(TOPICS[8:12])]
    path = make_model_dir(tmp_path / "taught", context_length=64, n_embd=64)
    model, tokenizer = load_model(path)
    examples, _ = prepare(taught, tokenizer, max_length=64, vocab_size=512)
    config = resolve(SFTConfig(lr=3e-3), len(examples), model=model.config)
    assert SFTTrainer(model, examples, [], config, pad_id=tokenizer.eot_id).run()
    # Its taught questions in the held-out split: a fine-tune trains the replay's training split
    # (and those most like its corrections, finetune.lessons) and keeps those answers.
    save_model(model, path, tokenizer=tokenizer, overwrite=True, extra_files={REPLAY_FILE: replay_text(unseen, taught)})
    store.add_model_version("taught", path, kind="pretrained")

    conv = store.create_conversation()
    q = store.add_message(conv.id, "user", content="What is a tuple?")
    a = store.add_message(conv.id, "assistant", content="I do not know.", parent_id=q.id)
    store.set_label(a.id, ideal="A tuple is a tuple is a tuple is a tuple.")
    snap = store.create_snapshot(name="one").id
    run = _run(store, JobSpec(model="taught", snapshot_id=snap, sft={"replay": 0, "lr": 1e-2}))
    m = store.model_version(run.output_model_id).metrics
    p = m["probe"]
    assert m["recall"] == 1 and p["questions"] == 12 and p["right_before"] >= 6
    assert p["loops_after"] > p["loops_before"] and p["leaks"] >= 1 and p["lost"] >= 2
    assert m["gate"] == "regressed"
    for kind, says in (("loops", "loop"), ("leaks", "leaks into"), ("lost", "lost answers")):
        question = next(iter(p["examples"][kind]))
        reason = next(r for r in m["gate_reasons"] if says in r)
        assert f"{question!r} -> " in reason and "a tuple is a tuple" in reason.lower()
    card = (models_dir() / f"taught-ft{run.id}" / "card.md").read_text()
    assert f"unrelated answers: loops {p['loops_before']} -> {p['loops_after']}, leaks {p['leaks']}" in card
