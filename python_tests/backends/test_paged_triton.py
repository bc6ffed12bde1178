"""backends/paged_triton.py on its own: split-KV decode (rotated caches and rotate-on-load), the
default number of splits, the cache write, and the kernels compiled for sm_80 / sm_90 (the
interpreter accepts code compiled Triton rejects). Its parity over shapes runs in
test_paged_attention.py and test_paged_attention_rotary.py (the ``triton`` backend parameter)."""
import pytest
import torch

from conftest import DEVICE
from test_paged_attention import assert_paged_close, make_case, needs_triton
import test_paged_attention_rotary as rot


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


@needs_triton
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("bs", [16, 8], ids=lambda b: f"bs{b}")
def test_triton_rotary_split_kv(bs, masked):
    """Rotate-on-load with split-KV decode: every split count gives the float64 oracle's answer
    and the splits agree with one program per query tile. Two configurations (one past its
    window in every split, one whose window spans splits), pages holding whole tiles or not."""
    from dpe_kernels.backends.paged_triton import paged_rotary_triton

    configs = [(20, [1, 2, 3, 8, 8, 16, 5, 7]), (41, [2, 2, 4, 4, 1, 1, 9, 9])]
    kw, _ = rot.make_case([70, 45, 5], [1, 3, 1], bs=bs, configs=configs, masked=masked)
    t_q, h_q = kw["q"].shape[:2]
    got = {}
    for splits in (1, 2, 5):
        out = torch.empty(t_q, h_q, 16, device=DEVICE)
        lse = torch.empty(t_q, h_q, device=DEVICE)
        paged_rotary_triton(kw["q"], kw["k_cache"], kw["v_cache"], kw["block_table"], kw["seq_lens"],
                            kw["query_start_loc"], kw["cos_sin"], kw["pair_scale"], kw["window"],
                            kw["seq_config"], kw["mask"], kw["rotary_dim"], True, 0.25, 3, 70, out, lse,
                            num_splits=splits)
        rot.assert_close_to_oracle(out, lse, {**kw, "softmax_scale": 0.25})
        got[splits] = (out, lse)
    for splits in (2, 5):
        assert (got[splits][0] - got[1][0]).abs().max() < 1e-5
        assert (got[splits][1] - got[1][1]).abs().max() < 1e-5


