"""Instruction fine-tuning end to end on a tiny model: it learns 20 corrected answers and stops."""

from __future__ import annotations

import pytest
import torch

from finetune.instruct import SFTConfig, SFTTrainer, evaluate_loss, prepare, recalled, resolve
from finetune.lora import LoRAConfig, lora_layers, merge_lora
from gpt.config import GPTConfig
from gpt.engine import Engine
from gpt.model import GPT
from gpt.sampling import SamplingParams

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
# Twenty answers a user corrected: each one arbitrary, so only training can produce it.
CORRECTED = [
    [
        {"role": "user", "content": f"What is a {t}?"},
        {"role": "assistant", "content": f"A {t} is item number {i} in my kitchen."},
    ]
    for i, t in enumerate(TOPICS)
]


def _tiny_model(width: int = 64):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=512, context_length=64, n_layer=2, n_head=2, n_embd=width))


def _exact_share(model, tokenizer) -> float:
    engine = Engine(model, tokenizer)
    params = SamplingParams(temperature=0, max_new_tokens=30)
    hits = 0
    for conversation in CORRECTED:
        result = engine.generate_chat(conversation[:1], params)
        # It must say the answer and then stop on its own (the end-of-turn marker was learned).
        hits += result.text == conversation[1]["content"] and result.finish_reason == "stop"
    return hits / len(CORRECTED)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_tiny_model_reproduces_twenty_corrected_answers_on_the_defaults(mode, trained_tokenizer):
    """Nothing hand-set: the rate, epochs and batch come from resolve(), as in the app."""
    # The starter's width under LoRA: a random base's frozen embeddings leave the adapter the
    # whole job, which a narrower one cannot do at the rate its width gets.
    model = _tiny_model(128 if mode == "lora" else 64)
    examples, _ = prepare(CORRECTED, trained_tokenizer, max_length=64, vocab_size=512)
    lora = LoRAConfig() if mode == "lora" else None
    config = resolve(SFTConfig(lora=lora), len(examples), model=model.config)
    trainer = SFTTrainer(model, examples, [], config, pad_id=trained_tokenizer.eot_id)
    assert trainer.run() is True
    back = recalled(model, examples, pad_id=trained_tokenizer.eot_id, device="cpu")
    assert sum(back) >= 18
    if mode == "full":  # every answer came back before the epoch cap (a random base, at the rate
        # that keeps a trained one's skills, takes most of the cap: 53 of 60 epochs)
        assert all(back) and trainer.learned_epoch is not None and trainer.learned_epoch < config.epochs
    if mode == "lora":
        assert lora_layers(model)
        assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
        model = merge_lora(model)
    assert _exact_share(model, trained_tokenizer) >= 0.9


def test_until_learned_stops_at_a_share_beside_replay_batched_on_its_own(trained_tokenizer):
    """The starter's instruction stage: lessons learnt until most come back, each epoch beside a
    fresh slice of longer examples that are batched by length on their own (spread over every
    batch, they would pad each to their length) and never counted as lessons."""
    model = _tiny_model()
    examples, _ = prepare(CORRECTED, trained_tokenizer, max_length=64, vocab_size=512)
    stories = [
        [
            {"role": "user", "content": f"Tell me about the {t}."},
            {"role": "assistant", "content": f"The {t} has stood on shelf {i} since the spring; " * 2},
        ]
        for i, t in enumerate(TOPICS)
    ]
    replay, _ = prepare(stories, trained_tokenizer, max_length=64, vocab_size=512)
    config = resolve(
        SFTConfig(lr=3e-3, epochs=60, learned_share=0.75, replay=8, replay_spread=False),
        len(examples),
        model=model.config,
        n_replay=len(replay),
    )
    trainer = SFTTrainer(model, examples, [], config, pad_id=trained_tokenizer.eot_id, replay=replay)
    lessons = {id(e) for e in examples}
    for batch in trainer._epoch_batches(0):
        assert len({id(e) in lessons for e in batch}) == 1
    assert trainer.run() is True
    epochs, back = zip(*trainer.recall_history)
    assert back[-1] >= 15 > max(back[:-1]) and trainer.learned_epoch == epochs[-1]
    assert trainer.step < trainer.total_steps  # the margin after it, and no further
    assert sum(recalled(model, examples, pad_id=trained_tokenizer.eot_id, device="cpu")) >= 15


