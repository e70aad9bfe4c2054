"""Every bad input from outside gets one line naming the problem, and changes nothing.

The corpus (tests/fixtures/bad-inputs, made by tests/tui/bad_inputs.py) is fed to the command line in
this process, the way a user's shell would run it: dataset files to `kettle data import`; model
directories to every importer (`kettle generate DIR`, `kettle import-hf DIR OUT`, `kettle
export-gguf DIR OUT`, the app's import); flags to every command. Each must exit 1 (a KettleError)
or 2 (argparse refused a flag) with exactly one line on stderr, no traceback, and leave the
store's tables, the model and run directories exactly as they were.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import sqlite3
import subprocess
import sys
import tempfile
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


def refused_by_every_importer(path: Path, out: Path, capsys) -> tuple[str, str, str]:
    """(generate's line, import-hf's, the app's import's error) for a model directory that
    each refuses in one line naming it, with nothing changed."""
    from tui.screens.models import import_model

    before = state()
    code, err = cli(["generate", str(path), "Hi", "--max-new-tokens", "1", "--device", "cpu"], capsys)
    generate = one_line(err)
    assert code == 1 and path.name in generate
    code, err = cli(["import-hf", str(path), str(out)], capsys)
    import_hf = one_line(err)
    assert code == 1 and path.name in import_hf and not out.exists()
    code, err = cli(["export-gguf", str(path), str(out / "m.gguf")], capsys)
    assert code == 1 and path.name in one_line(err) and not out.exists()
    with open_store() as store, pytest.raises(KettleError) as refused:
        import_model(store, str(path))
    assert path.name in str(refused.value)
    assert state() == before
    return generate, import_hf, str(refused.value)


@pytest.mark.parametrize("name", sorted(CORPUS["models"]))
def test_a_bad_model_directory_is_refused_by_every_importer(name, seeded, tmp_path, capsys):
    from gpt.hf import is_hf_dir

    path = ROOT / "models" / name
    generate, import_hf, app = refused_by_every_importer(path, tmp_path / "converted", capsys)
    # What each check is for, said by the importer it is for; the app checks as they do.
    assert CORPUS["models"][name] in (import_hf if name.startswith("hf-") else generate)
    if path.is_dir():
        assert f"kettle: error: {app}" == (import_hf if is_hf_dir(path) else generate)


@contextlib.contextmanager
def within(seconds: float, *pipes: Path):
    """Fail, instead of hanging the test run, where the block waits on one of `pipes` (named
    pipes) longer: another process then opens each for writing and closes it, again and again,
    which lets a reader waiting there go on (reading nothing), and the test fails. Not a signal
    or a thread of this process: safetensors holds the GIL, and retries, while it opens a file."""
    waited = Path(tempfile.mkdtemp()) / "waited"
    opens = " ".join(f": > {shlex.quote(str(pipe))};" for pipe in pipes)
    script = f"sleep {seconds}; touch {shlex.quote(str(waited))}; while :; do {opens} sleep 0.1; done"
    releaser = subprocess.Popen(["sh", "-c", script])
    try:
        yield
    finally:
        releaser.kill()
        releaser.wait()
        hung = waited.exists()
        shutil.rmtree(waited.parent)
    assert not hung, f"still waiting on {pipes} after {seconds} s"


@pytest.mark.parametrize(
    "kind, name",
    [
        ("kettle", "config.json"),
        ("kettle", "model.safetensors"),
        ("kettle", "kettle-tokenizer.json"),
        ("hf", "config.json"),
        ("hf", "model.safetensors"),
        ("hf", "tokenizer.json"),
    ],
)
def test_a_named_pipe_in_a_model_directory_is_refused_at_once(kind, name, seeded, tmp_path, capsys):
    """A named pipe (FIFO) as a model's file: reading it waited forever for a writer (config.json,
    the tokenizer) or called it missing (the weights). Git keeps no pipe, so it is made here."""
    from gpt.hf import export_hf

    path = tmp_path / kind
    if kind == "kettle":
        shutil.copytree(seeded["model"], path)
    else:
        export_hf(seeded["model"], path)
    (path / name).unlink()
    os.mkfifo(path / name)
    with within(30, path / name):
        lines = refused_by_every_importer(path, tmp_path / "converted", capsys)
    assert f"{path / name}: " in lines[0 if kind == "kettle" else 1]
    assert "a named pipe, not a regular file" in lines[0 if kind == "kettle" else 1]


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


def deep_json() -> str:
    return "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("make", ["deep", "fifo"])
def test_an_unreadable_settings_file_is_one_warning_naming_it(make, capsys):
    """$KETTLE_HOME/config.json nested 100,000 deep was a RecursionError traceback at the
    start of `kettle serve` and the app; a named pipe there made both wait forever."""
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    if make == "deep":
        path.write_text(deep_json(), encoding="utf-8")
    else:
        os.mkfifo(path)
    with within(30, path):
        code, err = cli(["serve", "--port", "0", "no-such-model"], capsys)
    warning, error = err.rstrip("\n").split("\n")
    assert warning.startswith(f"kettle: warning: {path}: ") and warning.endswith("using default settings")
    assert ("nested too deeply" if make == "deep" else "a named pipe, not a regular file") in warning
    assert code == 1 and error.startswith("kettle: error: ") and "no-such-model" in error


@pytest.mark.parametrize("make", ["deep", "fifo"])
def test_an_unreadable_model_config_flag_is_one_line(make, seeded, tmp_path, capsys):
    """`kettle pretrain --config FILE` nested too deeply was a RecursionError traceback."""
    path = tmp_path / "shape.json"
    if make == "deep":
        path.write_text(deep_json(), encoding="utf-8")
    else:
        os.mkfifo(path)
    with within(30, path):
        code, err = cli(["pretrain", "--data", seeded["text"], "--config", str(path), "--out", seeded["out"]], capsys)
    line = one_line(err)
    assert code == 1 and f"{path}: cannot read config" in line
    assert ("nested too deeply" if make == "deep" else "a named pipe, not a regular file") in line


async def test_the_app_starts_past_a_settings_file_nested_too_deeply(kettle_home):
    from test_app import SIZE, wait_until

    from tui.app import KettleApp

    config_path().parent.mkdir(parents=True, exist_ok=True)
    config_path().write_text(deep_json(), encoding="utf-8")
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        # Its first key focused: the screen is mounted, not only chosen (quitting mid-mount fails).
        await wait_until(pilot, lambda: getattr(app.focused, "id", None) == "brew", "the welcome screen")
        warnings = [n.message for n in app._notifications if n.severity == "warning"]
        assert warnings == [f"{config_path()}: JSON nested too deeply to read; using default settings"]
    assert config_path().read_text(encoding="utf-8") == deep_json()  # the user's file, kept to fix by hand


@pytest.mark.parametrize("file, make", [("adapter.json", "deep"), ("adapter.safetensors", "fifo")])
def test_a_lora_adapter_nested_too_deeply_or_a_pipe_is_one_line(file, make, seeded, tmp_path, capsys):
    """An adapter's manifest nested 100,000 deep was a RecursionError traceback from
    `finetune merge` (and the app's import); a named pipe as its weights waited forever."""
    from finetune.lora import LoRAConfig, apply_lora, save_adapter
    from gpt.checkpoint import load_model

    model, _ = load_model(seeded["model"])
    apply_lora(model, LoRAConfig(rank=2))
    adapter = save_adapter(model, tmp_path / "adapter")
    (adapter / file).unlink()
    if make == "deep":
        (adapter / file).write_text(deep_json(), encoding="utf-8")
    else:
        os.mkfifo(adapter / file)
    with within(30, adapter / file):
        code, err = cli(
            ["finetune", "merge", "--base", seeded["model"], "--adapter", str(adapter), "--out", seeded["out"]], capsys
        )
    line = one_line(err)
    assert code == 1 and f"{adapter / file}: " in line and not Path(seeded["out"]).exists()
    assert ("nested too deeply" if make == "deep" else "a named pipe, not a regular file") in line


def test_force_never_replaces_a_folder_of_the_users(tiny_model_dir, tmp_path, capsys):
    """`--out ~/Documents --force` removed the folder whole and put a model there: --force
    replaces only a folder Kettle wrote (one holding what the new one holds), an empty one, or
    one from an earlier export of the same kind; a brew says so before its minutes of training."""
    documents = tmp_path / "Documents"
    documents.mkdir()
    (documents / "thesis.md").write_text("mine")
    for argv in (
        ["export-hf", str(tiny_model_dir), str(documents), "--force"],
        ["brew", "starter", "--out", str(documents), "--force"],
    ):
        code, err = cli(argv, capsys)
        line = one_line(err)
        assert code == 1 and "not a model's ('thesis.md')" in line and "choose another path" in line, line
        assert sorted(os.listdir(documents)) == ["thesis.md"] and (documents / "thesis.md").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left
    again = tmp_path / "export"
    for _ in range(2):  # an earlier export of the same model is replaced
        assert cli(["export-hf", str(tiny_model_dir), str(again), "--force"], capsys)[0] == 0
    (tmp_path / "empty").mkdir()
    assert cli(["export-hf", str(tiny_model_dir), str(tmp_path / "empty"), "--force"], capsys)[0] == 0


@pytest.mark.parametrize("kind", ["fifo", "link", "file", "folder"])
def test_force_replaces_only_the_kind_of_entry_it_writes(kind, tiny_model_dir, tmp_path, capsys):
    """export-gguf writes a file, export-hf and brew a folder: --force put one where a FIFO, a
    symbolic link (the link gone, its target kept), a device (/dev/null became a file as root)
    or the other kind of entry was; a brew found out only after its minutes of training."""
    target = tmp_path / "target"
    (tmp_path / "pointed-at").write_text("keep")
    {
        "fifo": lambda: os.mkfifo(target),
        "link": lambda: target.symlink_to(tmp_path / "pointed-at"),
        "file": lambda: target.write_text("keep"),
        "folder": lambda: target.mkdir(),
    }[kind]()
    before = os.lstat(target)
    commands = {
        "export-gguf": (["export-gguf", str(tiny_model_dir), str(target), "--force"], kind == "file"),
        "export-hf": (["export-hf", str(tiny_model_dir), str(target), "--force"], kind == "folder"),
        "brew": (["brew", "starter", "--out", str(target), "--force"], kind == "folder"),
    }
    for name, (argv, writes) in commands.items():
        if writes:
            continue
        code, err = cli(argv, capsys)
        assert code == 1, name
        line = one_line(err)
        assert f"{target} is a " in line and "choose another path" in line, line
        after = os.lstat(target)
        assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino), name
    assert (tmp_path / "pointed-at").read_text() == "keep"
