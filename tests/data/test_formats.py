"""Dataset import/export on a real SQLite file: round trips, skips, malformed files."""

from __future__ import annotations

import json

import pytest

from data.formats import MAX_LINE_BYTES, export_file, import_file
from data.records import DataFilter
from data.store import Store, open_store
from gpt.errors import KettleError
from tests.conftest import SHARED_DATA, old_snapshot
from tui.cli import main

ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hi.", "input": "", "output": "Hi! 👋"},
]
ALPACA_TURNS = [  # LLaMA-Factory's Alpaca: a system prompt and the earlier turns
    {
        "instruction": "And times 4?",
        "input": "",
        "output": "20",
        "system": "Answer with a number.",
        "history": [["2 + 3?", "5"], ["Double it?", "10"]],
    },
    {"instruction": "Translate.", "input": "chat", "output": "cat", "history": [["Hi", "Hello."]]},
]
SHAREGPT = [
    {
        "id": "a1",
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hello"},
            {"from": "gpt", "value": "Hi."},
            {"from": "human", "value": "Bye"},
            {"from": "gpt", "value": "Bye."},
        ],
    },
    {"id": "a2", "conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
]
OPENAI = [
    {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": "not this", "weight": 0},
            {"role": "user", "content": "two"},
            {"role": "assistant", "content": "this"},
        ]
    },
]
DPO = [
    {
        "prompt": [{"role": "user", "content": "Capital of France?"}],
        "chosen": [{"role": "assistant", "content": "Paris."}],
        "rejected": [{"role": "assistant", "content": "London."}],
    },
    {
        "prompt": [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Joke?"},
        ],
        "chosen": [{"role": "assistant", "content": "Why did the kettle whistle?"}],
        "rejected": [{"role": "assistant", "content": "No."}],
    },
]


def write(path, fmt, records):
    if fmt in ("alpaca", "sharegpt"):
        path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    else:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def read(path, fmt):
    if fmt in ("alpaca", "sharegpt"):
        return json.loads(path.read_text(encoding="utf-8"))
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize(
    "fmt,records", [("alpaca", ALPACA + ALPACA_TURNS), ("sharegpt", SHAREGPT), ("openai", OPENAI), ("dpo", DPO)]
)
def test_each_format_round_trips(store, tmp_path, fmt, records):
    source = write(tmp_path / f"in.{fmt}", fmt, records)
    report = import_file(store, source)  # the format is detected
    assert (report.format, report.conversations) == (fmt, len(records))
    out = export_file(store, tmp_path / f"out.{fmt}", fmt=fmt)
    assert out.skipped == {}
    assert read(tmp_path / f"out.{fmt}", fmt) == records
    # and the same from a frozen snapshot
    snap = store.create_snapshot()
    export_file(store, tmp_path / f"snap.{fmt}", fmt=fmt, snapshot_id=snap.id)
    assert read(tmp_path / f"snap.{fmt}", fmt) == records


def test_instruction_data_imports_fully_and_exports_equal(store, tmp_path):
    source = SHARED_DATA / "instruction-data.json"
    report = import_file(store, source, fmt="alpaca")
    assert (report.conversations, report.messages) == (1100, 2200)
    out = export_file(store, tmp_path / "out.json", fmt="alpaca")
    assert out.written == 1100 and out.skipped == {}
    assert json.loads((tmp_path / "out.json").read_text(encoding="utf-8")) == json.loads(
        source.read_text(encoding="utf-8")
    )


def test_imported_answers_are_marked_ideal_and_weight_zero_stays_context(store, tmp_path):
    import_file(store, write(tmp_path / "chat.jsonl", "openai", OPENAI[1:]))
    conv = store.list_conversations()[0]
    answers = [m for m in store.messages(conv.id) if m.role == "assistant"]
    assert store.label(answers[0].id) is None
    assert store.label(answers[1].id).ideal == "this"


