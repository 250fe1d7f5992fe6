"""Moved to `sparse_lightning.borders.model_card`: this old import path stays an alias of that module (the same
module object, so attributes set on either are seen by both)."""

import sys

from sparse_lightning.borders import model_card

sys.modules[__name__] = model_card
