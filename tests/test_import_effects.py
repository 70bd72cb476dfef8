"""``import cce_patch`` changes nothing outside the package.

Why: a library's import should not alter the process it is imported into; the peers (Liger-Kernel, apple's
cut-cross-entropy) do not. cce_patch once armed its TRL integration at import (a ``sys.meta_path`` finder); it is
now armed by ``patch()`` (``cce_patch/integrations/arming.py``; the TRL tests cover both import orders). Checked in
a fresh interpreter that has imported torch and transformers (and the transformers modules the package reaches)
first, so that what changes is what cce_patch's import does: the import machinery, the warnings filters, logging,
torch's global settings and operator registry, the environment, and every attribute of every module and class
that was already loaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, logging, os, sys, warnings
import torch, transformers
import transformers.modeling_utils, transformers.modeling_outputs  # loaded by cce_patch's models room anyway
from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401 - resolve the lazy module's names


def torch_settings():
    return {
        "default_dtype": str(torch.get_default_dtype()),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "grad_enabled": torch.is_grad_enabled(),
        "threads": torch.get_num_threads(),
        "anomaly": torch.is_anomaly_enabled(),
    }


def loggers():
    # name -> [handlers, level, propagate, disabled]; the root also records logging.disable's level
    found = {"": [[id(h) for h in logging.root.handlers], logging.root.level, logging.root.manager.disable]}
    for name, logger in logging.root.manager.loggerDict.items():
        if isinstance(logger, logging.Logger):
            found[name] = [[id(h) for h in logger.handlers], logger.level, logger.propagate, logger.disabled]
    return found


def attributes():
    # id of every attribute of every loaded module, and of every class defined there: a monkeypatch shows here
    found = {}
    for name, module in list(sys.modules.items()):
        if module is None or name.split(".")[0] == "cce_patch":
            continue
        try:
            items = list(vars(module).items())
        except TypeError:
            continue
        for key, value in items:
            if key in ("__cached__", "__spec__", "__loader__"):
                continue
            found[f"{name}.{key}"] = id(value)
            if isinstance(value, type) and value.__module__ == name:
                for attr, member in list(vars(value).items()):
                    found[f"{name}.{key}.{attr}"] = id(member)
    return found


def state():
    return {
        "meta_path": [repr(f) for f in sys.meta_path],
        "path_hooks": [repr(h) for h in sys.path_hooks],
        "path": list(sys.path),
        "importer_cache": sorted(sys.path_importer_cache),
        "warnings": [repr(f) for f in warnings.filters],
        "showwarning": repr(warnings.showwarning),
        "excepthook": repr(sys.excepthook),
        "displayhook": repr(sys.displayhook),
        "recursion_limit": sys.getrecursionlimit(),
        "environ": dict(os.environ),
        "loggers": loggers(),
        "torch": torch_settings(),
        "ops": sorted(torch._C._dispatch_get_all_op_names()),
    }


before, attrs = state(), attributes()
import cce_patch  # noqa: E402

after, attrs_after = state(), attributes()
assert cce_patch.__file__.startswith(sys.argv[1]), cce_patch.__file__
changed = {k: (before[k], after[k]) for k in before
           if k not in ("ops", "importer_cache", "loggers") and before[k] != after[k]}
# loggers that existed keep their level and handlers; new ones (modules' getLogger(__name__)) get no handler
changed.update({f"logger {k!r}": (v, after["loggers"].get(k)) for k, v in before["loggers"].items()
                if after["loggers"].get(k) != v})
changed.update({f"new logger {k!r}": v for k, v in after["loggers"].items()
                if k not in before["loggers"] and v[0]})
new_ops = sorted(set(after["ops"]) - set(before["ops"]))
changed_attrs = sorted(k for k, v in attrs.items() if k in attrs_after and attrs_after[k] != v)
cache = sorted(set(after["importer_cache"]) - set(before["importer_cache"]))
print(json.dumps({"changed": changed, "new_ops": new_ops, "changed_attributes": changed_attrs,
                  "new_import_cache": cache, "checked_attributes": len(attrs)}))
"""


def test_import_changes_nothing_outside_the_package():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(PROBE), str(ROOT)], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found["checked_attributes"] > 10_000  # the probe did look at torch's and transformers' modules
    assert found["changed"] == {}, found["changed"]
    assert found["changed_attributes"] == [], found["changed_attributes"][:20]
    # the op's torch.library custom ops (ops/compiled.py) are registered under the package's own namespace
    assert found["new_ops"] and all(op.startswith("cce_patch::") for op in found["new_ops"]), found["new_ops"]
    # the path importer cache only gains the package's own directories (Python's import caching)
    assert all(Path(p).resolve().is_relative_to(ROOT / "cce_patch") for p in found["new_import_cache"]), \
        found["new_import_cache"]
