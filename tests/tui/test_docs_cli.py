"""`kettle docs ...` and grounded `kettle generate --chat` on the KETTLE_HOME database."""

from __future__ import annotations

import re

from data.store import open_store
from tui.cli import main


def test_docs_add_list_search_remove(tmp_path, kettle_home, capsys):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "kettle.md").write_text("# Descaling\n\nDescale the kettle monthly with citric acid.\n")
    (folder / "tea.txt").write_text("Green tea wants water at 80 degrees.\n")
    assert main(["docs", "add", str(folder)]) == 0
    assert "indexed 2 new and 0 changed files (2 passages)" in capsys.readouterr().out
    assert main(["docs", "add", str(folder)]) == 0
    assert "2 unchanged" in capsys.readouterr().out
    assert main(["docs", "list"]) == 0
    listed = capsys.readouterr().out
    assert str(folder / "kettle.md") in listed and str(folder / "tea.txt") in listed
    assert main(["docs", "search", "How", "often", "should", "I", "descale", "the", "kettle?"]) == 0
    assert f"[file] {folder / 'kettle.md'}" in capsys.readouterr().out
    assert main(["docs", "remove", str(folder / "kettle.md")]) == 0
    assert main(["docs", "search", "descale", "kettle"]) == 0
    assert "nothing in the store answers that" in capsys.readouterr().out
    assert main(["docs", "remove", str(folder / "kettle.md")]) == 1
    assert "no indexed document there" in capsys.readouterr().err
    assert main(["docs", "add", str(tmp_path / "missing")]) == 1
    assert "no such file or folder" in capsys.readouterr().err


def test_generate_grounds_a_chat_answer_unless_told_not_to(tiny_model_dir, kettle_home, capsys):
    with open_store() as store:
        conv = store.create_conversation("lists")
        user = store.add_message(conv.id, "user", content="How do I reverse a list?")
        bot = store.add_message(conv.id, "assistant", content="No idea.", parent_id=user.id)
        store.set_label(bot.id, ideal="Call my_list.reverse().")
    args = ["generate", str(tiny_model_dir), "How can I reverse a list?", "--chat", "--max-new-tokens", "2"]
    assert main(args) == 0
    grounded = capsys.readouterr().err
    assert f"[source: correction message {bot.id} · How do I reverse a list?]" in grounded
    assert main([*args, "--no-ground"]) == 0
    plain = capsys.readouterr().err
    assert "[source:" not in plain

    def prompt_tokens(err):
        return int(re.search(r"prompt (\d+) tokens", err).group(1))

    assert prompt_tokens(grounded) > prompt_tokens(plain) + 5  # the correction is in the prompt


def test_generate_answers_a_models_own_lesson_from_memory(tiny_model_dir, kettle_home, tmp_path, capsys):
    """The lessons a model carries (its replay file) are memory where it answers: asked again in
    other words, the lesson is the passage beside the question."""
    import shutil

    from finetune.replay import REPLAY_FILE, replay_text

    model = tmp_path / "taught"
    shutil.copytree(tiny_model_dir, model)
    lesson = [{"role": "user", "content": "How do I descale a kettle?"}]
    lesson.append({"role": "assistant", "content": "Boil citric acid in it."})
    (model / REPLAY_FILE).write_text(replay_text([lesson], []))
    args = ["generate", str(model), "how can I descale my kettle", "--chat", "--max-new-tokens", "2"]
    assert main(args) == 0
    assert "[source: lesson taught · How do I descale a kettle?]" in capsys.readouterr().err
    assert main(["docs", "list"]) == 0
    assert "taught's lessons: 1" in capsys.readouterr().out


def test_a_lesson_file_holding_anything_else_is_read_for_what_it_holds(tiny_model_dir, kettle_home, tmp_path, capsys):
    """A replay file written elsewhere (content parts, odd roles, a bare string): what is not
    a plain question and answer is skipped, and the answer is still given."""
    import json
    import shutil

    from finetune.replay import REPLAY_FILE

    model = tmp_path / "odd"
    shutil.copytree(tiny_model_dir, model)
    good = [{"role": "user", "content": "How do I descale a kettle?"}, {"role": "assistant", "content": "Citric acid."}]
    odd = [
        [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}, {"role": "assistant", "content": "Hello"}],
        [{"role": "system", "content": "x"}, {"role": "assistant", "content": "y"}],
        ["not a message", "either"],
        good,
    ]
    lines = [json.dumps({"messages": m, "split": "train"}) for m in odd]
    (model / REPLAY_FILE).write_text("\n".join(lines) + "\n")
    args = ["generate", str(model), "how can I descale my kettle", "--chat", "--max-new-tokens", "2"]
    assert main(args) == 0
    assert "[source: lesson odd · How do I descale a kettle?]" in capsys.readouterr().err
