"""The evaluation worker: holds the verifier and every drafter, runs one measurement at a time.

A Ray actor (``run.executor: ray``) or a plain object (``local``). Both prefills of a prompt go
through :meth:`bd_ray.speculative.engine.SpeculativeGenerator.prefill` once per prompt group and
drafter (the verifier prefill is shared by all drafters); AR and every SD cell of the prompt
reuse them, each SD cell compacting the drafter prefill to its own budget inside the engine.
"""

from __future__ import annotations

import os
import platform
import socket
import time
from typing import Any

import torch

from bd_ray import kvcache
from bd_ray.config import SparsePolicyConfig, SpecConfig
from bd_ray.config.evaluate import DecodeMode, EvalJobConfig, budget_label
from bd_ray.models import load_drafter, load_verifier
from bd_ray.sparse import queries_needed
from bd_ray.speculative.engine import ARGenerator, GenerationResult, Prefilled, SpeculativeGenerator

__all__ = ["EvalWorker"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class EvalWorker:
    """Holds the verifier and every drafter; runs one measurement (:meth:`run`) at a time.

    Args:
        cfg: ``EvalJobConfig.model_dump(mode="json")`` (plain dict, cheap to ship to an actor).
        threads: torch intra-op threads (``None``: leave torch's default).

    Prefills live for one prompt group: the verifier prefill of the current prompt and one
    drafter prefill per drafter; a new prompt evicts them (items arrive grouped by prompt).

    Raises (from the constructor): ``FileNotFoundError`` for a missing model path,
    ``TokenizerMismatchError`` when a drafter's tokenizer differs from the verifier's.
    """

    def __init__(self, cfg: dict, threads: int | None = None) -> None:
        if threads is not None:
            torch.set_num_threads(int(threads))
        self.cfg = EvalJobConfig.model_validate(cfg)
        mc = self.cfg.models
        dev = mc.device
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = dev
        t0 = time.perf_counter()
        self.verifier, self.tok = load_verifier(mc.verifier, dtype=_DTYPES[mc.dtype], device=dev)
        self.drafters = {}
        for name, src in mc.drafters.items():
            d, _ = load_drafter(src, self.tok, dtype=_DTYPES[mc.dtype], device=dev, verifier=self.verifier)
            d.requires_grad_(False)
            self.drafters[name] = d.eval()
        self.load_s = time.perf_counter() - t0
        self.policies = dict(self.cfg.matrix.policies)
        # One drafter prefill serves every policy of the matrix: it captures the queries of the
        # policy that needs the most, and each policy reads only its last ones (bd_ray.sparse).
        self._capture_policy = max(self.policies.values(), key=queries_needed)
        self._group: str | None = None
        self._prefilled: dict[str, Prefilled] = {}

    def info(self) -> dict:
        """Where and how this worker measures (host, CPUs, threads, device, versions, load time)."""
        import transformers

        info = {"host": socket.gethostname(), "pid": os.getpid(), "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                "transformers": transformers.__version__, "device": self.device,
                "device_name": (torch.cuda.get_device_name(0) if self.device == "cuda" else platform.processor()
                                or platform.machine()),
                "model_load_s": self.load_s}
        try:
            import ray

            if ray.is_initialized():
                ctx = ray.get_runtime_context()
                info["node_id"] = ctx.get_node_id()
                info["assigned_resources"] = {k: float(v) for k, v in ctx.get_assigned_resources().items()}
        except Exception:  # noqa: BLE001 - info only
            pass
        return info

    def _generator(self, drafter: str, spec: SpecConfig) -> SpeculativeGenerator:
        return SpeculativeGenerator(self.verifier, self.drafters[drafter], self.tok, spec)

    def _prefill(self, item: dict) -> Prefilled:
        """Both prefills of the item's prompt for its drafter (needle AR runs: the first drafter's),
        made once per prompt group; later drafters of the group reuse the verifier prefill."""
        if item["group"] != self._group:
            self._group, self._prefilled = item["group"], {}
        d = item.get("drafter") or next(iter(self.drafters))
        if d not in self._prefilled:
            spec = SpecConfig(budget=None, policy=self._capture_policy, prefill_chunk=self.cfg.matrix.prefill_chunk)
            shared = next(iter(self._prefilled.values()), None)
            self._prefilled[d] = self._generator(d, spec).prefill(item["prompt"]["token_ids"], reuse_verifier=shared)
        return self._prefilled[d]

    def run(self, item: dict) -> dict:
        """Run one item (see :func:`bd_ray.evaluate.items.build_items`); returns its record (see
        ``results.json`` ``runs``)."""
        mode = DecodeMode.model_validate(item["mode"])
        m = self.cfg.matrix
        greedy_tokens = self.cfg.needle.max_new_tokens if item["kind"].startswith("needle") else m.max_new_tokens
        sampling = mode.sampling(greedy_tokens, eos=[] if m.ignore_eos else None)
        prompt = item["prompt"]["token_ids"]
        pre = self._prefill(item)
        # when, and under what machine load, it was measured: a shared box's other work shows
        # here, so disturbed measurements can be found and re-measured afterwards
        rec: dict[str, Any] = {"kind": item["kind"], "prompt_id": item["prompt"]["prompt_id"],
                               "context": item["prompt"]["context"], "mode": mode.name, "greedy": mode.greedy,
                               "verifier_prefill_s": pre.verifier_s, "host": socket.gethostname(),
                               "started_at": time.time(), "load_1m": os.getloadavg()[0]}
        if item["kind"] in ("ar", "needle_ar"):
            res = ARGenerator(self.verifier, self.tok, prefill_chunk=m.prefill_chunk).generate(
                prompt, sampling, prefilled=pre.verifier)
            n = len(res.token_ids)
            rec.update(_result_fields(res))
            rec["verify_step_s"] = res.timings.verify_s / max(n - 1, 1)
            rec["drafter"] = item.get("drafter")     # the drafter group this AR run is the baseline of
            return rec

        label, budget, gamma = item["policy"], item["budget"], int(item["gamma"])
        policy = self.policies[label] if label != "none" else next(iter(self.policies.values()))
        spec = SpecConfig(gamma=gamma, budget=budget, policy=policy, prefill_chunk=m.prefill_chunk)
        res = self._generator(item["drafter"], spec).generate(prompt, sampling, gamma=gamma, budget=budget,
                                                              prefilled=pre, adaptive=mode.adaptive)
        met = res.metrics
        rec.update(_result_fields(res))
        rec.update(met.as_dict())                   # cycles, drafted, accepted, α, τ, per-position
        rec.update({
            "cell_id": item["cell_id"], "drafter": item["drafter"], "policy": label,
            "budget": budget_label(budget), "gamma": gamma, "drafter_prefill_s": pre.drafter_s,
            "compact_s": res.timings.drafter_prefill_s,
            "drafted_at": list(met.drafted_at), "accepted_at": list(met.accepted_at),
            "draft_step_s": res.timings.draft_s / met.cycles if met.cycles else None,
            "verify_step_s": res.timings.verify_s / met.cycles if met.cycles else None,
            "peak_drafter_cache": res.peak_drafter_cache,
            "plain_steps": (res.adaptive or {}).get("plain_steps", 0),
        })
        if item["kind"] == "needle_sd":
            span = item["prompt"]["needle"]
            rec["needle_kept_fraction"] = _needle_kept(pre.drafter, budget, policy, span["start"], span["end"])
        return rec


def _needle_kept(pre: kvcache.PrefillResult, budget: int | None, policy: SparsePolicyConfig,
                 start: int, end: int) -> float:
    """Fraction of needle positions [start, end) kept by the sparse cache, mean over layers and KV heads."""
    if budget is None:
        return 1.0
    with torch.inference_mode():
        c = kvcache.compact_cache(pre.cache, budget, policy, queries=pre.queries)
    fr = []
    for pos in c.kept_positions:           # [b, kvh, K]
        inside = ((pos >= start) & (pos < end)).sum(-1).float() / float(end - start)  # [b, kvh]
        fr.append(inside.mean().item())
    return float(sum(fr) / len(fr))


def _result_fields(res: GenerationResult) -> dict:
    t = res.timings
    decode_s = t.total_s - t.verifier_prefill_s - t.drafter_prefill_s
    return {"token_ids": list(res.token_ids), "text": res.text, "n_tokens": len(res.token_ids),
            "finish_reason": res.finish_reason, "tokens_per_s": res.tokens_per_s, "decode_s": decode_s,
            "draft_s": t.draft_s, "verify_s": t.verify_s, "speculative": res.speculative,
            "fallback_reason": res.fallback_reason}
