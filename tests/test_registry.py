"""The one list of methods (sparse_lightning/registry.py): every row has what a method needs (callback, optimizer,
card text, a config fragment per model), the old `spiel` spelling still resolves, and every test matrix and table
covers every method, so a method added to the registry but missing from a matrix fails here."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from sparse_lightning import registry
from sparse_lightning.callbacks import PruneRegrowCallback, SparseMethodCallback
from sparse_lightning.model_card import METHOD_NAMES
from sparse_lightning.registry import METHODS, names
from script_loading import load_script

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_has_its_callback_optimizer_card_and_fragments(name: str) -> None:
    row = METHODS[name]
    assert row.name == name and row.title and row.card and METHOD_NAMES[name] == row.card
    assert row.optimizer_class().__name__ == row.optimizer.rpartition(".")[2]
    if row.sparse:
        callback = row.make_callback()
        assert isinstance(callback, SparseMethodCallback) and callback.method == name
        assert registry.name_of(callback) == name
        assert row.element_sparse != row.structured  # one kind of trainable entries
    else:
        assert row.make_callback() is None and not (row.element_sparse or row.structured or row.data_driven)
    for model in registry.MODELS:
        fragment = yaml.safe_load(row.fragment(model).read_text(encoding="utf-8"))
        callbacks = (fragment.get("trainer") or {}).get("callbacks") or []
        classes = [c["class_path"].rpartition(".")[2] for c in callbacks]
        assert classes == ([row.callback.__name__] if row.sparse else []), row.fragment(model)
        for key, value in row.settings.items():
            assert callbacks[0]["init_args"][key] == value, (row.fragment(model), key)
        optimizer = fragment["model"]["init_args"]["optimizer"].get("class_path", registry.ADAMW)
        assert optimizer == row.optimizer, row.fragment(model)
        assert (fragment["model"]["init_args"].get("lora") is not None) == (name == "lora")


def test_every_fragment_is_a_registry_method() -> None:
    fragments = {p.stem for model in registry.MODELS for p in (ROOT / "configs" / "method" / model).glob("*.yaml")}
    assert fragments == set(METHODS)


def test_the_old_spiel_spelling_resolves_by_its_regrowth_and_warns_once(monkeypatch) -> None:
    monkeypatch.setattr(registry, "_warned", set())
    with pytest.warns(FutureWarning, match="'spiel' is now 'spiel_ma'"):
        assert registry.canonical("spiel", {"regrowth": "momentum"}) == "spiel_ma"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert registry.canonical("spiel", {"regrowth": "gradient"}) == "spiel_ag"
        assert registry.method("spiel").name == "spiel_ag"
    assert METHOD_NAMES["spiel"] == registry.card_text("spiel")  # cards of old exports still describe them
    with pytest.raises(ValueError, match="unknown method 'spiel_xx'; known: sift, spiel_ag"):
        registry.method("spiel_xx")


def test_spiel_callbacks_are_named_by_their_regrowth() -> None:
    assert PruneRegrowCallback().method == "spiel_ag"
    assert PruneRegrowCallback(regrowth="momentum").method == "spiel_ma"
    assert METHODS["spiel_ma"].make_callback(regrowth="gradient").regrowth == "momentum"  # the row's setting wins


def test_traits_select_methods() -> None:
    assert names(sparse=False) == ["lora", "full"]
    assert names(structured=True) == ["s2ft"]
    assert set(names(element_sparse=True)) == {"sift", "spiel_ag", "spiel_ma", "random_mask"}


def test_every_test_matrix_covers_every_method(contract: ModuleType) -> None:
    """The matrices parametrize over the registry and look their settings up here: these tables must hold every
    method (tests/distributed_scripts/contract_run.py, tests/edges_scripts/kill_and_resume.py, test_configs.py)."""
    assert set(contract.SETTINGS) == set(contract.METHODS) == set(names(sparse=True))
    kill = load_script(TESTS / "edges_scripts" / "kill_and_resume.py")
    assert set(kill.SETTINGS) == set(METHODS)
    configs = load_script(TESTS / "test_configs.py")
    assert set(configs.LR) == set(configs.METHODS) == set(METHODS)


def test_the_cli_help_lists_every_method() -> None:
    text = registry.help_text()
    assert all(f"  {name} " in text for name in METHODS)


def test_at_most_four_hand_kept_method_lists_remain() -> None:
    """Issue 27: the library, its benchmarks, tests and scripts read the registry; what remains are the tables of
    expected values and small settings (scripts/count_method_lists.py prints them)."""
    counter = load_script(ROOT / "scripts" / "count_method_lists.py")
    found = counter.hand_kept_lists(ROOT)
    assert len(found) <= 4, "\n".join(found)
