"""Batch-level speculation policy: the γ of every decoding row for one engine step, and why.

One step drafts ``max γ`` drafter forwards for the rows that draft and runs one verifier forward
over every row's block, so the cost of γ is shared by the batch. With per-row acceptance
estimates ``p_r`` (each adaptive row's :class:`bd_ray.speculative.adaptive.GammaController`) and
step costs measured *at this batch size* (plain step ``T_v(B, 1)``, drafter step ``t_d(B)``,
extra verified token ``s(B)``), a uniform γ for the adaptive rows gives

    tokens/s(γ) = Σ_r E(p_r, γ) / (γ·t_d(B) + T_v(B, 1) + γ·s(B)),     plain: B / T_v(B, 1),

with E the expected tokens per cycle (Leviathan et al. 2023). The policy picks the best γ and
decodes plainly (γ = 0) when no γ beats plain decoding by ``min_gain``: in the compute-bound regime
of a large batch, verifying extra tokens costs more than it returns (SGLang's adaptive steps,
vLLM's ``disable_by_batch_size``, which ``disable_above`` reproduces as a hard rule). While off,
it probes with γ = 1 every ``probe_every`` steps, so acceptance and costs stay measured.

Rows the policy leaves alone: ``speculative=False`` rows and rows without a usable drafter
(γ = 0), rows with a fixed γ (an explicit choice: ``min(γ, remaining - 1)``, so a seeded sampled
row reproduces its text in any batch), and a single adaptive row decoding alone, which keeps its
own controller (the batch-1 behaviour of :mod:`bd_ray.speculative.adaptive`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bd_ray.speculative.adaptive import CONSTANT_PRIOR, Ema, expected_tokens

__all__ = ["BatchSpecPolicy", "BatchStats"]


def _bucket(b: int) -> int:
    """Batch sizes measured together (1, 2, 3-4, 5-8, ...): costs change smoothly with B."""
    return 1 << max(0, (b - 1).bit_length())


@dataclass
class BatchStats:
    """Per-engine counters of decode steps (reported by :meth:`BatchEngine.stats`).

    Attributes:
        steps: decode steps run.
        rows: sum over steps of decoding rows (``rows / steps`` = mean batch size).
        tokens: tokens emitted by decode steps (``tokens / steps`` = tokens per step).
        gamma_chosen: steps by the largest γ drafted in them (``"0"`` = a plain step).
        last_reason: why the latest batch decision for adaptive rows was what it was.
        max_rows: the largest batch decoded in one step.
    """

    steps: int = 0
    rows: int = 0
    tokens: int = 0
    gamma_chosen: dict[str, int] = field(default_factory=dict)
    last_reason: str | None = None
    max_rows: int = 0

    def record(self, rows: int, tokens: int, gamma: int) -> None:
        self.steps += 1
        self.rows += rows
        self.tokens += tokens
        self.max_rows = max(self.max_rows, rows)
        self.gamma_chosen[str(gamma)] = self.gamma_chosen.get(str(gamma), 0) + 1

    def as_dict(self) -> dict:
        """JSON-ready: the counters plus ``rows_per_step`` and ``tokens_per_step`` (means)."""
        return {"steps": self.steps, "rows_per_step": self.rows / self.steps if self.steps else 0.0,
                "tokens_per_step": self.tokens / self.steps if self.steps else 0.0,
                "max_rows": self.max_rows, "gamma_chosen": dict(sorted(self.gamma_chosen.items())),
                "last_reason": self.last_reason}


class BatchSpecPolicy:
    """Chooses γ per row and step (see the module docstring).

    Args:
        max_gamma: the largest γ the batch decision may pick (each row also caps at its own γ).
        min_gain: speculate only when expected tokens/s beats plain decoding by this factor.
        disable_above: never speculate (adaptive rows) with more decoding rows than this.
        probe_every: plain batch steps between γ = 1 probes.
        prior_draft_ratio, prior_slope_ratio: ``t_d / T_v(B, 1)`` and ``s / T_v(B, 1)`` until measured
            (the engine sets its measured :class:`bd_ray.speculative.adaptive.CostPrior`: :attr:`prior`).
    """

    def __init__(self, max_gamma: int = 8, min_gain: float = 1.05, disable_above: int | None = None,
                 probe_every: int = 16, prior_draft_ratio: float = CONSTANT_PRIOR.draft_ratio,
                 prior_slope_ratio: float = CONSTANT_PRIOR.slope_ratio,
                 weight: float = 0.3) -> None:
        self.max_gamma = max_gamma
        self.min_gain = min_gain
        self.disable_above = disable_above
        self.probe_every = probe_every
        self.prior = (prior_draft_ratio, prior_slope_ratio)
        self.weight = weight
        self._plain: dict[int, Ema] = {}
        self._draft: dict[int, Ema] = {}
        self._slope: dict[int, Ema] = {}
        self._off_steps = 0
        self.stats = BatchStats()

    def _ema(self, table: dict[int, Ema], b: int) -> Ema:
        return table.setdefault(_bucket(b), Ema(self.weight))

    # ---- decisions ----------------------------------------------------------------------------
    def choose(self, rows: list[Any]) -> dict[Any, int]:
        """γ for each decoding row (``Row`` objects; 0 = a plain step); sets ``row.plain_reason``."""
        out: dict[Any, int] = {}
        adaptive = []
        for r in rows:
            limit = r.checker.remaining() - 1
            if not r.spec:
                out[r] = 0
                r.plain_reason = r.fallback or "speculative=False requested"
            elif limit < 1:
                out[r] = 0
                r.plain_reason = r.plain_reason or "one token left: nothing to draft"
            elif r.controller is None:
                out[r] = min(r.gamma, limit)
            elif len(rows) == 1:
                g = r.controller.next_gamma(limit + 1)
                out[r] = g
                if g == 0:
                    r.plain_reason = r.controller.stats.stopped_reason or "adaptive: measuring a plain step"
            else:
                adaptive.append(r)
        if adaptive:
            g, reason = self._batch_gamma(adaptive, len(rows))
            self.stats.last_reason = reason
            for r in adaptive:
                out[r] = min(g, r.gamma, r.checker.remaining() - 1)
                if out[r] == 0:
                    r.plain_reason = reason
        return out

    def _batch_gamma(self, rows: list[Any], b: int) -> tuple[int, str]:
        if self.disable_above is not None and b > self.disable_above:
            return 0, f"batch policy: {b} decoding rows > disable_above={self.disable_above}"
        v1 = self._ema(self._plain, b).value
        if v1 is None:
            return 0, f"batch policy: measuring the plain step at {b} rows"
        td = self._ema(self._draft, b).value
        slope = self._ema(self._slope, b).value
        td = self.prior[0] * v1 if td is None else td
        slope = self.prior[1] * v1 if slope is None else max(0.0, slope)
        ps = [r.controller.acceptance for r in rows]
        top = max(1, min(self.max_gamma, max(r.gamma for r in rows)))

        def rate(g: int) -> float:
            return sum(expected_tokens(p, g) for p in ps) / (g * td + v1 + g * slope)

        plain = len(ps) / v1
        g = max(range(1, top + 1), key=rate)
        gain = rate(g) / plain
        if gain >= self.min_gain:
            self._off_steps = 0
            return g, (f"batch policy: γ={g} at {b} rows expects {gain:.2f}x plain decoding "
                       f"(mean acceptance {sum(ps) / len(ps):.2f})")
        self._off_steps += 1
        if self._off_steps >= self.probe_every:
            self._off_steps = 0
            return 1, f"batch policy: probing γ=1 at {b} rows"
        return 0, (f"batch policy: speculation cannot pay at {b} rows: best γ={g} expects {gain:.2f}x "
                   f"plain decoding (mean acceptance {sum(ps) / len(ps):.2f}, drafter step {td / v1:.2f}x "
                   f"and each extra verified token {slope / v1:.2f}x of a plain step)")

    # ---- observations -------------------------------------------------------------------------
    def observe(self, rows: int, gamma: int, draft_s: float, verify_s: float, tokens: int) -> None:
        """One decode step over ``rows`` rows with largest γ ``gamma`` took these seconds."""
        self.stats.record(rows, tokens, gamma)
        if gamma == 0:
            self._ema(self._plain, rows).add(verify_s)
            return
        self._ema(self._draft, rows).add(draft_s / gamma)
        v1 = self._ema(self._plain, rows).value
        if v1 is not None:
            self._ema(self._slope, rows).add((verify_s - v1) / gamma)
