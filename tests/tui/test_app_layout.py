"""How the app fits the terminal and finds its way: the footer's keys at 80 and 120 columns, a
reading width on a wide one, the fine-tune's buttons at 80x24, the palette's commands from every
screen, the search box after Ctrl+N, where an export is offered to go, the Models screen's
held-out loss and verdict for a fine-tune."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_app import open_chat, type_text, views, wait_until, write_config
from test_app_screens import PAIRS, labelled_chats
from test_chat_markdown import screen_text

from data.paths import kettle_home
from data.store import open_store
from tests.finetune.test_verdict import PROBE
from tui.app import KettleApp

PLACES = ["f1 Help", "f2 Chat", "f3 Dataset", "f4 Models", "f5 Fine-tune", "f6 Compare"]
# What a fine-tune of the starter records (finetune.jobs): too few examples to hold any out, so
# its held-out loss is the one on its base's held-out instruction data.
FINETUNE_METRICS = {
    "gate": "passed",
    "gate_reasons": [],
    "gate_parent_loss": None,
    "gate_new_loss": None,
    "recall_base": 0,
    "recall": 1,
    "recall_of": 1,
    "replay_examples": 32,
    "replay_loss_before": 2.5,
    "replay_loss_after": 2.6,
    "best_val_loss": None,
    "steps": 12,
    "probe": PROBE,
}


def footer(app) -> str:
    return screen_text(app).splitlines()[-1]


@pytest.mark.parametrize("width", [80, 120])
async def test_the_footer_shows_f1_to_f6_first(app_model, width):
    write_config(sampling={"max_new_tokens": 8, "seed": 1})
    app = KettleApp()
    async with app.run_test(size=(width, 24)) as pilot:
        await open_chat(pilot, app)
        for key, mode in (("f2", "chat"), ("f4", "models"), ("f5", "finetune")):
            await pilot.press(key)
            await wait_until(pilot, lambda mode=mode: app.current_mode == mode, mode)
            await wait_until(pilot, lambda: "Help" in footer(app), "the footer's keys")  # drawn after the screen
            shown = footer(app)
            assert shown.lstrip().startswith("f1 Help"), shown
            assert all(place in shown for place in PLACES), shown


def body_width(app) -> int:
    """The answer's text width, 0 until its body is mounted and laid out."""
    bodies = views(app)[1].query(".message-body")
    return bodies.first().content_region.width if bodies else 0


async def test_answers_keep_a_reading_width_on_a_wide_terminal(app_model):
    write_config(sampling={"max_new_tokens": 8, "seed": 1})
    with open_store() as store:
        conv = store.create_conversation(title="long")
        q = store.add_message(conv.id, "user", content="Tell me about kettles.")
        store.add_message(conv.id, "assistant", content="A kettle boils water. " * 30, parent_id=q.id)
    app = KettleApp()
    async with app.run_test(size=(200, 40)) as pilot:
        await open_chat(pilot, app)
        app.screen.open_conversation(conv.id)
        await wait_until(pilot, lambda: len(views(app)) == 2, "the chat")
        # laid out: a fixed pause was not enough on a loaded machine (width 0)
        await wait_until(pilot, lambda: body_width(app) > 0, "the answer laid out")
        body = views(app)[1].body
        assert 60 <= body.content_region.width <= 100
        # the text beside the message's border
        lines = [line.split("▎")[-1].strip() for line in screen_text(app).splitlines() if "A kettle boils" in line]
        assert len(lines) >= 6 and max(map(len, lines)) <= 100


def finished_and_queued_runs() -> tuple[int, int]:
    """A finished fine-tune of the active model with its output, and a queued one after it."""
    with open_store() as store:
        base = store.active_model()
        tuned = store.add_model_version(
            "tiny-ft1", base.path, kind="finetuned", parent_id=base.id, metrics=FINETUNE_METRICS
        )
        done = store.create_run("finetune", model_version_id=base.id, total_steps=40)
        for step in range(1, 13):  # its losses, which the chart draws
            store.log_metrics(done.id, step, metrics={"loss": 3.0 - step / 10})
        store.update_run(done.id, status="finished", step=12, output_model_id=tuned.id)
        queued = store.create_run("finetune", model_version_id=base.id)
    return done.id, queued.id


