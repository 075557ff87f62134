"""Kernels: torch reference vs brute force, Triton kernels vs the torch reference.

Devices: ``BD_RAY_KERNEL_TEST_DEVICES`` (comma list, default ``cpu`` plus ``cuda`` when available).
On ``cuda`` the compiled Triton kernels run (benchmarks/gpu_check.py, part 1, sets ``cuda`` only). On ``cpu``
the Triton code runs in the interpreter, which Triton fixes at *its* import time
(``TRITON_INTERPRET=1`` must be set before ``import triton``: its standard library is decorated
then). So the CPU Triton cases run in-process only when the interpreter is already active (e.g.
``TRITON_INTERPRET=1 pytest tests/test_kernels.py``); otherwise ``test_interpreter_in_subprocess``
re-runs them in a child process with the variable set, without touching this process's
environment. Interpreter shapes are tiny (the interpreter is 300-500x slower than torch).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from bd_ray_kernels import backend_name, chunk_scores, sparse_attention, triton_available
from bd_ray_kernels.reference import (
    chunk_scores_reference,
    sparse_attention_bruteforce,
    sparse_attention_reference,
)


def _devices() -> list[str]:
    env = os.environ.get("BD_RAY_KERNEL_TEST_DEVICES")
    if env:
        return [d.strip() for d in env.split(",") if d.strip()]
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


DEVICES = _devices()


def _interpreter_ready() -> bool:
    if not triton_available():
        return False
    from bd_ray_kernels.sparse_attention import interpreter_active

    return interpreter_active()


def _need_triton(device: str) -> None:
    if device == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        if not triton_available():
            pytest.skip("triton not importable")
        return
    if not _interpreter_ready():
        pytest.skip("Triton interpreter not active in this process; covered by test_interpreter_in_subprocess")


_TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (3e-3, 3e-3), torch.bfloat16: (2e-2, 2e-2)}


def _qkv(b, qh, kvh, n_new, kv_len, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, qh, n_new, d, generator=g)
    k = torch.randn(b, kvh, kv_len, d, generator=g)
    v = torch.randn(b, kvh, kv_len, d, generator=g)
    return (t.to(device=device, dtype=dtype) for t in (q, k, v))


# ---------------------------------------------------------------------------------------------
# torch reference (CPU, fast)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kv_len,n_new,group,lens", [
    (37, 1, 1, None), (37, 5, 3, [37, 20]), (130, 5, 1, [130, 9]), (9, 9, 3, None), (12, 4, 2, [3, 12]),
])
def test_reference_vs_bruteforce(kv_len, n_new, group, lens):
    q, k, v = _qkv(2, 2 * group, 2, n_new, kv_len, 24, torch.float32, "cpu")
    kv_lens = None if lens is None else torch.tensor(lens)
    ref = sparse_attention_reference(q, k, v, kv_lens=kv_lens)
    bf = sparse_attention_bruteforce(q, k, v, kv_lens=kv_lens)
    torch.testing.assert_close(ref, bf, atol=1e-5, rtol=1e-5)
    # a row with L_b < n_new: queries that see nothing output zeros (documented convention)
    if lens is not None and min(lens) < n_new:
        assert torch.all(ref[0, :, : n_new - lens[0]] == 0)


def test_reference_prefill_equals_causal_sdpa():
    q, k, v = _qkv(2, 6, 2, 11, 11, 16, torch.float32, "cpu")
    ref = sparse_attention_reference(q, k, v, scale=0.3)
    sd = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(ref, sd, atol=1e-5, rtol=1e-5)


def test_reference_half_dtypes_and_out():
    q, k, v = _qkv(1, 4, 2, 3, 20, 16, torch.bfloat16, "cpu")
    out = torch.empty(1, 3, 4, 16, dtype=torch.bfloat16).transpose(1, 2)  # [b, n, h, d] buffer
    r = sparse_attention_reference(q, k, v, out=out)
    assert r is out and r.dtype == torch.bfloat16
    torch.testing.assert_close(r.float(), sparse_attention_bruteforce(q.float(), k.float(), v.float()), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("bad,match", [
    (dict(q=(2, 4, 1, 16), k=(2, 3, 10, 16)), "multiple of kv_heads"),
    (dict(q=(2, 4, 1, 16), k=(1, 2, 10, 16)), "k must be"),
    (dict(q=(2, 4, 1, 16), k=(2, 2, 10, 8)), "k must be"),
    (dict(q=(2, 4, 12, 16), k=(2, 2, 10, 16)), "kv_len >= n_new"),
    (dict(q=(4, 1, 16), k=(2, 2, 10, 16)), "q must be"),
])
def test_sparse_attention_shape_errors(bad, match):
    q, k = torch.randn(*bad["q"]), torch.randn(*bad["k"])
    with pytest.raises(ValueError, match=match):
        sparse_attention(q, k, k.clone())
    with pytest.raises(ValueError, match="kv_lens must be"):
        sparse_attention(torch.randn(2, 4, 1, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16),
                         kv_lens=torch.tensor([9]))


def test_chunk_reference_rules():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 3, 45, 16, generator=g)  # 5 full chunks of 8 + a partial one (ignored)
    q = torch.randn(2, 3, 16, generator=g)
    s = chunk_scores_reference(keys, q, 8)
    assert s.shape == (2, 3, 5) and s.dtype == torch.float32
    brute = torch.stack([(keys[:, :, c * 8:(c + 1) * 8].mean(2) * q).sum(-1) for c in range(5)], -1)
    torch.testing.assert_close(s, brute)
    with pytest.raises(ValueError, match="query must be"):
        chunk_scores_reference(keys, q[:, :2], 8)
    with pytest.raises(ValueError, match="num_chunks"):
        chunk_scores_reference(keys, q, 8, num_chunks=6)


def test_dispatch_defaults_to_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("BD_RAY_FORCE_TRITON", raising=False)
    monkeypatch.delenv("BD_RAY_KERNEL_BACKEND", raising=False)
    assert backend_name("cpu") == "torch"
    with pytest.raises(ValueError, match="backend"):
        backend_name("cpu", backend="cuda")


def test_import_does_not_need_triton():
    code = "import sys, bd_ray_kernels as k, torch; k.sparse_attention(*[torch.randn(1,2,1,8)]*3); " \
           "assert 'triton' not in sys.modules, 'triton imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "BD_RAY_FORCE_TRITON": "0", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# Triton kernels vs the reference (interpreter on cpu, compiled on cuda)
# ---------------------------------------------------------------------------------------------
_ATTN_CASES = [  # (kv_len, n_new, group, kv_lens, head_dim, num_splits)
    (37, 1, 1, None, 16, None),
    (37, 5, 3, [37, 22], 24, 1),
    (130, 1, 3, [130, 61], 16, 3),
    (130, 5, 1, [77, 130], 24, 2),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", _ATTN_CASES, ids=lambda c: f"L{c[0]}-n{c[1]}-g{c[2]}-s{c[5]}")
def test_triton_sparse_attention(device, dtype, case):
    _need_triton(device)
    from bd_ray_kernels.sparse_attention import sparse_attention_triton

    kv_len, n_new, group, lens, d, splits = case
    q, k, v = _qkv(2, 2 * group, 2, n_new, kv_len, d, dtype, device, seed=kv_len + n_new)
    kv_lens = None if lens is None else torch.tensor(lens, device=device, dtype=torch.int32)
    ref = sparse_attention_reference(q, k, v, kv_lens=kv_lens)
    out = sparse_attention_triton(q, k, v, kv_lens=kv_lens, num_splits=splits)
    assert out.dtype == dtype and out.shape == q.shape
    atol, rtol = _TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_prefill_strides_and_empty_rows(device):
    _need_triton(device)
    from bd_ray_kernels.sparse_attention import sparse_attention_triton

    # large n_new (prefill, several row blocks), non-contiguous q/k/v, `out` as a transposed view,
    # explicit scale, and a row whose kv_len < n_new (leading queries see nothing -> zeros)
    b, qh, kvh, n, d = 2, 4, 2, 40, 16
    g = torch.Generator().manual_seed(1)
    q = torch.randn(b, n, qh, d, generator=g).to(device).transpose(1, 2)
    k = torch.randn(b, n, kvh, d, generator=g).to(device).transpose(1, 2)
    v = torch.randn(b, kvh, d, n, generator=g).to(device).transpose(2, 3)
    kv_lens = torch.tensor([40, 30], device=device)
    buf = torch.empty(b, n, qh, d, device=device)
    out = sparse_attention_triton(q, k, v, scale=0.2, kv_lens=kv_lens, out=buf.transpose(1, 2), block_m=16)
    ref = sparse_attention_reference(q, k, v, scale=0.2, kv_lens=kv_lens)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    assert torch.all(buf[1, :10] == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("seq,cs,d,num_chunks", [(45, 8, 16, None), (130, 5, 24, 20)])
def test_triton_chunk_scores(device, dtype, seq, cs, d, num_chunks):
    _need_triton(device)
    from bd_ray_kernels.chunk_select import chunk_scores_triton

    g = torch.Generator().manual_seed(seq)
    keys = torch.randn(2, 3, seq, d, generator=g).to(device=device, dtype=dtype)
    q = torch.randn(2, 3, d, generator=g).to(device=device, dtype=dtype)
    ref = chunk_scores_reference(keys, q, cs, num_chunks)
    got = chunk_scores_triton(keys, q, cs, num_chunks)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)



@pytest.mark.parametrize("device", DEVICES)
def test_triton_dispatch(device, monkeypatch):
    _need_triton(device)
    monkeypatch.setenv("BD_RAY_FORCE_TRITON", "1")
    monkeypatch.delenv("BD_RAY_KERNEL_BACKEND", raising=False)
    name = backend_name(device)
    assert name == ("triton" if device == "cuda" else "triton-interpret")
    q, k, v = _qkv(1, 2, 1, 2, 19, 16, torch.float32, device)
    torch.testing.assert_close(sparse_attention(q, k, v), sparse_attention_reference(q, k, v), atol=2e-5, rtol=2e-5)
    keys = torch.randn(1, 2, 32, 16, device=device)
    torch.testing.assert_close(chunk_scores(keys, keys[:, :, -1], 8), chunk_scores_reference(keys, keys[:, :, -1], 8),
                               atol=1e-4, rtol=1e-4)


def test_interpreter_in_subprocess():
    """Runs the CPU Triton cases of this file under TRITON_INTERPRET=1 in a child process."""
    if "cpu" not in DEVICES:
        pytest.skip("cpu not among BD_RAY_KERNEL_TEST_DEVICES")
    if not triton_available():
        pytest.skip("triton not importable")
    if _interpreter_ready():
        pytest.skip("interpreter active here: the Triton cases ran in-process")
    env = {**os.environ, "TRITON_INTERPRET": "1", "BD_RAY_KERNEL_TEST_DEVICES": "cpu", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-x", "-k", "triton", "-p", "no:cacheprovider"],
        capture_output=True, text=True, timeout=300, env=env, cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout.split("\n")[-2], r.stdout[-2000:]


def test_kernels_compile_for_sm90():
    """Without a GPU, at least check that the kernels lower to a Hopper cubin (catches code the
    interpreter accepts but the compiler rejects). Compile only: nothing is launched."""
    if not triton_available():
        pytest.skip("triton not importable")
    if _interpreter_ready():
        pytest.skip("Triton's standard library is in interpreter mode in this process")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        import triton
    except ImportError as e:  # pragma: no cover - depends on the triton build
        pytest.skip(f"triton compiler API unavailable: {e}")
    from triton.runtime.jit import JITFunction

    from bd_ray_kernels import chunk_select as cs
    from bd_ray_kernels import sparse_attention as sa

    def compile_(fn, types, consts):
        jf = JITFunction(fn)
        names = jf.arg_names
        sig = {n: types.get(n, "constexpr" if n in consts else "i32") for n in names}
        cx = {(names.index(n),): v for n, v in consts.items()}
        k = triton.compile(ASTSource(fn=jf, signature=sig, constexprs=cx), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": 4, "num_stages": 2})
        assert "cubin" in k.asm

    ptrs = {"Q": "*fp16", "K": "*fp16", "V": "*fp16", "O": "*fp16", "OP": "*fp32", "LSE": "*fp32",
            "KV_LENS": "*i32", "qk_scale": "fp32"}
    compile_(sa._sparse_attn_fwd, ptrs, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_D=64, HAS_LENS=True, SPLIT=True,
                                             F32_DOT=False))
    compile_(sa._sparse_attn_combine, {"O": "*fp16", "OP": "*fp32", "LSE": "*fp32"}, dict(BLOCK_M=16, BLOCK_D=64))
    compile_(cs._chunk_scores_kernel, {"K": "*bf16", "Q": "*bf16", "S": "*fp32", "inv_cs": "fp32"},
             dict(BLOCK_C=64, BLOCK_D=64))
