"""`sparse-lightning fit|validate|test|export|evaluate|plot|estimate`: LightningCLI in subclass mode, plus delta export,
lm-eval, figures and memory estimates."""

from __future__ import annotations

import argparse
import difflib
import os
import pickle
import re
import sys
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser, DefaultHelpFormatter
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from sparse_lightning.borders.checkpoint import module_class_for, read_checkpoint
from sparse_lightning.borders.evaluate import evaluate_main
from sparse_lightning.borders.export import WRITERS, export_checkpoint
from sparse_lightning.lightning_adapter import saves_on_its_own
from sparse_lightning.memory_estimate import estimate_main
from sparse_lightning.modules import SparseFineTuningModule
from sparse_lightning.notices import silence_third_party_notices
from sparse_lightning.plots.cli import plot_main
from sparse_lightning.progress import progress_for
from sparse_lightning.registry import METHODS, help_text
from sparse_lightning.run_folder import claim_run_folders
from sparse_lightning.usage_errors import raise_usage_errors


class SaveConfigToRunDirectory(SaveConfigCallback):
    """Writes config.yaml beside the logger's files; a run without a logger has no run directory, and Lightning's
    fallback (the working directory) would leave a stray config.yaml wherever the command was typed."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.logger is not None:
            super().setup(trainer, pl_module, stage)


#: (source, target): the datamodule's tokenizer is the model's (every datamodule in `datamodules/` takes
#: `tokenizer_name_or_path`; for a datamodule class without that parameter jsonargparse skips the link).
TOKENIZER_LINK = ("model.init_args.model_name_or_path", "data.init_args.tokenizer_name_or_path")


def _flag_values(args: list[str], name: str) -> list[str]:
    """Values given on the command line for `--data.NAME` / `--data.init_args.NAME` (both spellings, `=` or not)."""
    flags = (f"--data.{name}", f"--data.init_args.{name}")
    values = []
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if flag in flags:
            values.append(value if eq else (args[i + 1] if i + 1 < len(args) else ""))
    return values


class _KeepEpilogLines(DefaultHelpFormatter):
    """jsonargparse's help, but descriptions and the epilog keep their line breaks (argparse reflows them)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


