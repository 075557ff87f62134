#!/usr/bin/env python
r"""Trained tokens per second of the distillation stage with each training-speed lever on and off.

The shapes of jobs/configs/pg_mini_distill_512.yaml: prefix 16 + continuation 496 tokens per window,
a 4-layer drafter made from the embedded SmolLM2 verifier, the 8K draft vocabulary, L_A only. Every
variant runs the real training loop (bd_ray.train.loop.train_loop) in this process on the same
windows; checkpoint writes and end-of-run outputs are switched off (they are not per-step costs).

Variants (interleaved: round 1 of every variant, then round 2, ... so drift hits all alike):

    old      DeepSpeed ZeRO-2 engine, fp32, online teacher, trained embedding (the old default)
    fast     local engine, optim/teacher precision auto, offline targets, frozen embedding
    fast-X   fast with one lever X switched back: fp32 | trained-emb | full-head | online | deepspeed

Printed: tokens/s per variant (mean over rounds of the timed steps, after ``--warmup`` steps per
round) and the ratio to ``old``. Offline targets are computed once before timing (that one-off
cost per window is printed too: a run over E epochs pays it once, not E times).

    python benchmarks/train_throughput.py                     # the lead's measurement (idle machine)
    python benchmarks/train_throughput.py --rounds 1 --steps 1 --warmup 1 --continuation 128  # smoke

``auto`` is bf16 only where the device has fast bf16 (bd_ray.device.fast_bf16); the resolved
precision is printed, so a run on an AVX2-only machine shows fp32 for the fast variants.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

VARIANTS = ["old", "fast", "fast-fp32", "fast-trained-emb", "fast-full-head", "fast-online", "fast-deepspeed"]


def _cfg(variant: str, args):
    from bd_ray.config.train import TrainJobConfig

    fast = variant != "old"
    off = variant[5:] if variant.startswith("fast-") else ""
    deepspeed = not fast or off == "deepspeed"
    prec = "auto" if fast and off != "fp32" else "fp32"
    return TrainJobConfig.model_validate({
        "models": {"drafter_layers": args.layers, "freeze_embedding": fast and off != "trained-emb",
                   "draft_vocab": None if off == "full-head" else args.draft_vocab},
        "data": {"prefix_len": args.prefix, "continuation_len": args.continuation, "eval_windows": 0},
        "loss": {"full_cache_only": True, "budgets": {128: 1.0}, "logits_chunk": 128, "prefill_chunk": 512,
                 "policy": {"name": "chunk_topk", "chunk_size": 8, "recent": 64}},
        "optim": {"lr": 3e-4, "warmup_steps": 1, "max_steps": 10_000, "precision": prec,
                  "seed": 42},
        "deepspeed": {"enabled": deepspeed, "zero_stage": 2, "teacher_shard": "none"},
        "teacher": {"mode": "online" if (not fast or off == "online") else "offline",
                    "targets_path": "offline-in-memory", "precision": prec},
        "run": {"eval_every": 1_000_000, "checkpoint_every": 1_000_000, "log_every": 1_000_000, "export": False,
                "threads_per_worker": args.threads},
    })


def _init_dist() -> None:
    """One-rank gloo process group, so DeepSpeed engines can be built in this process."""
    if torch.distributed.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
    import deepspeed

    from bd_ray.device import dist_backend
    from bd_ray.train.engines import disable_deepspeed_shm_op

    disable_deepspeed_shm_op()
    deepspeed.init_distributed(dist_backend("cpu"))


def _time_variant(variant, args, teacher, rows, device) -> tuple[float, str]:
    """Tokens/s of ``args.steps`` timed steps after ``args.warmup`` (fresh drafter and engine)."""
    import bd_ray.train.loop as loop_mod
    from bd_ray.models import init_drafter_from_verifier
    from bd_ray.train.engines import build_drafter_engine

    cfg = _cfg(variant, args)
    torch.manual_seed(cfg.optim.seed)
    drafter = init_drafter_from_verifier(teacher, cfg.models.drafter_layers)
    engine = build_drafter_engine(cfg, drafter, distributed=cfg.deepspeed.enabled, device=device)
    engine.save = lambda d: None  # checkpoints are not a per-step cost
    online = cfg.teacher.mode == "online"
    use = [{"input_ids": r["input_ids"]} for r in rows] if online else rows

    def windows(skip):
        i = skip
        while True:
            yield use[i % len(use)]
            i += 1

    n = args.warmup + args.steps
    ctx = loop_mod.LoopContext(rank=0, world=1, windows=windows, eval_windows=[], report=lambda m, d: None,
                               restore_dir=None, out_dir=args.out, log=lambda m: None, device=device)
    cfg.run.stop_after_steps = n
    s = loop_mod.train_loop(cfg, ctx, teacher if online else None, engine)
    hist = s["history"][args.warmup:]
    tok = sum(args.prefix + args.continuation for _ in hist)
    return tok / sum(h["step_s"] for h in hist), engine.precision


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefix", type=int, default=16)
    ap.add_argument("--continuation", type=int, default=496)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--draft-vocab", default="runs/draft_vocab/pg_mini_8192/draft_vocab.json")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps per variant and round")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per variant and round")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default="/tmp/bd_ray_train_throughput")
    args = ap.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or "old" not in variants:
        ap.error(f"--variants: from {VARIANTS}, including old (got unknown {unknown})")
    if not os.path.exists(args.draft_vocab):
        ap.error(f"--draft-vocab {args.draft_vocab} missing: python jobs/draft_vocab.py --size 8192 "
                 "--out runs/draft_vocab/pg_mini_8192")
    torch.set_num_threads(args.threads)

    import bd_ray.train.loop as loop_mod
    from bd_ray import models
    from bd_ray.device import fast_bf16
    from bd_ray.teacher import compute_teacher_targets_batch

    # the end-of-run outputs (metrics.json, plot, export) and checkpoint exports are not per-step costs
    loop_mod._write_outputs = lambda *a, **k: None  # noqa: SLF001
    loop_mod.export_hf = lambda *a, **k: None
    loop_mod.write_manifest = lambda *a, **k: None
    device = torch.device("cpu")
    if any(v in ("old", "fast-deepspeed") for v in variants):
        _init_dist()
    teacher, _ = models.load_verifier(models.resolve_model_path("smollm2-135m"), dtype=torch.float32)
    teacher.requires_grad_(False).eval()
    n_rows = max(8, args.warmup + args.steps)
    g = np.random.default_rng(0)
    ids = torch.as_tensor(g.integers(0, teacher.config.vocab_size, (n_rows, args.prefix + args.continuation)))
    prec = "bf16" if fast_bf16(device) else "fp32"
    t0 = time.time()
    tg = compute_teacher_targets_batch(teacher, ids, args.prefix, cont_chunk=128, precision=prec, device=device)
    per_window = (time.time() - t0) / n_rows
    rows = [{"input_ids": ids[i], "targets": tg[i]} for i in range(n_rows)]
    print(f"[train_throughput] torch {torch.__version__}, {args.threads} thread(s), cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}, fast bf16: {fast_bf16(device)}; window "
          f"{args.prefix}+{args.continuation}, {args.layers}-layer drafter; offline targets once: "
          f"{per_window:.2f} s/window ({prec}, batch {n_rows})", flush=True)

    rates: dict[str, list[float]] = {v: [] for v in variants}
    precs: dict[str, str] = {}
    for r in range(args.rounds):
        for v in variants:
            rate, p = _time_variant(v, args, teacher, rows, device)
            rates[v].append(rate)
            precs[v] = p
            print(f"[train_throughput] round {r + 1} {v:18s} {rate:8.1f} tok/s ({p})", flush=True)
    base = float(np.mean(rates["old"]))
    print(f"\n{'variant':18s} {'precision':9s} {'tok/s':>9s} {'vs old':>7s}")
    for v in variants:
        m = float(np.mean(rates[v]))
        print(f"{v:18s} {precs[v]:9s} {m:9.1f} {m / base:6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
