"""Third-party notices that are not about the user's run, silenced for the `sparse-lightning` command.

Lightning advertises its cloud products on every fit (litlogger / litmodels tips), explains on every run that it
falls back to CSVLogger without tensorboard (the fallback is what this library documents), and calls a torch pytree
API that torch deprecated (Lightning's code, not the user's); PEFT reads transformers' deprecated
`is_gradient_checkpointing` on every LoRA model it wraps (PEFT's code). None of them asks the user to change
anything, and a newcomer reads them as problems. Everything else, warnings about the user's run included, stays.
"""

from __future__ import annotations

import logging
import warnings

#: (logger, message start) of Lightning's `rank_zero_info` advertisements.
_TIPS = ("💡 Tip:",)
_RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
#: Warning messages (regular expressions matched at the start) that are Lightning's or torch's own business.
_WARNINGS = (
    r"Starting from v1\.9\.0, `tensorboardX` has been removed as a dependency",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"`is_gradient_checkpointing` is deprecated and will be removed",
)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(_TIPS)


def silence_third_party_notices() -> None:
    """Drop the notices above from this process's output (idempotent)."""
    for name in _RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
    for message in _WARNINGS:
        warnings.filterwarnings("ignore", message=message)
