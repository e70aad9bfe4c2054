"""The app driven by Textual's Pilot, with a tiny real model and a temporary store (KETTLE_HOME).

Answers are capped (config.json "sampling") and seeded so every run sees the same text."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from textual import events

from data import memory
from data.paths import config_path
from data.store import open_store
from gpt.chat_template import render_prompt
from gpt.engine import Engine
from gpt.sampling import get_preset
from gpt.tokenizer import load_tokenizer
from tui.app import KettleApp
from tui.screens.chat import grounding
from tui.widgets.chat import MessageView

SIZE = (140, 44)
# Greedy decoding makes this random model write to the token limit (it never picks the end).
LONG = {"temperature": 0, "repetition_penalty": 1.0}


def write_config(**settings) -> None:
    config_path().write_text(json.dumps(settings), encoding="utf-8")


async def wait_until(pilot, condition, what, timeout: float = 20.0) -> None:
    """Wait for `condition()`; `what` names it in the failure (a callable: worked out then)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")
        await asyncio.sleep(0.005)  # not pilot.pause: that waits for every queue to drain


def press_nowait(app, key: str, char: str | None = None) -> None:
    """A key press as the terminal would deliver it, without Pilot's wait for every queue to
    drain (which, during a streamed answer, would wait for the whole answer)."""
    app.post_message(events.Key(key, char))


async def type_text(pilot, text: str) -> None:
    await pilot.press(*["space" if ch == " " else ch for ch in text])


async def open_chat(pilot, app, timeout: float = 20.0) -> None:
    await wait_until(
        pilot,
        lambda: app.current_mode == "chat" and app.focused is not None and app.focused.id == "prompt",
        "the chat screen",
        timeout,
    )


def views(app) -> list[MessageView]:
    return list(app.screen.query(MessageView))


async def ask(pilot, app, text: str) -> MessageView:
    """Type a message, press Enter, wait for the stored answer; returns its view."""
    before = len([v for v in views(app) if v.role == "assistant" and v.message])
    await type_text(pilot, text)
    await pilot.press("enter")
    await wait_until(
        pilot,
        lambda: (
            not app.screen.generating and len([v for v in views(app) if v.role == "assistant" and v.message]) > before
        ),
        "the answer",
    )
    return views(app)[-1]


async def focus_answer(pilot, app) -> MessageView:
    view = [v for v in views(app) if v.role == "assistant"][-1]
    view.focus()
    await pilot.pause()
    return view


@pytest.fixture
def short_answers(app_model):
    write_config(sampling={"max_new_tokens": 6, "seed": 7})
    return app_model


async def test_ctrl_c_says_in_plain_text_how_to_quit_and_stop_an_answer():
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.current_mode == "welcome", "the welcome screen")
        await pilot.press("ctrl+c")
        await pilot.pause()
        hint = [n.message for n in app._notifications if n.title == "Do you want to quit?"]
        assert hint == ["Press ctrl+q to quit the app; Esc stops an answer being written."]


async def test_welcome_screen_when_there_is_no_model():
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(
            pilot, lambda: app.current_mode == "welcome" and app.screen.query("Button"), "the welcome screen"
        )
        text = " ".join(str(b.label) for b in app.screen.query("Button"))
        assert "starter" in text and "GPT-2" in text and "Import" in text
        await pilot.press("f2")  # the chat needs a model: the app says so and stays
        await pilot.pause()
        assert app.current_mode == "welcome"
        assert any("no model" in n.message for n in app._notifications)