def test_what_a_format_cannot_express_is_skipped_with_reasons(store, tmp_path):
    import_file(store, write(tmp_path / "s.json", "sharegpt", SHAREGPT))
    import_file(
        store,
        write(
            tmp_path / "o.jsonl",
            "openai",
            OPENAI[1:]
            + [
                {
                    "messages": [
                        {"role": "user", "content": "a"},
                        {"role": "user", "content": "b"},
                        {"role": "assistant", "content": "ab"},
                    ]
                }
            ],
        ),
    )
    report = export_file(store, tmp_path / "out.json", fmt="alpaca")
    assert report.written == 2  # ShareGPT's system prompt and earlier turns: system, history
    reasons = {reason.split(" (")[0]: n for reason, n in report.skipped.items()}
    assert reasons == {
        "has earlier answers not chosen for training": 1,
        "has turns that are not question-answer pairs": 1,
    }
    report = export_file(store, tmp_path / "out.sharegpt", fmt="sharegpt")
    assert report.written == 3 and sum(report.skipped.values()) == 1
    report = export_file(store, tmp_path / "out.dpo", fmt="dpo")
    assert report.written == 0 and sum(report.skipped.values()) == 4


def test_export_from_a_filter_and_labels_made_in_the_app(store, tmp_path):
    conv = store.create_conversation()
    user = store.add_message(conv.id, "user", content="Capital of France?")
    good = store.add_message(conv.id, "assistant", content="Paris, I think.", parent_id=user.id)
    bad = store.add_message(conv.id, "assistant", content="London.", parent_id=user.id)
    store.set_label(good.id, thumb=1, ideal="Paris.", tags=["geo"])
    store.set_label(bad.id, thumb=-1)
    export_file(store, tmp_path / "p.jsonl", fmt="dpo", filt=DataFilter(tags_include=("geo",)))
    pairs = read(tmp_path / "p.jsonl", "dpo")
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == [
        ("Paris.", "Paris, I think."),
        ("Paris.", "London."),
    ]
    report = export_file(store, tmp_path / "none.jsonl", fmt="openai", filt=DataFilter(tags_include=("cooking",)))
    assert report.written == 0 and (tmp_path / "none.jsonl").read_text() == ""


def test_dpo_plain_text_and_openai_preference_forms_import(store, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        json.dumps({"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."})
        + "\n"
        + json.dumps(
            {
                "input": {"messages": [{"role": "user", "content": "2+2?"}]},
                "preferred_output": [{"role": "assistant", "content": "4"}],
                "non_preferred_output": [{"role": "assistant", "content": "5"}],
            }
        )
        + "\n",
        encoding="utf-8",
    )
    assert import_file(store, path).conversations == 2
    export_file(store, tmp_path / "out.jsonl", fmt="dpo")
    assert [
        (p["prompt"][-1]["content"], p["chosen"][0]["content"], p["rejected"][0]["content"])
        for p in read(tmp_path / "out.jsonl", "dpo")
    ] == [("Hi?", "Hello!", "Go away."), ("2+2?", "4", "5")]


def test_unknown_fields_are_reported(store, tmp_path):
    records = [{**ALPACA[0], "source": "web"}, ALPACA[1]]
    report = import_file(store, write(tmp_path / "a.json", "alpaca", records))
    assert report.ignored == {"source": 1}


