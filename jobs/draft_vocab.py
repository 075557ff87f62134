#!/usr/bin/env python
"""Build a draft vocabulary: the K most frequent tokens of the training split (FR-Spec, EAGLE-3).

Counts the verifier tokenizer's ids over the training split of a corpus (never the held-out
works), keeps the ``--size`` most frequent plus every special token, and writes
``draft_vocab.json`` (bd_ray/draft_vocab.py) into ``--out``. Use it in one of three ways:

* train a subset head: ``--set models.draft_vocab=<out>`` for jobs/train_drafter.py; the drafter
  exported to ``final/`` carries the file;
* put it next to a drafter checkpoint: ``load_drafter`` (so ``python -m bd_ray.generate --drafter``,
  evaluation and Serve) then decodes with a head over those rows only;
* pass it explicitly: ``bd_ray.models.load_drafter(path, tokenizer, draft_vocab=<out>)``, or
  ``benchmarks/step_costs.py --draft-vocab <out>``.

    python jobs/draft_vocab.py --size 8192 --out runs/draft_vocab/pg_mini_8192
    ray job submit --working-dir . -- python jobs/draft_vocab.py --size 8192 --out /abs/path
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # ray job working dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--verifier", default="smollm2-135m", help="embedded verifier name or HF checkpoint dir")
    p.add_argument("--corpus", default="pg-mini", help="embedded corpus name or a corpus directory")
    p.add_argument("--size", type=int, default=8192, help="K: tokens kept by frequency")
    p.add_argument("--out", required=True, help="directory to write draft_vocab.json into")
    args = p.parse_args(argv)

    import numpy as np

    from bd_ray import assets, models
    from bd_ray.draft_vocab import build_draft_vocab, count_tokens, save_draft_vocab

    t0 = time.perf_counter()
    tok = models.load_tokenizer(models.resolve_model_path(args.verifier))
    corpus = assets.ensure_corpus(args.corpus) if not os.path.isdir(args.corpus) else args.corpus
    table = assets.load_corpus_table(corpus, split="train")
    texts = table.column("text").to_pylist()
    vocab_size = len(tok)
    ids = (np.asarray(tok(t, add_special_tokens=False)["input_ids"], dtype=np.int64) for t in texts)
    counts = count_tokens(ids, vocab_size)
    vocab = build_draft_vocab(counts, args.size, always=tok.all_special_ids,
                              source=f"{args.corpus} train split ({len(texts)} docs, {int(counts.sum())} tokens), "
                                     f"tokenizer of {args.verifier}")
    path = save_draft_vocab(vocab, args.out)
    print(f"[bd-ray] draft vocabulary: {len(vocab)} of {vocab_size} tokens cover {vocab.coverage:.4f} of "
          f"{int(counts.sum())} training tokens -> {path} ({time.perf_counter() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