async def test_send_a_message_and_see_the_streamed_answer_stored(app_model):
    write_config(sampling={"max_new_tokens": 60, **LONG})
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_chat(pilot, app)
        await type_text(pilot, "hello")
        press_nowait(app, "enter", "\r")
        partial = []  # pieces counted on screen while the answer was still being written
        while not (views(app) and views(app)[-1].role == "assistant" and views(app)[-1].message):
            if app.screen.generating and app.screen.streamed_tokens:
                partial.append(app.screen.streamed_tokens)
            await asyncio.sleep(0.002)
        await wait_until(pilot, lambda: not app.screen.generating, "the end of the answer")
        answer = views(app)[-1]
        stored = app.store.message(answer.message_id)
        assert partial and min(partial) < stored.new_tokens, "the answer should appear as it is written"
        assert stored.role == "assistant" and stored.content == answer.content
        assert stored.finish_reason == "length" and stored.new_tokens == 60
        assert stored.model == "tiny" and stored.model_version_id is not None
        assert stored.params["temperature"] == 0 and stored.params["max_new_tokens"] == 60
        user = app.store.message(stored.parent_id)
        assert user.content == "hello"
        assert app.store.conversation(stored.conversation_id).title == "hello"
        footer = str(answer.query_one(".message-footer").render())
        assert "tiny" in footer and "tok/s" in footer and "60 tokens" in footer


async def test_label_an_answer_up_and_score_it(short_answers):
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_chat(pilot, app)
        await ask(pilot, app, "hi")
        view = await focus_answer(pilot, app)
        await pilot.press("u", "4")
        await wait_until(pilot, lambda: view.label is not None and view.label.score == 4, "the label")
        label = app.store.label(view.message_id)
        assert label.thumb == 1 and label.score == 4
        assert "▲ up" in str(view.query_one(".message-header").render())
        await pilot.press("u")  # the same key again takes the vote back
        await wait_until(pilot, lambda: view.label.thumb is None, "the vote removed")
        assert app.store.label(view.message_id).thumb is None
        assert app.store.label(view.message_id).score == 4
        await pilot.press("t")
        await wait_until(pilot, lambda: app.screen.__class__.__name__ == "TextModal", "the tags box")
        await type_text(pilot, "tone, facts")
        await pilot.press("enter")
        await wait_until(pilot, lambda: view.label.tags == ["tone", "facts"], "the tags")
        await pilot.press("n")
        await wait_until(pilot, lambda: app.screen.__class__.__name__ == "TextModal", "the note box")
        await type_text(pilot, "too short")
        await pilot.press("enter")
        await wait_until(pilot, lambda: view.label.note == "too short", "the note")
        label = app.store.label(view.message_id)
        assert label.tags == ["tone", "facts"] and label.note == "too short" and label.score == 4
        header = str(view.query_one(".message-header").render())
        assert "#tone" in header and "✉ note" in header
        # every key is also a command in the palette (Ctrl+P)
        view.focus()
        down = next(c for c in app.get_system_commands(app.screen) if c.title == "Message: Bad")
        down.callback()
        await wait_until(pilot, lambda: view.label.thumb == -1, "the palette's vote")


async def test_correct_an_answer_keeps_the_original(short_answers):
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_chat(pilot, app)
        await ask(pilot, app, "hi")
        view = await focus_answer(pilot, app)
        original = view.content
        await pilot.press("c")
        await wait_until(pilot, lambda: app.screen.__class__.__name__ == "EditorModal", "the editor")
        editor = app.screen.query_one("#editor")
        assert editor.text == original  # prefilled with the answer
        editor.text = ""
        await type_text(pilot, "the better answer")
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: view.label is not None and view.label.ideal is not None, "the correction")
        assert app.store.label(view.message_id).ideal == "the better answer"
        assert app.store.message(view.message_id).content == original
        assert "✎ corrected" in str(view.query_one(".message-header").render())
        assert "the better answer" in str(view.query_one(".message-ideal").render())


async def test_regenerate_makes_a_sibling_and_arrows_step_between_them(app_model):
    write_config(sampling={"max_new_tokens": 12})  # no seed: the two answers differ
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_chat(pilot, app)
        first = await ask(pilot, app, "hi")
        first_id, first_text = first.message_id, first.content
        view = await focus_answer(pilot, app)
        await pilot.press("r")
        await wait_until(
            pilot,
            lambda: (
                views(app)[-1].message is not None
                and views(app)[-1].message_id != first_id
                and not app.screen.generating
            ),
            "the regenerated answer",
        )
        second = views(app)[-1]
        assert second.position == (2, 2)
        assert [m.id for m in app.store.siblings(first_id)] == [first_id, second.message_id]
        assert len(views(app)) == 2  # the question and the shown answer only
        second.focus()
        await pilot.press("left")
        await wait_until(pilot, lambda: views(app)[-1].message_id == first_id, "the first sibling")
        assert views(app)[-1].position == (1, 2) and views(app)[-1].content == first_text
        assert app.store.conversation(second.message.conversation_id).leaf_id == first_id
        views(app)[-1].focus()
        await pilot.press("right")
        await wait_until(pilot, lambda: views(app)[-1].message_id == second.message_id, "back")
        del view


