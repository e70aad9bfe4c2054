"""Instruction data: the loss mask, the over-long rule, length-bucketed batches, bad data."""

from __future__ import annotations

import json
import random

import pytest

from finetune.instruct import (
    IGNORE,
    Example,
    SFTConfig,
    collate,
    default_val_fraction,
    encode_conversation,
    holdout,
    make_batches,
    padding_waste,
    prepare,
    resolve,
)
from gpt.config import GPTConfig
from gpt.errors import KettleError
from gpt.tokenizer import gpt2_tokenizer

CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is a kettle?"},
    {"role": "assistant", "content": "A pot that boils water."},
    {"role": "user", "content": "And a teapot?"},
    {"role": "assistant", "content": "A pot that brews tea: it never boils."},
]


def _labelled_runs(example: Example) -> list[list[int]]:
    """Contiguous runs of the targets that count in the loss."""
    runs, current = [], []
    for t in example.labels:
        if t == IGNORE:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(t)
    return runs + ([current] if current else [])


@pytest.mark.parametrize("which", ["trained", "gpt2"])
def test_loss_mask_covers_exactly_assistant_text_and_end_of_turn(which, trained_tokenizer):
    tokenizer = trained_tokenizer if which == "trained" else gpt2_tokenizer()
    end = "<|end|>" if which == "trained" else "<|endoftext|>"
    example = encode_conversation(CONVERSATION, tokenizer, max_length=1000)
    # Targets are the inputs shifted by one.
    full = example.input_ids + [example.labels[-1]]
    assert all(t == IGNORE or t == full[i + 1] for i, t in enumerate(example.labels))
    runs = [tokenizer.decode(run) for run in _labelled_runs(example)]
    assert runs == [m["content"] + end for m in CONVERSATION if m["role"] == "assistant"]
    # Nothing of the system or user text, nor any header, is learned.
    learned = "".join(runs)
    for m in CONVERSATION:
        if m["role"] != "assistant":
            assert m["content"] not in learned
    assert "Assistant" not in learned and "<|assistant|>" not in learned


def test_over_long_conversations_drop_oldest_exchanges_then_skip(trained_tokenizer):
    full = encode_conversation(CONVERSATION, trained_tokenizer, max_length=1000)
    cut = encode_conversation(CONVERSATION, trained_tokenizer, max_length=len(full) - 1)
    runs = [trained_tokenizer.decode(r) for r in _labelled_runs(cut)]
    assert runs == ["A pot that brews tea: it never boils.<|end|>"]
    assert trained_tokenizer.decode(cut.input_ids).startswith("<|system|>You answer briefly.<|end|><|user|>And")
    assert encode_conversation(CONVERSATION, trained_tokenizer, max_length=8) is None

    short = encode_conversation(CONVERSATION[:3], trained_tokenizer, max_length=1000)
    assert len(short) < len(cut)
    examples, stats = prepare(
        [CONVERSATION, CONVERSATION[:3]], trained_tokenizer, max_length=len(short), vocab_size=512
    )
    assert stats["skipped_too_long"] == 1 and stats["examples"] == 1


def test_bad_data_is_refused_with_a_clear_message(trained_tokenizer):
    with pytest.raises(KettleError, match="empty"):
        prepare([], trained_tokenizer, max_length=100, vocab_size=512)
    no_answer = [{"role": "user", "content": "hello?"}]
    with pytest.raises(KettleError, match="example 2: .*assistant"):
        prepare([CONVERSATION, no_answer], trained_tokenizer, max_length=1000, vocab_size=512)
    # Text tokenised with GPT-2's vocabulary does not fit a 512-token model.
    with pytest.raises(KettleError, match="another vocabulary"):
        prepare([CONVERSATION], gpt2_tokenizer(), max_length=1000, vocab_size=512)
    with pytest.raises(KettleError, match="longer than the context"):
        prepare([CONVERSATION], trained_tokenizer, max_length=5, vocab_size=512)


