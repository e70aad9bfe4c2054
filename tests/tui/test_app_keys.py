"""Keys and focus in the chat, driven by Pilot with a tiny real model: what a key does depends
only on what the user sees focused, and keys pressed faster than the app answers are all
honoured, in order (issue 22, items 13-15)."""

from __future__ import annotations

from test_app import SIZE, ask, focus_answer, open_chat, press_nowait, type_text, views, wait_until, write_config

from tui.app import KettleApp
from tui.widgets.chat import PromptArea


def burst(app, keys: str) -> None:
    """Keys as a fast typist (or a loaded machine's terminal) delivers them: all queued before
    the app has handled the first."""
    for key in keys.split():
        press_nowait(app, key, key if len(key) == 1 else None)


def modal_name(app) -> str:
    return app.screen.__class__.__name__


def settled(app) -> bool:
    """The chat shows a stored last answer and is not writing one."""
    shown = views(app)
    return bool(shown) and shown[-1].message is not None and not app.screen.generating


async def settle(pilot, app) -> None:
    await wait_until(pilot, lambda: not app.screen.generating, "the answer")
    await pilot.pause()


async def test_escape_closes_the_correction_editor_without_saving(app_model):
    write_config(sampling={"max_new_tokens": 6, "seed": 7})
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_chat(pilot, app)
        await ask(pilot, app, "hi")
        view = await focus_answer(pilot, app)
        await pilot.press("c")
        await wait_until(pilot, lambda: modal_name(app) == "EditorModal", "the editor")
        await type_text(pilot, "not this")
        await pilot.press("escape")
        await wait_until(pilot, lambda: modal_name(app) == "ChatScreen", "the editor to close")
        await pilot.pause()
        assert view.label is None and app.store.label(view.message_id) is None
        # the question's editor (e: edit and ask again) too: nothing is asked
        question = views(app)[0]
        question.focus()
        await pilot.press("e")
        await wait_until(pilot, lambda: modal_name(app) == "EditorModal", "the question's editor")
        await type_text(pilot, "other")
        await pilot.press("escape")
        await wait_until(pilot, lambda: modal_name(app) == "ChatScreen", "the editor to close")
        await pilot.pause()
        assert len(app.store.messages(view.message.conversation_id)) == 2


async def test_letters_typed_after_coming_back_to_the_chat_go_to_the_prompt(app_model):
    write_config(sampling={"max_new_tokens": 6, "seed": 7})
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_chat(pilot, app)
        await ask(pilot, app, "hi")
        view = await focus_answer(pilot, app)
        await pilot.press("f5")
        await wait_until(pilot, lambda: app.current_mode == "finetune", "the fine-tune screen")
        burst(app, "f2 " + " ".join("quickbrownfox1"))  # typed on at once
        await wait_until(pilot, lambda: app.current_mode == "chat", "the chat")
        prompt = app.screen.query_one(PromptArea)
        await wait_until(pilot, lambda: prompt.text == "quickbrownfox1", lambda: f"the prompt to fill: {prompt.text!r}")
        await pilot.pause()
        assert modal_name(app) == "ChatScreen" and prompt.text == "quickbrownfox1"
        assert app.store.label(view.message_id) is None
        assert len(app.store.messages(view.message.conversation_id)) == 2  # nothing regenerated


async def test_keys_after_a_dialog_key_go_into_it_and_never_stack_a_second_one(app_model):
    write_config(sampling={"max_new_tokens": 6, "seed": 7})
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_chat(pilot, app)
        await ask(pilot, app, "hi")
        view = await focus_answer(pilot, app)
        burst(app, "n c")  # the note dialog, then (still focused on the answer) the editor
        await wait_until(pilot, lambda: modal_name(app) == "TextModal", "the note dialog")
        await pilot.pause()
        assert len(app.screen_stack) == 2, [s.__class__.__name__ for s in app.screen_stack]
        assert app.screen.query_one("#text").value == "c"  # typed into the note, not a correction
        message_id = view.message_id
        app.screen_stack[-2].action_new_chat()  # the answer leaves the screen behind the dialog
        await pilot.pause()
        await pilot.press("enter")  # saved all the same, with no error about the gone message
        await wait_until(pilot, lambda: app.store.label(message_id) is not None, "the note")
        assert app.store.label(message_id).note == "c" and app.store.label(message_id).ideal is None
        await pilot.pause()
        assert not [n.message for n in app._notifications if n.severity == "error"]
        assert modal_name(app) == "ChatScreen"


