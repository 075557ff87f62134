r"""Finished experiment (conclusion: results/speed/README.md, not adopted): does a second, prepacked copy of the verifier's linear weights, used only for the
γ+1-row verify block, bring T_v(γ+1)/T_v(1) down (target <= 1.3 at 4K context)?

What it measures. The verifier step costs of ``benchmarks/step_costs.py`` (its ``step`` is a closure
inside ``main``, so the same few calls are repeated here; the engine's own path:
``kvcache.prefill`` once, then ``kvcache.forward_with_cache`` of 1 or γ+1 tokens on the
``BufferedLayer`` cache, rolled back with ``kvcache.crop_cache``; attention ``bd_ray_sparse``, the
engine default) with the ``torch.nn.Linear`` layers (q/k/v/o, gate/up/down, and the LM head)
routed per call:

* ``default``: plain ``nn.Linear`` (``F.linear`` -> MKL sgemm/sgemv), as the engine runs today;
* ``dual-onednn``: inputs with more than one row (batch * seq > 1) go through a oneDNN-prepacked
  copy of the weight (``torch.ops.mkldnn._reorder_linear_weight(W, γ+1)`` once, then
  ``torch.ops.mkldnn._linear_pointwise(x, W_packed, b, "none", [], "")``); 1-row decode steps keep
  the ordinary path. ``dual-onednn-nohead``: the same with the LM head left unpacked;
* ``all-onednn`` (T_v(1) only, for reference): the 1-row step through the packed copy too, the
  configuration an earlier measurement found up to 30 % slower at one thread;
* ``dual-mkl``: MKL's packed sgemm for exactly γ+1 rows (``torch.ops.mkl._mkl_reorder_linear_weight``
  + ``torch.ops.mkl._mkl_linear``), which is what inductor's CPU freezing actually emits for fp32
  weights (the oneDNN ops are its choice for bf16/fp16 weights); ``_mkl_linear`` itself falls back
  to ``linear`` for any other row count, so it is "dual" by construction.

Source of the idea: oneDNN/MKL weight prepacking as torch inductor does when freezing a CPU model
(the linear weight-pack pass of ``torch/_inductor/fx_passes/mkldnn_fusion.py``, active with
``torch._inductor.config.freezing = True``), here applied by hand to an eager HF model and only to
the multi-row calls. The previous finding (results/speed/README.md): prepacked weights made 5-row
products 7-15 % faster in the full model but 1-row steps up to 30 % slower, hence the second copy.

Printed, per context: correctness of the packed paths on one γ+1-token verify block after the
prefill (max |Δ logits| against ``default`` and whether the greedy argmax of every row agrees);
median step times in **milliseconds** over ``--repeats`` interleaved rounds (every configuration
once per round, in a rotating order, so load drift on a shared machine hits all alike); the ratios
T_v(γ+1)/T_v(1) for ``default`` and for each dual configuration (its own T_v(1), i.e. with the
routing wrapper in place; and against the default T_v(1)); the extra memory of the packed copies in
**MB** (growth of the anonymous resident memory while packing -- the oneDNN copy is the size of the
dense weights, the LM head alone 108 MB for SmolLM2 -- and the packed tensors' nominal sizes; MKL's
pack buffers are allocated larger than they are touched).

Fragile: ``torch.ops.mkldnn._reorder_linear_weight``, ``_linear_pointwise``,
``torch.ops.mkl._mkl_reorder_linear_weight`` and ``_mkl_linear`` are private torch ops (schemas
checked on torch 2.13.0+cpu, oneDNN 3.12); an unavailable backend is skipped with a message.

Usage::

    OMP_NUM_THREADS=1 python results/speed/verify_prepacked.py [--contexts 4096] [--gamma 4] \
        [--repeats 15] [--threads 1] [--backends onednn mkl] [--json PATH]
    python results/speed/verify_prepacked.py --verifier tiny --contexts 256 --repeats 3   # smoke test

``--verifier`` takes a registered name / checkpoint dir (default ``smollm2-135m``) or ``tiny`` (a
random 2-layer Llama from bd_ray.testing.tiny; run from the repository root).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

BACKENDS = ("onednn", "mkl")


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--verifier", default="smollm2-135m", help="registered name, checkpoint dir, or 'tiny'")
    p.add_argument("--contexts", type=int, nargs="+", default=[4096])
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--attn", default="bd_ray_sparse", help="verifier attention (engine default bd_ray_sparse)")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument("--json", default=None, help="write medians, ratios and checks here as JSON")
    return p.parse_args(argv)


def _anon_rss_mb() -> float:
    """Anonymous resident memory (``RssAnon``) in MB, after handing freed heap memory back to the OS
    (glibc ``malloc_trim``). Anonymous only: reading weights that are memory-mapped from the
    checkpoint would otherwise count file pages as growth."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def backend_available(backend: str) -> str | None:
    """``None`` if ``backend``'s private ops exist and run here, else the reason."""
    try:
        w, x = torch.randn(16, 8), torch.randn(3, 8)
        with torch.inference_mode():
            if backend == "onednn":
                if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
                    return "torch.backends.mkldnn not available/enabled"
                y = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w, 3),
                                                       None, "none", [], "")
            else:
                if not torch.backends.mkl.is_available():
                    return "torch.backends.mkl not available"
                y = torch.ops.mkl._mkl_linear(x, torch.ops.mkl._mkl_reorder_linear_weight(w, 3), w, None, 3)
        if not torch.allclose(y, x @ w.T, atol=1e-5):
            return "packed result differs from x @ W.T"
    except (AttributeError, RuntimeError, NotImplementedError) as e:
        return f"{type(e).__name__}: {e}"
    return None


