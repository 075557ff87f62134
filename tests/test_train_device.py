"""Device-generic training on CPU (issue: GPU-ready training), on tiny random Llamas:

- the collective backend follows the device (NCCL on CUDA, gloo on CPU) in one function;
- precision resolution (``auto`` = bf16 only where bf16 is fast) and its config errors;
- the loop, the teacher, held-out agreement and the collectives honour an explicit ``device``:
  every tensor bd-ray's training code creates names its device (a spy on torch's factory calls),
  every model input and the all-reduced flag live on that device, models land there in the
  configured dtypes;
- mixed precision keeps fp32 master weights: a bf16 run at a small learning rate moves the weights
  like an fp32 run (AdamW on bf16 weights would lose those updates);
- batched teacher targets / held-out agreement equal one window at a time in fp32;
- ``models.freeze_embedding`` keeps the embedding out of the optimizer and notes it in the export.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

import bd_ray.device as device_mod
import bd_ray.train.loop as loop_mod
from bd_ray.config.train import ConfigError, load_train_config
from bd_ray.device import dist_backend, resolve_precision
from bd_ray.train.driver import run_local
from bd_ray.testing.tiny import TRAIN_P as P, TRAIN_T as T, TRAIN_V as V
from bd_ray.testing.tiny import tiny_llama, tiny_train_cfg, tiny_train_models, tiny_train_rows, write_tiny_world

torch.set_num_threads(1)

# bd-ray's training path: every tensor created here must name its device
_TRAIN_FILES = tuple(os.path.join("bd_ray", f) for f in
                     ("train" + os.sep, "teacher.py", "teacher_targets.py", "losses.py", "device.py"))
_FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.full, torch.arange, torch.empty,
              torch.randn, torch.rand, torch.randint, torch.linspace, torch.eye}


class DeviceSpy(TorchFunctionMode):
    """Records tensor factory calls made directly by bd-ray's training files without ``device=``
    (each would put a tensor on the default device, not on the worker's), and every explicit device."""

    def __init__(self):
        super().__init__()
        self.unplaced: list[str] = []
        self.devices: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FACTORIES:
            f = sys._getframe(1)
            while f is not None and os.sep + "torch" + os.sep in f.f_code.co_filename:
                f = f.f_back
            where = f.f_code.co_filename if f is not None else ""
            if any(p in where for p in _TRAIN_FILES):
                if kwargs.get("device") is None:
                    self.unplaced.append(f"{os.path.relpath(where)}:{f.f_lineno} {func.__name__}")
                else:
                    self.devices.add(str(torch.device(kwargs["device"])))
        return func(*args, **kwargs)


def _record_inputs(model: torch.nn.Module, seen: set) -> None:
    def hook(mod, args, kwargs):
        for x in list(args) + list(kwargs.values()):
            if torch.is_tensor(x):
                seen.add(str(x.device))
    model.model.register_forward_pre_hook(hook, with_kwargs=True)


def test_backend_follows_the_device():
    assert dist_backend("cuda") == "nccl" and dist_backend(torch.device("cuda", 1)) == "nccl"
    assert dist_backend("cpu") == dist_backend(None) == "gloo"
    # Ray Train's TorchConfig and deepspeed.init_distributed both take it from this one function
    import bd_ray.train.driver as driver
    import bd_ray.train.worker as worker

    for mod in (driver, worker):
        src = inspect.getsource(mod)
        assert '"gloo"' not in src and "dist_backend(" in src, mod.__name__


def test_precision_resolution_and_errors_name_the_field(monkeypatch):
    monkeypatch.setattr(device_mod, "_cpu_has_bf16_units", lambda: True)
    assert resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(device_mod, "_cpu_has_bf16_units", lambda: False)  # e.g. an AVX2-only EPYC
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16" and resolve_precision("fp32", "cuda") == "fp32"
    with pytest.raises(ValueError, match=r"optim\.precision: fp16 needs a CUDA device"):
        resolve_precision("fp16", "cpu", "optim.precision")
    with pytest.raises(ConfigError, match=r"optim\.precision: fp16 needs a CUDA device"):
        load_train_config(None, ["optim.precision=fp16"])
    with pytest.raises(ConfigError, match=r"teacher\.precision: fp16 needs a CUDA device"):
        load_train_config(None, ["teacher.precision=fp16"])
    with pytest.raises(ConfigError, match=r"optim\.precision: Input should be"):
        load_train_config(None, ["optim.precision=int8"])
    assert load_train_config(None, ["optim.precision=fp16", "run.use_gpu=true"]).optim.precision == "fp16"


@pytest.mark.timeout(180)
def test_loop_teacher_and_agreement_honour_the_device(tmp_path, monkeypatch):
    dev = torch.device("cpu")
    teacher, drafter = tiny_train_models()
    seen: set = set()
    _record_inputs(teacher, seen)
    _record_inputs(drafter, seen)
    reduced: list = []
    rows = tiny_train_rows(6)
    evals = [r["input_ids"] for r in tiny_train_rows(3, seed=5)]
    cfg = tiny_train_cfg(optim__max_steps=3, data__eval_windows=3, run__eval_every=3, run__eval_batch=2)
    spy = DeviceSpy()
    with spy:
        s = run_local(cfg, rows, teacher, drafter, eval_windows=evals, out_dir=str(tmp_path), resume=False,
                      log=lambda m: None, device=dev)
        with monkeypatch.context() as mp:  # the non-finite vote of a 2-worker run
            mp.setattr(torch.distributed, "is_initialized", lambda: True)
            mp.setattr(torch.distributed, "all_reduce", lambda t, op=None: reduced.append(t.device))
            assert loop_mod._all_true(True, world=2, device=dev)
        # offline rows and held-out targets take the same path
        from bd_ray.teacher_targets import materialize_rows

        mat = materialize_rows([{"input_ids": r["input_ids"], "argmax": np.zeros(T, np.int32)} for r in rows], dev)
    assert s["step"] == 3 and len(s["eval_history"]) == 2
    assert spy.unplaced == [], spy.unplaced       # every tensor bd-ray creates names its device
    assert spy.devices == {str(dev)}
    assert seen == {str(dev)}                     # every model input (ids, positions, caches)
    assert reduced == [dev]                       # the collective's tensor (NCCL needs it on the GPU)
    assert {p.device for p in s["engine"].module.parameters()} == {dev}
    assert {p.device for p in teacher.parameters()} == {dev}
    assert mat[0]["input_ids"].device == dev and mat[0]["targets"].argmax.device == dev


def test_load_models_places_and_types_them(tmp_path):
    from bd_ray.train.engines import load_models

    write_tiny_world(tmp_path, P + T)
    cfg = tiny_train_cfg(models__dtype="bfloat16")
    spy = DeviceSpy()
    with spy:
        teacher, drafter = load_models(cfg, str(tmp_path / "verifier"), device=torch.device("cpu"))
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}  # models.dtype: the frozen teacher
    assert {p.dtype for p in drafter.parameters()} == {torch.float32}   # fp32 master weights
    assert {p.device.type for p in list(teacher.parameters()) + list(drafter.parameters())} == {"cpu"}
    assert spy.unplaced == []


