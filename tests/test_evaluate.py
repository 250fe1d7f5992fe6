"""`sparse-lightning evaluate`: lm-eval scores the in-memory model built from a checkpoint, a delta, a PEFT adapter or a
base name, on local task YAMLs, offline; bad inputs fail in one line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from transformers import AutoTokenizer, LlamaForCausalLM

from datamodules.prompts import build_prompt
from datamodules.reasoning import MathDataModule
from sparse_lightning import cli
from sparse_lightning.callbacks import RandomMaskCallback
from sparse_lightning.evaluate import SHIPPED_TASKS, EvaluateError, check_tasks, evaluate
from sparse_lightning.export import apply_delta, export_checkpoint
from sparse_lightning.modules import CausalLMModule
from sparse_lightning.peft_interop import export_checkpoint_peft

pytest.importorskip("lm_eval", reason="the eval extra: pip install 'sparse-lightning[eval]'")

QUESTIONS = ["1+1", "2+2", "3+3"]
TASK_YAML = """task: tiny_sum
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: generate_until
test_split: test
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  max_gen_toks: 6
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tiny_lm_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """Two random-mask steps at a high learning rate on the tiny LM: its checkpoint, delta and SHiRA adapter."""
    root = tmp_path_factory.mktemp("evaluate")
    (root / "dataset" / "AddSub").mkdir(parents=True)
    (root / "dataset" / "AddSub" / "test.json").write_text(json.dumps(
        [{"instruction": "What is 2 plus 3?", "input": "", "output": "", "answer": "5"}]))
    train = [{"instruction": f"What is {a} plus {b}?", "input": "", "output": f"The answer is {a + b}."}
             for a, b in [(1, 2), (3, 4), (2, 2), (5, 1)]]
    (root / "train.json").write_text(json.dumps(train * 4))
    torch.manual_seed(0)
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, default_root_dir=root,
                      limit_val_batches=0, callbacks=[RandomMaskCallback(density=0.2)])
    data = MathDataModule(data_dir=str(root), train_files="train.json", tokenizer_name_or_path=str(tiny_lm_dir),
                          eval_datasets=["AddSub"], max_length=64, batch_size=4, val_fraction=0.0)
    module = CausalLMModule(str(tiny_lm_dir), optimizer=lambda params: torch.optim.AdamW(params, lr=0.3))
    trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(root / "run.ckpt")
    export_checkpoint(root / "run.ckpt", root / "delta")
    export_checkpoint_peft(root / "run.ckpt", root / "peft")
    return {"ckpt": root / "run.ckpt", "delta": root / "delta", "peft": root / "peft"}


def greedy_answers(model: torch.nn.Module, tokenizer_dir: Path) -> list[str]:
    """What greedy decoding writes after each tiny_sum prompt, cut at the first newline (lm-eval's `until`)."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    answers = []
    for question in QUESTIONS:
        ids = tokenizer(f"Q: {question}\nA:", return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            out = model.eval().generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        answers.append(text.split("\n")[0])
    return answers


@pytest.fixture(scope="module")
def tasks(trained, tiny_lm_dir: Path, tmp_path_factory) -> Path:
    """tiny_sum: its gold answers are the trained model's own greedy outputs, so only that model scores 1.0."""
    root = tmp_path_factory.mktemp("tasks")
    model = apply_delta(LlamaForCausalLM.from_pretrained(tiny_lm_dir), trained["delta"])
    gold = greedy_answers(model, tiny_lm_dir)
    assert gold != greedy_answers(LlamaForCausalLM.from_pretrained(tiny_lm_dir), tiny_lm_dir)
    rows = [{"question": q, "answer": a} for q, a in zip(QUESTIONS, gold)]
    (root / "tiny.json").write_text(json.dumps(rows))
    (root / "tiny.yaml").write_text(TASK_YAML.format(data=root / "tiny.json"))
    return root


def score(results: dict) -> float:
    return results["results"]["tiny_sum"]["exact_match,none"]


