"""Verification of one block of drafted tokens: accepted, recovered and bonus tokens.

Terms follow vLLM's ``RejectionSampler``:

* accepted tokens: the longest prefix of the γ drafts that verification keeps;
* recovered token: on the first rejection, a token drawn from ``norm(max(p - q, 0))`` (sampling)
  or the verifier argmax (greedy) that replaces the rejected draft;
* bonus token: when all γ drafts are accepted, one more token drawn from the verifier's
  distribution at position γ+1 (so every verifier forward emits at least one token).

Greedy rule: a draft is accepted iff it equals the verifier's argmax at its position; the output
is then token-for-token the verifier's greedy decoding. Sampling rule (Leviathan et al. 2023,
Chen et al. 2023): accept draft ``x ~ q`` with probability ``min(1, p(x)/q(x))``; on rejection
sample from ``norm(max(p - q, 0))``. The emitted tokens are then distributed exactly as ``p``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bd_ray.speculative.sampling import sample_from

__all__ = ["Verdict", "verify_greedy", "verify_greedy_batch", "verify_sampling"]


@dataclass(frozen=True)
class Verdict:
    """Outcome of verifying one block.

    Attributes:
        num_accepted: accepted drafts, ``0..γ``.
        next_token: the recovered token (``num_accepted < γ``) or the bonus token (``== γ``).
    """

    num_accepted: int
    next_token: int

    def emitted(self, drafts: list[int]) -> list[int]:
        """Tokens this block emits in order: the accepted drafts, then the recovered/bonus token."""
        return list(drafts[: self.num_accepted]) + [self.next_token]


def verify_greedy(drafts: list[int], target_logits: torch.Tensor) -> Verdict:
    """Greedy verification.

    Args:
        drafts: γ drafted token ids.
        target_logits: ``[γ + 1, vocab]`` verifier logits; row ``i`` predicts the token after
            ``drafts[:i]``.

    Returns:
        The verdict; ``next_token`` is the verifier argmax at the first mismatch (or bonus).
    """
    target = target_logits.argmax(dim=-1).tolist()
    n = 0
    while n < len(drafts) and drafts[n] == target[n]:
        n += 1
    return Verdict(n, int(target[n]))


def verify_greedy_batch(drafts: list[list[int]], target_logits: list[torch.Tensor]) -> list[Verdict]:
    """Greedy verification of many rows' blocks at once (per-row γ, 0 allowed).

    Args:
        drafts: per row its γ_r drafted ids.
        target_logits: per row ``[γ_r + 1, vocab]`` verifier logits (as :func:`verify_greedy`).

    Returns:
        One verdict per row, equal to :func:`verify_greedy` of that row alone. The argmax runs once
        over the rows' concatenated logits (one device sync for the batch, as vLLM's flattened
        draft layout with per-request counts).
    """
    if not drafts:
        return []
    target = torch.cat(target_logits).argmax(dim=-1).tolist()
    out, at = [], 0
    for d, logits in zip(drafts, target_logits):
        row = target[at: at + logits.shape[0]]
        at += logits.shape[0]
        n = 0
        while n < len(d) and d[n] == row[n]:
            n += 1
        out.append(Verdict(n, int(row[n])))
    return out


def verify_sampling(drafts: list[int], draft_probs: torch.Tensor, target_probs: torch.Tensor,
                    generator: torch.Generator | None) -> Verdict:
    """Speculative rejection sampling.

    Args:
        drafts: γ drafted token ids, draft ``i`` sampled from ``draft_probs[i]``.
        draft_probs: ``[γ, vocab]`` the exact filtered q each draft was sampled from.
        target_probs: ``[γ + 1, vocab]`` filtered verifier p (same temperature/top-k/top-p).
        generator: seeded generator (on the probs' device) or ``None``.

    Returns:
        The verdict.
    """
    gamma = len(drafts)
    if gamma:
        idx = torch.tensor(drafts, device=target_probs.device)
        rows = torch.arange(gamma, device=target_probs.device)
        p_x = target_probs[rows, idx]
        q_x = draft_probs[rows, idx]
        u = torch.rand(gamma, generator=generator, device=target_probs.device)
        # accept iff u < p/q, written as u * q < p to avoid dividing by q (q(x) > 0 since x ~ q)
        accepted = (u * q_x < p_x).tolist()
    else:
        accepted = []
    n = 0
    while n < gamma and accepted[n]:
        n += 1
    if n == gamma:
        return Verdict(n, int(sample_from(target_probs[gamma], generator)))
    residual = (target_probs[n] - draft_probs[n]).clamp_min(0.0)
    if float(residual.sum()) <= 0.0:
        # p == q exactly at this position yet the draft was rejected: impossible in exact
        # arithmetic (u < 1 = p/q); with rounding fall back to p itself, which is still exact.
        residual = target_probs[n]
    return Verdict(n, int(sample_from(residual, generator)))
