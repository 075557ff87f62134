"""Outputs of a training run besides checkpoints: the drafter as a Hugging Face directory (the
final export and each checkpoint's ``hf/``) and the plot of its loss / agreement curves."""

from __future__ import annotations

import os

import torch

from bd_ray.draft_vocab import save_draft_vocab
from bd_ray.store import atomic_write_json, replace_dir

__all__ = ["TRAINING_NOTES", "export_hf", "write_plot"]


TRAINING_NOTES = "bd_ray_training.json"


def export_hf(model: torch.nn.Module, d: str, tokenizer_path: str | None, draft_vocab=None,
              notes: dict | None = None) -> None:
    """HF ``save_pretrained`` of ``model`` (+ tokenizer, + ``draft_vocab.json`` when training with a
    draft vocabulary, + ``bd_ray_training.json`` with ``notes`` such as a frozen embedding) as the
    directory ``d``, built next to it and renamed into place (never half-written)."""

    def build(tmp: str) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        if notes:
            atomic_write_json(os.path.join(tmp, TRAINING_NOTES), notes, indent=1)
        if draft_vocab is not None:
            save_draft_vocab(draft_vocab, tmp)
        if tokenizer_path:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(tmp)

    replace_dir(d, build)


def write_plot(history: list[dict], eval_history: list[dict], path: str, title: str = "") -> str:
    """Loss curves (L, L_A, L_C per step) and held-out agreement per budget -> PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [h["step"] for h in history]
    for key, lab in (("loss", "L"), ("l_a", "L_A"), ("l_c", "L_C")):
        a.plot(steps, [h[key] for h in history], label=lab, lw=1)
    a.set_xlabel("optimizer step")
    a.set_ylabel("loss (nats/token)")
    a.legend()
    a.set_title(f"{title} losses")
    if eval_history:
        es = [e["step"] for e in eval_history]
        for key in [k for k in eval_history[0] if k.startswith("agree_")]:
            b.plot(es, [e.get(key, float("nan")) for e in eval_history], marker="o", label=key[6:])
        b.legend(title="drafter KV budget")
    b.set_xlabel("optimizer step")
    b.set_ylabel("held-out top-1 agreement with teacher")
    b.set_title("agreement (greedy alpha proxy)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