@pytest.mark.parametrize("kind", ["ckpt", "delta", "peft"])
def test_evaluate_scores_the_trained_model_in_memory(trained, tasks: Path, kind: str, tmp_path: Path):
    results = evaluate(trained[kind], "tiny_sum", include_path=tasks, limit=2, output=tmp_path / "results.json",
                       batch_size=2, device="cpu")
    assert score(results) == 1.0 and results["n-samples"]["tiny_sum"]["effective"] == 2
    assert json.loads((tmp_path / "results.json").read_text())["results"]["tiny_sum"]["exact_match,none"] == 1.0
    assert not list(tmp_path.glob("**/config.json"))  # no merged copy written


def test_the_base_model_does_not_score_the_trained_answers(tasks: Path, tiny_lm_dir: Path):
    assert score(evaluate(str(tiny_lm_dir), "tiny_sum", include_path=str(tasks), limit=2)) < 1.0


def test_one_model_in_memory_scores_each_delta_multidelta_activates(trained, tasks: Path, tiny_lm_dir: Path):
    """What benchmarks/fusion.py does: one base in memory, deltas switched in place between evaluations."""
    from sparse_lightning.evaluate import evaluate_in_memory
    from sparse_lightning.multi_delta import MultiDelta

    model = LlamaForCausalLM.from_pretrained(tiny_lm_dir)
    deltas = MultiDelta(model).load("trained", trained["delta"])
    scores = {}
    for name in ("trained", None):
        deltas.activate(name)
        scores[name] = score(evaluate_in_memory(model, tiny_lm_dir, "tiny_sum", include_path=tasks, limit=2))
    assert scores["trained"] == 1.0 and scores[None] < 1.0


def test_the_cli_prints_the_table_and_writes_results(trained, tasks: Path, tmp_path: Path, capsys):
    cli.main(["evaluate", "--model", str(trained["delta"]), "--tasks", "tiny_sum", "--include_path", str(tasks),
              "--limit", "2", "--output", str(tmp_path / "out" / "results.json"), "--batch_size", "1"])
    printed = capsys.readouterr().out
    assert "tiny_sum" in printed and "exact_match" in printed
    assert score(json.loads((tmp_path / "out" / "results.json").read_text())) == 1.0


def test_an_unknown_task_names_the_closest_and_the_local_ones(tasks: Path):
    from lm_eval.tasks import TaskManager

    roots = [SHIPPED_TASKS, tasks]
    manager = TaskManager(include_path=[str(r) for r in roots], include_defaults=False)
    with pytest.raises(EvaluateError, match=r"unknown task 'tiny_summ': closest: tiny_sum; local tasks: sl_commonsense_arc_challenge, .*sl_math_addsub"):
        check_tasks(["tiny_summ"], manager, roots)


@pytest.mark.slow
def test_an_unknown_task_fails_after_looking_through_lm_eval_s_own(tiny_lm_dir: Path):
    """Indexing lm-eval's ~15k built-in tasks takes 15-30 s on a CPU."""
    with pytest.raises(EvaluateError, match=r"unknown task 'hellaswagg': closest: hellaswag"):
        evaluate(str(tiny_lm_dir), "hellaswagg")


def test_a_missing_extra_gives_the_pip_command(tiny_lm_dir: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    with pytest.raises(EvaluateError, match=r"pip install 'sparse-lightning\[eval\]'"):
        cli.main(["evaluate", "--model", str(tiny_lm_dir), "--tasks", "sl_math_addsub"])


@pytest.mark.parametrize("model,message", [
    ("nowhere", "no such model directory.*--model takes a .ckpt"), ("empty", "not a model directory"),
    ("notes.txt", "a file must be a training checkpoint"), ("bad.ckpt", "not a readable PyTorch checkpoint")])
def test_an_unreadable_model_fails_in_one_line(tasks: Path, tmp_path: Path, model: str, message: str):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "bad.ckpt").write_text("not a checkpoint")
    with pytest.raises(EvaluateError, match=message) as error:
        evaluate(tmp_path / model, "tiny_sum", include_path=tasks, limit=1)
    assert "\n" not in str(error.value)


def _reasoning_tasks():
    sys.path.insert(0, str(SHIPPED_TASKS))
    try:
        import reasoning_tasks
    finally:
        sys.path.remove(str(SHIPPED_TASKS))
    return reasoning_tasks


