#!/usr/bin/env python
"""Finished experiment (results: results/speed/README.md). Cost of streaming text out of the engine:
bd-ray's incremental StopChecker against decoding the whole output every chunk (what it did before,
and what a naive streamer does).

Feeds the first N tokens of a held-out pg-mini book (SmolLM2 tokenizer) in chunks of C tokens
(C = 1: plain decoding; C = 3: a speculative cycle accepting 2), asking for the streamable text
after every chunk, and prints milliseconds per chunk and their ratio. CPU only, seconds.

    python results/speed/detokenize.py [--tokens 1024 8192] [--chunk 1 3] [--stop zzqq]
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # repo root


def _book_ids(tok, n: int) -> list[int]:
    import pyarrow.parquet as pq

    from bd_ray import assets

    shard = sorted(glob.glob(f"{assets.ensure_corpus('pg-mini')}/test-*.parquet"))[0]
    ids: list[int] = []
    for text in pq.read_table(shard, columns=["text"]).column("text").to_pylist():
        ids += tok.encode(text, add_special_tokens=False)
        if len(ids) >= n:
            return ids[:n]
    raise SystemExit(f"the held-out shard has only {len(ids)} tokens, asked for {n}")


def _per_chunk_ms(feed, ids: list[int], chunk: int) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(ids), chunk):
        feed(ids[i: i + chunk])
    return (time.perf_counter() - t0) * 1e3 / -(-len(ids) // chunk)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 8192])
    ap.add_argument("--chunk", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--stop", nargs="*", default=[], help="stop strings (never in the text: worst case)")
    args = ap.parse_args(argv)

    from bd_ray import assets
    from bd_ray.models import load_tokenizer
    from bd_ray.speculative.stopping import StopChecker

    tok = load_tokenizer(str(assets.ensure_verifier("smollm2-135m")))
    ids_all = _book_ids(tok, max(args.tokens))
    print(f"{'tokens':>6} {'chunk':>5}  incremental ms/chunk  full-decode ms/chunk  ratio")
    for n in args.tokens:
        for c in args.chunk:
            ids = ids_all[:n]
            checker = StopChecker(tok, n, stop=args.stop)

            def incremental(block):
                checker.extend(block)
                checker.text_delta()

            seen: list[int] = []

            def full(block):
                seen.extend(block)
                tok.decode(seen, skip_special_tokens=True)

            a, b = _per_chunk_ms(incremental, ids, c), _per_chunk_ms(full, ids, c)
            assert checker.text == tok.decode(ids, skip_special_tokens=True)
            print(f"{n:>6} {c:>5}  {a:>20.3f}  {b:>20.3f}  {b / a:>5.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
