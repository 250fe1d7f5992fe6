"""A LLaMA with random weights and a byte-level tokenizer (256 bytes + <eos>), saved as a HF directory.

The GPU script's FSDP runs and memory table need a model of a known shape and nothing carried to the machine: their
code paths and costs do not depend on the weights.

    python benchmarks/random_llama.py DIR tiny|small|1b [--dtype bfloat16] [--device cuda]

Shapes: `small` is SmolLM2-135M's (30 layers, hidden 576, FFN 1536, 9 query / 3 KV heads), `tiny` the same at hidden
128, FFN 256; `1b` is Llama-3.2-1B's (16 layers, hidden 2048, FFN 8192, 32 query / 8 KV heads; ~0.97B parameters with
this 257-token vocabulary).
"""

from __future__ import annotations

import argparse

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SHAPES = {
    "small": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                  num_hidden_layers=30, head_dim=64, tie_word_embeddings=True),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                 num_hidden_layers=30, head_dim=32, tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
               num_hidden_layers=16, head_dim=64, tie_word_embeddings=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path")
    parser.add_argument("shape", choices=list(SHAPES))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu", help="where to initialise the weights (cuda is faster at 1b)")
    args = parser.parse_args()
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={char: i for i, char in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>")
    tokenizer.save_pretrained(args.path)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id, **SHAPES[args.shape])
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM(config).to(getattr(torch, args.dtype))
    model.save_pretrained(args.path)
    print(f"{args.shape}: {sum(p.numel() for p in model.parameters()):,} parameters, {args.dtype}")


if __name__ == "__main__":
    main()
