"""CausalLMModule: response-only loss, SIFT fit, checkpoint evaluation, generate-and-score validation/test."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer
from transformers import LlamaForCausalLM

from datamodules.instruction import collate_for_generation, collate_for_training, encode_for_training, load_tokenizer
from datamodules.reasoning import MathDataModule
from sparse_lightning import cli
from sparse_lightning.callbacks import GradientTopKCallback
from sparse_lightning.eval import extract_math_answer
from sparse_lightning.modules import CausalLMModule, LoRASettings
from sparse_lightning.sparse import SparseDeltaLinear, sparse_delta_layers

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EVAL_SETS = {
    "AddSub": [("Tom has 2 apples and gets 3 more. How many apples?", "5"),
               ("Ann has 4 pens and buys 3. How many pens?", "7")],
    "SingleEq": [("What is 10 minus 5?", "5.0"), ("What is 1 plus 4?", "5")],
}
TRAIN_RECORDS = [
    {"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} + {b} = {a + b}. The answer is {a + b}."}
    for a, b in [(1, 2), (3, 4), (2, 2), (5, 1)]
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """LLM-Adapters layout: two tiny math test sets and a training file that shares no question with them."""
    root = tmp_path_factory.mktemp("math")
    for name, rows in EVAL_SETS.items():
        records = [{"instruction": q, "input": "", "output": "", "answer": a} for q, a in rows]
        (root / "dataset" / name).mkdir(parents=True)
        (root / "dataset" / name / "test.json").write_text(json.dumps(records))
    (root / "train.json").write_text(json.dumps(TRAIN_RECORDS * 8))
    return root


def math_data(tiny_lm_dir, data_dir, **kwargs) -> MathDataModule:
    settings = {"data_dir": str(data_dir), "train_files": "train.json", "tokenizer_name_or_path": str(tiny_lm_dir),
                "eval_datasets": list(EVAL_SETS), "max_length": 96, "batch_size": 4, "eval_batch_size": 2,
                "val_fraction": 0.0}
    return MathDataModule(**{**settings, **kwargs})


def trainer(tmp_path, **kwargs) -> Trainer:
    settings = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
                "enable_model_summary": False, "default_root_dir": tmp_path, "num_sanity_val_steps": 0}
    return Trainer(**{**settings, **kwargs})


def logged(run: Trainer) -> dict[str, float]:
    return {name: float(value) for name, value in run.callback_metrics.items()}


def adamw(lr: float):
    return lambda params: torch.optim.AdamW(params, lr=lr)


def test_loss_is_next_token_cross_entropy_over_response_tokens_only(tiny_lm_dir):
    tokenizer = load_tokenizer(str(tiny_lm_dir))
    examples, _ = encode_for_training(TRAIN_RECORDS[:2] + [{**TRAIN_RECORDS[2], "output": "4"}], tokenizer, "alpaca", 96)
    batch = collate_for_training(examples, tokenizer.pad_token_id)
    module = CausalLMModule(str(tiny_lm_dir))
    module.configure_model()
    module.eval()
    with torch.no_grad():
        loss = module.compute_loss(batch)
        logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    counted = targets != -100
    manual = F.cross_entropy(logits[:, :-1][counted], targets[counted])
    assert counted.sum() == sum(len(r["output"]) + 1 for r in TRAIN_RECORDS[:2]) + 2  # response bytes + EOS
    torch.testing.assert_close(loss, manual)
    # The prompt's logits do not enter the loss: labelling every token gives a different number.
    with torch.no_grad():
        everything = module.compute_loss({**batch, "labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)})
    assert not torch.isclose(loss, everything)


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


@pytest.fixture(scope="module")
def sift_run(tiny_lm_dir, data_dir, tmp_path_factory):
    """A SIFT fit (32 steps on 4 repeated records) whose one validation has a held-out loss and two generation sets."""
    root = tmp_path_factory.mktemp("sift-run")
    recorder = LossRecorder()
    fit_trainer = trainer(root, max_epochs=4, check_val_every_n_epoch=4,
                          callbacks=[GradientTopKCallback(density=0.1), recorder])
    module = CausalLMModule(str(tiny_lm_dir), optimizer=adamw(3e-2), max_new_tokens=8)
    datamodule = math_data(tiny_lm_dir, data_dir, val_fraction=0.2)
    fit_trainer.fit(module, datamodule)
    return fit_trainer, module, recorder.losses


def test_sift_fit_lowers_the_training_loss(sift_run):
    _, module, losses = sift_run
    assert len(losses) == 28  # 26 training records after 20% held out, batch 4: 7 steps x 4 epochs
    assert sum(losses[-4:]) / 4 < 0.7 * sum(losses[:4]) / 4
    layers = sparse_delta_layers(module.model)
    assert len(layers) == 2 * 7 and all(isinstance(layer, SparseDeltaLinear) for layer in layers.values())
    assert any(layer.delta_values.abs().sum() > 0 for layer in layers.values())


def test_validation_logs_heldout_loss_and_per_set_accuracy(sift_run):
    metrics = logged(sift_run[0])
    assert {"val/heldout/loss", "val/AddSub/accuracy", "val/SingleEq/accuracy", "val/accuracy_avg"} <= set(metrics)
    per_set = (metrics["val/AddSub/accuracy"] + metrics["val/SingleEq/accuracy"]) / 2
    assert metrics["val/accuracy_avg"] == pytest.approx(per_set)


def test_validate_a_checkpoint_without_the_sparse_callback(sift_run, tiny_lm_dir, data_dir, tmp_path):
    fit_trainer, _, _ = sift_run
    ckpt = fit_trainer.checkpoint_callback.best_model_path
    module = CausalLMModule(str(tiny_lm_dir), max_new_tokens=8)
    run = trainer(tmp_path)
    run.validate(module, math_data(tiny_lm_dir, data_dir, val_fraction=0.2), ckpt_path=ckpt)
    assert sparse_delta_layers(module.model)  # deltas recreated from the checkpoint, then loaded
    metrics, expected = logged(run), logged(fit_trainer)
    for name in ("val/heldout/loss", "val/AddSub/accuracy", "val/SingleEq/accuracy", "val/accuracy_avg"):
        assert metrics[name] == pytest.approx(expected[name], abs=1e-5), name


def test_accuracy_per_set_and_average_from_scored_generations(tiny_lm_dir, data_dir, tmp_path, monkeypatch):
    calls = []
    answer_ids = load_tokenizer(str(tiny_lm_dir))(" The answer is 5.")["input_ids"]

    def answer_five(self, input_ids, attention_mask, **kwargs):
        calls.append({**kwargs, "training": self.training, "grad": torch.is_grad_enabled()})
        answer = torch.tensor([answer_ids] * input_ids.shape[0])
        return torch.cat([input_ids, answer], dim=1)

    monkeypatch.setattr(LlamaForCausalLM, "generate", answer_five)
    module = CausalLMModule(str(tiny_lm_dir), max_new_tokens=7, num_beams=3, save_predictions=1)
    datamodule = math_data(tiny_lm_dir, data_dir)
    run = trainer(tmp_path)
    run.validate(module, datamodule)
    assert logged(run) == {"val/AddSub/accuracy": 0.5, "val/SingleEq/accuracy": 1.0, "val/accuracy_avg": 0.75}
    run.test(module, datamodule)  # counts restart with each evaluation
    assert logged(run) == {"test/AddSub/accuracy": 0.5, "test/SingleEq/accuracy": 1.0, "test/accuracy_avg": 0.75}
    assert len(calls) == 4 and not any(call["training"] or call["grad"] for call in calls)
    assert calls[0] == {"max_new_tokens": 7, "num_beams": 3, "do_sample": False, "use_cache": True,
                        "pad_token_id": datamodule.tokenizer.pad_token_id,
                        "eos_token_id": datamodule.tokenizer.eos_token_id, "training": False, "grad": False}
    lines = (tmp_path / "predictions_test_step0.jsonl").read_text().splitlines()
    assert [json.loads(line)["dataset"] for line in lines] == ["AddSub", "SingleEq"]
    assert json.loads(lines[0]) == {"dataset": "AddSub", "prompt": datamodule.tokenizer.decode(
        datamodule.eval_examples["AddSub"][0]["input_ids"]), "generation": " The answer is 5.", "gold": "5",
        "correct": True}


def test_fit_with_a_sparse_callback_after_a_baseline_validate_trains_only_the_deltas(tiny_lm_dir, data_dir, tmp_path):
    """validate builds the model without the method; the later fit must attach it, not silently train everything."""
    module = CausalLMModule(str(tiny_lm_dir), optimizer=adamw(1e-2), max_new_tokens=4)
    trainer(tmp_path / "baseline").validate(module, math_data(tiny_lm_dir, data_dir))
    assert not sparse_delta_layers(module.model)
    before = {name: p.detach().clone() for name, p in module.model.named_parameters()}
    trainer(tmp_path / "fit", max_steps=2, limit_val_batches=0,
            callbacks=[GradientTopKCallback(density=0.1)]).fit(module, math_data(tiny_lm_dir, data_dir))
    layers = sparse_delta_layers(module.model)
    assert len(layers) == 2 * 7 and any(layer.delta_values.abs().sum() > 0 for layer in layers.values())
    trainable = {name for name, p in module.model.named_parameters() if p.requires_grad}
    assert trainable == {f"{name}.delta_values" for name in layers}
    for name, p in module.model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, before[name.replace(".base.", ".")]), name  # frozen weights did not move


def test_a_sharded_model_cannot_take_a_sparse_callback_late(tiny_lm_dir, data_dir, tmp_path):
    module = CausalLMModule(str(tiny_lm_dir), max_new_tokens=4)
    trainer(tmp_path).validate(module, math_data(tiny_lm_dir, data_dir))
    module.trainer = trainer(tmp_path, callbacks=[GradientTopKCallback(density=0.1)])
    module._device_mesh = object()  # what ModelParallelStrategy sets before configure_model
    with pytest.raises(RuntimeError, match="without GradientTopKCallback.*fit a freshly constructed module"):
        module.configure_model()
    assert not sparse_delta_layers(module.model)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_real_generation_on_left_padded_batches(tiny_lm_dir, data_dir, tmp_path, num_beams):
    module = CausalLMModule(str(tiny_lm_dir), max_new_tokens=6, num_beams=num_beams)
    datamodule = math_data(tiny_lm_dir, data_dir)
    run = trainer(tmp_path)
    run.validate(module, datamodule)
    metrics = logged(run)
    assert set(metrics) == {"val/AddSub/accuracy", "val/SingleEq/accuracy", "val/accuracy_avg"}
    assert metrics["val/AddSub/accuracy"] in (0.0, 0.5, 1.0) and metrics["val/SingleEq/accuracy"] in (0.0, 0.5, 1.0)
    # A left-padded batch continues every prompt exactly as that prompt alone would.
    prompts = [{"input_ids": datamodule.tokenizer(q)["input_ids"], "answer": a} for q, a in EVAL_SETS["AddSub"]]
    batch = collate_for_generation(prompts, datamodule.tokenizer.pad_token_id, "AddSub")
    assert (batch["attention_mask"] == 0).any()
    together = module.generate(batch["input_ids"], batch["attention_mask"])
    alone = [module.generate(ids[mask.bool()][None], mask[mask.bool()][None])[0]
             for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    assert together == alone
    assert all(len(text) <= 6 for text in together)  # at most one character per new byte token


def test_generation_through_peft_lora(tiny_lm_dir):
    module = CausalLMModule(str(tiny_lm_dir), max_new_tokens=4, lora=LoRASettings(r=2))
    module.configure_model()
    assert type(module.model).__name__.startswith("PeftModel")
    tokenizer = module.tokenizer  # no trainer: the model directory's own tokenizer
    prompt = torch.tensor([tokenizer("What is 1 plus 1?")["input_ids"]])
    module.model.train()
    module.model.base_model.model.lm_head.eval()
    modes = [sub.training for sub in module.model.modules()]
    [text] = module.generate(prompt, torch.ones_like(prompt))
    assert isinstance(text, str)
    assert [sub.training for sub in module.model.modules()] == modes  # each module's mode is restored


def test_batches_must_say_what_to_evaluate(tiny_lm_dir):
    module = CausalLMModule(str(tiny_lm_dir))
    with pytest.raises(ValueError, match="needs 'labels' \\(loss\\) or 'answers'"):
        module.validation_step({"input_ids": torch.zeros(1, 2, dtype=torch.long)}, 0)
    with pytest.raises(ValueError, match="dtype must name a torch dtype"):
        CausalLMModule(str(tiny_lm_dir), dtype="fp33")


@pytest.mark.parametrize("configs", [["model/smollm2.yaml", f"task/{task}.yaml", f"method/smollm2/{method}.yaml"]
                                     for method in ("sift", "full") for task in ("alpaca", "math", "commonsense")]
                         + [["eval/math.yaml"], ["eval/commonsense.yaml"]], ids=str)
def test_committed_configs_parse(configs, capsys):
    command = "validate" if configs[0].startswith("eval/") else "fit"
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, *[a for c in configs for a in ("--config", str(CONFIGS / c))], "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "class_path: sparse_lightning.modules.CausalLMModule" in capsys.readouterr().out


def test_eval_config_runs_through_the_cli(tiny_lm_dir, data_dir, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(cli.SparseLightningCLI, "after_validate",
                        lambda self: seen.update({k: float(v) for k, v in self.trainer.callback_metrics.items()}))
    cli.main(["validate", "--config", str(CONFIGS / "eval" / "math.yaml"), "--trainer.accelerator", "cpu",
              "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp_path),
              "--model.model_name_or_path", str(tiny_lm_dir), "--model.max_new_tokens", "4",
              "--data.tokenizer_name_or_path", str(tiny_lm_dir), "--data.data_dir", str(data_dir),
              "--data.eval_datasets", "[AddSub, SingleEq]", "--data.max_eval_samples_per_dataset", "1",
              "--data.max_length", "96"])
    assert set(seen) == {"val/AddSub/accuracy", "val/SingleEq/accuracy", "val/accuracy_avg"}
    [predictions] = tmp_path.glob("eval-math/version_*/predictions_val_step0.jsonl")
    assert len(predictions.read_text().splitlines()) == 2  # one example per set


@pytest.mark.slow
def test_smollm2_generation_evaluation_on_real_math_problems(shared_data, tmp_path):
    datamodule = MathDataModule(data_dir=str(shared_data / "math_reasoning"), eval_datasets=["AddSub", "SingleEq"],
                                max_eval_samples_per_dataset=2, eval_batch_size=2)
    module = CausalLMModule("SmolLM2-135M-Instruct", max_new_tokens=64, save_predictions=2)
    run = trainer(tmp_path)
    run.validate(module, datamodule)
    metrics = logged(run)
    assert set(metrics) == {"val/AddSub/accuracy", "val/SingleEq/accuracy", "val/accuracy_avg"}
    assert all(0.0 <= value <= 1.0 for value in metrics.values())
    samples = [json.loads(line) for line in (tmp_path / "predictions_val_step0.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(s["prompt"].endswith("### Response:\n") for s in samples)
    assert sum(extract_math_answer(s["generation"]) is not None for s in samples) >= 3
