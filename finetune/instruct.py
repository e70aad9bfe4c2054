"""Supervised fine-tuning on conversations in the one chat format (full or LoRA).

Each conversation is rendered with `gpt.chat_template.render_training`; the loss is taken only on
the assistant's tokens and each assistant turn's end-of-turn marker (so the model learns to stop).
Every other target, and all padding, is IGNORE (-100); so are assistant turns marked
"weight": 0, which are context only.

Over-long conversations (more than `max_length` + 1 tokens, by default the model's context): the
oldest exchanges are dropped, keeping a system message and the newest turns, until it fits; a
conversation whose last user turn and answer alone do not fit is skipped and counted in the
preparation stats (cutting an answer short would teach the model to stop mid-sentence).

Batches are length-bucketed: each epoch the examples are shuffled, sorted by length and cut into
batches under a token budget, and the batches are shuffled. Padding then wastes a few per cent of
the tokens (`padding_waste`), where random batches waste half.

Defaults derive from the model's size and the dataset's (`resolve`). The learning rate scales
inversely with the model's width (a 128-wide starter takes a rate ~6x GPT-2's); LoRA takes a
larger one than full fine-tuning. A few examples get many passes: the run stops once every
training example (or `learned_share` of many) comes back exactly under greedy decoding
(`recalled`), plus a margin, or at the epoch cap. With the base's own instruction data
(finetune.replay), each epoch mixes in a fresh slice of it (REPLAY_RATIO times the user's examples,
spread over the batches), so the model keeps what it knew. Early stopping on a held-out share of
the user's examples (only with many of them) restores the best weights; without one, the run ends
with the weights of its epoch that gave back the most examples.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from finetune.lora import LoRAConfig, adapter_state, apply_lora, lora_layers
from finetune.train import Dist, OptimizerSettings, lr_at, make_optimizer, rng_state, set_rng_state
from gpt.chat_template import render_message, render_training
from gpt.config import GPTConfig
from gpt.errors import KettleError
from gpt.model import GPT
from gpt.threads import ThreadFitter
from gpt.tokenizer import Tokenizer

IGNORE = -100


@dataclass
class SFTConfig:
    """Settings of a fine-tuning run; None means "derive from the dataset size" (see `resolve`)."""

    epochs: int | None = None
    lr: float | None = None
    warmup_steps: int | None = None
    batch_tokens: int = 8192  # padded tokens per batch
    max_batch_size: int | None = None
    max_length: int | None = None  # default: the model's context length
    val_fraction: float | None = None  # held out; None: `default_val_fraction` (callers split)
    patience: int = 3  # evaluations without a better validation loss before stopping
    eval_every: int | None = None  # optimizer steps between validations
    weight_decay: float | None = None
    grad_clip: float = 1.0
    seed: int = 1337
    lora: LoRAConfig | None = None
    replay: int | None = None  # replay examples mixed into each epoch (None: REPLAY_RATIO per example)
    until_learned: bool = True  # stop once the training examples come back (plus a margin)
    learned_share: float = 1.0  # ... this share of them: every one, or most of many
    # Replay examples ride in every batch (a few corrections: each update also recalls the base's
    # skills), or, off, are length-bucketed with the training examples (the starter's long
    # grounded examples beside its short lessons would pad every batch to their length).
    replay_spread: bool = True

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lora"] = self.lora.to_dict() if self.lora else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SFTConfig":
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise KettleError(f"unknown fine-tuning settings: {', '.join(unknown)}")
        d = dict(d)
        d["lora"] = LoRAConfig.from_dict(d["lora"]) if d.get("lora") else None
        return cls(**d)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # the next token where the loss counts, IGNORE elsewhere
    source: int | None = None  # its conversation's position in what `prepare` was given

    def __len__(self) -> int:
        return len(self.input_ids)


# --- data --------------------------------------------------------------------------------------


def encode_conversation(messages: list[dict], tokenizer: Tokenizer, *, max_length: int) -> Example | None:
    """One training example, or None when even its last exchange is longer than `max_length`."""
    system = messages[:1] if messages and messages[0].get("role") == "system" else []
    rest = messages[len(system) :]
    while True:
        ids, mask = _training_tokens(system + rest, tokenizer)
        if len(ids) <= max_length + 1:
            labels = [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]
            return Example(ids[:-1], labels)
        # Drop the oldest exchange: everything up to the next user turn after the first message.
        nxt = next((i for i in range(1, len(rest)) if rest[i]["role"] == "user"), None)
        if nxt is None or not any(m["role"] == "assistant" for m in rest[nxt:]):
            return None
        rest = rest[nxt:]


def _training_tokens(messages: list[dict], tokenizer: Tokenizer) -> tuple[list[int], list[bool]]:
    """`render_training`, except that assistant turns with "weight": 0 (OpenAI's convention; a
    snapshot marks earlier answers that were not chosen so) are context, not targets."""
    ids, mask = render_training(messages, tokenizer)
    start = 0
    for m in messages:
        end = start + len(render_message(m, tokenizer))  # a conversation renders message by message
        if m.get("weight") == 0:
            mask[start:end] = [False] * (end - start)
        start = end
    if not any(mask):
        raise KettleError("every assistant answer has weight 0: there is nothing to learn")
    return ids, mask


def prepare(
    conversations: list[list[dict]], tokenizer: Tokenizer, *, max_length: int, vocab_size: int
) -> tuple[list[Example], dict]:
    """Encode every conversation; returns (examples, stats). Raises KettleError on bad data."""
    if not conversations:
        raise KettleError("the dataset is empty: there is nothing to fine-tune on")
    examples, skipped = [], 0
    for i, messages in enumerate(conversations):
        try:
            example = encode_conversation(messages, tokenizer, max_length=max_length)
        except KettleError as exc:
            raise KettleError(f"example {i + 1}: {exc}") from None
        if example is None:
            skipped += 1
            continue
        example.source = i
        examples.append(example)
    if not examples:
        raise KettleError(
            f"all {len(conversations)} examples are longer than the context of "
            f"{max_length} tokens, even their last exchange"
        )
    check_vocabulary(examples, vocab_size)
    stats = {
        "examples": len(examples),
        "skipped_too_long": skipped,
        "tokens": sum(len(e) for e in examples),
        "loss_tokens": sum(sum(t != IGNORE for t in e.labels) for e in examples),
    }
    return examples, stats


def check_vocabulary(examples: list[Example], vocab_size: int) -> None:
    top = max(max(e.input_ids + [t for t in e.labels if t != IGNORE]) for e in examples)
    if top >= vocab_size:
        raise KettleError(
            f"the data holds token id {top} but the model's vocabulary has "
            f"{vocab_size} tokens: it was tokenised for another vocabulary"
        )


def holdout(examples: list, fraction: float, *, seed: int) -> tuple[list, list]:
    """Seeded split into (train, held out): held-out examples guide early stopping and the gate."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = round(len(examples) * fraction)
    held = set(order[:n_val])
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