def test_length_bucketing_wastes_little_padding(trained_tokenizer):
    from conftest import SHARED_DATA

    entries = json.loads((SHARED_DATA / "instruction-data.json").read_text())
    conversations = [
        [
            {"role": "user", "content": e["instruction"] + "\n" + e["input"]},
            {"role": "assistant", "content": e["output"]},
        ]
        for e in entries
    ]
    examples, _ = prepare(conversations, trained_tokenizer, max_length=512, vocab_size=512)
    batches = make_batches(examples, batch_tokens=4096, max_batch_size=32, seed=1)
    assert sorted(id(e) for b in batches for e in b) == sorted(id(e) for e in examples)
    assert padding_waste(batches) < 0.15
    shuffled = list(examples)
    random.Random(0).shuffle(shuffled)
    random_batches = [shuffled[i : i + 32] for i in range(0, len(shuffled), 32)]
    assert padding_waste(random_batches) > 0.3  # what bucketing saves
    ids, labels = collate(batches[0], pad_id=0)
    assert ids.shape == labels.shape and ids.shape[1] == max(len(e) for e in batches[0])
    assert max(b_len * max(len(e) for e in b) for b, b_len in ((b, len(b)) for b in batches)) <= 4096 or any(
        len(b) == 1 for b in batches
    )


def test_defaults_follow_the_model_and_the_dataset():
    from finetune.lora import LoRAConfig
    from gpt.config import get_preset

    starter = GPTConfig(vocab_size=4096, context_length=256, n_layer=4, n_head=4, n_embd=128)
    gpt2 = get_preset("gpt2")
    small = resolve(SFTConfig(), n_train=20, model=starter)
    large = resolve(SFTConfig(), n_train=20_000, model=starter)
    assert small.epochs > large.epochs >= 2
    assert small.max_batch_size < large.max_batch_size
    assert 1 <= small.warmup_steps < large.warmup_steps <= 100
    # Small models take much larger rates; LoRA a larger one than full fine-tuning.
    assert resolve(SFTConfig(), 20, model=starter).lr == pytest.approx(6 * resolve(SFTConfig(), 20, model=gpt2).lr)
    assert resolve(SFTConfig(), 20, model=gpt2).lr < resolve(SFTConfig(lora=LoRAConfig()), 20, model=gpt2).lr
    # Replay each epoch: 4 of the base's examples per user example, LoRA too (with 1, one
    # correction cost the starter a third of its right answers); none without.
    assert resolve(SFTConfig(), 20, model=starter, n_replay=1500).replay == 80
    assert resolve(SFTConfig(lora=LoRAConfig()), 20, model=starter, n_replay=1500).replay == 80
    assert resolve(SFTConfig(), 20, model=starter, n_replay=5).replay == 5
    # A first correction or two still get a floor of the base's own examples beside them.
    assert resolve(SFTConfig(), 1, model=starter, n_replay=1500).replay == 32
    assert resolve(SFTConfig(lora=LoRAConfig()), 2, model=starter, n_replay=1500).replay == 32
    assert resolve(SFTConfig(), 1, model=starter, n_replay=10).replay == 10
    assert resolve(SFTConfig(), 20, model=starter).replay == 0
    assert resolve(SFTConfig(replay=0), 20, model=starter, n_replay=1500).replay == 0
    # Few examples are all trained on (each is a correction the user wants back).
    assert default_val_fraction(5) == 0 == default_val_fraction(99)
    assert round(default_val_fraction(200) * 200) == 20
    assert round(default_val_fraction(20_000) * 20_000) == 500
    train, val = holdout(list(range(200)), default_val_fraction(200), seed=3)
    assert len(val) == 20 and sorted(train + val) == list(range(200))
    with pytest.raises(KettleError, match="context length"):
        resolve(SFTConfig(max_length=999), 20, model=starter)


def test_weight_zero_answers_are_context_only(trained_tokenizer):
    weighted = [dict(m) for m in CONVERSATION]
    weighted[2]["weight"] = 0  # an earlier answer that was not chosen
    example = encode_conversation(weighted, trained_tokenizer, max_length=1000)
    runs = [trained_tokenizer.decode(r) for r in _labelled_runs(example)]
    assert runs == ["A pot that brews tea: it never boils.<|end|>"]
    weighted[4]["weight"] = 0
    with pytest.raises(KettleError, match="weight 0"):
        encode_conversation(weighted, trained_tokenizer, max_length=1000)
