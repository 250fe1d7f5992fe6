"""`sparse-lightning evaluate`: score a trained model with lm-evaluation-harness, offline, without a merged copy on disk.

The model is built in memory from whatever the run left behind (a `.ckpt`, an exported delta directory, a PEFT
adapter, a merged directory, or a base model name), merged there, and handed to lm-eval's `HFLM` as a model
instance with its tokenizer. lm-eval is an optional extra (`pip install 'sparse-lightning[eval]'`) imported only
here. The tasks shipped in `configs/eval/lm_eval/` (`sl_math_<set>`: the shared math test files, scored with this
project's answer extraction; `sl_commonsense_<set>`: the shared commonsense test files) are always on the task path;
`include_path` adds your own YAMLs.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparse_lightning.borders.apply import apply_delta
from sparse_lightning.borders.checkpoint import CheckpointError, load_trained_module
from sparse_lightning.borders.delta import DELTA_CONFIG, delta_base_model
from sparse_lightning.borders.models import resolve_model_path
from sparse_lightning.sparse import merge_and_unwrap
from sparse_lightning.sparse.quantized import dequantize_model
from sparse_lightning.structure import restore_original_layout
from sparse_lightning.usage_errors import raise_usage_errors

LM_EVAL_REQUIREMENT = "lm-eval>=0.4.13"
INSTALL_HINT = "pip install 'sparse-lightning[eval]' (or pip install 'lm-eval>=0.4.13')"
#: The task YAMLs that ship with the repository (absent from a wheel install: then only lm-eval's own and yours).
SHIPPED_TASKS = Path(__file__).resolve().parents[2] / "configs" / "eval" / "lm_eval"


#: Weight files that are pickles: refused, never loaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle")
CONVERT_HINT = ("convert it once, where you trust it: AutoModelForCausalLM.from_pretrained(src).save_pretrained(dst) "
                "writes safetensors")
#: A sequence classifier's heads (PEFT's modules_to_save for SEQ_CLS).
SEQ_CLS_HEADS = ("classifier", "score")


class EvaluateError(ValueError):
    """A bad input to `evaluate` (model path, task name, missing extra): the message says what to change."""


def require_lm_eval() -> None:
    """Fail with the pip command when lm-eval is missing or older than 0.4.13."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise EvaluateError(f"sparse-lightning evaluate needs lm-evaluation-harness: {INSTALL_HINT}") from None
    version = importlib_metadata.version("lm-eval")
    major_minor_patch = tuple(int(part) for part in version.split(".")[:3] if part.isdigit())
    if major_minor_patch < (0, 4, 13):
        raise EvaluateError(f"lm-eval {version} is installed, sparse-lightning evaluate needs {LM_EVAL_REQUIREMENT}: "
                            f"{INSTALL_HINT}")


# ------------------------------------------------------------------------------------------------- the model


