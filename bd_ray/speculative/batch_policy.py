"""Batch-level speculation policy: the γ of every decoding row for one engine step, and why.

The cost model is anchored on the **whole decode step** (the engine's ``_decode``, from the
policy's choice to the last row's emission: drafter forwards, the verifier forward, rejection,
emission, rollback and per-row host work), measured per batch-size bucket ``b`` (1, 2, 3-4, 5-8,
...):

* ``T0(b)``: a plain step (no row drafts);
* ``c(b)``: extra step time per unit of γ, from speculative steps, ``(step_s - T0(b)) / γ̄`` with
  ``γ̄`` the mean γ over the step's rows (= γ when every row drafts γ).

With per-row acceptance estimates ``p_r`` (each adaptive row's
:class:`bd_ray.speculative.adaptive.GammaController`) a uniform γ for the ``a`` adaptive rows gives

    rate(γ) = Σ_r E(p_r, γ) / (T0(b) + γ·c(b)),     plain: a / T0(b),

with E the expected tokens per cycle (Leviathan et al. 2023); with non-adaptive rows in the step
this is the adaptive rows' share of it. The policy picks the best γ and decodes plainly (γ = 0)
when no γ beats plain decoding by ``min_gain``: in the compute-bound regime of a large batch,
verifying extra tokens costs more than it returns (SGLang's adaptive steps; vLLM's
``disable_by_batch_size``, which ``disable_above`` reproduces as a hard rule).

Until ``c(b)`` is measured it comes from the engine's batch-1 cost prior
(:mod:`bd_ray.speculative.cost_prior`), scaled with the batch: ``draft_ratio·T0(b) +
slope_ratio·T0(1)·b`` (the drafter step as a share of a plain step at ``b`` rows, and each row's
extra verified token costing what it costs alone: on CPU extra tokens are compute, 8 rows at
γ = 4 verify 40 tokens against 8, so this is conservative at large ``b``; ``T0(1)`` is the
smallest measured bucket's ``T0``), and never below a ``c`` measured at a smaller bucket (the
last run judged 9-16 rows "on" from a 83 ms prior while 5-8 rows had measured 393 ms). While off, the policy probes: every ``probe_every`` plain
steps it runs ``probe_steps`` steps at γ = 1 (the first one's drafter forward catches up on the
tokens decoded plainly, so it gives no ``c`` sample; the next does), so ``c(b)`` stays measured.
Each probe that leaves a bucket off doubles that bucket's interval, up to ``probe_max`` (a probe
step where speculation does not pay costs ~``c/T0`` extra: at 16 steps apart that was ~10 % of
decode time on a 2-core CPU; at 256 it is < 1 %); an "on" judgement resets it.
A step-time sample above :attr:`BatchSpecPolicy.SPIKE` times the current estimate counts as that
(one-sided timer noise: a preempted or paused step must not turn speculation off for long).

**Deferred drafter prefill.** An adaptive row's drafter prefill is deferred
(:mod:`bd_ray.speculative.prefill`): the row starts decoding, plainly (γ = 0), once its verifier
prefill is done, and its drafter pieces run only while :meth:`BatchSpecPolicy.defer_drafter` has
no reason to hold them back at the engine's batch size ``b`` (decoding + prefilling rows):

* ``b == 1``: always (a row alone keeps its own controller, which decides after its prompt check);
* ``b > 1``: only under a fresh "on" judgement at ``b`` (from measured costs or, until ``c(b)`` is
  measured, the prior); ``disable_above``, an "off" judgement, or no judgement yet hold them back.

No judgement yet means decoding plainly, as the policy would anyway until ``T0(b)`` is measured;
the next steps' judgement decides. When every adaptive row of a step is pending, the judgement is
made for them from their controllers' acceptance prior (their drafter has not seen the prompt, so
nothing better is known), so a burst of requests into a batch where speculation does not pay
spends no drafter compute (the case this rule is for: every row of a burst is admitted before any
judgement at its size exists) unless even the prior says speculation pays; with rows that have
their drafter, their measured acceptance decides. A row that never gets its drafter decodes
plainly for its life (``spec_metrics.mode: plain`` with the batch policy's reason; counted in the
bucket's ``drafter_prefills_skipped`` where it was last held back,
:meth:`BatchSpecPolicy.drafter_dropped`).

**Rows admitted plainly.** An adaptive row starting its prefill asks :meth:`BatchSpecPolicy.admit_plainly`
with the batch it joins (decoding + prefilling rows). When ``disable_above`` rules speculation
out at that size or the policy's current judgement there is "off" from measured costs (``T0`` and
``c`` both measured, judged within the last ``stale_after`` decode steps: one rule, which also
holds deferred drafter prefills back), the row is admitted as a plain row: no drafter prefill
planned, no drafter cache entries, its ``spec_metrics.mode`` is ``plain`` with the batch policy's
reason. Such a row **stays plain for its life**, even if the batch later shrinks. Rows admitted
otherwise keep a (deferred) drafter; if the batch later grows, the per-step decision gives them
γ = 0.

Rows the policy leaves alone: ``speculative=False`` rows and rows without a usable drafter
(γ = 0), rows with a fixed γ (an explicit choice: ``min(γ, remaining - 1)``, so a seeded sampled
row reproduces its text in any batch; they are never admitted plainly), and a single adaptive row
decoding alone, which keeps its own controller (the batch-1 behaviour of
:mod:`bd_ray.speculative.adaptive`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bd_ray.speculative.adaptive import CONSTANT_PRIOR, Ema, expected_tokens
from bd_ray.speculative.rows import DRAFTER_PENDING

__all__ = ["BatchSpecPolicy", "BatchStats", "BucketStats"]


def _bucket(b: int) -> int:
    """Batch sizes measured together (1, 2, 3-4, 5-8, ...): costs change smoothly with B."""
    return 1 << max(0, (b - 1).bit_length())


def _label(bucket: int) -> str:
    return str(bucket) if bucket <= 2 else f"{bucket // 2 + 1}-{bucket}"


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1e3 * x, 3)


@dataclass
class BucketStats:
    """What the policy measured and decided at one batch-size bucket.

    Attributes:
        t0: EMA of the plain decode step, seconds (``T0(b)``).
        c: EMA of the extra step time per unit γ, seconds (``c(b)``; ``None`` until measured).
        steps: decode steps by the largest γ drafted in them (``"0"`` = a plain step).
        on: the latest judgement for adaptive rows (``None`` before any).
        measured: whether that judgement used a measured ``c`` (else the prior).
        judged_at: decode step index of that judgement.
        last_reason: its reason.
        skipped: rows whose drafter prefill was skipped at this bucket: admitted plainly, or
            finished with their deferred drafter prefill still held back here.
        probe_every: plain steps between probes here now (0 = the policy's ``probe_every``;
            doubled by each probe that leaves the bucket off).
        rows, tokens, seconds: decoding rows summed over this bucket's steps, tokens those steps
            emitted, and their wall seconds (decode throughput at this batch size).
    """

    t0: Ema
    c: Ema
    steps: dict[str, int] = field(default_factory=dict)
    on: bool | None = None
    measured: bool = False
    judged_at: int = 0
    last_reason: str | None = None
    skipped: int = 0
    probe_every: int = 0
    rows: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def as_dict(self, prior_c: float | None) -> dict:
        """JSON-ready row of the policy table (milliseconds; ``c_ms`` is the prior's until measured;
        ``rows`` / ``decode_tokens`` / ``decode_s`` raw sums, for deltas between two reads)."""
        c = self.c.value
        return {"steps": dict(sorted(self.steps.items())), "t0_ms": _ms(self.t0.value),
                "c_ms": _ms(max(0.0, c) if c is not None else prior_c),
                "c_source": "measured" if c is not None else ("prior" if prior_c is not None else None),
                "judgement": None if self.on is None else ("on" if self.on else "off"),
                "last_reason": self.last_reason, "drafter_prefills_skipped": self.skipped,
                "rows": self.rows, "decode_tokens": self.tokens, "decode_s": self.seconds}


@dataclass
class BatchStats:
    """Per-engine counters of decode and prefill steps (reported by :meth:`BatchEngine.stats`).

    Attributes:
        steps: decode steps run.
        rows: sum over steps of decoding rows (``rows / steps`` = mean batch size).
        tokens: tokens emitted by decode steps (``tokens / steps`` = tokens per step; the first
            token of each request, from its prefill, is not counted).
        gamma_chosen: steps by the largest γ drafted in them (``"0"`` = a plain step).
        last_reason: why the latest batch decision for adaptive rows was what it was.
        max_rows: the largest batch decoded in one step.
        decode_s: wall seconds of all decode steps (whole steps, all rows).
        prefill_s: wall seconds of all prefill phases (every row's chunks of a step).
        prefill_steps, prefill_tokens: steps that ran prefill work, and the prompt tokens they
            prefilled (both models' pieces; ``prefill_s / prefill_steps`` = a chunk's time).
        buckets: the policy's :class:`BucketStats` by batch-size bucket.
    """

    steps: int = 0
    rows: int = 0
    tokens: int = 0
    gamma_chosen: dict[str, int] = field(default_factory=dict)
    last_reason: str | None = None
    max_rows: int = 0
    decode_s: float = 0.0
    prefill_s: float = 0.0
    prefill_steps: int = 0
    prefill_tokens: int = 0
    buckets: dict[int, BucketStats] = field(default_factory=dict)

    def record(self, rows: int, tokens: int, gamma: int, seconds: float) -> None:
        self.steps += 1
        self.rows += rows
        self.tokens += tokens
        self.decode_s += seconds
        self.max_rows = max(self.max_rows, rows)
        self.gamma_chosen[str(gamma)] = self.gamma_chosen.get(str(gamma), 0) + 1

    def as_dict(self, prior_c: Any = None) -> dict:
        """JSON-ready: the counters plus ``rows_per_step`` and ``tokens_per_step`` (means),
        ``decode_tokens`` and ``decode_s`` (raw, for deltas between two reads),
        ``decode_tokens_per_s`` (decode throughput of the engine: tokens emitted by decode steps /
        ``decode_s``, all rows summed, prefill time excluded; 0.0 before any step), ``prefill_s``
        and ``policy``: bucket label (``"1"``, ``"2"``, ``"3-4"``, ``"5-8"``, ...) -> its
        :meth:`BucketStats.as_dict` (``prior_c(bucket)`` gives the prior ``c`` in seconds or ``None``)."""
        prior_c = prior_c or (lambda bucket: None)
        return {"steps": self.steps, "rows_per_step": self.rows / self.steps if self.steps else 0.0,
                "tokens_per_step": self.tokens / self.steps if self.steps else 0.0,
                "max_rows": self.max_rows, "gamma_chosen": dict(sorted(self.gamma_chosen.items())),
                "last_reason": self.last_reason, "decode_tokens": self.tokens, "decode_s": self.decode_s,
                "decode_tokens_per_s": self.tokens / self.decode_s if self.decode_s > 0 else 0.0,
                "prefill_s": self.prefill_s, "prefill_steps": self.prefill_steps,
                "prefill_tokens": self.prefill_tokens,
                "policy": {_label(k): v.as_dict(prior_c(k)) for k, v in sorted(self.buckets.items())}}


class BatchSpecPolicy:
    """Chooses γ per row and step, whether a new adaptive row needs its drafter, and when a
    deferred drafter prefill may run (module docstring).

    Args:
        max_gamma: the largest γ the batch decision may pick (each row also caps at its own γ).
        min_gain: speculate only when expected tokens/s beats plain decoding by this factor.
        disable_above: never speculate (adaptive rows) with more decoding rows than this, admit
            adaptive rows joining more rows than this plainly, and hold deferred drafter prefills back.
        probe_every: plain batch steps between probes.
        probe_steps: γ = 1 steps per probe (2: the first catches the drafter up and gives no ``c``
            sample, the second does).
        probe_max: the longest interval between probes a bucket backs off to (module docstring).
        stale_after: decode steps after which a bucket's "off" judgement no longer admits rows
            plainly (rows keep arriving with a drafter now and then, so a judgement made when no
            adaptive row is left to probe cannot hold forever).
        prior_draft_ratio, prior_slope_ratio: the batch-1 ratios ``t_d / T_v(1)`` and ``s / T_v(1)``
            behind the prior ``c(b)`` (the engine sets its measured
            :class:`bd_ray.speculative.adaptive.CostPrior`: :attr:`prior`).
        weight: EMA weight of a new step time.
    """

    #: the most a new step-time sample may exceed the current estimate, as a factor
    SPIKE = 3.0

    def __init__(self, max_gamma: int = 8, min_gain: float = 1.05, disable_above: int | None = None,
                 probe_every: int = 16, probe_steps: int = 2, probe_max: int = 256, stale_after: int = 256,
                 prior_draft_ratio: float = CONSTANT_PRIOR.draft_ratio,
                 prior_slope_ratio: float = CONSTANT_PRIOR.slope_ratio, weight: float = 0.3) -> None:
        self.max_gamma = max_gamma
        self.min_gain = min_gain
        self.disable_above = disable_above
        self.probe_every = probe_every
        self.probe_steps = max(1, probe_steps)
        self.probe_max = max(probe_every, probe_max)
        self.stale_after = stale_after
        self.prior = (prior_draft_ratio, prior_slope_ratio)
        self.weight = weight
        self._off_steps = 0       # plain batch decisions since the last probe
        self._probe_left = 0      # γ = 1 steps left of the current probe
        self.stats = BatchStats()

    def bucket(self, b: int) -> BucketStats:
        """The :class:`BucketStats` of batch size ``b`` (created empty on first use)."""
        k = _bucket(b)
        if k not in self.stats.buckets:
            self.stats.buckets[k] = BucketStats(Ema(self.weight), Ema(self.weight))
        return self.stats.buckets[k]

    # ---- costs --------------------------------------------------------------------------------
    def t0_one(self, b: int) -> float | None:
        """``T0(1)``: the smallest measured bucket's plain step, up to ``b`` (seconds)."""
        for k, bk in sorted(self.stats.buckets.items()):
            if k > _bucket(b):
                break
            if bk.t0.value is not None:
                return bk.t0.value
        return None

    def prior_c(self, b: int) -> float | None:
        """The prior ``c(b)`` in seconds (module docstring), never below a ``c`` measured at a
        smaller bucket (extra verified tokens of more rows cost no less); ``None`` before
        ``T0(b)`` is measured."""
        t0 = self.bucket(b).t0.value
        if t0 is None:
            return None
        below = [bk.c.value for k, bk in self.stats.buckets.items() if k < _bucket(b) and bk.c.value is not None]
        return max([self.prior[0] * t0 + self.prior[1] * self.t0_one(b) * b] + below)

    def costs(self, b: int) -> tuple[float, float, bool] | None:
        """``(T0(b), c(b), c measured)`` in seconds, or ``None`` before ``T0(b)`` is measured."""
        bk = self.bucket(b)
        if bk.t0.value is None:
            return None
        if bk.c.value is not None:
            return bk.t0.value, max(0.0, bk.c.value), True
        return bk.t0.value, self.prior_c(b), False

    # ---- decisions ----------------------------------------------------------------------------
    def choose(self, rows: list[Any]) -> dict[Any, int]:
        """γ for each decoding row (``Row`` objects; 0 = a plain step); sets ``row.plain_reason``.
        Rows whose drafter prefill is pending (``row.drafter_pending``) get 0; they are judged on
        only when no adaptive row of the step has its drafter (module docstring)."""
        out: dict[Any, int] = {}
        adaptive, pending = [], []
        for r in rows:
            limit = r.checker.remaining() - 1
            if not r.spec:
                out[r] = 0
                r.plain_reason = r.fallback or "speculative=False requested"
            elif r.drafter_pending:
                out[r] = 0
                r.plain_reason = r.plain_reason or DRAFTER_PENDING
                pending.append(r)
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
        if not adaptive and pending and len(rows) > 1:
            # judge the batch for the pending rows' sake (defer_drafter reads the judgement)
            self.stats.last_reason = self._batch_gamma(pending, len(rows))[1]
        if adaptive:
            g, reason = self._batch_gamma(adaptive, len(rows))
            self.stats.last_reason = reason
            for r in adaptive:
                out[r] = min(g, r.gamma, r.checker.remaining() - 1)
                if out[r] == 0:
                    r.plain_reason = reason
        return out

    def _judge(self, b: int, on: bool, measured: bool, reason: str) -> None:
        bk = self.bucket(b)
        bk.on, bk.measured, bk.judged_at, bk.last_reason = on, measured, self.stats.steps, reason

    def _batch_gamma(self, rows: list[Any], b: int) -> tuple[int, str]:
        if self.disable_above is not None and b > self.disable_above:
            reason = f"batch policy: {b} decoding rows > disable_above={self.disable_above}"
            self._judge(b, False, True, reason)
            return 0, reason
        if self._probe_left > 0:
            self._probe_left -= 1
            return 1, f"batch policy: probing γ=1 at {b} rows"
        costs = self.costs(b)
        if costs is None:
            return 0, f"batch policy: measuring the plain step at {b} rows"
        t0, c, measured = costs
        ps = [r.controller.acceptance for r in rows]
        top = max(1, min(self.max_gamma, max(r.gamma for r in rows)))

        def rate(g: int) -> float:
            return sum(expected_tokens(p, g) for p in ps) / (t0 + g * c)

        g = max(range(1, top + 1), key=rate)
        gain = rate(g) / (len(ps) / t0)
        costs_s = (f"plain step {1e3 * t0:.1f} ms, each unit of γ +{1e3 * c:.1f} ms "
                   f"({'measured' if measured else 'prior'})")
        if gain >= self.min_gain:
            self._off_steps = 0
            self.bucket(b).probe_every = 0
            reason = (f"batch policy: γ={g} at {b} rows expects {gain:.2f}x plain decoding "
                      f"(mean acceptance {sum(ps) / len(ps):.2f}; {costs_s})")
            self._judge(b, True, measured, reason)
            return g, reason
        reason = (f"batch policy: speculation cannot pay at {b} rows: best γ={g} expects {gain:.2f}x "
                  f"plain decoding (mean acceptance {sum(ps) / len(ps):.2f}; {costs_s})")
        self._judge(b, False, measured, reason)
        self._off_steps += 1
        bk = self.bucket(b)
        every = bk.probe_every or self.probe_every
        if self._off_steps >= every:
            self._off_steps = 0
            bk.probe_every = min(2 * every, self.probe_max)
            self._probe_left = self.probe_steps - 1
            return 1, f"batch policy: probing γ=1 at {b} rows"
        return 0, reason

    def _fresh(self, bk: BucketStats | None) -> bool:
        """Whether ``bk`` holds a judgement made within the last ``stale_after`` decode steps."""
        return bk is not None and bk.on is not None and self.stats.steps - bk.judged_at <= self.stale_after

    def _ruled_out(self, b: int) -> str | None:
        """Why speculation is off for adaptive rows at ``b`` rows by rule or measurement:
        ``disable_above``, or a fresh judgement "off" from measured costs; ``None`` otherwise."""
        if self.disable_above is not None and b > self.disable_above:
            return f"{b} rows > disable_above={self.disable_above}"
        bk = self.stats.buckets.get(_bucket(b))
        if self._fresh(bk) and bk.on is False and bk.measured:
            return bk.last_reason.removeprefix("batch policy: ")
        return None

    def admit_plainly(self, b: int) -> str | None:
        """Why an adaptive row joining a batch of ``b`` rows (decoding + prefilling, itself
        included) should be admitted plainly, with no drafter prefill; ``None``: give it its
        drafter. Plainly when ``disable_above`` rules speculation out at ``b`` rows or the latest
        judgement at ``b`` is "off" from measured costs and fresh (module docstring)."""
        if b < 2:
            return None                                  # a row alone keeps its own controller
        why = self._ruled_out(b)
        if why is None:
            return None
        self.bucket(b).skipped += 1
        return f"batch policy: admitted plainly (no drafter prefill) joining {b} rows: {why}"

    def defer_drafter(self, b: int) -> str | None:
        """Why a decoding adaptive row's pending drafter prefill should wait at ``b`` rows
        (decoding + prefilling); ``None``: run it now. It runs for a row alone, and at ``b > 1``
        only under a fresh "on" judgement at ``b`` (measured or from the prior); with none yet,
        or an "off" one, or ``disable_above``, it waits (module docstring)."""
        if b < 2:
            return None
        why = self._ruled_out(b)
        bk = self.stats.buckets.get(_bucket(b))
        fresh = self._fresh(bk)
        if why is None and fresh and bk.on:
            return None
        if why is None:
            why = (bk.last_reason.removeprefix("batch policy: ") if fresh
                   else f"no judgement at {b} rows yet: decoding plainly until one")
        return f"batch policy: drafter prefill deferred at {b} rows: {why}"

    def drafter_dropped(self, b: int) -> None:
        """A row finished without its deferred drafter prefill, last held back at ``b`` rows:
        counted with the bucket's skipped drafter prefills."""
        self.bucket(b).skipped += 1

    # ---- observations -------------------------------------------------------------------------
    def observe(self, gammas: list[int], seconds: float, tokens: int, catch_up: bool = False) -> None:
        """One whole decode step: ``gammas`` the γ of each of its rows, ``seconds`` its wall time,
        ``tokens`` emitted; ``catch_up``: a drafter forward also fed tokens decoded plainly since
        the row's last cycle (not a typical step: no ``c`` sample)."""
        b, g_max = len(gammas), max(gammas)
        self.stats.record(b, tokens, g_max, seconds)
        bk = self.bucket(b)
        bk.steps[str(g_max)] = bk.steps.get(str(g_max), 0) + 1
        bk.rows, bk.tokens, bk.seconds = bk.rows + b, bk.tokens + tokens, bk.seconds + seconds
        # One-sided timer noise (a preempted or GC-paused step) is clipped: a sample moves an
        # estimate by at most SPIKE x its value (c: at least up to SPIKE plain steps per unit γ).
        t0 = bk.t0.value
        if g_max == 0:
            bk.t0.add(seconds if t0 is None else min(seconds, self.SPIKE * t0))
        elif not catch_up and t0 is not None:
            c = (seconds - t0) / (sum(gammas) / b)
            bk.c.add(min(c, self.SPIKE * max(bk.c.value or 0.0, t0)))

    def observe_prefill(self, seconds: float, tokens: int) -> None:
        """One engine step's prefill phase took ``seconds`` over ``tokens`` prompt tokens."""
        self.stats.prefill_s += seconds
        self.stats.prefill_steps += 1
        self.stats.prefill_tokens += tokens

    def as_dict(self) -> dict:
        """:meth:`BatchStats.as_dict` with the prior ``c`` of unmeasured buckets."""
        return self.stats.as_dict(self.prior_c)
