"""Snapshot tests (pytest-textual-snapshot) of the chat, dataset, fine-tune and models screens.

Everything on screen is fixed: the data is written with a frozen clock, the app's clock is the
same instant, local time is UTC, and the answers on screen come from the store (with their
recorded figures), not from a live generation. Update after a deliberate change with
`pytest tests/tui/test_app_snapshots.py --snapshot-update` and look at the SVGs."""

from __future__ import annotations

import shutil
import time
from unittest import mock

import pytest
from test_app import open_chat, wait_until, write_config

from data.paths import models_dir
from data.store import open_store
from tui.app import KettleApp

SIZE = (130, 36)
NOW = 1_790_000_000.0  # 2026-09-21 13:33 UTC
ANSWER = """A kettle boils water. To use one:

1. Fill it to the line.
2. Switch it on and wait for the click.

```python
kettle.boil(litres=1.0)
```"""


@pytest.fixture
def frozen(chat_model_dir, monkeypatch):
    """A store with fixed content and times; returns the id of the conversation to show."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    write_config(sampling={"max_new_tokens": 8, "seed": 1})
    path = models_dir() / "tiny"
    shutil.copytree(chat_model_dir, path)
    clock = [NOW - 3600]

    def tick():
        clock[0] += 1.0
        return clock[0]

    with mock.patch("time.time", tick), open_store() as store:
        base = store.add_model_version("tiny", path, kind="imported")
        tuned = store.add_model_version(
            "tiny-ft1",
            path,
            kind="finetuned",
            parent_id=base.id,
            metrics={
                "gate": "passed",
                "gate_parent_loss": 6.2431,
                "gate_new_loss": 5.8812,
                "steps": 30,
                "train": 9,
                "held_out": 1,
            },
        )
        store.add_model_version(
            "tiny-ft2",
            path,
            kind="finetuned",
            parent_id=tuned.id,
            status="regressed",
            metrics={"gate": "regressed", "gate_parent_loss": 5.8812, "gate_new_loss": 5.9904},
        )
        store.activate_model(base.id)
        other = store.create_conversation(title="Colours of the sky")
        q = store.add_message(other.id, "user", content="Why is the sky blue?")
        store.add_message(other.id, "assistant", content="Rayleigh scattering.", parent_id=q.id, model="tiny")
        conv = store.create_conversation(title="How do kettles work?")
        q = store.add_message(conv.id, "user", content="How do I use a kettle?")
        gen = {"finish_reason": "stop", "prompt_tokens": 17, "new_tokens": 42, "tokens_per_s": 123.4, "seed": 7}
        a1 = store.add_message(
            conv.id, "assistant", content=ANSWER, parent_id=q.id, model="tiny", model_version_id=base.id, generation=gen
        )
        store.add_message(
            conv.id,
            "assistant",
            content="Heat the water.",
            parent_id=q.id,
            model="tiny",
            model_version_id=base.id,
            generation={**gen, "new_tokens": 4},
        )
        store.set_leaf(conv.id, a1.id)
        store.set_label(a1.id, thumb=1, score=4, tags=["facts"])
        store.set_label(a1.id, ideal="Fill it, switch it on, wait for the click.")
        for n in range(3):
            c = store.create_conversation(title=f"Question {n}")
            qn = store.add_message(c.id, "user", content=f"Question number {n}?")
            an = store.add_message(c.id, "assistant", content=f"Answer number {n}.", parent_id=qn.id, model="tiny")
            store.set_label(an.id, thumb=1 if n else -1, tags=["facts"] if n == 1 else [])
    yield conv.id
    monkeypatch.delenv("TZ")
    time.tzset()


def frozen_app() -> KettleApp:
    return KettleApp(clock=lambda: NOW)


async def chat_ready(pilot) -> None:
    app = pilot.app
    await open_chat(pilot, app)
    await wait_until(pilot, lambda: app.service.active_model is not None, "the model")
    app.screen.show_status()


def test_chat_screen(snap_compare, frozen):
    async def run_before(pilot):
        await chat_ready(pilot)
        pilot.app.screen.open_conversation(frozen)
        await wait_until(pilot, lambda: len(pilot.app.screen.query("MessageView")) == 2, "the chat")
        await wait_until(
            pilot,
            lambda: all(w.is_finished for w in pilot.app.workers if w.group == "chat-context"),
            "the context meter",
        )
        pilot.app.screen.query("MessageView")[1].focus()
        await pilot.pause(0.2)

    assert snap_compare(frozen_app(), terminal_size=SIZE, run_before=run_before)


def test_dataset_screen(snap_compare, frozen):
    async def run_before(pilot):
        await chat_ready(pilot)
        await pilot.press("f3")
        await wait_until(
            pilot,
            lambda: pilot.app.current_mode == "dataset" and pilot.app.screen.query_one("#dataset-table").row_count == 3,
            "the dataset",
        )
        await pilot.pause(0.2)

    assert snap_compare(frozen_app(), terminal_size=SIZE, run_before=run_before)


def test_finetune_screen(snap_compare, frozen):
    async def run_before(pilot):
        await chat_ready(pilot)
        await pilot.press("f5")
        await wait_until(
            pilot,
            lambda: (
                pilot.app.current_mode == "finetune"
                and "steps" in str(pilot.app.screen.query_one("#sheet-estimate").render())
            ),
            "the sheet",
        )
        await pilot.pause(0.2)

    assert snap_compare(frozen_app(), terminal_size=SIZE, run_before=run_before)


def test_models_screen(snap_compare, frozen):
    async def run_before(pilot):
        await chat_ready(pilot)
        await pilot.press("f4")
        await wait_until(
            pilot,
            lambda: pilot.app.current_mode == "models" and pilot.app.screen.query_one("#models-table").row_count == 3,
            "the models",
        )
        pilot.app.screen.query_one("#models-table").move_cursor(row=1)
        await pilot.pause(0.2)

    assert snap_compare(frozen_app(), terminal_size=SIZE, run_before=run_before)
