"""`sparse-lightning plot curves|quasi-sparsity|selection-map`: the figures of `sparse_lightning.plots` as PNGs."""

from __future__ import annotations

import argparse

from sparse_lightning.borders.checkpoint import load_trained_module
from sparse_lightning.methods.s2ft import S2FT
from sparse_lightning.plots.curves import plot_curves, read_metrics
from sparse_lightning.plots.from_config import build_from_config, training_calibration
from sparse_lightning.plots.pyplot import MissingMatplotlib
from sparse_lightning.plots.quasi_sparsity import (
    DEFAULT_FRACTIONS,
    gradient_magnitudes,
    plot_quasi_sparsity,
    quasi_sparsity,
    share_table,
)
from sparse_lightning.usage_errors import raise_usage_errors
from sparse_lightning.plots.selection_map import plot_selection_map, selection_from_file, selection_matrices

USAGE_EXAMPLES = """examples:
  sparse-lightning plot curves lora=runs/lora sift=runs/sift/metrics.csv --output curves.png --smooth 5
  sparse-lightning plot quasi-sparsity --config configs/model/minilm.yaml --config configs/task/sst2.yaml \\
      --batches 4 --output quasi_sparsity.png
  sparse-lightning plot selection-map --ckpt_path last.ckpt --output selection.png
  sparse-lightning plot selection-map --selection selection.json --model all-MiniLM-L6-v2 --output selection.png"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-lightning plot", epilog=USAGE_EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    figures = parser.add_subparsers(dest="figure", required=True, metavar="{curves,quasi-sparsity,selection-map}")
    curves = figures.add_parser("curves", allow_abbrev=False,
                                help="training and validation curves of several runs from their metrics.csv")
    curves.add_argument("runs", nargs="+", metavar="[LABEL=]RUN",
                        help="a run directory (holding a CSVLogger metrics.csv) or a metrics.csv; the label defaults "
                             "to the directory's name")
    curves.add_argument("--smooth", type=int, default=1, help="average train curves over this many logged points")
    quasi = figures.add_parser("quasi-sparsity", allow_abbrev=False,
                               help="SIFT's gradient quasi-sparsity per weight type; other arguments (--config ...) "
                                    "describe the model and task as for `sparse-lightning fit`")
    quasi.add_argument("--batches", type=int, default=4, help="calibration batches summed (SIFT's calibration_batches)")
    quasi.add_argument("--target_modules", nargs="+", default=None,
                       help="module-name patterns to measure (default: every Linear in the transformer blocks)")
    selection = figures.add_parser("selection-map", allow_abbrev=False,
                                   help="S2FT's trained heads and channels per layer, from a checkpoint, a "
                                        "save_selection file, or configs with an S2FTStructureCallback")
    selection.add_argument("--ckpt_path", help="a checkpoint trained with S2FTStructureCallback")
    selection.add_argument("--selection", help="a JSON file written by S2FTStructureCallback(save_selection=...)")
    selection.add_argument("--model", help="with --selection: the model it was made on (alias, directory or hub id)")
    for sub in (curves, quasi, selection):
        sub.add_argument("--output", required=True, help="the PNG to write")
        sub.add_argument("--title", default=None, help="a title above the figure")
    for each in (parser, curves, quasi, selection):
        raise_usage_errors(each)
    return parser


def plot_main(argv: list[str], cli_class: type) -> None:
    """`sparse-lightning plot ...`; `cli_class` (the command line's `SparseLightningCLI`) reads `--config` files."""
    try:
        _plot(argv, cli_class)
    except MissingMatplotlib as error:
        raise SystemExit(f"sparse-lightning: error: {error}") from None


def _plot(argv: list[str], cli_class: type) -> None:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    from_file = args.figure == "selection-map" and (args.ckpt_path or args.selection)
    takes_configs = args.figure != "curves" and not from_file  # the rest goes to LightningCLI (--config ...)
    if rest and not takes_configs:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.figure == "curves":
        runs = [read_metrics(path, label or None) for label, _, path in
                (run.rpartition("=") for run in args.runs)]
        plot_curves(runs, args.output, smooth=args.smooth, title=args.title)
    elif args.figure == "quasi-sparsity":
        _quasi_sparsity(args, rest, cli_class)
    else:
        _selection_map(args, rest, cli_class)
    print(f"wrote {args.output}")


def _quasi_sparsity(args: argparse.Namespace, rest: list[str], cli_class: type) -> None:
    if args.batches < 1:
        raise ValueError(f"--batches must be >= 1, got {args.batches}")
    module, datamodule, _ = build_from_config(rest, cli_class)
    calibration = training_calibration(module, datamodule)
    magnitudes = gradient_magnitudes(module.model, calibration.batches(args.batches), calibration.loss_fn,
                                     args.target_modules)
    plot_quasi_sparsity(quasi_sparsity(magnitudes, DEFAULT_FRACTIONS), args.output, DEFAULT_FRACTIONS, args.title)
    print(f"share of |gradient| mass (sum over {args.batches} batches) held by the top x% of entries:")
    print(share_table(magnitudes))


def _selection_map(args: argparse.Namespace, rest: list[str], cli_class: type) -> None:
    if args.ckpt_path and args.selection:
        raise ValueError("give --ckpt_path or --selection, not both")
    if args.selection:
        if not args.model:
            raise ValueError("--selection needs --model: the model the selection was made on")
        matrices = selection_from_file(args.selection, args.model)
    elif args.ckpt_path:
        module, _ = load_trained_module(args.ckpt_path)
        matrices = selection_matrices(module.model)
    else:
        module, datamodule, trainer = build_from_config(rest, cli_class)
        methods = [cb for cb in trainer.callbacks if isinstance(cb, S2FT)]
        if len(methods) != 1:
            raise ValueError(f"the configs hold {len(methods)} S2FTStructureCallback(s): give exactly one (e.g. "
                             "--config configs/method/minilm/s2ft.yaml), or pass --ckpt_path / --selection")
        methods[0].attach(module.model, training_calibration(module, datamodule))
        matrices = selection_matrices(module.model)
    plot_selection_map(matrices, args.output, args.title)
    for kind, matrix in matrices.items():
        print(f"{kind}: " + "; ".join(f"layer {i}: {row.nonzero().flatten().tolist()}" for i, row in enumerate(matrix)))