async def follow_finished_run(pilot, run_id: int):
    app = pilot.app
    await open_chat(pilot, app)
    await pilot.press("f5")
    await wait_until(pilot, lambda: app.current_mode == "finetune", "the fine-tune screen")
    app.screen.follow(run_id)
    switch = app.screen.query_one("#ft-switch")
    await wait_until(pilot, lambda: switch.display and app.focused is switch, "the finished run")
    await pilot.pause(0.1)
    return switch


async def test_the_switch_button_is_on_screen_at_80x24(app_model):
    write_config(sampling={"max_new_tokens": 8, "seed": 1})
    done, _ = finished_and_queued_runs()
    app = KettleApp()
    async with app.run_test(size=(80, 24)) as pilot:
        switch = await follow_finished_run(pilot, done)
        assert switch.region.height and 0 < switch.region.bottom <= 23  # above the footer
        shown = screen_text(app)
        # the run, its verdict and the button together, with nothing to scroll
        assert f"Run {done}: finished" in shown and "regression gate: passed" in shown
        assert "unrelated answers: loops 3 -> 3, leaks 0, lost 0 of 21" in shown
        assert "Switch to the new model" in shown


async def test_the_switch_button_is_scrolled_into_view_on_a_short_terminal(app_model):
    write_config(sampling={"max_new_tokens": 8, "seed": 1})
    done, _ = finished_and_queued_runs()
    app = KettleApp()
    async with app.run_test(size=(80, 16)) as pilot:
        switch = await follow_finished_run(pilot, done)
        await wait_until(pilot, lambda: 0 < switch.region.y and switch.region.bottom <= 15, "the button in view")
        await pilot.pause(0.5)
        assert 0 < switch.region.y and switch.region.bottom <= 15  # and it stays there


async def test_a_queued_run_shows_0_percent_not_the_last_runs_bar(app_model):
    write_config(sampling={"max_new_tokens": 8, "seed": 1})
    done, queued = finished_and_queued_runs()
    app = KettleApp()
    async with app.run_test(size=(120, 40)) as pilot:
        await follow_finished_run(pilot, done)
        screen = app.screen
        bar = screen.query_one("#run-progress")
        assert bar.percentage == 1
        screen.follow(queued)
        await wait_until(pilot, lambda: screen.run is not None and screen.run.id == queued, "the queued run")
        await pilot.pause(0.1)
        assert bar.percentage == 0
        shown = screen_text(app)
        assert "queued" in shown and "0%" in shown and "100%" not in shown


async def test_the_palette_offers_every_screens_commands_from_any_screen(app_model):
    write_config(sampling={"max_new_tokens": 8, "seed": 1})
    with open_store() as store:
        labelled_chats(store)
    app = KettleApp()
    async with app.run_test(size=(120, 36)) as pilot:
        await open_chat(pilot, app)
        titles = {c.title for c in app.get_system_commands(app.screen)}
        assert {"New chat", "Dataset: export", "Dataset: create a snapshot", "Fine-tune: start"} <= titles
        await pilot.press("f4")
        await wait_until(pilot, lambda: app.current_mode == "models", "the models screen")
        assert "New chat" in {c.title for c in app.get_system_commands(app.screen)}
        await pilot.press("f2")
        await wait_until(pilot, lambda: app.current_mode == "chat", "the chat")
        await pilot.press("ctrl+p")
        await wait_until(pilot, lambda: app.screen.__class__.__name__ == "CommandPalette", "the palette")
        await type_text(pilot, "Dataset: export")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.screen.__class__.__name__ == "ChoiceModal", "the export's formats")
        assert app.current_mode == "dataset"