HOLD_OUT_FROM = 100


def default_val_fraction(n: int) -> float:
    """10% held out from HOLD_OUT_FROM examples on, at most 500. Fewer are all trained on: each
    is a correction the user wants back, and the verdict checks them and the replay data instead."""
    if n < HOLD_OUT_FROM:
        return 0.0
    return min(max(1, round(0.1 * n)), 500) / n


def make_batches(
    examples: list[Example], batch_tokens: int, *, max_batch_size: int, seed: int | None = None
) -> list[list[Example]]:
    """Length-bucketed batches: examples of similar length together, under `batch_tokens`."""
    order = list(examples)
    if seed is not None:
        random.Random(seed).shuffle(order)
    order.sort(key=len)  # stable: equal lengths keep their shuffled order
    batches, current = [], []
    for ex in order:
        if current and ((len(current) + 1) * len(ex) > batch_tokens or len(current) >= max_batch_size):
            batches.append(current)
            current = []
        current.append(ex)
    if current:
        batches.append(current)
    if seed is not None:
        random.Random(seed + 1).shuffle(batches)
    return batches


def collate(batch: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(e) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    for row, e in enumerate(batch):
        ids[row, : len(e)] = torch.tensor(e.input_ids)
        labels[row, : len(e)] = torch.tensor(e.labels)
    return ids, labels


def padding_waste(batches: list[list[Example]]) -> float:
    """Share of the positions in padded batches that are padding."""
    real = sum(len(e) for b in batches for e in b)
    padded = sum(len(b) * max(len(e) for e in b) for b in batches)
    return 1 - real / padded if padded else 0.0


# --- settings ------------------------------------------------------------------------------------

# Rates at GPT-2's width (768), scaled by 768 / n_embd for other widths. Full fine-tuning at
# 6.25e-5 (3.75e-4 on the starter, 128 wide): on two brewed starters that know their lessons, one
# correction at 4x this rate came back and cost the base 46-53 of its 168 right answers to
# unrelated questions (the gate: 1-4 leaks and 10-12 lost of 48), at 2x 13-15, at this rate 6-7
# (gate passed on both), at half of it 7-9; ten corrections at this rate: 10/10 back, reworded 14/20
# (15 at 4x), right answers kept 168/168 (167), leaks in 180 answers 0-1 (0-1). LoRA moves the
# weights less per step and takes 6e-3 at 128 wide (not remeasured: at a quarter of it one
# correction still cost 15-27 right answers).
FULL_LR_AT_768 = 6.25e-5
LORA_LR_AT_768 = 1e-3
# Epochs: enough for STEP_BUDGET optimizer steps, within [MIN_EPOCHS, MAX_EPOCHS]. A few examples
# need many passes each (memorising an answer takes ~20-30 of them); `until_learned` ends the
# run once they come back, so the cap is rarely reached.
STEP_BUDGET = 600
MAX_EPOCHS = 60
MIN_EPOCHS = 2
LEARNED_MARGIN = 0.25
# Replay examples per user example, each epoch, and at least REPLAY_MIN: the base's examples keep
# its skills. A first correction alone had 4 (full) or 1 (LoRA) beside it and pulled the starter
# its way (held-out loss +27% and +17-20%). LoRA had fewer (1 per example, 4 at least: more only
# slowed its learning, before runs ended once the corrections came back): one correction then cost
# the brewed starter 59 of its 166 right answers to unrelated questions; with these, 16-21 (1-3
# corrections: 14-21, where half the rate did no better), and ten corrections came back 10/10
# keeping 166/166 with no leak (the gate passed).
REPLAY_RATIO = 4
REPLAY_MIN = 32


def resolve(config: SFTConfig, n_train: int, *, model: GPTConfig, n_replay: int = 0, n_variants: int = 0) -> SFTConfig:
    """A copy of `config` with every None filled in from the model's and the dataset's sizes
    (module docstring). `n_train` counts the user's training examples, `n_variants` the other
    forms of them trained beside (finetune.lessons), `n_replay` the replay examples available."""
    c = dataclasses.replace(config)
    context_length = model.context_length
    c.max_length = c.max_length or context_length
    if c.max_length > context_length:
        raise KettleError(f"--max-length {c.max_length} exceeds the model's context length {context_length}")
    if c.lora and c.lora.rank > model.n_embd:  # every target layer is at least n_embd wide on each side
        raise KettleError(
            f"--lora-rank {c.lora.rank} exceeds the model's width {model.n_embd}: "
            "the rank of an update is at most the width of the layer it adapts"
        )
    if c.replay is None:
        # as many for each other form of a lesson: with one each, a fine-tune of 10 corrections
        # on the starter (which knows its own lessons) raised its held-out replay loss 35%
        c.replay = min(n_replay, max(REPLAY_MIN, REPLAY_RATIO * (n_train + n_variants)))
    # The batch counts the user's examples (two at least: one alone pulls each update its own
    # way, and the base's skills suffer); replay examples ride along in proportion.
    n_all = n_train + n_variants
    c.max_batch_size = c.max_batch_size or max(1, min(n_all, 32, max(2, n_all // 8)))
    steps_per_epoch = max(1, math.ceil(n_all / c.max_batch_size))
    if c.epochs is None:
        c.epochs = min(MAX_EPOCHS, max(MIN_EPOCHS, math.ceil(STEP_BUDGET / steps_per_epoch)))
    if c.lr is None:
        c.lr = (LORA_LR_AT_768 if c.lora else FULL_LR_AT_768) * 768 / model.n_embd
    if c.warmup_steps is None:
        c.warmup_steps = max(1, min(100, round(0.05 * steps_per_epoch * c.epochs)))
    if c.eval_every is None:
        c.eval_every = max(1, min(steps_per_epoch, steps_per_epoch * c.epochs // 20))
    if c.weight_decay is None:
        c.weight_decay = 0.0 if c.lora else 0.1
    for name in ("epochs", "batch_tokens", "max_batch_size", "patience", "eval_every"):
        if getattr(c, name) <= 0:
            raise KettleError(f"--{name.replace('_', '-')} must be positive, got {getattr(c, name)}")
    if not c.lr > 0:
        raise KettleError(f"--lr must be positive, got {c.lr}")
    if c.replay < 0:
        raise KettleError(f"--replay must be 0 or more, got {c.replay}")
    if not 0 < c.learned_share <= 1:
        raise KettleError(f"learned_share must be in (0, 1], got {c.learned_share}")
    return c


# --- training ------------------------------------------------------------------------------------


def token_loss(model, ids: torch.Tensor, *, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum of the cross-entropy over the loss tokens, how many there are)."""
    logits = model(ids)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, int((labels != IGNORE).sum())


@torch.no_grad()
def evaluate_loss(model: GPT, examples: list[Example], *, pad_id: int, device, batch_tokens: int = 8192) -> float:
    """Mean loss per loss token over `examples` (nan when there are none)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in make_batches(examples, batch_tokens, max_batch_size=64):
        ids, labels = collate(batch, pad_id)
        loss, n = token_loss(model, ids.to(device), labels=labels.to(device))
        total, count = total + loss.item(), count + n
    model.train(was_training)
    return total / count if count else float("nan")


@torch.no_grad()
def recalled(model: GPT, examples: list[Example], *, pad_id: int, device, batch_tokens: int = 8192) -> list[bool]:
    """Per example: whether greedy decoding gives its answers back exactly. With the true prefix,
    the most likely next token is the target at every loss position (the end-of-turn marker
    included): that is the condition for greedy decoding to reproduce the answer token for token,
    checked in one forward pass instead of a generation per example."""
    was_training = model.training
    model.eval()
    index = {id(e): i for i, e in enumerate(examples)}
    result = [False] * len(examples)
    for batch in make_batches(examples, batch_tokens, max_batch_size=64):
        ids, labels = collate(batch, pad_id)
        labels = labels.to(device)
        hit = (model(ids.to(device)).argmax(-1) == labels) | (labels == IGNORE)
        for row, ok in zip(batch, hit.all(dim=1).tolist()):
            result[index[id(row)]] = ok
    model.train(was_training)
    return result


def trainable_state(model: GPT) -> dict[str, torch.Tensor]:
    """What training changes: the adapter under LoRA, else every weight."""
    if lora_layers(model):
        return {k: v.clone() for k, v in adapter_state(model).items()}
    return {k: v.detach().cpu().clone() for k, v in model.weights().items()}


def load_trainable_state(model: GPT, state: dict[str, torch.Tensor]) -> None:
    if lora_layers(model):
        for name, layer in lora_layers(model).items():
            layer.lora_A.data.copy_(state[f"{name}.lora_A"])
            layer.lora_B.data.copy_(state[f"{name}.lora_B"])
    else:
        model.load_state_dict(state, strict=False)


@dataclass
class Progress:
    step: int
    total_steps: int
    epoch: int
    loss: float
    val_loss: float | None
    tokens_per_s: float
    eta_s: float
    lr: float


class SFTTrainer:
    """One fine-tuning run over prepared examples; its state can be saved and resumed exactly.

    Under torch.distributed (torchrun), the model is wrapped in DistributedDataParallel and each
    rank takes every world_size-th batch; only rank 0 should report and save.
    """

    def __init__(
        self,
        model: GPT,
        train: list[Example],
        val: list[Example],
        config: SFTConfig,
        pad_id: int,
        device="cpu",
        dist=None,
        replay: list[Example] = (),
        contexts: list[Example] = (),
        contexts_per_epoch: int = 0,
        anchors: list[Example] = (),
    ):
        self.config, self.pad_id, self.device = config, pad_id, torch.device(device)
        # Examples trained `contexts_per_epoch` at a time, a fresh sample each epoch: lessons
        # asked after ever other earlier turns (finetune.lessons), so that the model learns to
        # answer whatever came before instead of learning the few chats it was shown.
        self.contexts, self.contexts_per_epoch = list(contexts), min(contexts_per_epoch, len(contexts))
        # Examples trained every epoch but never required back (the base's own conversations
        # asked most like the lessons: finetune.lessons.neighbours).
        self.anchors = list(anchors)
        if config.lora and not lora_layers(model):
            apply_lora(model, config.lora)
        self.model = model.to(self.device)
        self.train_examples, self.val_examples, self.replay_examples = train, val, list(replay)
        self.dist = dist or Dist()
        self.net = model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self._batches: tuple[int, list] = (-1, [])
        self.steps_per_epoch = len(self._epoch_batches(0))
        self.total_steps = self.steps_per_epoch * config.epochs
        # The optimizer and warm-up + cosine schedule pretraining uses, with this run's settings.
        self.settings = OptimizerSettings(
            lr=config.lr, weight_decay=config.weight_decay, warmup_steps=config.warmup_steps
        )
        self.optimizer = make_optimizer(model, self.settings, device=self.device)
        self.step = 0
        self.history: list[dict] = []  # {"step", "loss"} and {"step", "val_loss"} rows
        self.best_val, self.best_state, self.bad_evals = math.inf, None, 0
        self.stopped_early = False
        self.learned_epoch: int | None = None  # the first epoch after which the examples came back
        self.recall_history: list[tuple[int, int]] = []  # (epoch, examples back) until learned
        self.anneal: tuple[int, int, float] | None = None  # (from step, to step, from lr) once learned
        # Without a held-out share, the epoch that gave back the most training examples (the
        # later of a tie): {"recalled", "epoch", "state"}, and how many the last epoch gave back.
        self.best_recall: dict | None = None
        self.last_recall: int | None = None
        self.tokens = 0
        self.elapsed = 0.0

    def _epoch_batches(self, epoch: int) -> list[list[Example]]:
        """This rank's batches of `epoch` (a pure function of the seed and the epoch)."""
        if self._batches[0] != epoch:
            fresh = random.Random(self.config.seed + epoch).sample(self.contexts, self.contexts_per_epoch)
            batches = make_batches(
                self.train_examples + fresh + self.anchors,
                self.config.batch_tokens,
                max_batch_size=self.config.max_batch_size,
                seed=self.config.seed + epoch,
            )
            if self.replay_examples and self.config.replay:
                batches = self._with_replay(batches, epoch)
            # Every rank needs a batch at every step (DDP averages gradients): repeat a few.
            batches += batches[: -len(batches) % self.dist.world_size]
            self._batches = (epoch, batches[self.dist.rank :: self.dist.world_size])
        return self._batches[1]

    def _with_replay(self, batches: list[list[Example]], epoch: int) -> list[list[Example]]:
        """Each batch with its share of this epoch's replay slice (a fresh one every epoch), so
        that every update both teaches the user's examples and recalls the base's."""
        k = min(self.config.replay, len(self.replay_examples))
        pool = random.Random(self.config.seed + epoch).sample(self.replay_examples, k)
        if not self.config.replay_spread:
            batches = batches + make_batches(
                pool, self.config.batch_tokens, max_batch_size=self.config.max_batch_size, seed=self.config.seed + epoch
            )
            random.Random(self.config.seed + epoch).shuffle(batches)
            return batches
        per_example = k / len(self.train_examples)
        out, done = [], 0
        for batch in batches:
            start, done = round(done * per_example), done + len(batch)
            out.append(batch + pool[start : round(done * per_example)])
        return out

    def lr(self, step: int) -> float:
        if self.anneal is not None:  # learned: down to zero by the end of the margin
            start, end, start_lr = self.anneal
            return start_lr * max(0.0, end - step) / max(1, end - start)
        return lr_at(step, self.settings, max_steps=self.total_steps)

    def run(
        self, should_stop: Callable[[], bool] = lambda: False, on_progress: Callable[[Progress], None] | None = None
    ) -> bool:
        """Train until done, early-stopped, or `should_stop()` turns true between two steps.

        Returns True when the run finished (then the best weights are loaded), False when stopped.
        """
        self.model.train()
        started, tokens_at_start, step_at_start = time.perf_counter(), self.tokens, self.step
        with ThreadFitter(self.device.type == "cpu") as threads:
            while self.step < self.total_steps and not self.stopped_early:
                threads.update()
                epoch, index = divmod(self.step, self.steps_per_epoch)
                batches = self._epoch_batches(epoch)  # a replay slice may bucket into fewer batches
                loss = self._train_step(batches[index % len(batches)])
                self.step += 1
                if index == self.steps_per_epoch - 1:
                    self._end_of_epoch(epoch + 1)
                val_loss = None
                if self.val_examples and (self.step % self.config.eval_every == 0 or self.step == self.total_steps):
                    val_loss = self._validate()
                now = time.perf_counter()
                speed = (self.tokens - tokens_at_start) / max(now - started, 1e-9)
                if on_progress:
                    per_step = (now - started) / max(1, self.step - step_at_start)
                    on_progress(
                        Progress(
                            self.step,
                            self.total_steps,
                            epoch + 1,
                            loss,
                            val_loss,
                            speed * self.dist.world_size,
                            per_step * (self.total_steps - self.step),
                            self.lr(self.step),
                        )
                    )
                if self.dist.any(should_stop(), self.device) and self.step < self.total_steps:
                    self.elapsed += time.perf_counter() - started
                    return False
        self.elapsed += time.perf_counter() - started
        self.restore_best()
        return True

    def _end_of_epoch(self, epoch: int) -> None:
        """With `until_learned`: once the training examples come back (`learned_share` of them),
        train LEARNED_MARGIN of the epochs so far again with the rate falling linearly to zero
        (so the answers settle instead of being pushed about by the last large updates), then
        stop. Recall is checked after every epoch, the margin's too: annealing once lost a
        correction (10 of 10 at epoch 25, 9 at the end), and the run ends with its best epoch's
        weights (restore_best)."""
        if not self.config.until_learned:
            return
        back = sum(
            recalled(
                self.model,
                self.train_examples,
                pad_id=self.pad_id,
                device=self.device,
                batch_tokens=self.config.batch_tokens,
            )
        )
        self.last_recall = back
        # Ties go to the later epoch: the rate falls through the margin, its answers have settled.
        # With a held-out share, the best validation picks the weights instead (restore_best).
        if not self.val_examples and (self.best_recall is None or back >= self.best_recall["recalled"]):
            self.best_recall = {"recalled": back, "epoch": epoch, "state": trainable_state(self.model)}
        if self.anneal is not None:
            self.stopped_early = self.step >= self.anneal[1]
            return
        self.recall_history.append((epoch, back))
        if back >= self.config.learned_share * len(self.train_examples):
            self.learned_epoch = epoch
            margin = max(1, math.ceil(epoch * LEARNED_MARGIN))
            end = min(self.total_steps, self.step + margin * self.steps_per_epoch)
            self.anneal = (self.step, end, self.lr(self.step))
            self.stopped_early = self.step >= end

    def restore_best(self) -> None:
        """Load the weights of the best validation so far; without validation, those of the
        epoch that gave back the most training examples when the last epoch gave back fewer
        (a run never ends having lost a correction it had learned)."""
        if self.best_state is not None:
            load_trainable_state(self.model, self.best_state)
        elif self.best_recall is not None and self.last_recall < self.best_recall["recalled"]:
            load_trainable_state(self.model, self.best_recall["state"])
            self.last_recall = self.best_recall["recalled"]

    def _train_step(self, batch: list[Example]) -> float:
        ids, labels = collate(batch, self.pad_id)
        ids, labels = ids.to(self.device), labels.to(self.device)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr(self.step)
        loss_sum, n = token_loss(self.net, ids, labels=labels)
        loss = loss_sum / max(n, 1)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip:
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad], self.config.grad_clip
            )
        self.optimizer.step()
        self.tokens += sum(len(e) for e in batch)
        value = loss.item()
        self.history.append({"step": self.step + 1, "loss": value})
        return value

    def _validate(self) -> float:
        val_loss = evaluate_loss(
            self.model, self.val_examples, pad_id=self.pad_id, device=self.device, batch_tokens=self.config.batch_tokens
        )
        self.history.append({"step": self.step, "val_loss": val_loss})
        if val_loss < self.best_val:
            self.best_val, self.bad_evals = val_loss, 0
            self.best_state = trainable_state(self.model)
        else:
            self.bad_evals += 1
            self.stopped_early = self.bad_evals >= self.config.patience
        return val_loss

    # Everything needed to continue exactly where the run stopped: a resume checkpoint's
    # trainer.pt (finetune.train), with the RNG state of rank 0, the one rank that saves.
    def state_dict(self) -> dict:
        return {
            "model": trainable_state(self.model),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "history": self.history,
            "best_val": self.best_val,
            "best_state": self.best_state,
            "bad_evals": self.bad_evals,
            "stopped_early": self.stopped_early,
            "learned_epoch": self.learned_epoch,
            "recall_history": self.recall_history,
            "anneal": self.anneal,
            "best_recall": self.best_recall,
            "last_recall": self.last_recall,
            "tokens": self.tokens,
            "elapsed": self.elapsed,
            "rng": [rng_state()],
        }

    def load_state_dict(self, state: dict) -> None:
        load_trainable_state(self.model, state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.history = state["step"], state["history"]
        self.best_val, self.best_state = state["best_val"], state["best_state"]
        self.bad_evals, self.stopped_early = state["bad_evals"], state["stopped_early"]
        self.learned_epoch = state.get("learned_epoch")
        self.recall_history = [tuple(row) for row in state.get("recall_history", [])]
        self.anneal = tuple(state["anneal"]) if state.get("anneal") else None
        self.best_recall, self.last_recall = state.get("best_recall"), state.get("last_recall")
        self.tokens, self.elapsed = state["tokens"], state["elapsed"]
        set_rng_state(state["rng"][0])