def test_early_stopping_restores_the_best_weights(trained_tokenizer):
    model = _tiny_model()
    examples, _ = prepare(CORRECTED, trained_tokenizer, max_length=64, vocab_size=512)
    # Held-out answers are arbitrary numbers: memorising the others only makes them worse.
    train, val = examples[:16], examples[16:]
    config = resolve(
        SFTConfig(lr=3e-3, epochs=30, patience=2, eval_every=8, until_learned=False), 16, model=model.config
    )
    trainer = SFTTrainer(model, train, val, config, pad_id=trained_tokenizer.eot_id)
    trainer.run()
    vals = [h["val_loss"] for h in trainer.history if "val_loss" in h]
    assert trainer.stopped_early and trainer.step < trainer.total_steps
    assert min(vals) == trainer.best_val < vals[-1]
    assert evaluate_loss(model, val, pad_id=trained_tokenizer.eot_id, device="cpu") == pytest.approx(
        trainer.best_val, rel=1e-5
    )


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_a_run_that_loses_its_corrections_in_the_margin_ends_with_its_best_weights(mode, trained_tokenizer, tmp_path):
    """Every update after the answers came back is wrecked (noise on the trained weights, as a
    bad anneal would do): the run still ends with all of them, also when it was stopped in the
    margin and resumed from its checkpoint by a new trainer."""
    from finetune.instruct import load_trainable_state, trainable_state
    from finetune.train import load_checkpoint, save_checkpoint

    examples, _ = prepare(CORRECTED[:4], trained_tokenizer, max_length=64, vocab_size=512)
    lora = LoRAConfig() if mode == "lora" else None
    pad = trained_tokenizer.eot_id

    def trainer_for(model):
        config = resolve(SFTConfig(lora=lora, lr=1e-2 if lora else 3e-3), len(examples), model=model.config)
        return SFTTrainer(model, examples, [], config, pad_id=pad)

    def wreck_the_margin(trainer):
        def on_progress(p):
            if trainer.learned_epoch is not None:
                noisy = {k: v + torch.randn_like(v) for k, v in trainable_state(trainer.model).items()}
                load_trainable_state(trainer.model, noisy)

        return on_progress

    model = _tiny_model()
    first = trainer_for(model)
    stopped = first.run(should_stop=lambda: first.learned_epoch is not None, on_progress=wreck_the_margin(first))
    assert stopped is False and first.learned_epoch is not None
    save_checkpoint(tmp_path / "ckpt", first.state_dict(), state={"step": first.step})

    model = _tiny_model()
    resumed = trainer_for(model)
    resumed.load_state_dict(load_checkpoint(tmp_path / "ckpt", torch.device("cpu"))[0])
    assert resumed.run(on_progress=wreck_the_margin(resumed)) is True
    assert resumed.stopped_early and all(recalled(model, examples, pad_id=pad, device="cpu"))
    assert resumed.best_recall["epoch"] == resumed.learned_epoch  # the noise never gave them all back again


def test_chats_are_sampled_afresh_each_epoch_and_the_same_on_resume(trained_tokenizer):
    examples, _ = prepare(CORRECTED[:4], trained_tokenizer, max_length=64, vocab_size=512)
    chats, _ = prepare(CORRECTED[4:], trained_tokenizer, max_length=64, vocab_size=512)
    config = resolve(SFTConfig(lr=1e-3, epochs=3, max_batch_size=4), len(examples), model=_tiny_model().config)

    def trainer():
        pad = trained_tokenizer.eot_id
        return SFTTrainer(_tiny_model(), examples, [], config, pad_id=pad, contexts=chats, contexts_per_epoch=4)

    def epoch(t, n):
        return sorted(tuple(e.input_ids) for batch in t._epoch_batches(n) for e in batch)

    first = trainer()
    assert first.steps_per_epoch == 2  # 4 examples and 4 of the 16 chats, 4 a batch
    chats_seen = [set(epoch(first, n)) - {tuple(e.input_ids) for e in examples} for n in range(3)]
    assert all(len(seen) == 4 for seen in chats_seen) and chats_seen[0] != chats_seen[1]
    assert [epoch(trainer(), n) for n in range(3)] == [epoch(first, n) for n in range(3)]  # a resume
