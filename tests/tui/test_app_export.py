"""The models screen exports the selected model to GGUF (e), through `kettle export-gguf`."""

from __future__ import annotations

import pytest
from test_app import SIZE, open_chat, wait_until

from data.store import open_store
from gpt.checkpoint import save_model
from gpt.config import GPTConfig
from gpt.model import GPT
from gpt.tokenizer import SPLIT_PATTERN, train_tokenizer
from tests.conftest import TEST_SHAPE
from tui.app import KettleApp

gguf = pytest.importorskip("gguf")


async def test_export_the_selected_model_to_gguf(app_model, verdict_text, tmp_path):
    # a model of an older Kettle, whose tokenizer llama.cpp cannot split as Kettle does
    tokenizer = train_tokenizer([verdict_text], vocab_size=512, pattern=SPLIT_PATTERN)
    save_model(GPT(GPTConfig(**TEST_SHAPE)), tmp_path / "old-bpe", tokenizer=tokenizer)
    with open_store() as store:
        store.add_model_version("old-bpe", tmp_path / "old-bpe", kind="imported")
    out = tmp_path / "exports" / "m.gguf"
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
        table.focus()

        async def export(row: int) -> None:
            table.move_cursor(row=row)
            await pilot.pause()
            await pilot.press("e")
            await wait_until(pilot, lambda: app.screen.__class__.__name__ == "ChoiceModal", "the types")
            await pilot.press("enter")  # the first: q8_0
            await wait_until(pilot, lambda: app.screen.__class__.__name__ == "TextModal", "the file box")
            app.screen.query_one("#text").value = str(out)
            await pilot.press("enter")

        # the older tokenizer's model (listed first) is refused by name
        await export(0)
        await wait_until(
            pilot, lambda: any("1-2 digits" in n.message for n in app._notifications), "the refusal", timeout=60
        )
        assert not out.parent.exists() or list(out.parent.iterdir()) == []
        await export(1)  # tiny, the active one: today's default tokenizer
        await wait_until(
            pilot, lambda: any("ollama create" in n.message for n in app._notifications), "the export", timeout=60
        )
        reader = gguf.GGUFReader(out)
        assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
        assert (out.parent / "Modelfile").read_text(encoding="utf-8").startswith("FROM ./m.gguf\n")
        # again: the existing file is replaced only when the user says so
        written = out.stat().st_mtime_ns
        await export(1)
        await wait_until(pilot, lambda: app.screen.__class__.__name__ == "ChoiceModal", "the replace question")
        await pilot.press("enter")  # replace
        await wait_until(pilot, lambda: out.stat().st_mtime_ns != written, "the second export", timeout=60)
