"""Training under faults (issue 8): lost workers, damaged checkpoints, hostile data, mismatched models.

- checkpoints are sealed by per-rank manifests (sizes + SHA-256, written last); every kind of damage
  is detected, and publishing a checkpoint directory is atomic (a crash mid-copy leaves no
  half-written directory under the final name);
- a damaged latest checkpoint is skipped with a warning, the previous intact one is restored, and
  the run still ends with the uninterrupted run's weights (single process, and the Ray Train
  restore path against a storage folder laid out like Ray's);
- a teacher/drafter/config mismatch is one clear error in the driver before Ray starts;
- Ray Train: the worker process is SIGKILLed mid-run (found by pid among this test's own Ray
  processes) and, while the group restarts, the latest registered checkpoint is damaged;
  FailureConfig restarts the worker, it detects the damage, restores the previous checkpoint, and
  the final drafter equals an uninterrupted run's, on a corpus with an empty document,
  undecodable bytes, a one-token document and a truncated parquet shard (all skipped, counted);
- Ray Train with 2 workers (case 16): stopped at step 10 of 20 and restarted as a new job, every
  rank's losses, sampled budgets and ZeRO-2 optimizer partition, the lr schedule and the final
  weights equal an uninterrupted run's exactly.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
import torch

from bd_ray.checkpoints import (NO_MANIFEST, CheckpointCorruptError, CheckpointIntegrityWarning,
                                checkpoint_problem, manifest_name, restorable_checkpoint_dir, write_manifest)
from bd_ray.store import publish_dir
from bd_ray.models import TokenizerMismatchError
from bd_ray.train.compat import ModelCompatError, check_models_compatible
from bd_ray.train.driver import run_local
from bd_ray.config.train import TrainJobConfig
from bd_ray.testing.tiny import TRAIN_P as P, TRAIN_T as T

SPARSE_VIEWS = {"budgets": {48: 1.0}}   # a budget below the tiny prefix (default paper budgets exceed it)
from bd_ray.testing.tiny import TINY_TEXT, own_ray_processes, tiny_llama, tiny_tokenizer, write_tiny_world
from bd_ray.testing.tiny import tiny_train_cfg as tiny_cfg, tiny_train_models as fresh_models, tiny_train_rows as random_rows

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------
# Manifests and atomic publishing (no models)
# ------------------------------------------------------------------------------------------


def _fake_checkpoint(d: Path, step: int = 3, world: int = 2) -> Path:
    """A checkpoint as two ranks leave it merged in storage: rank 0 state + model, rank 1 optimizer."""
    d.mkdir(parents=True)
    (d / "state.json").write_text(json.dumps({"step": step, "world": world}))
    (d / "engine").mkdir()
    (d / "engine" / "model.pt").write_bytes(os.urandom(4096))
    r1 = d.parent / f"{d.name}_rank1"
    (r1 / "engine").mkdir(parents=True)
    (r1 / "engine" / "optim_rank1.pt").write_bytes(os.urandom(2048))
    write_manifest(str(d), 0, world, step)
    write_manifest(str(r1), 1, world, step)
    for f in r1.rglob("*"):  # merge rank 1's files (what Ray Train does in storage)
        if f.is_file():
            (d / f.relative_to(r1)).parent.mkdir(parents=True, exist_ok=True)
            f.replace(d / f.relative_to(r1))
    return d


def test_manifest_detects_every_kind_of_damage(tmp_path):
    d = _fake_checkpoint(tmp_path / "c")
    assert checkpoint_problem(str(d)) is None
    man = json.loads((d / manifest_name(0)).read_text())
    assert set(man["files"]) == {"state.json", "engine/model.pt"} and man["world"] == 2

    def damaged(mutate) -> str:
        c = _fake_checkpoint(tmp_path / f"x{len(list(tmp_path.iterdir()))}")
        mutate(c)
        return checkpoint_problem(str(c))

    def flip(p: Path) -> None:
        b = bytearray(p.read_bytes())
        b[100] ^= 0xFF
        p.write_bytes(bytes(b))

    assert "SHA-256" in damaged(lambda c: flip(c / "engine" / "model.pt"))
    assert "bytes" in damaged(lambda c: (c / "engine" / "optim_rank1.pt").write_bytes(b"short"))
    assert "missing" in damaged(lambda c: (c / "engine" / "model.pt").unlink())
    assert "rank 1 of 2 is missing" in damaged(lambda c: (c / manifest_name(1)).unlink())
    assert "state.json is unreadable" in damaged(lambda c: (c / "state.json").write_text('{"step": 3, "wor'))
    assert "state.json is missing" in damaged(lambda c: (c / "state.json").unlink())
    legacy = damaged(lambda c: [(c / manifest_name(r)).unlink() for r in (0, 1)])
    assert legacy == NO_MANIFEST


def test_publish_dir_is_atomic(tmp_path, monkeypatch):
    src = _fake_checkpoint(tmp_path / "src", world=1)
    publish_dir(str(src), str(tmp_path / "ck" / "step_0000003"))
    assert checkpoint_problem(str(tmp_path / "ck" / "step_0000003")) is None
    # A crash in the middle of copying: nothing appears under the final name, the old one survives.
    import shutil

    real = shutil.copyfile
    calls = {"n": 0}

    def dying_copy(a, b, **k):
        calls["n"] += 1
        if calls["n"] % 3 == 2:  # the second file of each copy
            raise OSError("disk died mid-copy")
        return real(a, b, **k)

    monkeypatch.setattr(shutil, "copyfile", dying_copy)
    with pytest.raises(OSError, match="mid-copy"):
        publish_dir(str(src), str(tmp_path / "ck" / "step_0000006"))
    calls["n"] = 0
    with pytest.raises(OSError, match="mid-copy"):
        publish_dir(str(src), str(tmp_path / "ck" / "step_0000003"))  # replacing an existing one
    monkeypatch.setattr(shutil, "copyfile", real)
    assert sorted(os.listdir(tmp_path / "ck")) == ["step_0000003"]
    assert checkpoint_problem(str(tmp_path / "ck" / "step_0000003")) is None


@pytest.mark.timeout(180)
def test_damaged_latest_checkpoint_falls_back_and_matches_uninterrupted(tmp_path):
    over = dict(optim__max_steps=6, run__checkpoint_every=2)
    teacher, drafter = fresh_models()
    full = run_local(tiny_cfg(**over), random_rows(), teacher, drafter, out_dir=str(tmp_path / "full"),
                     resume=False, log=lambda m: None)
    teacher, drafter = fresh_models()
    part = run_local(tiny_cfg(**over, run__stop_after_steps=4), random_rows(), teacher, drafter,
                     out_dir=str(tmp_path / "staged"), resume=False, log=lambda m: None)
    ck = tmp_path / "staged" / "checkpoints"
    assert part["step"] == 4 and sorted(os.listdir(ck)) == ["step_0000002", "step_0000004"]
    assert all(checkpoint_problem(str(ck / n)) is None for n in os.listdir(ck))
    blob = ck / "step_0000004" / "local_engine.pt"  # bit rot in the newest checkpoint
    b = bytearray(blob.read_bytes())
    b[len(b) // 2] ^= 0x01
    blob.write_bytes(bytes(b))
    logs: list[str] = []
    teacher, drafter = fresh_models()
    with pytest.warns(CheckpointIntegrityWarning, match=r"step_0000004.*SHA-256.*step_0000002"):
        resumed = run_local(tiny_cfg(**over), random_rows(), teacher, drafter, out_dir=str(tmp_path / "staged"),
                            resume=True, log=logs.append)
    assert resumed["finished"] and resumed["step"] == 6
    assert [r["step"] for r in resumed["restores"]] == [2]  # only the work after step 2 was redone
    assert any("WARNING" in m and "step_0000004" in m for m in logs)
    a, b2 = full["engine"].module.state_dict(), resumed["engine"].module.state_dict()
    assert all(torch.equal(a[k], b2[k]) for k in a)
    m = json.loads((tmp_path / "staged" / "metrics.json").read_text())
    assert m["restores"][0]["step"] == 2 and m["step"] == 6


def test_ray_restore_path_skips_damaged_checkpoint(tmp_path):
    """The Ray Train worker's restore (``restorable_checkpoint_dir``) on a storage folder laid out as
    Ray's: the registered latest checkpoint is damaged, its older sibling is restored instead."""
    from ray.train import Checkpoint

    run = tmp_path / "ray" / "run"
    old = _fake_checkpoint(run / "checkpoint_2026-11-30_00-00-01.000000", step=3)
    new = _fake_checkpoint(run / "checkpoint_2026-11-30_00-00-09.000000", step=6)
    partial = run / "checkpoint_2026-11-30_00-00-12.000000"  # an upload that never finished
    partial.mkdir()
    (partial / "state.json").write_text(json.dumps({"step": 9, "world": 2}))
    (run / "checkpoint_manager_snapshot.json").write_text("{}")
    with restorable_checkpoint_dir(Checkpoint.from_directory(str(new))) as d:
        assert Path(d) == new  # intact: used as is
    (new / "engine" / "model.pt").write_bytes(b"\0" * 4096)
    with pytest.warns(CheckpointIntegrityWarning, match="does not match its SHA-256"):
        with restorable_checkpoint_dir(Checkpoint.from_directory(str(new))) as d:
            assert Path(d) == old
    (old / "state.json").write_text("{")
    with pytest.raises(CheckpointCorruptError, match="no earlier intact checkpoint"):
        with restorable_checkpoint_dir(Checkpoint.from_directory(str(new))):
            pass


