"""Moved to `sparse_lightning.borders.models`: this old import path stays an alias of that module (the same
module object, so attributes set on either are seen by both)."""

import sys

from sparse_lightning.borders import models

sys.modules[__name__] = models
