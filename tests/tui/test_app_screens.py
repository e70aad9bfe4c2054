"""The app's other screens with Pilot: fine-tune (a real run process on a tiny model), models
(switching without a restart), dataset (counts, exclude/include, snapshot, export), compare."""

from __future__ import annotations

import json
import threading
import time

import pytest
from test_app import SIZE, open_chat, type_text, views, wait_until, write_config

from data import memory
from data.paths import models_dir
from data.store import Store, open_store
from gpt.hf import export_hf
from tests.gpt.test_download import checkpoint, hub  # noqa: F401 - the local stand-in for Hugging Face
from tui.app import KettleApp

PAIRS = [
    ("What is a kettle?", "A pot for boiling water."),
    ("Say hi.", "Hi!"),
    ("Name a colour.", "Blue."),
    ("Two plus two?", "Four."),
    ("Capital of France?", "Paris."),
    ("Is ice cold?", "Yes."),
    ("Opposite of up?", "Down."),
    ("A fruit?", "An apple."),
    ("Sky colour?", "Blue, by day."),
    ("Three minus one?", "Two."),
]


def labelled_chats(store: Store, tag: str = "") -> list[int]:
    """One conversation per pair, the answer voted up; returns the answers' ids."""
    ids = []
    for question, answer in PAIRS:
        conv = store.create_conversation(title=question)
        q = store.add_message(conv.id, "user", content=question)
        a = store.add_message(conv.id, "assistant", content=answer, parent_id=q.id, model="tiny")
        store.set_label(a.id, thumb=1, tags=[tag] if tag else [])
        ids.append(a.id)
    return ids


async def open_finetune_sheet(pilot, app) -> None:
    """From the chat, F5 to the fine-tune sheet once it has counted the 10 labelled examples."""
    await open_chat(pilot, app)
    await pilot.press("f5")
    await wait_until(
        pilot,
        lambda: (
            app.current_mode == "finetune" and "10 examples" in str(app.screen.query_one("#sheet-summary").render())
        ),
        "the fine-tune sheet",
    )


async def test_finetune_shows_progress_to_the_end_and_offers_the_new_model(app_model):
    write_config(sampling={"max_new_tokens": 8, "seed": 1})
    with open_store() as store:
        labelled_chats(store)
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_finetune_sheet(pilot, app)
        screen = app.screen
        assert screen.query_one("#ft-base").value == "tiny"
        assert screen.query_one("#ft-method").value == "full"  # a tiny model on the CPU
        assert "steps" in str(screen.query_one("#sheet-estimate").render())
        await pilot.press("ctrl+g")  # the sheet's defaults: train until the answers come back
        await wait_until(pilot, lambda: screen.run is not None, "the run to start")
        seen = set()
        await wait_until(
            pilot,
            lambda: seen.add(screen.run.status) or screen.run.status in ("finished", "failed", "cancelled"),
            "the run to end",
            timeout=120,
        )
        run = screen.run
        assert run.status == "finished", run.error
        assert 0 < run.step <= run.total_steps
        bar = screen.query_one("#run-progress")
        assert bar.progress == bar.total == run.step  # done is 100%, also when it stopped early
        assert len(screen.query_one("#loss-chart").data) >= 1
        result = str(screen.query_one("#finetune-result").render())
        assert "your corrections: " in result and " of 10 now come back" in result
        assert "regression gate: " in result
        assert screen.query_one("#ft-switch").display
        new = screen.output
        assert new.parent_id is not None and new.name.startswith("tiny-ft")
        assert app.store.active_model().name == "tiny"  # nothing switches until the user says so
        await pilot.press("ctrl+w")
        await wait_until(
            pilot,
            lambda: app.service.active_model is not None and app.service.active_model.name == new.name,
            "the switch",
        )
        assert app.store.active_model().name == new.name
        # the chat now answers with the new model, without a restart
        await pilot.press("f2")
        await open_chat(pilot, app)
        await type_text(pilot, "hi")
        await pilot.press("enter")
        await wait_until(
            pilot,
            lambda: views(app) and views(app)[-1].message is not None and views(app)[-1].role == "assistant",
            "the answer",
        )
        assert views(app)[-1].message.model == new.name


