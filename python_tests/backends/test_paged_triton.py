"""backends/paged_triton.py on its own: split-KV decode, the default number of splits, and the
kernels compiled for sm_80 / sm_90 (the interpreter accepts code compiled Triton rejects). Its
parity over shapes runs in test_paged_attention.py (the ``triton`` backend parameter)."""
import pytest
import torch

from conftest import DEVICE
from test_paged_attention import assert_paged_close, make_case, needs_triton


@needs_triton
@pytest.mark.parametrize("num_splits", [1, 2, 5])
@pytest.mark.parametrize("bs", [16, 32, 8], ids=lambda b: f"bs{b}")
def test_triton_split_kv(num_splits, bs):
    """Split-KV decode (partials merged by lse) equals one program per query
    tile, for pages holding whole tiles (TILE_IN_PAGE) or not (bs 8 < BLOCK_N)."""
    from dpe_kernels.backends.paged_triton import paged_attention_triton

    args = make_case([100, 37, 5], [1, 3, 1], bs=bs, shared=2)
    t_q, h_q = args[0].shape[:2]
    out = torch.empty(t_q, h_q, 16, device=DEVICE)
    lse = torch.empty(t_q, h_q, device=DEVICE)
    paged_attention_triton(*args, 30, 0.25, 3, 100, out, lse, True, num_splits=num_splits)
    assert_paged_close(out, lse, args, 30, softmax_scale=0.25)


@needs_triton
def test_triton_default_splits_decode():
    from dpe_kernels.backends.triton_common import num_kv_splits

    assert num_kv_splits(1, 200, torch.device(DEVICE)) > 1   # one program, a long context: split
    assert num_kv_splits(1000, 200, torch.device(DEVICE)) == 1  # the grid is already full


_COMPILE_SCRIPT = r'''
import json, sys
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import dpe_kernels.backends.paged_triton as tp
import dpe_kernels.backends.triton_common as tu
from dpe_kernels.backends.triton_common import INTERPRETED

assert not INTERPRETED


def compile_one(kernel, const, arch, ptr_types, warps, stages):
    names = kernel.arg_names
    sig, attrs = {}, {}
    for i, n in enumerate(names):
        if n in const:
            sig[n] = "constexpr"
        elif n.endswith("_ptr"):
            sig[n] = ptr_types(n)
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[n] = "fp32" if n == "qk_scale" else "i32"
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()},
                    attrs=attrs)
    c = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=stages))
    return "cubin" in c.asm


res = []
for arch, dt, d, dv, rows, group, page, split in json.loads(sys.argv[1]):
    tdt = getattr(torch, dt)
    bd, bdv = max(16, triton.next_power_of_2(d)), max(16, triton.next_power_of_2(dv))
    bm, bn, warps, stages = tp._block_config(tdt, max(bd, bdv), rows)
    elem = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[dt]
    idx = {"bt_ptr": "*i32", "seq_lens_ptr": "*i32", "qsl_ptr": "*i32"}
    f32 = ("lse_ptr", "po_ptr", "pl_ptr")
    ptr = lambda n: idx.get(n, "*fp32" if n in f32 else "*" + elem)
    const = dict(G=group, HEAD_DIM=d, HEAD_DIM_V=dv, PAGE_SIZE=page, TILE_IN_PAGE=page % bn == 0, SPLIT=split,
                 RETURN_LSE=True, BF16_BY_BITS=False, DOT_PRECISION="ieee" if dt == "float32" else "tf32",
                 BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DV=bdv)
    ok = compile_one(tp._paged_fwd_kernel, const, arch, ptr, warps, stages)
    if split:
        cptr = lambda n: "*fp32" if n in ("po_ptr", "pl_ptr", "lse_ptr") else "*" + elem
        ok = ok and compile_one(tu.combine_splits_kernel, dict(HEAD_DIM_V=dv, RETURN_LSE=True, BF16_BY_BITS=False,
                                                               BLOCK_S=16, BLOCK_DV=bdv), arch, cptr, 4, 1)
    res.append([arch, dt, page, split, ok])
print(json.dumps(res))
'''


def test_triton_kernels_compile_for_gpu():
    """The interpreter accepts code compiled Triton rejects: compile the paged
    kernel (pages holding whole tiles or not, split or not) and the combine
    kernel for sm_90 / sm_80 in a fresh process without TRITON_INTERPRET (no
    GPU needed: ptxas ships with Triton)."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as e:  # pragma: no cover - triton without its NVIDIA backend
        pytest.skip(f"triton's NVIDIA backend is not available: {e}")
    cases = [
        # arch, dtype, D, Dv, rows (max_seqlen_q * G), G, page size, split
        [90, "bfloat16", 64, 64, 3, 3, 16, True],      # decode, pack GQA, pages of 16 < BLOCK_N
        [90, "bfloat16", 64, 64, 3, 3, 128, True],     # decode, pages of whole tiles
        [90, "bfloat16", 128, 128, 4096, 4, 128, False],  # prefill, pages of several tiles
        [80, "float16", 80, 64, 1, 1, 8, True],       # odd head dims, per query head
        [90, "float32", 64, 64, 9, 9, 32, True],      # IEEE fp32 dot
    ]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, json.dumps(cases)], capture_output=True,
                       text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    for arch, dt, page, split, ok in json.loads(r.stdout.strip().splitlines()[-1]):
        assert ok, (arch, dt, page, split)