def _run(precision: str, lr: float, steps: int, tmp_path, **over):
    teacher, drafter = tiny_train_models()
    w0 = {k: v.detach().clone() for k, v in drafter.state_dict().items()}
    cfg = tiny_train_cfg(optim__max_steps=steps, optim__lr=lr, optim__warmup_steps=0, optim__precision=precision,
                         **over)
    s = run_local(cfg, tiny_train_rows(), teacher, drafter, out_dir=str(tmp_path / precision), resume=False,
                  log=lambda m: None, device="cpu")
    return s, w0


@pytest.mark.timeout(180)
def test_bf16_keeps_fp32_master_weights_and_small_updates(tmp_path):
    lr = 1e-5  # the recipe's lr: far below bf16's resolution near the weights' magnitude (~1e-3)
    s32, w0 = _run("fp32", lr, 4, tmp_path)
    s16, _ = _run("bf16", lr, 4, tmp_path)
    assert s16["engine"].precision == "bf16"
    m32, m16 = s32["engine"].module, s16["engine"].module
    assert {p.dtype for p in m16.parameters()} == {torch.float32}
    assert all(v.dtype == torch.float32 for st in s16["engine"].optimizer.state.values()
               for v in st.values() if torch.is_tensor(v) and v.dim())
    for (name, a), b in zip(m32.named_parameters(), m16.parameters()):
        d32, d16 = (a.detach() - w0[name]).flatten(), (b.detach() - w0[name]).flatten()
        # the small updates landed (AdamW on bf16 weights rounds ~all of them away)
        assert (d16 != 0).float().mean() > 0.9, name
        assert d16.abs().max() < 10 * lr * 4, name
        # and they go where the fp32 run's go
        assert torch.nn.functional.cosine_similarity(d32, d16, dim=0) > 0.9, name
    for a, b in zip(s32["history"], s16["history"]):
        assert math.isclose(a["loss"], b["loss"], rel_tol=0.05), (a["loss"], b["loss"])
    # what the old bf16 local engine did: AdamW directly on bf16 weights loses these updates
    p = torch.nn.Parameter(w0["model.layers.0.mlp.up_proj.weight"].to(torch.bfloat16))
    before = p.detach().clone()
    opt = torch.optim.AdamW([p], lr=lr)
    p.grad = torch.randn_like(p)
    opt.step()
    assert (p.detach() != before).float().mean() < 0.1


