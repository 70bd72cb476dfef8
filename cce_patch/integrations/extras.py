"""The optional dependencies, imported only where a feature needs them, and the error that names the extra.

Why: the core install (``pip install cce_patch``) is torch, triton, transformers and packaging, enough for the
op and ``patch()``. The Trainer flag needs accelerate (transformers' ``Trainer`` runs on it), the TRL
integration needs trl, the recipes need datasets; each comes with an extra (pyproject.toml). A user who reaches
such a feature without its extra gets an ``ImportError`` that says which extra to install, not a bare
``No module named ...`` from deep inside transformers.
"""

from __future__ import annotations

import importlib
import types


class MissingExtraError(ImportError):
    """An optional dependency of a cce_patch feature is not installed; the message names the extra."""


def require(module: str, extra: str, feature: str) -> types.ModuleType:
    """Import ``module`` for ``feature``, or raise :class:`MissingExtraError` saying to install ``extra``."""
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] != top:  # the package is there; something it needs is not
            raise MissingExtraError(f"{feature}: importing {top} failed ({exc}); "
                                    f"pip install 'cce_patch[{extra}]' installs a supported version") from exc
        raise MissingExtraError(f"{feature} needs {top}, which is not installed: pip install 'cce_patch[{extra}]'"
                                ) from exc
    except ImportError as exc:  # installed but broken (a version that does not match this transformers, ...)
        raise MissingExtraError(f"{feature}: importing {top} failed ({exc}); "
                                f"pip install 'cce_patch[{extra}]' installs a supported version") from exc
