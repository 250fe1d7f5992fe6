"""The starting point of the nf4 chat runs in benchmarks/results/quantized_cli.md: SmolLM2's held-out chat loss with
every frozen Linear stored as `KIND` (lm_head kept, as the module keeps it) and no training, on the same 4 held-out
batches as those runs' `--trainer.limit_val_batches 4`. (`sparse-lightning validate` cannot show it: a module
quantizes only when it fits.)

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quantized_heldout_loss.py nf4     # or fp32, fp4, int8
"""

import sys

import torch
import yaml

from datamodules.chat import ChatDataModule
from sparse_lightning.modules import CausalLMModule
from sparse_lightning.sparse.quantized import quantize_frozen_linears

kind = sys.argv[1] if len(sys.argv) > 1 else "nf4"
task = yaml.safe_load(open("configs/task/chat.yaml"))["data"]["init_args"]
data = ChatDataModule(**{**task, "tokenizer_name_or_path": "SmolLM2-135M-Instruct"})
data.setup("validate")
module = CausalLMModule(model_name_or_path="SmolLM2-135M-Instruct")
module.configure_model()
module.model.requires_grad_(False).eval()
if kind != "fp32":
    quantize_frozen_linears(module.model, kind, keep=["lm_head"])
loaders = data.val_dataloader()
loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
total, count = 0.0, 0
with torch.no_grad():
    for i, batch in enumerate(loader):
        if i == 4:
            break
        total += module.compute_loss(batch).item() * batch["input_ids"].shape[0]
        count += batch["input_ids"].shape[0]
print(f"{kind}: held-out loss {total / count:.4f} (4 batches, {count} conversations, record-weighted)")
