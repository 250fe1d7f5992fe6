"""Moved to `sparse_lightning.borders.multi_delta`: this old import path stays an alias of that module (the same
module object, so attributes set on either are seen by both)."""

import sys

from sparse_lightning.borders import multi_delta

sys.modules[__name__] = multi_delta