BAD_INPUTS = [
    (
        "invalid.json",
        b'[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output"}\n]',
        "alpaca",
        r"invalid\.json, line 3: invalid JSON",
    ),
    ("trailing.json", b'[{"instruction": "a", "output": "b"}]\n]', "alpaca", "line 2: invalid JSON"),
    (
        "missing.jsonl",
        b'{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", '
        b'"content": "y"}]}\n{"messages": [{"role": "user"}]}\n',
        "openai",
        r"missing\.jsonl, line 2: missing field messages\[0\]\.'content'",
    ),
    (
        "wrongtype.jsonl",
        b'{"messages": [{"role": "user", "content": 5}]}\n',
        "openai",
        r"line 1: field messages\[0\]\.'content' must be a string, got a number",
    ),
    ("noanswer.jsonl", b'{"messages": [{"role": "user", "content": "x"}]}\n', "openai", "no assistant message"),
    (
        "badrole.json",
        b'[{"conversations": [{"from": "robot", "value": "x"}]}]',
        "sharegpt",
        "'from' must be system, human or gpt",
    ),
    (
        "alpaca-type.json",
        b'[{"instruction": "a", "input": null, "output": "b"}]',
        "alpaca",
        r"field 'input' must be a string, got null",
    ),
    (
        "pair.jsonl",
        b'{"prompt": [], "chosen": [], "rejected": []}\n',
        "dpo",
        "'chosen' must hold exactly one assistant message",
    ),
    ("notobject.jsonl", b"[1, 2]\n", "openai", "must be a JSON object"),
    ("utf8.jsonl", b'{"messages": []}\n{"messages": "caf\xe9"}\n', "openai", r"utf8\.jsonl, line 2: not valid UTF-8"),
    ("utf8list.json", b'[\n{"instruction": "caf\xc3", "output": "x"}]', "alpaca", "line 2: not valid UTF-8"),
    ("unknown.jsonl", b'{"text": "hello"}\n', None, "cannot tell the format"),
    ("empty.jsonl", b"\n\n", None, "no records"),
]


@pytest.mark.parametrize("name,data,fmt,error", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_malformed_input_is_one_clear_error_and_changes_nothing(store, tmp_path, name, data, fmt, error):
    import_file(store, write(tmp_path / "good.json", "alpaca", ALPACA))
    before = store.stats()
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(KettleError, match=error):
        import_file(store, path, fmt=fmt)
    assert store.stats() == before


def test_huge_line_is_refused(store, tmp_path):
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"messages": [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "ok"}]}\n')
        f.write(b'{"messages": [{"role": "user", "content": "' + b"x" * (MAX_LINE_BYTES + 10) + b'"}]}\n')
    with pytest.raises(KettleError, match=r"huge\.jsonl, line 2: longer than 16 MiB"):
        import_file(store, path)
    assert store.stats()["messages"] == 0


def test_a_failure_midway_rolls_back_the_whole_import(store, tmp_path, monkeypatch):
    import data.formats as formats

    monkeypatch.setattr(formats, "IMPORT_BATCH_S", 0)  # a transaction a record: the first ones commit
    calls = {"n": 0, "committed": 0}
    real = Store.set_label

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            with open_store(self.path, read_only=True) as other:  # what is on disk now
                calls["committed"] = other.conn.execute("SELECT COUNT(*) FROM conversations").fetchone()[0]
            raise OSError("disk full")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Store, "set_label", flaky)
    with pytest.raises(OSError):
        formats.import_file(store, write(tmp_path / "a.json", "alpaca", ALPACA * 3))
    assert calls["committed"] == 4  # each of the first four in its own transaction, then the fifth failed
    stats = store.stats()
    assert (stats["conversations"], stats["deleted_conversations"], stats["messages"], stats["label_rows"]) == (
        0,
        0,
        0,
        0,
    )
    assert store.conn.execute("SELECT COUNT(*) FROM pending_imports").fetchone()[0] == 0


