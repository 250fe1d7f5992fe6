"""Moved to `sparse_lightning.borders.gguf`: this old import path stays an alias of that module (the same
module object, so attributes set on either are seen by both)."""

import sys

from sparse_lightning.borders import gguf

sys.modules[__name__] = gguf