async def test_ctrl_n_clears_the_search_box(app_model):
    write_config(sampling={"max_new_tokens": 8, "seed": 1})
    with open_store() as store:
        labelled_chats(store)
    app = KettleApp()
    async with app.run_test(size=(120, 36)) as pilot:
        await open_chat(pilot, app)
        options = app.screen.query_one("#chat-options")
        await wait_until(pilot, lambda: options.option_count == len(PAIRS), "the chats")
        await pilot.press("ctrl+f")
        await type_text(pilot, "kettle")
        await wait_until(pilot, lambda: options.option_count == 1, "the hit")
        await pilot.press("ctrl+n")
        assert app.screen.query_one("#chat-search").value == ""
        await wait_until(pilot, lambda: options.option_count == len(PAIRS), "every chat listed again")
        assert app.focused.id == "prompt"


def test_an_export_is_offered_in_downloads_or_kettle_home_never_the_current_folder(tmp_path, monkeypatch):
    from tui.screens.dataset import export_suggestion

    home, cwd = tmp_path / "home", tmp_path / "checkout"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    assert export_suggestion("openai") == kettle_home() / "exports" / "kettle-openai.jsonl"
    (home / "Downloads").mkdir()
    assert export_suggestion("openai") == home / "Downloads" / "kettle-openai.jsonl"
    (home / "Downloads" / "kettle-openai.jsonl").write_text("mine\n")
    assert export_suggestion("openai") == home / "Downloads" / "kettle-openai-2.jsonl"  # never over a file


async def test_the_dataset_exports_where_it_suggests(app_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no Downloads: KETTLE_HOME/exports, made on use
    (tmp_path / "checkout").mkdir()
    monkeypatch.chdir(tmp_path / "checkout")
    with open_store() as store:
        labelled_chats(store)
    app = KettleApp()
    async with app.run_test(size=(120, 36)) as pilot:
        await open_chat(pilot, app)
        await pilot.press("f3")
        await wait_until(
            pilot,
            lambda: app.current_mode == "dataset" and app.screen.query_one("#dataset-table").row_count == 10,
            "the examples",
        )
        await pilot.press("e")
        await wait_until(pilot, lambda: app.screen.__class__.__name__ == "ChoiceModal", "the formats")
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.screen.__class__.__name__ == "TextModal", "the file box")
        suggested = Path(app.screen.query_one("#text").value)
        assert suggested.parent == kettle_home() / "exports" and not suggested.is_relative_to(Path.cwd())
        await pilot.press("enter")
        await wait_until(pilot, lambda: suggested.exists(), "the export")
        assert len(json.loads(suggested.read_text())) == len(PAIRS)


async def test_the_models_screen_shows_a_finetunes_held_out_loss_and_verdict(app_model):
    write_config(sampling={"max_new_tokens": 8, "seed": 1})
    with open_store() as store:
        base = store.active_model()
        store.add_model_version("tiny-ft1", base.path, kind="finetuned", parent_id=base.id, metrics=FINETUNE_METRICS)
    app = KettleApp()
    async with app.run_test(size=(160, 30)) as pilot:
        await open_chat(pilot, app)
        await pilot.press("f4")
        table = None
        await wait_until(
            pilot,
            lambda: app.current_mode == "models" and app.screen.query_one("#models-table").row_count == 2,
            "the models",
        )
        table = app.screen.query_one("#models-table")
        row = [v.name for v in app.screen.versions].index("tiny-ft1")
        assert str(table.get_row_at(row)[4]) == "2.600"
        table.move_cursor(row=row)
        await pilot.pause(0.2)
        detail = str(app.screen.query_one("#models-detail").render())
        assert "held-out loss 2.600" in detail
        assert "your corrections: 1 of 1 now come back" in detail
        assert "2.500 -> 2.600 (+4.0%" in detail and "regression gate: passed" in detail
        assert "unrelated answers: loops 3 -> 3, leaks 0, lost 0 of 21" in detail