# ------------------------------------------------------------------------------------------
# Teacher/drafter mismatch: one clear error in the driver, before Ray starts
# ------------------------------------------------------------------------------------------


def _save(model, tok, d: Path) -> str:
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def test_model_mismatch_is_caught_in_the_driver_before_ray(tmp_path):
    import ray

    from bd_ray.train.driver import run_ray

    tok = tiny_tokenizer()
    vdir = _save(tiny_llama(vocab_size=len(tok), layers=2, max_positions=512), tok, tmp_path / "v")
    other_tok = tiny_tokenizer(300)
    cases = []
    cases.append((_save(tiny_llama(vocab_size=len(other_tok), layers=1), other_tok, tmp_path / "d_vocab"),
                  TokenizerMismatchError, "vocabulary sizes differ"))
    from transformers import PreTrainedTokenizerFast

    bos_tok = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="</s>", bos_token="</s>")
    cases.append((_save(tiny_llama(vocab_size=len(tok), layers=1), bos_tok, tmp_path / "d_special"),
                  TokenizerMismatchError, "special token bos_token differs"))
    cases.append((_save(tiny_llama(vocab_size=len(tok) + 64, layers=1), tok, tmp_path / "d_width"),
                  TokenizerMismatchError, "logits widths"))
    cases.append((_save(tiny_llama(vocab_size=len(tok), layers=1, max_positions=64), tok, tmp_path / "d_pos"),
                  ModelCompatError, r"drafter .* max_position_embeddings=64.*96 \+ 16 = 112"))
    for drafter, exc, msg in cases:
        cfg = TrainJobConfig.model_validate({
            "models": {"verifier": vdir, "drafter": drafter},
            "loss": SPARSE_VIEWS, "data": {"source": str(tmp_path / "nowhere.parquet"), "prefix_len": P, "continuation_len": T},
            "run": {"output_dir": str(tmp_path / "runs"), "ray_address": "local"}})
        with pytest.raises(exc, match=msg):
            run_ray(cfg)
        assert not ray.is_initialized(), "the mismatch must be found before Ray starts"
    # the verifier itself too short for the window; too many layers to copy into the drafter
    short = _save(tiny_llama(vocab_size=len(tok), layers=2, max_positions=100), tok, tmp_path / "v_short")
    with pytest.raises(ModelCompatError, match=r"verifier \(teacher\).*max_position_embeddings=100"):
        check_models_compatible(TrainJobConfig.model_validate(
            {"models": {"verifier": short}, "loss": SPARSE_VIEWS, "data": {"prefix_len": P, "continuation_len": T}}), short)
    with pytest.raises(ModelCompatError, match="drafter_layers=3.*only 2 layers"):
        check_models_compatible(TrainJobConfig.model_validate(
            {"models": {"verifier": vdir, "drafter_layers": 3}, "loss": SPARSE_VIEWS, "data": {"prefix_len": P, "continuation_len": T}}),
            vdir)
    with pytest.raises(ModelCompatError, match="from-verifier:5.*only 2 layers"):
        check_models_compatible(TrainJobConfig.model_validate(
            {"models": {"verifier": vdir, "drafter": "from-verifier:5"}, "loss": SPARSE_VIEWS, "data": {"prefix_len": P, "continuation_len": T}}),
            vdir)
    check_models_compatible(TrainJobConfig.model_validate(
        {"models": {"verifier": vdir, "drafter": "from-verifier:2"}, "loss": SPARSE_VIEWS, "data": {"prefix_len": P, "continuation_len": T}}),
        vdir)
    check_models_compatible(TrainJobConfig.model_validate(  # a compatible pair passes
        {"models": {"verifier": vdir, "drafter": vdir}, "loss": SPARSE_VIEWS, "data": {"prefix_len": P, "continuation_len": T}}), vdir)


