"""Reading a checkpoint without running code, one line for each way it fails: a file through
`torch.load(weights_only=True)`, a distributed checkpoint directory (FSDP2's) through a pickle reader that knows only
DCP's own records. Apart from `borders/checkpoint.py` (which rebuilds the module a checkpoint names), so the modules
can read one too."""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, MetadataIndex


class CheckpointError(ValueError):
    """A checkpoint that is refused: unreadable, needing code to load, foreign, or holding non-finite deltas."""


def read_checkpoint(ckpt_path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """A checkpoint's contents via `torch.load(weights_only=True)`: tensors and plain containers, never code.
    `mmap`: the tensors stay on disk until read (for a caller that needs only names)."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    checkpoint = load_weights_only(path, str(path), mmap=mmap)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: expected a checkpoint dictionary, got {type(checkpoint).__name__}")
    return checkpoint


def load_weights_only(source: Path | io.BytesIO, where: str, mmap: bool = False) -> Any:
    """`torch.load(source, weights_only=True)`, each way it fails as one `CheckpointError` line starting with `where`."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        if found:
            raise CheckpointError(f"{where}: refused: loading it would run code (it asks for {found.group(1)}); "
                                  "sparse-lightning reads checkpoints with torch.load(weights_only=True) only") from None
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{where}: not a readable PyTorch checkpoint ({reason})") from None
    except (RuntimeError, OSError, EOFError, KeyError, ValueError) as error:
        raise CheckpointError(f"{where}: not a readable PyTorch checkpoint ({type(error).__name__}: {error})") from None


#: What a distributed checkpoint's `.metadata` pickle may name besides DCP's own records (any class of
#: torch.distributed.checkpoint.metadata) and torch's dtypes: sizes, layouts, the storage record and a path.
DCP_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
               ("pathlib", "WindowsPath"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}


class _DCPMetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if dtype or (module, name) in DCP_GLOBALS or module == "torch.distributed.checkpoint.metadata":
            return super().find_class(module, name)
        raise CheckpointError(f"{self.path}: refused: loading it would run code (it asks for {module}.{name}); "
                              "sparse-lightning reads only DCP's own records from a distributed checkpoint")


def read_distributed_metadata(directory: str | Path) -> Metadata:
    """A distributed checkpoint directory's metadata, read without running code, once everything torch and Lightning
    would unpickle from it is known to be plain: `.metadata` names only DCP's records, every non-tensor item in the
    shards (which DCP loads with `torch.load(weights_only=False)`) loads weights-only, and so does `meta.pt`."""
    directory = Path(directory)
    path = directory / ".metadata"
    try:
        with path.open("rb") as file:
            metadata = _DCPMetadataUnpickler(file, path).load()
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, OSError, EOFError, AttributeError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable distributed checkpoint ({type(error).__name__}: {error})") \
            from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path}: expected DCP metadata, got {type(metadata).__name__}")
    for key, item in metadata.state_dict_metadata.items():
        if isinstance(item, BytesStorageMetadata):
            _check_byte_item(directory, key, (metadata.storage_data or {}).get(MetadataIndex(key)))
    if (directory / "meta.pt").is_file():
        read_checkpoint(directory / "meta.pt")
    return metadata


def _check_byte_item(directory: Path, key: str, storage: Any) -> None:
    """One non-tensor item of the shards loads weights-only (DCP itself would load it with weights_only=False)."""
    where = f"{directory}: item {key}"
    if storage is None or getattr(storage, "transform_descriptors", None):
        raise CheckpointError(f"{where}: stored in a way this reader cannot check (no plain storage record)")
    shard = directory / str(storage.relative_path)
    if shard.parent != directory or not shard.is_file():
        raise CheckpointError(f"{where}: its shard {storage.relative_path!r} is not a file in the checkpoint")
    with shard.open("rb") as file:
        file.seek(int(storage.offset))
        data = file.read(int(storage.length))
    load_weights_only(io.BytesIO(data), where)
