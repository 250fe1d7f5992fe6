"""Moved to `sparse_lightning.borders.evaluate`: this old import path stays an alias of that module (the same
module object, so attributes set on either are seen by both)."""

import sys

from sparse_lightning.borders import evaluate

sys.modules[__name__] = evaluate
