"""Instruction fine-tuning end to end on a tiny model: it learns 20 corrected answers and stops."""
from __future__ import annotations

import pytest
import torch

from finetune.instruct import SFTConfig, SFTTrainer, evaluate_loss, prepare, resolve
from finetune.lora import LoRAConfig, lora_layers, merge_lora
from gpt.config import GPTConfig
from gpt.engine import Engine
from gpt.model import GPT
from gpt.sampling import SamplingParams

TOPICS = ["kettle", "teapot", "mug", "stove", "spoon", "sugar", "milk", "lemon", "honey", "biscuit",
          "saucer", "tray", "napkin", "oven", "pan", "whisk", "ladle", "sieve", "grater", "jar"]
# Twenty answers a user corrected: each one arbitrary, so only training can produce it.
CORRECTED = [[{"role": "user", "content": f"What is a {t}?"},
              {"role": "assistant", "content": f"A {t} is item number {i} in my kitchen."}]
             for i, t in enumerate(TOPICS)]


def _tiny_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=512, context_length=64, n_layer=2, n_head=2, n_embd=64))


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
def test_tiny_model_reproduces_twenty_corrected_answers(mode, trained_tokenizer):
    model = _tiny_model()
    examples, _ = prepare(CORRECTED, trained_tokenizer, 64, 512)
    # A random base has small, frozen output embeddings, so LoRA needs a larger rank and rate
    # than on a pretrained model; the point is that the adapter alone carries the answers.
    lora = LoRAConfig(rank=16, alpha=32, dropout=0.0) if mode == "lora" else None
    config = resolve(SFTConfig(lr=3e-3, epochs=30 if mode == "full" else 60, lora=lora), 20, 64)
    trainer = SFTTrainer(model, examples, [], config, pad_id=trained_tokenizer.eot_id)
    assert trainer.run() is True
    if mode == "lora":
        assert lora_layers(model)
        assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
        model = merge_lora(model)
    assert _exact_share(model, trained_tokenizer) >= 0.9


def test_early_stopping_restores_the_best_weights(trained_tokenizer):
    model = _tiny_model()
    examples, _ = prepare(CORRECTED, trained_tokenizer, 64, 512)
    # Held-out answers are arbitrary numbers: memorising the others only makes them worse.
    train, val = examples[:16], examples[16:]
    config = resolve(SFTConfig(lr=3e-3, epochs=30, patience=2, eval_every=8), 16, 64)
    trainer = SFTTrainer(model, train, val, config, pad_id=trained_tokenizer.eot_id)
    trainer.run()
    vals = [h["val_loss"] for h in trainer.history if "val_loss" in h]
    assert trainer.stopped_early and trainer.step < trainer.total_steps
    assert min(vals) == trainer.best_val < vals[-1]
    assert evaluate_loss(model, val, trained_tokenizer.eot_id, "cpu") == pytest.approx(trainer.best_val, rel=1e-5)
