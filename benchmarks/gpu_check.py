"""The prepared device check: what bd-ray does on one GPU, as one call that writes JSON.

Run it through ``benchmarks/gpu_check.sh`` (it installs carried wheels first, results/gpu/README.md)
or directly: ``python benchmarks/gpu_check.py [--out DIR]``. Five parts, each recorded with its
status (``ok`` / ``failed`` / ``timeout`` / ``skipped``), seconds, result and the tail of its output;
a failing part never stops the others, and ``gpu_check.json`` is rewritten after every part:

1. ``kernel_tests``  -- tests/test_kernels.py with ``BD_RAY_KERNEL_TEST_DEVICES=cuda``: the Triton
   kernels compiled on the GPU against the torch reference;
2. ``kernel_bench``  -- benchmarks/kernels_gpu.py: Triton sparse decode vs torch gather + SDPA at
   B in {256, 1024, 2048}, batch 1 and 32;
3. ``step_costs``    -- benchmarks/step_costs.py ``random_pair_costs``: a Llama-2-7B-shaped verifier
   and a llama-68m-shaped drafter with random bf16 weights created on the device, at 4K/8K/16K and
   1/16 rows (fewer where memory is short, said in the record): T_v(γ+1)/T_v(1), the drafter step
   at B = 256 vs the full cache, and the speedup predicted for ``--alphas``;
4. ``train``         -- one all-reduce in a one-process group with the device's backend (NCCL on
   CUDA), then 20 BudgetDraft optimizer steps of tiny random models on the device in bf16 through
   the single-process driver (``bd_ray.train.driver.run_local``: the local engine, no Ray, no
   DeepSpeed): losses finite, drafter weights changed, every parameter on the device;
5. ``engine``        -- greedy speculative output equal to plain decoding (AR) in fp32 on the
   device with tiny models, batch 1 (``SpeculativeGenerator.generate``) and batch 8
   (``generate_many`` on the batched engine), with no ``torch.cuda.synchronize`` while decoding.

Parts run in the order 1, 5, 4, 2, 3 (correctness first, the long measurements last, each given
what is left of ``--deadline-s``); on CUDA each runs in its own process (a crashed CUDA context or
a hang costs only that part), with a timeout. ``--cpu-smoke`` runs parts 3-5 on the CPU with tiny
shapes in this process (parts 1-2 are reported as skipped: they need CUDA): that is how this
script is known to run without a GPU (tests/test_gpu_check.py).

Exit status: 0 when no part failed or timed out, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _p in (str(REPO), str(REPO / "kernels"), str(REPO / "benchmarks")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

#: (number, name, seconds it may take at most on the device) in run order.
PARTS = [(1, "kernel_tests", 150), (5, "engine", 90), (4, "train", 90), (2, "kernel_bench", 150),
         (3, "step_costs", 240)]
_MIN_PART_S = 40          # time kept back for each part still to run
#: distributions whose versions are recorded (the device image has torch, triton, transformers,
#: accelerate, pyarrow, pytest; pydantic & co. travel as wheels; ray and deepspeed are not needed)
PACKAGES = ["torch", "triton", "transformers", "accelerate", "pyarrow", "pytest", "numpy", "pydantic",
            "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions", "PyYAML",
            "safetensors", "tokenizers", "ray", "deepspeed"]


class Skip(Exception):
    """A part that cannot run here (the reason is recorded)."""


def versions() -> dict:
    """Python, the packages of :data:`PACKAGES` (None when absent), torch's CUDA and the GPUs."""
    out: dict = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    try:
        import torch

        # no CUDA context here (is_available / device_count do not create one): the parts get all memory
        out["torch_cuda"] = torch.version.cuda
        out["cuda_available"] = torch.cuda.is_available()
        out["cuda_devices"] = torch.cuda.device_count() if out["cuda_available"] else 0
    except Exception as exc:  # noqa: BLE001 - recorded: every part will say the same
        out["torch_error"] = repr(exc)
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        out["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
    out["imports"] = {}
    for mod in ("pydantic", "yaml", "transformers", "bd_ray.config"):
        try:
            __import__(mod)
            out["imports"][mod] = "ok"
        except Exception as exc:  # noqa: BLE001
            out["imports"][mod] = f"{type(exc).__name__}: {exc}"
    return out


def _tail(text: str, n: int = 3000) -> str:
    return text[-n:]


def _device(args):
    import torch

    return torch.device("cpu" if args.cpu_smoke else "cuda")


# ---- part 1: kernel tests on CUDA ----------------------------------------------------------------
def part_kernel_tests(args, save) -> dict:
    if args.cpu_smoke:
        raise Skip("needs CUDA (compiled Triton kernels)")
    env = {**os.environ, "BD_RAY_KERNEL_TEST_DEVICES": "cuda"}
    cmd = [sys.executable, "-m", "pytest", "tests/test_kernels.py", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
           "-o", "timeout=0", "-W", "ignore::pytest.PytestConfigWarning", "--durations=5",
           f"--junitxml={args.out / 'kernel_tests.xml'}"]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    (args.out / "kernel_tests.log").write_text(p.stdout + p.stderr)
    summary = next((ln for ln in reversed(p.stdout.splitlines()) if " passed" in ln or " failed" in ln
                    or " error" in ln or " skipped" in ln), "")
    res = {"returncode": p.returncode, "summary": summary.strip("= "), "command": " ".join(cmd[1:])}
    if p.returncode != 0 or "skipped" in summary and "passed" not in summary:
        raise RuntimeError(f"kernel tests: {summary or 'rc ' + str(p.returncode)}\n{_tail(p.stdout + p.stderr)}")
    return res


# ---- part 2: Triton sparse decode vs gather + SDPA -------------------------------------------------
def part_kernel_bench(args, save) -> dict:
    if args.cpu_smoke:
        raise Skip("needs CUDA (timings of compiled Triton kernels)")
    path = args.out / "kernels_gpu.json"
    cmd = [sys.executable, "benchmarks/kernels_gpu.py", "--json", str(path), "--budgets", "256", "1024", "2048",
           "--batches", "1", "32"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    (args.out / "kernels_gpu.txt").write_text(p.stdout + p.stderr)
    rows = json.loads(path.read_text()) if path.exists() else []
    attn = [r for r in rows if r.get("kind") != "chunk_scores"]
    res = {"returncode": p.returncode, "rows": len(rows), "json": path.name, "command": " ".join(cmd[1:]),
           "gather_over_triton": {f"{r['shape']} B={r['budget']} batch={r['batch']} n_new={r['n_new']}":
                                  round(r["gather_over_triton"], 3) for r in attn},
           "worst_err_ref": max((r["max_abs_err_ref"] for r in attn), default=None)}
    if p.returncode != 0:
        raise RuntimeError(f"kernels_gpu.py rc {p.returncode}\n{_tail(p.stdout + p.stderr)}")
    return res


# ---- part 3: step costs of the paper's pair --------------------------------------------------------
def part_step_costs(args, save) -> dict:
    from step_costs import random_pair_costs

    if args.cpu_smoke:
        contexts, batches, budget, repeats = [64, 128], [1, 2], 16, 2
    else:
        contexts, batches, budget, repeats = args.contexts, args.batches, args.budget, args.repeats
    return random_pair_costs(contexts, batches, gamma=args.gamma, budget=budget, alphas=args.alphas,
                             device=str(_device(args)), dtype="bfloat16", repeats=repeats, tiny=args.cpu_smoke,
                             log=lambda line: print(line, flush=True), on_config=lambda rep: save(dict(rep)))


# ---- part 4: BudgetDraft training steps ------------------------------------------------------------
def _one_process_all_reduce(dev) -> dict:
    """A one-process process group with the device's backend (NCCL on CUDA, gloo on CPU) and one
    all-reduce of a tensor on ``dev``: the collective a training worker uses, checked in isolation."""
    import socket as _socket

    import torch
    import torch.distributed as dist

    backend = "nccl" if dev.type == "cuda" else "gloo"
    with _socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        t = torch.ones(1, device=dev)
        dist.all_reduce(t)
        return {"backend": backend, "all_reduce_ok": bool(t.item() == 1.0)}
    except Exception as exc:  # noqa: BLE001 - recorded; the training steps below do not need it (one process)
        return {"backend": backend, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def part_train(args, save) -> dict:
    import torch

    from bd_ray.testing.tiny import tiny_train_cfg, tiny_train_models, tiny_train_rows
    from bd_ray.train.driver import run_local

    dev = _device(args)
    steps = 4 if args.cpu_smoke else args.train_steps
    collective = _one_process_all_reduce(dev)
    cfg = tiny_train_cfg(optim__precision="bf16", optim__max_steps=steps)
    teacher, drafter = tiny_train_models()
    teacher.to(dev)
    drafter.to(dev)
    before = {n: p.detach().float().clone() for n, p in drafter.named_parameters()}
    with tempfile.TemporaryDirectory(prefix="bd_ray_gpu_train_") as tmp:
        summary = run_local(cfg, tiny_train_rows(40), teacher, drafter, out_dir=tmp, resume=False,
                            log=lambda s: print(s, flush=True), device=dev)
    module = summary["engine"].module
    losses = [h["loss"] for h in summary["history"]]
    placement = sorted({str(p.device) for p in module.parameters()})
    changed = max((p.detach().float() - before[n]).abs().max().item() for n, p in module.named_parameters())
    opt = getattr(summary["engine"], "optimizer", None)
    state_dtypes = sorted({str(v.dtype) for st in (opt.state.values() if opt is not None else [])
                           for v in st.values() if torch.is_tensor(v) and v.dim() > 0})
    res = {"steps": len(losses), "losses": losses, "all_finite": all(math.isfinite(x) for x in losses),
           "skipped_windows": summary["skipped"], "max_weight_change": changed,
           "drafter_devices": placement, "teacher_devices": sorted({str(p.device) for p in teacher.parameters()}),
           "drafter_param_dtypes": sorted({str(p.dtype) for p in module.parameters()}),
           "optimizer_state_dtypes": state_dtypes, "precision": cfg.optim.precision,
           "fp32_optimizer_state": bool(state_dtypes) and state_dtypes == ["torch.float32"],
           "engine": type(summary["engine"]).__name__, "collective": collective}
    problems = []
    if len(losses) != steps:
        problems.append(f"{len(losses)} steps recorded, {steps} asked")
    if not res["all_finite"]:
        problems.append(f"non-finite losses {losses}")
    if not changed > 0:
        problems.append("drafter weights unchanged")
    if any(not d.startswith(dev.type) for d in placement + res["teacher_devices"]):
        problems.append(f"parameters off {dev.type}: drafter {placement}, teacher {res['teacher_devices']}")
    if problems:
        raise AssertionError("; ".join(problems) + f"\n{json.dumps(res)}")
    return res


# ---- part 5: greedy SD == AR on the device -----------------------------------------------------------
def part_engine(args, save) -> dict:
    import torch

    from bd_ray.config import SamplingConfig, SparsePolicyConfig, SpecConfig
    from bd_ray.evaluate.aggregate import greedy_agreement
    from bd_ray.models import init_drafter_from_verifier
    from bd_ray.speculative.batch import BatchOptions
    from bd_ray.speculative.engine import ARGenerator, RowRequest, SpeculativeGenerator
    from bd_ray.testing.tiny import tiny_llama, tiny_tokenizer
    from bd_ray_kernels import backend_name

    dev = _device(args)
    tok = tiny_tokenizer()
    verifier = tiny_llama(layers=2, seed=0).to(dev)
    drafter = init_drafter_from_verifier(verifier, 1).to(dev)   # the verifier's first layer: drafts get accepted
    g = torch.Generator().manual_seed(0)
    # random and repetitive prompts (a random verifier's first layer drafts: some drafts get accepted)
    rep = tok("1 2 3 " * 60)["input_ids"]
    prompts = ([torch.randint(1, len(tok), (n,), generator=g).tolist() for n in (150, 40, 90, 200)]
               + [rep[:n] for n in (60, 95, 130, 33)])
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=24, eos_token_ids=[])
    spec = SpecConfig(gamma=4, budget=48, policy=SparsePolicyConfig(name="chunk_topk", chunk_size=8, recent=8),
                      adaptive=False)  # a fixed γ: every row drafts, so partial rollbacks run
    ar = ARGenerator(verifier, tok)
    want = [ar.generate(p, sampling).token_ids for p in prompts]
    sd = SpeculativeGenerator(verifier, drafter, tok, spec, options=BatchOptions(max_num_seqs=8))
    syncs = [0]                 # device-wide synchronize calls while decoding (the engine times by events)
    real_sync = torch.cuda.synchronize

    def counting_sync(*a, **k):
        syncs[0] += 1
        return real_sync(*a, **k)

    torch.cuda.synchronize = counting_sync
    try:
        one = sd.generate(prompts[0], sampling)
        many = sd.generate_many([RowRequest(p, sampling) for p in prompts])
    finally:
        torch.cuda.synchronize = real_sync
    agree = [greedy_agreement(w, r.token_ids) for w, r in zip(want, many)]
    res = {"device": str(next(sd.verifier.parameters()).device), "dtype": str(next(verifier.parameters()).dtype),
           "attention_backend": backend_name(dev),
           "batch1_equal": one.token_ids == want[0], "batch1_agreement": greedy_agreement(want[0], one.token_ids),
           "batch8_equal": [a["first_divergence"] is None for a in agree],
           "batch8_first_divergence": [a["first_divergence"] for a in agree],
           "acceptance_rate": [r.metrics.acceptance_rate for r in many], "engine_stats": sd.engine.stats(),
           "cuda_synchronize_calls": syncs[0]}
    if not (res["batch1_equal"] and all(res["batch8_equal"])):
        raise AssertionError(f"greedy SD differs from AR in fp32 on {dev}\n{json.dumps(res, default=str)}")
    if res["device"].split(":")[0] != dev.type:
        raise AssertionError(f"verifier on {res['device']}, expected {dev.type}")
    if syncs[0]:
        raise AssertionError(f"{syncs[0]} torch.cuda.synchronize calls while decoding (expected none)")
    return res


PART_FUNCS = {"kernel_tests": part_kernel_tests, "kernel_bench": part_kernel_bench, "step_costs": part_step_costs,
              "train": part_train, "engine": part_engine}


# ---- driver -------------------------------------------------------------------------------------------
def _run_here(name: str, args, save) -> dict:
    """One part in this process: ``{"status", "result" | "error"/"reason"}``."""
    try:
        return {"status": "ok", "result": PART_FUNCS[name](args, save)}
    except Skip as exc:
        return {"status": "skipped", "reason": str(exc)}
    except Exception as exc:  # noqa: BLE001 - recorded, the next part runs
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                "traceback": _tail(traceback.format_exc(), 4000)}


def _child_argv(args, name: str, part_json: Path) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--run-part", name, "--part-json", str(part_json),
            "--out", str(args.out), "--gamma", str(args.gamma), "--budget", str(args.budget),
            "--repeats", str(args.repeats), "--train-steps", str(args.train_steps),
            "--contexts", *map(str, args.contexts), "--batches", *map(str, args.batches),
            "--alphas", *map(str, args.alphas)]
    return argv + (["--cpu-smoke"] if args.cpu_smoke else [])