async def test_cancel_a_running_fine_tune(app_model):
    with open_store() as store:
        labelled_chats(store)
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_finetune_sheet(pilot, app)
        screen = app.screen
        screen.query_one("#ft-epochs").value = "1000"  # far more than the test will wait for
        await pilot.press("ctrl+g")
        await wait_until(
            pilot,
            lambda: screen.run is not None and screen.run.status == "running" and screen.run.step >= 1,
            "the first steps",
            timeout=60,
        )
        await pilot.press("ctrl+x")
        await wait_until(pilot, lambda: screen.run.status == "cancelled", "the cancellation", timeout=60)
        assert screen.run.step < screen.run.total_steps
        assert "kettle finetune resume" in str(screen.query_one("#finetune-result").render())
        assert not screen.query_one("#ft-switch").display
        assert app.store.model_versions()[0].name == "tiny"  # no half model registered


async def test_models_screen_switches_models_without_a_restart(app_model, tiny_model_dir):
    with open_store() as store:
        other = store.add_model_version("other", tiny_model_dir, kind="imported")
        store.update_model_version(other.id, metrics={"val_loss": 4.25})
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_chat(pilot, app)
        await pilot.press("f4")
        await wait_until(
            pilot,
            lambda: app.current_mode == "models" and app.screen.query_one("#models-table").row_count == 2,
            "the models",
        )
        table = app.screen.query_one("#models-table")
        assert str(table.get_row_at(0)[1]) == "other" and table.get_row_at(0)[4] == "4.250"
        assert table.get_row_at(1)[0] == "●"  # tiny is active
        table.focus()
        table.move_cursor(row=0)
        await pilot.pause()
        detail = str(app.screen.query_one("#models-detail").render())
        assert "lineage" in detail and "other" in detail
        await pilot.press("a")
        await wait_until(
            pilot,
            lambda: app.service.active_model is not None and app.service.active_model.name == "other",
            "the switch",
        )
        await wait_until(pilot, lambda: table.get_row_at(0)[0] == "●", "the active mark")
        assert app.store.active_model().name == "other"


async def test_import_a_kettle_or_hugging_face_model_directory(app_model, tiny_model_dir, tmp_path):
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_chat(pilot, app)
        await pilot.press("f4")
        await wait_until(pilot, lambda: app.current_mode == "models", "the models screen")
        await pilot.press("i")
        await wait_until(pilot, lambda: app.screen.__class__.__name__ == "TextModal", "the path box")
        app.screen.query_one("#text").value = str(tiny_model_dir.parent / "nowhere")
        await pilot.press("enter")
        await wait_until(pilot, lambda: any("not a directory" in n.message for n in app._notifications), "the error")
        await pilot.press("i")
        await wait_until(pilot, lambda: app.screen.__class__.__name__ == "TextModal", "the path box")
        app.screen.query_one("#text").value = str(tiny_model_dir)
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.store.find_model_version("tiny-2") is not None, "the import")
        assert app.store.model_version("tiny-2").kind == "imported"
        assert app.store.active_model().name == "tiny"  # importing does not switch
        # a Hugging Face directory is converted into KETTLE_HOME/models first
        export_hf(tiny_model_dir, tmp_path / "hf-tiny")
        await pilot.press("i")
        await wait_until(pilot, lambda: app.screen.__class__.__name__ == "TextModal", "the path box")
        app.screen.query_one("#text").value = str(tmp_path / "hf-tiny")
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.store.find_model_version("hf-tiny") is not None, "the HF import")
        converted = app.store.model_version("hf-tiny")
        assert converted.path == str(models_dir() / "hf-tiny") and (models_dir() / "hf-tiny").is_dir()
        await wait_until(pilot, lambda: app.screen.query_one("#models-table").row_count == 3, "listed")


