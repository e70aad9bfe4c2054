"""Holes a new user found in the app (issue 12), each driven by Textual's Pilot with a tiny real
model and a temporary store."""

from __future__ import annotations

import shutil

import pytest
from test_app import (  # noqa: F401
    SIZE,
    ask,
    focus_answer,
    open_chat,
    press_nowait,
    short_answers,
    type_text,
    views,
    wait_until,
    write_config,
)
from test_app_screens import labelled_chats, open_finetune_sheet

from data.paths import models_dir
from data.records import Run
from data.store import open_store
from tui.app import KettleApp
from tui.screens.modals import ChoiceModal, EditorModal, TaskModal


def errors(app) -> list[str]:
    return [n.message for n in app._notifications if n.severity == "error"]


async def test_activating_a_model_reports_no_error(app_model, tiny_model_dir):
    with open_store() as store:
        store.add_model_version("other", tiny_model_dir, kind="imported")
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_chat(pilot, app)
        await pilot.press("f4")
        table = app.screen.query_one("#models-table")
        await wait_until(pilot, lambda: table.row_count == 2, "the models")
        table.focus()
        table.move_cursor(row=0)
        await pilot.press("a")
        await wait_until(
            pilot, lambda: any("Now chatting with other" in n.message for n in app._notifications), "the switch"
        )
        await wait_until(pilot, lambda: table.get_row_at(0)[0] == "●", "the active mark")
        await pilot.pause()
        assert errors(app) == []


@pytest.fixture
def starter(chat_model_dir) -> None:
    """A brewed starter: the tiny chat model in KETTLE_HOME/models/starter, registered, active."""
    path = models_dir() / "starter"
    shutil.copytree(chat_model_dir, path)
    with open_store() as store:
        store.activate_model(store.add_model_version("starter", path, kind="starter").id)


async def brew_again(pilot, app, choice: str) -> list[str]:
    """On the models screen, b with a starter already there, pick `choice` in the question the
    app asks; returns the brew command it starts (which is then cancelled: it takes minutes)."""
    await open_chat(pilot, app)
    await pilot.press("f4")
    await wait_until(pilot, lambda: app.current_mode == "models", "the models screen")
    await pilot.press("b")
    await wait_until(pilot, lambda: isinstance(app.screen, ChoiceModal), "the question")
    options = app.screen.query_one("#choices")
    options.highlighted = [o.id for o in options._options].index(choice)
    await pilot.press("enter")
    await wait_until(pilot, lambda: isinstance(app.screen, TaskModal), "the brew")
    args = app.screen.args
    await pilot.press("escape")  # stops the brew's process
    await wait_until(
        pilot,
        lambda: (
            app.current_mode == "models"
            and not isinstance(app.screen, TaskModal)
            and not [w for w in app.workers if w.group == "model-task" and w.is_running]
        ),
        "the models screen again",
        timeout=60,
    )
    await pilot.pause()
    return args


async def test_a_second_starter_can_be_brewed_under_a_new_name(starter):
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        args = await brew_again(pilot, app, "new")
        assert args == ["brew", "starter", "--out", str(models_dir() / "starter-2")]
        assert errors(app) == []  # cancelled by the user: no error, no TypeError after it
        assert not (models_dir() / "starter-2").exists()


async def test_the_starter_can_be_replaced(starter):
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        args = await brew_again(pilot, app, "replace")
        assert args == ["brew", "starter", "--force"]
        assert errors(app) == []


def answers_to(store, question: str) -> list:
    """The stored answers to the (one) user message `question`."""
    [asked] = [
        m
        for c in store.list_conversations()
        for m in store.messages(c.id)
        if m.role == "user" and m.content == question
    ]
    return [m for m in store.messages(asked.conversation_id) if m.parent_id == asked.id]