def test_batched_teacher_targets_equal_one_at_a_time():
    from bd_ray.teacher import compute_teacher_targets, compute_teacher_targets_batch

    teacher = tiny_llama(vocab_size=V, layers=2, seed=1)
    wins = torch.as_tensor(np.stack([r["input_ids"] for r in tiny_train_rows(5, seed=3)]))
    batched = compute_teacher_targets_batch(teacher, wins, P, top_k=4, prefill_chunk=32, cont_chunk=8)
    for w, b in zip(wins, batched):
        one = compute_teacher_targets(teacher, w, P, top_k=4, prefill_chunk=32, cont_chunk=8)
        assert torch.equal(one.argmax, b.argmax)
        assert torch.equal(one.topk_ids, b.topk_ids)
        assert torch.allclose(one.topk_logprobs, b.topk_logprobs, atol=1e-5)


def test_batched_agreement_equals_one_window_at_a_time():
    from bd_ray.config import SparsePolicyConfig
    from bd_ray.teacher import compute_teacher_targets
    from bd_ray.train.agreement import evaluate_agreement

    teacher, drafter = tiny_train_models()
    wins = [r["input_ids"] for r in tiny_train_rows(5, seed=4)]
    tg = [compute_teacher_targets(teacher, torch.as_tensor(w), P) for w in wins]
    pol = SparsePolicyConfig(chunk_size=8, recent=8)
    one = evaluate_agreement(drafter, wins, tg, P, [32, 48], pol, 32, 8, batch=1)
    many = evaluate_agreement(drafter, wins, tg, P, [32, 48], pol, 32, 8, batch=3)
    assert one == many and set(one) == {"full", "32", "48"}


@pytest.mark.timeout(120)
def test_frozen_embedding_is_kept_and_noted(tmp_path):
    from bd_ray.models import init_drafter_from_verifier
    from bd_ray.train.export import TRAINING_NOTES

    teacher = tiny_llama(vocab_size=V, layers=2, seed=1)
    teacher.config.tie_word_embeddings = True
    teacher.tie_weights()
    drafter = init_drafter_from_verifier(teacher, 1)
    emb0 = drafter.get_input_embeddings().weight.detach().clone()
    layer0 = drafter.model.layers[0].mlp.up_proj.weight.detach().clone()
    cfg = tiny_train_cfg(optim__max_steps=3, models__freeze_embedding=True, run__export=True)
    s = run_local(cfg, tiny_train_rows(), teacher, drafter, out_dir=str(tmp_path), resume=False,
                  log=lambda m: None, device="cpu")
    m = s["engine"].module
    assert m.get_output_embeddings().weight is m.get_input_embeddings().weight  # tied head frozen with it
    assert torch.equal(m.get_input_embeddings().weight, emb0)
    assert not torch.equal(m.model.layers[0].mlp.up_proj.weight, layer0)
    in_opt = {id(p) for g in s["engine"].optimizer.param_groups for p in g["params"]}
    assert id(m.get_input_embeddings().weight) not in in_opt
    notes = json.loads((tmp_path / "final" / TRAINING_NOTES).read_text())
    assert notes["freeze_embedding"] is True


def test_reference_configs_use_the_draft_vocabulary_and_the_fast_config_loads():
    from pathlib import Path

    from bd_ray.config.train import TeacherTargetsJobConfig

    root = Path(__file__).resolve().parents[1] / "jobs" / "configs"
    for name in ("pg_mini_2k.yaml", "pg_mini_2k_naive.yaml", "pg_mini_2k_fixed.yaml", "pg_mini_distill_512.yaml",
                 "pg_mini_distill_fast.yaml"):
        assert load_train_config(root / name).models.draft_vocab == "runs/draft_vocab/pg_mini_8192/draft_vocab.json"
    fast = load_train_config(root / "pg_mini_distill_fast.yaml")
    assert (fast.run.executor, fast.teacher.mode, fast.optim.precision, fast.models.freeze_embedding) == \
        ("local", "offline", "auto", True)
    targets = load_train_config(root / "pg_mini_distill_targets.yaml", model=TeacherTargetsJobConfig)
    assert targets.teacher.targets_path == fast.teacher.targets_path and targets.batch_size > 1
    assert (targets.data.prefix_len, targets.data.continuation_len) == (fast.data.prefix_len, fast.data.continuation_len)