async def test_dataset_counts_exclude_include_snapshot_and_export(app_model, tmp_path):
    with open_store() as store:
        ids = labelled_chats(store, tag="facts")
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_chat(pilot, app)
        await pilot.press("f3")
        table = None
        await wait_until(
            pilot,
            lambda: app.current_mode == "dataset" and app.screen.query_one("#dataset-table").row_count == 10,
            "the examples",
        )
        screen = app.screen
        counts = str(screen.query_one("#dataset-counts").render())
        assert "10 examples" in counts and "#facts 10" in counts and "▲ 10 up" in counts
        table = screen.query_one("#dataset-table")
        table.focus()
        table.move_cursor(row=0)
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.screen.__class__.__name__ == "ExampleModal", "the example")
        await pilot.press("escape")
        await pilot.press("x")
        await wait_until(
            pilot, lambda: "9 examples" in str(screen.query_one("#dataset-counts").render()), "the exclusion"
        )
        assert app.store.label(ids[0]).excluded
        assert table.row_count == 10  # still listed, marked, so it can come back
        table.move_cursor(row=9)
        await pilot.pause()
        await pilot.press("x")
        await wait_until(
            pilot, lambda: "10 examples" in str(screen.query_one("#dataset-counts").render()), "the inclusion"
        )
        assert not app.store.label(ids[0]).excluded
        # a filter on a tag nobody used leaves nothing
        screen.query_one("#f-tags-in").value = "tone"
        await wait_until(pilot, lambda: table.row_count == 0, "the filter")
        screen.query_one("#f-tags-in").value = ""
        await wait_until(pilot, lambda: table.row_count == 10, "the filter cleared")
        await pilot.press("s")
        await wait_until(pilot, lambda: app.screen.__class__.__name__ == "TextModal", "the name box")
        await type_text(pilot, "first")
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.store.snapshots(), "the snapshot")
        assert app.store.snapshots()[0].n_examples == 10
        await wait_until(pilot, lambda: screen.query_one("#snapshots-table").row_count == 1, "listed")
        await pilot.press("e")
        await wait_until(pilot, lambda: app.screen.__class__.__name__ == "ChoiceModal", "the formats")
        options = app.screen.query_one("#choices")
        options.highlighted = [o.id for o in options._options].index("alpaca")
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.screen.__class__.__name__ == "TextModal", "the file box")
        out = tmp_path / "out.json"
        app.screen.query_one("#text").value = str(out)
        await pilot.press("enter")
        await wait_until(pilot, lambda: out.exists(), "the export")
        records = json.loads(out.read_text())
        assert {r["instruction"] for r in records} == {q for q, _ in PAIRS}
        assert {r["output"] for r in records} == {a for _, a in PAIRS}


async def test_compare_sends_one_prompt_to_two_models(app_model, tiny_model_dir):
    with open_store() as store:
        store.add_model_version("other", tiny_model_dir, kind="imported")
    write_config(sampling={"max_new_tokens": 8})
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_chat(pilot, app)
        await pilot.press("f6")
        await wait_until(
            pilot,
            lambda: app.current_mode == "compare" and app.screen.query_one("#right-model").value == "other",
            "the models",
        )
        screen = app.screen
        assert screen.query_one("#left-model").value == "tiny"
        screen.query_one("#compare-prompt").focus()
        await type_text(pilot, "hello")
        await pilot.press("enter")
        await wait_until(
            pilot,
            lambda: (
                "tok/s" in str(screen.query_one("#left-stats").render())
                and "tok/s" in str(screen.query_one("#right-stats").render())
            ),
            "two answers",
        )
        assert "tiny" in str(screen.query_one("#left-title").render())
        assert "other" in str(screen.query_one("#right-title").render())