async def test_new_chat_right_after_sending_keeps_the_answer(app_model):
    write_config(sampling={"max_new_tokens": 6, "seed": 7})
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_chat(pilot, app)
        await type_text(pilot, "hello")
        press_nowait(app, "enter", "\r")
        # Ctrl+N once the question's chat exists, before its answer has started
        await wait_until(pilot, lambda: app.screen.conversation is not None, "the new chat")
        await pilot.press("ctrl+n")
        await wait_until(pilot, lambda: not app.screen.generating, "the answer")
        [answer] = answers_to(app.store, "hello")
        assert answer.finish_reason == "length" and answer.content
        assert views(app)[-1].message_id == answer.id  # still shown in its own conversation
        assert any("still answering" in n.message for n in app._notifications)
        assert errors(app) == []


async def test_stop_pressed_before_the_first_token_stores_a_cancelled_answer(app_model):
    write_config(sampling={"max_new_tokens": 2000, "temperature": 0})
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_chat(pilot, app)
        await type_text(pilot, "hello")
        press_nowait(app, "enter", "\r")
        # Esc while the question is being stored, before the model has it
        await wait_until(pilot, lambda: app.screen.conversation is not None, "the new chat")
        press_nowait(app, "escape", "\x1b")
        await wait_until(pilot, lambda: not app.screen.generating, "the stopped answer")
        [answer] = answers_to(app.store, "hello")
        assert answer.finish_reason == "cancelled" and answer.new_tokens < 2000
        assert errors(app) == []


async def test_search_finds_corrections_esc_leaves_it_and_y_copies_the_correction(short_answers):
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_chat(pilot, app)
        await ask(pilot, app, "hi")
        view = await focus_answer(pilot, app)
        await pilot.press("c")
        await wait_until(pilot, lambda: isinstance(app.screen, EditorModal), "the editor")
        app.screen.query_one("#editor").text = "The kettle whistles."
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: view.label is not None and view.label.ideal, "the correction")
        view.focus()
        await pilot.press("y")
        assert app.clipboard == "The kettle whistles."  # what is shown, not the original
        await pilot.press("ctrl+f")
        await type_text(pilot, "whistles")
        options = app.screen.query_one("#chat-options")
        await wait_until(
            pilot, lambda: "whistles" in str(options.get_option_at_index(0).prompt), "the correction found"
        )
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.focused is app.screen.query_one("#prompt"), "the prompt")
        assert app.screen.query_one("#chat-search").value == ""
        await wait_until(pilot, lambda: "hi" in str(options.get_option_at_index(0).prompt), "the chats")


async def start_and_cancel(pilot, app) -> Run:
    """Ctrl+G on the sheet, then Ctrl+X once the run has taken a step; returns the run."""
    screen = app.screen
    screen.query_one("#ft-epochs").value = "1000"  # far more than the test waits for
    await pilot.press("ctrl+g")
    await wait_until(
        pilot,
        lambda: screen.run is not None and screen.run.status == "running" and screen.run.step >= 1,
        "the first steps",
        timeout=120,
    )
    await pilot.press("ctrl+x")
    try:
        await wait_until(pilot, lambda: screen.run.status == "cancelled", "the cancellation", timeout=120)
    except AssertionError:
        from pathlib import Path

        run = app.store.run(screen.run.id)
        raise AssertionError(
            f"run {run.id} {run.status} pid {run.pid} step {run.step}/{run.total_steps} "
            f"error {run.error!r}; log: {Path(run.log_path).read_text()[-1500:]}"
        ) from None
    return screen.run


