"""Small real components for fast tests and benchmarks: a byte-level BPE tokenizer trained here,
tiny Llamas, a tiny corpus, tiny training and Serve set-ups.

Real tokenizer (the `tokenizers` library wrapped by transformers) and real transformers models,
with random weights so tests run in seconds on a CPU.
"""

from __future__ import annotations

import functools

import torch

from bd_ray.config import SamplingConfig
from bd_ray.config.train import TrainJobConfig
from bd_ray.models import init_drafter_from_verifier

TINY_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families, that he is considered the rightful property of some one or other of "
    "their daughters. Call me Ishmael. Stop here. In the beginning God created the heaven and the "
    "earth. And the earth was without form, and void; and darkness was upon the face of the deep. "
) * 4


@functools.lru_cache(maxsize=None)
def tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer (``vocab_size`` ids, ``</s>`` = EOS id 0) trained on English."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TINY_TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


def tiny_llama(vocab_size: int = 320, layers: int = 2, seed: int = 0, max_positions: int = 4096,
               hidden: int = 64, heads: int = 4, kv_heads: int = 2, init_std: float = 0.2):
    """A random-weight LlamaForCausalLM in fp32, eval mode (GQA: ``heads/kv_heads`` query heads per KV head).

    A larger ``init_std`` than the default makes the next-token distribution peaked enough that
    greedy ties are practically impossible.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=max_positions, initializer_range=init_std,
                      bos_token_id=None, eos_token_id=0, pad_token_id=None, tie_word_embeddings=False,
                      attn_implementation="sdpa")
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def write_tiny_world(root, window: int = 112):
    """A tiny verifier dir (weights + tokenizer) at ``root/verifier`` and a pg-mini-shaped parquet
    corpus at ``root/corpus.parquet``: 4 train books, 1 held-out book, 1 too-short and 1 empty
    train document. Returns ``(tokenizer, held-out windows of `window` tokens)``."""
    from pathlib import Path

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)
    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tok), layers=2, seed=1)
    (root / "verifier").mkdir(parents=True)
    model.save_pretrained(root / "verifier")
    tok.save_pretrained(root / "verifier")
    words = TINY_TEXT.split()
    g = np.random.default_rng(0)
    docs = [dict(doc_id=f"book{i}", title=f"b{i}", author="a", source="s", license="pd", split="train",
                 text=" ".join(words[j % len(words)] for j in range(int(g.integers(0, 50)), 1200)))
            for i in range(4)]
    docs += [dict(doc_id="held", title="h", author="a", source="s", license="pd", split="test", text=TINY_TEXT * 2),
             dict(doc_id="short", title="s", author="a", source="s", license="pd", split="train", text="Call me Ishmael."),
             dict(doc_id="empty", title="e", author="a", source="s", license="pd", split="train", text="")]
    pq.write_table(pa.Table.from_pylist(docs), root / "corpus.parquet")
    held = np.array(tok(TINY_TEXT * 2)["input_ids"])
    return tok, [held[i * window:(i + 1) * window] for i in range(4)]


def own_ray_processes(title_prefix: str) -> list:
    """``psutil.Process`` objects of this driver's Ray cluster whose title starts with ``title_prefix``
    (e.g. ``"ray::RayTrainWorker"``, ``"ray::ServeReplica:app:SpecEngine"``).

    Only descendants of the raylet this process started are searched, so processes of other Ray
    clusters on the same machine are never touched. Needs a cluster started by ``ray.init`` here.
    """
    import psutil
    import ray

    node = ray._private.worker._global_node  # noqa: SLF001 -- the local node this driver started
    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    out = []
    for p in raylet.children(recursive=True):
        try:
            title = (p.cmdline() or [""])[0]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if title.startswith(title_prefix):
            out.append(p)
    return out


# ---- tiny training setup shared by the training tests (test_train.py, test_faults_train.py) ----

TRAIN_V, TRAIN_P, TRAIN_T = 256, 96, 16  # vocabulary, prefix and continuation tokens of a window


def tiny_train_cfg(**over):
    """A seeded single-process ``TrainJobConfig`` on windows of ``TRAIN_P + TRAIN_T`` tokens (no
    DeepSpeed, no evals/checkpoints/export unless overridden). ``over``: ``section__key=value``."""
    tree = {
        "models": {"drafter_layers": 1},
        "data": {"prefix_len": TRAIN_P, "continuation_len": TRAIN_T, "eval_windows": 0},
        "loss": {"budgets": {32: 0.5, 48: 0.5}, "policy": {"chunk_size": 8, "recent": 8},
                 "logits_chunk": 8, "prefill_chunk": 32},
        "optim": {"lr": 1e-3, "warmup_steps": 2, "max_steps": 20},
        "deepspeed": {"enabled": False},
        "run": {"eval_every": 1000, "checkpoint_every": 1000, "log_every": 1000, "export": False},
    }
    for k, v in over.items():
        sec, key = k.split("__")
        tree.setdefault(sec, {})[key] = v
    return TrainJobConfig.model_validate(tree)


def tiny_train_rows(n: int = 40, seed: int = 0) -> list[dict]:
    """``n`` random windows ``{"input_ids": int[TRAIN_P + TRAIN_T]}`` over ``TRAIN_V`` ids."""
    import numpy as np

    g = np.random.default_rng(seed)
    return [{"input_ids": g.integers(0, TRAIN_V, TRAIN_P + TRAIN_T)} for _ in range(n)]


def tiny_train_models():
    """``(teacher, drafter)``: a seeded 2-layer tiny Llama and a drafter of its first layer."""
    teacher = tiny_llama(vocab_size=TRAIN_V, layers=2, seed=1)
    return teacher, init_drafter_from_verifier(teacher, 1)


# ---- tiny Serve application shared by the serving tests and the Serve benchmarks ----

SERVE_MAX_MODEL_LEN = 256
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
SERVE_PROMPTS = [
    "It is a truth universally acknowledged, that a single man",
    "In the beginning God created the heaven and the earth. And the earth was",
    "Call me Ishmael. Stop here. However little known the feelings or views of such a man",
    "their daughters. Call me",
]


def write_serve_models(root, drafter_layers: int = 3):
    """A tiny verifier (4 layers, 512 positions) and a drafter of its first ``drafter_layers`` layers,
    each saved with the tiny BPE tokenizer and :data:`CHAT_TEMPLATE` under ``root``. Returns ``(vdir, ddir)``."""
    from pathlib import Path

    root = Path(root)
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    verifier = tiny_llama(layers=4, seed=0, max_positions=512)
    drafter = init_drafter_from_verifier(verifier, drafter_layers)
    vdir, ddir = root / "verifier", root / "drafter"
    for m, d in ((verifier, vdir), (drafter, ddir)):
        m.save_pretrained(d)
        tok.save_pretrained(d)
    return vdir, ddir


def serve_app_args(vdir, ddir, max_model_len: int = SERVE_MAX_MODEL_LEN) -> dict:
    """Serve app args (``ServeAppConfig`` tree) for the tiny models: 1-2 autoscaled engine replicas of
    half a CPU each, 2 ongoing (batched together) + 6 queued requests per replica, fast autoscaling
    and health checks, fixed γ = 3 (adaptive γ off)."""
    return {
        "model": {"name": "tiny", "aliases": ["tiny-alias"], "verifier": str(vdir), "drafter": str(ddir),
                  "device": "cpu", "max_model_len": max_model_len, "torch_threads": 1},
        # fixed γ (adaptive off) so per-position acceptance has exactly γ entries
        "spec": {"gamma": 3, "budget": 48, "adaptive": False,
                 "policy": {"name": "chunk_topk", "chunk_size": 8, "recent": 8}},
        "speculation": {"max_gamma": 8},
        "defaults": {"max_tokens": 32, "temperature": 0.0},
        "engine": {"num_cpus": 0.5, "max_ongoing_requests": 2, "max_queued_requests": 6,
                   "health_check_period_s": 2,
                   "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                                   "upscale_delay_s": 1, "downscale_delay_s": 3, "look_back_period_s": 2,
                                   "metrics_interval_s": 0.5}},
        "ingress": {"num_cpus": 0.1, "retry_after_s": 1, "first_chunk_timeout_s": 60},
    }


def random_prompt(seed: int, n: int, vocab: int = 320) -> list[int]:
    """``n`` token ids drawn uniformly from ``[1, vocab)`` by a generator seeded with ``seed``
    (id 0, the tiny tokenizer's EOS, never appears): the engine tests' prompts."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (n,), generator=g).tolist()


def greedy(n: int, **kw) -> SamplingConfig:
    """Greedy decoding of exactly ``n`` new tokens (no EOS ids, so only ``max_new_tokens`` stops
    it unless ``kw`` adds stop rules); ``kw``: further :class:`SamplingConfig` fields."""
    return SamplingConfig(temperature=0.0, max_new_tokens=n, eos_token_ids=[], **kw)
