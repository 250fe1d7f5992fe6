"""Moved to `sparse_lightning.borders.export_target`: this old import path stays an alias of that module (the same
module object, so attributes set on either are seen by both)."""

import sys

from sparse_lightning.borders import export_target

sys.modules[__name__] = export_target