def test_relative_paths_reach_ray_workers_absolute_and_a_missing_draft_vocab_fails_in_the_driver(tmp_path, monkeypatch):
    """Ray Train workers do not run in the driver's working directory: a relative
    ``models.draft_vocab`` / ``models.drafter`` from the command line must be shipped absolute,
    and a draft vocabulary that is not there is a driver error naming the field (not a worker crash)."""
    import ray

    from bd_ray.draft_vocab import DraftVocab, save_draft_vocab
    from bd_ray.train.compat import absolute_local_paths
    from bd_ray.train.driver import run_ray

    tok = tiny_tokenizer()
    vdir = _save(tiny_llama(vocab_size=len(tok), layers=2, max_positions=512), tok, tmp_path / "v")
    (tmp_path / "dv").mkdir()
    save_draft_vocab(DraftVocab(list(range(0, len(tok), 3)), len(tok)), tmp_path / "dv")
    monkeypatch.chdir(tmp_path)
    cfg = TrainJobConfig.model_validate({
        "models": {"verifier": vdir, "drafter": "v", "draft_vocab": "dv"},
        "loss": SPARSE_VIEWS, "data": {"source": "nowhere.parquet", "prefix_len": P, "continuation_len": T},
        "run": {"output_dir": str(tmp_path / "runs"), "ray_address": "local"}})
    shipped = absolute_local_paths(cfg)
    assert shipped.models.drafter == str(tmp_path / "v")
    assert shipped.models.draft_vocab == str(tmp_path / "dv")
    assert cfg.models.draft_vocab == "dv", "the caller's config is not changed"
    named = absolute_local_paths(cfg.model_copy(update={"models": cfg.models.model_copy(
        update={"drafter": "from-verifier:2", "draft_vocab": None})}))
    assert named.models.drafter == "from-verifier:2" and named.models.draft_vocab is None
    check_models_compatible(shipped, vdir)
    missing = cfg.model_copy(update={"models": cfg.models.model_copy(update={"draft_vocab": "no/such/dir"})})
    with pytest.raises(ModelCompatError, match=r"models.draft_vocab=.*no/such/dir.*jobs/draft_vocab.py"):
        run_ray(missing)
    assert not ray.is_initialized()
    save_draft_vocab(DraftVocab([1, 2, 3], len(tok) + 7), tmp_path / "dv")
    with pytest.raises(ModelCompatError, match=f"{len(tok) + 7}-token vocabulary, the verifier has {len(tok)}"):
        check_models_compatible(shipped, vdir)


