#!/usr/bin/env python
"""Ship a trained drafter: its trainable parameters only, with a manifest, under drafters/<name>/.

Reads the Hugging Face export of a training run (``runs/<run>/final`` from jobs/train_drafter.py,
with its ``draft_vocab.json`` and ``bd_ray_training.json`` when present, and the run's
``metrics.json`` one level up), checks that its embedding is the verifier's (else refuses, unless
``--include-embedding``), and writes ``drafters/<name>/`` atomically (bd_ray/reference_drafters.py;
layout and rules: drafters/README.md). The training record in the manifest is taken from the run
(steps, tokens seen, held-out agreement per budget, the training config) and from ``--notes-json``
(commands, data split, anything else; its keys win).

A new version replaces an old one only when its mean held-out agreement (over the budgets both
record) is higher, unless ``--force``. Load the result with ``load_drafter("<name>", tokenizer)``,
``python -m bd_ray.generate --drafter <name>`` or ``model.drafter: <name>`` in a Serve config.

    python jobs/ship_drafter.py --from runs/budgetdraft_4k/final --name reference-budgetdraft \\
        --verifier smollm2-135m --notes-json runs/budgetdraft_4k/ship_notes.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # ray job working dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_record(export_dir: str) -> dict:
    """What the run next to ``export_dir`` recorded: training notes, steps, tokens seen, held-out
    agreement per budget (the last evaluation), the training config. Missing files give fewer keys."""
    from bd_ray.train.export import TRAINING_NOTES

    rec: dict = {}
    notes = os.path.join(export_dir, TRAINING_NOTES)
    if os.path.isfile(notes):
        with open(notes) as f:
            rec["notes"] = json.load(f)
    mpath = os.path.join(os.path.dirname(os.path.abspath(export_dir)), "metrics.json")
    if os.path.isfile(mpath):
        with open(mpath) as f:
            m = json.load(f)
        hist = m.get("history") or []
        rec["steps"] = m.get("step")
        rec["finished"] = m.get("finished")
        # tokens per step = tokens_per_s * step_s (bd_ray.train.loop records both per step)
        rec["tokens_seen"] = int(round(sum(h.get("tokens_per_s", 0) * h.get("step_s", 0) for h in hist)))
        evals = m.get("eval_history") or []
        if evals:
            rec["held_out_agreement"] = {k[len("agree_"):]: v for k, v in evals[-1].items() if k.startswith("agree_")}
            rec["held_out_agreement_step"] = evals[-1].get("step")
        rec["config"] = m.get("config")
        rec["metrics_path"] = os.path.relpath(mpath, REPO) if mpath.startswith(REPO) else mpath
    return rec


def mean_agreement(training: dict, keys: set[str] | None = None) -> float | None:
    """Mean held-out agreement over ``keys`` (default: all recorded budgets); None if none recorded."""
    agree = training.get("held_out_agreement") or {}
    vals = [float(v) for k, v in agree.items() if (keys is None or k in keys) and v is not None]
    return sum(vals) / len(vals) if vals else None


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--from", dest="src", required=True, help="HF drafter export, e.g. runs/<run>/final")
    p.add_argument("--name", required=True, help="shipped name, e.g. reference-budgetdraft")
    p.add_argument("--verifier", default="smollm2-135m",
                   help="the verifier the drafter was trained for: registered name or checkpoint dir")
    p.add_argument("--dtype", choices=["bf16", "int8"], default="bf16")
    p.add_argument("--notes-json", help="JSON object merged into the manifest's training record "
                                        "(commands, data split, ...; its keys win)")
    p.add_argument("--out-root", default=os.path.join(REPO, "drafters"),
                   help="where drafters/<name>/ goes (default: the checkout's drafters/; "
                        "$BD_RAY_HOME/drafters is the other place load_drafter looks)")
    p.add_argument("--include-embedding", action="store_true",
                   help="ship a trained embedding (usually breaks the size limit)")
    p.add_argument("--max-mib", type=float, default=32.0, help="size limit of the shipped files together")
    p.add_argument("--force", action="store_true", help="replace an existing version even if not better")
    args = p.parse_args(argv)

    from bd_ray import assets, models, reference_drafters
    from bd_ray.draft_vocab import DRAFT_VOCAB_FILE, load_draft_vocab
    from bd_ray.store import file_table

    verifier_dir = models.resolve_model_path(args.verifier)
    vtok = models.load_tokenizer(verifier_dir)
    model, _ = models.load_drafter(args.src, vtok, draft_vocab=None)
    dv = load_draft_vocab(args.src) if os.path.isfile(os.path.join(args.src, DRAFT_VOCAB_FILE)) else None

    training = run_record(args.src)
    if args.notes_json:
        with open(args.notes_json) as f:
            extra = json.load(f)
        if not isinstance(extra, dict):
            p.error(f"--notes-json {args.notes_json}: a JSON object is needed")
        training.update(extra)
    training["ship_command"] = "python jobs/ship_drafter.py " + " ".join(sys.argv[1:] if argv is None else argv)

    dest = os.path.join(args.out_root, args.name)
    if reference_drafters.is_shipped_dir(dest) and not args.force:
        with open(os.path.join(dest, reference_drafters.MANIFEST)) as f:
            old = json.load(f).get("training") or {}
        common = set(old.get("held_out_agreement") or {}) & set(training.get("held_out_agreement") or {})
        a_old, a_new = mean_agreement(old, common), mean_agreement(training, common)
        if a_old is not None and (a_new is None or a_new <= a_old):
            print(f"[ship] {dest} has mean held-out agreement {a_old:.4f} over budgets {sorted(common)}; this "
                  f"drafter has {a_new if a_new is None else round(a_new, 4)}: not better, not shipped "
                  f"(--force to replace)", file=sys.stderr)
            return 2

    src = os.path.abspath(args.src)
    source = {"path": os.path.relpath(src, REPO) if src.startswith(REPO + os.sep) else src, "git_commit": git_commit(),
              "files": file_table(args.src)}
    verifier = args.verifier if args.verifier in assets.VERIFIERS else os.path.abspath(args.verifier)
    try:
        man = reference_drafters.ship_drafter(
            model, dest, verifier=verifier, verifier_dir=verifier_dir, dtype=args.dtype, draft_vocab=dv,
            training=training, source=source, include_embedding=args.include_embedding,
            max_bytes=int(args.max_mib * 2**20))
    except reference_drafters.ShipError as e:
        print(f"[ship] refused: {e}", file=sys.stderr)
        return 2
    total = sum(f["size"] for f in man["files"].values())
    print(f"[ship] {dest} version {man['version']} ({man['dtype']}, {man['parameters']['shipped']:,} parameters, "
          f"{total / 2**20:.1f} MiB; embedding from {man['verifier']['name']})")
    for rel, f in man["files"].items():
        print(f"  {rel:20s} {f['size']:>12,d} B  sha256 {f['sha256']}")
    if training.get("held_out_agreement"):
        print(f"  held-out agreement: {training['held_out_agreement']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
