"""Offline teacher mode (issue 5): jobs/teacher_targets.py output == online targets on the same windows.

- Ray Data batch inference (actor pool holding the teacher) over a tiny corpus writes parquet whose
  argmax / top-k equal ``compute_teacher_targets`` on the same windows (the online path), the
  output is committed atomically (no temp dir left, an existing output is not overwritten, a
  directory without the manifest is refused);
- the training loop fed offline rows (and no teacher at all) gives exactly the losses of the
  online loop on the same windows;
- a teacher actor fed several windows per batch writes the targets of one window at a time (fp32).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch

from bd_ray.testing.tiny import write_tiny_world

P, T = 96, 16


@pytest.fixture
def ray_cluster():
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.timeout(300)
def test_offline_targets_equal_online(tmp_path, ray_cluster):
    from bd_ray.models import load_verifier
    from bd_ray.teacher_targets import read_manifest, read_target_rows, write_teacher_targets
    from bd_ray.teacher import compute_teacher_targets
    from bd_ray.config.train import TeacherTargetsJobConfig

    write_tiny_world(tmp_path, P + T)
    out = tmp_path / "targets"
    cfg = TeacherTargetsJobConfig.model_validate({
        "models": {"verifier": str(tmp_path / "verifier")},
        "data": {"source": str(tmp_path / "corpus.parquet"), "prefix_len": P, "continuation_len": T,
                 "eval_windows": 2},
        "teacher": {"mode": "offline", "targets_path": str(out), "continuation_chunk": 5},
        "top_k": 4, "prefill_chunk": 32, "max_windows": 3,
    })
    m = write_teacher_targets(cfg, log=lambda s: None)
    assert m["train_windows"] == 3 and m["eval_windows"] == 2
    assert read_manifest(str(out))["prefix_len"] == P
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # committed by rename, nothing left behind
    with pytest.raises(FileExistsError):
        write_teacher_targets(cfg, log=lambda s: None)

    teacher, _ = load_verifier(tmp_path / "verifier", dtype=torch.float32)
    rows = read_target_rows(str(out), "train") + read_target_rows(str(out), "eval")
    assert len(rows) == 5
    for r in rows:
        assert r["input_ids"].shape == (P + T,) and r["argmax"].shape == (T,)
        # online: the train loop's own call, with different chunking (chunking must not matter)
        on = compute_teacher_targets(teacher, torch.as_tensor(r["input_ids"].astype(np.int64)), P, top_k=4,
                                     prefill_chunk=P, cont_chunk=T)
        assert np.array_equal(r["argmax"], on.argmax.numpy())
        assert np.array_equal(r["topk_ids"].reshape(T, 4), on.topk_ids.numpy())
        np.testing.assert_allclose(r["topk_logprobs"].reshape(T, 4), on.topk_logprobs.numpy(), atol=1e-4)

    half = tmp_path / "half"  # what a killed job could leave: shards, no manifest
    (half / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="manifest"):
        read_manifest(str(half))


def test_loop_reads_offline_targets_without_teacher(tmp_path):
    """run_local on offline rows (argmax column, teacher=None, precomputed held-out targets) gives
    exactly the online loop's losses and agreement on the same windows."""
    from bd_ray.testing.tiny import tiny_llama

    from bd_ray.models import init_drafter_from_verifier
    from bd_ray.teacher import compute_teacher_targets
    from bd_ray.train.driver import run_local
    from bd_ray.config.train import TrainJobConfig

    cfg = TrainJobConfig.model_validate({
        "models": {"drafter_layers": 1},
        "data": {"prefix_len": P, "continuation_len": T},
        "loss": {"budgets": {32: 0.5, 48: 0.5}, "policy": {"chunk_size": 8, "recent": 8},
                 "logits_chunk": 8, "prefill_chunk": 32},
        "optim": {"lr": 1e-3, "warmup_steps": 1, "max_steps": 4},
        "deepspeed": {"enabled": False},
        "run": {"eval_every": 4, "checkpoint_every": 1000, "log_every": 1000, "export": False},
    })
    g = np.random.default_rng(3)
    windows = [g.integers(0, 256, P + T) for _ in range(6)]
    evals = [g.integers(0, 256, P + T) for _ in range(2)]

    teacher = tiny_llama(vocab_size=256, layers=2, seed=1)
    online = run_local(cfg, [{"input_ids": w} for w in windows], teacher, init_drafter_from_verifier(teacher, 1),
                       eval_windows=evals, out_dir=str(tmp_path / "on"), resume=False, log=lambda s: None)
    tgt = lambda w: compute_teacher_targets(teacher, torch.as_tensor(w), P).argmax.numpy().astype(np.int32)  # noqa: E731
    rows = [{"input_ids": w, "argmax": tgt(w)} for w in windows]
    drafter = init_drafter_from_verifier(teacher, 1)
    offline = run_local(cfg, rows, None, drafter, eval_windows=evals, eval_targets=[tgt(w) for w in evals],
                        out_dir=str(tmp_path / "off"), resume=False, log=lambda s: None)
    assert [h["loss"] for h in offline["history"]] == [h["loss"] for h in online["history"]]
    assert offline["eval_history"] == online["eval_history"]
    with pytest.raises(ValueError, match="no teacher"):  # a row without targets and no teacher: clear error
        run_local(cfg, [{"input_ids": w} for w in windows], None, init_drafter_from_verifier(teacher, 1),
                  out_dir=str(tmp_path / "bad"), resume=False, log=lambda s: None)


def test_teacher_predictor_batches_give_the_targets_of_single_windows(tmp_path):
    """``batch_size > 1`` (one batched teacher forward per map_batches call) writes the same rows as
    batch 1 in fp32: argmax exactly, top-k ids exactly, log-probs to rounding."""
    from bd_ray.teacher_targets import TeacherPredictor

    tok, evals = write_tiny_world(tmp_path, P + T)
    pred = TeacherPredictor(str(tmp_path / "verifier"), P, top_k=3, prefill_chunk=32, cont_chunk=8)
    assert pred.device == torch.device("cpu") and pred.precision == "fp32"
    wins = np.stack(evals[:3])
    many = pred({"input_ids": wins, "doc_id": np.array(["a", "b", "c"], dtype=object)})
    for i, w in enumerate(wins):
        one = pred({"input_ids": w[None], "doc_id": np.array(["x"], dtype=object)})
        assert np.array_equal(one["argmax"][0], many["argmax"][i])
        assert np.array_equal(one["topk_ids"][0], many["topk_ids"][i])
        assert np.allclose(one["topk_logprobs"][0], many["topk_logprobs"][i], atol=1e-5)
    assert list(many["doc_id"]) == ["a", "b", "c"] and many["input_ids"].dtype == np.int32
