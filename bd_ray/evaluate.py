"""The evaluation matrix: acceptance and speedup of sparse-KV drafters against plain decoding.

What is measured (names as in docs/DESIGN.md section 1). For every cell
``(context, policy, budget, gamma, drafter, mode)`` and each of the N held-out prompts of that
context, :class:`bd_ray.speculative.engine.SpeculativeGenerator` decodes ``max_new_tokens`` tokens and
:class:`bd_ray.speculative.engine.ARGenerator` decodes the same prompt alone (AR, the speedup
denominator) through the same verifier code path. Per cell: α (accepted / drafted, pooled over the
prompts), τ (1 + accepted / cycles), per-position acceptance, SD and AR decode tokens/s (emitted
tokens / seconds of decoding after prefill, pooled: total tokens / total seconds), speedup = SD
tokens/s / AR tokens/s, mean draft and verify step times (seconds per cycle), and the drafter's
peak cache size (entries per layer and KV head). The best gamma per (context, policy, budget,
drafter, mode) is the one with the highest measured SD tokens/s, never the highest α.

Prompts (:func:`select_prompts`): windows of exactly ``context`` tokens of books of the held-out
split (``split == "test"``), picked deterministically from ``data.seed``; a work that appears in the
train split is an error (:class:`HeldOutError`), so no prompt ever comes from a training book.

Prefill reuse: every prompt is prefilled once by the verifier and once per drafter; AR and all SD
cells of that prompt reuse those caches (each cell compacts the drafter prefill to its own budget).

Lossless check: in greedy modes, the SD token ids must equal the AR token ids for every cell and
prompt; any difference is reported naming the cell and prompt, and :func:`run_evaluation` raises
:class:`LosslessError` after writing the outputs (``jobs/evaluate.py`` exits with status 3).

How the matrix runs on Ray (``run.executor: ray``). Work items are single measurements
(one AR run, one SD cell x prompt, or one needle run). One :class:`EvalWorker` actor per node
holds the verifier and all drafters (models are loaded once per worker, never per cell); all items
of a prompt go to the same worker (prompt ``i`` -> worker ``i mod W``) and run in submission order,
so the prefills are shared. Isolation of timings: with ``run.worker_cpus: node`` (the default) each
worker reserves *all* logical CPUs of its node (``num_cpus`` = the node's CPU count, pinned with a
node-affinity strategy), so no two workers, and no other Ray task, run on one node while it
measures, and a worker runs one item at a time. On one machine this makes the matrix strictly
sequential; on a cluster it spreads over the nodes. With GPUs set ``worker_gpus: 1`` and a
numeric ``worker_cpus`` (one worker per GPU); the engine synchronises CUDA around every timer.

Outputs (:func:`write_outputs`) in ``run.output_dir``: ``results.json`` (config, machine, prompts,
every cell, every run, best gammas, needle, lossless report), ``results.md`` (Markdown tables) and
PNG plots ``acceptance_vs_budget_<mode>.png`` (α at ``report.alpha_gamma`` vs budget, one panel per
context, one line per drafter and policy) and ``speedup_vs_gamma_<mode>.png`` (one panel per
context, one line per drafter, policy and budget).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import random
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from bd_ray.config.evaluate import FULL, EvalJobConfig, budget_label
from bd_ray.config import ConfigError, SparsePolicyConfig
from bd_ray.sparse import queries_needed

__all__ = [
    "HeldOutError",
    "LosslessError",
    "EvalItemError",
    "PromptSpec",
    "select_prompts",
    "make_needle_prompt",
    "build_items",
    "EvalWorker",
    "aggregate_cells",
    "best_gammas",
    "render_markdown",
    "write_outputs",
    "run_evaluation",
    "cell_id",
    "SCHEMA_VERSION",
]

SCHEMA_VERSION = 1


class HeldOutError(AssertionError):
    """A prompt would come from outside the held-out split (or a test work leaks into train)."""


class LosslessError(RuntimeError):
    """Greedy SD output differs from AR output; the message names every failing cell and prompt."""


class EvalItemError(RuntimeError):
    """Some measurements raised; the message names them (the outputs are still written)."""


# ------------------------------------------------------------------------------------------------
# Prompts (held-out split only)
# ------------------------------------------------------------------------------------------------


@dataclass
class PromptSpec:
    """One prompt: ``token_ids`` = exactly ``context`` tokens of document ``doc_id`` from ``start_token``."""

    prompt_id: str
    context: int
    doc_id: str
    work_id: str
    split: str
    start_token: int
    token_ids: list[int]
    needle: dict | None = None   # for needle prompts: passkey, span [start, end), depth

    def meta(self) -> dict:
        return {"prompt_id": self.prompt_id, "context": self.context, "doc_id": self.doc_id,
                "work_id": self.work_id, "split": self.split, "start_token": self.start_token,
                "n_tokens": len(self.token_ids), "needle": self.needle}


def _encode(tokenizer: Any, text: str) -> list[int]:
    import logging

    lg = logging.getLogger("transformers.tokenization_utils_base")
    old = lg.level
    lg.setLevel(logging.ERROR)  # "sequence longer than model max length": we cut windows ourselves
    try:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    finally:
        lg.setLevel(old)


def _held_out_docs(table) -> list[dict]:
    """Rows of the test split, after asserting that no test work also appears in the train split."""
    rows = table.select([c for c in ("doc_id", "work_id", "split", "text") if c in table.column_names]).to_pylist()
    if not rows:
        raise HeldOutError("the corpus has no documents")
    for col in ("doc_id", "split", "text"):
        if col not in rows[0]:
            raise ConfigError(f"data.corpus: column {col!r} is missing (need doc_id, split, text; work_id optional)")
    for r in rows:
        r["work_id"] = str(r.get("work_id") or r["doc_id"])
    train_works = {r["work_id"] for r in rows if r["split"] == "train"}
    test = [r for r in rows if r["split"] == "test"]
    leaked = sorted({r["work_id"] for r in test} & train_works)
    if leaked:
        raise HeldOutError(f"works in both the train and the test split (a prompt could come from a training "
                           f"book): {leaked[:5]}")
    if not test:
        raise HeldOutError("the corpus has no documents with split == 'test'")
    return test


def select_prompts(table, tokenizer: Any, contexts: Sequence[int], n: int, seed: int,
                   token_cache: dict | None = None) -> dict[int, list[PromptSpec]]:
    """Pick ``n`` held-out windows of exactly ``context`` tokens for every context.

    Deterministic for a given corpus, tokenizer and ``seed``: per context, the eligible works
    (test-split works with a document of at least ``context`` tokens) are shuffled with
    ``random.Random(f"{seed}:{context}")`` and visited round robin (prompts spread over works);
    within a work a document and a start offset are drawn from the same generator.

    Args:
        table: a ``pyarrow.Table`` with columns ``doc_id``, ``split``, ``text`` (and ``work_id``).
        tokenizer: the verifier's tokenizer (no special tokens are added).
        token_cache: optional ``{doc_id: token ids}`` memo shared between calls.

    Returns:
        ``{context: [PromptSpec] * n}``.

    Raises:
        HeldOutError: a test work also appears in the train split, there is no test split, or a
            picked prompt is not from the test split (asserted again per prompt).
        ValueError: no held-out document is long enough for a context (names it and the longest).
    """
    test = _held_out_docs(table)
    test.sort(key=lambda r: r["doc_id"])
    tokens = token_cache if token_cache is not None else {}
    for r in test:
        if r["doc_id"] not in tokens:
            tokens[r["doc_id"]] = _encode(tokenizer, r["text"])
    by_id = {r["doc_id"]: r for r in test}
    out: dict[int, list[PromptSpec]] = {}
    for ctx in contexts:
        eligible: dict[str, list[str]] = {}
        for r in test:
            if len(tokens[r["doc_id"]]) >= ctx:
                eligible.setdefault(r["work_id"], []).append(r["doc_id"])
        if not eligible:
            longest = max(len(t) for t in tokens.values())
            raise ValueError(f"no held-out document has {ctx} tokens (matrix.contexts); the longest has {longest}")
        rng = random.Random(f"{seed}:{ctx}")
        works = sorted(eligible)
        rng.shuffle(works)
        prompts = []
        for i in range(n):
            work = works[i % len(works)]
            doc = rng.choice(sorted(eligible[work]))
            toks = tokens[doc]
            start = rng.randrange(0, len(toks) - ctx + 1)
            row = by_id[doc]
            if row["split"] != "test":  # the held-out assertion, per prompt
                raise HeldOutError(f"prompt from document {doc!r} of split {row['split']!r}")
            prompts.append(PromptSpec(f"c{ctx}-p{i}", ctx, doc, row["work_id"], row["split"], start,
                                      toks[start:start + ctx]))
        out[ctx] = prompts
    return out


def make_needle_prompt(table, tokenizer: Any, context: int, depth: float, digits: int, seed: int,
                       token_cache: dict | None = None) -> PromptSpec:
    """A held-out window of exactly ``context`` tokens with a passkey sentence planted at ``depth``.

    Standard passkey-retrieval layout: a one-line instruction header, the book text with the
    sentence inside, then a question. The window ends with the question "What is the pass key? The pass key is", so retrieval means
    the continuation contains the passkey digits. The sentence is inserted at the first sentence or
    line boundary at or after ``depth * body`` (within 256 tokens; else exactly there) of the book text.
    ``needle`` = ``{"passkey", "start", "end", "depth"}`` with the token span ``[start, end)``.

    Raises:
        HeldOutError / ValueError: as :func:`select_prompts`; ValueError when ``context`` is too
            short to hold the sentence and the question.
    """
    rng = random.Random(f"needle:{seed}:{context}")
    key = "".join(rng.choice("123456789") for _ in range(digits))
    header = "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
    sentence = f" The pass key is {key}. Remember it. {key} is the pass key. "
    question = "\n\nWhat is the pass key? The pass key is"
    h_ids, s_ids, q_ids = _encode(tokenizer, header), _encode(tokenizer, sentence), _encode(tokenizer, question)
    body_len = context - len(h_ids) - len(s_ids) - len(q_ids)
    if body_len < 8:
        raise ValueError(f"context {context} is too short for the needle sentence and question "
                         f"({len(s_ids) + len(q_ids)} tokens)")
    base = select_prompts(table, tokenizer, [body_len], 1, seed, token_cache)[body_len][0]
    body = base.token_ids
    pos = int(depth * body_len)
    for j in range(pos, min(body_len, pos + 256)):
        piece = tokenizer.decode(body[j - 1:j]) if j > 0 else ""
        if piece.endswith((".", "\n", "!", "?")):
            pos = j
            break
    ids = h_ids + body[:pos] + s_ids + body[pos:] + q_ids
    assert len(ids) == context, (len(ids), context)
    start = len(h_ids) + pos
    return PromptSpec(f"c{context}-needle", context, base.doc_id, base.work_id, base.split, base.start_token, ids,
                      needle={"passkey": key, "start": start, "end": start + len(s_ids), "depth": depth})


# ------------------------------------------------------------------------------------------------
# Work items and cells
# ------------------------------------------------------------------------------------------------


def cell_id(context: int, policy: str, budget: int | None, gamma: int, drafter: str, mode: str) -> str:
    """Stable id of a cell: ``"2048|chunk_topk|128|g4|init4|greedy"`` (policy ``none`` for full budget)."""
    return f"{context}|{policy}|{budget_label(budget)}|g{gamma}|{drafter}|{mode}"


def _budget_policies(cfg: EvalJobConfig) -> list[tuple[str, int | None]]:
    """(policy label, budget) pairs: every policy for integer budgets, once (policy ``none``) for full."""
    pairs: list[tuple[str, int | None]] = []
    for b in cfg.matrix.int_budgets():
        if b is None:
            pairs.append(("none", None))
        else:
            pairs.extend((label, b) for label in cfg.matrix.policies)
    return pairs


def build_items(cfg: EvalJobConfig, prompts: dict[int, list[PromptSpec]],
                needles: dict[int, PromptSpec] | None = None) -> list[dict]:
    """All measurements in run order: per prompt and mode, for each drafter an AR baseline run
    followed by that drafter's SD cells (γ from ``mode.gammas`` when set, else ``matrix.gammas``).

    Each item is a plain dict (sent to a worker): ``kind`` (``ar`` | ``sd`` | ``needle_ar`` |
    ``needle_sd``), ``prompt`` (:meth:`PromptSpec.meta` plus ``token_ids``), ``mode``, ``drafter``
    (for ``ar``: the group it is the baseline of) and, for SD, ``policy``, ``budget`` (``None`` =
    full), ``gamma`` and ``cell_id``.
    """
    m = cfg.matrix
    items: list[dict] = []
    groups: list[PromptSpec] = [p for ctx in m.contexts for p in prompts[ctx]]
    if needles:
        groups += [needles[ctx] for ctx in m.contexts if ctx in needles]
    for p in groups:
        pm = {**p.meta(), "token_ids": p.token_ids}
        if p.needle is not None:
            greedy = [md for md in m.modes if md.greedy][:1] or [m.modes[0].model_copy(update={"name": "greedy", "temperature": 0.0})]
            md = greedy[0]
            items.append({"kind": "needle_ar", "prompt": pm, "mode": md.model_dump(), "group": p.prompt_id})
            for d in cfg.models.drafters:
                for pol, b in _budget_policies(cfg):
                    items.append({"kind": "needle_sd", "prompt": pm, "mode": md.model_dump(), "drafter": d,
                                  "policy": pol, "budget": b, "gamma": cfg.needle_gamma, "group": p.prompt_id,
                                  "cell_id": cell_id(p.context, pol, b, cfg.needle_gamma, d, md.name)})
            continue
        # Modes outermost, so fixed-γ cells of every drafter come before the adaptive ones; an AR
        # baseline right before each drafter's cells, so slow drift in machine load (a shared
        # box) shifts SD and its AR together instead of biasing one drafter against another.
        for md in m.modes:
            mode = md.model_dump(exclude_none=True)
            for d in cfg.models.drafters:
                items.append({"kind": "ar", "prompt": pm, "mode": mode, "drafter": d, "group": p.prompt_id})
                for pol, b in _budget_policies(cfg):
                    for g in md.gammas or m.gammas:
                        items.append({"kind": "sd", "prompt": pm, "mode": mode, "drafter": d,
                                      "policy": pol, "budget": b, "gamma": g, "group": p.prompt_id,
                                      "cell_id": cell_id(p.context, pol, b, g, d, md.name)})
    return items


class _ARIndex:
    """The AR baseline of each SD run: the AR run of the same prompt and mode measured for its
    drafter's group (see :func:`build_items`), else any AR run of that prompt and mode (older
    journals measured AR once per prompt)."""

    def __init__(self, runs: Iterable[dict], kinds: tuple[str, ...] = ("ar",)) -> None:
        self._by: dict[tuple, dict] = {}
        for r in runs:
            if r["kind"] in kinds and "error" not in r:
                self.add(r)

    def add(self, r: dict) -> None:
        self._by[(r["prompt_id"], r["mode"], r.get("drafter"))] = r
        self._by.setdefault((r["prompt_id"], r["mode"], None), r)

    def get(self, sd: dict) -> dict | None:
        return (self._by.get((sd["prompt_id"], sd["mode"], sd.get("drafter")))
                or self._by.get((sd["prompt_id"], sd["mode"], None)))


# ------------------------------------------------------------------------------------------------
# The worker (a Ray actor, or a plain object with run.executor: local)
# ------------------------------------------------------------------------------------------------


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class EvalWorker:
    """Holds the verifier and every drafter; runs one measurement (:meth:`run`) at a time.

    Args:
        cfg: ``EvalJobConfig.model_dump(mode="json")`` (plain dict, cheap to ship to an actor).
        threads: torch intra-op threads (``None``: leave torch's default).

    Prefill caches live for one prompt group: the verifier prefill of the current prompt and one
    drafter prefill per drafter; a new prompt evicts them (items arrive grouped by prompt).

    Raises (from the constructor): ``FileNotFoundError`` for a missing model path,
    ``TokenizerMismatchError`` when a drafter's tokenizer differs from the verifier's.
    """

    def __init__(self, cfg: dict, threads: int | None = None) -> None:
        import torch

        from bd_ray.models import load_drafter, load_verifier

        if threads is not None:
            torch.set_num_threads(int(threads))
        self.cfg = EvalJobConfig.model_validate(cfg)
        mc = self.cfg.models
        dev = mc.device
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = dev
        t0 = time.perf_counter()
        self.verifier, self.tok = load_verifier(mc.verifier, dtype=_dtype(mc.dtype), device=dev)
        self.drafters = {}
        for name, src in mc.drafters.items():
            d, _ = load_drafter(src, self.tok, dtype=_dtype(mc.dtype), device=dev, verifier=self.verifier)
            d.requires_grad_(False)
            self.drafters[name] = d.eval()
        self.load_s = time.perf_counter() - t0
        self.policies = dict(self.cfg.matrix.policies)
        self._qwin = max([queries_needed(p) for p in self.policies.values()] + [0])
        self._group: str | None = None
        self._vpre = None
        self._dpre: dict[str, Any] = {}

    def info(self) -> dict:
        """Where and how this worker measures (host, CPUs, threads, device, versions, load time)."""
        import torch
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

    # -- prefills ------------------------------------------------------------------------------
    def _prompt_state(self, item: dict):
        import torch

        from bd_ray import kvcache
        from bd_ray.speculative.adaptive import PROMPT_PROBE_TOKENS

        if item["group"] != self._group:
            self._group, self._vpre, self._dpre = item["group"], None, {}
        ids = torch.tensor([item["prompt"]["token_ids"]], device=self.verifier.device)
        chunk = self.cfg.matrix.prefill_chunk
        if self._vpre is None:
            with torch.inference_mode():
                t = _sync_clock(self.device)
                pre = kvcache.prefill(self.verifier, ids, chunk_size=chunk, tail_argmax=PROMPT_PROBE_TOKENS)
                self._vpre = (pre, _sync_clock(self.device) - t)
        d = item.get("drafter")
        if d is not None and d not in self._dpre:
            with torch.inference_mode():
                t = _sync_clock(self.device)
                pre = kvcache.prefill(self.drafters[d], ids, chunk_size=chunk, capture_queries_window=self._qwin,
                                      tail_argmax=PROMPT_PROBE_TOKENS)
                self._dpre[d] = (pre, _sync_clock(self.device) - t)
        return self._vpre, self._dpre.get(d)

    # -- one measurement -------------------------------------------------------------------------
    def run(self, item: dict) -> dict:
        """Run one item (see :func:`build_items`); returns its record (see ``results.json`` ``runs``)."""
        from bd_ray import kvcache
        from bd_ray.config import SpecConfig
        from bd_ray.config.evaluate import DecodeMode
        from bd_ray.speculative.engine import ARGenerator, Prefilled, SpeculativeGenerator

        mode = DecodeMode.model_validate(item["mode"])
        m = self.cfg.matrix
        greedy_tokens = self.cfg.needle.max_new_tokens if item["kind"].startswith("needle") else m.max_new_tokens
        sampling = mode.sampling(greedy_tokens, eos=[] if m.ignore_eos else None)
        prompt = item["prompt"]["token_ids"]
        (vpre, v_s), dp = self._prompt_state(item)
        # when, and under what machine load, it was measured: a shared box's other work shows
        # here, so disturbed measurements can be found and re-measured afterwards
        rec: dict[str, Any] = {"kind": item["kind"], "prompt_id": item["prompt"]["prompt_id"],
                               "context": item["prompt"]["context"], "mode": mode.name, "greedy": mode.greedy,
                               "verifier_prefill_s": v_s, "host": socket.gethostname(),
                               "started_at": time.time(), "load_1m": os.getloadavg()[0]}
        if item["kind"] in ("ar", "needle_ar"):
            res = ARGenerator(self.verifier, self.tok, prefill_chunk=m.prefill_chunk).generate(
                prompt, sampling, prefilled=vpre)
            n = len(res.token_ids)
            rec.update(_result_fields(res))
            rec["verify_step_s"] = res.timings.verify_s / max(n - 1, 1)
            rec["drafter"] = item.get("drafter")     # the drafter group this AR run is the baseline of
            return rec

        d_pre, d_s = dp
        label, budget, gamma = item["policy"], item["budget"], int(item["gamma"])
        policy = self.policies[label] if label != "none" else next(iter(self.policies.values()))
        w = queries_needed(policy)
        queries = None if (w == 0 or d_pre.queries is None) else [q[:, :, -w:] for q in d_pre.queries]
        dpre_p = kvcache.PrefillResult(cache=d_pre.cache, last_logits=d_pre.last_logits, queries=queries,
                                       tail_argmax=d_pre.tail_argmax)
        spec = SpecConfig(gamma=gamma, budget=budget, policy=policy, prefill_chunk=m.prefill_chunk)
        gen = SpeculativeGenerator(self.verifier, self.drafters[item["drafter"]], self.tok, spec)
        pre = Prefilled(prompt, vpre, dpre_p, verifier_s=v_s, drafter_s=d_s)
        res = gen.generate(prompt, sampling, gamma=gamma, budget=budget, prefilled=pre, adaptive=mode.adaptive)
        met = res.metrics
        rec.update(_result_fields(res))
        rec.update({
            "cell_id": item["cell_id"], "drafter": item["drafter"], "policy": label,
            "budget": budget_label(budget), "gamma": gamma, "drafter_prefill_s": d_s,
            "compact_s": res.timings.drafter_prefill_s,
            "cycles": met.cycles, "drafted": met.drafted, "accepted": met.accepted,
            "acceptance_rate": met.acceptance_rate, "mean_accepted_length": met.mean_accepted_length,
            "per_position_acceptance": met.per_position_acceptance,
            "drafted_at": list(met.drafted_at), "accepted_at": list(met.accepted_at),
            "draft_step_s": res.timings.draft_s / met.cycles if met.cycles else None,
            "verify_step_s": res.timings.verify_s / met.cycles if met.cycles else None,
            "peak_drafter_cache": res.peak_drafter_cache,
            "plain_steps": (res.adaptive or {}).get("plain_steps", 0),
        })
        if item["kind"] == "needle_sd":
            span = item["prompt"]["needle"]
            rec["needle_kept_fraction"] = _needle_kept(dpre_p, budget, policy, span["start"], span["end"])
        return rec


def _needle_kept(pre, budget: int | None, policy: SparsePolicyConfig, start: int, end: int) -> float:
    """Fraction of needle positions [start, end) kept by the sparse cache, mean over layers and KV heads."""
    import torch

    from bd_ray import kvcache

    if budget is None:
        return 1.0
    with torch.inference_mode():
        c = kvcache.compact_cache(pre.cache, budget, policy, queries=pre.queries)
    fr = []
    for pos in c.kept_positions:           # [b, kvh, K]
        inside = ((pos >= start) & (pos < end)).sum(-1).float() / float(end - start)  # [b, kvh]
        fr.append(inside.mean().item())
    return float(sum(fr) / len(fr))


def _sync_clock(device: str) -> float:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def _result_fields(res) -> dict:
    t = res.timings
    decode_s = t.total_s - t.verifier_prefill_s - t.drafter_prefill_s
    return {"token_ids": list(res.token_ids), "text": res.text, "n_tokens": len(res.token_ids),
            "finish_reason": res.finish_reason, "tokens_per_s": res.tokens_per_s, "decode_s": decode_s,
            "draft_s": t.draft_s, "verify_s": t.verify_s, "speculative": res.speculative,
            "fallback_reason": res.fallback_reason}


# ------------------------------------------------------------------------------------------------
# Aggregation
# ------------------------------------------------------------------------------------------------


def _pooled_rate(tokens: Iterable[int], seconds: Iterable[float]) -> float | None:
    tok, sec = sum(tokens), sum(seconds)
    return tok / sec if sec > 0 else None


def aggregate_cells(runs: list[dict], cfg: EvalJobConfig) -> list[dict]:
    """One summary per cell from the per-prompt ``sd`` runs and the ``ar`` runs of the same prompts.

    Pooled over prompts: α = Σaccepted / Σdrafted, τ = 1 + Σaccepted / Σcycles, per-position
    acceptance from the summed per-position counts, tokens/s = Σtokens / Σdecode seconds (SD and AR
    over the same prompts), speedup = SD tokens/s / AR tokens/s; ``speedup_mean`` is the mean of
    per-prompt speedups. ``draft_step_s`` / ``verify_step_s``: seconds per cycle; ``ar_step_s``:
    seconds per AR verifier forward. ``drafter_cache``: largest peak drafter cache (entries per
    layer and KV head). ``lossless``: ``ok`` / ``FAIL`` (greedy) or ``n/a`` (sampled).
    """
    ar = _ARIndex(runs)
    cells: dict[str, list[dict]] = {}
    for r in runs:
        if r["kind"] == "sd" and "error" not in r:
            cells.setdefault(r["cell_id"], []).append(r)
    out = []
    for cid, rs in cells.items():
        r0 = rs[0]
        drafted_at: list[int] = []
        accepted_at: list[int] = []
        for r in rs:
            for k, (d, a) in enumerate(zip(r["drafted_at"], r["accepted_at"])):
                if k >= len(drafted_at):
                    drafted_at.append(0), accepted_at.append(0)
                drafted_at[k] += d
                accepted_at[k] += a
        drafted = sum(r["drafted"] for r in rs)
        accepted = sum(r["accepted"] for r in rs)
        cycles = sum(r["cycles"] for r in rs)
        ars = [ar.get(r) for r in rs]
        have_ar = all(a is not None for a in ars)
        sd_tps = _pooled_rate((r["n_tokens"] for r in rs), (r["decode_s"] for r in rs))
        ar_tps = _pooled_rate((a["n_tokens"] for a in ars), (a["decode_s"] for a in ars)) if have_ar else None
        per_prompt_speedups = [r["tokens_per_s"] / a["tokens_per_s"] for r, a in zip(rs, ars)
                               if a is not None and a["tokens_per_s"] and math.isfinite(r["tokens_per_s"])]
        lossless = "n/a"
        if r0["greedy"]:
            lossless = "ok" if all(a is not None and a["token_ids"] == r["token_ids"] for r, a in zip(rs, ars)) else "FAIL"
        ar_steps = sum(max(a["n_tokens"] - 1, 1) for a in ars) if have_ar else 0
        out.append({
            "cell_id": cid, "context": r0["context"], "policy": r0["policy"], "budget": r0["budget"],
            "gamma": r0["gamma"], "drafter": r0["drafter"], "mode": r0["mode"], "greedy": r0["greedy"],
            "n_prompts": len(rs), "prompt_ids": [r["prompt_id"] for r in rs],
            "alpha": accepted / drafted if drafted else 0.0,
            "tau": 1.0 + accepted / cycles if cycles else 1.0,
            "per_position_acceptance": [a / d if d else 0.0 for a, d in zip(accepted_at, drafted_at)],
            "cycles": cycles, "drafted": drafted, "accepted": accepted,
            "sd_tokens_per_s": sd_tps, "ar_tokens_per_s": ar_tps,
            "speedup": (sd_tps / ar_tps) if (sd_tps and ar_tps) else None,
            "speedup_mean": (sum(per_prompt_speedups) / len(per_prompt_speedups)) if per_prompt_speedups else None,
            "draft_step_s": sum(r["draft_s"] for r in rs) / cycles if cycles else None,
            "verify_step_s": sum(r["verify_s"] for r in rs) / cycles if cycles else None,
            "ar_step_s": (sum(a["verify_s"] for a in ars) / ar_steps) if have_ar and ar_steps else None,
            "drafter_cache": max(r["peak_drafter_cache"] for r in rs),
            "fallbacks": sum(1 for r in rs if r["fallback_reason"]),
            "plain_steps": sum(r.get("plain_steps", 0) for r in rs),
            "lossless": lossless,
        })
    order = {c: i for i, c in enumerate(cfg.matrix.contexts)}
    border = {budget_label(b): i for i, b in enumerate(cfg.matrix.int_budgets())}
    out.sort(key=lambda c: (order.get(c["context"], 0), c["mode"], c["drafter"], c["policy"],
                            border.get(c["budget"], 0), c["gamma"]))
    return out


def best_gammas(cells: list[dict]) -> list[dict]:
    """Per (context, policy, budget, drafter, mode): the gamma with the highest measured SD tokens/s."""
    groups: dict[tuple, list[dict]] = {}
    for c in cells:
        groups.setdefault((c["context"], c["policy"], c["budget"], c["drafter"], c["mode"]), []).append(c)
    out = []
    for (ctx, pol, b, d, mode), cs in groups.items():
        ok = [c for c in cs if c["sd_tokens_per_s"] is not None]
        if not ok:
            continue
        best = max(ok, key=lambda c: c["sd_tokens_per_s"])
        out.append({"context": ctx, "policy": pol, "budget": b, "drafter": d, "mode": mode,
                    "gamma": best["gamma"], "sd_tokens_per_s": best["sd_tokens_per_s"],
                    "ar_tokens_per_s": best["ar_tokens_per_s"], "speedup": best["speedup"],
                    "alpha": best["alpha"], "tau": best["tau"], "cell_id": best["cell_id"],
                    "gammas_tried": sorted(c["gamma"] for c in cs)})
    return out


def lossless_failures(runs: list[dict]) -> list[dict]:
    """Greedy SD runs whose token ids differ from the AR run of the same prompt and mode."""
    ar = _ARIndex(runs, kinds=("ar", "needle_ar"))
    bad = []
    for r in runs:
        if r["kind"] not in ("sd", "needle_sd") or not r.get("greedy") or "error" in r:
            continue
        a = ar.get(r)
        if a is None:
            continue
        if a["token_ids"] != r["token_ids"]:
            k = next((i for i, (x, y) in enumerate(zip(a["token_ids"], r["token_ids"])) if x != y),
                     min(len(a["token_ids"]), len(r["token_ids"])))
            bad.append({"cell_id": r["cell_id"], "prompt_id": r["prompt_id"], "first_difference": k,
                        "ar_tokens": a["token_ids"][k:k + 5], "sd_tokens": r["token_ids"][k:k + 5]})
    return bad


def needle_report(runs: list[dict], cells: list[dict]) -> list[dict]:
    """Per needle SD run: passkey retrieved by AR / SD, α on the needle prompt vs α of the same
    (context, policy, budget, drafter) greedy cell at the same gamma, and the kept fraction."""
    ar = {r["prompt_id"]: r for r in runs if r["kind"] == "needle_ar" and "error" not in r}
    alpha = {(c["context"], c["policy"], c["budget"], c["drafter"], c["gamma"]): c["alpha"]
             for c in cells if c["greedy"]}
    out = []
    for r in runs:
        if r["kind"] != "needle_sd" or "error" in r:
            continue
        a = ar.get(r["prompt_id"])
        key = r["passkey"]
        base = alpha.get((r["context"], r["policy"], r["budget"], r["drafter"], r["gamma"]))
        out.append({"context": r["context"], "drafter": r["drafter"], "policy": r["policy"], "budget": r["budget"],
                    "gamma": r["gamma"], "passkey": key, "depth": r["depth"],
                    "ar_retrieved": bool(a and key in a["text"]), "sd_retrieved": key in r["text"],
                    "ar_text": a["text"] if a else None, "sd_text": r["text"],
                    "alpha_needle": r["acceptance_rate"], "alpha_ordinary": base,
                    "alpha_ratio": (r["acceptance_rate"] / base) if base else None,
                    "needle_kept_fraction": r["needle_kept_fraction"]})
    return out


# ------------------------------------------------------------------------------------------------
# Reports
# ------------------------------------------------------------------------------------------------


def _f(x: Any, fmt: str = ".2f") -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return format(x, fmt) if math.isfinite(x) else "inf"
    return str(x)


def render_markdown(results: dict) -> str:
    """The Markdown report: setup, best gamma per budget, every cell, needle, lossless."""
    cfg = results["config"]
    mach = results["machine"]
    lines = ["# bd-ray evaluation matrix", ""]
    w = (mach.get("workers") or [{}])[0]
    lines += [f"- verifier `{cfg['models']['verifier']}`; drafters: "
              + ", ".join(f"`{k}` = `{v}`" for k, v in cfg["models"]["drafters"].items()),
              f"- {cfg['data']['prompts_per_context']} held-out prompts per context (corpus `{cfg['data']['corpus']}`, "
              f"split test, seed {cfg['data']['seed']}), {cfg['matrix']['max_new_tokens']} new tokens, "
              f"contexts {cfg['matrix']['contexts']} tokens",
              f"- machine: {mach['driver']['cpu_count']} CPUs, torch {mach['driver']['torch']}, "
              + (f"device {w.get('device', '?')} ({w.get('device_name', '')}), {w.get('torch_threads', '?')} torch "
                 f"threads per worker, {len(mach['workers'])} worker(s)" if mach.get("workers") else
                 f"torch threads {cfg['run']['torch_threads']}; no worker started in this run (every "
                 f"measurement from the journal; each run records its host and load)"),
              f"- isolation: {results['isolation']}",
              f"- wall time of this run {results['wall_s']:.0f} s; decoding measured over all runs "
              f"{sum(r.get('decode_s') or 0.0 for r in results['runs']):.0f} s"
              + (f"; report only: {results['missing']} measurements of the matrix not measured yet (left out)"
                 if results.get("missing") else ""),
              "- α = accepted/drafted, τ = 1 + accepted/cycles; tokens/s = decode throughput after prefill "
              "(pooled over prompts); speedup = SD tok/s / AR tok/s on the same prompts, AR measured right "
              "before each drafter's cells; step times in ms per cycle; cache = peak drafter KV entries per layer "
              "and KV head; plain = steps decoded without speculation (adaptive modes)", ""]
    lines += ["## Best gamma (by measured SD tokens/s)", "",
              "| context | mode | drafter | policy | budget | best γ | α | τ | SD tok/s | AR tok/s | speedup |",
              "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for b in results["best_gamma"]:
        lines.append(f"| {b['context']} | {b['mode']} | {b['drafter']} | {b['policy']} | {b['budget']} | {b['gamma']} | "
                     f"{_f(b['alpha'])} | {_f(b['tau'])} | {_f(b['sd_tokens_per_s'], '.1f')} | "
                     f"{_f(b['ar_tokens_per_s'], '.1f')} | {_f(b['speedup'])}× |")
    lines += ["", "## All cells", "",
              "| context | mode | drafter | policy | budget | γ | α | τ | per-position acceptance | SD tok/s | "
              "AR tok/s | speedup | draft ms | verify ms | cache | plain | lossless |",
              "|---:|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for c in results["cells"]:
        pp = " ".join(f"{x:.2f}" for x in c["per_position_acceptance"])
        ms = lambda s: _f(s * 1e3 if s is not None else None, ".1f")  # noqa: E731
        lines.append(f"| {c['context']} | {c['mode']} | {c['drafter']} | {c['policy']} | {c['budget']} | {c['gamma']} | "
                     f"{_f(c['alpha'])} | {_f(c['tau'])} | {pp} | {_f(c['sd_tokens_per_s'], '.1f')} | "
                     f"{_f(c['ar_tokens_per_s'], '.1f')} | {_f(c['speedup'])}× | {ms(c['draft_step_s'])} | "
                     f"{ms(c['verify_step_s'])} | {c['drafter_cache']} | {c['plain_steps']} | {c['lossless']} |")
    if results.get("needle"):
        lines += ["", "## Needle (passkey) check", "",
                  "| context | drafter | policy | budget | γ | AR retrieved | SD retrieved | α needle | α ordinary | "
                  "needle kept |", "|---:|---|---|---:|---:|---|---|---:|---:|---:|"]
        for n in results["needle"]:
            lines.append(f"| {n['context']} | {n['drafter']} | {n['policy']} | {n['budget']} | {n['gamma']} | "
                         f"{'yes' if n['ar_retrieved'] else 'no'} | {'yes' if n['sd_retrieved'] else 'no'} | "
                         f"{_f(n['alpha_needle'])} | {_f(n['alpha_ordinary'])} | {_f(n['needle_kept_fraction'])} |")
    ll = results["lossless"]
    lines += ["", f"## Lossless check: {ll['checked']} greedy runs compared with AR, {len(ll['failures'])} differ", ""]
    for f in ll["failures"]:
        lines.append(f"- FAIL {f['cell_id']} prompt {f['prompt_id']}: first difference at token {f['first_difference']}")
    if results.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {e['item']}: {e['error']}" for e in results["errors"]]
    if results.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in results["plots"]]
    return "\n".join(lines) + "\n"


def _budget_order(labels: Iterable[str]) -> list[str]:
    labels = list(labels)
    ints = sorted({int(b) for b in labels if b != FULL})
    return [str(b) for b in ints] + ([FULL] if FULL in set(labels) else [])


def make_plots(results: dict, out_dir: Path, alpha_gamma: int) -> list[str]:
    """Write the PNG plots (matplotlib, Agg); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = results["cells"]
    contexts = sorted({c["context"] for c in cells})
    paths = []
    for mode in sorted({c["mode"] for c in cells}):
        mc = [c for c in cells if c["mode"] == mode]
        # acceptance vs budget, one panel per context, one line per (drafter, policy)
        fig, axes = plt.subplots(1, len(contexts), figsize=(5 * len(contexts), 4), squeeze=False)
        for ax, ctx in zip(axes[0], contexts):
            cc = [c for c in mc if c["context"] == ctx and c["gamma"] == alpha_gamma]
            xs = _budget_order(c["budget"] for c in cc)
            pols = sorted({c["policy"] for c in cc if c["policy"] != "none"}) or ["none"]
            for d in sorted({c["drafter"] for c in cc}):
                for pol in pols:
                    pts = {c["budget"]: c["alpha"] for c in cc if c["drafter"] == d and c["policy"] in (pol, "none")}
                    x = [i for i, b in enumerate(xs) if b in pts]
                    ax.plot(x, [pts[xs[i]] for i in x], marker="o",
                            label=d if len(pols) == 1 else f"{d} / {pol}")
            ax.set_xticks(range(len(xs)), xs)
            ax.set_xlabel("drafter KV budget (tokens)")
            ax.set_ylabel(f"acceptance rate α (γ={alpha_gamma})")
            ax.set_ylim(0, 1)
            ax.set_title(f"context {ctx} tokens, {mode}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        p = out_dir / f"acceptance_vs_budget_{mode}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(str(p))
        # speedup vs gamma, one panel per context, one line per (drafter, policy, budget)
        fig, axes = plt.subplots(1, len(contexts), figsize=(5 * len(contexts), 4), squeeze=False)
        for ax, ctx in zip(axes[0], contexts):
            cc = [c for c in mc if c["context"] == ctx and c["speedup"] is not None]
            keys = sorted({(c["drafter"], c["policy"], c["budget"]) for c in cc},
                          key=lambda k: (k[0], k[1], k[2] == FULL, int(k[2]) if k[2] != FULL else 0))
            for d, pol, b in keys:
                pts = sorted((c["gamma"], c["speedup"]) for c in cc if (c["drafter"], c["policy"], c["budget"]) == (d, pol, b))
                ax.plot([g for g, _ in pts], [s for _, s in pts], marker="o",
                        label=f"{d} B={b}" + (f" {pol}" if pol != "none" and len({k[1] for k in keys} - {'none'}) > 1 else ""))
            ax.axhline(1.0, color="grey", lw=1, ls="--")
            ax.set_xticks(sorted({c["gamma"] for c in cc}))
            ax.set_xlabel("γ (tokens drafted per cycle)")
            ax.set_ylabel("speedup vs AR (tokens/s ratio)")
            ax.set_title(f"context {ctx} tokens, {mode}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        p = out_dir / f"speedup_vs_gamma_{mode}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(str(p))
    return paths


def write_outputs(results: dict, out_dir: str | Path, plots: bool = True, alpha_gamma: int = 1) -> dict:
    """Write ``results.json``, ``results.md`` and (``plots``) the PNGs into ``out_dir``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results["plots"] = make_plots(results, out, alpha_gamma) if (plots and results["cells"]) else []
    (out / "results.json").write_text(json.dumps(results, indent=1, default=_json_default))
    (out / "results.md").write_text(render_markdown(results))
    return {"json": str(out / "results.json"), "markdown": str(out / "results.md"), "plots": results["plots"]}


def _json_default(x: Any):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------


def _driver_info() -> dict:
    import torch
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

    from bd_ray.models import resolve_model_path

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
        elif not Path(src).expanduser().is_dir():
            raise ConfigError(f"models.drafters.{name}: {src!r} is not a checkpoint directory "
                              f"(train one with jobs/train_drafter.py, or use from-verifier:N)")
    return vpath


def _corpus_table(cfg: EvalJobConfig):
    from bd_ray import assets

    src = cfg.data.corpus
    path = assets.ensure_corpus(src) if src in assets.CORPORA else Path(src).expanduser()
    if not Path(path).exists():
        raise ConfigError(f"data.corpus: {src!r} is neither an embedded corpus {sorted(assets.CORPORA)} nor a path")
    return assets.load_corpus_table(path)


def _fmt_s(s: float) -> str:
    s = max(0.0, s)
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else f"{int(s // 60)}m{int(s % 60):02d}s"


def item_key(item: dict) -> str:
    """Stable identity of one measurement: kind, prompt (id and a hash of its tokens), mode, cell."""
    import hashlib

    toks = hashlib.sha256(json.dumps(item["prompt"]["token_ids"]).encode()).hexdigest()[:12]
    mode = json.dumps(item["mode"], sort_keys=True)
    cell = item.get("cell_id") or item.get("drafter")      # AR runs: the drafter group they baseline
    return f"{item['kind']}|{item['prompt']['prompt_id']}|{toks}|{mode}|{cell}"


class _Journal:
    """Append-only ``runs.journal.jsonl`` of finished measurements.

    Each line is ``{"fingerprint", "key", "record"}``, flushed and fsynced, so a run killed at any
    point loses at most the measurement in flight. The fingerprint covers what changes every
    measurement (models, corpus, policies, token counts, needle); the axes a user grows a matrix
    along (more prompts per context, more contexts, budgets, gammas or modes) are in each item's
    key instead, so a grown matrix reuses what was measured (prompt k does not depend on how many
    prompts are drawn). Lines with another fingerprint, or torn by a crash, are ignored on load.
    """

    def __init__(self, out_dir: Path, cfg: EvalJobConfig) -> None:
        import hashlib

        self.path = Path(out_dir) / "runs.journal.jsonl"
        dump = cfg.model_dump(mode="json")
        ident = {k: dump[k] for k in ("models", "data", "matrix", "needle")}
        ident["data"] = {k: v for k, v in ident["data"].items() if k != "prompts_per_context"}
        ident["matrix"] = {k: v for k, v in ident["matrix"].items() if k not in ("contexts", "budgets", "gammas", "modes")}
        self.fingerprint = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    def load(self) -> dict[str, dict]:
        done: dict[str, dict] = {}
        if not self.path.is_file():
            return done
        text = self.path.read_text()
        if text and not text.endswith("\n"):
            # a crash mid-write left a torn last line: cut it so later appends start on a new line
            text = text[:text.rfind("\n") + 1]
            with open(self.path, "r+") as f:
                f.truncate(len(text.encode()))
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue        # a line torn by a crash mid-write
            if entry.get("fingerprint") == self.fingerprint:
                done[entry["key"]] = entry["record"]
        return done

    def merge_from(self, other_dir: str | Path) -> tuple[int, int]:
        """Append the measurements journaled in ``other_dir`` (another process or machine that ran
        part of the same matrix) that this journal lacks; lines of another fingerprint (another
        config) and torn lines are left out. Returns ``(added, already_here)``.

        Raises:
            FileNotFoundError: ``other_dir`` has no journal.
        """
        src = Path(other_dir) / self.path.name
        if not src.is_file():
            raise FileNotFoundError(f"no {self.path.name} in {other_dir}")
        here = self.load()
        new: list[str] = []
        for line in src.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if entry.get("fingerprint") != self.fingerprint or entry.get("key") in here:
                continue
            here[entry["key"]] = entry["record"]
            new.append(line)
        if new:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write("\n".join(new) + "\n")
                f.flush()
                os.fsync(f.fileno())
        return len(new), len(here) - len(new)

    def append(self, item: dict, rec: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"fingerprint": self.fingerprint, "key": item_key(item), "record": rec},
                          default=_json_default)
        with open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())


class _Progress:
    """One line per finished measurement (with elapsed and ETA), one line per completed cell."""

    def __init__(self, items: list[dict], log: Callable[[str], None]):
        self.total = len(items)
        self.log = log
        self.done = 0
        self.t0 = time.perf_counter()
        self.cell_need: dict[str, int] = {}
        for it in items:
            if it["kind"] == "sd":
                self.cell_need[it["cell_id"]] = self.cell_need.get(it["cell_id"], 0) + 1
        self.cell_runs: dict[str, list[dict]] = {}
        self.ar = _ARIndex(())

    def update(self, item: dict, rec: dict) -> None:
        self.done += 1
        el = time.perf_counter() - self.t0
        eta = el / self.done * (self.total - self.done)
        what = f"{rec['prompt_id']} {item['kind']:<9} {item['mode']['name']}"
        if "error" in rec:
            msg = f"ERROR {rec['error'].splitlines()[0][:200]}"
        elif item["kind"] in ("ar", "needle_ar"):
            self.ar.add(rec)
            msg = f"{rec['tokens_per_s']:.1f} tok/s (prefill {rec['verifier_prefill_s']:.1f}s)"
        else:
            what += f" {item['drafter']} {item['policy']} B={budget_label(item['budget'])} γ={item['gamma']}"
            a = self.ar.get(rec)
            sp = f" {rec['tokens_per_s'] / a['tokens_per_s']:.2f}x" if a and a["tokens_per_s"] else ""
            msg = f"α {rec['acceptance_rate']:.2f} τ {rec['mean_accepted_length']:.2f} {rec['tokens_per_s']:.1f} tok/s{sp}"
        self.log(f"[{self.done:>4}/{self.total}] {what}: {msg} | {_fmt_s(el)} elapsed, ETA {_fmt_s(eta)}")
        if item["kind"] == "sd" and "error" not in rec:
            rs = self.cell_runs.setdefault(item["cell_id"], [])
            rs.append(rec)
            if len(rs) == self.cell_need[item["cell_id"]]:
                ars = [self.ar.get(r) for r in rs]
                dr = sum(r["drafted"] for r in rs)
                alpha = sum(r["accepted"] for r in rs) / dr if dr else 0.0
                sd = _pooled_rate((r["n_tokens"] for r in rs), (r["decode_s"] for r in rs))
                arr = _pooled_rate((x["n_tokens"] for x in ars), (x["decode_s"] for x in ars)) if all(ars) else None
                sp = f"{sd / arr:.2f}x" if sd and arr else "?"
                self.log(f"  cell {item['cell_id']} done: α {alpha:.3f}, SD {sd or 0:.1f} tok/s, "
                         f"AR {arr or 0:.1f} tok/s, speedup {sp} ({len(rs)} prompts)")


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
    from bd_ray.ray_connect import connect

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
        HeldOutError: the corpus would leak training works into prompts.
        TimeoutError: nothing finished within ``run.item_timeout_s``.
        LosslessError: greedy SD differed from AR (raised after the outputs are written).
        EvalItemError: some measurement raised (raised after the outputs are written).
    """
    t_start = time.perf_counter()
    out_dir = Path(output_dir or cfg.run.output_dir)
    from bd_ray.models import load_tokenizer

    vpath = _check_models(cfg)
    tok = load_tokenizer(vpath)
    table = _corpus_table(cfg)
    t = time.perf_counter()
    memo: dict = {}
    prompts = select_prompts(table, tok, cfg.matrix.contexts, cfg.data.prompts_per_context, cfg.data.seed, memo)
    needles = {}
    if cfg.needle.enabled:
        for ctx in cfg.matrix.contexts:
            needles[ctx] = make_needle_prompt(table, tok, ctx, cfg.needle.depth, cfg.needle.digits,
                                              cfg.needle.seed, memo)
    for ps in list(prompts.values()) + [[p] for p in needles.values()]:
        for p in ps:
            if p.split != "test":
                raise HeldOutError(f"prompt {p.prompt_id} comes from split {p.split!r}")
    items = build_items(cfg, prompts, needles)
    groups = list(dict.fromkeys(it["group"] for it in items))
    log(f"[bd-ray] {sum(len(v) for v in prompts.values())} held-out prompts ({time.perf_counter() - t:.1f}s), "
        f"{len({it['cell_id'] for it in items if it['kind'] == 'sd'})} cells, {len(items)} measurements")

    runs: list[dict] = []
    errors: list[dict] = []
    journal = _Journal(out_dir, cfg)
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
    progress = _Progress(items, log)
    for it, k in zip(items, keys):   # journaled records first, so AR records are there for the lossless check
        if k in done:
            runs.append(done[k])
            progress.update(it, done[k])
    items_left = [it for it, k in zip(items, keys) if k not in done]
    missing = 0
    if report_only:
        missing, items_left = len(items_left), []
        log(f"[bd-ray] report only: {len(items) - missing} of {len(items)} measurements journaled, "
            f"{missing} left out")

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
                log(f"!!! LOSSLESS FAILURE: cell {rec['cell_id']} prompt {rec['prompt_id']}: greedy SD tokens differ "
                    f"from AR")

    def failed(item: dict, exc: BaseException) -> dict:
        desc = f"{item['kind']} {item['prompt']['prompt_id']} {item.get('cell_id', item['mode']['name'])}"
        errors.append({"item": desc, "error": f"{type(exc).__name__}: {exc}"})
        return {"kind": item["kind"], "prompt_id": item["prompt"]["prompt_id"], "mode": item["mode"]["name"],
                "cell_id": item.get("cell_id"), "error": f"{type(exc).__name__}: {exc}"}

    workers_info: list[dict] = []
    if not items_left:
        pass                       # everything journaled (or report only): no models to load
    elif cfg.run.executor == "local":
        import torch

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
    failures = lossless_failures(runs)
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
        "lossless": {"checked": sum(1 for r in runs if r["kind"] in ("sd", "needle_sd") and r.get("greedy")
                                    and "error" not in r),
                     "failures": failures},
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
