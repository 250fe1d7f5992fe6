"""The one list of methods: name -> callback, optimizer, model-card text, config fragments and traits.

Everything that lists methods reads `METHODS` (the module's `method`, model cards, the CLI's help, the test
matrices, the benchmarks), so a new method is one algorithm file in `methods/`, one callback file in `callbacks/`,
one row here and one fragment per model in `configs/method/<model>/<name>.yaml`; tests/test_registry.py checks
that every row has all of them and that every test matrix covers it.

Names are the ones configs, results and file names use: `spiel_ag` and `spiel_ma` are the two SpIEL regrowth
rules (`PruneRegrowCallback(regrowth="gradient" | "momentum")`). The old spelling `spiel` (checkpoints and exports
written before this list existed) still resolves, with one warning.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lightning.pytorch import Callback

from sparse_lightning.callbacks import (
    GradientTopKCallback,
    PruneRegrowCallback,
    RandomMaskCallback,
    S2FTStructureCallback,
)

#: configs/ of a source checkout (the fragments are not part of the wheel).
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
#: The models the shipped recipes are tuned for: `configs/method/<model>/`.
MODELS = ("minilm", "smollm2")
ADAMW = "torch.optim.AdamW"
SM3 = "sparse_lightning.sparse.optim.SM3"


@dataclass(frozen=True)
class Method:
    """One fine-tuning method as the library runs it.

    `callback` is None for the two baselines (full fine-tuning: no callback; LoRA: `model.lora`). `settings` are
    the callback arguments that make this method what it is (SpIEL's regrowth rule), not tuning.
    """

    name: str
    title: str
    card: str
    callback: type[Callback] | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    optimizer: str = ADAMW
    element_sparse: bool = False  #: k entries per target weight (SparseDeltaLinear)
    structured: bool = False  #: dense blocks on whole heads / channels
    data_driven: bool = False  #: chooses from calibration batches at the start of training
    reselects: bool = False  #: moves its entries during training

    @property
    def sparse(self) -> bool:
        """Trained through a `SparseMethodCallback` (not a baseline)."""
        return self.callback is not None

    def fragment(self, model: str) -> Path:
        """The tuned recipe for `model` (one of `MODELS`) in a source checkout."""
        return CONFIGS / "method" / model / f"{self.name}.yaml"

    def make_callback(self, **settings: Any) -> Callback | None:
        """The method's callback with `settings` (this method's own `settings` win), or None for a baseline."""
        if self.callback is None:
            if settings:
                raise ValueError(f"{self.name} has no callback to take {sorted(settings)}")
            return None
        return self.callback(**{**settings, **self.settings})

    def optimizer_class(self) -> type:
        module, _, name = self.optimizer.rpartition(".")
        return getattr(importlib.import_module(module), name)

    def make_optimizer(self, **kwargs: Any) -> Callable:
        """An optimizer factory (params -> optimizer) of the method's optimizer class, e.g. `lr=1e-3`."""
        return functools.partial(self.optimizer_class(), **kwargs)


_ROWS = (
    Method("sift", "SIFT",
           "SIFT (Song et al., 2024): the top-k |gradient| entries of each target weight",
           GradientTopKCallback, element_sparse=True, data_driven=True),
    Method("spiel_ag", "SpIEL-AG",
           "SpIEL-AG (Ansell et al., 2024): k entries per weight, dropped and regrown by accumulated gradient "
           "during training",
           PruneRegrowCallback, {"regrowth": "gradient"}, element_sparse=True, reselects=True),
    Method("spiel_ma", "SpIEL-MA",
           "SpIEL-MA (Ansell et al., 2024): k entries per weight, dropped and regrown by SM3 momentum during "
           "training",
           PruneRegrowCallback, {"regrowth": "momentum"}, optimizer=SM3, element_sparse=True, reselects=True),
    Method("s2ft", "S2FT",
           "S2FT (Yang et al., 2024): dense blocks on a few attention heads / FFN channels",
           S2FTStructureCallback, structured=True, data_driven=True),
    Method("random_mask", "random mask",
           "random mask: k fixed, uniformly random entries per target weight",
           RandomMaskCallback, element_sparse=True),
    Method("lora", "LoRA", "LoRA (PEFT)"),
    Method("full", "full fine-tuning", "full fine-tuning"),
)
#: name -> Method, in the order tables list them.
METHODS: dict[str, Method] = {row.name: row for row in _ROWS}
#: Old spellings still read from checkpoints and exports: old name -> its card text.
OLD_NAMES = {"spiel": "SpIEL (Ansell et al., 2024): k entries per weight, dropped and regrown during training "
                      "(written before the regrowth rule was part of the name: see the budget's `regrowth`)"}
_warned: set[str] = set()


def names(**traits: bool) -> list[str]:
    """Method names, optionally those whose traits match, e.g. `names(sparse=True)`, `names(element_sparse=True)`."""
    return [name for name, row in METHODS.items() if all(getattr(row, t) == v for t, v in traits.items())]


def canonical(name: str, settings: Mapping[str, Any] | None = None) -> str:
    """Today's name for `name`: `spiel` becomes `spiel_ag` or `spiel_ma` by its `regrowth` setting (warning once)."""
    if name == "spiel":
        new = "spiel_ma" if (settings or {}).get("regrowth") == "momentum" else "spiel_ag"
        if name not in _warned:
            _warned.add(name)
            warnings.warn(f"method name 'spiel' is now {new!r} ('spiel_ag' or 'spiel_ma' by the regrowth rule)",
                          FutureWarning, stacklevel=2)
        return new
    return name


def method(name: str) -> Method:
    """The registry row for `name` (old spellings resolve with a warning)."""
    found = METHODS.get(canonical(name))
    if found is None:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return found


def name_of(callback: Callback) -> str:
    """The registry name of a method callback instance (SpIEL's by its regrowth rule)."""
    for row in METHODS.values():
        if row.callback is not None and isinstance(callback, row.callback) and all(
                getattr(callback, key, None) == value for key, value in row.settings.items()):
            return row.name
    return getattr(callback, "method", type(callback).__name__)


def card_text(name: str) -> str | None:
    """The model card's one-line description of `name` (today's or an old spelling), or None."""
    row = METHODS.get(name)
    return row.card if row is not None else OLD_NAMES.get(name)


def help_text() -> str:
    """The methods, one line each, for the CLI's help."""
    lines = ["methods (one --config configs/method/<model>/<name>.yaml each; models: " + ", ".join(MODELS) + "):"]
    for row in METHODS.values():
        if row.callback is None:
            how = "--model.lora.r R" if row.name == "lora" else "no callback"
        else:
            how = f"{row.callback.__name__}" + "".join(f" {key}={value}" for key, value in row.settings.items())
        if row.optimizer != ADAMW:
            how += f", optimizer {row.optimizer.rpartition('.')[2]}"
        lines.append(f"  {row.name:<12} {row.title}: {how}")
    return "\n".join(lines)
