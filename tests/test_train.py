"""Training tests (docs/DESIGN.md sec 2 recipe on tiny random Llamas):

- golden numerics: a seeded 20-step single-process run matches tests/golden/*.json (rel 1e-4), and a
  deliberate change of the loss (lambda 0.5 -> 0.6) fails that comparison;
- resume: stopped at step k and resumed == uninterrupted (exact weights);
- Ray: 2 Ray Train workers on gloo, DeepSpeed ZeRO-2 drafter + ZeRO-3-sharded teacher, losses
  finite, teacher logits equal the dense model, held-out agreement rises, HF export loads.

Regenerate the golden curve (only after an intended numerics change):
    BD_RAY_UPDATE_GOLDEN=1 python -m pytest tests/test_train.py -k golden
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

import bd_ray.train.loop as train_loop_module
from bd_ray.train.driver import run_local
from bd_ray.train.engines import lr_factor
from bd_ray.config.train import ConfigError, TrainJobConfig, load_train_config
from bd_ray.testing.tiny import TRAIN_P as P, TRAIN_T as T, TRAIN_V as V  # noqa: F401
from bd_ray.testing.tiny import tiny_train_cfg as tiny_cfg, tiny_train_models as fresh_models, tiny_train_rows as random_rows
from bd_ray.testing.tiny import write_tiny_world

torch.set_num_threads(1)
GOLDEN = Path(__file__).parent / "golden" / "budgetdraft_tiny_20steps.json"


def curve(cfg, tmp_path) -> list[dict]:
    teacher, drafter = fresh_models()
    s = run_local(cfg, random_rows(), teacher, drafter, out_dir=str(tmp_path), resume=False, log=lambda m: None)
    return [{"step": h["step"], "loss": h["loss"], "l_a": h["l_a"], "l_c": h["l_c"], "budgets": h["budgets"]}
            for h in s["history"]]


def compare(got: list[dict], want: list[dict], rel=1e-4) -> list[str]:
    bad = []
    if len(got) != len(want):
        return [f"length {len(got)} != {len(want)}"]
    for g, w in zip(got, want):
        if g["budgets"] != w["budgets"]:
            bad.append(f"step {g['step']}: budgets {g['budgets']} != {w['budgets']}")
        for k in ("loss", "l_a", "l_c"):
            if not math.isclose(g[k], w[k], rel_tol=rel, abs_tol=1e-7):
                bad.append(f"step {g['step']} {k}: {g[k]:.7f} != golden {w[k]:.7f}")
    return bad


@pytest.mark.timeout(120)
def test_golden_loss_curve(tmp_path):
    got = curve(tiny_cfg(), tmp_path / "a")
    if os.environ.get("BD_RAY_UPDATE_GOLDEN") == "1" or not GOLDEN.exists():
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps({"note": "tests/test_train.py::test_golden_loss_curve; tiny 2-layer teacher, "
                                              "1-layer drafter, P=96 T=16, budgets {32,48}, lr 1e-3, 20 steps",
                                      "curve": got}, indent=1))
        if os.environ.get("BD_RAY_UPDATE_GOLDEN") != "1":
            pytest.fail(f"golden file was missing; wrote {GOLDEN} -- commit it and rerun")
    want = json.loads(GOLDEN.read_text())["curve"]
    assert compare(got, want) == []
    assert all(math.isfinite(h["loss"]) for h in got)
    # A deliberate change of the loss must be caught by the same comparison.
    changed = curve(tiny_cfg(loss__lambda=0.6), tmp_path / "b")
    assert compare(changed, want), "lambda 0.5 -> 0.6 went unnoticed by the golden comparison"


@pytest.mark.timeout(120)
def test_resume_matches_uninterrupted(tmp_path):
    over = dict(optim__max_steps=8, optim__grad_accum=2, run__checkpoint_every=3)
    teacher, drafter = fresh_models()
    full = run_local(tiny_cfg(**over), random_rows(), teacher, drafter, out_dir=str(tmp_path / "full"),
                     resume=False, log=lambda m: None)
    teacher, drafter = fresh_models()
    part = run_local(tiny_cfg(**over, run__stop_after_steps=5), random_rows(), teacher, drafter,
                     out_dir=str(tmp_path / "staged"), resume=False, log=lambda m: None)
    assert part["step"] == 5 and not part["finished"]
    assert sorted(os.listdir(tmp_path / "staged" / "checkpoints")) == ["step_0000003", "step_0000005"]
    teacher, drafter = fresh_models()  # a new process would start exactly like this
    resumed = run_local(tiny_cfg(**over), random_rows(), teacher, drafter, out_dir=str(tmp_path / "staged"),
                        resume=True, log=lambda m: None)
    assert resumed["finished"] and resumed["step"] == 8
    a = full["engine"].module.state_dict()
    b = resumed["engine"].module.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [h["loss"] for h in full["history"]] == [h["loss"] for h in resumed["history"]]


def test_nonfinite_windows_are_skipped_and_counted(tmp_path, monkeypatch):
    real = train_loop_module.budgetdraft_loss
    calls = {"n": 0}

    def flaky(*a, **k):
        out = real(*a, **k)
        calls["n"] += 1
        if calls["n"] in (2, 3):  # two poisoned windows
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(train_loop_module, "budgetdraft_loss", flaky)
    teacher, drafter = fresh_models()
    s = run_local(tiny_cfg(optim__max_steps=4), random_rows(), teacher, drafter, out_dir=str(tmp_path),
                  resume=False, log=lambda m: None)
    assert s["skipped"] == 2 and s["step"] == 4
    assert all(math.isfinite(h["loss"]) for h in s["history"])
    assert all(torch.isfinite(p).all() for p in s["engine"].module.parameters())


def test_schedule_and_config_errors():
    assert lr_factor(0, 150, 5000) == pytest.approx(1 / 150)
    assert lr_factor(149, 150, 5000) == pytest.approx(1.0)
    assert lr_factor(5000, 150, 5000) == pytest.approx(0.0)
    assert lr_factor(150 + (5000 - 150) // 2, 150, 5000) == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(ConfigError, match="optim.lr"):
        load_train_config(None, ["optim.lr=-1"])
    with pytest.raises(ConfigError, match="loss.lamda"):
        load_train_config(None, ["loss.lamda=0.6"])
    with pytest.raises(ConfigError, match="loss.budgets"):
        load_train_config(None, ["loss.budgets={256: 0}"])
    cfg = load_train_config(None, ["loss.lambda=0.6", "loss.fixed_budget=1024"])
    assert cfg.loss.lam == 0.6 and cfg.loss.fixed_budget == 1024
    d = TrainJobConfig().model_dump(by_alias=True)
    assert d["loss"]["lambda"] == 0.5 and d["optim"]["lr"] == 1e-5 and d["optim"]["warmup_steps"] == 150


def test_config_errors_point_at_the_field_and_limit():
    # a cross-field check is reported at the field it is about, with that field's value, not as
    # "<root>: Value error, ..." followed by the whole config
    with pytest.raises(ConfigError) as ei:
        load_train_config(None, ["optim.warmup_steps=6000"])
    assert "optim.warmup_steps: must be <= max_steps (5000) (got 6000)" in str(ei.value)
    with pytest.raises(ConfigError) as ei:
        load_train_config(None, ["loss.fixed_budget=256", "loss.full_cache_only=true"])
    msg = str(ei.value)
    assert "loss.fixed_budget: exclusive with loss.full_cache_only" in msg and "(got 256)" in msg
    assert "<root>" not in msg and "Value error" not in msg and "'models'" not in msg, msg
    with pytest.raises(ConfigError, match=r"teacher\.targets_path: required when teacher\.mode is offline"):
        load_train_config(None, ["teacher.mode=offline"])
    # a long input (a whole mapping) is cut to ~100 characters
    many = "{" + ", ".join(f"{b}: 1" for b in range(100, 160)) + ", 300: 0}"
    with pytest.raises(ConfigError) as ei:
        load_train_config(None, [f"loss.budgets={many}"])
    line = next(x for x in str(ei.value).splitlines() if "loss.budgets" in x)
    assert line.endswith("...)") and len(line.split("(got ", 1)[1]) <= 101, line
    # NaN and infinities are "not finite", not a bound they fail
    for bad, field in [("optim.lr=.nan", "optim.lr"), ("optim.lr=.inf", "optim.lr"),
                       ("loss.lambda=.nan", "loss.lambda"), ("optim.grad_clip=.inf", "optim.grad_clip")]:
        with pytest.raises(ConfigError, match=rf"{field.replace('.', r'[.]')}: Input should be a finite number"):
            load_train_config(None, [bad])
    # each Adam beta lies in [0, 1) (torch.optim.AdamW's own rule)
    for bad, field, limit in [("optim.betas=[0.9, 1.5]", "optim.betas.1", "less than 1"),
                              ("optim.betas=[0.9, 1.0]", "optim.betas.1", "less than 1"),
                              ("optim.betas=[-0.1, 0.999]", "optim.betas.0", "greater than or equal to 0")]:
        with pytest.raises(ConfigError, match=rf"{field.replace('.', r'[.]')}: Input should be {limit}"):
            load_train_config(None, [bad])
    assert load_train_config(None, ["optim.betas=[0.8, 0.99]"]).optim.betas == (0.8, 0.99)
    # sparse-view budgets are checked against the prefix before Ray starts, not in a worker
    with pytest.raises(ConfigError, match=r"loss\.budgets: 16 is below the minimum 40 that loss\.policy "
                                          r"chunk_topk keeps at data\.prefix_len 16128"):
        load_train_config(None, ["loss.budgets={16: 1, 256: 1}"])
    with pytest.raises(ConfigError, match=r"loss\.fixed_budget: 32 is below the minimum 40"):
        load_train_config(None, ["loss.fixed_budget=32"])
    with pytest.raises(ConfigError, match=r"loss\.budgets: every budget \(2048\) keeps the whole prefix of "
                                          r"data\.prefix_len 1024 tokens"):
        load_train_config(None, ["data.prefix_len=1024", "loss.budgets={2048: 1}"])
    # L_A only: the budgets are never used, so nothing to check
    assert load_train_config(None, ["loss.full_cache_only=true", "loss.budgets={16: 1}"]).loss.full_cache_only


def test_paper_configs_load():
    root = Path(__file__).resolve().parents[1] / "jobs" / "configs"
    for name in ("pg_mini_2k.yaml", "pg_mini_2k_naive.yaml", "pg_mini_2k_fixed.yaml"):
        cfg = load_train_config(root / name)
        assert cfg.data.prefix_len + cfg.data.continuation_len == 2048
    assert load_train_config(root / "pg_mini_2k_naive.yaml").loss.full_cache_only
    assert load_train_config(root / "pg_mini_2k_fixed.yaml").loss.fixed_budget is not None


# ------------------------------------------------------------------------------------------
# Ray Train + DeepSpeed (2 workers, gloo)
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_ray_deepspeed_two_workers(tmp_path, ray_cluster):
    from transformers import AutoModelForCausalLM

    from bd_ray.train.driver import run_ray

    tok, evals = write_tiny_world(tmp_path, P + T)
    cfg = TrainJobConfig.model_validate({
        "models": {"verifier": str(tmp_path / "verifier"), "drafter_layers": 1},
        "data": {"source": str(tmp_path / "corpus.parquet"), "prefix_len": P, "continuation_len": T},
        "loss": {"budgets": {32: 0.5, 48: 0.5}, "policy": {"chunk_size": 8, "recent": 8},
                 "logits_chunk": 8, "prefill_chunk": 32},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "max_steps": 20},
        "deepspeed": {"zero_stage": 2, "teacher_shard": "zero3", "teacher_persistence_threshold": 0},
        # one eval + one checkpoint at the end (plus the step-0 eval): each costs both workers seconds
        "run": {"name": "t", "output_dir": str(tmp_path / "runs"), "num_workers": 2, "eval_every": 20,
                "checkpoint_every": 20, "check_teacher_dense": True, "log_every": 5},
    })
    s = run_ray(cfg, eval_windows_override=evals)
    m = json.loads((Path(s["out_dir"]) / "metrics.json").read_text())
    assert m["finished"] and m["world_size"] == 2 and m["step"] == 20
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["l_c"]) for h in m["history"])
    assert m["teacher_dense_max_abs_diff"] < 1e-5  # ZeRO-3 teacher == dense model
    assert m["teacher_param_fraction_local"] < 0.75  # really sharded across the 2 workers
    ev = m["eval_history"]
    assert ev[0]["step"] == 0 and ev[-1]["step"] == 20
    assert ev[-1]["agree_full"] > ev[0]["agree_full"] + 0.05, ev
    st = s["data_stats"]["train"]
    assert st["too_short"] == 1 and st["empty"] == 1 and st["ok"] == 4
    assert (Path(s["out_dir"]) / "curves.png").stat().st_size > 1000
    assert s["checkpoint"] and (Path(s["checkpoint"]) / "engine").is_dir()
    drafter = AutoModelForCausalLM.from_pretrained(Path(s["out_dir"]) / "final")
    assert drafter.config.num_hidden_layers == 1


@pytest.mark.timeout(120)
def test_training_over_a_draft_vocabulary_exports_it(tmp_path):
    from bd_ray.draft_vocab import DraftVocab, load_draft_vocab, save_draft_vocab

    teacher, drafter = fresh_models()
    vocab = DraftVocab(list(range(0, V, 2)), V)
    save_draft_vocab(vocab, tmp_path / "vocab")
    cfg = tiny_cfg(optim__max_steps=4, run__export=True, models__draft_vocab=str(tmp_path / "vocab"))
    head_before = drafter.get_output_embeddings().weight.detach().clone()
    s = run_local(cfg, random_rows(), teacher, drafter, out_dir=str(tmp_path / "run"), resume=False, log=lambda m: None)
    assert s["finished"] and all(math.isfinite(h["loss"]) for h in s["history"])
    head = s["engine"].module.get_output_embeddings().weight.detach()
    # the subset's rows of the (tied) head were trained
    assert not torch.equal(head[0::2], head_before[0::2])
    export = tmp_path / "run" / "final"
    assert load_draft_vocab(export).ids.tolist() == vocab.ids.tolist()
    # the full head is saved next to the vocabulary; load_drafter applies the file (test_draft_vocab.py)
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(export).get_output_embeddings().weight.shape[0] == V


# ------------------------------------------------------------------------------------------
# run.executor=local: jobs/train_drafter.py in this process on offline targets (no Ray)
# ------------------------------------------------------------------------------------------


def _write_offline_targets(root: Path, n_train: int = 6) -> tuple[Path, Path]:
    """A tiny verifier + a jobs/teacher_targets.py-shaped output (train/ and eval/ parquet with the
    teacher's argmax, manifest.json) written here without Ray. Returns ``(verifier dir, targets dir)``."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bd_ray.models import load_verifier
    from bd_ray.teacher import compute_teacher_targets

    tok, evals = write_tiny_world(root, P + T)
    teacher, _ = load_verifier(root / "verifier", dtype=torch.float32)
    g = np.random.default_rng(0)

    def rows(windows, prefix):
        return [{"input_ids": np.asarray(w, dtype=np.int32), "doc_id": f"{prefix}{i}", "start": 0,
                 "argmax": compute_teacher_targets(teacher, torch.as_tensor(np.asarray(w, dtype=np.int64)), P)
                 .argmax.numpy().astype(np.int32)} for i, w in enumerate(windows)]

    out = root / "targets"
    for split, rs in (("train", rows([g.integers(0, len(tok), P + T) for _ in range(n_train)], "d")),
                      ("eval", rows(evals[:2], "held"))):
        (out / split).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rs), out / split / "part-0.parquet")
    (out / "manifest.json").write_text(json.dumps({"prefix_len": P, "continuation_len": T,
                                                   "train_windows": n_train, "eval_windows": 2}))
    return root / "verifier", out


