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

Prefill reuse: every prompt is prefilled once by the verifier and once per drafter; AR and all SD
cells of that prompt reuse those prefills (each cell compacts the drafter prefill to its own budget).

Lossless check (:func:`bd_ray.evaluate.aggregate.lossless_report`): in greedy modes with fp32
models, the SD token ids must equal the AR token ids for every cell and prompt; any difference is
reported naming the cell and prompt, and the run raises
:class:`bd_ray.evaluate.driver.LosslessError` after writing the outputs (``jobs/evaluate.py``
exits with status 3). With bf16/fp16 models the same comparison is reported as agreement
(fraction of equal tokens, first divergence) and never fails the run: low-precision verification
of γ+1 rows and of one row round differently (vLLM documents the same).

Modules, one job each (import from them; this package re-exports nothing, so the journal and
report tools load without torch):

* :mod:`~bd_ray.evaluate.prompts` -- held-out prompts and the needle prompt (the held-out assertion);
* :mod:`~bd_ray.evaluate.items` -- cells and single measurements in run order, their journal keys;
* :mod:`~bd_ray.evaluate.worker` -- :class:`EvalWorker` (models loaded once, one measurement at a time);
* :mod:`~bd_ray.evaluate.aggregate` -- cells from measurements, best γ, lossless check, needle report;
* :mod:`~bd_ray.evaluate.intervals` -- bootstrap intervals over prompts, paired drafter differences, per-prompt α and outliers;
* :mod:`~bd_ray.evaluate.report` -- ``results.json``, ``results.md`` and the PNG plots;
* :mod:`~bd_ray.evaluate.summaries` -- README tables and headline figures from a ``results.json``;
* :mod:`~bd_ray.evaluate.agreement` -- held-out agreement tables and curves of training runs;
* :mod:`~bd_ray.evaluate.journal` -- the measurement journal: resume, merge, drop;
* :mod:`~bd_ray.evaluate.progress` -- progress lines with ETA;
* :mod:`~bd_ray.evaluate.driver` -- :func:`run_evaluation` (local or Ray worker actors, isolation).
"""
