"""Cases that need a process group, run by tests/test_distributed.py in as few launches as possible.

    torchrun --standalone --nproc_per_node 2 tests/distributed_cases.py SUITE[,SUITE...] OUT_DIR [TMP_DIR]

SUITE is ``op`` (the vocab-parallel op against the full op and the fp64 oracle, and its refusals), ``layouts``
(DDP, FSDP2 and tensor parallelism: patched vs stock under the same layout vs one process on the whole batch) or
``deepspeed`` (ZeRO-2 and ZeRO-3 the same way). Every case runs on every rank; rank 0 writes OUT_DIR/SUITE.json:
the world size, backend, device, versions, and one record per case whose numbers are the worst over the ranks and
whose ``error`` holds the last lines of a case that raised. TMP_DIR holds the tiny checkpoints that
``from_pretrained(tp_plan="auto")`` loads. On a CUDA machine (``CCE_DIST_DEVICE=cuda``) the same
cases run on NCCL, one GPU per rank. ``python tests/distributed_cases.py --markdown OUT_DIR`` prints the tables.

Training cases use SGD (AdamW's normalisation would amplify rounding on rarely-updated embedding rows), fp32, two
steps: the losses of both steps, every parameter's gradient after step 1 and every parameter after step 2 are
compared (relative L2 error per tensor, the worst tensor reported).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models_tiny import batch, tiny_model  # noqa: E402
from oracle import dense_reference, rel_err  # noqa: E402

import cce_patch  # noqa: E402
from cce_patch import linear_cross_entropy  # noqa: E402
from cce_patch.ops.vocab_parallel import vocab_parallel_linear_cross_entropy  # noqa: E402

STEPS = 2
LR = 0.5
DEVICE = torch.device("cpu")


def rank() -> int:
    return dist.get_rank()


def world() -> int:
    return dist.get_world_size()


def setup() -> str:
    """Initialise the default group: NCCL on one GPU per rank when CCE_DIST_DEVICE=cuda, else gloo on CPU."""
    global DEVICE
    use_cuda = os.environ.get("CCE_DIST_DEVICE", "cpu") == "cuda"
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        DEVICE = torch.device("cuda", local)
    dist.init_process_group(backend, timeout=timedelta(seconds=int(os.environ.get("CCE_DIST_TIMEOUT", 300))))
    return backend


def run_cases(cases: dict[str, Callable[[], dict]]) -> list[dict]:
    """Run each case on every rank; merge the ranks' records (numbers: max; errors: any)."""
    records = []
    for name, case in cases.items():
        start = time.perf_counter()
        try:
            record = case()
        except Exception as exc:  # recorded for the test to report; the other cases still run
            record = {"error": f"{type(exc).__name__}: {exc}"[-1500:],
                      "traceback": "".join(traceback.format_exc().splitlines(keepends=True)[-12:])}
        record["seconds"] = round(time.perf_counter() - start, 2)
        gathered: list[Any] = [None] * world()
        dist.all_gather_object(gathered, record)
        merged: dict[str, Any] = {"name": name}
        for r, rec in enumerate(gathered):
            for key, value in rec.items():
                if key in ("error", "traceback"):
                    merged.setdefault(key, f"rank {r}: {value}")
                elif isinstance(value, float) and isinstance(merged.get(key), float):
                    merged[key] = value if math.isnan(value) else max(merged[key], value)
                else:
                    merged.setdefault(key, value)
        records.append(merged)
        if rank() == 0:
            print(f"[{name}] {json.dumps({k: v for k, v in merged.items() if k != 'traceback'})}", flush=True)
    return records


# ---------------------------------------------------------------------------------------------------------------
# The vocab-parallel op
# ---------------------------------------------------------------------------------------------------------------