def test_unwritable_output_is_a_clear_error(store, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(KettleError, match="cannot write"):
        export_file(store, blocker / "out.json", fmt="alpaca")


def test_the_same_file_is_not_imported_twice_by_accident(store, tmp_path):
    path = write(tmp_path / "a.json", "alpaca", ALPACA)
    import_file(store, path)
    with pytest.raises(KettleError, match="imported before .2 conversations.*--again"):
        import_file(store, path)
    assert import_file(store, path, again=True).conversations == 2
    assert store.stats()["conversations"] == 4


def test_import_reports_progress(store, tmp_path):
    seen = []
    import_file(
        store,
        write(tmp_path / "a.json", "alpaca", ALPACA * 150),
        progress=lambda done, total: seen.append((done, total)),
    )
    assert seen == [(200, 300), (300, 300)]


def test_alpaca_system_and_history_become_the_conversation(store, tmp_path):
    import_file(store, write(tmp_path / "turns.json", "alpaca", ALPACA_TURNS[:1]))
    conv = store.list_conversations()[0]
    assert conv.system_prompt == "Answer with a number."
    thread = store.current_thread(conv.id)
    assert [(m.role, m.content) for m in thread] == [
        ("user", "2 + 3?"),
        ("assistant", "5"),
        ("user", "Double it?"),
        ("assistant", "10"),
        ("user", "And times 4?"),
        ("assistant", "20"),
    ]
    # the earlier answers train too, as in a ShareGPT conversation
    assert [store.label(m.id).ideal for m in thread if m.role == "assistant"] == ["5", "10", "20"]


PARTS = [  # content as lists of parts, the way OpenAI and ShareGPT-style tools write it
    {
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "text", "text": "Name a "}, {"type": "text", "text": "colour."}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]},
        ]
    },
]


def test_content_part_lists_import_as_their_text(store, tmp_path):
    import_file(store, write(tmp_path / "parts.jsonl", "openai", PARTS))
    sharegpt = [
        {
            "conversations": [
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                {"role": "assistant", "content": "Hello."},
            ]
        }
    ]
    import_file(store, write(tmp_path / "parts.json", "sharegpt", sharegpt))
    pair = {
        "prompt": [{"role": "user", "content": [{"type": "text", "text": "2+2?"}]}],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "4"}]}],
        "rejected": [{"role": "assistant", "content": "5"}],
    }
    import_file(store, write(tmp_path / "pair.jsonl", "dpo", [pair]))
    export_file(store, tmp_path / "out.jsonl", fmt="openai")
    assert read(tmp_path / "out.jsonl", "openai")[:2] == [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Blue."},
            ]
        },
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
    ]
    export_file(store, tmp_path / "out.dpo", fmt="dpo")
    assert read(tmp_path / "out.dpo", "dpo") == [
        {
            "prompt": [{"role": "user", "content": "2+2?"}],
            "chosen": [{"role": "assistant", "content": "4"}],
            "rejected": [{"role": "assistant", "content": "5"}],
        }
    ]


def test_sharegpt_with_role_and_content_keys_imports_like_from_and_value(store, tmp_path):
    keyed = [
        {
            "id": c["id"],
            "conversations": [
                {"role": {"human": "user", "gpt": "assistant"}.get(t["from"], t["from"]), "content": t["value"]}
                for t in c["conversations"]
            ],
        }
        for c in SHAREGPT
    ]
    assert import_file(store, write(tmp_path / "keyed.json", "sharegpt", keyed)).format == "sharegpt"
    export_file(store, tmp_path / "out.json", fmt="sharegpt")
    assert read(tmp_path / "out.json", "sharegpt") == SHAREGPT  # written back with ShareGPT's keys


def test_trl_pairs_without_a_prompt_share_it_implicitly(store, tmp_path):
    implicit = [{"chosen": p["prompt"] + p["chosen"], "rejected": p["prompt"] + p["rejected"]} for p in DPO]
    report = import_file(store, write(tmp_path / "implicit.jsonl", "dpo", implicit))
    assert (report.format, report.conversations) == ("dpo", 2)  # detected without 'prompt'
    export_file(store, tmp_path / "out.jsonl", fmt="dpo")
    assert read(tmp_path / "out.jsonl", "dpo") == DPO  # written with its explicit prompt