class PackedLinears:
    """Second, prepacked copies of every ``nn.Linear`` weight of ``model`` (the originals untouched).

    ``route(mode, min_rows)`` is a context manager installing, on each linear, an instance
    ``forward`` that sends inputs of at least ``min_rows`` rows (batch * seq) to the packed copy and
    the rest to ``F.linear`` with the original weight; leaving it removes the wrappers, so
    ``default`` runs the model's untouched modules.
    """

    def __init__(self, model: torch.nn.Module, backend: str, rows: int):
        self.backend, self.rows = backend, rows
        self.linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.head_names = {n for n, m in self.linears if m is head}
        self.packed: dict[str, torch.Tensor] = {}
        self.nominal_bytes = 0
        rss0 = _anon_rss_mb()
        with torch.inference_mode():
            for name, m in self.linears:
                w = m.weight.detach()
                if backend == "onednn":
                    pw = torch.ops.mkldnn._reorder_linear_weight(w, rows)
                    self.nominal_bytes += pw.numel() * pw.element_size()   # logical size (blocked layout may pad)
                else:
                    pw = torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
                    self.nominal_bytes += pw.numel() * pw.element_size()   # MKL's sgemm_pack buffer
                self.packed[name] = pw
        self.rss_growth_mb = _anon_rss_mb() - rss0

    def _forward(self, module: torch.nn.Linear, pw: torch.Tensor, min_rows: int):
        weight, bias = module.weight, module.bias
        if self.backend == "onednn":
            def forward(x):
                if x.numel() >= min_rows * x.shape[-1]:
                    return torch.ops.mkldnn._linear_pointwise(x, pw, bias, "none", [], "")
                return F.linear(x, weight, bias)
        else:
            rows = self.rows

            def forward(x):
                if x.numel() >= min_rows * x.shape[-1]:
                    return torch.ops.mkl._mkl_linear(x, pw, weight, bias, rows)  # falls back unless rows match
                return F.linear(x, weight, bias)
        return forward

    @contextlib.contextmanager
    def route(self, min_rows: int = 2, head: bool = True):
        installed = []
        try:
            for name, m in self.linears:
                if name in self.head_names and not head:
                    continue
                m.forward = self._forward(m, self.packed[name], min_rows)
                installed.append(m)
            yield self
        finally:
            for m in installed:
                del m.forward


def _load(name: str):
    from bd_ray import models

    if name == "tiny":
        from bd_ray.testing.tiny import tiny_llama

        model = tiny_llama(vocab_size=320, layers=2, seed=0, max_positions=16384)
        model.requires_grad_(False)
        return model, 320
    model, tok = models.load_verifier(name)
    return model, len(tok)


