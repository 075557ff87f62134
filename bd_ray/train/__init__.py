"""BudgetDraft drafter training (docs/DESIGN.md section 2: the recipe; section 5: the stack).

One module per job:

* :mod:`bd_ray.train.driver`   -- :func:`~bd_ray.train.driver.run` by ``run.executor``: Ray Train
  (``run_ray``) or one process on offline targets (``run_offline_local``; ``run_local`` for tests)
* :mod:`bd_ray.train.worker`   -- the Ray Train worker (DeepSpeed engines, the worker's data shard)
* :mod:`bd_ray.train.loop`     -- the training loop (the same in both drivers)
* :mod:`bd_ray.train.engines`  -- models to start from, AdamW + warm-up/cosine, local and DeepSpeed engines
* :mod:`bd_ray.train.agreement` -- held-out teacher-forced top-1 agreement (greedy α proxy)
* :mod:`bd_ray.train.export`   -- HF export of the drafter, the curves plot
* :mod:`bd_ray.train.compat`   -- driver-side checks of models, draft vocabulary, offline targets, paths

The frozen teacher and its targets live below this package, in :mod:`bd_ray.teacher` (shared with
the offline targets job, :mod:`bd_ray.teacher_targets`).
"""