def load_model(model: str | Path, base_model: str | None = None) -> tuple[nn.Module, str, str]:
    """(causal LM with any delta merged in memory, tokenizer directory, what it is) for a checkpoint, a delta or PEFT
    adapter directory, a merged/HF directory, or a base model name; `base_model` overrides the one a delta names."""
    path = Path(str(model)).expanduser()
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        raise EvaluateError(f"{path}: a PyTorch pickle ({path.suffix}), which is refused (loading a pickle can run "
                            f"code); {CONVERT_HINT}")
    if path.is_file():
        if path.suffix != ".ckpt":
            raise EvaluateError(f"{path}: a file must be a training checkpoint (.ckpt); directories may hold a delta "
                                f"({DELTA_CONFIG}), a PEFT adapter (adapter_config.json) or a model (config.json)")
        return _from_checkpoint(path, base_model)
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            config = _read_json(path / "adapter_config.json")
            _require_causal_lm(path, config.get("modules_to_save") or [], config.get("task_type") == "SEQ_CLS")
            return _from_adapter(path, base_model or delta_base_model(path), config)
        if (path / DELTA_CONFIG).is_file():
            config = _read_json(path / DELTA_CONFIG)
            dense = config.get("dense") if isinstance(config.get("dense"), list) else []
            _require_causal_lm(path, [str(name) for name in dense], False)
            base = base_model or delta_base_model(path)
            hf_model, tokenizer = _base(base, path)
            init = _read_json(path / DELTA_CONFIG).get("init_delta")  # apply_delta applies it first, as fit did
            return apply_delta(hf_model, path), tokenizer, f"delta {path} on {base}" + (f" + {init}" if init else "")
        if (path / "config.json").is_file():
            pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles and not any(path.glob("*.safetensors")):
                raise EvaluateError(f"{path}: its weights are PyTorch pickles ({pickles[0]}), which are refused "
                                    f"(loading a pickle can run code); {CONVERT_HINT}")
            hf_model, tokenizer = _base(str(path), path)
            return hf_model, tokenizer, f"model {path}"
        raise EvaluateError(f"{path}: not a model directory: expected {DELTA_CONFIG} (a delta), adapter_config.json "
                            "(a PEFT adapter) or config.json (a merged or base model)")
    try:
        resolved = resolve_model_path(str(model))
    except (ValueError, FileNotFoundError) as error:
        raise EvaluateError(f"{error} (--model takes a .ckpt, a delta, adapter or model directory, or a model "
                            "name)") from None
    hf_model, tokenizer = _base(resolved, str(model))
    return hf_model, tokenizer, f"base model {model}"


def _require_causal_lm(path: Path, trained: list[str], sequence_classifier: bool) -> None:
    """A sequence classifier's delta or adapter cannot be scored by lm-eval (it would be put on a causal LM, which
    lacks its head): say so instead of a missing-parameter error."""
    head = next((name for name in trained if name.split(".")[0] in SEQ_CLS_HEADS), None)
    if sequence_classifier or head:
        why = f"it trains {head}" if head else "task_type SEQ_CLS"
        raise EvaluateError(f"{path} is a sequence classifier's delta ({why}); lm-eval scores causal LMs: evaluate it "
                            "with sparse-lightning validate, or apply_delta it onto AutoModelForSequenceClassification")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise EvaluateError(f"{path}: not readable JSON ({error})") from None
    if not isinstance(config, dict):
        raise EvaluateError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _base(name: str | None, source: str | Path) -> tuple[nn.Module, str]:
    """A plain causal LM (fp32) and its tokenizer directory."""
    from transformers import AutoModelForCausalLM

    if not name:
        raise EvaluateError(f"{source} names no base model: pass --base_model")
    try:
        directory = resolve_model_path(name)
        return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32), directory
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise EvaluateError(f"cannot load the causal LM {name!r} (for {source}): {reason}") from None


def _from_adapter(path: Path, base: str | None, config: dict[str, Any]) -> tuple[nn.Module, str, str]:
    hf_model, tokenizer = _base(base, path)
    if config.get("peft_type") in ("SHIRA", "SUPERTUNING"):
        return apply_delta(hf_model, path), tokenizer, f"PEFT {config['peft_type']} adapter {path} on {base}"
    try:
        from peft import PeftModel
    except ImportError:
        raise EvaluateError(f"{path} is a PEFT {config.get('peft_type')} adapter: pip install peft") from None
    merged = PeftModel.from_pretrained(hf_model, str(path)).merge_and_unload()
    return merged, tokenizer, f"PEFT {config.get('peft_type')} adapter {path} on {base}"


def _from_checkpoint(path: Path, base_model: str | None) -> tuple[nn.Module, str, str]:
    try:
        module, info = load_trained_module(path)
    except CheckpointError as error:
        raise EvaluateError(str(error)) from None
    hf_model = module.model
    if not hasattr(hf_model, "generate") or not hasattr(hf_model, "get_output_embeddings") \
            or hf_model.get_output_embeddings() is None:
        raise EvaluateError(f"{path}: a {type(hf_model).__name__} has no language-model head; lm-eval scores causal "
                            "LMs (train with sparse_lightning.modules.CausalLMModule)")
    if hasattr(hf_model, "merge_and_unload"):  # the PEFT LoRA baseline
        hf_model = hf_model.merge_and_unload()
    hf_model = restore_original_layout(dequantize_model(merge_and_unwrap(hf_model))).float()
    base = base_model or info.get("base_model")
    return hf_model, resolve_model_path(base), f"checkpoint {path} ({info.get('method')} on {base})"


