"""The frozen teacher (= the verifier): build it, compute its targets, check a sharded copy.

Source: docs/DESIGN.md section 2 (teacher targets). Used by the training loop (online targets,
:mod:`bd_ray.train`) and by the offline targets job (:mod:`bd_ray.teacher_targets`), so both modes
compute targets with the same function and give the same targets.

A teacher is dense (one copy per worker), a ZeRO-3 engine without optimizer (parameters
partitioned across ranks, gathered per layer in forward: the logits equal the dense model), or
refused for AutoTP in the data-parallel loop (:func:`build_teacher`).
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch

from bd_ray import models
from bd_ray.config.train import TrainJobConfig
from bd_ray.device import as_device, autocast
from bd_ray.kvcache import compact_cache, forward_with_cache, prefill
from bd_ray.losses import TeacherTargets

__all__ = ["compute_teacher_targets", "compute_teacher_targets_batch", "build_teacher", "teacher_dense_max_abs_diff", "local_param_fraction"]


@torch.no_grad()
def compute_teacher_targets_batch(teacher: torch.nn.Module, windows: torch.Tensor, prefix_len: int, top_k: int = 0,
                                  prefill_chunk: int = 512, cont_chunk: int = 64, sparse_budgets: Iterable[int] = (),
                                  policy=None, precision: str = "fp32", device: torch.device | str | None = None,
                                  return_logits: bool = False):
    """Teacher targets of ``N`` windows of equal length in one batched forward (docs/DESIGN.md sec 2):
    the full-cache greedy argmax per continuation position, per window.

    Args:
        teacher: the frozen verifier (dense, or the module of a ZeRO-3 engine: then every rank must
            call this with windows of the same shape, the forwards are collective).
        windows: ``[N, P+T]`` (or ``[P+T]``) token ids, on any device.
        prefix_len: ``P``.
        top_k: also return the top-k log-probs (``[T, k]`` per window; 0 = argmax only).
        prefill_chunk: prefix tokens per no-grad forward.
        cont_chunk: continuation positions per logits chunk (at most ``[N, cont_chunk, V]`` logits exist).
        sparse_budgets: budgets at which the teacher's *own* prefix cache is compacted
            (``bd_ray.kvcache.compact_cache`` with ``policy``) for ``L_B``; budgets >= ``P`` skipped.
        precision: a resolved precision (``bd_ray.device.resolve_precision``): fp32, or the forwards
            under bf16 / fp16 autocast (logits are taken in fp32 either way).
        device: where the ids go (the teacher's device); None = the ids' device.
        return_logits: also return the ``[N, T, V]`` full-cache logits (tests only).

    Returns:
        one :class:`TeacherTargets` (CPU tensors) per window, or ``(targets, logits)`` with
        ``return_logits``.

    Raises:
        ValueError: the windows cannot hold ``P`` + a continuation; sparse budgets without ``top_k``.
    """
    ids = windows.view(1, -1) if windows.dim() == 1 else windows
    ids = ids.long().to(ids.device if device is None else as_device(device))
    N, P = ids.shape[0], int(prefix_len)
    T = ids.shape[1] - P
    if T < 1 or P < 1:
        raise ValueError(f"window of {ids.shape[1]} tokens cannot hold prefix {P} + a continuation")
    with autocast(ids.device, precision):
        pre = prefill(teacher, ids[:, :P], chunk_size=prefill_chunk)

    def run(cache):
        am, ti, tl, full = [], [], [], []
        for s in range(0, T, cont_chunk):
            e = min(T, s + cont_chunk)
            with autocast(ids.device, precision):
                logits = forward_with_cache(teacher, cache, ids[:, P + s:P + e], P + s)
            logits = logits.float()
            am.append(logits.argmax(-1))
            if top_k:
                lp, ix = torch.log_softmax(logits, -1).topk(top_k, -1)
                ti.append(ix)
                tl.append(lp)
            if return_logits:
                full.append(logits)
        cat = lambda xs: torch.cat(xs, 1).cpu() if xs else None  # noqa: E731 -- [N, T, ...] on the host
        return cat(am), cat(ti), cat(tl), (torch.cat(full, 1) if full else None)

    sparse = {}
    for B in sorted(set(int(b) for b in sparse_budgets)):
        if B < P:
            _, ti, tl, _ = run(compact_cache(pre.cache, B, policy))
            if ti is None:
                raise ValueError("L_B needs loss.top_k > 0")
            sparse[B] = (ti, tl)
    am, ti, tl, full = run(pre.cache)
    tgts = [TeacherTargets(argmax=am[i], topk_ids=None if ti is None else ti[i],
                           topk_logprobs=None if tl is None else tl[i],
                           sparse={b: (x[i], y[i]) for b, (x, y) in sparse.items()}) for i in range(N)]
    return (tgts, full) if return_logits else tgts


def compute_teacher_targets(teacher: torch.nn.Module, window: torch.Tensor, prefix_len: int, top_k: int = 0,
                            prefill_chunk: int = 512, cont_chunk: int = 64, sparse_budgets: Iterable[int] = (),
                            policy=None, precision: str = "fp32", device: torch.device | str | None = None,
                            return_logits: bool = False):
    """Teacher targets of one window (``[P+T]`` or ``[1, P+T]``): :func:`compute_teacher_targets_batch`
    with ``N = 1``. Returns one :class:`TeacherTargets` (CPU tensors), or ``(targets, logits [T, V])``
    with ``return_logits``. Raises what the batched function raises."""
    out = compute_teacher_targets_batch(teacher, window.view(1, -1), prefix_len, top_k, prefill_chunk, cont_chunk,
                                        sparse_budgets, policy, precision, device, return_logits)
    return (out[0][0], out[1][0]) if return_logits else out[0]


def build_teacher(cfg: TrainJobConfig, model: torch.nn.Module, distributed: bool,
                  device: torch.device | str | None = None) -> tuple[torch.nn.Module, Any]:
    """Wrap the frozen teacher: ZeRO-3 engine without optimizer (parameters partitioned across
    ranks, on DeepSpeed's current device), AutoTP ``init_inference``, or dense on ``device`` (None =
    CPU). Its weights keep their dtype (``models.dtype``); its forward precision is ``teacher.precision``
    (applied by :func:`compute_teacher_targets`). Returns ``(module to call, engine or None)``.

    Raises:
        ValueError: ``deepspeed.teacher_shard=tp`` (data-parallel workers feed different windows,
            which AutoTP does not allow in this loop).
    """
    model.requires_grad_(False)
    model.eval()
    ds = cfg.deepspeed
    if not (distributed and ds.enabled) or ds.teacher_shard == "none":
        return model.to(as_device(device)), None
    import deepspeed

    if ds.teacher_shard == "tp":
        raise ValueError("deepspeed.teacher_shard=tp needs every rank to feed the same window; the online "
                         "data-parallel loop feeds different windows per rank: use zero3 (or offline targets)")
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": ds.teacher_persistence_threshold,
                              "stage3_prefetch_bucket_size": 0, "overlap_comm": False},
        "bf16": {"enabled": cfg.models.dtype == "bfloat16"},
        "fp16": {"enabled": cfg.models.dtype == "float16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.module.eval()
    return engine.module, engine


def teacher_dense_max_abs_diff(teacher: torch.nn.Module, verifier_path: str, window: np.ndarray, P: int,
                               device: torch.device | str | None = None) -> float:
    """Max |logit difference| between ``teacher`` (e.g. ZeRO-3-sharded; collective) and a dense fp32
    copy of the verifier at ``verifier_path``, both on ``device``, over the continuation of ``window``
    (``run.check_teacher_dense``)."""
    dense, _ = models.load_verifier(verifier_path, dtype=torch.float32)
    dense = dense.to(as_device(device))
    w = torch.tensor(np.array(window), device=as_device(device))
    _, a = compute_teacher_targets(teacher, w, P, device=device, return_logits=True)
    _, b = compute_teacher_targets(dense, w, P, device=device, return_logits=True)
    return float((a.float() - b.float()).abs().max())


def local_param_fraction(module: torch.nn.Module) -> float:
    """Fraction of the model's parameter elements held locally (ZeRO-3 partitions: ~1/world)."""
    local = full = 0
    for p in module.parameters():
        ds_t = getattr(p, "ds_tensor", None)
        n_full = int(getattr(p, "ds_numel", p.numel()))
        full += n_full
        local += int(ds_t.numel()) if ds_t is not None else p.numel()
    return local / max(1, full)