# what the new forms still refuse: one line naming the file and line, nothing imported
NEW_FORM_INPUTS = [
    (
        "image.jsonl",
        b'{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", '
        b'"content": "y"}]}\n{"messages": [{"role": "user", "content": [{"type": "text", '
        b'"text": "What is it?"}, {"type": "image_url", "image_url": {"url": "a.png"}}]}, '
        b'{"role": "assistant", "content": "A cat."}]}\n',
        "openai",
        r"image\.jsonl, line 2: messages\[0\]\.content\[1\] is a part of type 'image_url': "
        r"Kettle imports text only",
    ),
    (
        "notype.json",
        b'[{"conversations": [{"role": "user", "content": [{"text": "x"}]}]}]',
        "sharegpt",
        r"notype\.json, line 1: conversations\[0\]\.content\[0\] is a part of type None",
    ),
    (
        "parttext.jsonl",
        b'{"messages": [{"role": "assistant", "content": [{"type": "text", "text": 7}]}]}\n',
        "openai",
        r"field messages\[0\]\.content\[0\]\.'text' must be a string, got a number",
    ),
    (
        "roleless.json",
        b'[{"conversations": [{"role": "robot", "content": "x"}]}]',
        "sharegpt",
        "'role' must be system, user or assistant, got 'robot'",
    ),
    (
        "same.jsonl",
        json.dumps(
            {"chosen": DPO[0]["prompt"] + DPO[0]["chosen"], "rejected": DPO[0]["prompt"] + DPO[0]["chosen"]}
        ).encode(),
        "dpo",
        r"same\.jsonl, line 1: without a 'prompt', 'chosen' and 'rejected' must be one conversation "
        r"but for a last assistant answer each \(they share 2 messages, then hold 0 and 0 more\)",
    ),
    (
        "forked.jsonl",
        json.dumps(
            {"chosen": DPO[0]["prompt"] + DPO[0]["chosen"], "rejected": [{"role": "user", "content": "?"}]}
        ).encode(),
        None,
        r"they share 0 messages, then hold 2 and 1 more",
    ),
    (
        "text-pair.jsonl",
        b'{"chosen": "Hi! Paris.", "rejected": "Hi! London."}\n',
        "dpo",
        "a text pair needs its 'prompt'",
    ),
    (
        "history-string.json",
        json.dumps([ALPACA[0] | {"history": "a"}]).encode(),
        "alpaca",
        "field 'history' must be a list, got a string",
    ),
    (
        "history-single.json",
        json.dumps([ALPACA[0] | {"history": [["a"]]}]).encode(),
        "alpaca",
        r"history\[0\] must be a pair \[instruction, answer\], got a list of 1",
    ),
    (
        "history-number.json",
        json.dumps([ALPACA[0] | {"history": [["a", 1]]}]).encode(),
        "alpaca",
        r"history\[0\]\[1\] must be a string, got a number",
    ),
    (
        "system-null.json",
        json.dumps([ALPACA[0] | {"system": None}]).encode(),
        "alpaca",
        "field 'system' must be a string, got null",
    ),
]


@pytest.mark.parametrize("name,data,fmt,error", NEW_FORM_INPUTS, ids=[b[0] for b in NEW_FORM_INPUTS])
def test_what_the_new_forms_still_refuse(store, tmp_path, name, data, fmt, error):
    test_malformed_input_is_one_clear_error_and_changes_nothing(store, tmp_path, name, data, fmt, error)


CONTEXT = [  # an answer kept as context ("weight": 0) before the one chosen, as Kettle exports it
    {
        "messages": [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": "not this", "weight": 0},
            {"role": "user", "content": "two"},
            {"role": "assistant", "content": "this"},
            {"role": "user", "content": "three"},
            {"role": "assistant", "content": "and this"},
        ]
    },
]
WITHOUT_CONTEXT = [
    {
        "messages": [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "two"},
            {"role": "assistant", "content": "this"},
            {"role": "user", "content": "three"},
            {"role": "assistant", "content": "and this"},
        ]
    },
]


