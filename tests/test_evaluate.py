"""The evaluation matrix job (bd_ray.evaluate, jobs/evaluate.py) on tiny random models.

* the job on a tiny verifier/drafter pair (Ray, one worker) completes and writes results.json,
  results.md and the PNG plots; results.json is checked key by key and type by type;
* a fixture that corrupts the verifier's greedy verification in the SD path of one cell makes the
  job fail loudly (exit 3, the cell and prompts named), while the other cells stay lossless;
* prompts come only from the held-out split (tiny parquet corpus with train and test works), and a
  work present in both splits is refused;
* config errors name the field;
* ``jobs/evaluate.py journal drop`` drops by prompt (and filter), keeps torn lines, rewrites atomically;
* ``jobs/evaluate.py report table|summary`` print the README figures from a results.json;
* bootstrap intervals over prompts, the paired per-prompt comparison and the per-prompt α table
  with its outlier flags, on synthetic runs with known answers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bd_ray.testing.tiny import TINY_TEXT, tiny_llama, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]


def _job():
    """jobs/evaluate.py as a module (loaded by path: the name ``evaluate`` is taken on PyPI)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bd_ray_jobs_evaluate", REPO / "jobs" / "evaluate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

CONTEXT = 192
TRAIN_MARK = "Zebra quokka xylophone. "  # only in training works


def _corpus_rows() -> list[dict]:
    rows = []
    for i in range(3):  # test works, several documents each
        for e in range(2):
            start = (i * 300 + e * 97) % 900
            rows.append({"doc_id": f"test-{i}-{e}", "work_id": f"test/work{i}", "split": "test",
                         "text": TINY_TEXT[start:start + 1200]})
    for i in range(2):  # training works, recognisable text
        rows.append({"doc_id": f"train-{i}", "work_id": f"train/work{i}", "split": "train",
                     "text": TRAIN_MARK * 200})
    rows.append({"doc_id": "test-short", "work_id": "test/short", "split": "test", "text": "Too short."})
    for r in rows:
        r.update({"title": r["doc_id"], "author": "x", "source": "test", "license": "public-domain"})
    return rows


def _write_parquet(rows: list[dict], path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory) -> dict:
    """A saved tiny verifier (2 layers) and drafter (1 layer) with the tiny tokenizer, and a corpus."""
    root = tmp_path_factory.mktemp("eval_assets")
    tok = tiny_tokenizer()
    paths = {}
    for name, model in (("verifier", tiny_llama(layers=2, seed=0)), ("drafter", tiny_llama(layers=1, seed=1))):
        d = root / name
        model.save_pretrained(d)
        tok.save_pretrained(d)
        paths[name] = str(d)
    paths["corpus"] = str(_write_parquet(_corpus_rows(), root / "corpus.parquet"))
    return paths


def _config(assets: dict, out: Path, **run) -> dict:
    return {
        "models": {"verifier": assets["verifier"],
                   "drafters": {"tiny": assets["drafter"], "init1": "from-verifier:1"}},
        "data": {"corpus": assets["corpus"], "prompts_per_context": 2, "seed": 3},
        "matrix": {"contexts": [CONTEXT],
                   "policies": {"chunk": {"name": "chunk_topk", "chunk_size": 4, "recent": 4},
                                "stream": {"name": "streaming", "sink": 4}},
                   "budgets": [16, "full"], "gammas": [2, 3],
                   "modes": [{"name": "greedy"},
                             {"name": "t08", "temperature": 0.8, "top_p": 0.9, "seed": 1, "gammas": [3]}],
                   "max_new_tokens": 8, "prefill_chunk": 64},
        "needle": {"enabled": True, "depth": 0.3, "max_new_tokens": 6},
        "run": {"output_dir": str(out), "torch_threads": 1, **run},
    }


