"""The census: every causal-LM type of the installed transformers, tiny, patched vs stock (``run.py``)."""

from .check import PASS, REFUSED, UNBUILDABLE, WRONG, Result, check_entry
from .run import all_keys, counts, markdown, run

__all__ = ["PASS", "REFUSED", "UNBUILDABLE", "WRONG", "Result", "check_entry", "run", "all_keys", "counts", "markdown"]
