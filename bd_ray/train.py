"""BudgetDraft drafter training: Ray Train workers, DeepSpeed engines, teacher targets, metrics.

Source: the BudgetDraft recipe, docs/DESIGN.md section 2; the stack, section 5.

One optimizer step, per worker (data parallel; every worker sees different windows)::

    for each of grad_accum windows (prefix P + continuation T tokens):
        teacher targets   (frozen verifier; ZeRO-3-sharded, no grad; chunked prefill of the prefix,
                           greedy argmax at each continuation position, optional top-k log-probs)
        drafter prefill   (no grad: the prefix cache; no gradient through prefix KV)
        K budgets         (BudgetSampler, seeded by (seed, micro-step): the same on every worker)
        L = L_A + lambda L_C (+ L_B)           (bd_ray.losses, chunk-wise from hidden states)
        skip + count the window if L is not finite on any worker (all-reduced decision)
        engine.backward(L); engine.step()      (DeepSpeed ZeRO-1/2 AdamW, warm-up + cosine, clip)

The same :func:`train_loop` runs inside Ray Train (``train_loop_per_worker``: DeepSpeed engines,
``get_dataset_shard``, ``ray.train.report`` checkpoints) and in one process without Ray
(:func:`run_local`: a plain-torch engine with identical semantics; used by the golden-numerics and
resume tests). Only the engine and the data source differ.

Checkpoint directory layout (every ``run.checkpoint_every`` steps and at the end)::

    state.json          step, world size, consumed windows, skipped count, restores, metrics history (rank 0)
    engine/...          DeepSpeed checkpoint (model, per-rank ZeRO optimizer partitions, scheduler)
    local_engine.pt     (instead of engine/ without DeepSpeed) model + optimizer + scheduler
    hf/                 the drafter as HF save_pretrained (safetensors) + tokenizer
    manifest.rankNNNNN.json   per rank, written last: size + SHA-256 of every file that rank wrote

Fault tolerance (bd_ray/checkpoints.py): a checkpoint is sealed by its manifests; a restore checks
them and falls back, with a warning, to the newest older intact checkpoint when the latest is
damaged. In Ray Train a dead worker makes the worker group restart (``run.max_failures``) from
the latest registered checkpoint; the windows are then replayed in the same order
(``preserve_order``) after skipping the ones already consumed, so a 1-worker run resumed after a
crash ends with the same weights as an uninterrupted one. Model/tokenizer mismatches are found by
:func:`check_models_compatible` in the driver, before any Ray worker starts.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from bd_ray.checkpoints import restorable_checkpoint_dir, select_local_checkpoint, write_manifest
from bd_ray.store import atomic_write_json, publish_dir, replace_dir
from bd_ray.losses import BudgetSampler, TeacherTargets, budgetdraft_loss, head_params
from bd_ray.config.train import TrainJobConfig
from bd_ray.sparse import queries_needed

__all__ = [
    "lr_factor",
    "compute_teacher_targets",
    "evaluate_agreement",
    "LocalEngine",
    "DeepSpeedDrafterEngine",
    "build_drafter_engine",
    "build_teacher",
    "LoopContext",
    "train_loop",
    "train_loop_per_worker",
    "run_local",
    "run_ray",
    "write_plot",
    "ModelCompatError",
    "check_models_compatible",
]

ENGINE_TAG = "engine"


# ------------------------------------------------------------------------------------------
# Schedule
# ------------------------------------------------------------------------------------------


def lr_factor(step: int, warmup: int, max_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier used by optimizer step ``step`` (0-based): linear warm-up over ``warmup``
    steps (``(step+1)/warmup``), then cosine from 1 to ``min_ratio`` at ``max_steps``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, max_steps - warmup)
    progress = min(1.0, max(0.0, (step - warmup) / span))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _make_optimizer(cfg: TrainJobConfig, model: torch.nn.Module):
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, o.warmup_steps, o.max_steps, o.min_lr_ratio))
    return opt, sched


# ------------------------------------------------------------------------------------------
# Teacher
# ------------------------------------------------------------------------------------------


@torch.no_grad()
def compute_teacher_targets(teacher: torch.nn.Module, window: torch.Tensor, prefix_len: int, top_k: int = 0,
                            prefill_chunk: int = 512, cont_chunk: int = 64, sparse_budgets: Iterable[int] = (),
                            policy=None, return_logits: bool = False):
    """Teacher targets of one window (docs/DESIGN.md sec 2): full-cache greedy argmax per continuation position.

    Args:
        teacher: the frozen verifier (dense, or the module of a ZeRO-3 engine: then every rank must
            call this with a window of the same length, the forwards are collective).
        window: ``[P+T]`` or ``[1, P+T]`` token ids.
        prefix_len: ``P``.
        top_k: also return the top-k log-probs (``[T, k]``; 0 = argmax only).
        prefill_chunk: prefix tokens per no-grad forward.
        cont_chunk: continuation positions per logits chunk (at most ``[cont_chunk, V]`` logits exist).
        sparse_budgets: budgets at which the teacher's *own* prefix cache is compacted
            (``bd_ray.kvcache.compact_cache`` with ``policy``) for ``L_B``; budgets >= ``P`` skipped.
        return_logits: also return the ``[T, V]`` full-cache logits (tests only).

    Returns:
        :class:`TeacherTargets` (CPU tensors), or ``(targets, logits)`` with ``return_logits``.
    """
    from bd_ray.kvcache import compact_cache, forward_with_cache, prefill

    ids = window.view(1, -1).long()
    P = int(prefix_len)
    T = ids.shape[1] - P
    if T < 1 or P < 1:
        raise ValueError(f"window of {ids.shape[1]} tokens cannot hold prefix {P} + a continuation")
    pre = prefill(teacher, ids[:, :P], chunk_size=prefill_chunk)

    def run(cache):
        am, ti, tl, full = [], [], [], []
        for s in range(0, T, cont_chunk):
            e = min(T, s + cont_chunk)
            logits = forward_with_cache(teacher, cache, ids[:, P + s:P + e], P + s)[0].float()
            am.append(logits.argmax(-1))
            if top_k:
                lp, ix = torch.log_softmax(logits, -1).topk(top_k, -1)
                ti.append(ix)
                tl.append(lp)
            if return_logits:
                full.append(logits)
        return (torch.cat(am), torch.cat(ti) if ti else None, torch.cat(tl) if tl else None,
                torch.cat(full) if full else None)

    sparse = {}
    for B in sorted(set(int(b) for b in sparse_budgets)):
        if B < P:
            view = compact_cache(pre.cache, B, policy)
            _, ti, tl, _ = run(view)
            if ti is None:
                raise ValueError("L_B needs loss.top_k > 0")
            sparse[B] = (ti, tl)
    am, ti, tl, full = run(pre.cache)
    tgt = TeacherTargets(argmax=am.cpu(), topk_ids=None if ti is None else ti.cpu(),
                         topk_logprobs=None if tl is None else tl.cpu(), sparse=sparse)
    return (tgt, full) if return_logits else tgt


def build_teacher(cfg: TrainJobConfig, model: torch.nn.Module, distributed: bool) -> tuple[torch.nn.Module, Any]:
    """Wrap the frozen teacher: ZeRO-3 engine without optimizer (parameters partitioned across
    ranks), AutoTP ``init_inference``, or dense. Returns ``(module to call, engine or None)``.

    Raises:
        ValueError: ``deepspeed.teacher_shard=tp`` (data-parallel workers feed different windows,
            which AutoTP does not allow in this loop).
    """
    model.requires_grad_(False)
    model.eval()
    ds = cfg.deepspeed
    if not (distributed and ds.enabled) or ds.teacher_shard == "none":
        if ds.precision == "bf16":
            model = model.to(torch.bfloat16)
        return model, None
    import deepspeed

    if ds.teacher_shard == "tp":
        raise ValueError("deepspeed.teacher_shard=tp needs every rank to feed the same window; the online "
                         "data-parallel loop feeds different windows per rank: use zero3 (or offline targets)")
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": ds.teacher_persistence_threshold,
                              "stage3_prefetch_bucket_size": 0, "overlap_comm": False},
        "bf16": {"enabled": ds.precision == "bf16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.module.eval()
    return engine.module, engine


# ------------------------------------------------------------------------------------------
# Drafter engines
# ------------------------------------------------------------------------------------------


class LocalEngine:
    """Single-process engine with DeepSpeed's semantics: ``backward`` scales by ``1/grad_accum``,
    ``step`` updates (clip, AdamW, scheduler) only at accumulation boundaries."""

    def __init__(self, cfg: TrainJobConfig, model: torch.nn.Module):
        self.module = model
        self.optimizer, self.scheduler = _make_optimizer(cfg, model)
        self.accum = cfg.optim.grad_accum
        self.clip = cfg.optim.grad_clip
        self.micro_steps = 0
        self.global_steps = 0
        self.last_grad_norm: float | None = None

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.accum:
            return
        params = [p for p in self.module.parameters() if p.grad is not None]
        if self.clip > 0:
            self.last_grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.clip))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_steps += 1

    def get_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def save(self, d: str) -> None:
        torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "micro_steps": self.micro_steps,
                    "global_steps": self.global_steps}, os.path.join(d, "local_engine.pt"))

    def load(self, d: str) -> None:
        state = torch.load(os.path.join(d, "local_engine.pt"), map_location="cpu", weights_only=False)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.micro_steps, self.global_steps = state["micro_steps"], state["global_steps"]


class DeepSpeedDrafterEngine:
    """The drafter's DeepSpeed engine (ZeRO-0/1/2, fp32 or bf16) with a torch AdamW client optimizer
    and LambdaLR warm-up + cosine (no compiled DeepSpeed ops). Same interface as :class:`LocalEngine`."""

    def __init__(self, cfg: TrainJobConfig, model: torch.nn.Module):
        import deepspeed

        ds = cfg.deepspeed
        opt, sched = _make_optimizer(cfg, model)
        config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": cfg.optim.grad_accum,
            "gradient_clipping": cfg.optim.grad_clip,
            "zero_allow_untested_optimizer": True,
            "zero_optimization": {"stage": ds.zero_stage, "overlap_comm": False, "contiguous_gradients": True,
                                  "reduce_bucket_size": ds.reduce_bucket_size,
                                  "allgather_bucket_size": ds.allgather_bucket_size},
            "bf16": {"enabled": ds.precision == "bf16"},
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=opt, lr_scheduler=sched, config=config)
        self.module = self.engine.module

    @property
    def global_steps(self) -> int:
        return int(self.engine.global_steps)

    @property
    def last_grad_norm(self) -> float | None:
        g = self.engine.get_global_grad_norm()
        return None if g is None else float(g)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()

    def get_lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def save(self, d: str) -> None:
        self.engine.save_checkpoint(d, tag=ENGINE_TAG, save_latest=True)

    def load(self, d: str) -> None:
        path, _ = self.engine.load_checkpoint(d, tag=ENGINE_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint (tag {ENGINE_TAG!r}) under {d}")


def build_drafter_engine(cfg: TrainJobConfig, model: torch.nn.Module, distributed: bool):
    """DeepSpeed engine when ``deepspeed.enabled`` and torch.distributed is up, else :class:`LocalEngine`."""
    model.train()
    if distributed and cfg.deepspeed.enabled:
        return DeepSpeedDrafterEngine(cfg, model)
    if cfg.deepspeed.precision == "bf16":
        model.to(torch.bfloat16)
    return LocalEngine(cfg, model)


# ------------------------------------------------------------------------------------------
# Evaluation: top-1 agreement with the teacher (proxy for greedy alpha)
# ------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_agreement(drafter: torch.nn.Module, windows: list[np.ndarray], targets: list[TeacherTargets],
                       prefix_len: int, budgets: Iterable[int], policy, prefill_chunk: int = 512,
                       chunk: int = 64, draft_vocab=None) -> dict[str, float]:
    """Fraction of continuation positions where the drafter's argmax equals the teacher's argmax.

    Computed at the full prefix cache (key ``"full"``) and with the drafter's prefix cache compacted to
    each budget < ``prefix_len`` (key ``str(B)``), on held-out windows. Under greedy verification a
    draft is accepted iff it equals the verifier's argmax, so this is a fast proxy for greedy alpha
    (teacher-forced on the reference text rather than on the drafter's own drafts). With a
    ``draft_vocab`` the drafter's argmax is taken over that subset, as it decodes.
    """
    from bd_ray.kvcache import clone_cache, compact_cache, forward_with_cache, prefill

    was_training = drafter.training
    drafter.eval()
    weight, bias = head_params(drafter)
    ids_of = None
    if draft_vocab is not None:
        ids_of = torch.from_numpy(draft_vocab.ids).to(weight.device)
        weight, bias = weight[ids_of], None if bias is None else bias[ids_of]
    keys = ["full"] + [str(b) for b in sorted(set(budgets)) if b < prefix_len]
    hits = {k: 0 for k in keys}
    total = 0
    for w, t in zip(windows, targets):
        ids = torch.tensor(np.array(w)).view(1, -1).long()
        W = policy.window if (policy.name == "snapkv" or policy.query_proxy == "last_query") else 0
        pre = prefill(drafter, ids[:, :prefix_len], chunk_size=prefill_chunk, capture_queries_window=W)
        for k in keys:
            cache = clone_cache(pre.cache) if k == "full" else compact_cache(pre.cache, int(k), policy, queries=pre.queries)
            h = forward_with_cache(drafter, cache, ids[:, prefix_len:], prefix_len, hidden_only=True)[0]
            for s in range(0, h.shape[0], chunk):
                logits = torch.nn.functional.linear(h[s:s + chunk], weight, bias)
                pred = logits.argmax(-1) if ids_of is None else ids_of[logits.argmax(-1)]
                hits[k] += int((pred == t.argmax[s:s + chunk]).sum())
        total += t.length
    if was_training:
        drafter.train()
    return {k: (hits[k] / total if total else float("nan")) for k in keys}


# ------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------


@dataclass
class LoopContext:
    """What differs between a Ray Train worker and a local run.

    Attributes:
        rank, world: data-parallel rank and world size.
        windows: ``skip -> iterator`` of window rows (``{"input_ids": int[P+T], ...}``, optionally
            offline teacher columns ``argmax``/``topk_ids``/``topk_logprobs``), after skipping
            ``skip`` rows (resume).
        eval_windows: held-out windows (the same on every rank).
        report: ``(metrics, checkpoint_dir | None) -> None``; called by every rank at the same steps.
        restore_dir: a checkpoint directory to resume from, or None.
        eval_targets: precomputed teacher argmax ``int[T]`` per held-out window (offline mode);
            None = computed here with the teacher.
        out_dir: where rank 0 writes metrics.json, the plot and the final export.
        tokenizer_path: copied next to exported weights (None = skip).
    """

    rank: int
    world: int
    windows: Callable[[int], Iterator[dict]]
    eval_windows: list[np.ndarray]
    report: Callable[[dict, str | None], None]
    restore_dir: str | None
    out_dir: str
    tokenizer_path: str | None = None
    log: Callable[[str], None] = print
    extra: dict = field(default_factory=dict)
    eval_targets: list | None = None


def _all_true(flag: bool, world: int) -> bool:
    if world <= 1 or not torch.distributed.is_initialized():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())


def _row_targets(row: dict) -> TeacherTargets | None:
    if "argmax" not in row:
        return None
    t = TeacherTargets(argmax=torch.tensor(np.array(row["argmax"])).long())
    if row.get("topk_ids") is not None and len(np.asarray(row["topk_ids"]).reshape(-1)):
        T = t.length
        t.topk_ids = torch.tensor(np.array(row["topk_ids"])).long().view(T, -1)
        t.topk_logprobs = torch.tensor(np.array(row["topk_logprobs"])).float().view(T, -1)
    return t


def _fmt_eta(sec: float) -> str:
    sec = int(max(0, sec))
    h, r = divmod(sec, 3600)
    m, s = divmod(r, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _export_hf(model: torch.nn.Module, d: str, tokenizer_path: str | None, draft_vocab=None) -> None:
    """HF ``save_pretrained`` of ``model`` (+ tokenizer, + ``draft_vocab.json`` when training with a
    draft vocabulary) as the directory ``d``, built next to it and renamed into place (never
    half-written)."""

    def build(tmp: str) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        if draft_vocab is not None:
            from bd_ray.draft_vocab import save_draft_vocab

            save_draft_vocab(draft_vocab, tmp)
        if tokenizer_path:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(tmp)

    replace_dir(d, build)


def train_loop(cfg: TrainJobConfig, ctx: LoopContext, teacher: torch.nn.Module | None, engine) -> dict:
    """Run optimizer steps ``[resume step, max_steps)`` (or until ``run.stop_after_steps``).

    Returns (on every rank) a summary dict: final step, skipped windows, last metrics, eval history,
    paths written (rank 0). Raises ``RuntimeError`` after 8 consecutive non-finite windows.
    """
    L, O, R = cfg.loss, cfg.optim, cfg.run
    P, T = cfg.data.prefix_len, cfg.data.continuation_len
    sampler = BudgetSampler(L.budgets, seed=O.seed, fixed=L.fixed_budget)
    eval_budgets = sorted(set(L.budgets) | ({L.fixed_budget} if L.fixed_budget else set()))
    qwin = queries_needed(L.policy)
    need_topk = L.top_k if (L.target != "hard" or L.lb_weight > 0) else 0
    draft_vocab = None
    if cfg.models.draft_vocab:
        from bd_ray.draft_vocab import load_draft_vocab

        draft_vocab = load_draft_vocab(cfg.models.draft_vocab)
    drafter = engine.module
    dev = next(drafter.parameters()).device

    state = {"step": 0, "consumed": 0, "skipped": 0, "history": [], "eval_history": [], "restores": []}
    if ctx.restore_dir:
        engine.load(ctx.restore_dir)
        with open(os.path.join(ctx.restore_dir, "state.json")) as f:
            state.update(json.load(f))
        state.pop("world", None)
        # Each restore is recorded (and kept in later checkpoints): what a failure cost is visible.
        state.setdefault("restores", []).append({"step": int(state["step"]), "from": ctx.restore_dir,
                                                 "pid": os.getpid(), "time": time.time()})
        ctx.log(f"[bd-ray] resumed from {ctx.restore_dir} at step {state['step']}")
    start_step = int(state["step"])
    windows = ctx.windows(int(state["consumed"]))

    # Teacher targets of the held-out windows: computed once (collective when the teacher is sharded).
    eval_targets = []
    if ctx.eval_windows and ctx.eval_targets is not None:
        if len(ctx.eval_targets) != len(ctx.eval_windows):
            raise ValueError(f"{len(ctx.eval_targets)} held-out targets for {len(ctx.eval_windows)} windows")
        eval_targets = [TeacherTargets(argmax=torch.tensor(np.array(a, dtype=np.int64)).view(-1))
                        for a in ctx.eval_targets]
    elif ctx.eval_windows:
        if teacher is None:
            raise ValueError("held-out windows without teacher targets and no teacher to compute them")
        for w in ctx.eval_windows:
            eval_targets.append(compute_teacher_targets(teacher, torch.tensor(np.array(w)), P, 0, L.prefill_chunk,
                                                        cfg.teacher.continuation_chunk))

    def do_eval(step: int) -> None:
        if ctx.rank == 0 and ctx.eval_windows:
            t0 = time.time()
            agree = evaluate_agreement(drafter, ctx.eval_windows, eval_targets, P, eval_budgets, L.policy,
                                       L.prefill_chunk, L.logits_chunk, draft_vocab=draft_vocab)
            state["eval_history"].append({"step": step, **{f"agree_{k}": v for k, v in agree.items()}})
            ctx.log(f"[bd-ray] eval step {step}: held-out top-1 agreement " +
                    " ".join(f"{k}={v:.3f}" for k, v in agree.items()) + f" ({time.time() - t0:.1f}s)")

    def checkpoint(step: int, metrics: dict) -> None:
        d = tempfile.mkdtemp(prefix="bd_ray_ckpt_")
        try:
            engine.save(d)
            if ctx.rank == 0:
                atomic_write_json(os.path.join(d, "state.json"), {**state, "step": step, "world": ctx.world})
                _export_hf(drafter, os.path.join(d, "hf"), ctx.tokenizer_path, draft_vocab)
            write_manifest(d, ctx.rank, ctx.world, step)  # last: seals this rank's files
            ctx.report(metrics, d)
        finally:
            shutil.rmtree(d, ignore_errors=True)

    if start_step == 0 and not state["eval_history"]:
        do_eval(0)
    stop_at = min(O.max_steps, R.stop_after_steps or O.max_steps)
    ema = None
    last: dict = {}
    for step in range(start_step, stop_at):
        t_step = time.time()
        t_teacher = t_student = 0.0
        acc = {"loss": 0.0, "l_a": 0.0, "l_c": 0.0, "l_b": 0.0, "agree": 0.0}
        budgets_used: list[int] = []
        for micro in range(O.grad_accum):
            micro_idx = step * O.grad_accum + micro
            budgets = [] if L.full_cache_only else sampler.sample(micro_idx, L.views_per_step)
            for attempt in range(9):
                row = next(windows)
                state["consumed"] += 1
                ids = torch.tensor(np.array(row["input_ids"])).view(1, -1).long().to(dev)
                if ids.shape[1] != P + T:
                    raise ValueError(f"window has {ids.shape[1]} tokens, config says prefix_len + "
                                     f"continuation_len = {P + T}")
                t0 = time.time()
                targets = _row_targets(row)
                if targets is not None and targets.length != T:
                    raise ValueError(f"offline targets hold {targets.length} positions, config says "
                                     f"continuation_len = {T}")
                if targets is not None and need_topk and targets.topk_ids is None:
                    raise ValueError(f"loss.target={L.target} needs top-k teacher log-probs; the offline "
                                     "targets hold argmax only (rerun jobs/teacher_targets.py with top_k > 0)")
                if targets is None:
                    if teacher is None:
                        raise ValueError("window row without teacher targets (no 'argmax' column) and no "
                                         "teacher: teacher.mode=offline needs jobs/teacher_targets.py output")
                    targets = compute_teacher_targets(
                        teacher, ids, P, need_topk, L.prefill_chunk, cfg.teacher.continuation_chunk,
                        sparse_budgets=budgets if L.lb_weight > 0 else (), policy=L.policy)
                targets = targets.to(dev)
                t1 = time.time()
                from bd_ray.kvcache import prefill

                with torch.no_grad():
                    pre = prefill(drafter, ids[:, :P], chunk_size=L.prefill_chunk, capture_queries_window=qwin)
                terms = budgetdraft_loss(drafter, pre.cache, ids[:, P:], P, targets, budgets, lam=L.lam,
                                         policy=L.policy, queries=pre.queries, kind=L.target,
                                         lb_weight=L.lb_weight, full_cache_only=L.full_cache_only,
                                         chunk=L.logits_chunk, draft_vocab=draft_vocab)
                ok = _all_true(bool(torch.isfinite(terms.loss.detach()).all()), ctx.world)
                if ok:
                    engine.backward(terms.loss)
                    engine.step()
                t_teacher += t1 - t0
                t_student += time.time() - t1
                if ok:
                    break
                state["skipped"] += 1
                ctx.log(f"[bd-ray] step {step + 1}: non-finite loss on some worker, window skipped "
                        f"(skipped so far: {state['skipped']})")
            else:
                raise RuntimeError(f"step {step + 1}: 9 consecutive non-finite windows; giving up "
                                   "(lower optim.lr or check the data)")
            for k, v in (("loss", float(terms.loss.detach())), ("l_a", terms.l_a), ("l_c", terms.l_c),
                         ("l_b", terms.l_b), ("agree", terms.agree_full)):
                acc[k] += v / O.grad_accum
            budgets_used += terms.budgets
        dt = time.time() - t_step
        ema = dt if ema is None else 0.9 * ema + 0.1 * dt
        tokens = O.grad_accum * ctx.world * (P + T)
        last = {"step": step + 1, **acc, "budgets": budgets_used, "lr": engine.get_lr(),
                "tokens_per_s": tokens / dt, "teacher_s": t_teacher, "student_s": t_student,
                "step_s": dt, "skipped": state["skipped"], "grad_norm": engine.last_grad_norm}
        state["history"].append(last)
        state["step"] = step + 1
        if ctx.rank == 0 and ((step + 1) % R.log_every == 0 or step + 1 == stop_at):
            ctx.log(f"step {step + 1}/{O.max_steps} loss {acc['loss']:.4f} L_A {acc['l_a']:.4f} "
                    f"L_C {acc['l_c']:.4f}" + (f" L_B {acc['l_b']:.4f}" if L.lb_weight else "") +
                    f" B={budgets_used or 'full'} agree {acc['agree']:.3f} lr {last['lr']:.2e} "
                    f"tok/s {last['tokens_per_s']:.0f} teacher {t_teacher:.2f}s student {t_student:.2f}s "
                    f"skipped {state['skipped']} eta {_fmt_eta(ema * (stop_at - step - 1))}")
        if (step + 1) % R.eval_every == 0 or step + 1 == O.max_steps:
            do_eval(step + 1)
        if (step + 1) % R.checkpoint_every == 0 or step + 1 == stop_at:
            metrics = {k: v for k, v in last.items() if k != "budgets"}
            if state["eval_history"]:
                metrics.update({k: v for k, v in state["eval_history"][-1].items() if k != "step"})
            checkpoint(step + 1, metrics)

    summary: dict[str, Any] = {"step": state["step"], "skipped": state["skipped"], "last": last,
                               "eval_history": state["eval_history"], "history": state["history"],
                               "restores": state["restores"], "finished": state["step"] >= O.max_steps}
    if ctx.rank == 0:
        os.makedirs(ctx.out_dir, exist_ok=True)
        mpath = os.path.join(ctx.out_dir, "metrics.json")
        atomic_write_json(mpath, {"config": cfg.model_dump(mode="json", by_alias=True), **summary, **ctx.extra},
                          indent=1)
        summary["metrics_path"] = mpath
        try:
            summary["plot_path"] = write_plot(state["history"], state["eval_history"],
                                              os.path.join(ctx.out_dir, "curves.png"), title=R.name)
        except Exception as exc:  # a plotting failure must not lose a finished run
            ctx.log(f"[bd-ray] plot failed: {exc!r}")
        if R.export and summary["finished"]:
            export = os.path.join(ctx.out_dir, "final")
            _export_hf(drafter, export, ctx.tokenizer_path, draft_vocab)
            summary["export_path"] = export
            ctx.log(f"[bd-ray] drafter exported to {export} (AutoModelForCausalLM.from_pretrained)")
    return summary


def write_plot(history: list[dict], eval_history: list[dict], path: str, title: str = "") -> str:
    """Loss curves (L, L_A, L_C per step) and held-out agreement per budget -> PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [h["step"] for h in history]
    for key, lab in (("loss", "L"), ("l_a", "L_A"), ("l_c", "L_C")):
        a.plot(steps, [h[key] for h in history], label=lab, lw=1)
    a.set_xlabel("optimizer step")
    a.set_ylabel("loss (nats/token)")
    a.legend()
    a.set_title(f"{title} losses")
    if eval_history:
        es = [e["step"] for e in eval_history]
        for key in [k for k in eval_history[0] if k.startswith("agree_")]:
            b.plot(es, [e.get(key, float("nan")) for e in eval_history], marker="o", label=key[6:])
        b.legend(title="drafter KV budget")
    b.set_xlabel("optimizer step")
    b.set_ylabel("held-out top-1 agreement with teacher")
    b.set_title("agreement (greedy alpha proxy)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------


def load_models(cfg: TrainJobConfig, verifier_path: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(teacher, drafter) on CPU in fp32: the verifier, and the drafter from a path or from the
    verifier's first ``models.drafter_layers`` layers (``bd_ray.models.init_drafter_from_verifier``).

    Raises:
        bd_ray.models.TokenizerMismatchError: a drafter path whose tokenizer differs from the verifier's.
    """
    from bd_ray import models

    teacher, tok = models.load_verifier(verifier_path, dtype=torch.float32)
    if cfg.models.drafter:
        # draft_vocab=None: training needs the full head (a subset is applied by the loss instead)
        drafter, _ = models.load_drafter(cfg.models.drafter, tok, dtype=torch.float32, verifier=teacher,
                                         draft_vocab=None)
    else:
        drafter = models.init_drafter_from_verifier(teacher, cfg.models.drafter_layers)
    drafter.requires_grad_(True)
    return teacher, drafter


def _teacher_dense_check(teacher_sharded, verifier_path: str, window: np.ndarray, P: int) -> float:
    from bd_ray import models

    dense, _ = models.load_verifier(verifier_path, dtype=torch.float32)
    _, a = compute_teacher_targets(teacher_sharded, torch.tensor(np.array(window)), P, return_logits=True)
    _, b = compute_teacher_targets(dense, torch.tensor(np.array(window)), P, return_logits=True)
    return float((a.float() - b.float()).abs().max())


# ------------------------------------------------------------------------------------------
# Ray Train worker
# ------------------------------------------------------------------------------------------


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point (one per worker). ``config``: ``cfg`` (TrainJobConfig dump),
    ``verifier_path``, ``eval_windows``, ``out_dir``, ``data_stats`` (optional)."""
    import ray.train

    from bd_ray.data import iter_rows

    cfg = TrainJobConfig.model_validate(config["cfg"])
    torch.set_num_threads(cfg.run.threads_per_worker)
    torch.manual_seed(cfg.optim.seed)
    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    distributed = world > 1 or torch.distributed.is_initialized()
    if distributed and cfg.deepspeed.enabled:
        import deepspeed

        _disable_deepspeed_shm_op()
        deepspeed.init_distributed("gloo")
    teacher_model, drafter = load_models(cfg, config["verifier_path"])
    engine = build_drafter_engine(cfg, drafter, distributed)
    eval_targets = config.get("eval_targets")
    offline = cfg.teacher.mode == "offline" and (eval_targets is not None or not config["eval_windows"])
    if offline:  # every target is precomputed: no teacher in the workers (memory, no ZeRO-3 collectives)
        teacher, _teacher_engine = None, None
        del teacher_model
    else:
        # ZeRO-3 over a single rank partitions nothing and only adds per-module gather hooks
        # (the 16 held-out teacher forwards of the distillation run took over twice as long); one
        # worker keeps a dense teacher.
        teacher, _teacher_engine = build_teacher(cfg, teacher_model, distributed and world > 1)
    extra: dict[str, Any] = {"world_size": world, "data_stats": config.get("data_stats"),
                             "teacher_mode": cfg.teacher.mode}
    if cfg.run.check_teacher_dense and teacher is not None:
        w = config["eval_windows"][0] if config["eval_windows"] else np.arange(cfg.data.window_len) % 7
        extra["teacher_dense_max_abs_diff"] = _teacher_dense_check(teacher, config["verifier_path"], w,
                                                                   cfg.data.prefix_len)
        if _teacher_engine is not None:
            extra["teacher_param_fraction_local"] = _local_param_fraction(teacher)

    shard = ray.train.get_dataset_shard("train")
    ckpt = ray.train.get_checkpoint()

    def report(metrics: dict, d: str | None) -> None:
        if d is None:
            ray.train.report(metrics)
        else:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    def run(restore_dir):
        ctx = LoopContext(rank=rank, world=world, windows=lambda skip: iter_rows(shard, skip=skip),
                          eval_windows=list(config["eval_windows"]), report=report, restore_dir=restore_dir,
                          out_dir=config["out_dir"], tokenizer_path=config["verifier_path"], extra=extra,
                          eval_targets=eval_targets)
        return train_loop(cfg, ctx, teacher, engine)

    if ckpt is not None:
        # The latest registered checkpoint, verified against its manifests; a damaged one is
        # replaced (with a warning) by the newest older intact checkpoint of the same run.
        with restorable_checkpoint_dir(ckpt, log=print) as d:
            # as_directory may hand out a temp copy; the loop reads everything it needs at its start
            summary = run(d)
    else:
        summary = run(None)
    if rank == 0:
        print(f"[bd-ray] worker 0 done: step {summary['step']}, skipped {summary['skipped']}", flush=True)


def _disable_deepspeed_shm_op() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory comm op on CPU (~2 min per fresh machine,
    docs/DESIGN.md sec 5): gloo collectives are enough for these engines."""
    try:
        import deepspeed.comm.torch as ds_torch

        ds_torch.build_shm_op = lambda: None
    except Exception:  # a DeepSpeed without that hook has nothing to disable
        pass


def _local_param_fraction(module: torch.nn.Module) -> float:
    """Fraction of the model's parameter elements held locally (ZeRO-3 partitions: ~1/world)."""
    local = full = 0
    for p in module.parameters():
        ds_t = getattr(p, "ds_tensor", None)
        n_full = int(getattr(p, "ds_numel", p.numel()))
        full += n_full
        local += int(ds_t.numel()) if ds_t is not None else p.numel()
    return local / max(1, full)


# ------------------------------------------------------------------------------------------
# Drivers
# ------------------------------------------------------------------------------------------


def _latest_local_checkpoint(root: str, log: Callable[[str], None] | None = None) -> str | None:
    """Newest intact ``root/step_*`` checkpoint (damaged ones skipped with a warning), or None."""
    return select_local_checkpoint(root, log=log)


def run_local(cfg: TrainJobConfig, windows: Iterable[dict] | Callable[[int], Iterator[dict]],
              teacher: torch.nn.Module, drafter: torch.nn.Module, eval_windows: list[np.ndarray] | None = None,
              out_dir: str | None = None, tokenizer_path: str | None = None, resume: bool | None = None,
              log: Callable[[str], None] = print, eval_targets: list | None = None) -> dict:
    """Single process, no Ray, no DeepSpeed: the same :func:`train_loop` with :class:`LocalEngine`.

    Checkpoints go to ``out_dir/checkpoints/step_XXXXXXX`` (the newest ``run.keep_checkpoints``);
    with ``resume`` (default ``run.resume``) the newest one is loaded first. ``windows``: a list /
    iterable of rows (re-iterated per epoch when it is a list) or ``skip -> iterator``.
    """
    out_dir = out_dir or os.path.join(cfg.run.output_dir, cfg.run.name)
    ck_root = os.path.join(out_dir, "checkpoints")
    resume = cfg.run.resume if resume is None else resume
    engine = build_drafter_engine(cfg, drafter, distributed=False)
    if teacher is not None:  # None: offline rows (with an ``argmax`` column) and eval_targets
        teacher, _ = build_teacher(cfg, teacher, distributed=False)

    if callable(windows):
        make = windows
    else:
        rows = list(windows)

        def make(skip: int) -> Iterator[dict]:
            def gen():
                i = 0
                while True:
                    for r in rows:
                        if i >= skip:
                            yield r
                        i += 1
            return gen()

    def report(metrics: dict, d: str | None) -> None:
        if d is None:
            return
        dest = os.path.join(ck_root, f"step_{metrics['step']:07d}")
        publish_dir(d, dest)  # copy to a temp sibling, fsync, rename: never half-written
        kept = sorted(x for x in os.listdir(ck_root) if x.startswith("step_") and ".tmp-" not in x)
        for old in kept[:-cfg.run.keep_checkpoints]:
            shutil.rmtree(os.path.join(ck_root, old), ignore_errors=True)

    ctx = LoopContext(rank=0, world=1, windows=make, eval_windows=list(eval_windows or []), report=report,
                      restore_dir=_latest_local_checkpoint(ck_root, log) if resume else None, out_dir=out_dir,
                      tokenizer_path=tokenizer_path, log=log, eval_targets=eval_targets)
    summary = train_loop(cfg, ctx, teacher, engine)
    summary["engine"] = engine
    return summary


def _ensure_ray(cfg: TrainJobConfig):
    from bd_ray.ray_connect import connect

    connect(cfg.run.ray_address, cfg.run.ray_num_cpus,
            {"OMP_NUM_THREADS": str(cfg.run.threads_per_worker), "TOKENIZERS_PARALLELISM": "false"})


def run_ray(cfg: TrainJobConfig, log: Callable[[str], None] = print,
            eval_windows_override: list[np.ndarray] | None = None) -> dict:
    """Driver: Ray Data windows + held-out windows, then a Ray Train ``TorchTrainer`` (gloo, DeepSpeed).

    Resumes from the latest checkpoint of the run ``run.name`` under ``run.output_dir`` (Ray Train
    restores a run with the same name and storage path); ``run.resume=false`` starts a new run name.
    Returns a summary: output paths, data counts, the final metrics and the Ray Train result path.
    ``eval_windows_override``: precomputed held-out windows (skips the held-out Ray Data pass).

    A worker that dies is replaced and resumes from the latest intact checkpoint up to
    ``run.max_failures`` times (Ray Train ``FailureConfig``); ``metrics.json`` lists the restores.

    Raises:
        bd_ray.models.TokenizerMismatchError, ModelCompatError: teacher/drafter/config mismatch,
            found before Ray starts (:func:`check_models_compatible`; offline targets made for
            other window lengths than ``data``'s).
        FileNotFoundError: no verifier at ``models.verifier``, or ``teacher.targets_path`` is not
            a finished jobs/teacher_targets.py output; also found before Ray starts.
        ray.train.TrainingFailedError: a worker failed more than ``run.max_failures`` times.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from bd_ray import models
    from bd_ray.data import build_window_dataset, eval_windows, offline_window_dataset

    # Everything that can be checked without Ray is checked here, in the driver, before any Ray
    # process starts: a mismatch is one clear error, not a crash inside a worker.
    verifier_path = str(models.resolve_model_path(cfg.models.verifier))
    cfg = absolute_local_paths(cfg)
    check_models_compatible(cfg, verifier_path)
    eval_targets = None
    if cfg.teacher.mode == "offline":
        from bd_ray.teacher_targets import read_manifest, read_target_rows

        man = read_manifest(cfg.teacher.targets_path)
        if (man["prefix_len"], man["continuation_len"]) != (cfg.data.prefix_len, cfg.data.continuation_len):
            raise ModelCompatError(
                f"teacher.targets_path={cfg.teacher.targets_path!r} holds targets for windows of "
                f"{man['prefix_len']} + {man['continuation_len']} tokens, but data.prefix_len + "
                f"data.continuation_len = {cfg.data.prefix_len} + {cfg.data.continuation_len}: set those to "
                f"match, or rerun jobs/teacher_targets.py with this data config")
    _ensure_ray(cfg)
    out_dir = os.path.abspath(os.path.join(cfg.run.output_dir, cfg.run.name))
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    if cfg.teacher.mode == "offline":
        train_ds, stats = offline_window_dataset(os.path.join(cfg.teacher.targets_path, "train"),
                                                 shuffle_seed=cfg.data.shuffle_seed), None
    else:
        train_ds, stats = build_window_dataset(cfg.data, verifier_path)
    if eval_windows_override is not None:
        evals = [np.asarray(w, dtype=np.int64) for w in eval_windows_override]
    elif cfg.teacher.mode == "offline" and man.get("eval_windows"):
        rows = read_target_rows(cfg.teacher.targets_path, "eval", limit=cfg.data.eval_windows)
        evals = [r["input_ids"].astype(np.int64) for r in rows]
        eval_targets = [r["argmax"].astype(np.int64) for r in rows]
    else:
        evals = eval_windows(cfg.data, verifier_path, stats=stats) if cfg.data.eval_windows else []
    log(f"[bd-ray] {len(evals)} held-out windows ({time.time() - t0:.1f}s); workers: {cfg.run.num_workers}")
    name = cfg.run.name if cfg.run.resume else f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json", by_alias=True), "verifier_path": verifier_path,
                           "eval_windows": evals, "eval_targets": eval_targets, "out_dir": out_dir},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.run.num_workers, use_gpu=cfg.run.use_gpu,
                                               resources_per_worker=cfg.run.worker_resources()),
        run_config=ray.train.RunConfig(
            name=name, storage_path=os.path.join(out_dir, "ray"),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures)),
        datasets={"train": train_ds},
        dataset_config=_ordered_data_config(),
    )
    result = trainer.fit()
    summary: dict[str, Any] = {"out_dir": out_dir, "ray_result_path": getattr(result, "path", None),
                               "checkpoint": getattr(result.checkpoint, "path", None) if result.checkpoint else None,
                               "metrics": result.metrics}
    if stats is not None:
        summary["data_stats"] = ray.get(stats.summary.remote())
        with open(os.path.join(out_dir, "data_stats.json"), "w") as f:
            json.dump(summary["data_stats"], f, indent=1)
        mpath = os.path.join(out_dir, "metrics.json")
        if os.path.exists(mpath):
            with open(mpath) as f:
                m = json.load(f)
            m["data_stats"] = summary["data_stats"]
            atomic_write_json(mpath, m, indent=1)
    return summary


def absolute_local_paths(cfg: TrainJobConfig) -> TrainJobConfig:
    """A copy of ``cfg`` whose relative local paths (``models.drafter``, ``models.draft_vocab``,
    ``teacher.targets_path``) are made absolute against the driver's working directory.

    Why: Ray Train runs the training function in a worker whose working directory is not the
    driver's, so ``runs/draft_vocab/x.json`` given on the command line would not be found there.
    Registered names (``smollm2-135m``), ``from-verifier:N`` and URIs (``s3://``) are left alone;
    so is a relative ``models.drafter`` that does not exist locally (it may be a registered name).
    """
    def local(path: str | None, must_exist: bool) -> str | None:
        if not path or "://" in path or os.path.isabs(path) or path.startswith("from-verifier:"):
            return path
        if must_exist or os.path.exists(path):
            return os.path.abspath(path)
        return path

    upd = cfg.model_copy(deep=True)
    upd.models.drafter = local(upd.models.drafter, must_exist=False)
    upd.models.draft_vocab = local(upd.models.draft_vocab, must_exist=True)
    if upd.teacher.targets_path:
        upd.teacher.targets_path = local(upd.teacher.targets_path, must_exist=True)
    return upd


def _ordered_data_config():
    """Ray Train ``DataConfig`` with Ray's default ingest options plus ``preserve_order``: windows
    reach a worker in the same order on every (re)start, so skipping the windows a checkpoint
    already consumed resumes exactly (with one worker; several workers get a deterministic
    stream but Ray's split of it across workers is not guaranteed to be the same)."""
    import ray.train

    opts = ray.train.DataConfig.default_ingest_options()
    opts.preserve_order = True
    return ray.train.DataConfig(execution_options=opts)


class ModelCompatError(ValueError):
    """The verifier (teacher), the drafter and the config do not fit together (positions, layers)."""


def check_models_compatible(cfg: TrainJobConfig, verifier_path: str) -> None:
    """Driver-side checks of the teacher/drafter pair against each other and the config, from the
    checkpoints' config and tokenizer files only (no weights, no Ray).

    Checks: the drafter's tokenizer equals the verifier's (vocabulary, id -> string map, special
    tokens, splitting; ``bd_ray.models.check_tokenizer_compat``) and so do the models' vocabulary
    sizes (``config.vocab_size``, the logits width); both models hold a window of
    ``data.prefix_len + data.continuation_len`` positions (``max_position_embeddings``); a drafter
    made from the verifier's first ``models.drafter_layers`` layers has that many layers to take.

    Raises:
        bd_ray.models.TokenizerMismatchError: tokenizers or vocabulary sizes differ.
        ModelCompatError: a window longer than a model's positions; too many drafter layers.
        FileNotFoundError: a model path that does not exist.
    """
    from transformers import AutoConfig

    from bd_ray import models

    window = cfg.data.window_len

    def text_config(path):
        return AutoConfig.from_pretrained(path, local_files_only=True).get_text_config()

    def positions(c, who: str, name: str) -> None:
        n = getattr(c, "max_position_embeddings", None)
        if n is not None and n < window:
            raise ModelCompatError(
                f"the {who} {name!r} has max_position_embeddings={n}, but a training window is "
                f"data.prefix_len + data.continuation_len = {cfg.data.prefix_len} + "
                f"{cfg.data.continuation_len} = {window} positions; shorten the window or use a "
                f"{who} with more positions")

    vcfg = text_config(verifier_path)
    positions(vcfg, "verifier (teacher)", cfg.models.verifier)
    n_layers = getattr(vcfg, "num_hidden_layers", None)
    from_verifier = models._FROM_VERIFIER.match(str(cfg.models.drafter or ""))  # noqa: SLF001
    if from_verifier:  # "from-verifier:N": the verifier's first N layers (same tokenizer and positions)
        if n_layers is not None and int(from_verifier.group(1)) > n_layers:
            raise ModelCompatError(f"models.drafter={cfg.models.drafter!r}, but the verifier "
                                   f"{cfg.models.verifier} has only {n_layers} layers to copy")
    elif cfg.models.drafter:
        dpath = models.resolve_model_path(cfg.models.drafter)
        dcfg = text_config(dpath)
        models.check_tokenizer_compat(models.load_tokenizer(verifier_path), models.load_tokenizer(dpath),
                                      verifier_vocab_size=getattr(vcfg, "vocab_size", None),
                                      drafter_vocab_size=getattr(dcfg, "vocab_size", None))
        positions(dcfg, "drafter", cfg.models.drafter)
    elif n_layers is not None and cfg.models.drafter_layers > n_layers:
        raise ModelCompatError(f"models.drafter_layers={cfg.models.drafter_layers}, but the verifier "
                               f"{cfg.models.verifier} has only {n_layers} layers to copy")
    if cfg.models.draft_vocab:
        from bd_ray.draft_vocab import load_draft_vocab

        try:
            dv = load_draft_vocab(cfg.models.draft_vocab)
        except (FileNotFoundError, ValueError, KeyError) as e:
            raise ModelCompatError(f"models.draft_vocab={cfg.models.draft_vocab!r} cannot be read: {e} "
                                   f"(make one with jobs/draft_vocab.py)") from e
        if getattr(vcfg, "vocab_size", None) is not None and dv.vocab_size != vcfg.vocab_size:
            raise ModelCompatError(f"models.draft_vocab={cfg.models.draft_vocab!r} is a subset of a "
                                   f"{dv.vocab_size}-token vocabulary, the verifier has {vcfg.vocab_size}")
