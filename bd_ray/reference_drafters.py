"""Shipped drafters: a trained drafter as its trainable parameters only, verified and rebuilt at load.

A shipped drafter is a directory ``<root>/<name>/`` (roots, searched in order: ``drafters/`` at the
root of the bd-ray checkout, then ``bd_ray_home()/drafters``; see ``drafters/README.md``)::

    model.safetensors   the trainable parameters (decoder layers, final norm, an untied head that
                        differs from the verifier's), bf16, or int8 with one fp32 absmax scale per row
    config.json         the drafter's Hugging Face config
    draft_vocab.json    the draft vocabulary, when the drafter was trained with one
    manifest.json       written last: format, size + SHA-256 of every other file, the verifier and
                        the SHA-256 of its embedding, dtype, training record (commands, data, steps,
                        tokens, held-out agreement per budget), version, creation date

The token embedding (and a head tied to it) is the verifier's, not a copy: a SmolLM2-shaped
drafter's 49,152 x 576 embedding alone is 57 MB in bf16, twice the size of its four decoder layers.
It is taken from the verifier's checkpoint at load time and checked against the SHA-256 recorded
when the drafter was shipped (:func:`embedding_sha256`), so a drafter is never paired with an
embedding it was not trained with.

Why int8 is per-row absmax: each output row of a linear layer gets its own scale, so one large row
does not flatten the resolution of the others (LLM.int8()'s vector-wise quantisation, without the
outlier split).

:func:`ship_drafter` writes one (built in a temporary sibling, published by one rename:
:mod:`bd_ray.store`); :func:`read_manifest` and :func:`build_drafter` read it back;
:func:`bd_ray.models.load_drafter` is the entry point that loads one by name.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import torch

from bd_ray.assets.cache import bd_ray_home
from bd_ray.draft_vocab import DraftVocab, save_draft_vocab
from bd_ray.store import atomic_write_json, file_table, replace_dir, sha256_file, verify_files

__all__ = ["FORMAT", "MANIFEST", "WEIGHTS", "MAX_BYTES", "DrafterIntegrityError", "ShipError",
           "drafter_roots", "shipped_names", "find_shipped", "is_shipped_dir", "read_manifest",
           "embedding_sha256", "checkpoint_tensor", "ship_drafter", "build_drafter"]

FORMAT = "bd-ray-drafter/1"
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
MAX_BYTES = 32 * 2**20
"""Largest shipped drafter, all files together (and so each file): 32 MiB, small enough for git."""
DEFAULT_DRAFTER = "reference-budgetdraft"
"""The shipped drafter entry points use when none is named (``bd_ray.generate``,
serve_configs/default.yaml, ``make demo``)."""

DTYPES = ("bf16", "int8")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SCALE = ".int8_row_scale"  # suffix of the per-row scale tensor of an int8 weight


class DrafterIntegrityError(ValueError):
    """A shipped drafter does not match its manifest or its verifier; the message names the file
    (or tensor) and both digests."""


class ShipError(ValueError):
    """A drafter cannot be shipped as asked (too large, trained embedding, bad name)."""


def drafter_roots() -> list[Path]:
    """Where shipped drafters are looked up, in order: the checkout's ``drafters/`` (next to the
    ``bd_ray`` package) and ``bd_ray_home()/drafters``."""
    return [Path(__file__).resolve().parents[1] / "drafters", bd_ray_home() / "drafters"]


def is_shipped_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory holding a shipped drafter's ``manifest.json`` of this format."""
    m = Path(path) / MANIFEST
    if not m.is_file():
        return False
    try:
        return json.loads(m.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def shipped_names() -> list[str]:
    """Sorted names of every shipped drafter found under :func:`drafter_roots`."""
    names = set()
    for root in drafter_roots():
        if root.is_dir():
            names.update(p.name for p in root.iterdir() if _NAME.match(p.name) and is_shipped_dir(p))
    return sorted(names)


def find_shipped(name_or_path: str | Path) -> Path | None:
    """The directory of a shipped drafter named ``name_or_path`` (first root wins), or the path
    itself when it is a shipped drafter's directory; ``None`` otherwise."""
    s = str(name_or_path)
    if _NAME.match(s):
        for root in drafter_roots():
            if is_shipped_dir(root / s):
                return root / s
    p = Path(s).expanduser()
    return p if is_shipped_dir(p) else None


def read_manifest(d: str | Path) -> dict:
    """The manifest of the shipped drafter in ``d``, after checking every file it lists.

    Raises:
        DrafterIntegrityError: unreadable manifest, wrong format, or a file missing / of another
            size / of another SHA-256 (the message names the file and both digests).
    """
    d = Path(d)
    try:
        man = json.loads((d / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise DrafterIntegrityError(f"shipped drafter {d}: unreadable {MANIFEST} ({e})") from e
    if man.get("format") != FORMAT:
        raise DrafterIntegrityError(f"shipped drafter {d}: {MANIFEST} format {man.get('format')!r} is not {FORMAT!r}")
    files = man.get("files") or {}
    if WEIGHTS not in files or "config.json" not in files:
        raise DrafterIntegrityError(f"shipped drafter {d}: {MANIFEST} does not list {WEIGHTS} and config.json")
    why = verify_files(d, files)
    if why is not None:
        raise DrafterIntegrityError(f"shipped drafter {d} is damaged: {why}{_digests(d, files)}; "
                                    f"restore it (git checkout -- {d}) or ship it again")
    return man


def _digests(d: Path, files: dict) -> str:
    """`` (<file>: SHA-256 <got>, manifest <want>)`` for the first file whose digest differs."""
    for rel, meta in files.items():
        p = d / rel
        if p.is_file() and (got := sha256_file(p)) != meta.get("sha256"):
            return f" ({rel}: SHA-256 {got}, manifest {meta.get('sha256')})"
    return ""


def embedding_sha256(weight: torch.Tensor) -> str:
    """SHA-256 of an embedding matrix ``[V, d]`` as row-major little-endian fp32 bytes (any dtype in;
    the shape is recorded next to it in the manifest)."""
    import hashlib

    a = weight.detach().to("cpu", torch.float32).contiguous().numpy()
    return hashlib.sha256(a.astype("<f4", copy=False).tobytes()).hexdigest()


def checkpoint_tensor(model_dir: str | Path, key: str) -> torch.Tensor | None:
    """One tensor of a Hugging Face safetensors checkpoint directory (single file or sharded with
    ``model.safetensors.index.json``), read without loading the model; ``None`` if it has no ``key``.

    Raises:
        FileNotFoundError: the directory holds no safetensors checkpoint.
    """
    from safetensors import safe_open

    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        fname = json.loads(index.read_text())["weight_map"].get(key)
        if fname is None:
            return None
        path = d / fname
    elif (d / WEIGHTS).is_file():
        path = d / WEIGHTS
    else:
        raise FileNotFoundError(f"{d} holds no safetensors checkpoint ({WEIGHTS} or its index)")
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(key) if key in f.keys() else None


def _weight_key(model: torch.nn.Module, module: torch.nn.Module) -> str:
    """State-dict key of ``module.weight`` (by module identity: a tied head has its own key)."""
    for n, m in model.named_modules(remove_duplicate=False):
        if m is module:
            return f"{n}.weight"
    raise ValueError(f"{type(module).__name__} is not a submodule of the model")


def _shared_keys(model: torch.nn.Module) -> tuple[str, str | None, bool]:
    """``(embedding key, head key or None, tied)`` of a causal LM, e.g.
    ``("model.embed_tokens.weight", "lm_head.weight", True)`` for SmolLM2."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if getattr(head, "weight", None) is None:
        return _weight_key(model, emb), None, False
    return _weight_key(model, emb), _weight_key(model, head), head.weight is emb.weight


def _verifier_tensors(verifier_dir: Path, emb_key: str, head_key: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The verifier's embedding and head (its embedding when its checkpoint stores no head: tied)."""
    emb = checkpoint_tensor(verifier_dir, emb_key)
    if emb is None:
        raise ShipError(f"the verifier checkpoint {verifier_dir} has no tensor {emb_key!r} (not the "
                        f"drafter's model class?)")
    head = checkpoint_tensor(verifier_dir, head_key) if head_key else None
    return emb, (emb if head is None and head_key else head)


def _encode(state: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """bf16, or int8 per-row absmax (``w ~= q * scale[:, None]``) for matrices; vectors stay bf16."""
    out = {}
    for k, v in state.items():
        v = v.detach().to("cpu", torch.float32)
        if dtype == "int8" and v.ndim == 2:
            scale = v.abs().amax(dim=1).clamp_min(1e-12) / 127.0
            out[k] = torch.round(v / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
            out[k + _SCALE] = scale.contiguous()
        else:
            out[k] = v.to(torch.bfloat16).contiguous()
    return out


def _decode(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`_encode`: fp32 tensors by parameter name."""
    out = {}
    for k, v in stored.items():
        if k.endswith(_SCALE):
            continue
        if v.dtype == torch.int8:
            out[k] = v.to(torch.float32) * stored[k + _SCALE].to(torch.float32)[:, None]
        else:
            out[k] = v.to(torch.float32)
    return out


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def ship_drafter(model: torch.nn.Module, dest: str | Path, *, verifier: str, verifier_dir: str | Path,
                 dtype: str = "bf16", draft_vocab: DraftVocab | None = None, training: dict | None = None,
                 source: dict | None = None, include_embedding: bool = False,
                 max_bytes: int = MAX_BYTES) -> dict:
    """Write ``model`` (an HF causal-LM drafter, full head) as the shipped drafter ``dest``; return its manifest.

    Args:
        model: the drafter as exported by training (``AutoModelForCausalLM``; a draft vocabulary is
            passed separately as ``draft_vocab``, not applied to the head).
        dest: the drafter's directory (its name is the directory name); replaced atomically if it
            exists, and the new manifest's ``version`` is the old one's + 1.
        verifier: the verifier's name as :func:`bd_ray.models.load_verifier` takes it (a registered
            name, or a local checkpoint directory, e.g. in tests); ``verifier_dir``: its checkpoint.
        dtype: ``"bf16"`` or ``"int8"`` (matrices per-row absmax int8, vectors bf16).
        training: the training record for the manifest (commands, data, steps, tokens, held-out
            agreement per budget, notes).
        source: where the weights came from (e.g. the export path and its file table).
        include_embedding: ship a trained embedding (else a drafter whose embedding differs from
            the verifier's is refused).
        max_bytes: size limit of all files together (default :data:`MAX_BYTES`).

    Raises:
        ShipError: bad name or dtype, an embedding that differs from the verifier's without
            ``include_embedding``, or files over ``max_bytes`` (``dest`` is then untouched).
    """
    dest = Path(dest)
    if not _NAME.match(dest.name):
        raise ShipError(f"drafter name {dest.name!r}: use letters, digits, '.', '_' and '-'")
    if dtype not in DTYPES:
        raise ShipError(f"dtype {dtype!r}: choose one of {DTYPES}")
    emb_key, head_key, tied = _shared_keys(model)
    v_emb, v_head = _verifier_tensors(Path(verifier_dir), emb_key, None if tied else head_key)
    d_emb = model.get_input_embeddings().weight.detach().to("cpu", torch.float32)
    emb_equal = tuple(d_emb.shape) == tuple(v_emb.shape) and torch.equal(d_emb, v_emb.to(torch.float32))
    if not emb_equal and not include_embedding:
        raise ShipError(
            f"the drafter's embedding {emb_key!r} {tuple(d_emb.shape)} differs from the verifier's "
            f"{tuple(v_emb.shape)} (it was trained): shipping it would break the {_mib(max_bytes)} size "
            f"rule; train with models.freeze_embedding, or pass --include-embedding")
    skip = set() if not emb_equal else {emb_key} | ({head_key} if tied and head_key else set())
    head_from_verifier = False
    if head_key and not tied and v_head is not None:
        d_head = model.get_output_embeddings().weight.detach().to("cpu", torch.float32)
        if tuple(d_head.shape) == tuple(v_head.shape) and torch.equal(d_head, v_head.to(torch.float32)):
            skip.add(head_key)
            head_from_verifier = True
    state = {k: v for k, v in model.state_dict().items() if k not in skip}
    if tied and head_key:  # the same tensor as the embedding: shipped (or not) once, under its key
        state.pop(head_key, None)
    old_version = 0
    if is_shipped_dir(dest):
        try:
            old_version = int(json.loads((dest / MANIFEST).read_text()).get("version", 0))
        except (OSError, ValueError, TypeError):
            old_version = 0

    def build(tmp: str) -> None:
        from safetensors.torch import save_file

        t = Path(tmp)
        save_file(_encode(state, dtype), str(t / WEIGHTS), metadata={"format": "pt", "bd_ray_dtype": dtype})
        cfg = model.config.to_dict()
        cfg.pop("dtype", None)
        cfg.pop("torch_dtype", None)
        atomic_write_json(t / "config.json", cfg, indent=2, sort_keys=True)
        if draft_vocab is not None:
            save_draft_vocab(draft_vocab, t)
        files = file_table(t)
        total = sum(f["size"] for f in files.values())
        if total > max_bytes:
            big = ", ".join(f"{k} {_mib(f['size'])}" for k, f in files.items())
            raise ShipError(f"shipped drafter {dest.name} would be {_mib(total)} ({big}), over the "
                            f"{_mib(max_bytes)} limit; ship --dtype int8, or a drafter with fewer layers")
        manifest.update(files=files)
        atomic_write_json(t / MANIFEST, manifest, indent=2, sort_keys=True)

    manifest: dict[str, Any] = {
        "format": FORMAT,
        "name": dest.name,
        "version": old_version + 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dtype": dtype,
        "quantization": "int8 per-row absmax, fp32 scales (<name>" + _SCALE + ")" if dtype == "int8" else None,
        "parameters": {"shipped": int(sum(v.numel() for v in state.values())),
                       "from_verifier": sorted(skip)},
        "verifier": {"name": verifier, "embedding_key": emb_key, "embedding_shape": list(v_emb.shape),
                     "embedding_sha256": embedding_sha256(v_emb),
                     "head": "tied" if tied else ("verifier" if head_from_verifier else "shipped"),
                     "embedding": "verifier" if emb_equal else "shipped"},
        "draft_vocab": None if draft_vocab is None else {"size": len(draft_vocab), "coverage": draft_vocab.coverage},
        "training": training or {},
        "source": source or {},
    }
    replace_dir(dest, build)
    return json.loads((dest / MANIFEST).read_text())


def build_drafter(d: str | Path, manifest: dict, verifier_dir: str | Path, *, dtype: torch.dtype = torch.float32,
                  attn_implementation: str | None = None, device: str | torch.device | None = None) -> torch.nn.Module:
    """The drafter model of the shipped directory ``d`` (``manifest`` from :func:`read_manifest`),
    its embedding (and tied or unchanged head) taken from the verifier checkpoint ``verifier_dir``.

    Returns the model in ``dtype`` on ``device`` (None = CPU), eval mode, gradients enabled, full
    head (the caller applies the draft vocabulary).

    Raises:
        DrafterIntegrityError: the verifier's embedding is not the one the drafter was shipped with
            (the message names both SHA-256), or the weights do not fit the config.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    d, vdir, vm = Path(d), Path(verifier_dir), manifest["verifier"]
    cfg = AutoConfig.from_pretrained(d, local_files_only=True)
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_config(cfg, **kwargs)
    emb_key, head_key, tied = _shared_keys(model)
    v_emb, v_head = _verifier_tensors(vdir, emb_key, None if tied else head_key)
    got = embedding_sha256(v_emb)
    if got != vm["embedding_sha256"]:
        raise DrafterIntegrityError(
            f"shipped drafter {d.name} was trained with the embedding of verifier {vm['name']!r} "
            f"(SHA-256 {vm['embedding_sha256']}), but {vdir} has {emb_key} with SHA-256 {got}; "
            f"use the verifier it was shipped for")
    state = _decode(load_file(str(d / WEIGHTS)))
    if vm.get("embedding") == "verifier":
        state[emb_key] = v_emb.to(torch.float32)
    if vm.get("head") == "verifier":
        state[head_key] = v_head.to(torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (tied and k == head_key)]
    if missing or unexpected:
        raise DrafterIntegrityError(f"shipped drafter {d.name}: weights do not fit config.json "
                                    f"(missing {missing}, unexpected {unexpected})")
    if tied:
        model.tie_weights()
    model.to(dtype=dtype)
    if device is not None:
        model.to(device)
    model.requires_grad_(True)
    return model.eval()