@needs_triton
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_cache_write(slot_dtype, dtype):
    """cache_write_triton stores each token's k / v at its slot of head-major (strided) caches,
    skips negative slots, and touches nothing else."""
    from dpe_kernels.backends.paged_triton import cache_write_triton

    nb, bs, h_k, d, dv = 5, 8, 3, 16, 8
    # head-major buffers [nb, H_k, bs, D] viewed token-major, as vLLM's CPU layout
    k_cache = torch.full((nb, h_k, bs, d), 7.0, dtype=dtype, device=DEVICE).transpose(1, 2)
    v_cache = torch.full((nb, h_k, bs, dv), 7.0, dtype=dtype, device=DEVICE).transpose(1, 2)
    slots = [3, -1, 8 * 4 + 7, 17, -5, 0]
    k = torch.randn(len(slots), h_k, d, dtype=dtype, device=DEVICE)
    v = torch.randn(len(slots), h_k, 2 * dv, dtype=dtype, device=DEVICE)[..., :dv]  # strided rows
    want_k, want_v = k_cache.clone(), v_cache.clone()
    for t, sl in enumerate(slots):
        if sl >= 0:
            want_k[sl // bs, sl % bs] = k[t]
            want_v[sl // bs, sl % bs] = v[t]
    cache_write_triton(k, v, torch.tensor(slots, dtype=slot_dtype, device=DEVICE), k_cache, v_cache)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


@needs_triton
def test_triton_cache_write_then_rotary_attention():
    """The engine path: unrotated keys written by cache_write_triton, then read and rotated by the
    rotary kernel, equal the oracle over the caches the write produced."""
    from dpe_kernels import dpe_paged_attention_rotary
    from dpe_kernels.backends.paged_triton import cache_write_triton

    kw, _ = rot.make_case([30, 9], [1, 9], bs=8, masked=True, configs=[(6, [1, 2, 2, 4, 4, 8, 8, 16])])
    bt, bs = kw["block_table"], kw["k_cache"].shape[1]
    # rewrite every token of both sequences through the slot mapping (plus padding slots)
    slots, ks, vs = [], [], []
    for b, n in enumerate(kw["seq_lens"].tolist()):
        for i in range(n):
            slots.append(int(bt[b, i // bs]) * bs + i % bs)
        slots.append(-1)
    k_new = torch.randn(len(slots), *kw["k_cache"].shape[2:], device=DEVICE)
    v_new = torch.randn(len(slots), *kw["v_cache"].shape[2:], device=DEVICE)
    cache_write_triton(k_new, v_new, torch.tensor(slots, device=DEVICE), kw["k_cache"], kw["v_cache"])
    sl = torch.tensor([s for s in slots if s >= 0])
    assert torch.equal(kw["k_cache"][sl // bs, sl % bs], k_new[torch.tensor(slots) >= 0])
    out, lse = dpe_paged_attention_rotary(**kw, backend="triton", return_lse=True)
    rot.assert_close_to_oracle(out, lse, kw)


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
cases, writes = json.loads(sys.argv[1])
for arch, dt, d, dv, rows, group, page, split, rot in cases:
    # rot: None (rotated caches) or [has_mask, neox, rotary_dim]
    tdt = getattr(torch, dt)
    bd, bdv = max(16, triton.next_power_of_2(d)), max(16, triton.next_power_of_2(dv))
    bm, bn, warps, stages = tp._block_config(tdt, max(bd, bdv), rows)
    elem = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[dt]
    idx = {"bt_ptr": "*i32", "seq_lens_ptr": "*i32", "qsl_ptr": "*i32", "cs_ptr": "*fp32", "cfg_ptr": "*i64",
           "ps_ptr": "*i64", "win_ptr": "*i64", "mask_ptr": "*u8"}
    f32 = ("lse_ptr", "po_ptr", "pl_ptr")
    ptr = lambda n: idx.get(n, "*fp32" if n in f32 else "*" + elem)
    const = dict(G=group, HEAD_DIM=d, HEAD_DIM_V=dv, PAGE_SIZE=page, TILE_IN_PAGE=page % bn == 0, SPLIT=split,
                 RETURN_LSE=True, BF16_BY_BITS=False, DOT_PRECISION="ieee" if dt == "float32" else "tf32",
                 BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DV=bdv, ROTARY=rot is not None,
                 HAS_MASK=bool(rot and rot[0]), IS_NEOX=bool(rot[1]) if rot else True,
                 ROT_DIM=rot[2] if rot else 2)
    ok = compile_one(tp._paged_fwd_kernel, const, arch, ptr, warps, stages)
    if split:
        cptr = lambda n: "*fp32" if n in ("po_ptr", "pl_ptr", "lse_ptr") else "*" + elem
        ok = ok and compile_one(tu.combine_splits_kernel, dict(HEAD_DIM_V=dv, RETURN_LSE=True, BF16_BY_BITS=False,
                                                               BLOCK_S=16, BLOCK_DV=bdv), arch, cptr, 4, 1)
    res.append([arch, dt, page, split, rot, ok])
for arch, dt, h, d, dv, page in writes:
    elem = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[dt]
    wptr = lambda n: "*i64" if n == "slot_ptr" else "*" + elem
    const = dict(PAGE_SIZE=page, HEAD_DIM=d, HEAD_DIM_V=dv, BLOCK_H=triton.next_power_of_2(h),
                 BLOCK_D=triton.next_power_of_2(d), BLOCK_DV=triton.next_power_of_2(dv))
    res.append([arch, dt, page, "cache_write", None, compile_one(tp._cache_write_kernel, const, arch, wptr, 4, 1)])
print(json.dumps(res))
'''


def test_triton_kernels_compile_for_gpu():
    """The interpreter accepts code compiled Triton rejects: compile the paged
    kernel (pages holding whole tiles or not, split or not; rotated caches and
    rotate-on-load with mask / no mask, neox / gptj, f16 / bf16 / f32, full and
    partial rotary), the combine kernel and the cache write for sm_90 / sm_80 in
    a fresh process without TRITON_INTERPRET (no GPU needed: ptxas ships with Triton)."""
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
    cases = [c + [None] for c in cases]
    cases += [
        # rotate on load: [has_mask, neox, rotary_dim]
        [90, "bfloat16", 128, 128, 4, 4, 16, True, [False, True, 128]],   # decode, pack GQA, neox
        [90, "float16", 64, 64, 1, 1, 16, True, [True, False, 64]],       # decode, per-head mask, gptj
        [80, "bfloat16", 128, 128, 4096, 1, 128, False, [True, True, 64]],  # prefill, mask, partial rotary
        [80, "float16", 80, 64, 8, 8, 32, True, [False, False, 32]],      # odd head dim, gptj, partial
        [90, "float32", 64, 64, 2, 1, 16, True, [True, True, 64]],        # IEEE fp32 dot
    ]
    writes = [[90, "bfloat16", 8, 128, 128, 16], [80, "float16", 3, 80, 64, 32]]  # arch, dtype, H_k, D, Dv, page
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, json.dumps([cases, writes])], capture_output=True,
                       text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(res) == len(cases) + len(writes)
    for arch, dt, page, split, rot_flags, ok in res:
        assert ok, (arch, dt, page, split, rot_flags)