@pytest.fixture
def remote(chat_model_dir):
    """`kettle serve` in this process: uvicorn on a free 127.0.0.1 port with an API key."""
    from gpt.server import build_server, listen
    from gpt.service import InProcessService

    service = InProcessService(str(chat_model_dir))
    server = build_server(service, "sk-test", log_level="warning")
    sock = listen("127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=10)
    service.close()


async def test_the_app_chats_through_a_server(remote):
    write_config(sampling={"max_new_tokens": 8, "seed": 3})
    app = KettleApp(server=remote, api_key="sk-test")
    async with app.run_test(size=SIZE) as pilot:
        await open_chat(pilot, app)  # no local model needed: no welcome screen
        await type_text(pilot, "hello")
        await pilot.press("enter")
        await wait_until(
            pilot,
            lambda: views(app) and views(app)[-1].message is not None and views(app)[-1].role == "assistant",
            "the answer",
        )
        stored = app.store.message(views(app)[-1].message_id)
        assert stored.model == "chat" and 0 < stored.new_tokens <= 8
        assert stored.content == views(app)[-1].content


async def test_a_wrong_api_key_is_a_notification_not_a_traceback(remote):
    write_config(sampling={"max_new_tokens": 8})
    app = KettleApp(server=remote, api_key="wrong")
    async with app.run_test(size=SIZE) as pilot:
        await open_chat(pilot, app)
        await type_text(pilot, "hello")
        await pilot.press("enter")
        await wait_until(pilot, lambda: any(n.severity == "error" for n in app._notifications), "the error")
        message = next(n.message for n in app._notifications if n.severity == "error")
        assert "key" in message.lower() and "Traceback" not in message
        assert not app.screen.generating
        assert all(v.role != "assistant" for v in views(app))  # no empty answer left behind
        await wait_until(pilot, lambda: app.store.stats()["assistant_messages"] == 0, "nothing stored")


async def test_first_run_download_gpt2_then_chat(hub):
    """A new user: no model, press g, pick GPT-2, and end up chatting with it (the download
    comes from a local server standing in for Hugging Face)."""
    write_config(sampling={"max_new_tokens": 4, "seed": 1})
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(
            pilot, lambda: app.current_mode == "welcome" and app.screen.query("Button"), "the welcome screen"
        )
        await pilot.press("g")
        await wait_until(pilot, lambda: app.screen.__class__.__name__ == "ChoiceModal", "the sizes")
        await pilot.press("enter")  # the first: gpt2
        await open_chat(pilot, app, timeout=90)  # a child process downloads and converts it
        assert app.store.active_model().name == "gpt2"
        assert app.store.active_model().kind == "downloaded"
        await type_text(pilot, "hi")
        await pilot.press("enter")
        await wait_until(
            pilot,
            lambda: views(app) and views(app)[-1].message is not None and views(app)[-1].role == "assistant",
            "the answer",
        )
        assert views(app)[-1].message.model == "gpt2"


def test_server_options_belong_to_the_app(capsys):
    from tui.cli import build_parser, main

    args = build_parser().parse_args(["--server", "http://127.0.0.1:8000", "--api-key", "k"])
    assert (args.command, args.app_server, args.app_api_key) == (None, "http://127.0.0.1:8000", "k")
    assert build_parser().parse_args(["serve", "--api-key", "k"]).app_api_key is None
    with pytest.raises(SystemExit) as exit_info:
        main(["--server", "http://127.0.0.1:8000", "data", "stats"])
    assert exit_info.value.code == 2
    assert "use them without a command" in capsys.readouterr().err


def test_no_screen_or_widget_imports_the_app_module():
    """Screens and widgets take guarded/error_text from tui.errors; importing every one of them
    loads no tui.app (type hints of the app go under TYPE_CHECKING)."""
    import subprocess
    import sys
    from pathlib import Path

    tui = Path(__file__).resolve().parents[2] / "tui"
    modules = [
        f"tui.{d}.{p.stem}"
        for d in ("screens", "widgets")
        for p in sorted((tui / d).glob("*.py"))
        if p.stem != "__init__"
    ]
    code = f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\nprint('tui.app' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tui.parent, capture_output=True, text=True, check=True
    ).stdout.split()
    assert len(modules) >= 10 and out == ["False"]


async def test_docs_screen_adds_lists_and_removes_documents(app_model, tmp_path):
    folder = tmp_path / "manual"
    folder.mkdir()
    for i in range(5):
        (folder / f"page{i}.md").write_text(f"# Page {i}\n\nThe kettle model number {i} whistles.\n")
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_chat(pilot, app)
        await pilot.press("f8")
        await wait_until(pilot, lambda: app.current_mode == "docs", "the docs screen")
        screen = app.screen
        screen.query_one("#docs-path").focus()
        await type_text(pilot, str(folder))
        await pilot.press("enter")
        table = screen.query_one("#docs-table")
        await wait_until(pilot, lambda: table.row_count == 5, "five documents listed")
        table.focus()
        await pilot.press("delete")
        await wait_until(pilot, lambda: table.row_count == 4, "one removed")
        screen.query_one("#docs-path").focus()
        await type_text(pilot, str(tmp_path / "nowhere"))
        await pilot.press("enter")
        await wait_until(pilot, lambda: "no such file" in " ".join(str(n) for n in app._notifications), "an error")
    with open_store() as store:
        assert [p.rsplit("/", 1)[-1] for p in (s.path for s in memory.doc_sources(store))] == [
            f"page{i}.md" for i in range(1, 5)
        ]
