"""Model families: one generic patched forward + a declarative registry of family quirks."""

from .patching import is_patched, patch, unpatch
from .registry import FAMILIES, FamilySpec, spec_for

__all__ = ["patch", "unpatch", "is_patched", "FAMILIES", "FamilySpec", "spec_for"]