def _run_child(name: str, args, timeout: float) -> dict:
    """One part in a child process with a timeout; whatever it saved survives a timeout or crash."""
    part_json = args.out / f"part_{name}.json"
    part_json.unlink(missing_ok=True)
    log_path = args.out / f"part_{name}.log"
    with open(log_path, "w") as logf:
        # its own process group: a timeout also ends what the part started (pytest, kernels_gpu.py)
        p = subprocess.Popen(_child_argv(args, name, part_json), cwd=REPO, stdout=logf, stderr=subprocess.STDOUT,
                             start_new_session=True)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    out = log_path.read_text(errors="replace")
    rec = json.loads(part_json.read_text()) if part_json.exists() else {}
    if rc is None:
        rec = {"status": "timeout", "error": f"no result within {timeout:.0f}s", "result": rec.get("result")}
    elif rec.get("status") in (None, "running"):
        rec = {"status": "failed", "error": f"process exited with {rc} before recording a result",
               "result": rec.get("result")}
    rec["output_tail"] = _tail(out)
    return rec


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_check_out"),
                   help="where gpu_check.json and the logs go (default $OUT)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU; CUDA-only parts skipped")
    p.add_argument("--parts", nargs="+", default=[n for _, n, _ in PARTS], choices=[n for _, n, _ in PARTS])
    p.add_argument("--deadline-s", type=float, default=450.0, help="all parts together")
    p.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                   help="each part in its own process (auto: yes on CUDA, no with --cpu-smoke)")
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--budget", type=int, default=256)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--alphas", type=float, nargs="+", default=[0.108, 0.137, 0.6, 0.8],
                   help="acceptance rates for the predicted speedup (default: CPU-measured 0.108 at B=256 and "
                        "0.137 at full cache, results/reference; then 0.6 and 0.8)")
    p.add_argument("--run-part", default=None, help=argparse.SUPPRESS)
    p.add_argument("--part-json", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.run_part:                      # child: one part, its record to --part-json
        def save(result: dict) -> None:
            args.part_json.write_text(json.dumps({"status": "running", "result": result}, default=str))
        rec = _run_here(args.run_part, args, save)
        args.part_json.write_text(json.dumps(rec, default=str))
        return 0

    t0 = time.perf_counter()
    report: dict = {"command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
                    "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "cpu_smoke": args.cpu_smoke, "versions": versions(), "parts": {}}
    print("[gpu_check] versions: " + json.dumps({k: v for k, v in report["versions"].items()}), flush=True)
    isolate = args.isolate == "yes" or (args.isolate == "auto" and not args.cpu_smoke)
    path = args.out / "gpu_check.json"

    def write() -> None:
        report["total_s"] = time.perf_counter() - t0
        path.write_text(json.dumps(report, indent=1, default=str))

    todo = [(i, n, s) for i, n, s in PARTS if n in args.parts]
    for k, (index, name, budget) in enumerate(todo):
        left = args.deadline_s - (time.perf_counter() - t0) - _MIN_PART_S * (len(todo) - k - 1)
        timeout = min(budget, left)
        t = time.perf_counter()
        print(f"[gpu_check] part {index} {name} (up to {timeout:.0f}s)", flush=True)
        if timeout < 20:
            rec = {"status": "skipped", "reason": f"only {left:.0f}s of --deadline-s left"}
        elif isolate:
            rec = _run_child(name, args, timeout)
        else:
            def save(result: dict, name=name) -> None:
                report["parts"][name] = {"index": index, "status": "running", "result": result}
                write()
            rec = _run_here(name, args, save)
        rec = {"index": index, **rec, "seconds": round(time.perf_counter() - t, 1)}
        report["parts"][name] = rec
        write()
        detail = rec.get("reason") or (rec.get("error") or "").splitlines()[0:1]
        print(f"[gpu_check] part {index} {name}: {rec['status']} in {rec['seconds']}s {detail or ''}", flush=True)
    report["ok"] = all(r["status"] in ("ok", "skipped") for r in report["parts"].values())
    write()
    print(f"[gpu_check] {'OK' if report['ok'] else 'NOT OK'}: " + ", ".join(
        f"{r['index']} {n} {r['status']}" for n, r in report["parts"].items()) + f"; {report['total_s']:.0f}s; {path}",
        flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