async def test_finetune_reuses_an_identical_snapshot_and_can_pick_a_named_one(app_model):
    with open_store() as store:
        labelled_chats(store)
        first = store.create_snapshot(name="first ten")
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_finetune_sheet(pilot, app)
        data = app.screen.query_one("#ft-data")
        assert data.value == "current"
        run = await start_and_cancel(pilot, app)
        assert run.snapshot_id == first.id  # the same content: no second copy
        assert [s.id for s in app.store.snapshots()] == [first.id]
        # a new label: the current labels differ from the snapshot, which can still be picked
        conv = app.store.create_conversation(title="More")
        q = app.store.add_message(conv.id, "user", content="One more?")
        app.store.set_label(app.store.add_message(conv.id, "assistant", content="Yes.", parent_id=q.id).id, thumb=1)
        app.screen.load_plan()
        summary = app.screen.query_one("#sheet-summary")
        await wait_until(pilot, lambda: "11 examples" in str(summary.render()), "the new count")
        data.value = first.id
        await wait_until(
            pilot, lambda: "10 examples from snapshot #1 first ten" in str(summary.render()), "the snapshot's count"
        )
        run = await start_and_cancel(pilot, app)
        assert run.snapshot_id == first.id
        assert [s.id for s in app.store.snapshots()] == [first.id]


SMALL = (80, 24)


async def test_a_multi_line_message_keeps_its_line_breaks(short_answers):
    app = KettleApp()
    async with app.run_test(size=SMALL) as pilot:
        await open_chat(pilot, app)
        await type_text(pilot, "first line")
        await pilot.press("ctrl+j")
        await type_text(pilot, "second line")
        await pilot.press("enter")
        await wait_until(pilot, lambda: views(app) and views(app)[0].message is not None, "the question")
        await pilot.pause()
        assert views(app)[0].body.size.height == 2


async def test_the_chat_stays_readable_at_80_columns_with_the_sampling_panel(short_answers):
    app = KettleApp()
    async with app.run_test(size=SMALL) as pilot:
        await open_chat(pilot, app)
        await pilot.press("ctrl+s")
        await pilot.pause()
        screen = app.screen
        assert screen.query_one("#sampling").display and app.focused.id == "param-temperature"
        assert screen.query_one("#chat-main").size.width >= 45
        assert not screen.query_one("#sidebar").display  # the panel took the list's place
        await pilot.press("ctrl+f")  # the list takes it back
        await pilot.pause()
        assert screen.query_one("#sidebar").display and not screen.query_one("#sampling").display
        assert app.focused.id == "chat-search"
        await pilot.press("escape", "ctrl+s", "ctrl+s")  # the panel open and closed: the list stays
        await pilot.pause()
        assert screen.query_one("#sidebar").display and app.focused.id == "prompt"


async def test_every_dataset_column_is_in_view_at_80_columns(app_model):
    with open_store() as store:
        labelled_chats(store, tag="facts")
    app = KettleApp()
    async with app.run_test(size=SMALL) as pilot:
        await open_chat(pilot, app)
        await pilot.press("f3")
        await wait_until(
            pilot,
            lambda: app.current_mode == "dataset" and app.screen.query_one("#dataset-table").row_count == 10,
            "the examples",
        )
        await pilot.pause()
        table = app.screen.query_one("#dataset-table")
        assert table.virtual_size.width <= table.size.width  # nothing to scroll sideways to
        assert [str(c.label) for c in table.columns.values()] == ["#", "Prompt", "Answer", "Label", "Turns"]
        assert str(table.get_row_at(0)[3]).startswith("▲ up")


async def test_the_loss_chart_is_smoothed_and_the_last_loss_shown_as_it_is(app_model):
    with open_store() as store:
        labelled_chats(store)
        run = store.create_run("finetune", total_steps=60)
        for step in range(1, 61):  # batch to batch the loss jumps around a falling trend
            store.log_metrics(run.id, step, metrics={"loss": 3 - step / 30 + (0.8 if step % 2 else -0.8)})
        store.update_run(run.id, status="cancelled", step=60)
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_finetune_sheet(pilot, app)
        app.screen.follow(run.id)
        chart = app.screen.query_one("#loss-chart")
        await wait_until(pilot, lambda: len(chart.data) == 60, "the chart")
        steps = [b - a for a, b in zip(chart.data, chart.data[1:])]
        assert max(abs(s) for s in steps[10:]) < 0.25  # the raw losses jump by 1.6 every step
        assert chart.data[-1] < chart.data[0]  # the trend stays
        assert "now 0.200" in str(app.screen.query_one("#loss-caption").render())  # the raw last loss
