"""lm-evaluation-harness against `kettle serve`: its `local-completions` model with default
settings runs a loglikelihood (multiple-choice) task and a generate_until task, written here, on
a real server on 127.0.0.1, and scores them as lm-eval's `hf` model does on the transformers
export of the same model."""

from __future__ import annotations

import json

import pytest

from gpt.engine import Engine
from gpt.sampling import SamplingParams
from gpt.service import InProcessService

lm_eval = pytest.importorskip("lm_eval")

WORDS = ["tea", "kettle", "water", "stone", "river", "paint", "studio", "letter", "garden", "house"]
GEN_OPTIONS = {"until": ["\n"], "max_gen_toks": 8, "do_sample": False}


def write_tasks(folder, engine: Engine) -> None:
    """~20 multiple-choice and ~20 generate_until examples; every other generation target is
    the model's own greedy answer, so the accuracy is not trivially 0."""
    mc, gen = [], []
    for i in range(20):
        a, b = WORDS[i % 10], WORDS[(i * 3 + 1) % 10]
        mc.append({"question": f"She poured the {a} into the", "choices": [b, a, "cup", "sky"], "answer": i % 4})
        question = f"He had always thought the {a} and the {b}"
        answer = engine.generate(question, SamplingParams(temperature=0, max_new_tokens=8, stop=["\n"])).text
        gen.append({"question": question, "target": answer if i % 2 == 0 else "no such answer"})
    for name, rows in (("mc", mc), ("gen", gen)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = {"dataset_path": "json", "test_split": "test", "doc_to_text": "{{question}}"}
    tasks = {
        "kettle_mc": {
            **common,
            "output_type": "multiple_choice",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{answer}}",
            "metric_list": [{"metric": "acc"}],
            "dataset_kwargs": {"data_files": {"test": str(folder / "mc.jsonl")}},
        },
        "kettle_gen": {
            **common,
            "output_type": "generate_until",
            "doc_to_target": "{{target}}",
            "generation_kwargs": GEN_OPTIONS,
            "metric_list": [{"metric": "exact_match"}],
            "dataset_kwargs": {"data_files": {"test": str(folder / "gen.jsonl")}},
        },
    }
    for name, task in tasks.items():  # JSON is YAML
        (folder / f"{name}.yaml").write_text(json.dumps({"task": name, **task}, indent=1))


def evaluate(folder, model: str, model_args: dict) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=["kettle_mc", "kettle_gen"],
        task_manager=TaskManager(include_path=str(folder)),
    )["results"]
    return {"acc": results["kettle_mc"]["acc,none"], "exact_match": results["kettle_gen"]["exact_match,none"]}


@pytest.fixture
def offline(monkeypatch):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")


def test_lm_eval_local_completions_against_kettle_serve_equals_hf_on_the_export(tiny_model_dir, tmp_path, offline):
    from test_server import RunningServer

    write_tasks(tmp_path, Engine.load(tiny_model_dir))
    running = RunningServer(InProcessService(str(tiny_model_dir)), None)
    try:
        kettle = evaluate(tmp_path, "local-completions", {"base_url": running.url + "/v1/completions", "model": "tiny"})
    finally:
        running.stop()
    assert kettle["exact_match"] >= 0.5 and 0 <= kettle["acc"] <= 1  # both task types ran

    from gpt.hf import export_hf

    export = export_hf(tiny_model_dir, tmp_path / "hf")
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(export)("hello")
    except Exception as exc:  # noqa: BLE001 - whatever an export without a tokenizer raises
        pytest.xfail(f"export-hf writes no Hugging Face tokenizer yet ({type(exc).__name__}: {exc})")
    hf = evaluate(tmp_path, "hf", {"pretrained": str(export), "device": "cpu", "dtype": "float32"})
    assert hf == kettle
