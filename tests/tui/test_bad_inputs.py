"""Every bad input from outside gets one line naming the problem, and changes nothing.

The corpus (tests/fixtures/bad-inputs, made by tests/tui/bad_inputs.py) is fed to the command line in
this process, the way a user's shell would run it: dataset files to `kettle data import`; model
directories to every importer (`kettle generate DIR`, `kettle import-hf DIR OUT`, `kettle
export-gguf DIR OUT`, the app's import); flags to every command. Each must exit 1 (a KettleError)
or 2 (argparse refused a flag) with exactly one line on stderr, no traceback, and leave the
store's tables, the model and run directories exactly as they were.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from data.paths import config_path, kettle_home
from data.store import open_store
from gpt.errors import KettleError
from gpt.files import sha256_file
from tests.tui import bad_inputs
from tests.tui.bad_inputs import ROOT
from tui.cli import main

CORPUS = json.loads((ROOT / "corpus.json").read_text(encoding="utf-8"))
GOOD = bad_inputs.CHAT


def cli(argv: list[str], capsys) -> tuple[int, str]:
    """(exit status, stderr) of `kettle ARGV`, run in this process."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = err.rstrip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("kettle") and "Traceback" not in err, err
    return lines[0]


def state() -> tuple[list[str], list[str]]:
    """Every row of every table of the store, and every path under KETTLE_HOME but the
    database's own files (and the app's log)."""
    with sqlite3.connect(kettle_home() / "kettle.db") as con:
        rows = list(con.iterdump())
    paths = sorted(
        p.relative_to(kettle_home()).as_posix()
        for p in kettle_home().rglob("*")
        if not p.name.startswith("kettle.db") and p.name != "app.log"
    )
    return rows, paths


@pytest.fixture
def seeded(tiny_model_dir, tmp_path, capsys) -> dict[str, str]:
    """A store holding a conversation and an active model, and the good inputs the flag cases
    name ({model}, {data}, {text}, {tsv}; {out} is a path that must stay absent)."""
    data = tmp_path / "good.jsonl"
    data.write_text(json.dumps(GOOD) + "\n", encoding="utf-8")
    assert main(["data", "import", str(data)]) == 0
    with open_store() as store:
        store.register_model(tiny_model_dir, "imported")
    text = tmp_path / "corpus.txt"
    text.write_text("A kettle boils water. " * 50, encoding="utf-8")
    tsv = tmp_path / "labels.tsv"
    tsv.write_text("".join(f"{'spam' if i % 2 else 'ham'}\tmessage number {i}\n" for i in range(40)), encoding="utf-8")
    capsys.readouterr()
    return {
        "model": str(tiny_model_dir),
        "data": str(data),
        "text": str(text),
        "tsv": str(tsv),
        "out": str(tmp_path / "out"),
    }


def test_the_kept_corpus_is_what_the_code_makes(tmp_path):
    bad_inputs.write(tmp_path / "corpus")
    made, kept = bad_inputs.files_under(tmp_path / "corpus"), bad_inputs.files_under(ROOT)
    assert sorted(made) == sorted(kept), "run `python -m tests.tui.bad_inputs` and commit tests/fixtures/bad-inputs"
    assert [name for name in made if made[name] != kept[name]] == []
    assert len(CORPUS["imports"]) >= 40 and len(CORPUS["models"]) >= 51 and len(CORPUS["flags"]) >= 81


@pytest.mark.parametrize("name", sorted(CORPUS["imports"]))
def test_a_bad_dataset_file_is_refused_in_one_line(name, seeded, capsys):
    before = state()
    code, err = cli(["data", "import", str(ROOT / "imports" / name)], capsys)
    line = one_line(err)
    assert code == 1 and name in line and CORPUS["imports"][name] in line, line
    assert state() == before


@pytest.mark.parametrize("name", sorted(bad_inputs.HUGE))
def test_a_record_over_16_mib_is_refused_in_one_line(name, seeded, tmp_path, capsys):
    from data.formats import MAX_LINE_BYTES

    says, make = bad_inputs.HUGE[name]
    path = tmp_path / name
    path.write_bytes(make(MAX_LINE_BYTES))
    before = state()
    code, err = cli(["data", "import", str(path)], capsys)
    assert code == 1 and says in one_line(err) and name in err
    assert state() == before


@pytest.mark.parametrize("name", sorted(CORPUS["models"]))
def test_a_bad_model_directory_is_refused_by_every_importer(name, seeded, tmp_path, capsys):
    from gpt.hf import is_hf_dir
    from tui.screens.models import import_model

    path = ROOT / "models" / name
    out = tmp_path / "converted"
    before = state()
    code, err = cli(["generate", str(path), "Hi", "--max-new-tokens", "1", "--device", "cpu"], capsys)
    generate = one_line(err)
    assert code == 1 and name in generate
    code, err = cli(["import-hf", str(path), str(out)], capsys)
    import_hf = one_line(err)
    assert code == 1 and name in import_hf and not out.exists()
    code, err = cli(["export-gguf", str(path), str(out / "m.gguf")], capsys)
    assert code == 1 and name in one_line(err) and not out.exists()
    with open_store() as store, pytest.raises(KettleError) as refused:
        import_model(store, str(path))
    assert name in str(refused.value)
    assert state() == before
    # What each check is for, said by the importer it is for; the app checks as they do.
    assert CORPUS["models"][name] in (import_hf if name.startswith("hf-") else generate)
    if path.is_dir():
        assert f"kettle: error: {refused.value}" == (import_hf if is_hf_dir(path) else generate)


