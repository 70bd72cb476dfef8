"""Model families: the stock forward wrapped and its head intercepted, plus a declarative table of family rows."""

from .patching import is_patched, patch, unpatch
from .registry import FAMILIES, FamilySpec, spec_for
from .state import config_of

__all__ = ["patch", "unpatch", "is_patched", "config_of", "FAMILIES", "FamilySpec", "spec_for"]