def test_no_weights_leaves_context_only_answers_out_for_tools_that_ignore_weight(store, tmp_path):
    import_file(store, write(tmp_path / "ctx.jsonl", "openai", CONTEXT))
    report = export_file(store, tmp_path / "out.jsonl", fmt="openai", weights=False)
    assert (report.written, report.context_dropped) == (1, 1)
    assert read(tmp_path / "out.jsonl", "openai") == WITHOUT_CONTEXT
    # ShareGPT and Alpaca cannot mark weights: without them the example fits
    assert export_file(store, tmp_path / "s.json", fmt="sharegpt").written == 0
    assert export_file(store, tmp_path / "s.json", fmt="sharegpt", weights=False).written == 1
    export_file(store, tmp_path / "a.json", fmt="alpaca", weights=False)
    assert read(tmp_path / "a.json", "alpaca") == [
        {"instruction": "three", "input": "", "output": "and this", "system": "Be kind.", "history": [["two", "this"]]}
    ]
    # what was written is all to learn: imported again, it exports as it is
    with open_store(tmp_path / "again.db") as again:
        import_file(again, tmp_path / "out.jsonl")
        export_file(again, tmp_path / "again.jsonl", fmt="openai")
    assert read(tmp_path / "again.jsonl", "openai") == WITHOUT_CONTEXT