# ------------------------------------------------------------------------------------------------- the tasks


def task_roots(include_path: str | Path | Sequence[str | Path] | None) -> list[Path]:
    """The shipped task directory (when this is a repository checkout) and `include_path` (one path, a
    comma-separated string, or a list), each checked to exist."""
    if isinstance(include_path, (str, Path)):
        include_path = [p for p in str(include_path).split(",") if p.strip()]
    roots = [SHIPPED_TASKS] if SHIPPED_TASKS.is_dir() else []
    for path in include_path or ():
        if not Path(path).expanduser().is_dir():
            raise EvaluateError(f"--include_path {path}: no such directory (it should hold lm-eval task YAMLs)")
        roots.append(Path(path).expanduser().resolve())
        _require_valid_yaml(roots[-1])
    return roots


def _require_valid_yaml(root: Path) -> None:
    """lm-eval skips a task YAML it cannot parse, and the task is then "unknown": name the file and line instead.
    (Tags such as `!function` are lm-eval's; only the syntax is checked here.)"""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    for path in sorted([*root.rglob("*.yaml"), *root.rglob("*.yml")]):
        try:
            yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            mark = getattr(error, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise EvaluateError(f"{where}: not valid YAML ({problem}); fix it or move it out of --include_path") \
                from None


def task_manager(names: Sequence[str], roots: Sequence[Path], data_dir: str | Path | None = None):
    """lm-eval's TaskManager for `names`: over `roots` alone when they hold every name (indexing lm-eval's ~15k
    built-in tasks takes 15-30 s), else over the built-in tasks too; `data_dir` reaches the shipped tasks' data
    loader as task metadata. An unknown name fails (`check_tasks`)."""
    from lm_eval.tasks import TaskManager

    meta = {"data_dir": str(data_dir)} if data_dir else None
    if roots:
        local = TaskManager(include_path=[str(r) for r in roots], include_defaults=False, metadata=meta)
        if all(name in local.all_tasks or local.match_tasks([name]) for name in names):
            return local
    manager = TaskManager(include_path=[str(r) for r in roots] or None, metadata=meta)
    check_tasks(names, manager, roots)
    return manager


def check_tasks(names: Sequence[str], manager: Any, local_roots: Sequence[Path]) -> None:
    """Fail on a task lm-eval does not know, naming the closest known ones and the local (shipped or included) ones."""
    known = manager.all_tasks
    for name in names:
        if name in known or manager.match_tasks([name]):
            continue
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        local = sorted(task for task, entry in manager.task_index.items()
                       if entry.yaml_path is not None and any(root in Path(entry.yaml_path).resolve().parents
                                                              for root in local_roots))
        hint = f"closest: {', '.join(close)}; " if close else ""
        raise EvaluateError(f"unknown task {name!r}: {hint}local tasks: {', '.join(local) or 'none'}; "
                            f"{len(known)} tasks in all (lm-eval ls tasks lists them)")


# ------------------------------------------------------------------------------------------------- evaluate


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def evaluate(model: str | Path, tasks: str | Sequence[str], include_path: str | Path | Sequence[str | Path] = (),
             limit: int | float | None = None, output: str | Path | None = None, batch_size: int = 8,
             device: str | None = None, base_model: str | None = None, data_dir: str | Path | None = None,
             ) -> dict[str, Any]:
    """Run lm-eval `tasks` on `model` (see `load_model`) and return lm-eval's results dict (also written to `output`
    as JSON). Offline: the Hugging Face hub and datasets are never asked; `limit` caps examples per task."""
    with offline():
        return _evaluate(model, tasks, include_path, limit, output, batch_size, device, base_model, data_dir)


@contextmanager
def offline() -> Iterator[None]:
    """The hub and datasets offline (unless the caller set them) for one evaluation, then the environment as it was."""
    saved = {name: os.environ.get(name) for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    for name, value in saved.items():
        os.environ[name] = value if value is not None else "1"
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _evaluate(model, tasks, include_path, limit, output, batch_size, device, base_model, data_dir) -> dict[str, Any]:
    names = _task_names(tasks, limit, batch_size)
    manager = task_manager(names, task_roots(include_path), data_dir)
    hf_model, tokenizer_dir, described = load_model(model, base_model)
    results = _run(hf_model, tokenizer_dir, names, manager, limit, batch_size, device)
    results["sparse_lightning"] = {"model": str(model), "loaded": described, "limit": limit}
    _write(results, output)
    return results


def evaluate_in_memory(hf_model: nn.Module, tokenizer_dir: str | Path, tasks: str | Sequence[str],
                       include_path: str | Path | Sequence[str | Path] = (), limit: int | float | None = None,
                       output: str | Path | None = None, batch_size: int = 8, device: str | None = None,
                       data_dir: str | Path | None = None) -> dict[str, Any]:
    """`evaluate` on a model already in memory (e.g. one whose active delta `MultiDelta` switches between calls)."""
    with offline():
        names = _task_names(tasks, limit, batch_size)
        manager = task_manager(names, task_roots(include_path), data_dir)
        results = _run(hf_model, str(tokenizer_dir), names, manager, limit, batch_size, device)
        results["sparse_lightning"] = {"model": type(hf_model).__name__, "loaded": "in memory", "limit": limit}
        _write(results, output)
        return results


def _task_names(tasks: str | Sequence[str], limit: int | float | None, batch_size: int) -> list[str]:
    require_lm_eval()
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise EvaluateError("--tasks names no task (a comma-separated list, e.g. --tasks sl_math_addsub)")
    if limit is not None and limit <= 0:
        raise EvaluateError(f"--limit must be positive, got {limit}")
    if batch_size < 1:
        raise EvaluateError(f"--batch_size must be at least 1, got {batch_size}")
    return names


def _run(hf_model: nn.Module, tokenizer_dir: str, names: list[str], manager: Any, limit: int | float | None,
         batch_size: int, device: str | None) -> dict[str, Any]:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    hf_model = hf_model.to(device or default_device()).eval()
    lm = HFLM(pretrained=hf_model, tokenizer=tokenizer, batch_size=batch_size)
    return simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit, log_samples=False,
                           bootstrap_iters=0)


def _write(results: dict[str, Any], output: str | Path | None) -> None:
    if output is not None:
        from lm_eval.utils import handle_non_serializable

        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(results, indent=2, default=handle_non_serializable))