def main(argv=None) -> int:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    from bd_ray import kvcache
    from bd_ray.speculative.engine import use_attention

    t_start = time.perf_counter()
    cmd = "python results/speed/verify_prepacked.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"# {cmd}")
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, torch {torch.__version__}, fp32, batch 1, "
          f"attention {args.attn}")
    n = args.gamma + 1
    backends = []
    for b in args.backends:
        why = backend_available(b)
        if why:
            print(f"# backend {b} skipped: {why}")
        else:
            backends.append(b)
    model, vocab = _load(args.verifier)
    use_attention(model, args.attn)
    n_lin = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    w_mb = sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
               if isinstance(m, torch.nn.Linear)) / 2**20
    print(f"# verifier {args.verifier}: {n_lin} nn.Linear, {w_mb:.1f} MB of linear weights (LM head included)")
    packs: dict[str, PackedLinears] = {}
    for b in backends:
        packs[b] = PackedLinears(model, b, n)
        grow = packs[b].rss_growth_mb
        print(f"# {b}: packed for {n} rows in {len(packs[b].linears)} linears; extra memory {grow:.1f} MB "
              f"(anonymous RSS growth, {100 * grow / w_mb:.0f} % of the linear weights; "
              f"{packs[b].nominal_bytes / 2**20:.1f} MB nominal/allocated)")

    report: dict = {"command": cmd, "machine": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__, "attn": args.attn,
                    "gamma": args.gamma, "repeats": args.repeats, "verifier": args.verifier,
                    "linear_weights_mb": w_mb,
                    "extra_memory_mb": {b: {"rss_growth": p.rss_growth_mb, "nominal": p.nominal_bytes / 2**20}
                                        for b, p in packs.items()},
                    "contexts": {}}

    # (name, rows fed, backend or None, min_rows routed to the packed copy, LM head packed)
    configs = [("default", 1, None, 0, False), ("default", n, None, 0, False)]
    if "onednn" in packs:
        configs += [("dual-onednn", 1, "onednn", 2, True), ("dual-onednn", n, "onednn", 2, True),
                    ("dual-onednn-nohead", n, "onednn", 2, False), ("all-onednn", 1, "onednn", 1, True)]
    if "mkl" in packs:
        configs += [("dual-mkl", 1, "mkl", 2, True), ("dual-mkl", n, "mkl", 2, True)]

    def routed(cfg):
        _, _, b, min_rows, head = cfg
        return packs[b].route(min_rows, head) if b else contextlib.nullcontext()

    g = torch.Generator().manual_seed(0)
    for ctx in args.contexts:
        ids = torch.randint(100, vocab - 1, (1, ctx + n), generator=g)
        prompt, block = ids[:, :ctx], ids[:, ctx:]
        t0 = time.perf_counter()
        with torch.inference_mode():
            cache = kvcache.prefill(model, prompt).cache
        t_prefill = time.perf_counter() - t0
        base = kvcache.cache_len(cache)

        def step(rows, return_logits=False):
            out = kvcache.forward_with_cache(model, cache, block[:, :rows], start_position=ctx)
            kvcache.crop_cache(cache, base)
            return out if return_logits else None

        # correctness: the same block (1 row and γ+1 rows) through every configuration
        checks = {}
        with torch.inference_mode():
            ref = {1: step(1, True), n: step(n, True)}
            for cfg in configs:
                name, rows = cfg[0], cfg[1]
                if cfg[2] is None:
                    continue
                with routed(cfg):
                    out = step(rows, True)
                diff = (out - ref[rows]).abs().max().item()
                same = (out.argmax(-1) == ref[rows].argmax(-1)).squeeze(0).tolist()
                checks[f"T_v({rows}) {name}"] = {"max_abs_logit_diff": diff, "argmax_equal": same}

        label = [f"T_v({c[1]}) {c[0]}" for c in configs]
        times: dict[str, list[float]] = {k: [] for k in label}
        with torch.inference_mode():
            for cfg in configs:                       # warm-up (oneDNN primitive creation, caches)
                with routed(cfg):
                    step(cfg[1])
                    step(cfg[1])
            for r in range(args.repeats):
                k = r % len(configs)                  # rotate the order: no config always first
                for cfg, name in list(zip(configs, label))[k:] + list(zip(configs, label))[:k]:
                    with routed(cfg):
                        t = time.perf_counter()
                        step(cfg[1])
                        times[name].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        tv1 = med["T_v(1) default"]
        print(f"\n## context {ctx} tokens, γ = {args.gamma} ({n}-row verify block), prefill {t_prefill:.1f} s, "
              f"{args.repeats} interleaved repeats")
        print("correctness vs default (same block after the prefill):")
        for k, c in checks.items():
            print(f"  {k:<30} max |Δ logits| {c['max_abs_logit_diff']:.2e}   greedy argmax equal per row "
                  f"{c['argmax_equal']}")
        print(f"{'step':<30}{'median ms':>10}{'min ms':>9}{'/ T_v(1) default':>18}")
        for k in label:
            print(f"{k:<30}{med[k] * 1e3:>10.1f}{min(times[k]) * 1e3:>9.1f}{med[k] / tv1:>18.3f}")
        ratios = {"default": med[f"T_v({n}) default"] / tv1}
        print(f"T_v({n})/T_v(1): default {ratios['default']:.3f}")
        for b, dual in (("onednn", "dual-onednn"), ("onednn", "dual-onednn-nohead"), ("mkl", "dual-mkl")):
            if b not in packs:
                continue
            own1 = med[f"T_v(1) {'dual-onednn' if b == 'onednn' else dual}"]
            ratios[dual] = med[f"T_v({n}) {dual}"] / own1
            ratios[dual + " vs default T_v(1)"] = med[f"T_v({n}) {dual}"] / tv1
            print(f"T_v({n})/T_v(1): {dual} {ratios[dual]:.3f} (with its own routed T_v(1)), "
                  f"{ratios[dual + ' vs default T_v(1)']:.3f} against the default T_v(1); "
                  f"{n}-row step time {100 * (med[f'T_v({n}) {dual}'] / med[f'T_v({n}) default'] - 1):+.1f} % "
                  f"vs default")
        if "onednn" in packs:
            print(f"reference: 1-row step through the packed oneDNN copy (all-onednn) "
                  f"{med['T_v(1) all-onednn'] / tv1:.3f}x the default T_v(1); the 1-row step with the "
                  f"routing wrappers (dual-onednn) {med['T_v(1) dual-onednn'] / tv1:.3f}x")
        report["contexts"][str(ctx)] = {"ms_median": {k: v * 1e3 for k, v in med.items()},
                                        "ms_all": {k: [x * 1e3 for x in v] for k, v in times.items()},
                                        "ratios": ratios, "checks": checks, "prefill_s": t_prefill}
    total = time.perf_counter() - t_start
    print(f"\n# total {total:.0f} s")
    report["total_s"] = total
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