async def test_edit_an_earlier_message_and_ask_again(short_answers):
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_chat(pilot, app)
        answer = await ask(pilot, app, "hi")
        question = views(app)[0]
        question.focus()
        await pilot.press("y")
        assert app.clipboard == "hi"
        await pilot.press("e")
        await wait_until(pilot, lambda: app.screen.__class__.__name__ == "EditorModal", "the editor")
        app.screen.query_one("#editor").text = "hello instead"
        await pilot.press("ctrl+s")
        await wait_until(
            pilot,
            lambda: (
                len(views(app)) == 2
                and views(app)[0].content == "hello instead"
                and views(app)[1].message is not None
                and not app.screen.generating
            ),
            "the new branch",
        )
        new_question = views(app)[0]
        assert new_question.position == (2, 2)
        assert app.store.message(views(app)[1].message_id).parent_id == new_question.message_id
        assert app.store.message(answer.message_id).content == answer.content  # old branch kept


async def test_stop_a_generation_with_escape(app_model):
    write_config(sampling={"max_new_tokens": 2000, **LONG})
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_chat(pilot, app)
        await type_text(pilot, "hello")
        press_nowait(app, "enter", "\r")
        await wait_until(pilot, lambda: app.screen.generating and app.screen.streamed_tokens > 0, "the answer to start")
        press_nowait(app, "escape", "\x1b")
        await wait_until(
            pilot, lambda: not app.screen.generating and views(app)[-1].message is not None, "the stopped answer"
        )
        stored = app.store.message(views(app)[-1].message_id)
        assert stored.finish_reason == "cancelled"
        assert stored.new_tokens < 2000
        assert "stopped by you" in str(views(app)[-1].query_one(".message-footer").render())


async def test_bad_sampling_values_are_refused_with_a_message(short_answers):
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_chat(pilot, app)
        await pilot.press("ctrl+s")
        temperature = app.screen.query_one("#param-temperature")
        assert app.focused is temperature
        temperature.value = ""
        await type_text(pilot, "hot")
        await pilot.pause()
        error = str(app.screen.query_one("#error-temperature").render())
        assert "temperature must be a number" in error
        assert temperature.has_class("-invalid")
        top_p = app.screen.query_one("#param-top_p")
        top_p.value = "5"
        await pilot.pause()
        assert "top_p must be in (0, 1]" in str(app.screen.query_one("#error-top_p").render())
        app.screen.query_one("#prompt").focus()
        await type_text(pilot, "hi")
        await pilot.press("enter")
        await pilot.pause()
        assert any("Fix the sampling settings" in n.message for n in app._notifications)
        assert views(app) == [] and app.store.list_conversations() == []
        # fixed values are accepted, used for the answer and saved with the conversation
        temperature.value = "0.3"
        top_p.value = "0.8"
        await pilot.pause()
        app.screen.query_one("#prompt").focus()
        await pilot.press("enter")
        await wait_until(
            pilot,
            lambda: views(app) and views(app)[-1].message is not None and views(app)[-1].role == "assistant",
            "the answer",
        )
        answer = app.store.message(views(app)[-1].message_id)
        assert answer.params["temperature"] == 0.3 and answer.params["top_p"] == 0.8
        conv = app.store.conversation(answer.conversation_id)
        assert conv.params["temperature"] == 0.3