def test_the_shipped_math_tasks_use_the_training_prompt_and_the_project_s_extraction(tmp_path: Path):
    math_tasks = _reasoning_tasks()
    (tmp_path / "dataset" / "AQuA").mkdir(parents=True)
    record = {"instruction": "Which? Answer Choices: (A) 1 (B) 2", "input": "", "output": "", "answer": ["B"]}
    (tmp_path / "dataset" / "AQuA" / "test.json").write_text(json.dumps([record]))
    doc = math_tasks.load(dataset="AQuA", data_dir=str(tmp_path), version=1.0)["test"][0]
    assert doc["answer"] == "B" and math_tasks.doc_to_text(doc) == build_prompt(record, "alpaca")
    assert math_tasks.process_results(doc, ["so the answer is (B)."]) == {"acc": 1.0}
    assert math_tasks.process_results({**doc, "dataset": "AddSub", "answer": "5"}, ["3 + 2 = 5.0 apples"]) == {"acc": 1.0}
    with pytest.raises(FileNotFoundError, match="--data_dir"):
        math_tasks.load(dataset="gsm8k", data_dir=str(tmp_path))


def test_the_shipped_commonsense_tasks_read_either_folder_and_hellaswag_s_rebuilt_file(tmp_path: Path):
    tasks = _reasoning_tasks()
    folder = tmp_path / "commonsense_reasoning" / "dataset" / "hellaswag"
    folder.mkdir(parents=True)
    record = {"instruction": "Pick the ending.", "input": "", "output": "", "answer": "ending2"}
    (folder / "test_reconstructed.json").write_text(json.dumps([record]))
    for given in (tmp_path, tmp_path / "commonsense_reasoning"):  # the shared data folder or the family's own
        doc = tasks.load(dataset="hellaswag", family="commonsense", data_dir=str(given))["test"][0]
        assert doc["answer"] == "ending2" and doc["dataset"] == "hellaswag"
    assert tasks.process_results(doc, ["the correct answer is ending2"]) == {"acc": 1.0}
    assert tasks.process_results(doc, ["the correct answer is ending3"]) == {"acc": 0.0}
    with pytest.raises(FileNotFoundError, match="SPARSE_LIGHTNING_COMMONSENSE_DATA"):
        tasks.load(dataset="boolq", family="commonsense", data_dir=str(tmp_path))


def test_offline_holds_for_the_evaluation_only(monkeypatch):
    from sparse_lightning.evaluate import offline

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    with offline():  # unset means offline; a value the user set is theirs
        assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "0"
    assert "HF_HUB_OFFLINE" not in os.environ and os.environ["HF_DATASETS_OFFLINE"] == "0"


@pytest.mark.parametrize("family", ["math", "commonsense"])
def test_every_shipped_task_names_a_shared_test_set(family: str):
    """Each sl_<family>_*.yaml is one task over one test file of ../shared/data/<family>_reasoning (where CI finds it)."""
    import yaml

    shipped = sorted(SHIPPED_TASKS.glob(f"sl_{family}_*.yaml"))
    data_dir = Path(__file__).resolve().parents[2] / "shared" / "data" / f"{family}_reasoning" / "dataset"
    assert len(shipped) == {"math": 7, "commonsense": 8}[family]
    for path in shipped:
        task = yaml.safe_load(path.read_text())
        assert task["task"] == path.stem and task["include"] == f"_{family}_template_yaml"
        assert task["dataset_kwargs"].get("family", "math") == family
        folder = data_dir / task["dataset_kwargs"]["dataset"]
        assert (folder / "test.json").is_file() or (folder / "test_reconstructed.json").is_file(), path.name


def test_a_peft_lora_adapter_is_merged_in_memory(tiny_lm_dir: Path, tmp_path: Path):
    from peft import LoraConfig, get_peft_model

    from sparse_lightning.evaluate import load_model

    torch.manual_seed(0)
    lora = get_peft_model(LlamaForCausalLM.from_pretrained(tiny_lm_dir),
                          LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    ids = torch.tensor([[3, 9, 27, 81]])
    model, tokenizer_dir, described = load_model(tmp_path / "lora")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, lora.merge_and_unload()(input_ids=ids).logits)
    assert "PEFT LORA adapter" in described and Path(tokenizer_dir) == Path(tiny_lm_dir)
