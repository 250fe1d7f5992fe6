"""PEFT formats: a trained sparse delta written as a PEFT adapter directory, and PEFT sparse adapters read back.

Two PEFT formats hold a sparse delta on frozen `nn.Linear` weights, and both load with only `transformers` and `peft`
installed (`PeftModel.from_pretrained(base, directory)`):

- SHiRA (`peft_type: "SHIRA"`, peft >= 0.17): per target `shira_indices` (int32 `[2, N]`, rows then columns) and
  `shira_weight` (fp32 `[N]`), where N = r * (out + in) for one global r. PEFT cannot store a per-weight count, so
  each weight's k entries are padded to N with zero-valued entries at distinct unused positions (the smallest free
  flat positions), r being the smallest that holds every weight's k. PEFT adds the fp32 values onto a low-precision
  weight in fp32 and rounds once, as this library does, so a bf16 base merges bit for bit the same.
- Super-Tuning (`peft_type: "SUPERTUNING"`, peft >= 0.21): per target flat row-major `supertuning_indices` (int32
  `[N]`) and `supertuning_values` (fp32 `[N]`), N = int(numel * (1 - sparsity)) for one global sparsity; padded the
  same way. PEFT rounds the values to the weight's dtype before adding them, so on a bf16 base its merged weights can
  differ from ours by one bf16 rounding at some entries (fp32 bases are exact).

S2FT's dense blocks are written as their entries, in the original (un-permuted) coordinates. Densely trained
parameters (a classifier head) go in `modules_to_save`. PEFT adapts `nn.Linear` only: a GPT-2 `Conv1D` target is
refused (use the delta format or a merged export).

`apply_peft_adapter` (reached through `sparse_lightning.borders.apply.apply_delta` for any directory holding
`adapter_config.json`) checks a SHiRA or Super-Tuning directory completely (config, every tensor's name, dtype,
shape, index range and uniqueness, finite values, the dense parameters) before it changes anything, then adds the
delta onto the model the way `apply_delta` adds its own files.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from sparse_lightning.borders.checks import (
    TensorFile,
    add_rounding_once,
    read_json_object,
    readable_by_all,
    require_finite,
    require_finite_results,
    unchanged_model_error,
)
from sparse_lightning.borders.delta import delta_tensors
from sparse_lightning.borders.name_pattern import NamePattern, NamePatternError
from sparse_lightning.meta_weights import whole_weights
from sparse_lightning.sparse import delta_layers
from sparse_lightning.sparse.frozen_delta import is_transposed_linear


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_PICKLE = "adapter_model.bin"
PREFIX = "base_model.model."
#: The safetensors header key holding the export's metadata block.
METADATA_KEY = "sparse_lightning"
SHIRA, SUPERTUNING = "SHIRA", "SUPERTUNING"
#: `sparse-lightning export --format` value -> PEFT type.
FORMATS = {"peft": SHIRA, "peft-supertuning": SUPERTUNING}
#: The oldest peft release that loads each type.
MIN_PEFT_VERSION = {SHIRA: "0.17.0", SUPERTUNING: "0.21.0"}
#: PEFT's task types by the transformers class name's ending.
TASK_TYPES = (("ForSequenceClassification", "SEQ_CLS"), ("ForCausalLM", "CAUSAL_LM"),
              ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"),
              ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"))
#: Heads PEFT adds to `modules_to_save` itself for a sequence classifier.
SEQ_CLS_HEADS = ("classifier", "score")
#: What a `modules_to_save` entry may be: a module name or dotted suffix of one.
MODULE_NAME = re.compile(r"\w+(\.\w+)*")


class PeftExportError(ValueError):
    """A trained model that a PEFT sparse adapter cannot represent exactly."""



def target_entries(model: nn.Module) -> dict[str, tuple[tuple[int, int], Tensor, Tensor]]:
    """Every delta layer's trained entries in the original layout: name -> ((out, in), flat row-major int64 positions,
    fp32 values), sorted by position. S2FT blocks are expanded entry by entry. GPT-2 `Conv1D` targets are refused."""
    layers = delta_layers(model)
    transposed = sorted(name for name, layer in layers.items() if layer.transposed or is_transposed_linear(layer.base))
    if transposed:
        raise PeftExportError(f"{transposed[0]} is a GPT-2 Conv1D (weight stored [in, out]; {len(transposed)} such "
                              "target(s)); PEFT's SHiRA and Super-Tuning adapt nn.Linear only: export the delta format "
                              "(--format delta) or a merged model (--merged true)")
    tensors, targets = delta_tensors(model)
    entries = {}
    for name, target in targets.items():
        out, inp = target["shape"]
        kind = target.get("kind", "entries")
        if kind == "entries":
            flat, values = tensors[f"{name}.indices"].long(), tensors[f"{name}.values"].float()
        elif kind == "columns":  # block [out, s] on original columns
            columns, block = tensors[f"{name}.columns"].long(), tensors[f"{name}.block"].float()
            flat = (torch.arange(out).unsqueeze(1) * inp + columns.unsqueeze(0)).reshape(-1)
            values = block.reshape(-1)
        elif kind == "rows":  # block [s, in] on original rows
            rows, block = tensors[f"{name}.rows"].long(), tensors[f"{name}.block"].float()
            flat = (rows.unsqueeze(1) * inp + torch.arange(inp).unsqueeze(0)).reshape(-1)
            values = block.reshape(-1)
        else:
            raise PeftExportError(f"target {name!r}: unknown delta kind {kind!r}")
        order = flat.argsort()
        entries[name] = ((out, inp), flat[order], values[order].contiguous())
    return entries



def pad_entries(flat: Tensor, values: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """`count` entries: the given ones plus zero-valued ones at the smallest flat positions not already used (distinct
    and unused by construction: among the first k + pad positions at most k are taken), sorted by position."""
    pad = count - flat.numel()
    if pad < 0:
        raise ValueError(f"{flat.numel()} entries do not fit in {count}")
    if pad == 0:
        return flat, values
    window = flat.numel() + pad
    used = torch.zeros(window, dtype=torch.bool)
    used[flat[flat < window]] = True
    extra = (~used).nonzero().squeeze(1)[:pad]
    flat = torch.cat([flat, extra])
    values = torch.cat([values, torch.zeros(pad, dtype=values.dtype)])
    order = flat.argsort()
    return flat[order], values[order].contiguous()



def shira_rank(shapes: dict[str, tuple[int, int]], counts: dict[str, int]) -> int:
    """The smallest global r with r * (out + in) >= k for every weight; refused if some weight cannot hold
    r * (out + in) entries (SHiRA's own limit)."""
    r = max(math.ceil(counts[name] / (out + inp)) for name, (out, inp) in shapes.items())
    for name, (out, inp) in shapes.items():
        if r * (out + inp) > out * inp:
            worst = max(shapes, key=lambda n: counts[n] / (shapes[n][0] + shapes[n][1]))
            raise PeftExportError(
                f"SHiRA needs one global r with r * (out + in) entries per weight: {worst} needs r={r}, which asks "
                f"{r * (out + inp)} entries of the [{out}, {inp}] weight {name} (it holds {out * inp}); export "
                "--format peft-supertuning (one global sparsity instead) or the delta format")
    return r



def supertuning_count(numel: int, sparsity: float) -> int:
    """Entries Super-Tuning gives a weight of `numel` at `sparsity` (PEFT's `int(numel * (1 - sparsity))`)."""
    return int(numel * (1 - sparsity))



def supertuning_sparsity(numels: dict[str, int], counts: dict[str, int]) -> float:
    """The largest float sparsity in [0, 1) whose count holds every weight's k (fewest padding entries)."""
    sparsity = 1.0 - max(counts[name] / numels[name] for name in numels)
    for _ in range(10_000):
        if sparsity <= 0.0:
            return 0.0
        if all(supertuning_count(numels[name], sparsity) >= counts[name] for name in numels):
            return sparsity
        sparsity = math.nextafter(sparsity, -math.inf)
    raise AssertionError("no sparsity found")  # unreachable: each step moves 1 - sparsity up by one ulp



def task_type_of(model: nn.Module) -> str | None:
    name = type(model).__name__
    return next((task for ending, task in TASK_TYPES if name.endswith(ending)), None)



def dense_modules(model: nn.Module, dense: list[str]) -> list[str]:
    """The modules owning the densely trained parameters (PEFT's `modules_to_save`), in model order."""
    owners = {name.rpartition(".")[0] for name in dense}
    if "" in owners:
        raise PeftExportError(f"{[n for n in dense if '.' not in n][0]} is a parameter of the model itself, not of a "
                              "submodule; PEFT's modules_to_save holds whole submodules")
    return [name for name, _ in model.named_modules() if name in owners]



def peft_adapter(model: nn.Module, dense: list[str], peft_type: str, base_model: str | None
                 ) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Any]]:
    """(adapter_config, adapter tensors, summary) for an HF model with attached deltas; `dense` names its densely
    trained parameters."""
    if peft_type not in (SHIRA, SUPERTUNING):
        raise ValueError(f"unknown PEFT type {peft_type!r} (SHIRA or SUPERTUNING)")
    entries = target_entries(model)
    if not entries:
        raise PeftExportError("the model has no sparse delta layers to write as a PEFT adapter")
    shapes = {name: shape for name, (shape, _, _) in entries.items()}
    counts = {name: flat.numel() for name, (_, flat, _) in entries.items()}
    config: dict[str, Any] = {"peft_type": peft_type, "task_type": task_type_of(model),
                              "base_model_name_or_path": base_model, "revision": None, "auto_mapping": None,
                              "inference_mode": True, "init_weights": True,
                              "target_modules": sorted(entries), "modules_to_save": dense_modules(model, dense) or None}
    tensors: dict[str, Tensor] = {}
    if peft_type == SHIRA:
        r = shira_rank(shapes, counts)
        config.update({"r": r, "mask_type": "random", "random_seed": None, "fan_in_fan_out": False})
        sizes = {name: r * (out + inp) for name, (out, inp) in shapes.items()}
    else:
        sparsity = supertuning_sparsity({name: out * inp for name, (out, inp) in shapes.items()}, counts)
        config.update({"sparsity": sparsity, "select_top": True, "r": None, "lora_alpha": None, "lora_dropout": 0.0,
                       "save_precomputed_indices": True})
        sizes = {name: supertuning_count(out * inp, sparsity) for name, (out, inp) in shapes.items()}
    for name, ((out, inp), flat, values) in entries.items():
        if sizes[name] > out * inp:  # guarded above; a padded adapter must still fit its weight
            raise PeftExportError(f"{name}: {sizes[name]} entries do not fit a [{out}, {inp}] weight")
        flat, values = pad_entries(flat, values, sizes[name])
        if peft_type == SHIRA:
            tensors[f"{PREFIX}{name}.shira_indices"] = torch.stack([flat // inp, flat % inp]).to(torch.int32)
            tensors[f"{PREFIX}{name}.shira_weight"] = values.float().contiguous()
        else:
            tensors[f"{PREFIX}{name}.supertuning_indices"] = flat.to(torch.int32)
            tensors[f"{PREFIX}{name}.supertuning_values"] = values.float().contiguous()
    params = dict(model.named_parameters())
    for name in dense:
        tensors[f"{PREFIX}{name}"] = params[name].detach().cpu().contiguous()
    summary = {"targets": len(entries), "trained_entries": sum(counts.values()),
               "stored_entries": sum(sizes.values()), "padding": sum(sizes.values()) - sum(counts.values())}
    if peft_type == SHIRA:
        summary["r"] = config["r"]
    else:
        summary["sparsity"] = config["sparsity"]
    return config, tensors, summary



def write_peft_adapter(model: nn.Module, output: str | Path, dense: list[str], peft_type: str = SHIRA,
                       base_model: str | None = None, metadata: dict[str, Any] | None = None) -> Path:
    """Write `adapter_config.json` and `adapter_model.safetensors` to `output` (see the module docstring). The
    export's metadata block (what a delta's `delta_config.json` records: method, base model, the methods' settings,
    `run_start`) goes in the safetensors header under `sparse_lightning` (`adapter_metadata` reads it; PEFT ignores it)."""
    output = Path(output)
    config, tensors, _ = peft_adapter(model, dense, peft_type, base_model)
    require_finite(tensors, "the PEFT adapter")
    output.mkdir(parents=True, exist_ok=True)
    header = {"format": "pt", **({METADATA_KEY: json.dumps(metadata, sort_keys=True)} if metadata else {})}
    save_file(tensors, str(output / ADAPTER_WEIGHTS), metadata=header)
    (output / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    readable_by_all(output / ADAPTER_WEIGHTS, output / ADAPTER_CONFIG)
    return output


def adapter_metadata(directory: str | Path) -> dict[str, Any] | None:
    """The metadata block `write_peft_adapter` recorded (None for an adapter written elsewhere)."""
    with safe_open(str(Path(directory) / ADAPTER_WEIGHTS), framework="pt") as weights:
        recorded = (weights.metadata() or {}).get(METADATA_KEY)
    return json.loads(recorded) if recorded else None


def is_peft_adapter(directory: str | Path) -> bool:
    return (Path(directory) / ADAPTER_CONFIG).is_file()



def _selector(patterns: str | list[str]) -> Callable[[str], bool]:
    """PEFT's rule for `target_modules`: a string is a regex matched whole (here by a linear-time matcher, so a
    crafted file cannot hang us: `NamePatternError` for what it cannot do), a list names modules exactly or by a
    dotted suffix."""
    if isinstance(patterns, str):
        return NamePattern(patterns).fullmatch
    return lambda name: any(name == p or name.endswith("." + p) for p in patterns)



def _saved_by(patterns: list[str], name: str) -> bool:
    """PEFT's exclusion of `modules_to_save` modules (`re.match(rf"(^|.*\.){p}($|\..*)", name)`), for module names
    taken literally (`MODULE_NAME` checks them before)."""
    return any(f".{p}." in f".{name}." for p in patterns)



@torch.no_grad()
def apply_peft_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Add a PEFT SHiRA or Super-Tuning adapter onto a plain base model in place, after checking all of it
    (`DeltaFileError` naming the file, tensor and problem; the model is then unchanged). Entries are summed in fp32
    and rounded to the weight's dtype once; `modules_to_save` parameters replace the model's."""
    for weight, flat, values in checked_peft_updates(model, Path(adapter_dir)):
        if flat is None:
            weight.copy_(values)
        else:
            add_rounding_once(weight, -1, flat, values)
    return model



def checked_peft_updates(model: nn.Module, adapter_dir: Path) -> list[tuple[Tensor, Tensor | None, Tensor]]:
    config_path, weights_path = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS

    config = read_json_object(config_path)
    peft_type = config.get("peft_type")
    if peft_type not in (SHIRA, SUPERTUNING):
        raise unchanged_model_error(config_path, f"peft_type {peft_type!r} is not a sparse adapter this library applies (SHIRA or "
                                "SUPERTUNING); load it with peft's PeftModel.from_pretrained")
    if not weights_path.is_file():
        pickled = (adapter_dir / ADAPTER_WEIGHTS_PICKLE).is_file()
        raise unchanged_model_error(weights_path, "no such file" + (f" ({ADAPTER_WEIGHTS_PICKLE} is a pickle, which is not read: save "
                                                   "the adapter with safe_serialization=True)" if pickled else ""))
    targets_spec = config.get("target_modules")
    if not (isinstance(targets_spec, str) or (isinstance(targets_spec, list)
                                              and all(isinstance(t, str) for t in targets_spec))):
        raise unchanged_model_error(config_path, "'target_modules' must be a list of module names or a regex string")
    saved = config.get("modules_to_save") or []
    if not isinstance(saved, list) or not all(isinstance(name, str) for name in saved):
        raise unchanged_model_error(config_path, "'modules_to_save' must be a list of module names or null")
    odd = [name for name in saved if not MODULE_NAME.fullmatch(name)]
    if odd:
        raise unchanged_model_error(config_path, f"'modules_to_save' entry {odd[0]!r} is not a module name (letters, digits, _ and "
                                "dots)")
    try:
        selects = _selector(targets_spec)
    except NamePatternError as error:
        raise unchanged_model_error(config_path, f"'target_modules' {error}") from None
    if config.get("task_type") == "SEQ_CLS":
        saved = [*saved, *SEQ_CLS_HEADS]
    if peft_type == SHIRA:
        r = config.get("r")
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise unchanged_model_error(config_path, f"'r' must be a positive integer, got {r!r}")
        if config.get("fan_in_fan_out"):
            raise unchanged_model_error(config_path, "fan_in_fan_out is true: SHiRA adapts nn.Linear ([out, in] weights) only")
        suffixes = ("shira_indices", "shira_weight")
    else:
        if config.get("r") is not None:
            raise unchanged_model_error(config_path, f"r={config['r']!r}: a Super-Tuning 'Supra' adapter (sparse + LoRA) is not a "
                                    "sparse delta; load it with peft")
        sparsity = config.get("sparsity")
        if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool) or not 0.0 <= sparsity < 1.0:
            raise unchanged_model_error(config_path, f"'sparsity' must be a number in [0, 1), got {sparsity!r}")
        suffixes = ("supertuning_indices", "supertuning_values")
    file = TensorFile(weights_path)
    tensors = file.tensors
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    base = config.get("base_model_name_or_path")
    updates: list[tuple[Tensor, Tensor | None, Tensor]] = []
    targets: dict[str, dict[str, Tensor]] = {}
    dense: dict[str, Tensor] = {}
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise unchanged_model_error(weights_path, f"tensor {key!r} does not start with {PREFIX!r} (not a PEFT adapter tensor)")
        name = key[len(PREFIX):]
        owner, _, leaf = name.rpartition(".")
        if leaf in suffixes:
            targets.setdefault(owner, {})[leaf] = value
        elif leaf.startswith(("shira_", "supertuning_")) or ".supertuning_lora_" in name:
            raise unchanged_model_error(weights_path, f"tensor {key!r} is not part of a {peft_type} sparse adapter")
        else:
            dense[re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)] = value

    # every module target_modules selects (as PEFT would) must have its tensors, and every tensor a selected module
    selected = [name for name, module in modules.items()
                if name and selects(name) and not _saved_by(saved, name)]
    saved_indices = peft_type == SHIRA or bool(config.get("save_precomputed_indices", True))
    required = suffixes if saved_indices else ("supertuning_values",)
    for name in selected:
        if name not in targets:
            raise unchanged_model_error(weights_path, f"target module {name!r} (selected by target_modules) has no tensors")
    for name in targets:
        if name not in modules:
            raise unchanged_model_error(weights_path, f"this model has no module {name!r}; was the adapter trained on {base}?")
        if name not in selected:
            raise unchanged_model_error(weights_path, f"module {name!r} has adapter tensors but target_modules does not select it")

    for name in selected:
        module = modules[name]
        if is_transposed_linear(module) or not isinstance(module, nn.Linear):
            raise unchanged_model_error(config_path, f"target module {name!r} is a {type(module).__name__}; PEFT's {peft_type} adapts "
                                    "nn.Linear only")
        weight = module.weight
        out, inp = weight.shape
        found = targets.get(name, {})
        missing = [leaf for leaf in required if leaf not in found]
        if missing:
            raise unchanged_model_error(weights_path, f"tensor {PREFIX + name + '.' + missing[0]!r} is missing")
        if peft_type == SUPERTUNING and not saved_indices and "supertuning_indices" in found:
            raise unchanged_model_error(weights_path, f"tensor {PREFIX + name + '.supertuning_indices'!r} is present but "
                                     "save_precomputed_indices is false (PEFT would ignore it)")
        if peft_type == SHIRA:
            count = r * (out + inp)
            if count > out * inp:
                raise unchanged_model_error(config_path, f"r={r} asks {count} entries of the [{out}, {inp}] weight {name!r} (it holds "
                                        f"{out * inp}); was the adapter trained on {base}?")
            key = PREFIX + name + ".shira_indices"
            pairs = file.integers(key, found["shira_indices"], shape=[2, count]).long()
            rows, cols = pairs[0], pairs[1]
            if count and (int(rows.min()) < 0 or int(rows.max()) >= out or int(cols.min()) < 0
                          or int(cols.max()) >= inp):
                raise unchanged_model_error(weights_path, f"tensor {key!r} has a position outside the [{out}, {inp}] weight (rows "
                                         f"{int(rows.min())}..{int(rows.max())}, columns {int(cols.min())}.."
                                         f"{int(cols.max())})")
            flat = rows * inp + cols
            values = file.floats(PREFIX + name + ".shira_weight", found["shira_weight"], count=count).float()
        else:
            count = supertuning_count(out * inp, float(config["sparsity"]))
            key = PREFIX + name + ".supertuning_indices"
            values = file.floats(PREFIX + name + ".supertuning_values", found["supertuning_values"], count=count).float()
            if saved_indices:
                flat = file.integers(key, found["supertuning_indices"], shape=[count]).long()
            else:  # save_precomputed_indices=False: PEFT recomputes them from the base weight's magnitudes
                with whole_weights(model, [module]):  # a meta weight (loaded by shards later) is read whole here
                    flat = torch.topk(module.weight.detach().abs().flatten(), k=count,
                                      largest=bool(config.get("select_top", True))).indices.cpu()
        updates.append((weight, file.positions(key, flat, out * inp), values))
    for name, value in dense.items():
        owner = name.rpartition(".")[0]
        if name not in params:
            raise unchanged_model_error(weights_path, f"tensor {PREFIX + name!r}: this model has no parameter {name!r}; was the "
                                     f"adapter trained on {base}?")
        if not _saved_by(saved, owner):
            raise unchanged_model_error(weights_path, f"tensor {PREFIX + name!r} belongs to no module in modules_to_save")
        if not value.is_floating_point() or value.shape != params[name].shape:
            raise unchanged_model_error(weights_path, f"tensor {PREFIX + name!r} has {value.dtype} {list(value.shape)}, the model's "
                                     f"parameter {params[name].dtype} {list(params[name].shape)}")
        if not bool(torch.isfinite(value).all()):
            raise unchanged_model_error(weights_path, f"tensor {PREFIX + name!r} holds {int((~torch.isfinite(value)).sum())} "
                                     "non-finite value(s)")
        updates.append((params[name], None, value))
    if not updates:
        raise unchanged_model_error(config_path, "target_modules selects no module of this model and no parameter is saved; was the "
                                f"adapter trained on {base}?")
    require_finite_results(model, [(weight, None if flat is None else -1, flat, values)
                                   for weight, flat, values in updates], lambda problem: unchanged_model_error(weights_path, problem))
    return updates