@pytest.mark.parametrize("case", CORPUS["flags"], ids=lambda case: " ".join(case["argv"]))
def test_a_bad_flag_is_refused_in_one_line(case, seeded, capsys):
    argv = [arg.format(**seeded) for arg in case["argv"]]
    before = state()
    code, err = cli(argv, capsys)
    line = one_line(err)
    assert code == case["exit"] and case["says"] in line, line
    assert state() == before and not Path(seeded["out"]).exists()


def test_a_real_process_prints_the_line_alone(seeded, tmp_path):
    """Outside pytest's capture: stderr's own encoding, a process that exits for good."""
    cases = [
        (["data", "import", str(ROOT / "imports" / "surrogate-openai.jsonl")], 1, "line 1"),
        (["data", "import", str(tmp_path / "missing.jsonl")], 1, "missing.jsonl: no such file"),
        (["data", "import", str(tmp_path)], 1, "a folder, not a file"),
        (["generate", str(ROOT / "models" / "weights-exploding-pickle"), "Hi"], 1, ""),
        (["serve", "--port", "-1"], 2, "--port"),
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    for argv, code, says in cases:
        done = subprocess.run(
            [sys.executable, "-m", "tui.cli", *argv], capture_output=True, text=True, env=env, timeout=120
        )
        assert done.returncode == code and done.stdout == "", (argv, done.stdout)  # not even a blank line
        assert says in one_line(done.stderr)


def test_a_file_name_that_is_not_utf8_still_imports(seeded, tmp_path, capsys):
    """The name reaches Python as a lone surrogate ("caf\\udce9.jsonl"), which SQLite refused."""
    path = tmp_path / os.fsdecode(b"caf\xe9.jsonl")
    try:
        path.write_text(json.dumps(GOOD) + "\n", encoding="utf-8")
    except OSError:  # a file system that holds UTF-8 names only
        pytest.skip("this file system refuses a name that is not UTF-8")
    code, err = cli(["data", "import", str(path)], capsys)
    assert code == 0, err
    with open_store() as store:
        assert store.conversations_from(f"import:openai:caf\\xe9.jsonl:{sha256_file(path)[:16]}") == 1


def test_import_hf_keeps_a_kettle_tokenizer_beside_the_weights(tiny_model_dir, tmp_path):
    """export-hf writes Kettle's tokenizer.json beside a vocabulary that is not GPT-2's; importing
    it back used to drop it, leaving a model whose tokenizer (GPT-2's) it could not hold."""
    from gpt.checkpoint import load_model
    from gpt.hf import export_hf, import_hf

    export_hf(tiny_model_dir, tmp_path / "hf")
    model, tokenizer = load_model(import_hf(tmp_path / "hf", tmp_path / "back"))
    assert tokenizer.n_vocab == load_model(tiny_model_dir)[1].n_vocab == 512


async def test_the_app_imports_no_broken_model_and_keeps_having_none(kettle_home):
    """With no model yet, the welcome screen's import (i) of a broken directory used to register
    it and make it the active model; now it says why, once, and the store stays empty."""
    from test_app import SIZE, wait_until

    from tui.app import KettleApp

    broken = ROOT / "models" / "weights-truncated"
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.current_mode == "welcome", "the welcome screen")
        await pilot.press("i")
        await wait_until(pilot, lambda: app.screen.__class__.__name__ == "TextModal", "the path box")
        app.screen.query_one("#text").value = str(broken)
        await pilot.press("enter")
        await wait_until(
            pilot, lambda: any("corrupt or truncated" in n.message for n in app._notifications), "the error"
        )
        assert app.store.model_versions() == [] and app.store.active_model() is None


async def test_an_unusable_key_keeps_its_default_and_the_app_can_always_quit(app_model):
    from test_app import SIZE, open_chat, wait_until

    from tui.app import KettleApp

    config_path().write_text(
        json.dumps({"keys": {"app.quit": "ctrl+,,,", "chat.stop": "ctrl+q", "app.help": "f1,f12"}}), encoding="utf-8"
    )
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_chat(pilot, app)
        warnings = [n.message for n in app._notifications if n.severity == "warning"]
        assert any("app.quit: 'ctrl+' in 'ctrl+,,,' is not a key" in w for w in warnings), warnings
        assert any("chat.stop: ctrl+q takes the quit key" in w for w in warnings), warnings
        assert len(warnings) == 2  # app.help's f1,f12 is fine
        await pilot.press("ctrl+q")
        await wait_until(pilot, lambda: app._exit, "the app to quit")
