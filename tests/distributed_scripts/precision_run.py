"""The contract matrix's runs in mixed precision: every listed method under every listed setup, in one launch.

A setup is a strategy plus a precision (`SETUPS`): FSDP2 with bf16 parameters (`fsdp_param_dtype: bfloat16`, what
configs/strategy/fsdp2_bf16.yaml sets: fp32 storage, bf16 compute and all-gathers, fp32 gradient reduction) and
FSDP2 under `Trainer(precision="bf16-true")` (the frozen base stored in bf16; deltas stay fp32). Each run is
contract_run.py's `run` (same methods, data and steps), written to `OUTPUT/<setup>/<method>/rank<r>.pt`.

Lightning relaunches this script once per rank and every run happens in those processes; `--devices 1` runs the
same setups in one process (a one-rank FSDP2 mesh), the reference the ranks are compared with:

    python precision_run.py --model_dir DIR --output OUT --methods sift,s2ft --setups fsdp2_bf16,bf16_true
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

import contract_run as contract  # this script's own folder is first on sys.path

#: name -> `contract.run` settings.
SETUPS: dict[str, dict[str, Any]] = {
    "fsdp2_bf16": {"strategy": "fsdp2", "precision": "32-true", "fsdp_param_dtype": "bfloat16"},
    "bf16_true": {"strategy": "fsdp2", "precision": "bf16-true"},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", default=",".join(contract.METHODS), help="comma-separated contract methods")
    parser.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated, of {list(SETUPS)}")
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--train_file", type=Path, default=contract.DATA / "train.tsv")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for setup in args.setups.split(","):
        for method in args.methods.split(","):
            contract.run(args.model_dir, args.output / setup / method, method, devices=args.devices,
                         batch_size=args.batch_size, train_file=args.train_file, **SETUPS[setup])
    # Tear gloo down before interpreter exit: left to exit-time destructors it can abort ("terminate called").
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