@pytest.mark.timeout(300)
def test_local_executor_trains_like_the_local_driver(tmp_path, capsys):
    """``jobs/train_drafter.py --set run.executor=local`` trains in this process (Ray never started)
    and writes what the former results/reference_2k/train_local.py wrote: metrics.json, curves.png,
    final/ and checkpoints/step_*, with the losses of run_local on the same seeded row order."""
    import importlib.util

    import numpy as np
    import ray

    from bd_ray.teacher_targets import read_target_rows
    from bd_ray.train.engines import load_models

    vdir, targets = _write_offline_targets(tmp_path)
    sets = {"models.verifier": vdir, "models.drafter_layers": 1, "data.prefix_len": P, "data.continuation_len": T,
            "data.eval_windows": 2, "loss.budgets": "{32: 0.5, 48: 0.5}", "loss.policy.chunk_size": 8,
            "loss.policy.recent": 8, "loss.logits_chunk": 8, "loss.prefill_chunk": 32, "optim.lr": 1e-3,
            "optim.warmup_steps": 1, "optim.max_steps": 3, "deepspeed.enabled": "false",
            "teacher.mode": "offline", "teacher.targets_path": targets, "run.executor": "local",
            "run.output_dir": tmp_path / "runs", "run.name": "loc", "run.checkpoint_every": 2,
            "run.eval_every": 3}
    spec = importlib.util.spec_from_file_location("bd_ray_jobs_train_drafter",
                                                  Path(__file__).resolve().parents[1] / "jobs" / "train_drafter.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert job.main([a for k, v in sets.items() for a in ("--set", f"{k}={v}")]) == 0
    assert not ray.is_initialized()
    out = tmp_path / "runs" / "loc"
    assert "training finished" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["checkpoints", "curves.png", "final", "metrics.json"]
    assert sorted(os.listdir(out / "checkpoints")) == ["step_0000002", "step_0000003"]
    m = json.loads((out / "metrics.json").read_text())
    assert m["finished"] and m["step"] == 3 and [e["step"] for e in m["eval_history"]] == [0, 3]
    assert (out / "final" / "config.json").exists() and (out / "final" / "tokenizer.json").exists()

    # the former local driver, by hand: seeded row order, held-out rows, run_local
    cfg = load_train_config(None, [f"{k}={v}" for k, v in sets.items()])
    rows = read_target_rows(str(targets), "train")
    rows = [rows[i] for i in np.random.default_rng(cfg.data.shuffle_seed).permutation(len(rows))]
    evals = read_target_rows(str(targets), "eval", limit=cfg.data.eval_windows)
    _, drafter = load_models(cfg, str(vdir))
    ref = run_local(cfg, rows, None, drafter, eval_windows=[r["input_ids"].astype("int64") for r in evals],
                    eval_targets=[r["argmax"] for r in evals], out_dir=str(tmp_path / "ref"),
                    tokenizer_path=str(vdir), log=lambda s: None)
    assert [h["loss"] for h in m["history"]] == [h["loss"] for h in ref["history"]]
    assert m["eval_history"] == ref["eval_history"]


def test_executor_config_errors_name_the_field():
    assert TrainJobConfig().run.executor == "ray"
    with pytest.raises(ConfigError, match=r"run\.executor: Input should be 'ray' or 'local'"):
        load_train_config(None, ["run.executor=threads"])
    with pytest.raises(ConfigError, match=r"run\.executor: local trains from offline teacher targets only"):
        load_train_config(None, ["run.executor=local"])
    cfg = load_train_config(None, ["run.executor=local", "teacher.mode=offline", "teacher.targets_path=t"])
    assert cfg.run.executor == "local"
