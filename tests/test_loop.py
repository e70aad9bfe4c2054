"""The product's loop as a new user meets it, on the defaults (slow: it brews the real starter).

Welcome screen, `b` brews the starter; in the chat the user asks ten Python questions and corrects
each answer with `c` (after the first, a fine-tune of that one alone must give it back and pass the
gate); F5, Ctrl+G starts the sheet's default plan; Ctrl+W switches to the new
model; asked again, it must give the corrections back. Only the chat's sampling is set (greedy,
through config.json as a user would): the fine-tuning settings are the app's own."""

from __future__ import annotations

import json

import pytest

from tests.conftest import FIXTURES
from tests.tui.test_app import (
    SIZE,
    ask,
    focus_answer,
    open_chat,
    wait_until,
    write_config,
)
from tui.app import KettleApp

CORRECTIONS = [json.loads(line)["messages"] for line in (FIXTURES / "corrections.jsonl").read_text().splitlines()]
# The first five corrections' questions in other words (written by hand, not by finetune.lessons).
REWORDED = [
    "how can I duplicate a list",
    "What's enumerate for?",
    "What is the way to turn a string into an int?",
    "Explain what a set is.",
    "How can I split some text into its words?",
]


async def correct(pilot, app, question: str, answer: str) -> None:
    await ask(pilot, app, question)
    view = await focus_answer(pilot, app)
    await pilot.press("c")
    await wait_until(pilot, lambda: app.screen.__class__.__name__ == "EditorModal", "the editor")
    app.screen.query_one("#editor").text = answer
    await pilot.press("ctrl+s")
    await wait_until(pilot, lambda: view.label is not None and view.label.ideal == answer, "the correction")


async def fine_tune(pilot, app, examples: str):
    """F5 and Ctrl+G on the sheet's defaults, once it plans `examples`; the screen, its run ended."""
    await pilot.press("f5")
    await wait_until(
        pilot,
        lambda: app.current_mode == "finetune" and examples in str(app.screen.query_one("#sheet-summary").render()),
        "the fine-tune sheet",
    )
    screen = app.screen
    before = screen.run.id if screen.run is not None else None
    await pilot.press("ctrl+g")
    await wait_until(
        pilot,
        lambda: (
            screen.run is not None
            and screen.run.id != before
            and screen.run.status in ("finished", "failed", "cancelled")
        ),
        "the run to end",
        timeout=15 * 60,
    )
    assert screen.run.status == "finished", screen.run.error
    return screen


@pytest.mark.slow
async def test_a_new_user_corrects_ten_answers_and_gets_them_back():
    write_config(sampling={"temperature": 0, "max_new_tokens": 80})
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.current_mode == "welcome", "the welcome screen")
        await pilot.press("b")  # brews in a child process, then opens the chat
        await wait_until(
            pilot,
            lambda: app.current_mode == "chat" and app.focused is not None and app.focused.id == "prompt",
            "the brewed starter",
            timeout=30 * 60,
        )
        for n, (question, answer) in enumerate((c[0]["content"], c[1]["content"]) for c in CORRECTIONS[:10]):
            await pilot.press("ctrl+n")
            await open_chat(pilot, app)
            await correct(pilot, app, question, answer)
            if n == 0:  # a new user's first try: one correction, fine-tuned at once
                screen = await fine_tune(pilot, app, "1 example")
                m = screen.output.metrics
                assert (m["recall"], m["recall_of"], m["gate"]) == (1, 1, "passed"), m
                await pilot.press("f2")
        screen = await fine_tune(pilot, app, "10 examples")
        m = screen.output.metrics
        # the gate read the probe's answers: no more loops, no leak, the base's answers kept
        assert m["recall"] >= 9 and m["recall_of"] == 10 and m["gate"] == "passed", m.get("gate_reasons")
        result = str(screen.query_one("#finetune-result").render())
        assert f"your corrections: {m['recall']} of 10 now come back" in result
        await pilot.press("ctrl+w")
        await wait_until(
            pilot,
            lambda: app.service.active_model is not None and app.service.active_model.name == screen.output.name,
            "the switch",
        )
        await pilot.press("f2")
        back = 0
        for question, answer in ((c[0]["content"], c[1]["content"]) for c in CORRECTIONS[:10]):
            await pilot.press("ctrl+n")
            await open_chat(pilot, app)
            view = await ask(pilot, app, question)
            back += view.message.content == answer
        assert back >= 9
        # In other words, and in the middle of one chat: as a user asks again next day.
        await pilot.press("ctrl+n")
        await open_chat(pilot, app)
        again = 0
        for n, question in enumerate(REWORDED):
            if n % 2:
                await ask(pilot, app, "Thanks! Another question.")
            view = await ask(pilot, app, question)
            again += view.message.content == CORRECTIONS[n][1]["content"]
        assert again >= 4, again
