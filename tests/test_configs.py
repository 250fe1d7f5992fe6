"""Every shipped config parses, alone or in the compositions the README and docs/ document, and means what it says.

Compositions stack fragments with repeated `--config` (model, then task, then method, then strategy/precision):
`configs/model/<model>.yaml`, `configs/task/<task>.yaml`, `configs/method/<model>/<method>.yaml`. Parsing uses the
CLI's own parser (its tokenizer link included) without instantiating anything; a few representative compositions
are also instantiated (Trainer, callbacks, module, datamodule; no weights are loaded) to check that the parsed values
reach the objects.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from sparse_lightning import cli
from sparse_lightning.modules import SparseFineTuningModule
from sparse_lightning.registry import METHODS as REGISTRY

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# Every GLUE task carries the quality table's recipe: a step schedule and dropout off (the method defaults were
# chosen under it). task -> (max_steps, val_check_interval, max_length); the five benchmarked tasks but SST-2 run
# benchmarks/quality.py's schedule, 300 steps validated every 100; SST-2 is the quick start's 400 steps.
GLUE_SCHEDULES = {"cola": (300, 100, 64), "mrpc": (300, 100, 128), "rte": (300, 100, 128), "stsb": (300, 100, 128),
                  "wnli": (300, 100, 128), "qnli": (900, 300, 128), "mnli": (3000, 1000, 128),
                  "qqp": (3000, 1000, 128), "sst2": (400, 400, 128)}
GLUE_TASKS = list(GLUE_SCHEDULES)
LM_TASKS = {"math": "datamodules.reasoning.MathDataModule",
            "commonsense": "datamodules.reasoning.CommonsenseDataModule",
            "alpaca": "datamodules.instruction.AlpacaDataModule",
            "chat": "datamodules.chat.ChatDataModule"}
MODELS = {"minilm": ("sparse_lightning.modules.SequenceClassificationModule", "all-MiniLM-L6-v2", GLUE_TASKS),
          "smollm2": ("sparse_lightning.modules.CausalLMModule", "SmolLM2-135M-Instruct", list(LM_TASKS))}
SM3 = REGISTRY["spiel_ma"].optimizer
#: The chosen learning rate of every method of the registry, per model (a method missing here fails its compositions).
LR = {
    "full": {"minilm": 1e-4, "smollm2": 2e-5},
    "lora": {"minilm": 1e-3, "smollm2": 1e-3},
    "sift": {"minilm": 1e-3, "smollm2": 1e-3},
    "spiel_ag": {"minilm": 1e-3, "smollm2": 1e-3},
    "spiel_ma": {"minilm": 1e-2, "smollm2": 5e-3},
    "s2ft": {"minilm": 2e-3, "smollm2": 1e-3},
    "random_mask": {"minilm": 2e-3, "smollm2": 1e-3},
}
METHODS = list(REGISTRY)


def expected(method: str) -> tuple[str | None, str, dict[str, float]]:
    """(callback class name or None, optimizer class path, {model: learning rate}) of a registry method."""
    row = REGISTRY[method]
    return (row.callback.__name__ if row.callback else None), row.optimizer, LR[method]


COMPOSITIONS = [(model, task, method) for model, (_, _, tasks) in MODELS.items() for task in tasks for method in METHODS]
# Tasks on the user's own files (docs/data.md): task -> (model, datamodule class)
OWN_DATA_TASKS = {"csv_classification": ("minilm", "datamodules.text_classification.TextClassificationDataModule")}
OWN_DATA_COMPOSITIONS = [(model, task, method) for task, (model, _) in OWN_DATA_TASKS.items() for method in METHODS]
STANDALONE = ["eval/math.yaml", "eval/commonsense.yaml"]
#: The README's first command: the chosen MiniLM SIFT recipe on SST-2's quick-start schedule.
QUICK_START = ["model/minilm.yaml", "task/sst2.yaml", "method/minilm/sift.yaml"]
# (base configs, fragment, what the fragment must set)
STACKED = [
    (QUICK_START, "strategy/ddp.yaml", {"trainer.strategy": "ddp", "trainer.devices": 2}),
    (["model/minilm.yaml", "task/cola.yaml", "method/minilm/sift.yaml"], "strategy/ddp.yaml",
     {"trainer.strategy": "ddp", "trainer.devices": 2}),
    (["model/smollm2.yaml", "task/alpaca.yaml", "method/smollm2/spiel_ag.yaml"], "strategy/fsdp2.yaml",
     {"trainer.strategy.class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
      "trainer.strategy.init_args.data_parallel_size": 2, "trainer.devices": 2}),
    (["model/smollm2.yaml", "task/alpaca.yaml", "method/smollm2/sift.yaml"], "strategy/fsdp2_bf16.yaml",
     {"trainer.strategy.class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
      "model.init_args.fsdp_param_dtype": "bfloat16"}),
    (["model/minilm.yaml", "task/sst2.yaml", "method/minilm/spiel_ma.yaml"], "precision/bf16_mixed.yaml",
     {"trainer.precision": "bf16-mixed"}),
]


INSTANTIATED = [("minilm", "stsb", "sift"), ("minilm", "sst2", "random_mask"), ("smollm2", "math", "spiel_ma"),
                ("smollm2", "alpaca", "s2ft"), ("minilm", "mrpc", "lora")]


def composition(model: str, task: str, method: str) -> list[str]:
    return [f"model/{model}.yaml", f"task/{task}.yaml", f"method/{model}/{method}.yaml"]


class ParseOnly(cli.SparseLightningCLI):
    """The CLI's parser (links included) without building a Trainer, module or datamodule."""

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass


@pytest.fixture(scope="module")
def parser():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["sparse-lightning"])
        return ParseOnly(SparseFineTuningModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
                         auto_configure_optimizers=False,
                         args=[a for c in QUICK_START for a in ("--config", str(CONFIGS / c))]).parser


@pytest.fixture(scope="module")
def parse(parser):
    """configs (relative to configs/) + extra arguments -> the merged config as a plain dict."""
    def _parse(configs: list[str], *extra: str) -> dict[str, Any]:
        cfg = parser.parse_args([a for c in configs for a in ("--config", str(CONFIGS / c))] + list(extra))
        merged = yaml.safe_load(parser.dump(cfg, skip_link_targets=False))
        merged.pop("config", None)
        return merged
    return _parse


def get(config: dict[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        config = config[int(key)] if isinstance(config, list) else config[key]
    return config


def check_model_and_method(config: dict[str, Any], model: str, method: str) -> None:
    module_class, model_name, _ = MODELS[model]
    callback, optimizer, lrs = expected(method)
    assert config["model"]["class_path"] == module_class
    init = config["model"]["init_args"]
    assert init["model_name_or_path"] == model_name
    assert config["data"]["init_args"]["tokenizer_name_or_path"] == model_name  # the link
    assert init["optimizer"]["class_path"] == optimizer
    assert init["optimizer"]["init_args"]["lr"] == pytest.approx(lrs[model])
    assert init["optimizer"]["init_args"]["weight_decay"] == 0.0  # the model's, kept through the method's merge
    assert init["warmup_ratio"] == (0.06 if model == "minilm" else 0.03) and init["lr_schedule"] == "linear"
    callbacks = config["trainer"].get("callbacks") or []
    if callback is None:
        assert not callbacks
    else:
        assert [c["class_path"] for c in callbacks] == [f"sparse_lightning.callbacks.{callback}"]
    assert (init.get("lora") is not None) == (method == "lora")
    if method.startswith("spiel"):
        assert callbacks[0]["init_args"]["regrowth"] == {"spiel_ag": "gradient", "spiel_ma": "momentum"}[method]
    if method == "s2ft":
        assert callbacks[0]["init_args"]["select_by"] == "random"
    if model == "minilm" and callbacks:  # the chosen budgets (benchmarks/results/quality/mrpc.md, cola_diagnosis.md)
        args = callbacks[0]["init_args"]
        if method == "s2ft":
            assert (args["num_channels"], args["dense_modules"]) == (87, ["classifier", "pooler"])
        else:
            assert args["dense_modules"] == ["classifier", "pooler"]
            # SIFT and SpIEL-AG at LoRA r=5's count in the encoder (issue 28); SpIEL-MA and the random mask at 0.5%
            assert args.get("num_params") == 207_360 if method in ("sift", "spiel_ag") else (
                args.get("density") == 0.005 or args.get("num_params") == 53_112)
        if method == "sift":
            assert args["calibration_batches"] == 8


@pytest.mark.parametrize(("model", "task", "method"), COMPOSITIONS, ids=["-".join(c) for c in COMPOSITIONS])
def test_compositions_parse_to_what_each_fragment_says(parse, model, task, method):
    config = parse(composition(model, task, method))
    check_model_and_method(config, model, method)
    data, trainer = config["data"], config["trainer"]
    assert config["seed_everything"] == 42
    if model == "minilm":
        assert data["class_path"] == "datamodules.glue.GLUEDataModule" and data["init_args"]["task"] == task
        assert config["model"]["init_args"].get("num_labels") is None  # follows the task in setup
        steps, every, max_length = GLUE_SCHEDULES[task]
        assert (trainer["max_steps"], trainer["val_check_interval"]) == (steps, every)
        assert data["init_args"]["max_length"] == max_length
        assert config["model"]["init_args"]["model_kwargs"] == {"hidden_dropout_prob": 0.0,
                                                                "attention_probs_dropout_prob": 0.0}
        if task == "sst2":  # one pass over the bundled subset: epochs and steps coincide
            assert data["init_args"]["data_dir"] == "bundled"
        else:
            assert trainer.get("check_val_every_n_epoch") is None
    else:
        assert data["class_path"] == LM_TASKS[task] and trainer["max_steps"] == 200
        logger = trainer["logger"]["init_args"]
        assert (logger["save_dir"], logger["name"]) == (f"runs/{task}", method)


@pytest.mark.parametrize("config_file", STANDALONE)
def test_standalone_configs_parse(parse, config_file):
    config = parse([config_file])
    assert config["model"]["class_path"] == MODELS["smollm2"][0]
    assert config["data"]["init_args"]["tokenizer_name_or_path"] == "SmolLM2-135M-Instruct"
    assert config["data"]["init_args"]["val_fraction"] == 0.0  # evaluation only


def test_the_quick_start_is_the_chosen_sift_recipe_on_400_steps(parse):
    """One recipe per (model, task, method): the quick start is the composition, on SST-2's quick-start schedule."""
    config = parse(QUICK_START)
    check_model_and_method(config, "minilm", "sift")
    assert (config["trainer"]["max_steps"], config["trainer"]["val_check_interval"]) == (400, 400)
    assert config["trainer"]["log_every_n_steps"] == 25 and config["data"]["init_args"]["data_dir"] == "bundled"


def test_there_is_no_second_recipe_file():
    """configs/ holds fragments (model, task, method, strategy, precision) and evaluation configs only: no whole-run
    copies of a composition that could drift from it (issue 27)."""
    assert sorted(p.name for p in CONFIGS.iterdir()) == ["eval", "method", "model", "precision", "strategy", "task"]


@pytest.mark.parametrize(("configs", "fragment", "expected"), STACKED,
                         ids=[f"{Path(c[-1]).parent}/{Path(c[-1]).stem}+{f}" for c, f, _ in STACKED])
def test_strategy_and_precision_fragments_stack_last(parse, configs, fragment, expected):
    base, stacked = parse(configs), parse([*configs, fragment])
    for key, value in expected.items():
        assert get(stacked, key) == value
    assert stacked["trainer"].get("callbacks") == base["trainer"].get("callbacks")  # the method is untouched
    assert stacked["data"] == base["data"]


@pytest.mark.parametrize(("model", "task", "method"), OWN_DATA_COMPOSITIONS, ids=["-".join(c) for c in OWN_DATA_COMPOSITIONS])
def test_own_data_compositions_parse(parse, model, task, method):
    config = parse(composition(model, task, method))
    check_model_and_method(config, model, method)
    assert config["data"]["class_path"] == OWN_DATA_TASKS[task][1]
    assert all((ROOT / config["data"]["init_args"][key]).is_file() for key in ("train_file", "validation_file"))


def test_every_shipped_config_is_covered():
    used = {c for combo in COMPOSITIONS + OWN_DATA_COMPOSITIONS for c in composition(*combo)} | set(STANDALONE)
    used |= {fragment for _, fragment, _ in STACKED}
    shipped = {str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml")}
    lm_eval_tasks = {c for c in shipped if c.startswith("eval/lm_eval/")}  # lm-eval's format: tests/test_evaluate.py
    assert lm_eval_tasks and used == shipped - lm_eval_tasks


def readme_commands() -> list[list[str]]:
    """The `--config` lists of every `sparse-lightning` command in README.md, then in docs/*.md (continuation lines
    joined)."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    text = "\n".join(page.read_text(encoding="utf-8") for page in pages).replace("\\\n", " ")
    commands = [line for line in text.splitlines() if "sparse-lightning " in line and "--config" in line]
    return [re.findall(r"--config\s+configs/(\S+\.yaml)", line) for line in commands]


@pytest.mark.parametrize("configs", readme_commands(), ids=["+".join(c) for c in readme_commands()])
def test_readme_commands_parse(parse, configs):
    assert all((CONFIGS / c).is_file() for c in configs)
    config = parse(configs)
    assert config["model"]["class_path"] in {class_path for class_path, _, _ in MODELS.values()}
    assert config["data"]["init_args"]["tokenizer_name_or_path"] == config["model"]["init_args"]["model_name_or_path"]


def test_the_readme_documents_the_composition_and_the_quick_start():
    configs = readme_commands()
    assert configs[0] == QUICK_START  # the quick start comes first
    assert ["model/minilm.yaml", "task/cola.yaml", "method/minilm/sift.yaml"] in configs
    assert ["model/smollm2.yaml", "task/math.yaml", "method/smollm2/sift.yaml"] in configs


@pytest.mark.parametrize("model_dir", ["path/to/a/model", "out/merged"])
@pytest.mark.parametrize("combo", [("minilm", "qnli", "full"), ("smollm2", "math", "sift"),
                                   ("smollm2", "commonsense", "full"), ("smollm2", "alpaca", "sift")], ids=str)
def test_the_tokenizer_follows_the_model_for_every_datamodule(parse, combo, model_dir):
    config = parse(composition(*combo), "--model.model_name_or_path", model_dir)
    assert config["data"]["init_args"]["tokenizer_name_or_path"] == model_dir


def test_a_different_tokenizer_on_the_command_line_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["sparse-lightning"])
    args = [a for c in composition("minilm", "rte", "sift") for a in ("--config", str(CONFIGS / c))]
    with pytest.raises(SystemExit):
        ParseOnly(SparseFineTuningModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
                  auto_configure_optimizers=False, args=[*args, "--data.tokenizer_name_or_path", "bert-base-uncased"])
    assert "the tokenizer follows --model.model_name_or_path (all-MiniLM-L6-v2)" in capsys.readouterr().err
    same = ParseOnly(SparseFineTuningModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
                     auto_configure_optimizers=False, args=[*args, "--model.model_name_or_path=x",
                                                            "--data.init_args.tokenizer_name_or_path=x"])
    assert same.config.data.init_args.tokenizer_name_or_path == "x"


def test_print_config_through_the_entry_point(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["sparse-lightning"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", *[a for c in composition("smollm2", "commonsense", "spiel_ma") for a in
                           ("--config", str(CONFIGS / c))], "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["optimizer"] == {
        "class_path": SM3, "init_args": {"lr": 5e-3, "momentum": 0.9, "weight_decay": 0.0, "eps": 1e-8}}
    assert printed["trainer"]["callbacks"][0]["init_args"]["regrowth"] == "momentum"


@pytest.mark.parametrize(("model", "task", "method"), INSTANTIATED, ids=["-".join(c) for c in INSTANTIATED])
def test_representative_compositions_instantiate(model, task, method, tmp_path, monkeypatch):
    """Trainer, callback, module and datamodule built from the composition (no weights loaded, nothing run)."""
    monkeypatch.chdir(tmp_path)  # relative logger directories land here
    monkeypatch.setattr(sys, "argv", ["sparse-lightning"])
    args = [a for c in composition(model, task, method) for a in ("--config", str(CONFIGS / c))]
    built = cli.SparseLightningCLI(SparseFineTuningModule, subclass_mode_model=True, subclass_mode_data=True,
                                   run=False, args=[*args, "--trainer.accelerator", "cpu"])
    callback_class, optimizer_class, lrs = expected(method)
    found = [type(c).__name__ for c in built.trainer.callbacks
             if type(c).__module__.startswith("sparse_lightning.callbacks")]
    assert found == ([callback_class] if callback_class else [])
    optimizer = built.model.optimizer_factory([torch.nn.Parameter(torch.zeros(2))])
    assert f"{type(optimizer).__module__}.{type(optimizer).__name__}".endswith(optimizer_class.rsplit(".", 1)[1])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lrs[model])
    assert type(built.model).__name__ == MODELS[model][0].rsplit(".", 1)[1]
    assert built.model.hparams.model_name_or_path == MODELS[model][1]
    assert built.datamodule.hparams.tokenizer_name_or_path == MODELS[model][1]
    if model == "minilm":
        assert built.datamodule.task.name == task and built.datamodule.num_labels == (1 if task == "stsb" else 2)
        assert built.trainer.max_steps == GLUE_SCHEDULES[task][0]
    else:
        assert built.trainer.max_steps == 200 and built.trainer.logger.log_dir.startswith(f"runs/{task}/{method}")
    if method == "lora":
        assert built.model.hparams.lora["r"] == (5 if model == "minilm" else 3)
        if model == "minilm":  # the pooler trains beside the adapters, as under the sparse recipes
            assert built.model.hparams.lora["modules_to_save"] == ["classifier", "pooler"]
