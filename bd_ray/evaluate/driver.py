"""The evaluation driver: picks the prompts, runs every measurement (locally or on Ray worker
actors), journals them, aggregates and writes the outputs (:func:`run_evaluation`).

Isolation of timings on Ray: with ``run.worker_cpus: node`` (the default) each worker reserves
*all* logical CPUs of its node (pinned with a node-affinity strategy), so no two workers, and no
other Ray task, run on one node while it measures, and a worker runs one item at a time; all items
of a prompt go to the same worker (prompt ``i`` -> worker ``i mod W``) in submission order, so the
prefills are shared. With GPUs set ``worker_gpus: 1`` and a numeric ``worker_cpus``.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from bd_ray.config import ConfigError
from bd_ray.config.evaluate import EvalJobConfig
from bd_ray.evaluate.aggregate import (aggregate_cells, best_gammas, greedy_agreement, lossless_mode,
                                      lossless_report, needle_report)
from bd_ray.evaluate.items import build_items, item_key
from bd_ray.evaluate.journal import Journal
from bd_ray.evaluate.progress import Progress
from bd_ray.evaluate.prompts import check_held_out, corpus_table, make_needle_prompt, select_prompts
from bd_ray.evaluate.report import write_outputs
from bd_ray.evaluate.worker import EvalWorker
from bd_ray.models import drafter_paths, load_tokenizer, resolve_model_path
from bd_ray.ray_connect import connect

__all__ = ["SCHEMA_VERSION", "LosslessError", "EvalItemError", "run_evaluation"]

SCHEMA_VERSION = 1


class LosslessError(RuntimeError):
    """Greedy SD output differs from AR output; the message names every failing cell and prompt."""


class EvalItemError(RuntimeError):
    """Some measurements raised; the message names them (the outputs are still written)."""


def _driver_info() -> dict:
    import transformers

    info = {"host": socket.gethostname(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda_available": torch.cuda.is_available()}
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        pass
    return info


def _check_models(cfg: EvalJobConfig):
    """Fail fast with a config error naming the field: missing drafter paths, context too long."""
    from transformers import AutoConfig

    vpath = resolve_model_path(cfg.models.verifier)
    vcfg = AutoConfig.from_pretrained(vpath, local_files_only=True)
    limit = getattr(vcfg, "max_position_embeddings", None)
    longest = max(cfg.matrix.contexts)
    if limit is not None and longest + max(cfg.matrix.max_new_tokens, cfg.needle.max_new_tokens) > limit:
        raise ConfigError(f"matrix.contexts: {longest} + max_new_tokens exceeds the verifier's {limit} positions")
    for name, src in cfg.models.drafters.items():
        if str(src).startswith("from-verifier:"):
            n = str(src).split(":", 1)[1]
            layers = getattr(vcfg, "num_hidden_layers", None)
            if not n.isdigit() or int(n) < 1 or (layers is not None and int(n) > layers):
                raise ConfigError(f"models.drafters.{name}: {src!r} needs 1 <= N <= {layers}")
        else:
            try:
                drafter_paths(src)  # a checkpoint directory or a shipped drafter (verified)
            except FileNotFoundError:
                raise ConfigError(f"models.drafters.{name}: {src!r} is neither a checkpoint directory nor a "
                                  f"shipped drafter (train one with jobs/train_drafter.py, ship it with "
                                  f"jobs/ship_drafter.py, or use from-verifier:N)") from None
    return vpath


def _isolation(cfg: EvalJobConfig, n_workers: int) -> str:
    r = cfg.run
    if r.executor == "local":
        return "local executor: one process, measurements strictly sequential"
    if n_workers == 0:
        return "no worker started in this run: every measurement comes from the journal"
    cpus = "all CPUs of its node" if r.worker_cpus == "node" else f"{r.worker_cpus} CPUs"
    return (f"{n_workers} Ray worker actor(s), each reserving {cpus}"
            + (f" and {r.worker_gpus} GPU(s)" if r.worker_gpus else "")
            + "; one measurement at a time per worker; all items of a prompt on one worker (prefills shared)"
            + ("; no two workers share a node" if r.worker_cpus == "node" else ""))


def _ensure_ray(cfg: EvalJobConfig):
    connect(cfg.run.ray_address, cfg.run.ray_num_cpus, {"TOKENIZERS_PARALLELISM": "false"})


def _start_workers(cfg: EvalJobConfig, n_groups: int, log: Callable[[str], None]) -> list:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    r = cfg.run
    nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
    if r.worker_gpus > 0:
        nodes = [n for n in nodes if n["Resources"].get("GPU", 0) >= r.worker_gpus]
        if not nodes:
            raise ConfigError(f"run.worker_gpus={r.worker_gpus}: no alive node has that many GPUs")
    if r.worker_cpus == "node":
        n = len(nodes) if r.num_workers == "auto" else int(r.num_workers)
        if n > len(nodes):
            raise ConfigError(f"run.num_workers={n} with run.worker_cpus=node needs {n} nodes; the cluster has "
                              f"{len(nodes)}")
    else:
        total = sum(nd["Resources"].get("CPU", 0) for nd in nodes)
        n = len(nodes) if r.num_workers == "auto" else int(r.num_workers)
        if float(r.worker_cpus) > max(nd["Resources"].get("CPU", 0) for nd in nodes):
            raise ConfigError(f"run.worker_cpus={r.worker_cpus} exceeds every node's CPUs (total {total})")
    n = max(1, min(n, n_groups))
    cfg_dict = cfg.model_dump(mode="json")
    Actor = ray.remote(EvalWorker)
    workers = []
    for i in range(n):
        if r.worker_cpus == "node":
            node = nodes[i]
            cpus = float(node["Resources"]["CPU"])
            opts = {"num_cpus": cpus, "scheduling_strategy": NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)}
        else:
            cpus = float(r.worker_cpus)
            opts = {"num_cpus": cpus}
        if r.worker_gpus:
            opts["num_gpus"] = r.worker_gpus
        threads = r.torch_threads or max(1, int(cpus))
        workers.append(Actor.options(max_restarts=0, **opts).remote(cfg_dict, threads))
        log(f"[bd-ray] worker {i}: {opts.get('num_cpus')} CPUs, {r.worker_gpus} GPUs, {threads} torch threads")
    return workers


def run_evaluation(cfg: EvalJobConfig, log: Callable[[str], None] = print,
                   output_dir: str | Path | None = None, merge_journals: Sequence[str | Path] = (),
                   report_only: bool = False) -> dict:
    """Run the whole matrix and write the outputs; returns ``{"results": dict, "paths": dict}``.

    Args:
        cfg: the validated job config.
        log: where progress lines go (one per measurement, one per completed cell).
        output_dir: overrides ``cfg.run.output_dir``.
        merge_journals: output directories of runs of part of the same matrix (same config, e.g.
            one context per process or machine); their measurements are appended to this run's
            journal first and reused, so only what none of them measured is run.
        report_only: measure nothing: write the outputs from the journaled measurements (a snapshot
            of a matrix still being measured); cells report the prompts they have, ``missing`` counts
            the rest.

    Raises:
        ConfigError: a drafter path that does not exist, contexts beyond the verifier's positions.
        bd_ray.evaluate.prompts.HeldOutError: the corpus would leak training works into prompts.
        TimeoutError: nothing finished within ``run.item_timeout_s``.
        LosslessError: greedy SD differed from AR with fp32 models (raised after the outputs are
            written; bf16/fp16 runs report agreement instead, never this error).
        EvalItemError: some measurement raised (raised after the outputs are written).
    """
    t_start = time.perf_counter()
    out_dir = Path(output_dir or cfg.run.output_dir)
    vpath = _check_models(cfg)
    tok = load_tokenizer(vpath)
    table = corpus_table(cfg)
    t = time.perf_counter()
    memo: dict = {}
    prompts = select_prompts(table, tok, cfg.matrix.contexts, cfg.data.prompts_per_context, cfg.data.seed, memo)
    needles = {}
    if cfg.needle.enabled:
        for ctx in cfg.matrix.contexts:
            needles[ctx] = make_needle_prompt(table, tok, ctx, cfg.needle.depth, cfg.needle.digits,
                                              cfg.needle.seed, memo)
    check_held_out([p for ps in prompts.values() for p in ps] + list(needles.values()))
    items = build_items(cfg, prompts, needles)
    groups = list(dict.fromkeys(it["group"] for it in items))
    log(f"[bd-ray] {sum(len(v) for v in prompts.values())} held-out prompts ({time.perf_counter() - t:.1f}s), "
        f"{len({it['cell_id'] for it in items if it['kind'] == 'sd'})} cells, {len(items)} measurements")

    runs: list[dict] = []
    errors: list[dict] = []
    journal = Journal(out_dir, cfg)
    for other in merge_journals:
        added, present = journal.merge_from(other)
        log(f"[bd-ray] merged {added} measurements from {other} ({present} already in {journal.path})")
    done = journal.load()                      # always: also repairs a torn last line
    if not cfg.run.resume:
        done = {}
    keys = [item_key(it) for it in items]      # hashes each prompt's tokens once
    if done:
        log(f"[bd-ray] resuming: {sum(1 for k in keys if k in done)} of {len(items)} measurements "
            f"reused from {journal.path}")
    progress = Progress(items, log)
    for it, k in zip(items, keys):   # journaled records first, so AR records are there for the lossless check
        if k in done:
            runs.append(done[k])
            progress.reused(it, done[k])
    items_left = [it for it, k in zip(items, keys) if k not in done]
    missing = 0
    if report_only:
        missing, items_left = len(items_left), []
        log(f"[bd-ray] report only: {len(items) - missing} of {len(items)} measurements journaled, "
            f"{missing} left out")

    exact = lossless_mode(cfg.models.dtype) == "exact"

    def finish(item: dict, rec: dict) -> None:
        if item["kind"].startswith("needle"):
            rec.update({"passkey": item["prompt"]["needle"]["passkey"], "depth": item["prompt"]["needle"]["depth"]})
        runs.append(rec)
        if "error" not in rec:
            journal.append(item, rec)
        progress.update(item, rec)
        if item["kind"] in ("sd", "needle_sd") and "error" not in rec and rec["greedy"]:
            a = progress.ar.get(rec)
            if a is not None and a["token_ids"] != rec["token_ids"]:
                if exact:
                    log(f"!!! LOSSLESS FAILURE: cell {rec['cell_id']} prompt {rec['prompt_id']}: greedy SD tokens "
                        f"differ from AR")
                else:
                    g = greedy_agreement(a["token_ids"], rec["token_ids"])
                    log(f"[bd-ray] {cfg.models.dtype}: cell {rec['cell_id']} prompt {rec['prompt_id']}: greedy SD "
                        f"diverges from AR at token {g['first_divergence']} (agreement {g['agreement']:.3f}; "
                        f"reported, not a failure below fp32)")

    def failed(item: dict, exc: BaseException) -> dict:
        desc = f"{item['kind']} {item['prompt']['prompt_id']} {item.get('cell_id', item['mode']['name'])}"
        errors.append({"item": desc, "error": f"{type(exc).__name__}: {exc}"})
        return {"kind": item["kind"], "prompt_id": item["prompt"]["prompt_id"], "mode": item["mode"]["name"],
                "cell_id": item.get("cell_id"), "error": f"{type(exc).__name__}: {exc}"}

    workers_info: list[dict] = []
    if not items_left:
        pass                       # everything journaled (or report only): no models to load
    elif cfg.run.executor == "local":
        if cfg.run.torch_threads:
            torch.set_num_threads(cfg.run.torch_threads)
        w = EvalWorker(cfg.model_dump(mode="json"))
        workers_info = [w.info()]
        for it in items_left:
            try:
                rec = w.run(it)
            except Exception as exc:  # noqa: BLE001 - recorded, job fails at the end
                rec = failed(it, exc)
            finish(it, rec)
    else:
        import ray

        _ensure_ray(cfg)
        workers = _start_workers(cfg, len(groups), log)
        workers_info = ray.get([w.info.remote() for w in workers], timeout=cfg.run.item_timeout_s)
        for i, wi in enumerate(workers_info):
            log(f"[bd-ray] worker {i} on {wi['host']}: device {wi['device']}, models loaded in {wi['model_load_s']:.1f}s")
        gidx = {g: i for i, g in enumerate(groups)}
        pending = {}
        for it in items_left:
            pending[workers[gidx[it["group"]] % len(workers)].run.remote(it)] = it
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=cfg.run.item_timeout_s)
                if not ready:
                    raise TimeoutError(f"no measurement finished in {cfg.run.item_timeout_s:.0f}s (run.item_timeout_s); "
                                       f"{len(pending)} pending")
                it = pending.pop(ready[0])
                try:
                    rec = ray.get(ready[0])
                except Exception as exc:  # noqa: BLE001 - RayTaskError / RayActorError, recorded
                    rec = failed(it, exc)
                finish(it, rec)
        finally:
            for w in workers:
                ray.kill(w)

    key = {(it["kind"], it["prompt"]["prompt_id"], it["mode"]["name"], it.get("cell_id")): i for i, it in enumerate(items)}
    runs.sort(key=lambda r: key.get((r["kind"], r["prompt_id"], r["mode"], r.get("cell_id")), 0))
    cells = aggregate_cells(runs, cfg)
    lossless = lossless_report(runs, cfg.models.dtype)
    failures = lossless["failures"]
    all_prompts = [p.meta() for ps in prompts.values() for p in ps] + [p.meta() for p in needles.values()]
    results = {
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "config": cfg.model_dump(mode="json"),
        "machine": {"driver": _driver_info(), "workers": workers_info},
        "isolation": _isolation(cfg, len(workers_info)),
        "prompts": all_prompts,
        "cells": cells,
        "best_gamma": best_gammas(cells),
        "needle": needle_report(runs, cells) if needles else None,
        "lossless": lossless,
        "errors": errors,
        "runs": runs,
        "wall_s": time.perf_counter() - t_start,
        "missing": missing,
    }
    paths = write_outputs(results, out_dir, plots=cfg.report.plots, alpha_gamma=cfg.alpha_gamma)
    if failures:
        lines = [f"  cell {f['cell_id']} prompt {f['prompt_id']}: first difference at generated token "
                 f"{f['first_difference']} (AR {f['ar_tokens']} vs SD {f['sd_tokens']})" for f in failures]
        raise LosslessError(f"greedy speculative output differs from plain decoding in {len(failures)} run(s) "
                            f"(outputs written to {paths['json']}):\n" + "\n".join(lines))
    if errors:
        raise EvalItemError(f"{len(errors)} measurement(s) failed (outputs written to {paths['json']}):\n"
                            + "\n".join(f"  {e['item']}: {e['error'].splitlines()[0]}" for e in errors))
    return {"results": results, "paths": paths}