def test_data_export_no_weights_flag(tmp_path, capsys):
    write(tmp_path / "ctx.jsonl", "openai", CONTEXT)
    assert main(["data", "import", str(tmp_path / "ctx.jsonl")]) == 0
    out = tmp_path / "trl.jsonl"
    assert main(["data", "export", "--format", "openai", "--no-weights", str(out)]) == 0
    assert "left out 1 answers marked weight 0" in capsys.readouterr().out
    assert read(out, "openai") == WITHOUT_CONTEXT
    pairs = tmp_path / "pairs.jsonl"
    assert main(["data", "export", "--format", "dpo", "--no-weights", str(pairs)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--no-weights" in err[0] and "--format dpo" in err[0]
    assert not pairs.exists()


def test_every_format_the_cli_and_the_export_dialog_offer_comes_from_the_table(tmp_path):
    """One Format entry per format: the CLI's --format choices and the export dialog's options
    are the table's names, each dialog line has its help text, and each entry exports."""
    import argparse

    from data.formats import FORMAT_TABLE, FORMATS
    from tui.cli import build_parser
    from tui.screens.dataset import export_choices

    assert FORMATS == tuple(FORMAT_TABLE) and all(n == f.name for n, f in FORMAT_TABLE.items())
    data = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    data = data.choices["data"]
    commands = next(a for a in data._actions if isinstance(a, argparse._SubParsersAction)).choices
    for command in ("import", "export"):
        (fmt,) = [a for a in commands[command]._actions if "--format" in a.option_strings]
        assert list(fmt.choices) == list(FORMATS), command
    assert export_choices() == [(f.name, f"{f.name}: {f.help}") for f in FORMAT_TABLE.values()]
    with open_store(tmp_path / "k.db") as store:
        for f in FORMAT_TABLE.values():
            assert f.help and f.suffix in (".json", ".jsonl")
            report = export_file(store, tmp_path / f"out{f.suffix}", fmt=f.name)
            assert report.format == f.name


def _alpaca_list(tmp_path, n: int):
    records = [{"instruction": f"Question {i}?", "input": "", "output": "An answer. " * 20} for i in range(n)]
    return write(tmp_path / f"list-{n}.json", "alpaca", records)


def test_a_json_list_reads_in_linear_time(tmp_path):
    """Alpaca's JSON list read as fast per record as JSONL: 8x the records take about 8x the
    time (each entry's line was counted from the start of the file: ~50x here, hours at 56 MB).
    The bound is generous and each size gets several tries: a busy machine only adds time."""
    import gc
    import time

    from data.formats import parse_file

    def seconds(path) -> float:
        started = time.perf_counter()
        parse_file(path)
        return time.perf_counter() - started

    small, large = _alpaca_list(tmp_path, 1_000), _alpaca_list(tmp_path, 8_000)
    gc.disable()  # a collection landing in one timing says nothing about the reader
    try:
        bound = 32 * min(seconds(small) for _ in range(5))
        assert any(seconds(large) < bound for _ in range(3))
    finally:
        gc.enable()


def test_a_bad_entry_late_in_a_json_list_names_its_line(store, tmp_path):
    path = _alpaca_list(tmp_path, 3_000)
    records = json.loads(path.read_text())
    records[2_500]["output"] = 7
    write(path, "alpaca", records)  # indent=1: each record spans 5 lines after the "[" line
    with pytest.raises(KettleError, match=rf"list-3000\.json, line {2 + 5 * 2_500}: field 'output' must be a string"):
        import_file(store, path)


# shapes no model can learn from: refused at import with their line (they broke every snapshot
# after, or make examples that the chat template and the server refuse)
def _jsonl(*records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


ANSWER = [{"role": "assistant", "content": "a"}]
OTHER = [{"role": "assistant", "content": "b"}]
ASK = [{"role": "user", "content": "q?"}]
BAD_SHAPES = [
    (
        "empty-prompt.jsonl",
        _jsonl(DPO[0], {"prompt": [], "chosen": ANSWER, "rejected": OTHER}),
        None,
        r"empty-prompt\.jsonl, line 2: 'prompt' holds no messages: a preference pair answers a question",
    ),
    (
        "system-prompt.jsonl",
        _jsonl({"prompt": [{"role": "system", "content": "Be kind."}], "chosen": ANSWER, "rejected": OTHER}),
        "dpo",
        r"line 1: 'prompt' holds only a system prompt, no question",
    ),
    (
        "text-prompt.jsonl",
        _jsonl({"prompt": " ", "chosen": "a", "rejected": "b"}),
        "dpo",
        r"line 1: 'prompt' has an empty question",
    ),
    (
        "answer-prompt.jsonl",
        _jsonl({"prompt": OTHER + ASK, "chosen": ANSWER, "rejected": OTHER}),
        "dpo",
        r"line 1: 'prompt' starts with an answer, not a question",
    ),
    (
        "implicit.jsonl",
        _jsonl({"chosen": ANSWER, "rejected": OTHER}),
        None,
        r"line 1: the prompt \(the messages 'chosen' and 'rejected' share\) holds no messages",
    ),
    (
        "openai-pref.jsonl",
        _jsonl({"input": {"messages": []}, "preferred_output": ANSWER, "non_preferred_output": OTHER}),
        None,
        r"line 1: 'input\.messages' holds no messages",
    ),
    ("sharegpt-empty.json", b'[\n{"conversations": []}\n]', "sharegpt", r"line 2: 'conversations' holds no messages"),
    (
        "sharegpt-mid-system.json",
        json.dumps(
            [
                SHAREGPT[1],
                {
                    "conversations": [
                        {"from": "human", "value": "Hi"},
                        {"from": "system", "value": "Be brief."},
                        {"from": "gpt", "value": "Hi."},
                    ]
                },
            ],
            indent=1,
        ).encode(),
        None,
        r"line 15: 'conversations' has a system message after its start \(message 1; a system prompt only comes "
        r"first\)",
    ),
    (
        "sharegpt-answer-first.json",
        b'[{"conversations": [{"from": "gpt", "value": "Hi."}, {"from": "human", "value": "Hi"}]}]',
        None,
        r"line 1: 'conversations' starts with an answer, not a question",
    ),
    (
        "sharegpt-no-answer.json",
        b'[{"conversations": [{"from": "human", "value": "Hi"}]}]',
        None,
        r"line 1: 'conversations' has no assistant message",
    ),
    (
        "openai-answer-first.jsonl",
        _jsonl({"messages": [{"role": "system", "content": "s"}] + ANSWER + ASK + OTHER}),
        None,
        r"line 1: 'messages' starts with an answer, not a question",
    ),
    (  # an empty question, as the DPO text form's is refused
        "openai-empty-question.jsonl",
        _jsonl(OPENAI[0], {"messages": [{"role": "user", "content": " "}] + ANSWER}),
        None,
        r"line 2: 'messages' has only empty questions",
    ),
    (
        "alpaca-empty-question.json",
        json.dumps([ALPACA[0], {"instruction": "", "input": "", "output": "5"}], indent=1).encode(),
        None,
        r"line 7: 'instruction' and 'input' are empty",
    ),
]


@pytest.mark.parametrize("name,data,fmt,error", BAD_SHAPES, ids=[b[0] for b in BAD_SHAPES])
def test_conversations_no_model_can_learn_from_are_refused_with_their_line(store, tmp_path, name, data, fmt, error):
    test_malformed_input_is_one_clear_error_and_changes_nothing(store, tmp_path, name, data, fmt, error)


def _store_unlearnable(store: Store) -> None:
    """What an older Kettle imported: a pair answering nothing, an answer opening a
    conversation, a system message in the middle of one; each labelled to train."""
    conv = store.create_conversation("pair", system_prompt="Be kind.")
    for text, thumb in (("a", 1), ("b", -1)):
        store.set_label(store.add_message(conv.id, "assistant", content=text).id, thumb=thumb)
    conv = store.create_conversation("answer first")
    first = store.add_message(conv.id, "assistant", content="Hello.")
    question = store.add_message(conv.id, "user", content="Hi?", parent_id=first.id)
    answer = store.add_message(conv.id, "assistant", content="Hi.", parent_id=question.id)
    store.set_label(answer.id, ideal="Hi!")
    conv = store.create_conversation("system inside")
    question = store.add_message(conv.id, "user", content="Hi?")
    system = store.add_message(conv.id, "system", content="Be brief.", parent_id=question.id)
    store.set_label(store.add_message(conv.id, "assistant", content="Hi.", parent_id=system.id).id, thumb=1)


def test_stored_conversations_no_model_can_learn_from_never_break_a_snapshot_or_export(tmp_path, capsys):
    assert main(["data", "import", str(write(tmp_path / "d.jsonl", "dpo", DPO))]) == 0
    with open_store() as store:
        _store_unlearnable(store)
    capsys.readouterr()
    assert main(["data", "snapshot", "create"]) == 0
    out = capsys.readouterr().out
    assert "snapshot 1: 2 examples, 2 preference pairs" in out
    assert "skipped 2: starts with an answer, not a question" in out  # an answer up-voted at the root too
    assert "skipped 1: has a system message after its start" in out
    assert "skipped 1: a preference pair whose prompt holds only a system prompt, no question" in out
    assert "skipped 1: a preference pair whose prompt starts with an answer" in out  # its correction
    for args in (["--snapshot", "1"], []):
        pairs = tmp_path / "pairs.jsonl"
        assert main(["data", "export", "--format", "dpo", "--force", *args, str(pairs)]) == 0
        assert read(pairs, "dpo") == DPO
        assert main(["data", "export", "--format", "openai", "--force", *args, str(tmp_path / "o.jsonl")]) == 0
        assert len(read(tmp_path / "o.jsonl", "openai")) == 2
    assert "skipped 2: starts with an answer, not a question" in capsys.readouterr().out  # the live export's


def test_an_older_snapshot_holding_an_unlearnable_example_exports_without_it(store, tmp_path):
    import_file(store, write(tmp_path / "o.jsonl", "openai", OPENAI))
    good = store.snapshot_examples(store.create_snapshot().id)
    bad = {"messages": [{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Hi"}] + ANSWER}
    examples = [*good, bad]
    sid = old_snapshot(store, examples)
    report = export_file(store, tmp_path / "out.jsonl", fmt="openai", snapshot_id=sid)
    assert report.written == 2 and report.skipped == {"starts with an answer, not a question": 1}
