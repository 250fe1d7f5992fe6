"""What this library needs to know about Lightning objects that Lightning offers no public accessor for.

One place, through public API only, so a Lightning upgrade breaks (at worst) one function here, never a private
attribute read somewhere else.

- A `ModelCheckpoint`'s triggers (`every_n_train_steps`, `train_time_interval`) are constructor arguments that
  Lightning keeps in private attributes. Its public `state_key` (the key under which a checkpoint stores the
  callback's state, documented on `Callback.state_key`) spells them out: we read them from there. Should the format
  ever change, `saves_on_its_own` answers True, which only means the CLI skips a warning.
"""

from __future__ import annotations

import re

from lightning.pytorch.callbacks import ModelCheckpoint

_EVERY_N_TRAIN_STEPS = re.compile(r"'every_n_train_steps': (\d+)")
_TRAIN_TIME_INTERVAL = re.compile(r"'train_time_interval': (None|\S)")


def saves_on_its_own(checkpoint: ModelCheckpoint) -> bool:
    """Whether the callback saves on a trigger of its own (every N training steps or a time interval) rather than
    only after validations and epoch ends."""
    key = checkpoint.state_key
    steps, interval = _EVERY_N_TRAIN_STEPS.search(key), _TRAIN_TIME_INTERVAL.search(key)
    if steps is None or interval is None:
        return True  # an unknown format: assume it saves (the caller only skips a warning)
    return int(steps.group(1)) > 0 or interval.group(1) != "None"