def test_bad_offline_targets_and_missing_paths_are_one_line_job_errors(tmp_path, capsys):
    """jobs/train_drafter.py: offline targets made for other window lengths, a targets path that is
    not a teacher_targets output and a missing verifier each end with exit 2 and one line naming
    the field, before Ray starts (not a traceback)."""
    import importlib.util

    import ray

    spec = importlib.util.spec_from_file_location("bd_ray_jobs_train_drafter",
                                                  Path(__file__).resolve().parents[1] / "jobs" / "train_drafter.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    tok = tiny_tokenizer()
    vdir = _save(tiny_llama(vocab_size=len(tok), layers=2, max_positions=512), tok, tmp_path / "v")
    targets = tmp_path / "targets"
    targets.mkdir()
    (targets / "manifest.json").write_text(json.dumps({"prefix_len": P + 8, "continuation_len": T}))
    capsys.readouterr()  # drop the save progress bars
    base = ["--set", f"models.verifier={vdir}", "--set", "models.drafter_layers=1",
            "--set", f"data.prefix_len={P}", "--set", f"data.continuation_len={T}", "--set", "teacher.mode=offline", "--set", "loss.budgets={48: 1.0}",
            "--set", f"run.output_dir={tmp_path / 'runs'}", "--set", "run.ray_address=local"]
    for sets, expect in [
        ([f"teacher.targets_path={targets}"],
         f"teacher.targets_path='{targets}' holds targets for windows of {P + 8} + {T} tokens, but "
         f"data.prefix_len + data.continuation_len = {P} + {T}"),
        ([f"teacher.targets_path={tmp_path / 'nothing'}"], "is not a finished jobs/teacher_targets.py output"),
        ([f"teacher.targets_path={targets}", f"models.verifier={tmp_path / 'no_verifier'}"], "no_verifier"),
    ]:
        argv = base + [a for s in sets for a in ("--set", s)]
        assert job.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("[bd-ray] error:") and "\n" not in err and expect in err, err
        assert "Traceback" not in err
    assert not ray.is_initialized()


# ------------------------------------------------------------------------------------------
# Ray Train: a worker killed mid-run, on a hostile corpus
# ------------------------------------------------------------------------------------------


def write_hostile_corpus(root: Path) -> Path:
    """Parquet shards (binary text column, as raw-crawled corpora store it): 3 good books, an
    empty document, undecodable bytes, a one-token document, a held-out book, and a second train
    shard cut in half (a truncated upload)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    words = TINY_TEXT.split()
    g = np.random.default_rng(0)
    docs = [(f"book{i}", "train", " ".join(words[j % len(words)] for j in range(int(g.integers(0, 50)), 1200)).encode())
            for i in range(3)]
    docs += [("held", "test", (TINY_TEXT * 2).encode()), ("empty", "train", b""),
             ("bytes", "train", b"caf\xe9 au lait \xff\xfe\x80 " * 40), ("one", "train", b"Stop")]
    schema = pa.schema([("doc_id", pa.string()), ("split", pa.string()), ("text", pa.binary())])

    def table(rows):
        return pa.Table.from_pylist([dict(doc_id=a, split=b, text=c) for a, b, c in rows], schema=schema)

    d = root / "corpus"
    d.mkdir()
    pq.write_table(table(docs), d / "train-0.parquet")
    pq.write_table(table([(f"lost{i}", "train", TINY_TEXT.encode()) for i in range(4)]), d / "train-1.parquet")
    data = (d / "train-1.parquet").read_bytes()
    (d / "train-1.parquet").write_bytes(data[: len(data) // 2])
    return d


def _ray_cfg(tmp_path: Path, name: str, max_steps: int, **over) -> TrainJobConfig:
    """The Ray Train runs' config on the tiny verifier and ``tmp_path/corpus``; ``over``:
    ``section__key=value`` replacements."""
    tree = {
        "models": {"verifier": str(tmp_path / "verifier"), "drafter_layers": 1},
        "data": {"source": str(tmp_path / "corpus"), "prefix_len": P, "continuation_len": T, "eval_windows": 0,
                 "tokenizer_num_cpus": 0.25},
        "loss": {"budgets": {32: 0.5, 48: 0.5}, "policy": {"chunk_size": 8, "recent": 8},
                 "logits_chunk": 8, "prefill_chunk": 32},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "max_steps": max_steps, "grad_accum": 2},
        "deepspeed": {"zero_stage": 2, "teacher_shard": "none"},
        "run": {"name": name, "output_dir": str(tmp_path / "runs"), "num_workers": 1, "eval_every": 10_000,
                "checkpoint_every": 3, "keep_checkpoints": 2, "max_failures": 2, "log_every": 6},
    }
    for k, v in over.items():
        sec, key = k.split("__")
        tree[sec][key] = v
    return TrainJobConfig.model_validate(tree)


def _registered_checkpoints(storage: Path) -> list[str]:
    """Checkpoint dir names Ray Train has registered (its snapshot), for a run's storage folder."""
    snaps = list(storage.glob("*/checkpoint_manager_snapshot.json"))
    if not snaps:
        return []
    try:
        text = snaps[0].read_text()
    except OSError:
        return []
    return sorted(set(__import__("re").findall(r"checkpoint_\d{4}-[\d_.-]+", text)))


def _final_weights(out_dir: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(out_dir) / "final" / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_worker_killed_mid_run_resumes_to_the_same_drafter(tmp_path, ray_cluster):
    from bd_ray.train.driver import run_ray

    write_tiny_world(tmp_path, P + T)  # the tiny verifier (+ an unused clean corpus)
    write_hostile_corpus(tmp_path)
    steps = 18  # checkpoints every 3 steps: the kill lands after step 6, well before the end

    # Two runs of one config on one cluster, side by side (wall time): "kill" is SIGKILLed once a
    # checkpoint is registered, "ref" runs uninterrupted. The kill run's worker is identified (by
    # pid) before the ref run starts, so the right process is killed.
    box: dict = {}

    def run(name):
        try:
            box[name] = run_ray(_ray_cfg(tmp_path, name, steps))
        except BaseException as exc:  # noqa: BLE001 -- reported by the main thread
            box[name] = exc

    threads = {"kill": threading.Thread(target=run, args=("kill",), daemon=True)}
    threads["kill"].start()
    deadline = time.time() + 300
    victim = []
    while not victim and time.time() < deadline and threads["kill"].is_alive():
        victim = own_ray_processes("ray::RayTrainWorker")
        time.sleep(0.1)
    assert len(victim) == 1, victim
    killed = victim[0].pid
    threads["ref"] = threading.Thread(target=run, args=("ref",), daemon=True)
    threads["ref"].start()
    storage = tmp_path / "runs" / "kill" / "ray"
    while time.time() < deadline and threads["kill"].is_alive() and len(_registered_checkpoints(storage)) < 2:
        time.sleep(0.1)
    assert len(_registered_checkpoints(storage)) >= 2, "the kill run ended (or never checkpointed) before the kill"
    os.kill(killed, signal.SIGKILL)
    # While the worker group restarts, damage the latest registered checkpoint (bit rot): the new
    # worker must detect it and restore the previous one instead.
    time.sleep(0.5)
    damaged = storage / "kill" / _registered_checkpoints(storage)[-1]
    damaged_step = json.loads((damaged / "state.json").read_text())["step"]
    blob = max((p for p in damaged.rglob("*") if p.is_file() and p.suffix == ".pt"), key=lambda p: p.stat().st_size)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    for t in threads.values():
        t.join(timeout=420)
    assert not any(t.is_alive() for t in threads.values())
    for name in ("ref", "kill"):
        assert isinstance(box[name], dict), (name, box[name])
    ref = box["ref"]
    st = ref["data_stats"]
    assert st["train"]["ok"] == 3 and st["train"]["empty"] == 1 and st["train"]["undecodable"] == 1
    assert st["train"]["too_short"] == 1 and "test" not in st  # held-out book never enters training
    assert st["?"]["unreadable"] == 1 and st["?"]["skipped_doc_ids"][0].endswith("train-1.parquet")
    m_ref = json.loads((Path(ref["out_dir"]) / "metrics.json").read_text())
    assert m_ref["finished"] and m_ref["restores"] == [] and m_ref["data_stats"] == st
    box["s"] = box["kill"]
    m = json.loads((Path(box["s"]["out_dir"]) / "metrics.json").read_text())
    assert m["finished"] and m["step"] == steps
    assert len(m["restores"]) == 1, m["restores"]
    restore = m["restores"][0]
    assert restore["pid"] != killed and restore["step"] % 3 == 0
    assert 3 <= restore["step"] < damaged_step and Path(restore["from"]).name != damaged.name, (restore, damaged)
    # Lost: only the steps after the restored checkpoint, redone identically.
    assert [h["loss"] for h in m["history"]] == [h["loss"] for h in m_ref["history"]]
    a, b = _final_weights(ref["out_dir"]), _final_weights(box["s"]["out_dir"])
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert box["s"]["data_stats"] == st


# ------------------------------------------------------------------------------------------
# Ray Train, 2 workers: stopped at step 10 of 20, restarted, every rank resumes exactly (case 16)
# ------------------------------------------------------------------------------------------


def _checkpoints_by_step(out_dir: str) -> dict[int, Path]:
    """A Ray Train run's checkpoint directories in storage (``out_dir/ray``), by their step."""
    found = {}
    for state in Path(out_dir, "ray").glob("*/checkpoint_*/state.json"):
        found[json.loads(state.read_text())["step"]] = state.parent
    return found


def _exp_avg_of_rank(ckpt: Path, rank: int) -> list[torch.Tensor]:
    """Rank ``rank``'s AdamW ``exp_avg`` tensors in a DeepSpeed ZeRO checkpoint (its own partition file)."""
    files = list(ckpt.rglob(f"zero_pp_rank_{rank}_mp_rank_*optim_states.pt"))
    assert len(files) == 1, (rank, sorted(p.name for p in ckpt.rglob("*.pt")))
    sd = torch.load(files[0], map_location="cpu", weights_only=False)["optimizer_state_dict"]
    state = sd["base_optimizer_state"]["state"]
    return [state[i]["exp_avg"] for i in sorted(state)]


@pytest.mark.slow
@pytest.mark.timeout(420)  # about 3 min on 2 idle cores; room for a loaded CI box
def test_two_worker_resume_is_exact_per_rank(tmp_path, ray_cluster):
    """Case 16: 2 Ray Train workers (DeepSpeed ZeRO-2, gloo), checkpoint every 5 of 20 steps. The
    staged run stops after step 10 (its workers exit) and a second ``run_ray`` of the same run name
    starts new worker processes that restore it. Per rank, steps 11-20 equal the uninterrupted run:
    losses and sampled budgets (every rank's, gathered into rank 0's history), learning rates, each
    rank's own ZeRO-2 optimizer partition (exp_avg), and the final weights bit for bit."""
    from bd_ray.train.driver import run_ray

    write_tiny_world(tmp_path, P + T)
    # half a CPU per worker: the uninterrupted run and the staged one share the 4-CPU cluster (wall
    # time) and leave CPUs to Ray Data
    over = dict(data__source=str(tmp_path / "corpus.parquet"), run__num_workers=2, run__cpus_per_worker=0.5,
                run__checkpoint_every=5, run__keep_checkpoints=4, run__max_failures=0, run__log_every=10)
    box: dict = {}

    def uninterrupted():
        try:
            box["full"] = run_ray(_ray_cfg(tmp_path, "full", 20, **over), log=lambda m: None)
        except BaseException as exc:  # noqa: BLE001 -- reported by the main thread
            box["full"] = exc

    side = threading.Thread(target=uninterrupted, daemon=True)
    side.start()
    first = run_ray(_ray_cfg(tmp_path, "staged", 20, run__stop_after_steps=10, **over), log=lambda m: None)
    m1 = json.loads((Path(first["out_dir"]) / "metrics.json").read_text())
    assert m1["step"] == 10 and not m1["finished"] and m1["world_size"] == 2
    staged = run_ray(_ray_cfg(tmp_path, "staged", 20, **over), log=lambda m: None)  # new worker processes
    side.join(timeout=300)
    full = box.get("full")
    assert isinstance(full, dict), full
    a = json.loads((Path(full["out_dir"]) / "metrics.json").read_text())
    b = json.loads((Path(staged["out_dir"]) / "metrics.json").read_text())
    assert a["finished"] and b["finished"] and a["step"] == b["step"] == 20
    assert a["restores"] == [] and [r["step"] for r in b["restores"]] == [10]
    ha, hb = a["history"], b["history"]
    assert [h["step"] for h in ha] == [h["step"] for h in hb] == list(range(1, 21))
    for key in ("rank_losses", "rank_budgets", "lr", "loss", "budgets"):
        assert [h[key] for h in hb[10:]] == [h[key] for h in ha[10:]], key  # steps 11-20, exact (fp32)
        assert [h[key] for h in hb[:10]] == [h[key] for h in m1["history"]], key
    assert all(len(h["rank_losses"]) == len(h["rank_budgets"]) == 2 for h in ha)
    assert all(h["rank_losses"][0] == h["loss"] and h["rank_budgets"][0] == h["budgets"] for h in ha)
    # not vacuous: the ranks train on different windows and draw their own budgets; the schedule moves
    assert all(h["rank_losses"][0] != h["rank_losses"][1] for h in ha)
    assert any(h["rank_budgets"][0] != h["rank_budgets"][1] for h in ha[10:])
    assert len({h["lr"] for h in ha[10:]}) == 10
    # each rank's own ZeRO-2 optimizer partition, after the resume, equals the uninterrupted run's
    ck_a, ck_b = _checkpoints_by_step(full["out_dir"]), _checkpoints_by_step(staged["out_dir"])
    assert {15, 20} <= set(ck_a) & set(ck_b), (sorted(ck_a), sorted(ck_b))
    for step in (15, 20):
        parts = []
        for rank in (0, 1):
            ea, eb = _exp_avg_of_rank(ck_a[step], rank), _exp_avg_of_rank(ck_b[step], rank)
            assert len(ea) == len(eb) and all(torch.equal(x, y) for x, y in zip(ea, eb)), (step, rank)
            parts.append(ea)
        assert not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(*parts))  # two partitions
    wa, wb = _final_weights(full["out_dir"]), _final_weights(staged["out_dir"])
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
