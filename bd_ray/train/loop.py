"""The training loop: optimizer steps over windows, non-finite skips, evals, checkpoints, outputs.

Source: the BudgetDraft recipe, docs/DESIGN.md section 2. One optimizer step, per worker::

    for each of grad_accum windows (prefix P + continuation T tokens):
        teacher targets   (offline row columns, or the frozen teacher: bd_ray.teacher)
        drafter prefill   (no grad: the prefix cache; no gradient through prefix KV)
        K budgets         (BudgetSampler, seeded by (seed, micro-step, rank): each worker its own)
        L = L_A + lambda L_C (+ L_B)           (bd_ray.losses, chunk-wise from hidden states)
        skip + count the window if L is not finite on any worker (all-reduced decision)
        engine.backward(L); engine.step()      (bd_ray.train.engines)
    every rank's loss and budgets gathered into rank 0's history (rank_losses, rank_budgets)

:func:`train_loop` is the same in a Ray Train worker and in one process; what differs (data
source, checkpoint hand-off, rank) comes in a :class:`LoopContext` (bd_ray.train.driver).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch

from bd_ray.checkpoints import write_manifest
from bd_ray.store import atomic_write_json
from bd_ray.config.train import TrainJobConfig
from bd_ray.device import as_device, resolve_precision
from bd_ray.draft_vocab import load_draft_vocab
from bd_ray.kvcache import prefill
from bd_ray.losses import BudgetSampler, TeacherTargets, budgetdraft_loss
from bd_ray.sparse import queries_needed
from bd_ray.teacher import compute_teacher_targets
from bd_ray.teacher_targets import row_targets
from bd_ray.train.agreement import evaluate_agreement
from bd_ray.train.export import export_hf, write_plot

__all__ = ["LoopContext", "train_loop", "MAX_WINDOW_TRIES"]

MAX_WINDOW_TRIES = 9  # windows tried per micro-step before a run of non-finite losses aborts it


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
        device: where the drafter (the engine's module), every batch, target and collective live;
            the engine must have placed the drafter there (bd_ray.train.engines.build_drafter_engine).
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
    device: torch.device | str = "cpu"


def _all_true(flag: bool, world: int, device: torch.device | str | None = None) -> bool:
    """``flag`` AND-ed over all ranks (one all-reduce of a tensor on ``device``, as NCCL requires on
    CUDA; the local value with one rank)."""
    if world <= 1 or not torch.distributed.is_initialized():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=as_device(device))
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())


def _gather_ranks(loss: float, budgets: list[int], world: int,
                  device: torch.device | str | None = None) -> tuple[list[float], list[list[int]]]:
    """Every rank's step loss and sampled budgets, in rank order (one all-gather of a float64
    tensor on ``device``: exact for fp32 losses and integer budgets; NCCL needs it on the GPU).
    Every rank draws the same number of budgets per step, so the rows have one length."""
    if world <= 1 or not torch.distributed.is_initialized():
        return [loss], [list(budgets)]
    mine = torch.tensor([loss, *budgets], dtype=torch.float64, device=as_device(device))
    rows = [torch.empty_like(mine) for _ in range(world)]
    torch.distributed.all_gather(rows, mine)
    rows = [r.cpu().tolist() for r in rows]
    return [r[0] for r in rows], [[int(b) for b in r[1:]] for r in rows]


def _fmt_eta(sec: float) -> str:
    sec = int(max(0, sec))
    h, r = divmod(sec, 3600)
    m, s = divmod(r, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _restore(ctx: LoopContext, engine) -> dict:
    """The loop state: fresh, or read from ``ctx.restore_dir`` (engine loaded, the restore recorded)."""
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
    return state


def _held_out_targets(cfg: TrainJobConfig, ctx: LoopContext, teacher, teacher_precision: str) -> list[TeacherTargets]:
    """Teacher targets of the held-out windows: given (offline) or computed once with the teacher on
    ``ctx.device`` (collective when the teacher is sharded)."""
    if not ctx.eval_windows:
        return []
    if ctx.eval_targets is not None:
        if len(ctx.eval_targets) != len(ctx.eval_windows):
            raise ValueError(f"{len(ctx.eval_targets)} held-out targets for {len(ctx.eval_windows)} windows")
        return [TeacherTargets(argmax=torch.tensor(np.array(a, dtype=np.int64), device=ctx.device).view(-1))
                for a in ctx.eval_targets]
    if teacher is None:
        raise ValueError("held-out windows without teacher targets and no teacher to compute them")
    return [compute_teacher_targets(teacher, torch.tensor(np.array(w), device=ctx.device), cfg.data.prefix_len, 0,
                                    cfg.loss.prefill_chunk, cfg.teacher.continuation_chunk,
                                    precision=teacher_precision, device=ctx.device)
            for w in ctx.eval_windows]


def _row_ids(row: dict, device: torch.device) -> torch.Tensor:
    """``[1, P+T]`` long ids of a row on ``device`` (a materialised row's tensor is used as it is)."""
    x = row["input_ids"]
    if torch.is_tensor(x):
        return x.view(1, -1).long().to(device)
    return torch.tensor(np.array(x), device=device).view(1, -1).long()


def _window_targets(cfg: TrainJobConfig, row: dict, ids: torch.Tensor, teacher, need_topk: int,
                    budgets: list[int], teacher_precision: str) -> TeacherTargets:
    """Targets of one window: the row's offline columns (checked against the config), else the
    teacher's (on the ids' device)."""
    L, P, T = cfg.loss, cfg.data.prefix_len, cfg.data.continuation_len
    if ids.shape[1] != P + T:
        raise ValueError(f"window has {ids.shape[1]} tokens, config says prefix_len + "
                         f"continuation_len = {P + T}")
    targets = row_targets(row, ids.device)
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
            sparse_budgets=budgets if L.lb_weight > 0 else (), policy=L.policy, precision=teacher_precision)
    return targets


