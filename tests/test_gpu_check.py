"""benchmarks/gpu_check.py, the prepared device script, in its CPU smoke mode.

No GPU is needed: ``--cpu-smoke`` runs the step-cost, training and engine parts with tiny shapes on
the CPU and reports the two CUDA-only kernel parts as skipped. It runs as on the device image
(ray and deepspeed made unimportable), so the single-device code paths it imports stay free of
them, and the JSON it writes has every part's status and result.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Runs a script with ray and deepspeed absent, as on the device image (no import, no find_spec).
DEVICE_LIKE = """
import importlib.abc, importlib.util, runpy, sys
BLOCK = ("ray", "deepspeed")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCK:
            raise ModuleNotFoundError(f"No module named {name!r} (device image)", name=name)
sys.meta_path.insert(0, Block())
_find = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: None if name.split(".")[0] in BLOCK else _find(name, package)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.timeout(120)
def test_cpu_smoke_runs_every_part_without_ray(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "kernels"),
                                                        os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-c", DEVICE_LIKE, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu-smoke",
                        "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=110)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    rep = json.loads((tmp_path / "gpu_check.json").read_text())
    parts = rep["parts"]
    assert {n: r["index"] for n, r in parts.items()} == {"kernel_tests": 1, "kernel_bench": 2, "step_costs": 3,
                                                         "train": 4, "engine": 5}
    assert {n: r["status"] for n, r in parts.items()} == {"kernel_tests": "skipped", "kernel_bench": "skipped",
                                                          "step_costs": "ok", "train": "ok", "engine": "ok"}
    assert rep["ok"] and rep["versions"]["torch"] and rep["versions"]["imports"]["bd_ray.config"] == "ok"
    costs = parts["step_costs"]["result"]
    assert costs["shapes"] == {"verifier": "tiny-verifier", "drafter": "tiny-drafter"}
    assert [(c["context"], c["rows"]) for c in costs["configs"]] == [(64, 1), (64, 2), (128, 1), (128, 2)]
    for c in costs["configs"]:
        assert set(c["verify_ratio"]) == {"sdpa", "bd_ray_sparse"} and set(c["drafter_ratio"]) == {"B=16", "full"}
        assert all(v > 0 for v in c["ms"].values())
        assert set(c["predicted_speedup"]["sdpa"]["B=16"]) == {"0.108", "0.137", "0.6", "0.8"}
    train = parts["train"]["result"]
    assert train["steps"] == 4 and train["all_finite"] and train["max_weight_change"] > 0
    assert train["drafter_devices"] == ["cpu"] and train["teacher_devices"] == ["cpu"]
    assert train["collective"] == {"backend": "gloo", "all_reduce_ok": True}
    assert all(math.isfinite(x) for x in train["losses"])
    eng = parts["engine"]["result"]
    assert eng["batch1_equal"] and eng["batch8_equal"] == [True] * 8 and eng["dtype"] == "torch.float32"
    assert eng["cuda_synchronize_calls"] == 0
    assert max(eng["acceptance_rate"]) > 0               # some drafts accepted: partial rollbacks ran
    assert "[gpu_check] OK" in p.stdout


def test_predicted_speedup_formula():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from step_costs import predicted_speedup

    # α = 0: one token per cycle; the cycle costs γ drafter steps plus a (γ+1)-token verify
    assert predicted_speedup(0.0, 4, t_v1=10.0, t_vg=12.0, t_d=1.0) == pytest.approx(10.0 / 16.0)
    # α = 0.8, γ = 4: τ = (1 - 0.8^5) / 0.2 = 3.3616
    assert predicted_speedup(0.8, 4, t_v1=10.0, t_vg=12.0, t_d=1.0) == pytest.approx(3.3616 * 10.0 / 16.0)