async def test_f7_right_after_c_selects_the_text_the_typing_replaces(app_model):
    write_config(sampling={"max_new_tokens": 6, "seed": 7})
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_chat(pilot, app)
        await ask(pilot, app, "hi")
        view = await focus_answer(pilot, app)
        burst(app, "c f7 n e w")
        await wait_until(pilot, lambda: modal_name(app) == "EditorModal", "the editor")
        await wait_until(pilot, lambda: app.screen.query_one("#editor").text == "new", "the replaced text")
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: view.label is not None, "the correction")
        assert app.store.label(view.message_id).ideal == "new"


async def regenerated(pilot, app, count: int) -> list[int]:
    """Regenerate the focused answer until it has `count` alternatives; their ids in order.
    Each new answer takes the focus, so r can be pressed again at once."""
    for _ in range(count - 1):
        answer = app.focused
        await pilot.press("r")
        await wait_until(
            pilot,
            lambda a=answer.message_id: views(app)[-1].message_id not in (None, a) and not app.screen.generating,
            "the regenerated answer",
        )
        await pilot.pause()
        assert app.focused is views(app)[-1], app.focused
    return [m.id for m in app.store.siblings(views(app)[-1].message_id)]


async def test_fast_arrows_step_once_each_and_keep_focus_on_the_answer(app_model):
    write_config(sampling={"max_new_tokens": 4})
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_chat(pilot, app)
        await ask(pilot, app, "hi")
        await focus_answer(pilot, app)
        ids = await regenerated(pilot, app, 4)
        assert views(app)[-1].position == (4, 4)
        burst(app, "left left left")
        await wait_until(pilot, lambda: views(app)[-1].message_id == ids[0], "the first alternative")
        await pilot.pause()
        assert views(app)[-1].position == (1, 4)
        assert app.focused is views(app)[-1]
        burst(app, "right right")
        await wait_until(pilot, lambda: views(app)[-1].message_id == ids[2], "the third alternative")
        await pilot.pause()
        assert app.focused is views(app)[-1] and views(app)[-1].message_id == ids[2]
        await pilot.press("y")
        assert app.clipboard == app.store.message(ids[2]).content


async def test_after_edit_and_ask_again_focus_is_on_the_new_answer(app_model):
    write_config(sampling={"max_new_tokens": 6, "seed": 7})
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_chat(pilot, app)
        await ask(pilot, app, "hi")
        views(app)[0].focus()
        await pilot.press("e")
        await wait_until(pilot, lambda: modal_name(app) == "EditorModal", "the editor")
        app.screen.query_one("#editor").text = "hello instead"
        await pilot.press("ctrl+s")
        await wait_until(
            pilot,
            lambda: views(app)[0].content == "hello instead" and views(app)[-1].message is not None,
            "the new answer",
        )
        await settle(pilot, app)
        new_answer = views(app)[-1]
        assert app.focused is new_answer
        await pilot.press("y")
        assert app.clipboard == new_answer.content


async def test_keys_right_after_saving_a_dialog_act_on_what_it_made(app_model):
    write_config(sampling={"max_new_tokens": 6, "seed": 7})
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_chat(pilot, app)
        await ask(pilot, app, "hi")
        view = await focus_answer(pilot, app)
        burst(app, "n o k enter u")  # u after Enter: the answer's thumb, not a letter of the note
        await wait_until(pilot, lambda: view.label is not None and view.label.thumb == 1, "the vote")
        assert app.store.label(view.message_id).note == "ok"
        views(app)[0].focus()
        await pilot.pause()
        burst(app, "e f7 y o ctrl+s y")  # the last y: the new answer, copied once it is written
        await wait_until(
            pilot,
            lambda: modal_name(app) == "ChatScreen" and [v.content for v in views(app)][:1] == ["yo"] and settled(app),
            "the new answer",
        )
        await settle(pilot, app)
        assert app.focused is views(app)[-1]
        assert app.clipboard == views(app)[-1].content


async def test_escape_on_a_message_goes_back_to_the_prompt(app_model):
    """After a correction the answer keeps the focus (its keys label it); Esc there, with nothing
    being written, returns to the prompt, so the next question is typed as a question."""
    write_config(sampling={"max_new_tokens": 6, "seed": 7})
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_chat(pilot, app)
        await ask(pilot, app, "hi")
        view = await focus_answer(pilot, app)
        await pilot.press("escape")
        await pilot.pause()
        assert isinstance(app.focused, PromptArea)
        await type_text(pilot, "that")
        assert app.focused.text == "that" and view.label is None and app.store.label(view.message_id) is None
