"""``python -m bd_ray.generate`` on tiny random models: bad ``--budget`` values are argparse errors
(exit 2, naming the option and the minimum), not tracebacks from ``int()`` or from the engine."""

from __future__ import annotations

import json

import pytest

from bd_ray import generate
from bd_ray.config import SparsePolicyConfig
from bd_ray.sparse import min_budget
from bd_ray.testing.tiny import TINY_TEXT, tiny_tokenizer, write_serve_models

PROMPT = TINY_TEXT[:400]  # ~100 tiny-BPE tokens: fits the tiny verifier's 512 positions


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return write_serve_models(tmp_path_factory.mktemp("generate"))


def _exit_code_and_stderr(argv, capsys):
    with pytest.raises(SystemExit) as ei:
        generate.main(argv)
    return ei.value.code, capsys.readouterr().err


@pytest.mark.parametrize("bad", ["abc", "0", "-3", "12.5"])
def test_budget_not_a_count_is_an_argument_error(bad, capsys):
    code, err = _exit_code_and_stderr(["--prompt", "x", "--budget", bad], capsys)
    assert code == 2 and "argument --budget: must be" in err, err


@pytest.mark.timeout(120)
def test_budget_below_the_policy_minimum_names_it(models_dir, capsys):
    vdir, ddir = models_dir
    n = len(tiny_tokenizer()(PROMPT, add_special_tokens=False)["input_ids"])
    need = min_budget(SparsePolicyConfig(recent=generate._parser().get_default("recent")), n)   # the CLI's policy
    assert 8 < need < n
    code, err = _exit_code_and_stderr(["--verifier", str(vdir), "--drafter", str(ddir), "--prompt", PROMPT,
                                       "--budget", "8", "--max-new-tokens", "2"], capsys)
    assert code == 2 and f"argument --budget: 8 is below the minimum {need} of policy chunk_topk" in err, err
    # the minimum itself and 'full' run
    for budget in (str(need), "full"):
        assert generate.main(["--verifier", str(vdir), "--drafter", str(ddir), "--prompt", PROMPT,
                              "--budget", budget, "--max-new-tokens", "2", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert len(out["speculative"]["token_ids"]) == 2


def test_unreadable_prompt_file_is_an_argument_error(tmp_path, capsys):
    code, err = _exit_code_and_stderr(["--prompt-file", str(tmp_path / "missing.txt")], capsys)
    assert code == 2 and "--prompt-file" in err and "missing.txt" in err, err
