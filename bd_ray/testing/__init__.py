"""The test and benchmark harness: everything ``tests/`` and ``benchmarks/`` share, in one place.

Never imported by runtime code (``bd_ray/`` outside this package, ``jobs/``).

* :mod:`~bd_ray.testing.tiny`: tiny real components (a BPE tokenizer trained here, random-weight
  Llamas, a tiny corpus, tiny training and Serve set-ups);
* :mod:`~bd_ray.testing.ports`: free TCP ports;
* :mod:`~bd_ray.testing.serve`: a local Serve app for one test module or one benchmark run;
* :mod:`~bd_ray.testing.sim_cluster`: a simulated autoscaling Ray cluster on one machine;
* :mod:`~bd_ray.testing.load_timeline`: a Serve app under load on it, scale-up/down timed.

Submodules are imported by name (``from bd_ray.testing.tiny import tiny_llama``): this package
imports nothing itself, so ``sim_cluster``'s Ray autoscaler internals load only when used.
"""
