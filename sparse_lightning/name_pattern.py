"""Moved to `sparse_lightning.borders.name_pattern`: this old import path stays an alias of that module (the same
module object, so attributes set on either are seen by both)."""

import sys

from sparse_lightning.borders import name_pattern

sys.modules[__name__] = name_pattern