class SparseLightningCLI(LightningCLI):
    """Links the tokenizer to the model and prints the final metrics, so a run ends with the number it was for."""

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        kwargs.setdefault("epilog", help_text())  # the methods, from the registry, one a line
        kwargs.setdefault("formatter_class", _KeepEpilogLines)
        parser = super().init_parser(**kwargs)
        self.__dict__.setdefault("_parsers", []).append(parser)  # every key the command takes, for "did you mean"
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments(*TOKENIZER_LINK)

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        try:
            self._parse_and_check(parser, args)
        except argparse.ArgumentError as error:  # only with exit_on_error=False (the command line): one line
            raise ConfigError(config_error_message(error, self.__dict__.get("_parsers", []))) from None

    def _parse_and_check(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        super().parse_arguments(parser, args)
        self._refuse_an_ignored_tokenizer(parser, args)
        self._check_checkpoint_before_lightning_reads_it()

    def _refuse_an_ignored_tokenizer(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """jsonargparse replaces a value given for a subclass's linked init argument without a word; refuse a
        command-line tokenizer that the link would silently drop (the same one as the model is harmless)."""
        if args is not None and not isinstance(args, list):
            return
        subcommand = self.config.get("subcommand")
        model = (self.config[subcommand] if subcommand else self.config).get(TOKENIZER_LINK[0])
        for given in _flag_values(sys.argv[1:] if args is None else args, "tokenizer_name_or_path"):
            if model is not None and given != model:
                parser.error(f"--data.tokenizer_name_or_path {given} would be ignored: the tokenizer follows "
                             f"--model.model_name_or_path ({model}); give the model path only")

    def _check_checkpoint_before_lightning_reads_it(self) -> None:
        """Lightning (right after `parse_arguments`) reads the model's class path from `ckpt_path` and jsonargparse
        imports it: read the file with weights_only=True first and import only this package's classes or the one
        the config names."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and Path(ckpt_path).is_file():  # Lightning also takes "last", "best", ...
            hparams = read_checkpoint(ckpt_path).get("hyper_parameters", {})
            named = hparams.get("_class_path")
            configured = self.config[subcommand].get("model.class_path")
            if named is not None:
                module_class_for(ckpt_path, named, trusted=configured if named == configured else None)
            _require_same_model(ckpt_path, hparams, named, configured,
                                self.config[subcommand].get("model.init_args.model_name_or_path"))

    def _report(self) -> None:
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items()
                   if k.startswith(("val/", "test/")) and v.numel() == 1}
        if metrics:
            rank_zero_info("final metrics: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Lightning's default bar becomes ours (a bar in a terminal, plain lines in a log file); a progress bar
        the config names, or `enable_progress_bar: false`, is left alone."""
        config = (self.config_init[self.subcommand] if self.subcommand else self.config_init).get("trainer") or {}
        named = any(isinstance(cb, ProgressBar) for cb in config.get("callbacks") or [])
        trainer = super().instantiate_trainer(**kwargs)
        default = trainer.progress_bar_callback
        if not named and isinstance(default, (RichProgressBar, TQDMProgressBar)):
            trainer.callbacks[trainer.callbacks.index(default)] = progress_for()
        return trainer

    def before_fit(self) -> None:
        self._claim_run_folder()
        warn_if_no_validation_before_the_end(self.trainer)

    def before_validate(self) -> None:
        self._claim_run_folder()

    def before_test(self) -> None:
        self._claim_run_folder()

    def _claim_run_folder(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        claim_run_folders(self.trainer, config.get("trainer", {}).get("logger"))

    def after_fit(self) -> None:
        self._report()

    def after_validate(self) -> None:
        self._report()

    def after_test(self) -> None:
        self._report()


def _require_same_model(ckpt_path: str, hparams: dict, named: str | None, configured: str | None,
                        model: str | None) -> None:
    """Lightning would silently rebuild the checkpoint's model in place of the configured one (and then fail on a
    datamodule made for the other model): say what differs instead."""
    trained = hparams.get("model_name_or_path")
    differs = []
    if model is not None and trained not in (None, model):
        differs.append(f"model {trained!r} vs {model!r}")
    if None not in (named, configured) and named != configured:
        differs.append(f"module {named} vs {configured}")
    if differs:
        raise ValueError(f"{ckpt_path} was trained with another model than this config builds ({'; '.join(differs)}): "
                         "pass the config it was trained with, or leave the model out of the config")


class ConfigError(ValueError):
    """A command line or config the parser refuses (an unknown key, a value of the wrong type)."""


def nested_value_problem(message: str) -> str | None:
    """A bad value inside a class's arguments (a callback's, the model's): jsonargparse nests its reason under every
    key it passed through and lists the other union members' failures beside it; the innermost key, its class and
    its reason are what the user has to change."""
    keys = list(re.finditer(r'Parser key "([^"]+)":[ \t]*\n\s*(\S.*)', message))
    if len(keys) < 2:
        return None
    inner = keys[-1]
    classes = re.findall(r"class_path '([^']+)'", message[:inner.start()])
    owner = f"{classes[-1].rpartition('.')[2]}'s " if classes else ""
    return f"{keys[0].group(1)}: {owner}{inner.group(1)}: {inner.group(2).strip()}"


def config_error_message(error: argparse.ArgumentError, parsers: list) -> str:
    """jsonargparse's error in one line (its first, or the innermost reason of a nested value), with the closest key
    the command takes for an unknown one."""
    message = str(error).strip()
    nested = nested_value_problem(message)
    if nested:
        return nested
    first = message.splitlines()[0] if message else type(error).__name__
    found = re.search(r"option '([^']+)'|Key '([^']+)'|NestedArg\(key='([^']+)'", message)
    if not found:
        return first
    key = next(group for group in found.groups() if group)
    keys = sorted({name for parser in parsers for name in parser.get_defaults().keys()})
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6) or difflib.get_close_matches(
        key, sorted({name.rpartition(".")[2] for name in keys}), n=1, cutoff=0.6)
    if "NestedArg" in found.group(0):
        first = f"unknown key {key!r} in the config or command line"
    index, _, rest = key.partition(".")
    if index.isdigit() and rest:  # a flag cannot pick a list item (`--trainer.callbacks.0.init_args.density`)
        return (f"{first}: a flag cannot pick a list item by its index; --trainer.callbacks.{rest}=... sets the last "
                "callback's (the method's), or change the item in a --config YAML")
    for row in METHODS.values():  # an argument a method's callback renamed
        if row.callback is not None and key in getattr(row.callback, "renamed", {}) and row.callback.__name__ in message:
            return f"{first}: {row.callback.__name__}'s {key} is now {row.callback.renamed[key]}"
    return first + (f"; did you mean {close[0]!r}?" if close else "")


def warn_if_no_validation_before_the_end(trainer: Trainer) -> None:
    """A run whose max_steps ends before the first `val_check_interval` logs no validation metric, and a checkpoint
    callback that monitors one saves nothing to export; with validation off and checkpoints tied to validations
    (`check_val_every_n_epoch: null`) nothing is saved at all: say so before it trains."""
    if trainer.limit_val_batches == 0 and trainer.check_val_every_n_epoch is None:
        # ModelCheckpoint saves at epoch ends only when validation runs every epoch; the step trigger is its own
        silent = [cb for cb in trainer.checkpoint_callbacks if not saves_on_its_own(cb)]
        if silent:
            rank_zero_warn("validation is off (limit_val_batches=0) and checkpoints are saved after validations "
                           "(check_val_every_n_epoch: null): this run will save no checkpoint; keep validation, or "
                           "add --trainer.callbacks+=ModelCheckpoint --trainer.callbacks.every_n_train_steps N")
        return
    interval, steps = trainer.val_check_interval, trainer.max_steps
    if not isinstance(interval, int) or steps is None or steps < 0 or trainer.limit_val_batches == 0:
        return
    batches = steps * trainer.accumulate_grad_batches
    if batches < interval:
        rank_zero_warn(f"max_steps={steps} ({batches} training batches) ends before the first validation "
                       f"(val_check_interval={interval} batches): the run will log no validation metric and a "
                       "checkpoint callback that monitors one saves nothing; lower val_check_interval or raise "
                       "max_steps")


def export_main(argv: list[str]) -> None:
    parser = ArgumentParser(prog="sparse-lightning export", description="Export a trained delta and/or a merged HF model")
    parser.add_argument("--ckpt_path", required=True, help="checkpoint written by sparse-lightning fit")
    parser.add_argument("--output", required=True, help="directory for the delta (its format: --format) and a "
                                                        "README.md model card")
    parser.add_argument("--format", choices=list(WRITERS), default="delta",
                        help="delta: this library's delta.safetensors + delta_config.json; peft: a PEFT SHiRA adapter "
                             "(peft>=0.17 loads it with PeftModel.from_pretrained); peft-supertuning: a PEFT "
                             "Super-Tuning adapter (peft>=0.21)")
    parser.add_argument("--merged", type=bool, default=False, help="also write a merged plain HF model to OUTPUT/merged")
    parser.add_argument("--replace", type=bool, default=False,
                        help="replace a non-empty OUTPUT whole (otherwise refused); the export is written aside and "
                             "moved into place complete either way")
    parser.add_argument("--module_class", type=str, default=None,
                        help="LightningModule class to rebuild the checkpoint with, when it is not one of "
                             "sparse_lightning's (a class a checkpoint names is imported only from sparse_lightning)")
    args = raise_usage_errors(parser).parse_args(argv)
    written = export_checkpoint(args.ckpt_path, args.output, merged=args.merged, module_class=args.module_class,
                                replace=args.replace, format=args.format)
    for kind, path in written.items():
        print(f"wrote {kind}: {path}")


#: Errors that mean "change your input", reported as one line; anything else keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, pickle.UnpicklingError)


def user_error_message(error: BaseException) -> str | None:
    """The sentence to show for a bad input, or None for a bug: the outermost user error raised by this project's code
    (it names the file and line; the error it wraps, e.g. a JSONDecodeError, does not), else the innermost user error
    in the chain (jsonargparse wraps a class's own ValueError into "Does not validate against any of the Union
    subtypes")."""
    found = []
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, USER_ERRORS):
            found.append(error)
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    if not found:
        return None
    chosen = next((candidate for candidate in found if _raised_here(candidate)), found[-1])
    return str(chosen).strip() or type(chosen).__name__


#: Where this project's code lives: an error raised there carries the library's context.
OWN_CODE = (Path(__file__).resolve().parent, Path(__file__).resolve().parents[1] / "datamodules")


def _raised_here(error: BaseException) -> bool:
    frame = error.__traceback__
    if frame is None:
        return False
    while frame.tb_next is not None:
        frame = frame.tb_next
    path = Path(frame.tb_frame.f_code.co_filename).resolve()
    return any(root in path.parents for root in OWN_CODE)


def main(argv: list[str] | None = None) -> None:
    """The `sparse-lightning` command. From the command line (argv None) a bad input ends with one line on stderr and
    exit status 1 (`SPARSE_LIGHTNING_TRACEBACK=1` shows the traceback); from Python, errors are raised."""
    if argv is not None:
        return _run(argv)
    silence_third_party_notices()
    try:
        _run(None)
    except Exception as error:
        message = user_error_message(error)
        if message is None or os.environ.get("SPARSE_LIGHTNING_TRACEBACK"):
            raise
        print(f"sparse-lightning: error: {message}", file=sys.stderr)
        sys.exit(1)


def _run(argv: list[str] | None) -> None:
    command = sys.argv[1:] if argv is None else argv
    if command and command[0] == "export":
        export_main(command[1:])
        return
    if command and command[0] == "evaluate":
        evaluate_main(command[1:])
        return
    if command and command[0] == "plot":
        plot_main(command[1:], SparseLightningCLI)
        return
    if command and command[0] == "estimate":
        estimate_main(command[1:])
        return
    # On the command line the parser raises instead of printing its usage (60-70 lines) so `main` prints one line.
    parser_kwargs = {} if argv is not None else {"exit_on_error": False, **{
        subcommand: {"exit_on_error": False} for subcommand in SparseLightningCLI.subcommands()}}
    SparseLightningCLI(SparseFineTuningModule, subclass_mode_model=True, subclass_mode_data=True, args=argv,
                       save_config_callback=SaveConfigToRunDirectory, save_config_kwargs={"overwrite": True},
                       parser_kwargs=parser_kwargs)


if __name__ == "__main__":
    main()
