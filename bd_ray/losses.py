"""The BudgetDraft training objective, computed chunk-wise from hidden states.

Source: the BudgetDraft recipe, docs/DESIGN.md section 2 (the paper's section on
acceptance-aware multi-view training).

One training sample is a window ``x[0 : P + T]`` = prefix (``P`` tokens) + continuation (``T``).

- Teacher (frozen verifier, full KV cache): greedy argmax ``y_t`` of its next-token distribution at
  each continuation position ``P + t`` (``t = 0..T-1``; input token ``x[P+t]``, so ``y_t`` is its
  prediction of position ``P+t+1``); optionally its top-k log-probs (soft targets, ``L_B``).
- Student (drafter): one **no-grad** prefill of the prefix gives its full prefix cache (no
  gradient flows into prefix KV, as in the paper); the continuation ``x[P : P+T]`` is then fed
  with its true positions, with gradient, over
  * the full prefix cache -> logits ``S_full``: ``L_A = CE(S_full, y)`` (under greedy
    verification a draft is accepted iff it equals the verifier argmax, so ``L_A`` maximises
    greedy acceptance);
  * ``K = views_per_step`` sparse views of that same cache, each compacted to a budget ``B_k``
    (``bd_ray.kvcache.compact_cache`` -- the same function the inference caches use) ->
    ``L_C = mean_k CE(S_sparse_k, y)``, a view contributing 0 when ``B_k >= P`` (the cache would
    stay full).
- ``L = L_A + lambda * L_C + lb_weight * L_B`` with the optional hinge
  ``L_B = mean_t max(0, KL(T_full || S_sparse) - KL(T_sparse || S_sparse))`` on the teachers'
  top-k supports (``T_sparse`` is the teacher over its own prefix cache compacted to ``B``).

Soft-target variants (``target``): ``topk_kl`` replaces the CE by ``KL(T_full^k || S)`` with the
teacher's top-k renormalised; ``tv`` by the total variation ``1/2 sum |p - q|`` (teacher top-k
support, student mass outside it counted fully), which equals ``1 -`` the expected acceptance of a
sampled draft under speculative sampling.

Memory: logits are never materialised for the whole continuation: each ``logits_chunk`` rows of
hidden states go through the LM head and the loss inside ``torch.utils.checkpoint`` (the chunk's
``[chunk, vocab]`` logits are recomputed in backward rather than stored).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from bd_ray.config import SparsePolicyConfig
from bd_ray.kvcache import clone_cache, compact_cache, forward_with_cache

__all__ = [
    "TeacherTargets",
    "LossTerms",
    "BudgetSampler",
    "head_params",
    "chunked_continuation_loss",
    "full_ce_reference",
    "budgetdraft_loss",
]

TARGET_KINDS = ("hard", "topk_kl", "tv")


# ------------------------------------------------------------------------------------------
# Targets and results
# ------------------------------------------------------------------------------------------


@dataclass
class TeacherTargets:
    """Teacher targets for one window's continuation (``T`` positions).

    Attributes:
        argmax: ``[T]`` long, the teacher's greedy next token at each continuation position
            (full prefix cache).
        topk_ids: ``[T, k]`` long or None, the teacher's top-k token ids (full cache).
        topk_logprobs: ``[T, k]`` float or None, their log-probs under the full softmax.
        sparse: budget -> (``[T, k]`` ids, ``[T, k]`` log-probs) of the teacher over its own
            prefix cache compacted to that budget (only needed by ``L_B``).
    """

    argmax: torch.Tensor
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    sparse: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> "TeacherTargets":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return TeacherTargets(mv(self.argmax), mv(self.topk_ids), mv(self.topk_logprobs),
                              {b: (i.to(device), lp.to(device)) for b, (i, lp) in self.sparse.items()})

    @property
    def length(self) -> int:
        return int(self.argmax.shape[0])


@dataclass
class LossTerms:
    """Result of :func:`budgetdraft_loss` for one window.

    ``loss`` carries the graph (scalar); the rest are detached floats for metrics. ``l_c`` is the
    mean over the views (0 when every view's budget >= prefix length or ``full_cache_only``);
    ``agree_full`` / ``agree_views`` are top-1 agreement fractions with the teacher argmax.
    """

    loss: torch.Tensor
    l_a: float
    l_c: float
    l_b: float
    budgets: list[int]
    agree_full: float
    agree_views: list[float | None]
    tokens: int


# ------------------------------------------------------------------------------------------
# Budget sampler
# ------------------------------------------------------------------------------------------


class BudgetSampler:
    """Seeded sampler of KV budgets from a weighted set, one draw per window (docs/DESIGN.md sec 2).

    The draw for micro step ``s`` on data-parallel rank ``r`` depends only on ``(seed, s, r)``
    (``numpy`` seed sequence ``[seed, s, 0x42D, r]``), never on how many draws came before: a run
    resumed on any rank draws exactly what an uninterrupted one would. Each rank draws its own
    budgets, as the paper draws one per window (batch 1), so an optimizer step over ``world``
    ranks sees ``world`` times the views of one rank instead of the same budget repeated. Rank 0's
    stream is the one-process stream (a seed sequence pads with zeros: ``[seed, s, 0x42D]`` ==
    ``[seed, s, 0x42D, 0]``), so single-process runs draw what they always drew.

    Ranks stay in lock-step despite different budgets: the drafter's graph has the same shape for
    every budget (a view with ``B >= P`` drops out of the loss without changing the order in which
    parameter gradients become ready, which ZeRO-2's reduce buckets follow), and a ZeRO-3 teacher
    computing ``L_B`` targets is given the union of every rank's draws (:meth:`sample_all_ranks`).

    Args:
        budgets: budget (tokens) -> weight (> 0; normalised here).
        seed: base seed (the run seed, 42 by default).
        fixed: if set, always this budget (the fixed-budget ablation).
    """

    def __init__(self, budgets: Mapping[int, float], seed: int = 42, fixed: int | None = None):
        if fixed is None and not budgets:
            raise ValueError("loss.budgets is empty and no loss.fixed_budget is set")
        self.fixed = fixed
        self.values = np.array(sorted(budgets), dtype=np.int64)
        w = np.array([float(budgets[b]) for b in sorted(budgets)], dtype=np.float64)
        if (w <= 0).any() or not np.isfinite(w).all():
            raise ValueError(f"loss.budgets weights must be finite and > 0, got {dict(budgets)}")
        self.probs = w / w.sum()
        self.seed = int(seed)

    def sample(self, step: int, k: int = 1, rank: int = 0) -> list[int]:
        """``k`` budgets (with replacement) for micro step ``step`` on data-parallel rank ``rank``."""
        if self.fixed is not None:
            return [int(self.fixed)] * k
        rng = np.random.default_rng([self.seed, int(step), 0x42D, int(rank)])
        return [int(b) for b in rng.choice(self.values, size=k, p=self.probs)]

    def sample_all_ranks(self, step: int, k: int, world: int) -> list[int]:
        """The distinct budgets any of ``world`` ranks draws at ``step`` (sorted): what a sharded
        teacher computes ``L_B`` targets for, so its collective forwards match on every rank."""
        return sorted({b for r in range(world) for b in self.sample(step, k, r)})


# ------------------------------------------------------------------------------------------
# Chunked head + loss
# ------------------------------------------------------------------------------------------


def head_params(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head of a HF causal LM: (``[V, d]`` weight, ``[V]`` bias or None).

    Works for tied embeddings (the head weight is the embedding matrix). The drafter must hold its
    full head on every rank (ZeRO-0/1/2); a ZeRO-3 partitioned head is refused.

    Raises:
        ValueError: the model has no output embeddings, or the head weight is partitioned.
    """
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (LM head)")
    w = head.weight
    if w.dim() != 2 or w.numel() == 0:
        raise ValueError("the drafter's LM head weight is partitioned or empty (ZeRO-3?); "
                         "the drafter must use ZeRO stage <= 2")
    return w, getattr(head, "bias", None)


def _logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    out = F.linear(h, w, b)
    return out.float()


def _topk_kl(logq: torch.Tensor, ids: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    """Per-row KL(p || q) with p = teacher top-k renormalised: ``[n, V]``,``[n,k]``,``[n,k]`` -> ``[n]``."""
    logp = lp.float() - torch.logsumexp(lp.float(), dim=-1, keepdim=True)
    return (logp.exp() * (logp - logq.gather(-1, ids))).sum(-1)


def _chunk_terms(h, w, b, y, ids, lp, sids, slp, kind: str, want_lb: bool):
    """Loss sums for one chunk of rows. Returns (main_sum, lb_sum, correct) -- scalars."""
    logits = _logits(h, w, b)  # [n, V] fp32, freed after this function (recomputed in backward)
    correct = (logits.detach().argmax(-1) == y).sum()
    if kind == "hard":
        # ignore_index: a teacher argmax outside a draft vocabulary cannot be drafted (-100 rows)
        main = F.cross_entropy(logits, y, reduction="sum", ignore_index=-100)
        logq = None
    else:
        logq = torch.log_softmax(logits, dim=-1)
        if kind == "topk_kl":
            main = _topk_kl(logq, ids, lp).sum()
        else:  # tv: 1/2 (sum_topk |p - q| + (1 - sum_topk q))
            p = torch.softmax(lp.float(), dim=-1)
            qk = logq.gather(-1, ids).exp()
            main = (0.5 * ((p - qk).abs().sum(-1) + (1.0 - qk.sum(-1)).clamp(min=0.0))).sum()
    if want_lb:
        if logq is None:
            logq = torch.log_softmax(logits, dim=-1)
        lb = torch.relu(_topk_kl(logq, ids, lp) - _topk_kl(logq, sids, slp)).sum()
    else:
        lb = logits.new_zeros(())
    return main, lb, correct


def chunked_continuation_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: TeacherTargets,
    kind: str = "hard",
    chunk: int = 64,
    lb_budget: int | None = None,
    use_checkpoint: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean per-position loss of continuation hidden states against teacher targets, chunk-wise.

    Args:
        hidden: ``[T, d]`` or ``[1, T, d]`` final (post-norm) hidden states of the drafter at the
            continuation positions.
        weight, bias: the LM head (``[V, d]``, ``[V]`` or None), see :func:`head_params`.
        targets: teacher targets of length ``T``.
        kind: ``hard`` (CE vs argmax), ``topk_kl`` or ``tv`` (module docstring).
        chunk: rows per head/loss chunk; at most ``[chunk, V]`` fp32 logits exist at once.
        lb_budget: also compute the ``L_B`` hinge against ``targets.sparse[lb_budget]``.
        use_checkpoint: recompute each chunk's logits in backward instead of storing them.

    Returns:
        ``(loss, l_b, correct)``: mean loss over the ``T`` positions (scalar tensor, with graph),
        mean ``L_B`` hinge (scalar tensor; 0 when ``lb_budget`` is None), and the count of
        positions whose student argmax equals the teacher argmax (int).

    Raises:
        ValueError: unknown ``kind``, length mismatch, or soft targets / ``L_B`` requested without
            the teacher's top-k.
    """
    if kind not in TARGET_KINDS:
        raise ValueError(f"loss.target must be one of {TARGET_KINDS}, got {kind!r}")
    if hidden.dim() == 3:
        if hidden.shape[0] != 1:
            raise ValueError(f"hidden must be [T, d] or [1, T, d], got {tuple(hidden.shape)}")
        hidden = hidden[0]
    T = hidden.shape[0]
    if targets.length != T:
        raise ValueError(f"teacher targets cover {targets.length} positions, hidden has {T}")
    need_topk = kind != "hard" or lb_budget is not None
    if need_topk and (targets.topk_ids is None or targets.topk_logprobs is None):
        raise ValueError(f"loss.target={kind!r} / L_B need the teacher's top-k (loss.top_k > 0)")
    if lb_budget is not None and lb_budget not in targets.sparse:
        raise ValueError(f"L_B needs the teacher's sparse top-k at budget {lb_budget}")
    want_lb = lb_budget is not None
    main_sum = hidden.new_zeros((), dtype=torch.float32)
    lb_sum = hidden.new_zeros((), dtype=torch.float32)
    correct = 0
    dummy = targets.argmax.new_zeros((1, 1))
    for s in range(0, T, chunk):
        e = min(T, s + chunk)
        y = targets.argmax[s:e]
        ids = targets.topk_ids[s:e] if need_topk else dummy
        lp = targets.topk_logprobs[s:e] if need_topk else dummy
        if want_lb:
            sids, slp = (t[s:e] for t in targets.sparse[lb_budget])
        else:
            sids, slp = dummy, dummy
        args = (hidden[s:e], weight, bias, y, ids, lp, sids, slp, kind, want_lb)
        if use_checkpoint and torch.is_grad_enabled() and hidden.requires_grad:
            m, lb, c = checkpoint(_chunk_terms, *args, use_reentrant=False)
        else:
            m, lb, c = _chunk_terms(*args)
        main_sum = main_sum + m
        lb_sum = lb_sum + lb
        correct += int(c)
    return main_sum / T, lb_sum / T, correct


def full_ce_reference(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      argmax: torch.Tensor) -> torch.Tensor:
    """Unchunked reference: mean CE of ``hidden @ weight.T`` vs ``argmax`` (tests only: it
    materialises ``[T, V]`` logits)."""
    if hidden.dim() == 3:
        hidden = hidden[0]
    return F.cross_entropy(_logits(hidden, weight, bias), argmax)


# ------------------------------------------------------------------------------------------
# The BudgetDraft loss for one window
# ------------------------------------------------------------------------------------------


def _continuation_hidden(model, cache, cont_ids: torch.Tensor, start: int) -> torch.Tensor:
    """``[1, T, d]`` post-norm hidden states of ``cont_ids`` ``[1, T]`` fed after ``cache`` at
    true positions ``start..start+T-1`` (``bd_ray.kvcache.forward_with_cache``)."""
    out = forward_with_cache(model, cache, cont_ids, start, hidden_only=True)
    h = out if torch.is_tensor(out) else getattr(out, "hidden", None)
    if h is None:  # tolerate a (hidden, cache) tuple or an object with last_hidden_state
        h = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
    return h


def _subset_head(weight, bias, targets: TeacherTargets, vocab, kind: str, lb_weight: float):
    """Head rows of a draft vocabulary and the targets re-indexed into it (-100 outside)."""
    if kind != "hard" or lb_weight > 0:
        raise ValueError("a draft vocabulary (model.draft_vocab) supports loss.target='hard' without L_B only")
    if weight.shape[0] != vocab.vocab_size:
        raise ValueError(f"draft vocabulary is over {vocab.vocab_size} tokens, the head has {weight.shape[0]} rows")
    ids = torch.from_numpy(vocab.ids).to(weight.device)
    index = vocab.index_of().to(targets.argmax.device)
    return (weight.index_select(0, ids), None if bias is None else bias.index_select(0, ids),
            TeacherTargets(index[targets.argmax]))


def budgetdraft_loss(
    model: torch.nn.Module,
    prefix_cache,
    cont_ids: torch.Tensor,
    prefix_len: int,
    targets: TeacherTargets,
    budgets: Sequence[int],
    lam: float = 0.5,
    policy: SparsePolicyConfig | None = None,
    queries: torch.Tensor | None = None,
    kind: str = "hard",
    lb_weight: float = 0.0,
    full_cache_only: bool = False,
    chunk: int = 64,
    draft_vocab=None,
) -> LossTerms:
    """``L = L_A + lam * L_C (+ lb_weight * L_B)`` for one window (docs/DESIGN.md sec 2).

    Args:
        model: the drafter (HF causal LM; train mode, parameters with grad).
        prefix_cache: the drafter's **no-grad** prefill cache of the ``prefix_len`` prefix tokens
            (``bd_ray.kvcache.prefill(...).cache``). It is not modified: each view is a compacted
            copy and the full branch runs on a clone.
        cont_ids: ``[1, T]`` continuation token ids (teacher-forced, true positions
            ``prefix_len..prefix_len+T-1``).
        prefix_len: ``P``.
        targets: teacher targets for the ``T`` positions.
        budgets: the K sampled view budgets (tokens). Ignored with ``full_cache_only``.
        lam: weight of ``L_C`` (paper 0.5).
        policy: sparse policy of the views (``SparsePolicyConfig``; default chunk_topk).
        queries: ``[1, q_heads, W, d]`` last prefix queries, needed by ``snapkv`` / ``last_query``.
        kind: ``hard`` | ``topk_kl`` | ``tv``.
        lb_weight: weight of ``L_B`` (0 = off, the paper).
        full_cache_only: the naive-drafter ablation (``L = L_A``).
        chunk: rows per head/loss chunk.
        draft_vocab: a :class:`bd_ray.draft_vocab.DraftVocab`: train the head over that subset
            only, as it will decode (FR-Spec); teacher argmaxes outside it are left out of the
            cross-entropy (they count as disagreements). ``kind="hard"`` only.

    Returns:
        :class:`LossTerms` (``loss`` with graph into the drafter's parameters only).

    Raises:
        ValueError: bad ``kind``; a budget below the policy's minimum (from ``bd_ray.sparse``);
            missing top-k targets for soft kinds / ``L_B``.
    """
    policy = policy or SparsePolicyConfig()
    weight, bias = head_params(model)
    if draft_vocab is not None:
        weight, bias, targets = _subset_head(weight, bias, targets, draft_vocab, kind, lb_weight)
    T = int(cont_ids.shape[-1])
    l_c_terms: list[torch.Tensor] = []
    l_b_terms: list[torch.Tensor] = []
    agree_views: list[float | None] = []
    used: list[int] = []
    if not full_cache_only:
        for B in budgets:
            B = int(B)
            used.append(B)
            if B >= prefix_len:  # the cache would stay full: L_C = 0 for this view (paper)
                l_c_terms.append(torch.zeros((), device=cont_ids.device))
                agree_views.append(None)
                continue
            view = compact_cache(prefix_cache, B, policy, queries=queries)
            h = _continuation_hidden(model, view, cont_ids, prefix_len)
            lb_b = B if lb_weight > 0 else None
            lc, lb, corr = chunked_continuation_loss(h, weight, bias, targets, kind, chunk, lb_budget=lb_b)
            l_c_terms.append(lc)
            if lb_b is not None:
                l_b_terms.append(lb)
            agree_views.append(corr / T)
            del view, h
    full = clone_cache(prefix_cache)
    h = _continuation_hidden(model, full, cont_ids, prefix_len)
    l_a, _, corr_full = chunked_continuation_loss(h, weight, bias, targets, kind, chunk)
    del full, h
    loss = l_a
    l_c = torch.stack(l_c_terms).mean() if l_c_terms else None
    if l_c is not None and lam != 0.0:
        loss = loss + lam * l_c
    l_b = torch.stack(l_b_terms).mean() if l_b_terms else None
    if l_b is not None:
        loss = loss + lb_weight * l_b
    return LossTerms(
        loss=loss,
        l_a=float(l_a.detach()),
        l_c=float(l_c.detach()) if l_c is not None else 0.0,
        l_b=float(l_b.detach()) if l_b is not None else 0.0,
        budgets=used,
        agree_full=corr_full / T,
        agree_views=agree_views,
        tokens=T,
    )
