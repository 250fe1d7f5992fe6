"""Shared test fixtures: tiny randomly initialised models of both families saved as HF directories (so tests stay
fast), the tiny SST-2 datamodule, and the contract matrix's method table and run (tests/distributed_scripts/
contract_run.py, loaded once here). Test modules share helpers only through these fixtures, never by importing
each other."""

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from sparse_lightning.models import resolve_model_path
from script_loading import load_script

TESTS = Path(__file__).resolve().parent
SHARED_DATA = TESTS.parents[1] / "shared" / "data"
CONTRACT_SCRIPT = TESTS / "distributed_scripts" / "contract_run.py"


def save_tiny_bert(path: Path, num_labels: int = 2) -> Path:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128, num_labels=num_labels,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertForSequenceClassification(config).bert.save_pretrained(path)
    AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2")).save_pretrained(path)
    return path


def save_tiny_llama(path: Path) -> Path:
    """LLaMA with grouped-query attention (4 query heads, 2 KV heads)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: OpenMP threads only add synchronisation (badly so on a shared CPU). A module opts in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def odd_llama_dir(tmp_path_factory) -> Path:
    """Tied embeddings, rows that 2 ranks split unevenly (251 tokens, 67 FFN channels), saved as an index of
    several safetensors files (the sharded-loading tests' model)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=251, hidden_size=32, intermediate_size=67, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("odd-llama")
    LlamaForCausalLM(config).save_pretrained(path, max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip("../shared/data is not beside this checkout")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_bert_cls_dir(tiny_bert_dir: Path, tmp_path_factory) -> Path:
    """Tiny BERT with its 2-label classifier saved too, so every run (in any process) starts from the same head
    whatever the RNG did, and a fresh `from_pretrained` is exactly the base a delta applies to."""
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    path = tmp_path_factory.mktemp("tiny-bert-cls")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(path)
    return path


def save_tiny_lm(path: Path, tiny_llama_dir: Path) -> Path:
    """The tiny GQA llama with a byte-level tokenizer (256 bytes + <eos>), embeddings resized to cover EOS."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={char: i for i, char in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    tokenizer.save_pretrained(path)
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    model.resize_token_embeddings(len(tokenizer))
    torch.manual_seed(0)
    model.get_input_embeddings().weight.data.normal_(0.0, 0.2)  # tied: big enough for logits to fit the data
    model.config.eos_token_id = model.config.pad_token_id = tokenizer.eos_token_id
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_lm_dir(tiny_llama_dir: Path, tmp_path_factory) -> Path:
    return save_tiny_lm(tmp_path_factory.mktemp("tiny-lm"), tiny_llama_dir)


@pytest.fixture(scope="session")
def contract() -> ModuleType:
    """tests/distributed_scripts/contract_run.py: METHODS, build_method, make_datamodule, run, STEPS, ..."""
    return load_script(CONTRACT_SCRIPT)


@pytest.fixture(scope="session")
def glue_datamodule(contract: ModuleType):
    """A factory: `glue_datamodule(model_dir, batch_size=16, **GLUEDataModule kwargs)` over the tiny SST-2 file
    (64 training rows, 16 dev rows) in file order."""
    return contract.make_datamodule


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_ranks(script: Path, args: list[str], what: str, timeout: float) -> None:
    """Run a multi-process script (it spawns its own ranks) on a fresh port, one thread per rank; the whole
    process group is killed on timeout, and the test fails with the script's last output."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, str(script), *args], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate()
        pytest.fail(f"{what} did not finish in {timeout} s:\n{out[-4000:]}")
    assert process.returncode == 0, f"{what} failed:\n{out[-6000:]}"


@pytest.fixture(scope="session")
def launch_ranks() -> Callable[[Path, list[str], str, float], None]:
    """`launch_ranks(script, args, what, timeout)`: the distributed tests' launcher."""
    return _launch_ranks