async def test_presets_and_system_prompt_are_saved_per_conversation(short_answers):
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_chat(pilot, app)
        answer = await ask(pilot, app, "hi")
        conv_id = answer.message.conversation_id
        await pilot.press("ctrl+s")
        app.screen.query_one("#preset").value = "precise"
        app.screen.query_one("#system-prompt").text = "Be brief."
        await wait_until(
            pilot,
            lambda: (
                (app.store.conversation(conv_id).params or {}).get("temperature") == 0.2
                and app.store.conversation(conv_id).system_prompt == "Be brief."
            ),
            "the settings saved",
        )
        assert str(app.screen.query_one("#param-top_k").value) == "40"
        # a new chat starts from the defaults; going back restores the conversation's settings
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert app.screen.query_one("#param-temperature").value == "0.7"
        app.screen.open_conversation(conv_id)
        await wait_until(
            pilot, lambda: app.screen.query_one("#param-temperature").value == "0.2", "the conversation's settings"
        )
        assert app.screen.query_one("#system-prompt").text == "Be brief."


async def test_the_as_trained_preset_answers_greedily_as_the_engine_does(short_answers, chat_model_dir):
    """The preset a fine-tune's verdict reads answers with: chosen in the panel, the chat's
    settings are greedy with no penalty, and its answer is the engine's greedy one."""
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_chat(pilot, app)
        await pilot.press("ctrl+s")
        app.screen.query_one("#preset").value = "as-trained"
        await wait_until(pilot, lambda: app.screen.params.temperature == 0, "the preset's settings")
        assert app.screen.params == get_preset("as-trained").replace(seed=7)  # the chat's seed stays
        assert app.screen.query_one("#param-repetition_penalty").value == "1.0"
        app.screen.query_one("#prompt").focus()
        answer = await ask(pilot, app, "hi")
    want = Engine.load(chat_model_dir).generate_chat([{"role": "user", "content": "hi"}], get_preset("as-trained"))
    assert answer.content == want.text and answer.message.new_tokens == want.new_tokens


async def test_the_context_meter_counts_the_conversation_and_shows_what_no_longer_fits(short_answers, tiny_model_dir):
    """The chat's meter: the conversation's prompt tokens (the chat format, the model's own
    tokenizer) of the model's context, after each turn; on a model with a shorter context
    (switched to on the models screen) the oldest turn no longer fits, and the meter says so."""
    with open_store() as store:
        store.add_model_version("short", tiny_model_dir, kind="imported")  # context 128, the chat model's 4,096
    tokenizer = load_tokenizer(tiny_model_dir)  # both models have it
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_chat(pilot, app)
        meter = app.screen.query_one("#context-meter")

        async def shows(text: str) -> None:
            await wait_until(pilot, lambda: str(meter.render()) == text, lambda: f"{text!r}, not {meter.render()}")

        await shows(f"ctx {len(render_prompt([], tokenizer))}/4,096")  # the answer's header alone
        # A long question, put in the prompt at once (typed key by key it takes seconds).
        app.screen.query_one("#prompt").text = (
            "Which colours did the painter choose for the portrait of his wife, and why did the "
            "critics in London and Paris disagree so loudly about the frame, the light and the hands, "
            "when the sketches he kept in the studio upstairs show quite another picture of her?"
        )
        first = await ask(pilot, app, "")
        await shows(f"ctx {len(render_prompt(app.store.chat_messages(first.message_id), tokenizer))}/4,096")
        second = await ask(pilot, app, "hi")
        chat = app.store.chat_messages(second.message_id)
        full, newest = len(render_prompt(chat, tokenizer)), len(render_prompt(chat[2:], tokenizer))
        await shows(f"ctx {full}/4,096")
        assert not meter.has_class("-dropping")
        budget = 128 - app.screen.params.max_new_tokens  # the prompt's room beside the answer's
        assert newest <= budget < full  # the first turn no longer fits on the short model

        await pilot.press("f4")
        table = app.screen.query_one("#models-table")
        await wait_until(pilot, lambda: table.row_count == 2, "the models")
        table.focus()
        table.move_cursor(row=0)  # short, the newest
        await pilot.press("a")
        await wait_until(pilot, lambda: app.service.active_model.name == "short", "the switch")
        await pilot.press("f2")
        await shows(f"ctx {newest}/128 · {full - newest:,} oldest dropped to fit")
        assert meter.has_class("-dropping")