def evaluate_main(argv: list[str]) -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="sparse-lightning evaluate",
                            description="Score a model with lm-evaluation-harness (offline; the model is merged in "
                                        "memory, nothing is written but --output)")
    parser.add_argument("--model", required=True, help="a checkpoint (.ckpt), an exported delta directory, a PEFT "
                                                        "adapter directory, a merged model directory or a model name")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names, e.g. sl_math_addsub")
    parser.add_argument("--include_path", type=str | None, default=None,
                        help="a directory of your own task YAMLs (several: comma-separated)")
    parser.add_argument("--limit", type=int | None, default=None, help="at most this many examples per task")
    parser.add_argument("--output", type=str | None, default=None, help="write lm-eval's results here as JSON")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--device", type=str | None, default=None, help="cuda when a GPU is there, else cpu")
    parser.add_argument("--base_model", type=str | None, default=None,
                        help="the base a delta or adapter goes on, when it is not the one the directory names")
    parser.add_argument("--data_dir", type=str | None, default=None,
                        help="data for the shipped sl_math_* / sl_commonsense_* tasks: the math_reasoning or "
                             "commonsense_reasoning folder, or the data folder holding both (default ../shared/data)")
    args = raise_usage_errors(parser).parse_args(argv)
    results = evaluate(args.model, args.tasks, include_path=args.include_path, limit=args.limit, output=args.output,
                       batch_size=args.batch_size, device=args.device, base_model=args.base_model,
                       data_dir=args.data_dir)
    from lm_eval.utils import make_table

    print(f"{results['sparse_lightning']['loaded']}, limit {args.limit}")
    print(make_table(results))
    if args.output:
        print(f"wrote {args.output}")
