"""Adaptive draft length: choose γ per cycle by expected tokens/s, stop speculating when it cannot pay.

Speculative decoding is only worth its drafter when a cycle's expected output beats plain decoding
over the same time. With a per-token acceptance probability p (i.i.d. model, Leviathan et al.
2023, section 3.5), drafting γ tokens emits on average

    E(γ) = (1 - p^(γ+1)) / (1 - p)           tokens per cycle (accepted drafts + recovered/bonus),

and costs  C(γ) = γ·t_d + T_v(γ+1)  seconds, with t_d the drafter step and T_v(n) the verifier
forward over n tokens, modelled as T_v(1) + (n-1)·s. Plain decoding emits 1 token per T_v(1).
:class:`GammaController` keeps running estimates of p, t_d, T_v(1) and s *measured on this request*
(so a loaded machine, a long context or a weak drafter are all seen as they are), picks the γ that
maximises E(γ)/C(γ), and decodes plainly when no γ beats plain decoding by ``min_gain``.

Before the first cycle the controller can take a free look at the drafter: the verifier's and the
drafter's prefills also give their argmax at the prompt's last :data:`PROMPT_PROBE_TOKENS`
positions (:func:`bd_ray.kvcache.prefill` ``tail_argmax``), and their agreement there is the
greedy acceptance of a first draft on this very text (full drafter cache, so an upper estimate
under a KV budget). It seeds the acceptance estimate, and when even a drafter and a verify slope
as cheap as the engine measured on its device (:class:`CostPrior`; without a measurement
:data:`OPTIMISTIC_COST_RATIO` of a plain step) could not make that agreement pay, the
request starts plainly, with no warm-up cycles, and only probes (from ``4 * probe_every`` tokens on).

While decoding plainly it probes again now and then with one γ = 1 cycle (the drafter first
catches up on the tokens it missed in one forward); each probe that does not pay doubles the
interval (``probe_every`` .. ``max_probe_every`` tokens), so a hopeless drafter costs a few percent
at most. This is the per-request counterpart of vLLM's batch-size based speculation switch-off and
of transformers' "heuristic" assistant-token schedule, driven by measured time rather than rules.

Losslessness does not depend on any of this: every cycle is exact verification, whatever γ is.
With sampling, a fixed seed reproduces the same output only with a fixed γ (the γ path decides
how the random stream is consumed); use ``SpecConfig(adaptive=False)`` where that matters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["GammaController", "AdaptiveStats", "Ema", "expected_tokens", "prompt_agreement", "PROMPT_PROBE_TOKENS",
           "CostPrior", "CONSTANT_PRIOR"]

#: Prompt positions (tokens) at which both prefills report their argmax, for the acceptance prior.
PROMPT_PROBE_TOKENS = 32
#: t_d / T_v(1) and s / T_v(1) assumed when asking "could this agreement pay at all?" without a
#: measured :class:`CostPrior`: about the cheapest seen on CPU (2-layer drafter with a draft
#: vocabulary; results/speed/README.md). With a measured prior its ratios are used instead (the
#: probes correct a too-pessimistic start either way).
OPTIMISTIC_COST_RATIO = 0.1


@dataclass(frozen=True)
class CostPrior:
    """Cost ratios assumed before a request has measured its own (:mod:`bd_ray.speculative.cost_prior`).

    Attributes:
        draft_ratio: drafter step / plain verifier step (t_d / T_v(1)).
        slope_ratio: extra verified token / plain verifier step (s / T_v(1)).
        source: ``"measured"`` (on the engine's device) or ``"constant"``.
    """

    draft_ratio: float
    slope_ratio: float
    source: str

    def as_dict(self) -> dict:
        return asdict(self)


#: The ratios assumed without a measurement (CPU runs; used only when measuring is switched off).
CONSTANT_PRIOR = CostPrior(draft_ratio=0.2, slope_ratio=0.25, source="constant")


def prompt_agreement(verifier_tail: Any, drafter_tail: Any) -> tuple[float, int] | None:
    """(fraction of prompt positions where the drafter's argmax equals the verifier's, positions).

    Args:
        verifier_tail, drafter_tail: ``[1, T]`` (or ``[T]``) long tensors from
            ``kvcache.prefill(..., tail_argmax=T)``; ``-1`` marks positions before the prompt start.

    Returns ``None`` when either is missing or no position is valid.
    """
    if verifier_tail is None or drafter_tail is None or verifier_tail.shape != drafter_tail.shape:
        return None
    valid = verifier_tail >= 0
    n = int(valid.sum())
    if n == 0:
        return None
    return float(((verifier_tail == drafter_tail) & valid).sum()) / n, n


def _tokens_per_time(p: float, gamma: int, v1: float, td: float, slope: float) -> float:
    """E(γ) / C(γ): expected tokens per unit time (plain decoding: γ = 0, 1 token per ``v1``)."""
    if gamma <= 0:
        return 1.0 / v1
    return expected_tokens(p, gamma) / (gamma * td + v1 + gamma * slope)


def expected_tokens(p: float, gamma: int) -> float:
    """E(γ): expected tokens emitted by one cycle of γ drafts with i.i.d. acceptance ``p`` in [0, 1]."""
    if gamma <= 0:
        return 1.0
    if p >= 1.0:
        return float(gamma + 1)
    return (1.0 - p ** (gamma + 1)) / (1.0 - p)


@dataclass
class AdaptiveStats:
    """What the controller did for one request (reported with the result).

    Attributes:
        plain_steps: decode steps taken without speculation (1 token each).
        cycles_by_gamma: speculative cycles run, keyed by γ.
        probes: γ = 1 cycles run to re-test the drafter after plain steps.
        acceptance_estimate: the final running estimate of the per-token acceptance p.
        draft_step_ratio: t_d / T_v(1) as measured (None before both were measured).
        verify_slope_ratio: s / T_v(1), the extra verifier cost per extra token (None before measured).
        stopped_reason: why speculation was switched off, the last time it was (None if never).
        prompt_agreement: drafter/verifier greedy agreement on the prompt's last positions, the
            acceptance prior (None when the prefills did not report it).
    """

    plain_steps: int = 0
    cycles_by_gamma: dict[int, int] = field(default_factory=dict)
    probes: int = 0
    acceptance_estimate: float = 0.0
    draft_step_ratio: float | None = None
    verify_slope_ratio: float | None = None
    stopped_reason: str | None = None
    prompt_agreement: float | None = None

    def as_dict(self) -> dict:
        return {
            "plain_steps": self.plain_steps,
            "cycles_by_gamma": {str(k): v for k, v in sorted(self.cycles_by_gamma.items())},
            "probes": self.probes,
            "acceptance_estimate": self.acceptance_estimate,
            "draft_step_ratio": self.draft_step_ratio,
            "verify_slope_ratio": self.verify_slope_ratio,
            "stopped_reason": self.stopped_reason,
            "prompt_agreement": self.prompt_agreement,
        }


class Ema:
    """Exponential moving average; ``None`` until the first sample."""

    def __init__(self, weight: float) -> None:
        self.weight = weight
        self.value: float | None = None

    def add(self, x: float) -> None:
        self.value = x if self.value is None else (1 - self.weight) * self.value + self.weight * x


class GammaController:
    """Per-request choice of γ (0 = one plain verifier step) from measured costs and acceptance.

    Args:
        max_gamma: the largest γ to draft (the request's configured γ).
        min_gain: speculate only when the best γ's expected tokens/s is at least this multiple of
            plain decoding's (1.0 = break-even; a little above absorbs estimation noise).
        probe_every, max_probe_every: plain tokens before re-testing the drafter with a γ = 1 cycle;
            the interval doubles after each probe that leaves speculation off.
        decay: weight kept by past acceptance evidence per cycle (recent text counts more).
        prior_accept, prior_reject: pseudo-counts of the acceptance estimate before any evidence
            (1, 1 = start at p = 0.5, which lets the first cycles measure the drafter).
        prior_draft_ratio, prior_slope_ratio: t_d / T_v(1) and s / T_v(1) assumed until measured.
        warmup_cycles, warmup_gamma: cycles run unconditionally (after one plain step that measures
            T_v(1)) to measure the drafter before the model decides; short, so a useless drafter
            costs at most about ``warmup_cycles * (1 + warmup_gamma * (t_d/T_v(1) + s/T_v(1)))``
            plain steps.

    Raises:
        ValueError: ``max_gamma < 1``, ``min_gain <= 0``, ``probe_every < 1``, ``decay`` outside (0, 1].
    """

    #: speculative cycles (since speculation last started) before their measured tokens/s may
    #: overrule the model's estimate.
    MIN_REALIZED_CYCLES = 4
    #: the same after a probe restarted speculation: the drafter's costs were measured before it
    #: stopped, so fewer cycles suffice (a marginal drafter otherwise spends 4 cycles per failed resume).
    MIN_REALIZED_CYCLES_AFTER_PROBE = 2

    def __init__(self, max_gamma: int, min_gain: float = 1.05, probe_every: int = 8,
                 max_probe_every: int = 128, decay: float = 0.9, prior_accept: float = 1.0,
                 prior_reject: float = 1.0, prior_draft_ratio: float = CONSTANT_PRIOR.draft_ratio,
                 prior_slope_ratio: float = CONSTANT_PRIOR.slope_ratio, timing_weight: float = 0.3,
                 warmup_cycles: int = 2, warmup_gamma: int = 2) -> None:
        if max_gamma < 1:
            raise ValueError(f"max_gamma must be >= 1, got {max_gamma}")
        if min_gain <= 0:
            raise ValueError(f"min_gain must be > 0, got {min_gain}")
        if probe_every < 1 or max_probe_every < probe_every:
            raise ValueError(f"need 1 <= probe_every ({probe_every}) <= max_probe_every ({max_probe_every})")
        if not 0 < decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self.max_gamma = max_gamma
        self.warmup_cycles = warmup_cycles
        self.warmup_gamma = max(1, min(warmup_gamma, max_gamma))
        self._cycles = 0
        self.min_gain = min_gain
        self.base_probe_every = probe_every
        self.max_probe_every = max_probe_every
        self.decay = decay
        self._accept = prior_accept
        self._reject = prior_reject
        self._prior = (prior_accept, prior_reject)
        self.prior_draft_ratio = prior_draft_ratio
        self.prior_slope_ratio = prior_slope_ratio
        self.optimistic = (OPTIMISTIC_COST_RATIO, OPTIMISTIC_COST_RATIO)   # (t_d, s) / T_v(1) of the prompt check
        self._plain = Ema(timing_weight)        # T_v(1), seconds
        self._draft = Ema(timing_weight)        # t_d, seconds per drafter step
        self._slope = Ema(timing_weight)        # s, seconds per extra verified token
        self._realized = Ema(timing_weight)     # tokens/s actually achieved by speculative cycles
        self._cycles_on = 0                      # cycles since speculation was (re)started
        self._resumed_without_paying = False     # a probe restarted speculation; not yet paid off
        self._speculating = True
        self._plain_run = 0                      # plain steps since speculation was switched off
        self._probe_every = probe_every
        self.stats = AdaptiveStats()

    @property
    def speculating(self) -> bool:
        """False while the controller decodes plainly (between probes)."""
        return self._speculating

    # -- estimates ------------------------------------------------------------------------------
    @property
    def acceptance(self) -> float:
        """Running estimate of the per-token acceptance probability p."""
        return self._accept / (self._accept + self._reject)

    def _costs(self) -> tuple[float, float, float]:
        """(T_v(1), t_d, s) in seconds, or in units of T_v(1) while T_v(1) is unmeasured."""
        v1 = self._plain.value
        if v1 is None:
            # Unknown scale: work in units of T_v(1) = 1 with the prior ratios.
            return 1.0, self.prior_draft_ratio, self.prior_slope_ratio
        td = self._draft.value if self._draft.value is not None else self.prior_draft_ratio * v1
        slope = self._slope.value if self._slope.value is not None else self.prior_slope_ratio * v1
        return v1, td, max(0.0, slope)

    def rate(self, gamma: int) -> float:
        """Expected tokens per second (per unit of T_v(1) before it is measured) at draft length γ."""
        return _tokens_per_time(self.acceptance, gamma, *self._costs())

    def best_gamma(self, limit: int | None = None) -> int:
        """The γ in 1..min(max_gamma, limit) with the highest expected tokens/s."""
        top = self.max_gamma if limit is None else max(1, min(self.max_gamma, limit))
        return max(range(1, top + 1), key=self.rate)

    def set_cost_prior(self, prior: CostPrior) -> None:
        """Assume ``prior``'s ratios until costs are measured; a measured prior (this device's
        costs) also replaces :data:`OPTIMISTIC_COST_RATIO` in the prompt check."""
        self.prior_draft_ratio, self.prior_slope_ratio = prior.draft_ratio, prior.slope_ratio
        if prior.source == "measured":
            self.optimistic = (prior.draft_ratio, prior.slope_ratio)

    # -- the prompt prior ---------------------------------------------------------------------
    def observe_prompt_agreement(self, agreement: float, positions: int, weight: float = 0.5) -> None:
        """Seed the acceptance estimate from greedy agreement on the prompt (see the module doc).

        Args:
            agreement: fraction in [0, 1] of ``positions`` prompt positions where the drafter's
                argmax equalled the verifier's.
            weight: pseudo-observations per position (0.5: 32 positions count as 16 cycles' worth).

        Raises:
            ValueError: ``agreement`` outside [0, 1] or ``positions < 1``.
        """
        if not 0.0 <= agreement <= 1.0 or positions < 1:
            raise ValueError(f"need agreement in [0, 1] and positions >= 1, got {agreement}, {positions}")
        n = weight * positions
        self._accept = self._prior[0] + agreement * n
        self._reject = self._prior[1] + (1.0 - agreement) * n
        self.stats.prompt_agreement = agreement
        self._refresh_stats()
        rd, rs = self.optimistic
        best = max(_tokens_per_time(self.acceptance, g, 1.0, rd, rs) for g in range(1, self.max_gamma + 1))
        if best < self.min_gain:
            # Hopeless even with a cheap drafter: no warm-up, decode plainly, probe now and then.
            self.warmup_cycles = 0
            self._probe_every = min(4 * self.base_probe_every, self.max_probe_every)
            self._switch_off(
                f"prompt check: the drafter agreed with the verifier on {agreement:.0%} of the last "
                f"{positions} prompt positions; speculation cannot pay even with a drafter step at {rd:.2f}x "
                f"and each extra verified token at {rs:.2f}x of a plain step (best {best:.2f}x plain decoding)")

    def _switch_off(self, reason: str) -> None:
        """Decode plainly from now on (until a probe pays); ``reason`` goes to the stats."""
        self._speculating = False
        self._plain_run = 0
        self.stats.stopped_reason = reason

    def _measured_pays(self) -> bool | None:
        """Whether the speculative cycles since speculation (re)started delivered at least plain
        decoding's tokens/s; ``None`` before :attr:`MIN_REALIZED_CYCLES` (after a probe's restart:
        :attr:`MIN_REALIZED_CYCLES_AFTER_PROBE`) of them were measured."""
        need = self.MIN_REALIZED_CYCLES_AFTER_PROBE if self._resumed_without_paying else self.MIN_REALIZED_CYCLES
        if self._cycles_on < need or self._realized.value is None:
            return None
        return self._realized.value >= self.rate(0)

    # -- decisions --------------------------------------------------------------------------------
    def next_gamma(self, remaining: int) -> int:
        """γ for the next cycle; 0 means take one plain verifier step.

        Args:
            remaining: tokens the request may still emit (a cycle emits at most γ + 1).
        """
        limit = remaining - 1
        if limit < 1 or self._plain.value is None:
            return 0                             # the first step measures T_v(1)
        if self._cycles < self.warmup_cycles:
            return min(self.warmup_gamma, limit)
        if self._speculating:
            g = self.best_gamma(limit)
            # The model's promise, checked against what the cycles actually delivered: a model
            # fooled by noisy timings must not keep a request slower than plain decoding.
            underdelivers = self._measured_pays() is False
            if self.rate(g) >= self.min_gain * self.rate(0) and not underdelivers:
                return g
            if self._resumed_without_paying:
                # A probe turned speculation back on and it did not pay off: wait twice as long
                # before the next probe (otherwise a marginal drafter cycles probe/resume/stop
                # every few tokens; measured: 35 cycles for 40 tokens at 4K).
                self._probe_every = min(2 * self._probe_every, self.max_probe_every)
            v1, td, slope = self._costs()
            if underdelivers:
                self._switch_off(
                    f"speculation did not pay: its cycles gave {self._realized.value * v1:.2f} tokens per "
                    f"plain-step time (estimated acceptance {self.acceptance:.2f})")
            else:
                self._switch_off(
                    f"speculation cannot pay: estimated acceptance {self.acceptance:.2f}, drafter step "
                    f"{td / v1:.2f}x and each extra verified token {slope / v1:.2f}x of a plain step; "
                    f"best γ={g} expects {self.rate(g) / self.rate(0):.2f}x plain decoding")
            return 0
        if self._plain_run >= self._probe_every:
            self._plain_run = 0
            self.stats.probes += 1
            return 1
        return 0

    # -- observations ---------------------------------------------------------------------------
    def observe_plain(self, seconds: float) -> None:
        """One plain verifier step (1 token) took ``seconds``."""
        self._plain.add(seconds)
        self._plain_run += 1
        self.stats.plain_steps += 1
        self._refresh_stats()

    def observe_cycle(self, gamma: int, accepted: int, draft_s: float, verify_s: float,
                      catch_up_s: float = 0.0) -> None:
        """One speculative cycle: ``gamma`` drafts, the first ``accepted`` kept.

        Args:
            draft_s: seconds of the cycle's drafter forwards, including ``catch_up_s``.
            verify_s: seconds of the verifier forward over the γ + 1 (+1 after a full accept) tokens.
            catch_up_s: seconds of the first drafter forward when it also fed tokens decoded
                plainly since the last cycle (after plain steps); that forward is not a typical
                drafter step, so it is left out of t_d (a γ = 1 probe then gives no t_d sample).
        """
        self.stats.cycles_by_gamma[gamma] = self.stats.cycles_by_gamma.get(gamma, 0) + 1
        self._cycles += 1
        self._cycles_on += 1
        # Truncated-geometric evidence: `accepted` successes, one failure unless all were accepted.
        self._accept = self.decay * self._accept + accepted
        self._reject = self.decay * self._reject + (1 if accepted < gamma else 0)
        typical_steps = gamma - (1 if catch_up_s > 0 else 0)
        if typical_steps > 0:
            self._draft.add((draft_s - catch_up_s) / typical_steps)
        if self._plain.value is not None:
            self._slope.add((verify_s - self._plain.value) / gamma)
        if catch_up_s == 0.0 and draft_s + verify_s > 0:
            self._realized.add((accepted + 1) / (draft_s + verify_s))
        if self._speculating and self._resumed_without_paying and self._measured_pays():
            # Speculation resumed by a probe has now paid off: probe eagerly again next time.
            self._resumed_without_paying = False
            self._probe_every = self.base_probe_every
        if not self._speculating:
            # A probe: resume speculating if it now pays, else wait twice as long before the next.
            g = self.best_gamma()
            if self.rate(g) >= self.min_gain * self.rate(0):
                self._speculating = True
                self._resumed_without_paying = True
                self._cycles_on = 0
                self._realized.value = None
            else:
                self._probe_every = min(2 * self._probe_every, self.max_probe_every)
        self._refresh_stats()

    def _refresh_stats(self) -> None:
        self.stats.acceptance_estimate = self.acceptance
        v1 = self._plain.value
        if v1:
            if self._draft.value is not None:
                self.stats.draft_step_ratio = self._draft.value / v1
            if self._slope.value is not None:
                self.stats.verify_slope_ratio = self._slope.value / v1