def _write_config(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


# ---- results.json schema -----------------------------------------------------------------------

NUM = (int, float)
OPT_NUM = (int, float, type(None))
SCHEMA = {
    "top": {"schema_version": int, "created": str, "command": str, "config": dict, "machine": dict,
            "isolation": str, "prompts": list, "cells": list, "best_gamma": list, "needle": (list, type(None)),
            "lossless": dict, "errors": list, "runs": list, "wall_s": NUM, "plots": list, "missing": int,
            "paired": list, "per_prompt": dict},
    "cell": {"cell_id": str, "context": int, "policy": str, "budget": str, "gamma": int, "drafter": str,
             "mode": str, "greedy": bool, "n_prompts": int, "prompt_ids": list, "alpha": NUM, "tau": NUM,
             "per_position_acceptance": list, "cycles": int, "drafted": int, "accepted": int,
             "sd_tokens_per_s": NUM, "ar_tokens_per_s": NUM, "speedup": NUM, "speedup_mean": NUM,
             "draft_step_s": NUM, "verify_step_s": NUM, "ar_step_s": NUM, "drafter_cache": int,
             "fallbacks": int, "lossless": str, "prompt_alpha": list, "alpha_ci": (list, type(None)),
             "tau_ci": (list, type(None)), "speedup_ci": (list, type(None))},
    "best": {"context": int, "policy": str, "budget": str, "drafter": str, "mode": str, "gamma": int,
             "sd_tokens_per_s": NUM, "ar_tokens_per_s": NUM, "speedup": NUM, "alpha": NUM, "tau": NUM,
             "cell_id": str, "gammas_tried": list},
    "run_ar": {"kind": str, "prompt_id": str, "context": int, "mode": str, "greedy": bool,
               "verifier_prefill_s": NUM, "token_ids": list, "text": str, "n_tokens": int, "tokens_per_s": NUM,
               "decode_s": NUM, "verify_s": NUM, "verify_step_s": NUM, "finish_reason": str, "host": str,
               "started_at": NUM, "load_1m": NUM},
    "run_sd": {"cell_id": str, "drafter": str, "policy": str, "budget": str, "gamma": int, "cycles": int,
               "drafted": int, "accepted": int, "acceptance_rate": NUM, "mean_accepted_length": NUM,
               "per_position_acceptance": list, "draft_step_s": OPT_NUM, "verify_step_s": OPT_NUM,
               "peak_drafter_cache": int, "tokens_per_s": NUM, "decode_s": NUM, "drafter_prefill_s": NUM,
               "compact_s": NUM, "fallback_reason": (str, type(None)), "token_ids": list},
    "prompt": {"prompt_id": str, "context": int, "doc_id": str, "work_id": str, "split": str,
               "start_token": int, "n_tokens": int},
    "needle": {"context": int, "drafter": str, "policy": str, "budget": str, "gamma": int, "passkey": str,
               "ar_retrieved": bool, "sd_retrieved": bool, "alpha_needle": NUM, "alpha_ordinary": OPT_NUM,
               "needle_kept_fraction": NUM},
    "worker": {"host": str, "cpu_count": int, "torch_threads": int, "torch": str, "device": str,
               "model_load_s": NUM},
    "driver": {"host": str, "cpu_count": int, "torch": str, "python": str, "platform": str},
}


def _check(obj: dict, kind: str, where: str) -> None:
    for key, typ in SCHEMA[kind].items():
        assert key in obj, f"{where}: missing key {key!r}"
        assert isinstance(obj[key], typ) and not (typ is int and isinstance(obj[key], bool)), \
            f"{where}.{key}: {type(obj[key]).__name__} is not {typ}"


def check_results_schema(res: dict) -> None:
    _check(res, "top", "results")
    _check(res["machine"]["driver"], "driver", "machine.driver")
    assert res["machine"]["workers"], "no worker info"
    for i, w in enumerate(res["machine"]["workers"]):
        _check(w, "worker", f"machine.workers[{i}]")
    for i, c in enumerate(res["cells"]):
        _check(c, "cell", f"cells[{i}]")
        assert len(c["per_position_acceptance"]) == c["gamma"]
        assert 0.0 <= c["alpha"] <= 1.0 and 1.0 <= c["tau"] <= c["gamma"] + 1
    for i, b in enumerate(res["best_gamma"]):
        _check(b, "best", f"best_gamma[{i}]")
    for i, p in enumerate(res["prompts"]):
        _check(p, "prompt", f"prompts[{i}]")
    for i, r in enumerate(res["runs"]):
        _check(r, "run_ar" if r["kind"] in ("ar", "needle_ar") else "run_sd", f"runs[{i}]")
    for i, n in enumerate(res["needle"] or []):
        _check(n, "needle", f"needle[{i}]")
    assert isinstance(res["lossless"]["checked"], int) and isinstance(res["lossless"]["failures"], list)


# ---- tests -------------------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_eval_job_tiny_ray_writes_all_outputs(tiny_assets, tmp_path, ray_cluster, capsys):
    job = _job()

    out = tmp_path / "out"
    cfg = {**_config(tiny_assets, out), "report": {"paired": [["tiny", "init1"]], "bootstrap_resamples": 200}}
    cfg_path = _write_config(cfg, tmp_path / "eval.yaml")
    rc = job.main(["--config", str(cfg_path), "--output", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    for name in ("results.json", "results.md", "acceptance_vs_budget_greedy.png", "speedup_vs_gamma_greedy.png",
                 "acceptance_vs_budget_t08.png", "speedup_vs_gamma_t08.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    res = json.loads((out / "results.json").read_text())
    check_results_schema(res)

    # 2 drafters x (2 policies x budget 16 + full once) x (greedy: 2 gammas + t08: its own 1 gamma)
    assert len(res["cells"]) == 2 * 3 * (2 + 1)
    assert {c["gamma"] for c in res["cells"] if c["mode"] == "t08"} == {3}
    assert all(c["n_prompts"] == 2 for c in res["cells"])
    assert {c["budget"] for c in res["cells"]} == {"16", "full"}
    assert {c["policy"] for c in res["cells"] if c["budget"] == "full"} == {"none"}
    # greedy cells checked token for token against AR; sampled ones are not comparable
    assert {c["lossless"] for c in res["cells"] if c["greedy"]} == {"ok"}
    assert {c["lossless"] for c in res["cells"] if not c["greedy"]} == {"n/a"}
    assert res["lossless"]["failures"] == [] and res["lossless"]["checked"] > 0
    # AR ran once per prompt, mode and drafter group (its prefill shared by the SD cells of the
    # prompt), and each cell's speedup is against the AR runs of its own drafter group
    ar = [r for r in res["runs"] if r["kind"] == "ar"]
    assert len(ar) == 2 * 2 * 2
    for c in res["cells"]:
        own = [r for r in ar if (r["drafter"], r["mode"]) == (c["drafter"], c["mode"])
               and r["prompt_id"] in c["prompt_ids"]]
        assert len(own) == 2
        assert c["ar_tokens_per_s"] == pytest.approx(sum(r["n_tokens"] for r in own) / sum(r["decode_s"] for r in own))
    # every request decoded exactly max_new_tokens (EOS ignored: equal work per cell)
    assert {r["n_tokens"] for r in res["runs"] if r["kind"] in ("ar", "sd")} == {8}
    # the drafter cache respects the budget: compact prefix (16) + at most max_new_tokens + gamma
    for c in res["cells"]:
        if c["budget"] == "16":
            assert c["drafter_cache"] <= 16 + 8 + c["gamma"]
        else:
            assert c["drafter_cache"] >= CONTEXT
    # best gamma = highest measured SD tokens/s among the gammas of the group
    for b in res["best_gamma"]:
        group = [c for c in res["cells"] if (c["context"], c["policy"], c["budget"], c["drafter"], c["mode"])
                 == (b["context"], b["policy"], b["budget"], b["drafter"], b["mode"])]
        assert b["sd_tokens_per_s"] == max(c["sd_tokens_per_s"] for c in group)
    # prompts: exactly CONTEXT tokens, held-out works only
    assert {p["n_tokens"] for p in res["prompts"]} == {CONTEXT}
    assert all(p["split"] == "test" and p["work_id"].startswith("test/") for p in res["prompts"])
    # needle: one per (drafter, policy/budget); the planted span is inside the prompt
    assert len(res["needle"]) == 2 * 3
    needle_prompt = [p for p in res["prompts"] if p["needle"]][0]
    assert 0 < needle_prompt["needle"]["start"] < needle_prompt["needle"]["end"] < CONTEXT
    assert all(n["needle_kept_fraction"] == 1.0 for n in res["needle"] if n["budget"] == "full")
    # progress and the final table were printed
    assert "ETA" in printed and f"cell {CONTEXT}|chunk|16|g2|tiny|greedy done" in printed
    assert "## Best gamma" in printed and "results.json" in printed
    md = (out / "results.md").read_text()
    assert "| context | mode | drafter |" in md and "Lossless check" in md
    # intervals per cell, the paired comparison tiny - init1 in every cell both ran, per-prompt α
    for c in res["cells"]:
        for k in ("alpha", "tau", "speedup"):
            if c[f"{k}_ci"] is not None:
                assert c[f"{k}_ci"][0] - 1e-9 <= c[k] <= c[f"{k}_ci"][1] + 1e-9, (c["cell_id"], k)
    assert len(res["paired"]) == 3 * (2 + 1) and {p["drafter_a"] for p in res["paired"]} == {"tiny"}
    assert {c["gamma"] for c in res["per_prompt"]["columns"]} == {2}
    assert "## Paired comparison" in md and "## Per-prompt α" in md and "α CI" in md


@pytest.fixture
def corrupt_one_cell(monkeypatch):
    """Test-only corruption of the SD verifier path for ONE cell (gamma 3, budget 16, drafter 'tiny'):
    greedy verification accepts every draft, so SD emits the drafter's tokens instead of the
    verifier's. AR and all other cells are untouched."""
    from bd_ray.speculative import batch, engine

    state = {"on": False}
    real_verify, real_generate = batch.verify_greedy_batch, engine.SpeculativeGenerator.generate

    def verify(drafts, logits):
        verdicts = real_verify(drafts, logits)
        if state["on"]:
            return [type(v)(len(d), int(lg[len(d)].argmax())) for v, d, lg in zip(verdicts, drafts, logits)]
        return verdicts

    def generate(self, prompt_ids, sampling, gamma=None, budget="default", **kw):
        state["on"] = gamma == 3 and budget == 16
        try:
            return real_generate(self, prompt_ids, sampling, gamma=gamma, budget=budget, **kw)
        finally:
            state["on"] = False

    monkeypatch.setattr(batch, "verify_greedy_batch", verify)
    monkeypatch.setattr(engine.SpeculativeGenerator, "generate", generate)
    return state


@pytest.mark.timeout(120)
def test_lossless_check_fails_the_job_loudly(tiny_assets, tmp_path, corrupt_one_cell, capsys):
    job = _job()

    out = tmp_path / "out"
    cfg = _config(tiny_assets, out, executor="local")
    cfg["models"]["drafters"] = {"tiny": tiny_assets["drafter"]}
    cfg["matrix"]["policies"] = {"chunk": cfg["matrix"]["policies"]["chunk"]}
    cfg["matrix"]["modes"] = [{"name": "greedy"}]
    cfg["needle"]["enabled"] = False
    rc = job.main(["--config", str(_write_config(cfg, tmp_path / "eval.yaml"))])
    cap = capsys.readouterr()
    assert rc == 3, cap.out + cap.err
    bad = f"{CONTEXT}|chunk|16|g3|tiny|greedy"
    assert "LOSSLESS CHECK FAILED" in cap.err and f"cell {bad} prompt c{CONTEXT}-p0" in cap.err \
        and f"cell {bad} prompt c{CONTEXT}-p1" in cap.err
    assert "!!! LOSSLESS FAILURE" in cap.out
    res = json.loads((out / "results.json").read_text())  # outputs are still written
    assert {f["cell_id"] for f in res["lossless"]["failures"]} == {bad}
    assert {c["cell_id"]: c["lossless"] for c in res["cells"]}[bad] == "FAIL"
    assert {c["lossless"] for c in res["cells"] if c["cell_id"] != bad} == {"ok"}


def test_greedy_agreement_and_the_lossless_mode_by_dtype():
    from bd_ray.evaluate.aggregate import greedy_agreement, lossless_report

    assert greedy_agreement([1, 2, 3], [1, 2, 3]) == {"equal": 3, "compared": 3, "agreement": 1.0,
                                                      "first_divergence": None}
    assert greedy_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == {"equal": 3, "compared": 4, "agreement": 0.75,
                                                            "first_divergence": 2}
    assert greedy_agreement([1, 2], [1, 2, 3])["first_divergence"] == 2          # a prefix diverges at its end
    assert greedy_agreement([], [])["agreement"] == 1.0

    def run(kind, prompt, ids, cell=None):
        return {"kind": kind, "prompt_id": prompt, "mode": "greedy", "greedy": True, "drafter": "d",
                "cell_id": cell, "token_ids": ids}

    runs = [run("ar", "p0", [5, 6, 7, 8]), run("sd", "p0", [5, 6, 1, 2], "c1"),
            run("ar", "p1", [1, 1]), run("sd", "p1", [1, 1], "c1"),
            {**run("sd", "p1", [0], "c2"), "error": "boom"}]                      # failed runs are skipped
    exact = lossless_report(runs, "float32")
    assert exact["mode"] == "exact" and exact["checked"] == 2 and exact["agreement"] == 4 / 6
    assert exact["failures"] == exact["differ"] == [
        {"cell_id": "c1", "prompt_id": "p0", "first_difference": 2, "agreement": 0.5, "ar_tokens": [7, 8],
         "sd_tokens": [1, 2]}]
    for dtype in ("bfloat16", "float16"):     # reported as agreement, never a failure
        low = lossless_report(runs, dtype)
        assert low["mode"] == "agreement" and low["failures"] == [] and low["differ"] == exact["differ"]


@pytest.mark.timeout(180)
def test_bf16_evaluation_reports_agreement_not_a_false_failure(tiny_assets, tmp_path, corrupt_one_cell, capsys):
    """bf16 models on CPU: the greedy comparison is agreement (fraction equal, first divergence); even
    a cell whose SD tokens really differ (the corrupted one) fails nothing, and the report says why."""
    job = _job()

    out = tmp_path / "out"
    cfg = _config(tiny_assets, out, executor="local")
    cfg["models"].update({"drafters": {"tiny": tiny_assets["drafter"]}, "dtype": "bfloat16"})
    cfg["matrix"]["policies"] = {"chunk": cfg["matrix"]["policies"]["chunk"]}
    cfg["matrix"]["modes"] = [{"name": "greedy"}]
    cfg["needle"]["enabled"] = False
    rc = job.main(["--config", str(_write_config(cfg, tmp_path / "eval.yaml"))])
    cap = capsys.readouterr()
    assert rc == 0, cap.out + cap.err
    assert "LOSSLESS" not in cap.out + cap.err
    res = json.loads((out / "results.json").read_text())
    check_results_schema(res)
    ll = res["lossless"]
    bad = f"{CONTEXT}|chunk|16|g3|tiny|greedy"
    assert ll["mode"] == "agreement" and ll["dtype"] == "bfloat16" and ll["failures"] == []
    assert ll["checked"] == 4 * 2 and 0.0 <= ll["agreement"] < 1.0     # (budgets 16, full) x γ (2, 3) x 2 prompts
    assert bad in {d["cell_id"] for d in ll["differ"]}
    assert all(0 <= d["first_difference"] < 8 and 0.0 <= d["agreement"] < 1.0 for d in ll["differ"])
    labels = {c["cell_id"]: c["lossless"] for c in res["cells"]}
    assert all(v.startswith("agree ") and 0.0 <= float(v.split()[1]) <= 1.0 for v in labels.values())
    assert float(labels[bad].split()[1]) < 1.0
    assert f"cell {bad} prompt c{CONTEXT}-p0: greedy SD diverges from AR at token" in cap.out
    md = (out / "results.md").read_text()
    assert "compared with AR as agreement (bfloat16: exact equality is not expected below fp32)" in md
    assert "lossless check: 8 greedy runs compared with AR as agreement" in cap.out


def test_prompts_come_only_from_held_out_split(tmp_path):
    import pyarrow as pa

    from bd_ray.evaluate.prompts import HeldOutError, select_prompts

    tok = tiny_tokenizer()
    rows = _corpus_rows()
    table = pa.Table.from_pylist(rows)
    got = select_prompts(table, tok, [64, CONTEXT], n=5, seed=11)
    test_docs = {r["doc_id"]: r for r in rows if r["split"] == "test"}
    mark = tok(TRAIN_MARK, add_special_tokens=False)["input_ids"]
    for ctx, prompts in got.items():
        assert len(prompts) == 5
        assert len({p.work_id for p in prompts}) == 3          # spread over the eligible test works
        for p in prompts:
            assert p.split == "test" and p.doc_id in test_docs and p.work_id.startswith("test/")
            assert len(p.token_ids) == ctx
            full = tok(test_docs[p.doc_id]["text"], add_special_tokens=False)["input_ids"]
            assert full[p.start_token:p.start_token + ctx] == p.token_ids
            assert "Zebra" not in tok.decode(p.token_ids) and p.token_ids[:len(mark)] != mark
    # deterministic for a seed, different for another
    again = select_prompts(table, tok, [64], n=5, seed=11)[64]
    assert [(p.doc_id, p.start_token) for p in again] == [(p.doc_id, p.start_token) for p in got[64]]
    other = select_prompts(table, tok, [64], n=5, seed=12)[64]
    assert [(p.doc_id, p.start_token) for p in other] != [(p.doc_id, p.start_token) for p in got[64]]
    # a work present in both splits would leak a training book: refused
    leak = rows + [{**rows[0], "doc_id": "leak", "split": "train"}]
    with pytest.raises(HeldOutError, match="both the train and the test split"):
        select_prompts(pa.Table.from_pylist(leak), tok, [64], n=1, seed=0)
    # no test split at all
    with pytest.raises(HeldOutError, match="split == 'test'"):
        select_prompts(pa.Table.from_pylist([r for r in rows if r["split"] == "train"]), tok, [64], n=1, seed=0)
    # a context longer than every held-out book: a clear error naming it
    with pytest.raises(ValueError, match="no held-out document has 100000 tokens"):
        select_prompts(table, tok, [100000], n=1, seed=0)


def test_config_errors_name_the_field(tmp_path):
    from bd_ray.config.evaluate import ConfigError, load_eval_config

    with pytest.raises(ConfigError, match=r"matrix.budgets: budget 16 is below the minimum 72"):
        load_eval_config(REPO / "jobs/configs/eval_smoke.yaml", ["matrix.budgets=[16,full]"])
    with pytest.raises(ConfigError, match=r"matrix.gamas: unknown key"):
        load_eval_config(None, ["matrix.gamas=[2]"])
    with pytest.raises(ConfigError, match=r"report.alpha_gamma: 3 is not one of matrix.gammas"):
        load_eval_config(None, ["report.alpha_gamma=3"])
    with pytest.raises(ConfigError, match=r"matrix.budgets"):
        load_eval_config(None, ["matrix.budgets=[0]"])
    with pytest.raises(ConfigError, match=r"report.paired.0: 'naive' is not a drafter"):
        load_eval_config(None, ["report.paired=[[init4,naive]]"])
    with pytest.raises(ConfigError, match=r"report.per_prompt_budgets.0: 64 is not one of matrix.budgets"):
        load_eval_config(None, ["report.per_prompt_budgets=[64]"])
    for name in ("eval_smoke.yaml", "eval_reference.yaml"):
        cfg = load_eval_config(REPO / "jobs/configs" / name)
        assert cfg.matrix.contexts and cfg.matrix.budgets[-1] == "full"
    ref = load_eval_config(REPO / "jobs/configs/eval_reference.yaml")
    assert ref.matrix.contexts == [2048, 4096] and ref.matrix.budgets == [128, 256, 512, "full"]
    assert ref.matrix.gammas == [2, 4, 6, 8] and ref.data.prompts_per_context >= 5 and ref.matrix.max_new_tokens == 128
    # the issue's matrix: >= 12 prompts per context, 4K and 8K within SmolLM2's 8192 positions,
    # budgets {128..1024, full}, γ 4 plus an adaptive mode; budgetdraft - naive compared
    v2 = load_eval_config(REPO / "jobs/configs/eval_reference_v2.yaml")
    assert v2.data.prompts_per_context >= 12 and v2.matrix.budgets == [128, 256, 512, 1024, "full"]
    assert v2.matrix.contexts[0] == 4096 and max(v2.matrix.contexts) + v2.matrix.max_new_tokens <= 8192
    assert v2.matrix.gammas == [4] and [m.adaptive for m in v2.matrix.modes] == [False, True]
    assert v2.report.paired == [("budgetdraft", "naive")] and v2.alpha_gamma == 4
    assert set(v2.models.drafters) == {"budgetdraft", "naive", "init4"}


@pytest.mark.timeout(180)
def test_interrupted_matrix_resumes_from_its_journal(tiny_assets, tmp_path, capsys):
    job = _job()
    out = tmp_path / "out"
    cfg = _config(tiny_assets, out, executor="local")
    cfg["models"]["drafters"] = {"tiny": tiny_assets["drafter"]}
    cfg["matrix"]["policies"] = {"chunk": cfg["matrix"]["policies"]["chunk"]}
    cfg["matrix"]["modes"] = [{"name": "greedy"}, {"name": "greedy-adaptive", "adaptive": True}]
    cfg["needle"]["enabled"] = False
    path = _write_config(cfg, tmp_path / "eval.yaml")
    assert job.main(["--config", str(path)]) == 0
    first = json.loads((out / "results.json").read_text())
    journal = out / "runs.journal.jsonl"
    lines = journal.read_text().splitlines()
    assert len(lines) == len(first["runs"]) == 2 * 2 * (1 + 2 * 2)  # 2 prompts x 2 modes x (AR + 2 budgets x 2 gammas)
    adaptive = [r for r in first["runs"] if r["mode"] == "greedy-adaptive" and r["kind"] == "sd"]
    assert adaptive and all(r["plain_steps"] >= 1 for r in adaptive)
    capsys.readouterr()

    # a run killed after 5 measurements, mid-write of the 6th
    journal.write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])
    assert job.main(["--config", str(path)]) == 0
    log = capsys.readouterr().out
    assert f"resuming: 5 of {len(lines)} measurements reused" in log
    second = json.loads((out / "results.json").read_text())
    assert {c["cell_id"] for c in second["cells"]} == {c["cell_id"] for c in first["cells"]}
    assert [r["token_ids"] for r in second["runs"]] == [r["token_ids"] for r in first["runs"]]
    assert {c["lossless"] for c in second["cells"] if c["greedy"]} == {"ok"}

    # a grown matrix measures only what is new; a changed one starts afresh
    assert job.main(["--config", str(path), "--set", "data.prompts_per_context=3"]) == 0
    assert f"resuming: {len(lines)} of {len(lines) * 3 // 2} measurements reused" in capsys.readouterr().out
    assert job.main(["--config", str(path), "--set", "matrix.max_new_tokens=6"]) == 0
    assert "resuming" not in capsys.readouterr().out
    assert job.main(["--config", str(path), "--set", "run.resume=false"]) == 0
    assert "resuming" not in capsys.readouterr().out

    # parts of one matrix measured apart (one process or machine each, own output dir) are joined
    # by --merge-journal: overlaps counted once, torn lines and other configs' lines left out
    part_a, part_b, joined = tmp_path / "a", tmp_path / "b", tmp_path / "joined"
    part_a.mkdir(), part_b.mkdir()
    foreign = json.dumps({**json.loads(lines[0]), "fingerprint": "0" * 16, "key": "other-config"})
    (part_a / journal.name).write_text("\n".join(lines[:12] + [foreign]) + "\n")
    (part_b / journal.name).write_text("\n".join(lines[8:]) + "\n" + lines[0][:30])
    assert job.main(["--config", str(path), "--output", str(joined),
                     "--merge-journal", str(part_a), "--merge-journal", str(part_b)]) == 0
    log = capsys.readouterr().out
    assert f"merged 12 measurements from {part_a} (0 already" in log
    assert f"merged {len(lines) - 12} measurements from {part_b} (12 already" in log
    assert f"resuming: {len(lines)} of {len(lines)} measurements reused" in log
    merged = json.loads((joined / "results.json").read_text())
    assert [r["token_ids"] for r in merged["runs"]] == [r["token_ids"] for r in first["runs"]]
    assert len((joined / journal.name).read_text().splitlines()) == len(lines)
    # a snapshot of a matrix still being measured: --report-only measures nothing, reports what is there
    (part_a / "results.json").unlink(missing_ok=True)
    assert job.main(["--config", str(path), "--output", str(part_a), "--report-only"]) == 0
    log = capsys.readouterr().out
    assert f"report only: 12 of {len(lines)} measurements journaled, {len(lines) - 12} left out" in log
    snap = json.loads((part_a / "results.json").read_text())
    assert snap["missing"] == len(lines) - 12 and len(snap["runs"]) == 12
    assert snap["machine"]["workers"] == [] and "no worker started" in (part_a / "results.md").read_text()
    assert len((part_a / journal.name).read_text().splitlines()) == 13     # nothing measured or dropped
    assert job.main(["--config", str(path), "--output", str(joined), "--merge-journal", str(tmp_path / "none")]) == 2
    assert f"--merge-journal {tmp_path / 'none'}: no runs.journal.jsonl there" in capsys.readouterr().err


def test_ar_baseline_is_the_drafter_groups_own_else_the_prompts():
    from bd_ray.evaluate.items import ARIndex

    def ar(drafter, tps):
        return {"kind": "ar", "prompt_id": "p0", "mode": "greedy", "drafter": drafter, "tokens_per_s": tps}

    sd = {"kind": "sd", "prompt_id": "p0", "mode": "greedy", "drafter": "b"}
    idx = ARIndex([ar("a", 1.0), ar("b", 2.0)])
    assert idx.get(sd)["tokens_per_s"] == 2.0                      # its own group's AR run
    assert idx.get({**sd, "drafter": "c"})["tokens_per_s"] == 1.0  # no own run: the prompt's first
    old = ARIndex([{k: v for k, v in ar(None, 3.0).items() if k != "drafter"}])   # pre-group journals
    assert old.get(sd)["tokens_per_s"] == 3.0
    assert ARIndex([]).get(sd) is None


# ---- journal drop -------------------------------------------------------------------------------


def _journal_line(kind: str, prompt: str, adaptive: bool = False, started_at: float | None = None,
                  cell: str = "c") -> str:
    mode = json.dumps({"name": "greedy-adaptive" if adaptive else "greedy", "adaptive": adaptive}, sort_keys=True)
    rec = {"kind": kind, "prompt_id": prompt}
    if started_at is not None:
        rec["started_at"] = started_at
    return json.dumps({"fingerprint": "f" * 16, "key": f"{kind}|{prompt}|abc|{mode}|{cell}", "record": rec})


def test_journal_drop_by_prompt_and_filters(tmp_path, capsys):
    from datetime import datetime, timezone

    job = _job()
    t = datetime(2026, 11, 30, 10, 25, tzinfo=timezone.utc).timestamp()
    lines = [_journal_line("ar", "c64-p0"), _journal_line("sd", "c64-p0", started_at=t),
             _journal_line("sd", "c64-p0", adaptive=True, started_at=t + 3600),
             _journal_line("needle_sd", "c64-p0"), _journal_line("sd", "c64-p1", started_at=t),
             '{"fingerprint": "ffff", "key": "sd|c64-p0|ab']           # torn by a crash
    journal = tmp_path / "runs.journal.jsonl"
    journal.write_text("\n".join(lines) + "\n")

    # a time window: only c64-p0's sd record started in it (needle runs and other prompts stay)
    assert job.main(["journal", "drop", "--output", str(tmp_path), "--prompts", "c64-p0",
                     "--started-between", "2026-11-30T10:24:00", "2026-11-30T10:29:00"]) == 0
    assert f"{journal}: dropped 1, kept 5" in capsys.readouterr().out
    left = journal.read_text().splitlines()
    assert left == [lines[0]] + lines[2:]                      # order kept, torn line kept as it was
    # --fixed leaves the adaptive items; --unstamped only drops records without started_at
    assert job.main(["journal", "drop", "--output", str(tmp_path), "--prompts", "c64-p0", "--fixed",
                     "--unstamped"]) == 0
    assert journal.read_text().splitlines() == lines[2:]
    # --adaptive: the adaptive sd record of the prompt; never the needle run or another prompt
    assert job.main(["journal", "drop", "--output", str(tmp_path), "--prompts", "c64-p0", "--adaptive"]) == 0
    assert journal.read_text().splitlines() == lines[3:]
    capsys.readouterr()
    # --adaptive and --fixed exclude each other; a directory without a journal is exit 2
    with pytest.raises(SystemExit):
        job.main(["journal", "drop", "--output", str(tmp_path), "--prompts", "x", "--adaptive", "--fixed"])
    assert job.main(["journal", "drop", "--output", str(tmp_path / "none"), "--prompts", "x"]) == 2


def test_journal_drop_is_atomic(tmp_path, monkeypatch):
    from bd_ray.evaluate import journal as journal_mod

    lines = [_journal_line("ar", "c64-p0"), _journal_line("sd", "c64-p0")]
    path = tmp_path / "runs.journal.jsonl"
    path.write_text("\n".join(lines) + "\n")
    before = path.read_text()

    def crash(src, dst):
        raise OSError("killed before the rename")

    monkeypatch.setattr(journal_mod.os, "replace", crash)
    with pytest.raises(OSError, match="killed before the rename"):
        journal_mod.drop_records(tmp_path, ["c64-p0"])
    assert path.read_text() == before                          # the old journal, whole
    monkeypatch.undo()
    assert journal_mod.drop_records(tmp_path, ["c64-p0"]) == (2, 0)
    assert path.read_text() == "" and not path.with_suffix(".tmp").exists()


def test_report_table_and_summary_print_readme_figures(tmp_path, capsys):
    job = _job()
    res = REPO / "results" / "reference" / "results.json"
    assert job.main(["report", "table", "--results", str(res)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| context | drafter | prompts | α B=128 | α B=256 | α B=512 | α B=full |")
    assert table[0].endswith("| adaptive (γ cap 8) |")
    assert any(r.startswith("| 4096 | budgetdraft | 5 | 0.108 | 0.108 |") for r in table)
    assert job.main(["report", "summary", "--results", str(res)]) == 0
    out = capsys.readouterr().out
    assert "context 4096: 5 held-out prompts per cell" in out and "lossless: 624 greedy runs" in out
    # intervals and the paired comparison, recomputed from the runs of results written before them
    assert "budgetdraft - naive B=256: mean per-prompt Δα +0.007 [" in out and "outlier prompts" in out
    assert "  budgetdraft  α(B=256, γ=2) 0.108 [" in out


# ---- intervals, paired comparison, per-prompt α --------------------------------------------------


def _sd_run(drafter: str, prompt: str, accepted: int, drafted: int, budget: str = "256", gamma: int = 4,
            context: int = 4096, tps: float = 10.0) -> dict:
    """A minimal SD record of the fields the aggregation reads (γ drafted per cycle)."""
    cycles = max(drafted // gamma, 1)
    per = [drafted // gamma] * gamma
    acc_at = [min(per[0], accepted)] + [0] * (gamma - 1)
    policy = "none" if budget == "full" else "chunk_topk"
    return {"kind": "sd", "cell_id": f"{context}|{policy}|{budget}|g{gamma}|{drafter}|greedy", "prompt_id": prompt,
            "mode": "greedy", "drafter": drafter, "context": context, "policy": policy, "budget": budget,
            "gamma": gamma, "greedy": True, "cycles": cycles, "drafted": drafted, "accepted": accepted,
            "drafted_at": per, "accepted_at": acc_at, "n_tokens": 64, "decode_s": 64 / tps, "tokens_per_s": tps,
            "draft_s": 0.1, "verify_s": 0.1, "peak_drafter_cache": 300, "fallback_reason": None,
            "plain_steps": 0, "token_ids": [1] * 64}


def _ar_run(drafter: str, prompt: str, tps: float = 8.0) -> dict:
    return {"kind": "ar", "prompt_id": prompt, "mode": "greedy", "drafter": drafter, "n_tokens": 64,
            "decode_s": 64 / tps, "tokens_per_s": tps, "verify_s": 1.0, "token_ids": [1] * 64}


def _synthetic(alphas: dict[str, list[float]], budgets=("256", "full"), drafted: int = 400) -> dict:
    """A results dict (config, cells, runs) with α per prompt per drafter (same α at every budget)."""
    from bd_ray.config.evaluate import load_eval_config
    from bd_ray.evaluate.aggregate import aggregate_cells

    n = len(next(iter(alphas.values())))
    cfg = load_eval_config(None, [f"models.drafters={{{', '.join(f'{d}: from-verifier:1' for d in alphas)}}}",
                                  "data.prompts_per_context=%d" % n, "matrix.contexts=[4096]",
                                  f"matrix.budgets=[{','.join(budgets)}]", "matrix.gammas=[4]",
                                  "report.bootstrap_resamples=500"])
    runs = []
    for d, al in alphas.items():
        for i, a in enumerate(al):
            runs.append(_ar_run(d, f"p{i}"))
            for b in budgets:
                runs.append(_sd_run(d, f"p{i}", round(a * drafted), drafted, budget=b, tps=10.0 + i))
    cells = aggregate_cells(runs, cfg)
    return {"config": cfg.model_dump(mode="json"), "cells": cells, "runs": runs}


def test_bootstrap_intervals_over_prompts():
    from bd_ray.evaluate.intervals import bootstrap_sums, percentile_interval

    # identical prompts: every resample gives the same pooled α -> a zero-width interval at α
    res = _synthetic({"a": [0.3] * 12})
    for c in res["cells"]:
        assert c["alpha"] == pytest.approx(0.3) and c["alpha_ci"][0] == c["alpha_ci"][1] == pytest.approx(0.3)
        assert c["tau_ci"][0] == c["tau_ci"][1] == pytest.approx(c["tau"])
        assert c["prompt_alpha"] == [pytest.approx(0.3)] * 12
    # spread prompts: the interval has width and contains the pooled estimate (α, τ, speedup)
    res = _synthetic({"a": [0.1, 0.2, 0.25, 0.3, 0.35, 0.4, 0.15, 0.5, 0.45, 0.2, 0.3, 0.6]})
    for c in res["cells"]:
        assert c["alpha_ci"][0] < c["alpha"] < c["alpha_ci"][1]
        assert c["tau_ci"][0] < c["tau"] < c["tau_ci"][1]
        assert c["speedup_ci"][0] < c["speedup"] < c["speedup_ci"][1]
        assert 0.0 <= c["alpha_ci"][0] and c["alpha_ci"][1] <= 1.0
    # the seed decides the resamples: same seed -> the same interval, another seed -> another
    cols = {"x": [1.0, 5.0, 2.0, 8.0, 3.0]}
    same = [percentile_interval(bootstrap_sums(cols, 300, seed=s)["x"]) for s in (7, 7, 8)]
    assert same[0] == same[1] and same[0] != same[2]
    # sums of a resample: n prompts drawn with replacement, so Σ of a constant column is n x it
    assert set(bootstrap_sums({"one": [1.0] * 5}, 50, 0)["one"]) == {5.0}
    assert percentile_interval([float("nan")] * 3) is None
    with pytest.raises(ValueError):
        bootstrap_sums({"x": [1.0], "y": [1.0, 2.0]}, 10, 0)


def test_paired_difference_sign_and_interval():
    from bd_ray.evaluate.intervals import prompt_statistics

    base = [0.1, 0.2, 0.25, 0.3, 0.35, 0.4, 0.15, 0.5, 0.45, 0.2, 0.3, 0.6]
    # budgetdraft beats naive by 0.05 (+-0.01) on every prompt: the interval is above 0
    res = _synthetic({"budgetdraft": [a + 0.05 + 0.01 * (i % 3 - 1) for i, a in enumerate(base)], "naive": base,
                      "init4": [0.01] * 12})
    st = prompt_statistics(res)
    assert [(p["drafter_a"], p["drafter_b"], p["budget"]) for p in st["paired"]] == \
        [("budgetdraft", "naive", "256"), ("budgetdraft", "naive", "full")]     # default pair, both budgets
    for p in st["paired"]:
        assert p["n_prompts"] == 12 and p["a_wins"] == 12 and p["b_wins"] == 0
        assert p["mean_diff"] == pytest.approx(0.05, abs=0.002)
        assert 0.0 < p["mean_diff_ci"][0] <= p["mean_diff"] <= p["mean_diff_ci"][1] < 0.1
        assert p["mean_diff_excludes_zero"] and p["pooled_diff_excludes_zero"]
        assert p["pooled_diff"] == pytest.approx(p["alpha_a"] - p["alpha_b"])
    # the same pair reversed: the sign flips, the interval mirrors
    res["config"]["report"]["paired"] = [["naive", "budgetdraft"]]
    rev = prompt_statistics(res)["paired"]
    assert rev[0]["mean_diff"] == pytest.approx(-st["paired"][0]["mean_diff"])
    assert rev[0]["mean_diff_ci"] == pytest.approx([-x for x in reversed(st["paired"][0]["mean_diff_ci"])])
    # no systematic difference (the sign alternates): the interval includes 0
    noisy = _synthetic({"budgetdraft": [a + (0.03 if i % 2 else -0.03) for i, a in enumerate(base)], "naive": base})
    for p in prompt_statistics(noisy)["paired"]:
        assert p["mean_diff_ci"][0] < 0.0 < p["mean_diff_ci"][1] and not p["mean_diff_excludes_zero"]
    # without both default drafters there is nothing to pair
    assert prompt_statistics(_synthetic({"a": base, "b": base}))["paired"] == []


def test_per_prompt_alpha_flags_an_outlier_prompt():
    from bd_ray.evaluate.intervals import outlier_flags, prompt_statistics
    from bd_ray.evaluate.report import render_markdown

    o = outlier_flags([0.1, 0.12, 0.11, 0.09, 0.1, 0.95])
    assert o["flags"] == [False] * 5 + [True] and o["median"] == pytest.approx(0.105)
    assert outlier_flags([0.2] * 6)["flags"] == [False] * 6                   # all equal: nothing
    assert outlier_flags([0.2] * 11 + [0.8])["flags"] == [False] * 11 + [True]  # MAD 0: mean-deviation fallback
    assert outlier_flags([0.1, 0.3])["flags"] == [False, False]
    assert outlier_flags([])["flags"] == []

    # one repetitive prompt (α 0.9) among twelve: flagged in every column of that drafter, and the
    # pooled α without it is shown
    alphas = [0.2, 0.22, 0.18, 0.21, 0.19, 0.2, 0.23, 0.17, 0.2, 0.21, 0.19, 0.9]
    res = _synthetic({"budgetdraft": alphas, "naive": [0.2] * 12})
    res.update(prompt_statistics(res))
    cols = res["per_prompt"]["columns"]
    assert res["per_prompt"]["budgets"] == ["256", "full"] and res["per_prompt"]["gamma"] == 4
    assert [(c["drafter"], c["budget"]) for c in cols] == [("budgetdraft", "256"), ("budgetdraft", "full"),
                                                          ("naive", "256"), ("naive", "full")]
    for c in cols:
        assert c["outliers"] == (["p11"] if c["drafter"] == "budgetdraft" else [])
        assert len(c["prompt_alpha"]) == 12
    bd = cols[0]
    assert bd["alpha"] == pytest.approx(sum(alphas) / 12, abs=1e-3)
    assert bd["alpha_without_outliers"] == pytest.approx(sum(alphas[:11]) / 11, abs=1e-3)

    # the Markdown report has the new sections (and the old ones)
    res.update({"machine": {"driver": {"cpu_count": 2, "torch": "x"}, "workers": []}, "isolation": "local",
                "wall_s": 1.0, "best_gamma": [], "needle": None,
                "lossless": {"mode": "exact", "checked": 0, "failures": [], "differ": []}})
    md = render_markdown(res)
    for head in ("## All cells", "| α CI |", "## Paired comparison (same prompts, α of drafter A - drafter B)",
                 "## Per-prompt α (γ = 4, budgets 256, full)", "### context 4096, greedy", "**0.900**",
                 "- outlier: p11, budgetdraft B=256", "| pooled α without flagged |", "## Lossless check",
                 "percentile bootstrap over prompts"):
        assert head in md, head
