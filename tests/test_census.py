"""The census: every causal-LM type of the installed transformers, tiny, patched vs stock on the loss and every
gradient (``cce_patch/models/census``), run once in forked children; docs/models.md publishes its table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import transformers

from cce_patch.models.census import PASS, REFUSED, UNBUILDABLE, WRONG, counts, markdown, run
from cce_patch.models.census.run import read_table

DOCS = Path(__file__).resolve().parents[1] / "docs" / "models.md"

#: the families issue 15 names: mixture-of-experts with a router aux loss, vision-language wrappers, old-style
#: forwards, unshifted labels, logit scales, and dory's learned per-vocabulary scale
NAMED = [
    "mixtral", "qwen2_moe", "qwen3_moe", "qwen3_next", "olmoe", "gpt_oss", "granitemoe", "dbrx", "jamba", "phimoe",
    "minimax", "gemma3", "gemma4", "llama4", "falcon", "opt", "bloom", "mpt", "mamba", "bart", "pegasus",
    "falcon_h1", "minicpm3", "cohere2_moe", "dory",
    "qwen2_vl:Qwen2VLForConditionalGeneration", "qwen2_5_vl:Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl:Qwen3VLForConditionalGeneration", "mistral3:Mistral3ForConditionalGeneration",
]
#: how many of the causal-LM types must train exactly on the transformers the docs table was made with
REACH = 180


@pytest.fixture(scope="module")
def census():
    return {r.key: r for r in run(timeout=120)}


def _docs_version() -> str:
    match = re.search(r"Census of transformers (\S+?):", read_table(str(DOCS)))
    assert match, "docs/models.md's census table names no transformers version"
    return match.group(1)


def test_no_type_trains_on_a_different_loss(census):
    wrong = {k: r.reason for k, r in census.items() if r.status == WRONG}
    assert not wrong


def test_every_refusal_and_unbuildable_type_says_why(census):
    for key, r in census.items():
        if r.status in (REFUSED, UNBUILDABLE):
            assert len(r.reason) > 20, key
    refused = [r for r in census.values() if r.status == REFUSED]
    assert all("cce_patch" in r.reason for r in refused)  # the message a user sees, naming who refuses


def _on_docs_version() -> None:
    if transformers.__version__ != _docs_version():
        pytest.skip(f"stated for transformers {_docs_version()}, the version of docs/models.md's census")


def test_named_families_are_exact(census):
    _on_docs_version()
    failing = {k: (census[k].status, census[k].reason) if k in census else "missing" for k in NAMED
               if k not in census or census[k].status != PASS}
    assert not failing


def test_reach(census):
    _on_docs_version()
    causal = [r for r in census.values() if ":" not in r.key]
    assert sum(r.status == PASS for r in causal) >= REACH, counts(causal)


def test_docs_table_is_current(census):
    """On the transformers the table was made with, docs/models.md is exactly the census's table; on another
    version no type the docs claim to pass is refused or wrong (the tiny builder may not build it there)."""
    documented = read_table(str(DOCS))
    if transformers.__version__ == _docs_version():
        # An UNBUILDABLE row's reason names what this environment lacks (Gemma 3n: PIL, or timm once PIL is
        # there): the status is the claim, the reason text may differ between environments.
        assert _unbuildable_reasons_dropped(documented) == _unbuildable_reasons_dropped(
            markdown(list(census.values()), transformers.__version__)
        ), "docs/models.md is stale: python -m cce_patch.models.census --write docs/models.md"
    else:
        claimed = re.findall(r"^\| `([^`]+)` \| `([^`]+)` \| PASS \|", documented, flags=re.M)
        by_class = {(k.split(":")[0], r.model_class): r for k, r in census.items()}
        regressed = [(t, by_class[(t, c)].reason) for t, c in claimed
                     if (t, c) in by_class and by_class[(t, c)].status in (REFUSED, WRONG)]
        assert not regressed


def _unbuildable_reasons_dropped(table: str) -> str:
    return re.sub(r"^(\| `[^`]+` \| `[^`]+` \| UNBUILDABLE \|).*$", r"\1", table, flags=re.M)


def test_census_calls_a_dropped_transform_wrong(monkeypatch):
    """The census can fail: with the per-vocabulary scale or the soft cap silently dropped, the entries are WRONG."""
    from cce_patch.models.census import check_entry
    from cce_patch.models.deferred import DeferredLogits

    folded = DeferredLogits._scaled

    def dropping(self, factor, divide):
        if self.squashed or (torch.is_tensor(factor) and factor.dim() >= 1 and factor.shape[-1] > 1):
            return self._replace(squashed=False)  # the cap or the per-vocab scale, lost
        return folded(self, factor, divide)

    monkeypatch.setattr(DeferredLogits, "_scaled", dropping)
    known = transformers.models.auto.configuration_auto.CONFIG_MAPPING
    for key in [k for k in ("dory", "gemma2") if k in known]:
        result = check_entry(key)
        assert result.status == WRONG, (key, result)