async def test_chat_list_search_rename_and_delete_with_confirmation(short_answers):
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_chat(pilot, app)
        await ask(pilot, app, "apples")
        await pilot.press("ctrl+n")
        await ask(pilot, app, "bananas")
        options = app.screen.query_one("#chat-options")
        await wait_until(pilot, lambda: options.option_count == 2, "two chats")
        assert "bananas" in str(options.get_option_at_index(0).prompt)  # newest first
        await pilot.press("ctrl+f")
        await type_text(pilot, "apples")
        await wait_until(
            pilot,
            lambda: options.option_count == 1 and "apples" in str(options.get_option_at_index(0).prompt),
            "the hit",
        )
        await pilot.press("enter")  # from the search box to the results
        await pilot.press("enter")  # open the hit
        await wait_until(pilot, lambda: views(app) and views(app)[0].content == "apples", "the chat")
        app.screen.query_one("#chat-search").value = ""
        await wait_until(pilot, lambda: options.option_count == 2, "the list back")
        options.focus()
        options.highlighted = 1
        await pilot.press("r")
        await wait_until(pilot, lambda: app.screen.__class__.__name__ == "TextModal", "rename")
        app.screen.query_one("#text").value = "Fruit"
        await pilot.press("enter")
        await wait_until(
            pilot, lambda: any(c.title == "Fruit" for c in app.store.list_conversations()), "the new title"
        )
        await wait_until(
            pilot,
            lambda: (
                "Fruit" in str(options.get_option_at_index(0).prompt)
                or "Fruit" in str(options.get_option_at_index(1).prompt)
            ),
            "the list",
        )
        options.focus()
        options.highlighted = next(i for i in range(2) if "bananas" in str(options.get_option_at_index(i).prompt))
        await pilot.press("delete")
        await wait_until(pilot, lambda: app.screen.__class__.__name__ == "ConfirmModal", "the question")
        await pilot.press("escape")  # no: nothing is deleted
        await pilot.pause()
        assert len(app.store.list_conversations()) == 2
        await pilot.press("delete")
        await wait_until(pilot, lambda: app.screen.__class__.__name__ == "ConfirmModal", "the question")
        await pilot.press("y")
        await wait_until(pilot, lambda: len(app.store.list_conversations()) == 1, "the deletion")
        assert [c.title for c in app.store.list_conversations()] == ["Fruit"]


async def test_keys_can_be_remapped_and_the_theme_is_remembered(short_answers):
    write_config(sampling={"max_new_tokens": 12, "seed": 7}, keys={"chat.sampling": "f9"})
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_chat(pilot, app)
        await pilot.press("f9")
        await pilot.pause()
        assert app.screen.query_one("#sampling").display
        app.theme = "nord"
        await pilot.pause()
        await pilot.press("f1")
        await pilot.pause()
        table = app.screen.query_one("#keys")
        rows = [table.get_row_at(i) for i in range(table.row_count)]
        assert any(r[3] == "chat.sampling" and "f9" in r[1].lower() for r in rows)
    saved = json.loads(config_path().read_text())
    assert saved["theme"] == "nord" and saved["keys"] == {"chat.sampling": "f9"}
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_chat(pilot, app)
        assert app.theme == "nord"


async def test_a_broken_config_file_is_reported_and_left_alone(app_model):
    config_path().write_text("{not json", encoding="utf-8")
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_chat(pilot, app)
        assert any("not valid JSON" in n.message for n in app._notifications)
        app.theme = "nord"
        await pilot.pause()
    assert config_path().read_text() == "{not json"


async def test_a_missing_model_directory_is_a_notification(app_model):
    import shutil

    from data.paths import models_dir

    shutil.rmtree(models_dir() / "tiny")
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_chat(pilot, app)
        await wait_until(pilot, lambda: app.load_failed, "the failed load")
        await pilot.pause()
        assert any("no such model directory" in n.message and n.severity == "error" for n in app._notifications)
        assert "did not load" in str(app.screen.query_one("#chat-status").render())