def _shard_rows(vocab: int, sizes: list[int] | None) -> tuple[int, int]:
    """(start, rows) of this rank: ``sizes`` per rank, or torch.chunk's split."""
    if sizes is None:
        size = -(-vocab // world())
        start = min(rank() * size, vocab)
        return start, max(0, min(size, vocab - start))
    return sum(sizes[: rank()]), sizes[rank()]


def _op_inputs(n_shape, d, vocab, *, bias, seed, dtype=torch.float32, ignore_frac=0.25, ignore_index=-100,
               targets_in=None):
    """Inputs equal on every rank (one seed): e (..., D), c (V, D), targets, bias."""
    g = torch.Generator().manual_seed(seed)
    e = (torch.randn(*n_shape, d, generator=g) / d**0.25).to(dtype)
    c = (torch.randn(vocab, d, generator=g) / d**0.25).to(dtype)
    lo, hi = targets_in or (0, vocab)
    t = torch.randint(lo, hi, n_shape, generator=g)
    t[torch.rand(n_shape, generator=g) < ignore_frac] = ignore_index
    b = torch.randn(vocab, generator=g).to(dtype) if bias else None
    return e.to(DEVICE), c.to(DEVICE), t.to(DEVICE), b.to(DEVICE) if b is not None else None


def _objective(out, return_lse: bool, weight: torch.Tensor | None):
    loss, lse = out if return_lse else (out, None)
    total = (loss.double() * weight).sum() if weight is not None else loss.double()
    if return_lse:
        total = total + 0.1 * (lse.double() ** 2).sum()
    return loss, lse, total


def op_case(*, vocab=37, d=16, n_shape=(3, 8), sizes=None, bias=True, dtype=torch.float32, api="plain",
            explicit_range=False, seed=0, ignore_index=-100, ignore_frac=0.25, targets_in=None, frozen_head=False,
            autocast: bool = False, **options) -> Callable[[], dict]:
    """The vocab-parallel op (plain tensors plus the default group, or a Shard(0) DTensor through
    ``linear_cross_entropy``) against the full op on the whole classifier and the fp64 oracle: loss, LSE, dE,
    this rank's rows of dC and dbias, under a random upstream gradient (and a z-loss with return_lse).
    ``autocast``: fp32 inputs, both ops under bf16 autocast (the cast inputs against fp64)."""

    def run() -> dict:
        context = torch.autocast(DEVICE.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with context:
            return compute()

    def compute() -> dict:
        e, c, t, b = _op_inputs(n_shape, d, vocab, bias=bias, seed=seed, dtype=dtype, ignore_frac=ignore_frac,
                                ignore_index=ignore_index, targets_in=targets_in)
        start, rows = _shard_rows(vocab, sizes)
        return_lse = options.get("return_lse", False)
        kw = dict(ignore_index=ignore_index, **options)
        # the full op on one rank's whole classifier
        e_full = e.clone().requires_grad_()
        c_full = c.clone().requires_grad_(not frozen_head)
        b_full = b.clone().requires_grad_() if b is not None else None
        full = linear_cross_entropy(e_full, c_full, t, bias=b_full, impl=options.get("impl", "torch"),
                                    **{k: v for k, v in kw.items() if k != "impl"})
        weight = None
        if options.get("reduction") == "none":
            weight = torch.randn(t.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
            weight = weight.to(DEVICE)
        loss_full, lse_full, total_full = _objective(full, return_lse, weight)
        total_full.backward()
        # vocab-parallel
        e_vp = e.clone().requires_grad_()
        c_rows = c[start:start + rows].clone()
        b_rows = b[start:start + rows].clone() if b is not None else None
        if api == "dtensor":
            from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

            mesh = init_device_mesh(DEVICE.type, (world(),))
            c_vp = distribute_tensor(c, mesh, [Shard(0)]).requires_grad_(not frozen_head)
            b_vp = distribute_tensor(b, mesh, [Shard(0)]).requires_grad_() if b is not None else None
            assert c_vp.to_local().shape[0] == rows, (c_vp.to_local().shape, rows)
            out = linear_cross_entropy(e_vp, c_vp, t, bias=b_vp, **kw)
        else:
            c_vp = c_rows.requires_grad_(not frozen_head)
            b_vp = b_rows.requires_grad_() if b_rows is not None else None
            extra = dict(vocab_start=start, vocab_size=vocab) if explicit_range else {}
            out = vocab_parallel_linear_cross_entropy(e_vp, c_vp, t, bias=b_vp, **extra, **kw)
        loss_vp, lse_vp, total_vp = _objective(out, return_lse, weight)
        total_vp.backward()
        grad_c = c_vp.grad.to_local() if api == "dtensor" and c_vp.grad is not None else c_vp.grad
        grad_b = None
        if b_vp is not None:
            grad_b = b_vp.grad.to_local() if api == "dtensor" else b_vp.grad
        # the fp64 oracle
        cast = (lambda x: x.to(torch.bfloat16) if x is not None else None) if autocast else (lambda x: x)
        ref, ref_lse, (e64, c64, b64) = dense_reference(
            cast(e), cast(c), t, bias=cast(b), ignore_index=ignore_index, softcap=options.get("softcap"),
            reduction=options.get("reduction", "mean"), shift=options.get("shift", False),
            label_smoothing=options.get("label_smoothing", 0.0),
        )
        _, _, total_ref = _objective((ref, ref_lse) if return_lse else ref, return_lse, weight)
        total_ref.backward()
        record = {
            "world_size": world(), "rows_here": rows, "vocab": vocab, "api": api,
            "loss_vs_full": rel_err(loss_vp.detach(), loss_full.detach()),
            "loss_vs_fp64": rel_err(loss_vp.detach(), ref.detach()),
            "dE_vs_full": rel_err(e_vp.grad, e_full.grad),
            "dE_vs_fp64": rel_err(e_vp.grad, e64.grad),
            "full_op_dE_vs_fp64": rel_err(e_full.grad, e64.grad),
            "finite": bool(torch.isfinite(loss_vp).all() and torch.isfinite(e_vp.grad).all()),
        }
        if return_lse:
            record["lse_vs_full"] = rel_err(lse_vp.detach(), lse_full.detach())
        if not frozen_head:
            record["dC_vs_full"] = rel_err(grad_c, c_full.grad[start:start + rows])
            record["dC_vs_fp64"] = rel_err(grad_c, c64.grad[start:start + rows])
        else:
            record["dC_is_none"] = c_vp.grad is None
        if grad_b is not None:
            record["dbias_vs_full"] = rel_err(grad_b, b_full.grad[start:start + rows])
        if float(loss_full.detach().abs().sum()) == 0.0:
            record["loss_is_zero"] = float(loss_vp.detach().abs().sum()) == 0.0
            record["dE_is_zero"] = float(e_vp.grad.abs().sum()) == 0.0
        return record

    return run


def refusal_case(make_call: Callable[[], Any], *expected: str) -> Callable[[], dict]:
    """A call that must raise ValueError whose message contains every ``expected`` fragment."""

    def run() -> dict:
        try:
            make_call()
        except ValueError as exc:
            message = str(exc)
            return {"raised": True, "message": message[:400], "names_layout": all(x in message for x in expected)}
        return {"raised": False, "names_layout": False}

    return run


def _dtensor(tensor, placements, mesh_shape=None):
    from torch.distributed.tensor import distribute_tensor, init_device_mesh

    mesh = init_device_mesh(DEVICE.type, mesh_shape or (world(),))
    return distribute_tensor(tensor, mesh, placements)


def _double_backward_case() -> dict:
    """A derivative of the vocab-parallel op's gradients is refused (DoubleBackwardError), as for the plain op."""
    e, c, t, _ = _op_inputs((12,), 16, 37, bias=False, seed=9)
    start, rows = _shard_rows(37, None)
    e = e.requires_grad_()
    loss = vocab_parallel_linear_cross_entropy(e, c[start:start + rows].clone().requires_grad_(), t)
    (de,) = torch.autograd.grad(loss, e, create_graph=True)
    try:
        de.sum().backward()
    except RuntimeError as exc:
        return {"raised": True, "message": str(exc)[:300], "names_layout": type(exc).__name__ == "DoubleBackwardError"}
    return {"raised": False, "names_layout": False}


def _partial(tensor):
    from torch.distributed.tensor import DTensor, Partial, init_device_mesh

    return DTensor.from_local(tensor, init_device_mesh(DEVICE.type, (world(),)), [Partial()])


def _seq_parallel_case() -> dict:
    """Sequence-parallel hidden states (a Shard(1) DTensor e on the head's mesh) are gathered: same result."""
    from torch.distributed.tensor import Replicate, Shard

    e, c, t, _ = _op_inputs((2, 8), 16, 37, bias=False, seed=7)
    e_full, c_full = e.clone().requires_grad_(), c.clone().requires_grad_()
    linear_cross_entropy(e_full, c_full, t, shift=True).backward()
    e_sp = _dtensor(e, [Shard(1)]).requires_grad_()
    c_tp = _dtensor(c, [Shard(0)]).requires_grad_()
    loss = linear_cross_entropy(e_sp, c_tp, _dtensor(t, [Replicate()]), shift=True)
    loss.backward()
    return {"loss_vs_full": rel_err(loss.detach(), linear_cross_entropy(e, c, t, shift=True)),
            "dE_vs_full": rel_err(e_sp.grad.full_tensor(), e_full.grad),
            "dC_vs_full": rel_err(c_tp.grad.full_tensor(), c_full.grad),
            "e_grad_layout": str(tuple(e_sp.grad.placements))}


def _two_dim_mesh_case() -> dict:
    """A (1, world) mesh with (Replicate, Shard(0)): vocab-parallel over the second dimension."""
    from torch.distributed.tensor import Replicate, Shard

    e, c, t, _ = _op_inputs((24,), 16, 40, bias=False, seed=8)
    e_full, c_full = e.clone().requires_grad_(), c.clone().requires_grad_()
    linear_cross_entropy(e_full, c_full, t).backward()
    c_tp = _dtensor(c, [Replicate(), Shard(0)], (1, world())).requires_grad_()
    e_vp = e.clone().requires_grad_()
    loss = linear_cross_entropy(e_vp, c_tp, t)
    loss.backward()
    return {"loss_vs_full": rel_err(loss.detach(), linear_cross_entropy(e, c, t)),
            "dE_vs_full": rel_err(e_vp.grad, e_full.grad), "dC_vs_full": rel_err(c_tp.grad.full_tensor(), c_full.grad)}


def op_cases() -> dict[str, Callable[[], dict]]:
    from torch.distributed.tensor import Shard

    e, c, t, _ = _op_inputs((12,), 16, 37, bias=False, seed=3)
    start, rows = _shard_rows(37, None)
    c_rows = c[start:start + rows]
    rank_e = e + rank()  # different hidden states per rank: the data-parallel mistake
    high_targets = t.clamp(0, 36)
    high_targets[0] = 36  # a class beyond every shard but the last
    cases = {
        "vp mean, bias, even split": op_case(vocab=40),
        "vp sum, ignore_index=-1, uneven split 19/18 (found by all-gather)": op_case(
            reduction="sum", ignore_index=-1, sizes=[19, 18]),
        "vp none, shift, softcap": op_case(reduction="none", shift=True, softcap=3.0, sizes=[20, 17]),
        "vp label smoothing 0.1": op_case(label_smoothing=0.1, sizes=[10, 27]),
        "vp ignore_index=0, a class id (the stand-in target must not collide)": op_case(
            ignore_index=0, ignore_frac=0.0, targets_in=(0, 6), reduction="sum"),
        "vp return_lse (z-loss), shift": op_case(return_lse=True, shift=True),
        "vp explicit vocab_start/vocab_size": op_case(sizes=[25, 12], explicit_range=True, reduction="sum"),
        "vp every target on rank 0's shard (rank 1 owns none)": op_case(sizes=[20, 17], targets_in=(0, 20)),
        "vp every row ignored": op_case(ignore_frac=1.1),
        "vp empty shard (V < world: sizes 3/0)": op_case(vocab=3, sizes=[3, 0], bias=False),
        "vp frozen head (dE only)": op_case(frozen_head=True, bias=False),
        "vp bf16": op_case(dtype=torch.bfloat16, bias=False, vocab=64, d=32, n_shape=(40,)),
        "vp bf16 autocast (fp32 inputs)": op_case(autocast=True, bias=True, vocab=64, d=32, n_shape=(40,)),
        "vp triton backend (interpreter on CPU)": op_case(impl="triton", shift=True, bias=False, vocab=64, d=16,
                                                          n_shape=(2, 9)),
        "dtensor Shard(0) via linear_cross_entropy": op_case(api="dtensor", vocab=40),
        "dtensor Shard(0), V=37 (torch.chunk split 19/18), shift, softcap": op_case(
            api="dtensor", shift=True, softcap=2.5, reduction="sum"),
        "dtensor sequence-parallel e (Shard(1)) gathered": _seq_parallel_case,
        "dtensor 2-D mesh (Replicate, Shard(0))": _two_dim_mesh_case,
        "refuse: double backward (DoubleBackwardError)": _double_backward_case,
        "refuse: mode='speed'": refusal_case(
            lambda: vocab_parallel_linear_cross_entropy(e, c_rows, t, mode="speed"), "mode='speed'", "vocab-parallel"),
        "refuse: softcap with label_smoothing": refusal_case(
            lambda: vocab_parallel_linear_cross_entropy(e, c_rows, t, softcap=2.0, label_smoothing=0.1),
            "softcap", "label_smoothing"),
        "refuse: Shard(1) classifier (split hidden size)": refusal_case(
            lambda: linear_cross_entropy(e, _dtensor(c, [Shard(1)]), t), "Shard(dim=1)", "placements"),
        "refuse: Partial classifier": refusal_case(
            lambda: linear_cross_entropy(e, _partial(c), t),
            "Partial"),
        "refuse: e split over the hidden dim": refusal_case(
            lambda: linear_cross_entropy(_dtensor(e, [Shard(1)]), _dtensor(c, [Shard(0)]), t),
            "hidden dimension", "Shard(dim=1)"),
        "refuse: data-parallel e with a vocab-sharded weight": refusal_case(
            lambda: vocab_parallel_linear_cross_entropy(rank_e, c_rows, t), "differ across the ranks",
            "FSDPModule.unshard()"),
        "refuse: data-parallel e with a Shard(0) DTensor weight (FSDP shard)": refusal_case(
            lambda: linear_cross_entropy(rank_e, _dtensor(c, [Shard(0)]), t), "differ across the ranks"),
        "refuse: target outside the whole vocabulary": refusal_case(
            lambda: vocab_parallel_linear_cross_entropy(e, c_rows, t.clamp_min(0) + 37), "outside [0, 37)"),
        "refuse: shards that do not tile the vocabulary": refusal_case(
            lambda: vocab_parallel_linear_cross_entropy(e, c_rows, t, vocab_start=0, vocab_size=37), "tile"),
        "refuse: a local shard passed to the plain op as the whole head": refusal_case(
            lambda: linear_cross_entropy(e, c_rows, high_targets), f"outside [0, {rows})"),
    }
    return cases


# ---------------------------------------------------------------------------------------------------------------
# Training under a layout: patched vs stock vs one process
# ---------------------------------------------------------------------------------------------------------------


def _full(t: torch.Tensor | None) -> torch.Tensor | None:
    """The whole tensor behind a (possibly DTensor) parameter or gradient, detached, on the CPU."""
    if t is None:
        return None
    if type(t).__name__ == "DTensor" or hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().float().cpu().clone()


def rank_batch(step: int, data_parallel: bool):
    """This rank's batch at ``step``: its own slice (data parallel) or the batch every rank shares (TP)."""
    ids, mask, labels = batch(seed=100 * step + (rank() if data_parallel else 0))
    return ids.to(DEVICE), mask.to(DEVICE), labels.to(DEVICE)


def whole_batch(step: int, data_parallel: bool):
    """What one process sees at ``step``: every rank's slice (data parallel) or the shared batch (TP)."""
    parts = [batch(seed=100 * step + r) for r in range(world() if data_parallel else 1)]
    return tuple(torch.cat(p).to(DEVICE) for p in zip(*parts, strict=True))


class Trace:
    """Losses per step, gradients after step 1 and parameters after the last step, by parameter name."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.grads: dict[str, torch.Tensor] = {}
        self.params: dict[str, torch.Tensor] = {}
        self.logits_none = True


def train(module: torch.nn.Module, forward: Callable, data_parallel: bool, *, single: bool = False,
          grad_of: Callable | None = None, step_fn: Callable | None = None, backward: Callable | None = None,
          params_of: Callable | None = None, micro_batches: int = 1) -> Trace:
    """Two SGD steps of ``forward`` (the wrapped model) on ``module``'s parameters, recording a Trace.

    ``micro_batches`` > 1: gradient accumulation over that many slices of each batch (every slice holds as many
    counted tokens, so the mean of their means is the batch mean), with FSDP2's gradient reduction off for all
    but the last (``set_requires_gradient_sync``), as accelerate does under FSDP2."""
    trace = Trace()
    opt = None if step_fn is not None else torch.optim.SGD(module.parameters(), lr=LR)
    for step in range(STEPS):
        ids, mask, labels = whole_batch(step, data_parallel) if single else rank_batch(step, data_parallel)
        total = torch.zeros((), device=DEVICE)
        for i, rows in enumerate(torch.arange(ids.shape[0]).chunk(micro_batches)):
            if hasattr(module, "set_requires_gradient_sync"):
                module.set_requires_gradient_sync(i == micro_batches - 1)
            out = forward(input_ids=ids[rows], attention_mask=mask[rows], labels=labels[rows])
            trace.logits_none &= out.logits is None
            (backward or (lambda loss: loss.backward()))(out.loss / micro_batches)
            total += out.loss.detach() / micro_batches
        if data_parallel and not single:
            dist.all_reduce(total)
            total /= world()
        trace.losses.append(float(total))
        if step == 0:
            trace.grads = {n: (grad_of or (lambda p: _full(p.grad)))(p) for n, p in module.named_parameters()}
        if step_fn is not None:
            step_fn()
        else:
            opt.step()
            opt.zero_grad(set_to_none=True)
    trace.params = params_of() if params_of is not None else {n: _full(p) for n, p in module.named_parameters()}
    return trace


def compare(a: Trace, b: Trace) -> tuple[float, float, float, str]:
    """(max |loss diff| over steps, worst gradient rel. error, worst parameter rel. error, worst gradient's name)."""
    loss = max(abs(x - y) for x, y in zip(a.losses, b.losses, strict=True))
    errors = {n: rel_err(a.grads[n], b.grads[n]) for n in b.grads if b.grads[n] is not None}
    missing = [n for n in b.grads if b.grads[n] is not None and a.grads.get(n) is None]
    worst = max(errors, key=errors.get)
    grad = float("inf") if missing else errors[worst]
    params = max(rel_err(a.params[n], b.params[n]) for n in b.params)
    return loss, grad, params, worst


_SINGLE: dict[tuple, Trace] = {}


def single_process(build: Callable[[], torch.nn.Module], key: tuple, data_parallel: bool) -> Trace:
    """Stock training of a fresh model on the whole batch in this process (cached per model and data)."""
    if key not in _SINGLE:
        model = build().to(DEVICE)
        _SINGLE[key] = train(model, model, data_parallel, single=True)
    return _SINGLE[key]


def layout_case(model_key: str, apply_layout: Callable, *, data_parallel: bool = True,
                build: Callable | None = None, micro_batches: int = 1, patch_first: bool = True) -> Callable[[], dict]:
    """Stock and patched training under ``apply_layout`` vs one process. ``apply_layout(model)`` wraps the model
    and returns (forward, facts): facts are the wrapper types and head layout it asserted. The patched model gets
    ``cce_patch.patch(model)`` and nothing else, before the layout is applied (``patch_first``) or after it."""
    build = build or MODELS[model_key]

    def run() -> dict:
        traces, facts = {}, {}
        for patched in (False, True):
            model = build().to(DEVICE)
            if patched and patch_first:
                cce_patch.patch(model)
            forward, facts = apply_layout(model)
            if patched and not patch_first:
                cce_patch.patch(model)
            assert world() == 2 or os.environ.get("CCE_DIST_ANY_WORLD"), world()
            traces[patched] = train(model, forward, data_parallel, micro_batches=micro_batches)
        single = single_process(MODELS[model_key], (model_key, data_parallel), data_parallel)
        loss_ps, grad_ps, param_ps, worst = compare(traces[True], traces[False])
        loss_p1, grad_p1, param_p1, _ = compare(traces[True], single)
        loss_s1, grad_s1, param_s1, _ = compare(traces[False], single)
        return {
            "world_size": world(), **facts, "patched_logits_none": traces[True].logits_none,
            "loss_step1": traces[True].losses[0],
            "loss_patched_vs_stock": loss_ps, "loss_patched_vs_single": loss_p1, "loss_stock_vs_single": loss_s1,
            "grad_patched_vs_stock": grad_ps, "grad_patched_vs_single": grad_p1, "grad_stock_vs_single": grad_s1,
            "param_patched_vs_single": param_p1, "param_stock_vs_single": param_s1,
            "param_patched_vs_stock": param_ps, "worst_grad": worst,
        }

    return run


MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "llama (untied)": lambda: tiny_model("llama"),
    "qwen2 (tied)": lambda: tiny_model("qwen2", tie_word_embeddings=True),
}


def _head_facts(model) -> dict:
    weight = model.lm_head.weight
    facts = {"head_weight": type(weight).__name__, "tied": weight is model.get_input_embeddings().weight}
    if hasattr(weight, "placements"):
        facts["head_layout"] = f"{tuple(weight.placements)} local rows {weight.to_local().shape[0]} of {weight.shape[0]}"
    return facts


def ddp(model):
    from torch.nn.parallel import DistributedDataParallel

    wrapped = DistributedDataParallel(model, device_ids=[DEVICE.index] if DEVICE.type == "cuda" else None)
    assert isinstance(wrapped, DistributedDataParallel)
    return wrapped, {"wrapper": type(wrapped).__name__, **_head_facts(model)}


def fsdp2(per_layer: bool = True, groups: tuple[tuple[str, ...], ...] = (), reshard: bool = True,
          bf16: bool = False):
    """fully_shard on each decoder layer (``per_layer``), on each group of submodules, then on the root;
    ``bf16``: FSDP2's mixed precision (bf16 parameters in forward and backward, fp32 gradient reduction), as
    accelerate's ``mixed_precision: bf16`` sets it up."""

    def apply(model):
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
        kw = dict(reshard_after_forward=reshard, **({"mp_policy": policy} if policy else {}))
        if per_layer:
            for layer in model.model.layers:
                fully_shard(layer, **kw)
        for names in groups:
            modules = [model.get_submodule(n) for n in names]
            fully_shard(modules if len(modules) > 1 else modules[0], **kw)
        fully_shard(model, **kw)
        assert isinstance(model, FSDPModule), type(model)
        for names in groups:
            assert all(isinstance(model.get_submodule(n), FSDPModule) for n in names), names
        facts = _head_facts(model)
        assert facts["head_weight"] == "DTensor" and "Shard(dim=0)" in facts["head_layout"], facts  # sharded at rest
        fsdp_modules = [name or "<root>" for name, m in model.named_modules() if isinstance(m, FSDPModule)]
        return model, {"wrapper": type(model).__name__, "head_module": type(model.lm_head).__name__,
                       "fsdp_modules": fsdp_modules, "decoder_layers": len(model.model.layers), **facts}

    return apply


def tp_head(model):
    """parallelize_module: the head column-wise (vocabulary rows split), its output gathered."""
    from torch.distributed.tensor import Replicate, init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    mesh = init_device_mesh(DEVICE.type, (world(),))
    parallelize_module(model, mesh, {"lm_head": ColwiseParallel(output_layouts=Replicate())})
    facts = _head_facts(model)
    assert "Shard(dim=0)" in facts["head_layout"], facts
    return model, {"wrapper": "parallelize_module(lm_head: ColwiseParallel)", **facts}


def hf_tp_build(model_key: str, tmp_dir: Path) -> Callable[[], torch.nn.Module]:
    """transformers' own tensor parallelism: ``from_pretrained(..., tp_plan="auto")`` of a saved tiny model."""
    import transformers

    path = tmp_dir / model_key.split()[0]
    if rank() == 0 and not (path / "config.json").exists():
        MODELS[model_key]().save_pretrained(path)
    dist.barrier()

    def build_tp():
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, tp_plan="auto", dtype=torch.float32, attn_implementation="eager")
        return model.train()

    return build_tp


def hf_tp(model):
    facts = _head_facts(model)
    assert getattr(model, "tp_plan", None) and "Shard(dim=0)" in facts["head_layout"], facts
    mesh = model.lm_head.weight.device_mesh
    return model, {"wrapper": f"from_pretrained(tp_plan='auto'), mesh {tuple(mesh.shape)}", **facts}


def layout_cases(tmp_dir: Path) -> dict[str, Callable[[], dict]]:
    untied, tied = "llama (untied)", "qwen2 (tied)"
    return {
        "ddp | llama (untied)": layout_case(untied, ddp),
        "ddp | qwen2 (tied)": layout_case(tied, ddp),
        "fsdp2 per layer + root | llama (untied)": layout_case(untied, fsdp2()),
        "fsdp2 per layer + root, reshard_after_forward=False | llama (untied)": layout_case(untied, fsdp2(reshard=False)),
        "fsdp2 root only | llama (untied)": layout_case(untied, fsdp2(per_layer=False)),
        "fsdp2 torchtitan: per layer, lm_head alone, root | llama (untied)": layout_case(
            untied, fsdp2(groups=(("lm_head",),))),
        "fsdp2 torchtitan, fully_shard before patch(): per layer, lm_head alone, root | llama (untied)": layout_case(
            untied, fsdp2(groups=(("lm_head",),)), patch_first=False),
        "fsdp2 lm_head alone, reshard_after_forward=False | llama (untied)": layout_case(
            untied, fsdp2(groups=(("lm_head",),), reshard=False)),
        "fsdp2 [norm, lm_head] grouped | llama (untied)": layout_case(untied, fsdp2(groups=(("model.norm", "lm_head"),))),
        "fsdp2 [embed_tokens, lm_head] grouped | llama (untied)": layout_case(
            untied, fsdp2(groups=(("model.embed_tokens", "lm_head"),))),
        "fsdp2 per layer + root | qwen2 (tied)": layout_case(tied, fsdp2()),
        "fsdp2 root only, reshard_after_forward=False | qwen2 (tied)": layout_case(tied, fsdp2(per_layer=False, reshard=False)),
        "fsdp2 torchtitan (tied): per layer, [embed_tokens, lm_head] grouped, root | qwen2 (tied)": layout_case(
            tied, fsdp2(groups=(("model.embed_tokens", "lm_head"),))),
        "fsdp2 [embed_tokens, lm_head] grouped (tied), reshard_after_forward=False | qwen2 (tied)": layout_case(
            tied, fsdp2(groups=(("model.embed_tokens", "lm_head"),), reshard=False)),
        "fsdp2 per layer + root, bf16 mixed precision | llama (untied)": layout_case(untied, fsdp2(bf16=True)),
        "fsdp2 lm_head alone, bf16 mixed precision | llama (untied)": layout_case(
            untied, fsdp2(groups=(("lm_head",),), bf16=True)),
        "fsdp2 lm_head alone, 2 accumulated micro-batches (no reduce on the first) | llama (untied)": layout_case(
            untied, fsdp2(groups=(("lm_head",),)), micro_batches=2),
        "tp parallelize_module(lm_head) | llama (untied)": layout_case(untied, tp_head, data_parallel=False),
        "tp from_pretrained(tp_plan='auto') | llama (untied)": layout_case(
            untied, hf_tp, data_parallel=False, build=hf_tp_build(untied, tmp_dir)),
        "tp from_pretrained(tp_plan='auto') | qwen2 (tied)": layout_case(
            tied, hf_tp, data_parallel=False, build=hf_tp_build(tied, tmp_dir)),
    }


# ---------------------------------------------------------------------------------------------------------------
# DeepSpeed
# ---------------------------------------------------------------------------------------------------------------


def deepspeed_case(model_key: str, stage: int, *, zero_init: bool = False, through_module: bool = False,
                   plain_patch: bool = False):
    """ZeRO-``stage`` via ``deepspeed.initialize`` (SGD as the client optimizer), stock vs patched with
    ``apply_cce`` (what the use_cce flag runs; ``plain_patch``: ``cce_patch.patch(model)``, as a user's own loop
    does) vs one process. ``zero_init``: built under ``deepspeed.zero.Init`` (the Trainer's zero3_init_flag),
    weights copied from the normal build; ``through_module``: forward through ``engine.module`` instead of the
    engine (outside DeepSpeed's own forward)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from cce_patch import CCEConfig
    from cce_patch.integrations.trainer import apply_cce

    def build_engine(patched: bool):
        config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
                  "gradient_clipping": 0.0,  # DeepSpeed's default clips at norm 1: plain SGD, as the reference
                  "steps_per_print": 10**9}
        reference = MODELS[model_key]()
        if zero_init:
            with deepspeed.zero.Init(config_dict_or_path=config):
                model = MODELS[model_key]()
            with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
                with torch.no_grad():
                    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
                        p.copy_(q)
        else:
            model = reference
        if patched and plain_patch:
            cce_patch.patch(model)
        elif patched:
            apply_cce(model, config=CCEConfig())
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                          config=config)
        assert isinstance(engine, deepspeed.DeepSpeedEngine) and engine.zero_optimization_stage() == stage
        return engine

    def gathered_params(engine):
        params = list(engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            return {n: _full(p) for n, p in params}

    def run() -> dict:
        traces, facts = {}, {}
        for patched in (False, True):
            engine = build_engine(patched)
            weight = engine.module.lm_head.weight
            facts = {"wrapper": f"{type(engine).__name__} (ZeRO-{engine.zero_optimization_stage()})",
                     "tied": weight is engine.module.get_input_embeddings().weight,
                     "head_weight": (f"partitioned: {weight.numel()} of {weight.ds_numel} elements here"
                                     if hasattr(weight, "ds_numel") else f"whole {tuple(weight.shape)}")}
            traces[patched] = train(
                engine.module, engine.module if through_module else engine, True,
                grad_of=lambda p: _full(safe_get_full_grad(p)), step_fn=engine.step, backward=engine.backward,
                params_of=lambda engine=engine: gathered_params(engine),
            )
        single = single_process(MODELS[model_key], (model_key, True), True)
        loss_ps, grad_ps, param_ps, worst = compare(traces[True], traces[False])
        loss_p1, grad_p1, param_p1, _ = compare(traces[True], single)
        loss_s1, grad_s1, param_s1, _ = compare(traces[False], single)
        return {"world_size": world(), "deepspeed": deepspeed.__version__, **facts,
                "patched_with": "cce_patch.patch" if plain_patch else "apply_cce",
                "patched_logits_none": traces[True].logits_none, "loss_step1": traces[True].losses[0],
                "loss_patched_vs_stock": loss_ps, "loss_patched_vs_single": loss_p1, "loss_stock_vs_single": loss_s1,
                "grad_patched_vs_stock": grad_ps, "grad_patched_vs_single": grad_p1, "grad_stock_vs_single": grad_s1,
                "param_patched_vs_single": param_p1, "param_stock_vs_single": param_s1,
                "param_patched_vs_stock": param_ps, "worst_grad": worst}

    return run


def deepspeed_cases() -> dict[str, Callable[[], dict]]:
    import importlib

    # DeepSpeed's CPU backend JIT-compiles a shared-memory kernel at init that serves only
    # `inference_all_reduce` (DeepSpeed-inference tensor parallelism); training collectives go through
    # torch.distributed (gloo here). Compiling it takes minutes on a loaded 2-core runner, so the CPU suite skips
    # it unless CCE_DS_SHM=1. It is the module's own hook: deepspeed.comm's `torch` attribute is the torch package.
    if DEVICE.type == "cpu" and os.environ.get("CCE_DS_SHM") != "1":
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    for key in MODELS:  # import the model classes before zero.Init patches tensor construction
        MODELS[key]()
    untied, tied = "llama (untied)", "qwen2 (tied)"
    return {
        "zero-2 | llama (untied)": deepspeed_case(untied, 2),
        "zero-3, plain patch() | llama (untied)": deepspeed_case(untied, 3, plain_patch=True),
        "zero-3 built under zero.Init | llama (untied)": deepspeed_case(untied, 3, zero_init=True),
        "zero-3 built under zero.Init, forward through engine.module | llama (untied)": deepspeed_case(
            untied, 3, zero_init=True, through_module=True),
        "zero-2 | qwen2 (tied)": deepspeed_case(tied, 2),
        "zero-3 built under zero.Init | qwen2 (tied)": deepspeed_case(tied, 3, zero_init=True),
    }


# ---------------------------------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    import transformers

    found = {"torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0]}
    try:
        import deepspeed

        found["deepspeed"] = deepspeed.__version__
    except ImportError:
        pass
    return found


def main(argv: list[str]) -> None:
    suites, out_dir = argv[0].split(","), Path(argv[1])
    tmp_dir = Path(argv[2]) if len(argv) > 2 else out_dir
    backend = setup()
    if DEVICE.type == "cpu":
        torch.set_num_threads(1)  # two ranks share the machine's cores; tiny matmuls gain nothing from threads
    makers = {"op": op_cases, "layouts": lambda: layout_cases(tmp_dir), "deepspeed": deepspeed_cases}
    for suite in suites:
        torch.manual_seed(0)
        started = time.perf_counter()
        records = run_cases(makers[suite]())
        if rank() == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            result = {"suite": suite, "world_size": world(), "backend": backend, "device": DEVICE.type,
                      "device_name": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu",
                      "versions": versions(), "date": time.strftime("%Y-%m-%d"),
                      "seconds": round(time.perf_counter() - started, 1), "cases": records}
            (out_dir / f"{suite}.json").write_text(json.dumps(result, indent=1))
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
# Tables for BENCHMARKS.md
# ---------------------------------------------------------------------------------------------------------------


def _label(case: dict) -> str:
    return case["name"].replace(" | ", ", ")


def _fmt(x: Any) -> str:
    return f"{x:.1e}" if isinstance(x, float) else str(x)


def markdown(out_dir: Path) -> str:
    lines = []
    for suite in ("layouts", "deepspeed", "op"):
        path = out_dir / f"{suite}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        lines.append(f"\n**{suite}** ({data['world_size']} ranks, {data['backend']} on {data['device_name']}, "
                     f"{', '.join(f'{k} {v}' for k, v in data['versions'].items())}, {data['date']}, "
                     f"{data['seconds']} s)\n")
        rows = [c for c in data["cases"] if "loss_patched_vs_stock" in c or "loss_vs_full" in c]
        if suite == "op":
            lines.append("| case | loss vs full op | loss vs fp64 | dE vs full | dE vs fp64 | dC (local rows) vs full "
                         "| dC vs fp64 |")
            lines.append("|---|---|---|---|---|---|---|")
            for c in rows:
                lines.append("| " + " | ".join([_label(c)] + [_fmt(c.get(k, "-")) for k in (
                    "loss_vs_full", "loss_vs_fp64", "dE_vs_full", "dE_vs_fp64", "dC_vs_full", "dC_vs_fp64")]) + " |")
        else:
            lines.append("| layout | wrapper / head | loss: patched vs stock | vs one process | grad: patched vs stock "
                         "| patched vs one process | stock vs one process | params after 2 steps: patched vs one process |")
            lines.append("|---|---|---|---|---|---|---|---|")
            for c in rows:
                where = f"{c.get('wrapper', '')}; {c.get('head_layout', c.get('head_weight', ''))}"
                lines.append("| " + " | ".join([_label(c), where] + [_fmt(c[k]) for k in (
                    "loss_patched_vs_stock", "loss_patched_vs_single", "grad_patched_vs_stock",
                    "grad_patched_vs_single", "grad_stock_vs_single", "param_patched_vs_single")]) + " |")
        refusals = [c for c in data["cases"] if "raised" in c]
        if refusals:
            lines.append("\nRefused, each with an error that names the problem (the layout ones before any compute): "
                         + "; ".join(f"{c['name'].removeprefix('refuse: ')} ({'ok' if c['names_layout'] else 'NOT OK'})"
                                     for c in refusals) + ".")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1] == "--markdown":
        print(markdown(Path(sys.argv[2])))
    else:
        main(sys.argv[1:])