def train_loop(cfg: TrainJobConfig, ctx: LoopContext, teacher: torch.nn.Module | None, engine) -> dict:
    """Run optimizer steps ``[resume step, max_steps)`` (or until ``run.stop_after_steps``).

    ``teacher``: the frozen teacher (bd_ray.teacher.build_teacher) on ``ctx.device``, or None when
    every row and held-out window comes with offline targets. ``engine``: bd_ray.train.engines, its
    drafter on ``ctx.device``; the drafter's forwards run under ``engine.autocast()``.

    Returns (on every rank) a summary dict: final step, skipped windows, last metrics, eval history,
    paths written (rank 0).

    Raises:
        RuntimeError: ``MAX_WINDOW_TRIES`` consecutive non-finite windows in one micro-step.
        ValueError: a window or its offline targets do not match ``data``/``loss``; no targets and
            no teacher; the drafter is not on ``ctx.device``.
    """
    L, O, R = cfg.loss, cfg.optim, cfg.run
    P, T = cfg.data.prefix_len, cfg.data.continuation_len
    sampler = BudgetSampler(L.budgets, seed=O.seed, fixed=L.fixed_budget)
    # A ZeRO-3 teacher's forwards are collective: for L_B every rank computes the sparse targets of
    # the union of all ranks' budgets, so each runs the same forwards (its own are among them).
    teacher_lockstep = (L.lb_weight > 0 and ctx.world > 1 and cfg.deepspeed.enabled
                        and cfg.deepspeed.teacher_shard != "none")
    eval_budgets = sorted(set(L.budgets) | ({L.fixed_budget} if L.fixed_budget else set()))
    qwin = queries_needed(L.policy)
    need_topk = L.top_k if (L.target != "hard" or L.lb_weight > 0) else 0
    draft_vocab = load_draft_vocab(cfg.models.draft_vocab) if cfg.models.draft_vocab else None
    drafter = engine.module
    dev = as_device(ctx.device)
    on = {p.device for p in drafter.parameters()}
    if on != {dev} and not (dev.index is None and {d.type for d in on} == {dev.type}):
        raise ValueError(f"the drafter's parameters are on {sorted(map(str, on))}, the loop's device is {dev}")
    teacher_precision = resolve_precision(cfg.teacher.precision, dev, "teacher.precision")
    notes = ({"freeze_embedding": True, "embedding": f"the verifier's ({cfg.models.verifier}), not trained"}
             if cfg.models.freeze_embedding else None)

    state = _restore(ctx, engine)
    start_step = int(state["step"])
    windows = ctx.windows(int(state["consumed"]))
    eval_targets = _held_out_targets(cfg, ctx, teacher, teacher_precision)

    def do_eval(step: int) -> None:
        if ctx.rank == 0 and ctx.eval_windows:
            t0 = time.time()
            agree = evaluate_agreement(drafter, ctx.eval_windows, eval_targets, P, eval_budgets, L.policy,
                                       L.prefill_chunk, L.logits_chunk, draft_vocab=draft_vocab, device=dev,
                                       batch=R.eval_batch, precision=engine.precision)
            state["eval_history"].append({"step": step, **{f"agree_{k}": v for k, v in agree.items()}})
            ctx.log(f"[bd-ray] eval step {step}: held-out top-1 agreement " +
                    " ".join(f"{k}={v:.3f}" for k, v in agree.items()) + f" ({time.time() - t0:.1f}s)")

    def checkpoint(step: int, metrics: dict) -> None:
        d = tempfile.mkdtemp(prefix="bd_ray_ckpt_")
        try:
            engine.save(d)
            if ctx.rank == 0:
                atomic_write_json(os.path.join(d, "state.json"), {**state, "step": step, "world": ctx.world})
                export_hf(drafter, os.path.join(d, "hf"), ctx.tokenizer_path, draft_vocab, notes)
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
            budgets = [] if L.full_cache_only else sampler.sample(micro_idx, L.views_per_step, ctx.rank)
            teacher_budgets = (sampler.sample_all_ranks(micro_idx, L.views_per_step, ctx.world)
                               if teacher_lockstep and budgets else budgets)
            for _attempt in range(MAX_WINDOW_TRIES):
                row = next(windows)
                state["consumed"] += 1
                ids = _row_ids(row, dev)
                t0 = time.time()
                targets = _window_targets(cfg, row, ids, teacher, need_topk, teacher_budgets, teacher_precision).to(dev)
                t1 = time.time()
                with engine.autocast():
                    with torch.no_grad():
                        pre = prefill(drafter, ids[:, :P], chunk_size=L.prefill_chunk, capture_queries_window=qwin)
                    terms = budgetdraft_loss(drafter, pre.cache, ids[:, P:], P, targets, budgets, lam=L.lam,
                                             policy=L.policy, queries=pre.queries, kind=L.target,
                                             lb_weight=L.lb_weight, full_cache_only=L.full_cache_only,
                                             chunk=L.logits_chunk, draft_vocab=draft_vocab)
                ok = _all_true(bool(torch.isfinite(terms.loss.detach()).all()), ctx.world, dev)
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
                raise RuntimeError(f"step {step + 1}: {MAX_WINDOW_TRIES} consecutive non-finite windows; giving up "
                                   "(lower optim.lr or check the data)")
            for k, v in (("loss", float(terms.loss.detach())), ("l_a", terms.l_a), ("l_c", terms.l_c),
                         ("l_b", terms.l_b), ("agree", terms.agree_full)):
                acc[k] += v / O.grad_accum
            budgets_used += terms.budgets
        dt = time.time() - t_step
        ema = dt if ema is None else 0.9 * ema + 0.1 * dt
        tokens = O.grad_accum * ctx.world * (P + T)
        rank_losses, rank_budgets = _gather_ranks(acc["loss"], budgets_used, ctx.world, dev)
        last = {"step": step + 1, **acc, "budgets": budgets_used, "rank_losses": rank_losses,
                "rank_budgets": rank_budgets, "lr": engine.get_lr(),
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
            metrics = {k: v for k, v in last.items() if k not in ("budgets", "rank_budgets")}
            if state["eval_history"]:
                metrics.update({k: v for k, v in state["eval_history"][-1].items() if k != "step"})
            checkpoint(step + 1, metrics)

    summary: dict[str, Any] = {"step": state["step"], "skipped": state["skipped"], "last": last,
                               "eval_history": state["eval_history"], "history": state["history"],
                               "restores": state["restores"], "finished": state["step"] >= O.max_steps}
    if ctx.rank == 0:
        _write_outputs(cfg, ctx, summary, drafter, draft_vocab, notes)
    return summary


def _write_outputs(cfg: TrainJobConfig, ctx: LoopContext, summary: dict, drafter: torch.nn.Module,
                   draft_vocab, notes: dict | None) -> None:
    """Rank 0 at the end: ``metrics.json``, ``curves.png`` and (finished runs) the ``final/`` export;
    their paths are added to ``summary``."""
    os.makedirs(ctx.out_dir, exist_ok=True)
    mpath = os.path.join(ctx.out_dir, "metrics.json")
    atomic_write_json(mpath, {"config": cfg.model_dump(mode="json", by_alias=True), **summary, **ctx.extra},
                      indent=1)
    summary["metrics_path"] = mpath
    try:
        summary["plot_path"] = write_plot(summary["history"], summary["eval_history"],
                                          os.path.join(ctx.out_dir, "curves.png"), title=cfg.run.name)
    except Exception as exc:  # a plotting failure must not lose a finished run
        ctx.log(f"[bd-ray] plot failed: {exc!r}")
    if cfg.run.export and summary["finished"]:
        export = os.path.join(ctx.out_dir, "final")
        export_hf(drafter, export, ctx.tokenizer_path, draft_vocab, notes)
        summary["export_path"] = export
        ctx.log(f"[bd-ray] drafter exported to {export} (AutoModelForCausalLM.from_pretrained)")