def test_an_answer_of_one_token_says_token():
    from data.records import Message
    from tui.widgets.chat import usage_text

    one = Message(1, 1, None, "assistant", "Hi", 0.0, model="tiny", new_tokens=1, finish_reason="cancelled")
    assert usage_text(one) == "tiny · 1 token · stopped by you"
    many = Message(2, 1, None, "assistant", "Hi there", 0.0, new_tokens=1024)
    assert usage_text(many).startswith("1,024 tokens")


async def test_a_correction_answers_the_question_reworded_at_once_with_its_source(short_answers):
    """Grounding: after c, the same question in other words gets the corrected answer from
    memory before any fine-tune, the answer says where it came from (o opens it); with grounding
    off for the chat (ctrl+g) it does not."""
    write_config(sampling={"max_new_tokens": 30, "temperature": 0})
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_chat(pilot, app)
        await ask(pilot, app, "How do I reverse a list?")
        view = await focus_answer(pilot, app)
        await pilot.press("c")
        await wait_until(pilot, lambda: app.screen.__class__.__name__ == "EditorModal", "the editor")
        app.screen.query_one("#editor").text = "Call my_list.reverse() to reverse it in place."
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: view.label is not None and view.label.ideal is not None, "the correction")
        app.screen.query_one("#prompt").focus()
        answer = await ask(pilot, app, "How can I reverse a Python list?")
        assert answer.content == "Call my_list.reverse() to reverse it in place."
        assert answer.sources[0].kind == "correction"  # first; Python's documentation may follow
        footer = answer.query_one(".message-footer")
        assert "your correction: How do I reverse a list?" in str(footer.render())
        assert footer.size.height == 2  # the sources' line is shown, not cut off
        stored = app.store.current_thread(app.screen.conversation.id)[-1]
        assert memory.answer_sources(app.store, stored.id)[0].text == answer.content
        answer.focus()
        await pilot.press("o")
        await wait_until(pilot, lambda: app.screen.__class__.__name__ == "ChoiceModal", "the sources")
        assert str(app.screen.query_one(".dialog-hint").render()) == "Esc closes"  # nothing to choose there
        await pilot.press("escape")
        app.screen.query_one("#prompt").focus()
        await pilot.press("ctrl+g")
        plain = await ask(pilot, app, "How can I reverse a Python list?")
        assert plain.content != answer.content and plain.sources == []
        # off before a new chat's first question: that chat is answered from the model alone
        await pilot.press("ctrl+n")
        await pilot.pause()
        await pilot.press("ctrl+g")
        assert app._notifications and "Grounding off" in list(app._notifications)[-1].message
        fresh = await ask(pilot, app, "How can I reverse a Python list?")
        assert fresh.sources == [] and not grounding(app.screen.conversation)


async def test_the_models_own_lessons_are_memory_in_the_chat(short_answers):
    """The lessons the active model carries (its replay file) are indexed when it loads: asked in
    other words, the answer is grounded in the lesson and names it."""
    from data.paths import models_dir
    from finetune.replay import REPLAY_FILE, replay_text

    lesson = [{"role": "user", "content": "How do I descale a kettle?"}]
    lesson.append({"role": "assistant", "content": "Boil citric acid in it."})
    (models_dir() / "tiny" / REPLAY_FILE).write_text(replay_text([lesson], []))
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_chat(pilot, app)

        def indexed():  # at start, in the background, as a user would be typing
            return app.store._row("SELECT COUNT(*) AS n FROM lessons")["n"] == 1

        await wait_until(pilot, indexed, "the model's lessons indexed")
        answer = await ask(pilot, app, "How can I descale my kettle?")
        assert [(p.kind, p.source, p.text) for p in answer.sources] == [("lesson", "tiny", "Boil citric acid in it.")]
        assert "tiny's lesson: How do I descale a kettle?" in str(answer.query_one(".message-footer").render())
