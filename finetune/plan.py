"""What the fine-tune sheet plans before Start: the base model and its data, the method (LoRA
or full fine-tuning) and an estimate of the time the run would take.

Plain functions over the store, with no Textual: tui.screens.finetune shows the plan, the run
itself is finetune.jobs's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from data.records import DataFilter, ModelVersion, Snapshot
from data.store import Store
from gpt.config import GPTConfig
from gpt.errors import KettleError

# Rough sustained training throughput (FLOP/s) for the time estimate; the run reports the truth.
TRAIN_FLOPS = {"cpu": 2e10, "mps": 2e12, "cuda": 3e13}
START_S = 15.0  # a new process: imports, loading the model, the first evaluation
STEP_OVERHEAD_S = 0.2  # optimizer step, logging, evaluations, spread over the steps
# Full fine-tuning keeps weights, gradients and two Adam moments: above these sizes LoRA is the
# default (it trains ~1% of the weights and saves a small adapter).
FULL_MAX_PARAMS = {"cpu": 200e6, "mps": 400e6, "cuda": 1.5e9}


@dataclass
class Plan:
    """What the sheet shows before Start."""

    base: ModelVersion
    versions: list[ModelVersion]
    snapshots: list[Snapshot]
    snapshot: Snapshot | None  # the data: a snapshot, or None for the current labels
    n_examples: int
    n_params: int
    device: str
    method: str  # "lora" | "full"
    train_tokens: int  # tokens in one pass over the examples
    config: GPTConfig  # the base's shape (the fine-tuning defaults follow it)
    n_replay: int  # the base's own instruction examples that can be mixed in (replay)
    n_lessons: int = 0  # the corrections its lineage learned (trained again: finetune.lessons)


def default_method(n_params: int, device: str) -> str:
    """LoRA for a model too big to fine-tune in full on this kind of device, else full."""
    return "lora" if n_params > FULL_MAX_PARAMS[device] else "full"


def estimate_seconds(plan: Plan, method: str, *, epochs: int | None) -> tuple[float, int]:
    """(seconds, optimizer steps) for the run the sheet would start, from the fine-tuning
    defaults (finetune.instruct.resolve) and a rough device speed."""
    from finetune.instruct import SFTConfig, resolve
    from finetune.lessons import CONTRASTS, FORMS, NEIGHBOURS, OPENERS
    from finetune.lora import LoRAConfig

    n = max(1, plan.n_examples + plan.n_lessons)
    # every lesson in its other forms too, and what keeps it to its question (finetune.lessons)
    kept = (NEIGHBOURS + CONTRASTS) * n + len(OPENERS) if plan.n_replay else len(OPENERS)
    config = resolve(
        SFTConfig(epochs=epochs, lora=LoRAConfig() if method == "lora" else None),
        n,
        model=plan.config,
        n_replay=plan.n_replay,
        n_variants=FORMS * n + kept,
    )
    n += FORMS * n + kept
    steps = config.epochs * math.ceil(n / config.max_batch_size)  # replay rides in the batches
    # forward + backward = 6 FLOPs per parameter per token (LoRA still runs the full backward
    # through the activations, so it saves memory more than time: count it as 2/3); small
    # models are bound by the per-step overhead instead; plus starting the process. Replay
    # examples are counted as long as the user's.
    tokens = plan.train_tokens / max(1, plan.n_examples) * (n + config.replay)
    flops = 6 * plan.n_params * tokens * config.epochs * (2 / 3 if method == "lora" else 1)
    return START_S + steps * STEP_OVERHEAD_S + flops / TRAIN_FLOPS[plan.device], steps


def make_plan(store: Store, base_name: str | None, *, snapshot_id: int | None = None) -> Plan:
    """The plan for fine-tuning `base_name` (default: the active model) on snapshot
    `snapshot_id` (default: the labels as they are now), on the device a run would pick."""
    from finetune.lessons import read_lessons
    from finetune.replay import read_replay
    from gpt.chat_template import render_training
    from gpt.checkpoint import expected_tensors, read_meta
    from gpt.device import pick_device
    from gpt.tokenizer import load_tokenizer

    versions = store.model_versions()
    if not versions:
        raise KettleError("there is no model to fine-tune yet (F4: models)")
    active = store.active_model()
    base = next((v for v in versions if v.name == base_name), None) or active or versions[0]
    _, config = read_meta(base.path)
    n_params = sum(math.prod(shape) for shape in expected_tensors(config).values())
    snapshot = store.snapshot(snapshot_id) if snapshot_id is not None else None
    if snapshot is None:
        conversations = [e["example"]["messages"] for e in store.dataset(DataFilter())[0]]
    else:
        from collections import Counter

        from data.formats import learnable

        examples = learnable(store.snapshot_examples(snapshot.id), lambda e: e["messages"], "", Counter())
        conversations = [e["messages"] for e in examples]  # as the run takes them (jobs.load_conversations)
    tokenizer = load_tokenizer(base.path)
    tokens = sum(min(len(render_training(messages, tokenizer)[0]), config.context_length) for messages in conversations)
    device = pick_device().type
    replay = read_replay(base.path)
    return Plan(
        base,
        versions,
        store.snapshots(),
        snapshot,
        len(conversations),
        n_params,
        device,
        default_method(n_params, device),
        tokens,
        config,
        len(replay["train"]) if replay else 0,
        len(read_lessons(base.path)),
    )
