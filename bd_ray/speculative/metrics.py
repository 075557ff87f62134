"""Speculative-decoding metrics in one place (as vLLM's ``SpecDecodingStats``).

Definitions (docs/DESIGN.md section 1, docs/cases/spec-decoding.md case 9):

* α (``acceptance_rate``) = accepted drafts / drafted tokens;
* τ (``mean_accepted_length``) = tokens per verifier forward = 1 + accepted / cycles (the
  recovered or bonus token included);
* per-position acceptance: for k = 1..γ, the fraction of cycles that drafted a k-th token in
  which the k-th draft was accepted (a k-th draft is accepted only if drafts 1..k-1 were).

Acceptance counts what verification decided, before stopping rules cut a block short, so α and τ
describe the drafter/verifier pair rather than where a stop string fell.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["SpecMetrics", "Timings"]


@dataclass
class Timings:
    """Wall time split of one request, in seconds.

    ``verify_s`` is verifier decode forwards (all of them for AR; the γ+1-token verify blocks for
    speculative decoding), ``plain_s`` the plain one-token verifier steps a speculative request
    took (the last token, or while the adaptive controller had speculation off).
    """

    verifier_prefill_s: float = 0.0
    drafter_prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    plain_s: float = 0.0
    setup_s: float = 0.0
    total_s: float = 0.0

    def as_dict(self) -> dict[str, float]:
        """The fields as a JSON-ready dict, all in seconds: ``verifier_prefill_s``,
        ``drafter_prefill_s``, ``draft_s`` (drafter decode steps), ``verify_s``, ``plain_s``,
        ``setup_s`` (one-off engine work inside this request's lifetime: the speculation cost prior,
        measured once per engine when its first adaptive row is admitted) and ``total_s`` (the whole
        request, prefills and setup included; the parts need not add up to it)."""
        return dict(self.__dict__)


@dataclass
class SpecMetrics:
    """Counters for one request or, via :meth:`merge`, an aggregate of requests."""

    cycles: int = 0
    drafted: int = 0
    accepted: int = 0
    drafted_at: list[int] = field(default_factory=list)    # [γ] cycles that drafted position k
    accepted_at: list[int] = field(default_factory=list)   # [γ] cycles that accepted position k

    def record_cycle(self, num_drafted: int, num_accepted: int) -> None:
        """Record one verification: ``num_drafted`` drafts of which the first ``num_accepted`` were kept.

        Raises:
            ValueError: ``num_accepted`` outside ``0..num_drafted``.
        """
        if not 0 <= num_accepted <= num_drafted:
            raise ValueError(f"num_accepted={num_accepted} must be within 0..num_drafted={num_drafted}")
        grow = num_drafted - len(self.drafted_at)
        if grow > 0:
            self.drafted_at.extend([0] * grow)
            self.accepted_at.extend([0] * grow)
        for k in range(num_drafted):
            self.drafted_at[k] += 1
            if k < num_accepted:
                self.accepted_at[k] += 1
        self.cycles += 1
        self.drafted += num_drafted
        self.accepted += num_accepted

    @property
    def acceptance_rate(self) -> float:
        """α; 0.0 when nothing was drafted."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """τ = 1 + accepted / cycles; 1.0 for plain decoding (no cycles)."""
        return 1.0 + self.accepted / self.cycles if self.cycles else 1.0

    @property
    def per_position_acceptance(self) -> list[float]:
        """``accepted_at[k] / drafted_at[k]`` for each draft position k = 1.. (index 0 is k = 1).

        Unconditional: the denominator is every cycle that drafted a k-th token, including cycles
        whose earlier draft was already rejected (the k-th draft then counts as not accepted); it
        is not P(k-th accepted | drafts 1..k-1 accepted). The list is as long as the largest γ
        drafted in any cycle (cycles that drafted fewer, e.g. with adaptive γ or near
        ``max_new_tokens``, do not count at the later positions); empty when nothing was drafted.
        """
        return [a / d if d else 0.0 for a, d in zip(self.accepted_at, self.drafted_at)]

    def merge(self, other: "SpecMetrics") -> "SpecMetrics":
        """A new aggregate of ``self`` and ``other``."""
        out = SpecMetrics(self.cycles + other.cycles, self.drafted + other.drafted,
                          self.accepted + other.accepted)
        n = max(len(self.drafted_at), len(other.drafted_at))
        pad = lambda xs: xs + [0] * (n - len(xs))  # noqa: E731
        out.drafted_at = [a + b for a, b in zip(pad(self.drafted_at), pad(other.drafted_at))]
        out.accepted_at = [a + b for a, b in zip(pad(self.accepted_at), pad(other.accepted_at))]
        return out

    def as_dict(self) -> dict:
        """JSON-ready counters and rates: ``cycles`` (verification cycles), ``drafted`` and
        ``accepted`` (draft tokens), ``acceptance_rate`` (α, a fraction in [0, 1]),
        ``mean_accepted_length`` (τ, tokens per verifier forward, >= 1) and
        ``per_position_acceptance`` (a list of fractions, see :attr:`per_position_acceptance`)."""
        return {
            "cycles": self.cycles,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_rate": self.acceptance_rate,
            "mean_accepted_length": self.mean_accepted_length,
            "per_position_acceptance": self.per_position_acceptance,
        }
