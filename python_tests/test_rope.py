"""dpe_kernels/rope.py: dpe_rope for every backend against the float64 oracle (fixed cases and a
Hypothesis fuzz of shapes, strides, positions and configs), strided and in-place outputs,
dpe_rope_and_cache (rotate and write into a paged KV cache) against dpe_rope + indexing and the
oracle, check_inputs=False reading no tensor value on the host, the torch.library ops, and bad
input raising with the argument's name. The Triton-only op checks: backends/test_rope_triton.py."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import (ATOL, DEVICE, assert_rope_close, compiled_backends, llama_inv_freq, oracle)
import dpe_kernels
from dpe_kernels import DPEConfig, RopeCacheOutput, RopeOutput, dpe_rope, dpe_rope_and_cache, rope_reference

BACKENDS = compiled_backends() + ["reference"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PAPER_SCALES = [4, 4, 2, 16, 32, 32, 16, 128]


def make_inputs(tokens, hq, hk, d, dtype, *, batch=None, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    lead = (tokens,) if batch is None else (batch, tokens)
    q = torch.randn(*lead, hq, d, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(*lead, hk, d, generator=g).to(device=device, dtype=dtype)
    return q, k


def make_mask(kind, hq, hk, npairs, seed=1, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    if kind is None:
        return None
    rows = hq if kind == "per_q" else hk
    return (torch.rand(rows, npairs, generator=g) > 0.3).to(device)


def run_and_check(backend, q, k, pos, inv, cfg, mask=None, layout="neox", rotary_dim=None):
    # Positions from 2^24 on are refused by the default check (float32 rounds them): the parity
    # tests that go there say so with check_inputs=False.
    big = bool((pos >= dpe_kernels.MAX_EXACT_POSITION).any())
    out = dpe_rope(q, k, pos, inv, cfg, mask, layout=layout, rotary_dim=rotary_dim, backend=backend,
                   check_inputs=not big)
    assert isinstance(out, RopeOutput)
    assert_rope_close(out, q, k, pos, inv, cfg, mask, layout, rotary_dim)
    return out


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["neox", "gptj"])
@pytest.mark.parametrize("mask_kind", [None, "per_q", "per_kv"])
def test_parity_gqa(backend, dtype, layout, mask_kind):
    hq, hk, d = 8, 2, 64
    q, k = make_inputs(37, hq, hk, d, dtype)
    pos = torch.randint(0, 2**20, (37,), device=DEVICE)
    cfg = DPEConfig.uniform(1024, PAPER_SCALES, d // 2)
    mask = make_mask(mask_kind, hq, hk, d // 2)
    out = run_and_check(backend, q, k, pos, llama_inv_freq(d), cfg, mask, layout)
    want_ks_heads = hq if mask_kind == "per_q" else hk
    assert out.k_scaled.shape == (37, want_ks_heads, d)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["neox", "gptj"])
def test_partial_rotary_and_odd_shapes(backend, layout):
    # D = 40, rotary_dim = 24 -> 12 pairs in uneven groups; window not divisible by scales.
    hq, hk, d, rd = 6, 3, 40, 24
    q, k = make_inputs(19, hq, hk, d, torch.float32)
    pos = torch.arange(19, device=DEVICE) * 997 + 5
    cfg = DPEConfig(window=100, group_boundaries=(0, 1, 5, 12), scales=(3, 1, 7))
    for mask_kind in (None, "per_q"):
        mask = make_mask(mask_kind, hq, hk, rd // 2)
        out = run_and_check(backend, q, k, pos, llama_inv_freq(rd), cfg, mask, layout, rd)
        for x, y in ((q, out.q_normal), (q, out.q_scaled), (k, out.k_normal)):
            assert torch.equal(y[..., rd:], x[..., rd:])  # pass-through dims copied exactly


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_pos", [2**20, 2**24])
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64])
def test_large_positions(backend, max_pos, pos_dtype):
    hq, hk, d = 4, 4, 128
    q, k = make_inputs(33, hq, hk, d, torch.float32)
    pos = torch.cat([torch.tensor([max_pos, max_pos - 1, 0]),
                     torch.randint(max_pos // 2, max_pos, (30,))]).to(DEVICE, pos_dtype)
    cfg = DPEConfig.uniform(1024, PAPER_SCALES, d // 2)
    run_and_check(backend, q, k, pos, llama_inv_freq(d, base=500000.0), cfg, make_mask("per_kv", hq, hk, 64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_and_int64_positions_agree(backend):
    q, k = make_inputs(25, 4, 2, 32, torch.float16)
    pos = torch.randint(0, 2**24, (25,), device=DEVICE)
    cfg = DPEConfig.uniform(64, [3, 5], 16)
    a = dpe_rope(q, k, pos, llama_inv_freq(32), cfg, backend=backend)
    b = dpe_rope(q, k, pos.int(), llama_inv_freq(32), cfg, backend=backend)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_views_of_packed_qkv(backend, dtype):
    # qkv: (T, H_q + 2 H_k, D); q and k are views with token stride (H_q + 2 H_k) * D.
    t, hq, hk, d = 23, 8, 2, 64
    qkv = torch.randn(t, hq + 2 * hk, d).to(DEVICE, dtype)
    q, k = qkv[:, :hq], qkv[:, hq:hq + hk]
    assert not q.is_contiguous() and not k.is_contiguous()
    pos = torch.randint(0, 50000, (t,), device=DEVICE)
    cfg = DPEConfig.uniform(512, PAPER_SCALES, d // 2)
    mask = make_mask("per_q", hq, hk, d // 2)
    out = run_and_check(backend, q, k, pos, llama_inv_freq(d), cfg, mask)
    contiguous = dpe_rope(q.contiguous(), k.contiguous(), pos, llama_inv_freq(d), cfg, mask, backend=backend)
    for x, y in zip(out, contiguous):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pos_batch", [3, 1])
def test_batched_layout(backend, pos_batch):
    b, s, hq, hk, d = 3, 11, 4, 2, 32
    q, k = make_inputs(s, hq, hk, d, torch.float32, batch=b)
    # Transposed storage: (B, H, S, D) viewed as (B, S, H, D).
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    pos = torch.randint(0, 10000, (pos_batch, s), device=DEVICE)
    cfg = DPEConfig.uniform(16, [2, 8], d // 2)
    out = run_and_check(backend, q, k, pos, llama_inv_freq(d), cfg, make_mask("per_kv", hq, hk, d // 2))
    assert out.q_normal.shape == (b, s, hq, d)
    # Each batch row equals the packed call on that row.
    for i in range(b):
        row = dpe_rope(q[i], k[i], pos[min(i, pos_batch - 1)], llama_inv_freq(d), cfg,
                       make_mask("per_kv", hq, hk, d // 2), backend=backend)
        for x, y in zip(out, row):
            assert torch.equal(x[i], y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_input(backend):
    q, k = make_inputs(0, 4, 2, 16, torch.float32)
    cfg = DPEConfig.uniform(8, [2], 8)
    out = dpe_rope(q, k, torch.zeros(0, dtype=torch.long, device=DEVICE), llama_inv_freq(16), cfg,
                   backend=backend)
    assert [tuple(x.shape) for x in out] == [(0, 4, 16), (0, 2, 16), (0, 4, 16), (0, 2, 16)]


# ----------------------------------------------------------------------------- semantics
def test_semantics_inside_window_equals_plain_rope():
    """Normal outputs are plain RoPE; scale 1 everywhere makes scaled == normal."""
    q, k = make_inputs(16, 2, 2, 16, torch.float32)
    pos = torch.arange(16, device=DEVICE) * 1000
    inv = llama_inv_freq(16)
    out = dpe_rope(q, k, pos, inv, DPEConfig.uniform(4, [1, 1], 8))
    assert torch.equal(out.q_normal, out.q_scaled) and torch.equal(out.k_normal, out.k_scaled)
    # plain RoPE by hand (neox)
    ang = pos.float()[:, None] * inv
    c, s = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]
    x1, x2 = q.chunk(2, -1)
    torch.testing.assert_close(out.q_normal, q * c + torch.cat([-x2, x1], -1) * s, atol=1e-5, rtol=0)


def test_semantics_remapped_indices():
    """A key dimension's scaled query/key equal plain RoPE at m // s + w - w // s and m // s."""
    w, s = 10, 3
    q, k = make_inputs(5, 1, 1, 4, torch.float32)
    pos = torch.tensor([0, 9, 10, 11, 1000], device=DEVICE)
    inv = llama_inv_freq(4)
    cfg = DPEConfig(window=w, group_boundaries=(0, 2), scales=(s,))
    got = dpe_rope(q, k, pos, inv, cfg)
    plain = DPEConfig(window=w, group_boundaries=(0, 2), scales=(1,))
    want_q = dpe_rope(q, k, pos // s + (w - w // s), inv, plain).q_normal
    want_k = dpe_rope(q, k, pos // s, inv, plain).k_normal
    torch.testing.assert_close(got.q_scaled, want_q, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.k_scaled, want_k, atol=1e-6, rtol=0)


def test_mask_false_keeps_original_positions():
    q, k = make_inputs(7, 4, 2, 16, torch.float32)
    pos = torch.randint(0, 10**6, (7,), device=DEVICE)
    cfg = DPEConfig.uniform(32, [4, 16], 8)
    none = torch.zeros(4, 8, dtype=torch.bool, device=DEVICE)
    out = dpe_rope(q, k, pos, llama_inv_freq(16), cfg, none)
    assert torch.equal(out.q_scaled, out.q_normal)
    assert torch.equal(out.k_scaled, out.k_normal.repeat_interleave(2, dim=1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_buffers(backend):
    q, k = make_inputs(9, 4, 2, 32, torch.float32)
    pos = torch.arange(9, device=DEVICE) * 77
    cfg = DPEConfig.uniform(16, [2, 4], 16)
    mask = make_mask("per_q", 4, 2, 16)
    want = dpe_rope(q, k, pos, llama_inv_freq(32), cfg, mask, backend=backend)
    bufs = tuple(torch.full_like(x, float("nan")) for x in want)
    got = dpe_rope(q, k, pos, llama_inv_freq(32), cfg, mask, backend=backend, out=bufs)
    for x, y, b in zip(got, want, bufs):
        assert x is b and torch.equal(x, y)


def test_layer_selects_config_mask():
    q, k = make_inputs(6, 4, 2, 16, torch.float32)
    pos = torch.arange(6, device=DEVICE) * 5000
    masks = torch.rand(3, 4, 8, device=DEVICE) > 0.5
    cfg = DPEConfig.uniform(32, [4, 16], 8, mask=masks)
    a = dpe_rope(q, k, pos, llama_inv_freq(16), cfg, layer=1)
    b = dpe_rope(q, k, pos, llama_inv_freq(16), cfg.with_mask(None), masks[1])
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# ----------------------------------------------------------------------------- torch.library
def _op_args(mask_kind="per_q"):
    q, k = make_inputs(5, 4, 2, 16, torch.float32)
    pos = torch.arange(5, device=DEVICE) * 100
    cfg = DPEConfig.uniform(8, [2, 3], 8)
    return (q, k, pos, llama_inv_freq(16), cfg.pair_scales(DEVICE), make_mask(mask_kind, 4, 2, 8), 8, 16, True)


@pytest.mark.parametrize("mask_kind", [None, "per_q"])
def test_opcheck_rope(mask_kind):
    args = _op_args(mask_kind)
    torch.library.opcheck(torch.ops.dpe_kernels.rope.default, args)
    outs = tuple(x.clone() for x in torch.ops.dpe_kernels.rope(*args))
    torch.library.opcheck(torch.ops.dpe_kernels.rope_out.default, args + outs)


def test_torch_compile_traces_without_graph_break():
    q, k = make_inputs(8, 4, 2, 16, torch.float32)
    pos = torch.arange(8, device=DEVICE) * 3
    cfg = DPEConfig.uniform(4, [2, 3], 8)
    mask = make_mask("per_q", 4, 2, 8)
    inv = llama_inv_freq(16)

    def f(q, k, pos):
        return dpe_rope(q, k, pos, inv, cfg, mask)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    for x, y in zip(compiled(q, k, pos), f(q, k, pos)):
        assert torch.equal(x, y)


# ----------------------------------------------------------------------------- bad input
def _good():
    q, k = make_inputs(4, 4, 2, 16, torch.float32)
    return dict(q=q, k=k, positions=torch.arange(4, device=DEVICE), inv_freq=llama_inv_freq(16),
                config=DPEConfig.uniform(8, [2, 3], 8))


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (lambda a: a.update(q=a["q"].double(), k=a["k"].double()), TypeError, "q must be float32"),
        (lambda a: a.update(q=a["q"].long()), TypeError, "q must be"),
        (lambda a: a.update(k=a["k"].half()), TypeError, "k must have the dtype"),
        (lambda a: a.update(q=[1, 2]), TypeError, "q must be a torch.Tensor"),
        (lambda a: a.update(k=a["k"][:, :1].expand(4, 3, 16)), ValueError, "multiple"),
        (lambda a: a.update(k=a["k"][..., :8]), ValueError, "head_dim"),
        (lambda a: a.update(k=a["k"][:3]), ValueError, "token dims"),
        (lambda a: a.update(q=a["q"][0]), ValueError, r"\[T, H_q, D\]"),
        (lambda a: a.update(q=a["q"].transpose(0, 2).contiguous().transpose(0, 2)), ValueError, "stride 1"),
        (lambda a: a.update(rotary_dim=7), ValueError, "rotary_dim"),
        (lambda a: a.update(rotary_dim=18), ValueError, "rotary_dim"),
        (lambda a: a.update(rotary_dim=8.0), TypeError, "rotary_dim"),
        (lambda a: a.update(positions=a["positions"].float()), TypeError, "positions must be int32 or int64"),
        (lambda a: a.update(positions=a["positions"] - 2), ValueError, "non-negative"),
        (lambda a: a.update(positions=a["positions"][:3]), ValueError, "positions must be"),
        (lambda a: a.update(positions=a["positions"].to("meta")), ValueError, "positions must be on the device"),
        (lambda a: a.update(inv_freq=a["inv_freq"].double()), TypeError, "inv_freq"),
        (lambda a: a.update(inv_freq=a["inv_freq"][:4]), ValueError, "inv_freq"),
        (lambda a: a.update(config=DPEConfig.uniform(8, [2, 3], 6)), ValueError, "group_boundaries must cover"),
        (lambda a: a.update(config={"window": 8}), TypeError, "config must be a DPEConfig"),
        (lambda a: a.update(mask=torch.ones(3, 8, dtype=torch.bool)), ValueError, "mask must be"),
        (lambda a: a.update(mask=torch.ones(4, 7, dtype=torch.bool)), ValueError, "mask must be"),
        (lambda a: a.update(mask=torch.ones(4, 8)), TypeError, "mask must be a bool"),
        (lambda a: a.update(layout="llama"), ValueError, "layout"),
        (lambda a: a.update(backend="fast"), ValueError, "backend"),
        (lambda a: a.update(layer=0), ValueError, "no mask"),
        (lambda a: a.update(out=(1, 2)), TypeError, "out must be"),
        (lambda a: a.update(q=a["q"].requires_grad_()), ValueError, "inference-only"),
    ],
)
def test_bad_input_raises(change, exc, match):
    args = _good()
    change(args)
    with pytest.raises(exc, match=match):
        dpe_rope(**args)


def test_backend_unavailable_is_clear():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="backend='cuda' is not available"):
        dpe_rope(**_good(), backend="cuda")


def test_out_with_wrong_shape_or_aliasing():
    a = _good()
    want = dpe_rope(**a)
    bad = list(x.clone() for x in want)
    bad[3] = torch.empty(4, 4, 16)
    with pytest.raises(ValueError, match="out.k_scaled"):
        dpe_rope(**a, out=tuple(bad))
    # q_normal may be q itself (in place); q_scaled may not, nor a q_normal view of q with other strides.
    alias = (want[0].clone(), want[1].clone(), a["q"], want[3].clone())
    with pytest.raises(ValueError, match="out.q_scaled overlaps the memory of q"):
        dpe_rope(**a, out=alias)
    other = a["q"].as_strided(a["q"].shape, (16, 64, 1))
    with pytest.raises(ValueError, match="in place needs out.q_normal to be q itself"):
        dpe_rope(**a, out=(other, want[1].clone(), want[2].clone(), want[3].clone()))


def test_requires_grad_accepted_under_no_grad():
    a = _good()
    a["q"].requires_grad_()
    with torch.no_grad():
        out = dpe_rope(**a)
    assert not any(x.requires_grad for x in out)


def test_direct_op_call_with_bad_shapes_raises_not_crashes():
    q, k, pos, inv, ps, mask, w, rd, neox = _op_args()
    with pytest.raises(ValueError, match="mask"):
        torch.ops.dpe_kernels.rope(q, k, pos, inv, ps, mask[:, :3].contiguous(), w, rd, neox)
    with pytest.raises(ValueError, match="rotary_dim"):
        torch.ops.dpe_kernels.rope(q, k, pos, inv, ps, mask, w, 15, neox)
    with pytest.raises(ValueError, match="pair_scale"):
        torch.ops.dpe_kernels.rope(q, k, pos, inv, ps[:3], mask, w, rd, neox)
    with pytest.raises(TypeError, match="positions"):
        torch.ops.dpe_kernels.rope(q, k, pos.float(), inv, ps, mask, w, rd, neox)


def test_reference_float32_error_is_small():
    """Sanity of the tolerance rule: the float32 reference itself is close to float64."""
    q, k = make_inputs(64, 4, 4, 128, torch.float32)
    pos = torch.randint(0, 2**24, (64,), device=DEVICE)
    cfg = DPEConfig.uniform(1024, PAPER_SCALES, 64)
    inv = llama_inv_freq(128, base=500000.0)
    ref = rope_reference(q, k, pos, inv, cfg)
    for r, o in zip(ref, oracle(q, k, pos, inv, cfg)):
        assert (r.double() - o).abs().max().item() < 10 * ATOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", [None, "per_q"])
def test_nonfinite_inputs_propagate_like_reference(backend, dtype, mask_kind):
    """NaN and inf in q/k give NaN/inf exactly where the reference has them
    (the CPU kernel's branch-free half/bfloat16 rounding must keep NaN a NaN)."""
    q, k = make_inputs(8, 4, 2, 32, dtype)
    q[1, 0, 3] = float("nan")
    q[2, 1, 20] = float("inf")
    k[3, 1, 5] = float("nan")
    k[4, 0, 17] = float("-inf")
    pos = torch.arange(8, device=DEVICE) * 1000
    cfg = DPEConfig.uniform(4, [2, 8], 16)
    inv = llama_inv_freq(32)
    mask = make_mask(mask_kind, 4, 2, 16)
    got = dpe_rope(q, k, pos, inv, cfg, mask, backend=backend)
    ref = rope_reference(q, k, pos, inv, cfg, mask)
    for name, g, r in zip(RopeOutput._fields, got, ref):
        assert torch.equal(g.isnan(), r.isnan()), f"{name}: NaN pattern differs"
        assert torch.equal(g.isinf(), r.isinf()), f"{name}: inf pattern differs"


def test_extension_sources_have_distinct_object_names():
    """torch's ninja build names objects by source stem: csrc/rope.cpp and csrc/rope.cu would both
    become rope.o and the CUDA build fails (it did once, on the first GPU machine)."""
    import re
    from pathlib import Path

    setup = (Path(__file__).resolve().parent.parent / "setup.py").read_text()
    sources = re.findall(r'"(csrc/[\w/]+\.(?:cpp|cu))"', setup)
    assert "csrc/rope.cpp" in sources and any(s.endswith(".cu") for s in sources)
    stems = [Path(s).with_suffix("").as_posix() for s in sources]
    assert len(stems) == len(set(stems)), f"two sources build the same object: {sources}"


# ============================================================ strided and in-place outputs, dpe_rope_and_cache
SENTINEL = 7.0


def make_cache_mask(kind, hq, hk, npairs, seed=1):
    if kind is None:
        return None
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(hq if kind == "per_q" else hk, npairs, generator=g) > 0.4).to(DEVICE)


def packed_qkv(t, hq, hk, d, dv, dtype, seed=0):
    """q, k, v as views of one packed [T, (H_q + H_k) D + H_k D_v + 3] row buffer (the layout of a
    fused qkv projection, plus padding), and the buffer."""
    g = torch.Generator().manual_seed(seed)
    buf = torch.randn(t, (hq + hk) * d + hk * dv + 3, generator=g).to(DEVICE, dtype)
    q = buf[:, : hq * d].view(t, hq, d)
    k = buf[:, hq * d:(hq + hk) * d].view(t, hk, d)
    v = buf[:, (hq + hk) * d:(hq + hk) * d + hk * dv].view(t, hk, dv)
    return q, k, v, buf


def positions_for(t):
    # inside the window, around it, and far past 2^20
    base = torch.tensor([0, 1, 2, 5, 9, 31, 1 << 20, (1 << 20) + 3, 3_000_000, 9_999_991])
    return base.repeat((t + len(base) - 1) // len(base))[:t].to(DEVICE)


CFG = DPEConfig(window=6, group_boundaries=(0, 4, 8, 12, 16), scales=(1, 2, 4, 16))


# ----------------------------------------------------------------------------- strided outputs
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", [None, "per_q", "per_kv"])
def test_strided_outputs_are_views_into_larger_buffers(backend, dtype, mask_kind):
    t, hq, hk, d = 11, 8, 2, 40  # partial rotary: 32 of 40 dims
    q, k, _, _ = packed_qkv(t, hq, hk, d, d, dtype)
    pos, inv = positions_for(t), llama_inv_freq(32)
    mask = make_cache_mask(mask_kind, hq, hk, 16)
    hks = hk if mask is None else mask.shape[0]
    want = dpe_rope(q, k, pos, inv, CFG, mask, rotary_dim=32, backend=backend)
    assert_rope_close(want, q, k, pos, inv, CFG, mask, rotary_dim=32)
    full = lambda *shape: torch.full(shape, SENTINEL, dtype=dtype, device=DEVICE)  # noqa: E731
    bufs = [full(t, hq, d + 5), full(hk, t, d), full(2 * t, hq, d), full(t + 2, hks + 1, d + 3)]
    def carve(b):  # the four views, of the outputs' buffers or of same-shape marker buffers
        return [b[0][..., 2:d + 2],                 # padded head_dim
                b[1].transpose(0, 1),               # head-major
                b[2][1::2],                         # every other token
                b[3][1:t + 1, 1:, :d]]              # a window of a larger cache-like buffer

    views = carve(bufs)
    marks = [torch.zeros_like(b, dtype=torch.bool) for b in bufs]
    for m in carve(marks):
        m.fill_(True)
    got = dpe_rope(q, k, pos, inv, CFG, mask, rotary_dim=32, backend=backend, out=tuple(views))
    for name, g, v, w, b, m in zip(want._fields, got, views, want, bufs, marks):
        assert g is v, f"{name}: not the given view"
        assert torch.equal(v, w), f"{name}: differs from the allocated result"
        assert (b[~m] == SENTINEL).all(), f"{name}: elements outside the view were written"


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_outputs_batched(backend):
    b, s, hq, hk, d = 2, 5, 4, 2, 16
    g = torch.Generator().manual_seed(3)
    q = torch.randn(b, s, hq, d, generator=g).to(DEVICE)
    k = torch.randn(b, s, hk, d, generator=g).to(DEVICE)
    pos = torch.arange(s, device=DEVICE)[None] * 1000
    cfg = DPEConfig.uniform(4, [2, 8], 8)
    want = dpe_rope(q, k, pos, llama_inv_freq(16), cfg, backend=backend)
    bufs = [torch.full((s, b, h, d + 1), SENTINEL, device=DEVICE) for h in (hq, hk, hq, hk)]
    views = tuple(x.transpose(0, 1)[..., :d] for x in bufs)  # batch-minor, padded head_dim
    dpe_rope(q, k, pos, llama_inv_freq(16), cfg, backend=backend, out=views)
    for w, v, x in zip(want, views, bufs):
        assert torch.equal(v, w)
        assert (x[..., d] == SENTINEL).all()


# ----------------------------------------------------------------------------- in place
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["neox", "gptj"])
@pytest.mark.parametrize("mask_kind", [None, "per_q", "per_kv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_equals_out_of_place(backend, layout, mask_kind, dtype):
    t, hq, hk, d = 9, 8, 2, 40
    q, k, _, buf = packed_qkv(t, hq, hk, d, d, dtype)
    pos, inv = positions_for(t), llama_inv_freq(32)
    mask = make_cache_mask(mask_kind, hq, hk, 16)
    want = dpe_rope(q, k, pos, inv, CFG, mask, layout=layout, rotary_dim=32, backend=backend)
    before = buf.clone()
    got = dpe_rope(q, k, pos, inv, CFG, mask, layout=layout, rotary_dim=32, backend=backend, inplace=True)
    assert got.q_normal is q and got.k_normal is k
    for name, g, w in zip(want._fields, got, want):
        assert torch.equal(g, w), f"{name}: in place differs from out of place"
    # q and k columns were overwritten; the v columns and the padding were not
    assert torch.equal(buf[:, (hq + hk) * d:], before[:, (hq + hk) * d:]), "v / padding changed"
    assert not torch.equal(buf[:, :hq * d], before[:, :hq * d]), "q was not rotated in place"


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_through_out(backend):
    t, hq, hk, d = 6, 4, 4, 16
    q, k, _, _ = packed_qkv(t, hq, hk, d, d, torch.float32)
    pos, inv, cfg = positions_for(t), llama_inv_freq(16), DPEConfig.uniform(4, [2, 8], 8)
    want = dpe_rope(q, k, pos, inv, cfg, backend=backend)
    qs, ks = torch.empty_like(want.q_scaled), torch.empty_like(want.k_scaled)
    got = dpe_rope(q, k, pos, inv, cfg, backend=backend, out=(q, k, qs, ks))
    assert got.q_normal is q and got.q_scaled is qs
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_inplace_out_must_be_the_inputs():
    t, hq, hk, d = 4, 4, 2, 16
    q, k, _, _ = packed_qkv(t, hq, hk, d, d, torch.float32)
    pos, inv, cfg = positions_for(t), llama_inv_freq(16), DPEConfig.uniform(4, [2, 8], 8)
    with pytest.raises(ValueError, match="out.q_normal must be None or that input itself"):
        dpe_rope(q, k, pos, inv, cfg, inplace=True, out=(q.clone(), None, None, None))
    with pytest.raises(TypeError, match="inplace must be a bool"):
        dpe_rope(q, k, pos, inv, cfg, inplace=1)
    got = dpe_rope(q, k, pos, inv, cfg, inplace=True, out=(None, k, torch.empty(t, hq, d), torch.empty(t, hk, d)))
    assert got.q_normal is q and got.k_normal is k


# ----------------------------------------------------------------------------- rope_and_cache
def cache_views(nb, bs, hk, hks, d, dv, dtype):
    """vLLM-like pages: per block one contiguous run holding head-major planes
    k [H_k, bs, D] | ks [H_ks, bs, D] | v [H_k, bs, D_v], viewed as strided
    [nb, bs, H, D] caches (no copy), as dpe_kernels.integrations.vllm does."""
    n_k, n_s, n_v = hk * bs * d, hks * bs * d, hk * bs * dv
    page = torch.full((nb, n_k + n_s + n_v), SENTINEL, dtype=dtype, device=DEVICE)

    def plane(lo, heads, width):
        return page[:, lo:lo + heads * bs * width].view(nb, heads, bs, width).transpose(1, 2)

    return page, plane(0, hk, d), plane(n_k, hks, d), plane(n_k + n_s, hk, dv)


SLOTS = [5, -1, 0, 19, 7, 12, -1, 3, 16, -1, 9]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["neox", "gptj"])
@pytest.mark.parametrize("mask_kind", [None, "per_q", "per_kv"])
def test_rope_and_cache_equals_rope_plus_indexing(backend, dtype, layout, mask_kind):
    t, hq, hk, d, dv, nb, bs = len(SLOTS), 8, 2, 40, 24, 5, 4
    q, k, v, buf = packed_qkv(t, hq, hk, d, dv, dtype)
    pos, inv = positions_for(t), llama_inv_freq(32)
    mask = make_cache_mask(mask_kind, hq, hk, 16)
    hks = hk if mask is None else mask.shape[0]
    slots = torch.tensor(SLOTS, device=DEVICE)
    page, kc, ksc, vc = cache_views(nb, bs, hk, hks, d, dv, dtype)
    before = buf.clone()

    got = dpe_rope_and_cache(q, k, v, pos, inv, CFG, kc, ksc, vc, slots, mask=mask, layout=layout,
                             rotary_dim=32, backend=backend)
    assert isinstance(got, RopeCacheOutput)
    want = dpe_rope(q, k, pos, inv, CFG, mask, layout=layout, rotary_dim=32, backend=backend)
    assert_rope_close(want, q, k, pos, inv, CFG, mask, layout, 32)
    assert torch.equal(got.q_normal, want.q_normal) and torch.equal(got.q_scaled, want.q_scaled)
    written = torch.zeros(nb, bs, dtype=torch.bool, device=DEVICE)
    for i, s in enumerate(SLOTS):
        if s < 0:
            continue
        blk, off = divmod(s, bs)
        written[blk, off] = True
        assert torch.equal(kc[blk, off], want.k_normal[i]), f"k_cache slot {s}"
        assert torch.equal(ksc[blk, off], want.k_scaled[i]), f"ks_cache slot {s}"
        assert torch.equal(vc[blk, off], v[i]), f"v_cache slot {s}"
    for cache in (kc, ksc, vc):  # skipped tokens (-1) and unused slots: untouched
        assert (cache[~written] == SENTINEL).all()
    assert torch.equal(buf, before), "the inputs were modified"


@pytest.mark.parametrize("backend", BACKENDS)
def test_rope_and_cache_q_in_place_and_out(backend):
    t, hq, hk, d, nb, bs = len(SLOTS), 4, 2, 16, 5, 4
    q, k, v, _ = packed_qkv(t, hq, hk, d, d, torch.float32)
    pos, inv, cfg = positions_for(t), llama_inv_freq(16), DPEConfig.uniform(4, [2, 8], 8)
    slots = torch.tensor(SLOTS, device=DEVICE)
    want = dpe_rope(q, k, pos, inv, cfg, backend=backend)
    _, kc, ksc, vc = cache_views(nb, bs, hk, hk, d, d, torch.float32)
    qs_buf = torch.full((t, hq, d + 2), SENTINEL, device=DEVICE)
    got = dpe_rope_and_cache(q, k, v, pos, inv, cfg, kc, ksc, vc, slots, backend=backend,
                             out=(q, qs_buf[..., 1:d + 1]))
    assert got.q_normal is q
    assert torch.equal(q, want.q_normal) and torch.equal(got.q_scaled, want.q_scaled)
    assert (qs_buf[..., 0] == SENTINEL).all() and (qs_buf[..., d + 1] == SENTINEL).all()
    assert torch.equal(kc[1, 1], want.k_normal[0])  # slot 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_rope_and_cache_all_slots_skipped_and_empty(backend):
    t, hq, hk, d = 3, 4, 2, 16
    q, k, v, _ = packed_qkv(t, hq, hk, d, d, torch.float32)
    pos, inv, cfg = positions_for(t), llama_inv_freq(16), DPEConfig.uniform(4, [2, 8], 8)
    page, kc, ksc, vc = cache_views(2, 4, hk, hk, d, d, torch.float32)
    got = dpe_rope_and_cache(q, k, v, pos, inv, cfg, kc, ksc, vc, torch.full((t,), -1, device=DEVICE),
                             backend=backend)
    assert (page == SENTINEL).all()
    assert torch.equal(got.q_normal, dpe_rope(q, k, pos, inv, cfg, backend=backend).q_normal)
    e = dpe_rope_and_cache(q[:0], k[:0], v[:0], pos[:0], inv, cfg, kc, ksc, vc,
                           torch.zeros(0, dtype=torch.long, device=DEVICE), backend=backend)
    assert e.q_normal.shape == (0, hq, d) and (page == SENTINEL).all()


def test_rope_and_cache_layer_mask():
    t, hq, hk, d = 4, 4, 2, 16
    q, k, v, _ = packed_qkv(t, hq, hk, d, d, torch.float32)
    masks = torch.rand(3, hq, 8, device=DEVICE) > 0.5
    cfg = DPEConfig.uniform(4, [2, 8], 8, mask=masks)
    pos, inv, slots = positions_for(t), llama_inv_freq(16), torch.arange(t, device=DEVICE)
    _, kc, ksc, vc = cache_views(1, 4, hk, hq, d, d, torch.float32)
    got = dpe_rope_and_cache(q, k, v, pos, inv, cfg, kc, ksc, vc, slots, layer=2)
    want = dpe_rope(q, k, pos, inv, cfg, layer=2)
    assert torch.equal(got.q_scaled, want.q_scaled) and torch.equal(ksc[0], want.k_scaled)


# ----------------------------------------------------------------------------- no host reads
def _forbid_host_reads(monkeypatch):
    def boom(self, *a, **kw):
        raise AssertionError("a tensor value was read on the host")

    for attr in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, attr, boom)


@pytest.mark.parametrize("backend", BACKENDS)
def test_check_inputs_false_reads_no_tensor_value_on_the_host(backend, monkeypatch):
    t, hq, hk, d = len(SLOTS), 8, 2, 32
    q, k, v, _ = packed_qkv(t, hq, hk, d, d, torch.bfloat16)
    pos, inv = positions_for(t), llama_inv_freq(32)
    cfg = DPEConfig.uniform(8, [2, 4, 8, 16], 16)
    mask = make_cache_mask("per_q", hq, hk, 16)
    slots = torch.tensor(SLOTS, device=DEVICE)
    _, kc, ksc, vc = cache_views(5, 4, hk, hq, d, d, torch.bfloat16)
    want = dpe_rope_and_cache(q, k, v, pos, inv, cfg, kc, ksc, vc, slots, mask=mask, backend=backend)
    outs = tuple(torch.empty_like(x) for x in dpe_rope(q, k, pos, inv, cfg, mask, backend=backend))
    _forbid_host_reads(monkeypatch)
    # Control: the default checks do read values, so the patch catches reads.
    with pytest.raises(AssertionError, match="read on the host"):
        dpe_rope(q, k, pos, inv, cfg, mask, backend=backend)
    with pytest.raises(AssertionError, match="read on the host"):
        dpe_rope_and_cache(q, k, v, pos, inv, cfg, kc, ksc, vc, slots, mask=mask, backend=backend)
    got = dpe_rope_and_cache(q, k, v, pos, inv, cfg, kc, ksc, vc, slots, mask=mask, backend=backend,
                             check_inputs=False)
    dpe_rope(q, k, pos, inv, cfg, mask, backend=backend, check_inputs=False, out=outs)
    dpe_rope(q, k, pos, inv, cfg, mask, backend=backend, check_inputs=False)
    monkeypatch.undo()
    assert torch.equal(got.q_normal, want.q_normal) and torch.equal(got.q_scaled, want.q_scaled)
    assert torch.equal(outs[3], dpe_rope(q, k, pos, inv, cfg, mask, backend=backend).k_scaled)


# ----------------------------------------------------------------------------- bad input
def _cache_args():
    t, hq, hk, d = 4, 4, 2, 16
    q, k, v, _ = packed_qkv(t, hq, hk, d, d, torch.float32)
    _, kc, ksc, vc = cache_views(2, 4, hk, hk, d, d, torch.float32)
    return dict(q=q, k=k, v=v, positions=positions_for(t), inv_freq=llama_inv_freq(16),
                config=DPEConfig.uniform(4, [2, 8], 8), k_cache=kc, ks_cache=ksc, v_cache=vc,
                slot_mapping=torch.arange(t, device=DEVICE))


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (lambda a: a.update(q=a["q"][None]), ValueError, r"q must be \[T, H_q, D\]"),
        (lambda a: a.update(v=a["v"][:3]), ValueError, "v must be"),
        (lambda a: a.update(v=a["v"].double()), TypeError, "v must have the dtype"),
        (lambda a: a.update(v=[1]), TypeError, "v must be a torch.Tensor"),
        (lambda a: a.update(v=a["v"].transpose(0, 2).contiguous().transpose(0, 2)), ValueError, "v must have stride 1"),
        (lambda a: a.update(slot_mapping=a["slot_mapping"].int()), TypeError, "slot_mapping must be int64"),
        (lambda a: a.update(slot_mapping=a["slot_mapping"][:2]), ValueError, r"slot_mapping must be \[T\]"),
        (lambda a: a.update(slot_mapping=a["slot_mapping"] + 5), ValueError, "slot_mapping must be <"),
        (lambda a: a.update(slot_mapping=a["slot_mapping"] * 0), ValueError, "must not repeat a slot"),
        (lambda a: a.update(k_cache=a["k_cache"][0]), ValueError, "k_cache must be"),
        (lambda a: a.update(k_cache=a["k_cache"].half()), TypeError, "k_cache must have the dtype"),
        (lambda a: a.update(ks_cache=a["ks_cache"][:, :, :1]), ValueError, "ks_cache must have shape"),
        (lambda a: a.update(v_cache=a["v_cache"][..., :8]), ValueError, "v_cache must have shape"),
        (lambda a: a.update(v_cache=a["v_cache"].transpose(2, 3).contiguous().transpose(2, 3)), ValueError,
         "v_cache must have stride 1"),
        (lambda a: a.update(k_cache=a["k"].view(1, 4, 2, 16), ks_cache=torch.zeros(1, 4, 2, 16, device=DEVICE),
                            v_cache=torch.zeros(1, 4, 2, 16, device=DEVICE)), ValueError,
         "k_cache overlaps the memory of (q|k)"),  # k interleaves with q in the packed buffer
        (lambda a: a.update(ks_cache=a["k_cache"]), ValueError, "ks_cache and k_cache are the same memory"),
        (lambda a: a.update(mask=torch.ones(4, 8, dtype=torch.bool, device=DEVICE)), ValueError,
         "ks_cache must have shape"),
        (lambda a: a.update(out=(a["q"],)), TypeError, r"out must be a tuple \(q_normal, q_scaled\)"),
        (lambda a: a.update(out=(torch.empty(4, 4, 16), a["q"])), ValueError, "out.q_scaled overlaps the memory of q"),
        (lambda a: a.update(out=(torch.empty(4, 4, 8), torch.empty(4, 4, 16))), ValueError, "out.q_normal must have shape"),
        (lambda a: a.update(positions=a["positions"] - 1), ValueError, "non-negative"),
        (lambda a: a.update(check_inputs=0), TypeError, "check_inputs must be a bool"),
        (lambda a: a.update(backend="fast"), ValueError, "backend"),
        (lambda a: a.update(v=a["v"].requires_grad_()), ValueError, "inference-only"),
    ],
)
def test_rope_and_cache_bad_input_raises(change, exc, match):
    args = _cache_args()
    change(args)
    with pytest.raises(exc, match=match):
        dpe_rope_and_cache(**args)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the CPU extension is needed")
def test_cpu_kernel_refuses_out_of_range_slot_even_unchecked():
    """check_inputs=False skips the Python value checks; the CPU kernel reads
    the slots anyway and refuses one outside the cache (never writes it)."""
    a = _cache_args()
    a["slot_mapping"] = torch.tensor([0, 1, 2, 8], device=DEVICE)
    page_before = a["k_cache"].clone()
    with pytest.raises(ValueError, match="slot_mapping: a slot is >= num_blocks"):
        dpe_rope_and_cache(**a, backend="cpu", check_inputs=False)
    assert torch.equal(a["k_cache"], page_before)


# ----------------------------------------------------------------------------- torch.library
def _cache_op_args():
    a = _cache_args()
    ps = a["config"].pair_scales(DEVICE)
    mask = make_cache_mask("per_kv", 4, 2, 8)
    q, k = a["q"].clone(), a["k"].clone()
    return (q, k, a["v"].clone(), a["positions"], a["inv_freq"], ps, mask, 4, 16, True,
            torch.tensor([3, -1, 0, 6], device=DEVICE), a["k_cache"].clone(), a["ks_cache"].clone(),
            a["v_cache"].clone(), torch.empty_like(q), torch.empty_like(q))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the CPU extension is needed")
def test_opcheck_rope_and_cache_and_strided_rope_out():
    torch.library.opcheck(torch.ops.dpe_kernels.rope_and_cache.default, _cache_op_args())
    a = _cache_op_args()
    rope_args = (a[0], a[1], a[3], a[4], a[5], a[6], a[7], a[8], a[9])
    outs = tuple(torch.empty(x.shape[0], x.shape[1], x.shape[2] + 3)[..., :x.shape[2]]
                 for x in torch.ops.dpe_kernels.rope(*rope_args))
    torch.library.opcheck(torch.ops.dpe_kernels.rope_out.default, rope_args + outs)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the CPU extension is needed")
def test_torch_compile_rope_and_cache_without_graph_break():
    a = _cache_args()
    a["slot_mapping"] = torch.tensor([2, -1, 0, 5], device=DEVICE)
    kc0, ksc0, vc0 = (a[n].clone() for n in ("k_cache", "ks_cache", "v_cache"))

    def f(q, k, v, pos, kc, ksc, vc, slots):
        return dpe_rope_and_cache(q, k, v, pos, a["inv_freq"], a["config"], kc, ksc, vc, slots,
                                  check_inputs=False)

    want = f(a["q"], a["k"], a["v"], a["positions"], kc0, ksc0, vc0, a["slot_mapping"])
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = compiled(a["q"], a["k"], a["v"], a["positions"], a["k_cache"], a["ks_cache"], a["v_cache"],
                   a["slot_mapping"])
    for x, y in zip(got, want):
        assert torch.equal(x, y)
    for x, y in ((a["k_cache"], kc0), (a["ks_cache"], ksc0), (a["v_cache"], vc0)):
        assert torch.equal(x, y), "the compiled call did not write the caches like eager"


def test_reference_rope_and_cache_matches_oracle_rows():
    """The reference backend's cache rows are the float64 oracle's rows rounded once."""
    t, hq, hk, d = len(SLOTS), 4, 2, 16
    q, k, v, _ = packed_qkv(t, hq, hk, d, d, torch.float32)
    pos, inv, cfg = positions_for(t), llama_inv_freq(16), DPEConfig.uniform(4, [2, 8], 8)
    _, kc, ksc, vc = cache_views(5, 4, hk, hk, d, d, torch.float32)
    dpe_rope_and_cache(q, k, v, pos, inv, cfg, kc, ksc, vc, torch.tensor(SLOTS, device=DEVICE),
                       backend="reference")
    ref64 = rope_reference(q.double(), k.double(), pos, inv, cfg, compute_dtype=torch.float64)
    for i, s in enumerate(SLOTS):
        if s >= 0:
            blk, off = divmod(s, 4)
            assert (kc[blk, off].double() - ref64[1][i]).abs().max() < 1e-5
            assert (ksc[blk, off].double() - ref64[3][i]).abs().max() < 1e-5


# ----------------------------------------------------------------------------- fuzz (Hypothesis)
@st.composite
def rope_case(draw):
    hk = draw(st.integers(1, 4))
    hq = hk * draw(st.integers(1, 4))
    d = 2 * draw(st.integers(1, 40))
    rotary_dim = 2 * draw(st.integers(1, d // 2))
    npairs = rotary_dim // 2
    ngroups = draw(st.integers(1, min(npairs, 8)))
    inner = sorted(draw(st.sets(st.integers(1, npairs - 1), min_size=ngroups - 1, max_size=ngroups - 1))) \
        if npairs > 1 else []
    bounds = (0, *inner, npairs)
    scales = tuple(draw(st.lists(st.integers(1, 200), min_size=len(bounds) - 1, max_size=len(bounds) - 1)))
    window = draw(st.integers(1, 5000))
    batched = draw(st.booleans())
    b = draw(st.integers(1, 3)) if batched else None
    s = draw(st.integers(0, 9))
    max_pos = draw(st.sampled_from([16, 5000, 2**20, 2**24, 2**28]))
    return dict(
        hq=hq, hk=hk, d=d, rotary_dim=rotary_dim, bounds=bounds, scales=scales, window=window,
        b=b, s=s, max_pos=max_pos,
        packed_qkv=draw(st.booleans()),
        pos_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
        dtype=draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16])),
        layout=draw(st.sampled_from(["neox", "gptj"])),
        mask_kind=draw(st.sampled_from([None, "per_q", "per_kv"])),
        base=draw(st.sampled_from([10000.0, 500000.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def build(case):
    g = torch.Generator().manual_seed(case["seed"])
    hq, hk, d = case["hq"], case["hk"], case["d"]
    lead = (case["s"],) if case["b"] is None else (case["b"], case["s"])
    if case["packed_qkv"]:  # q, k as strided views of one (..., H_q + 2 H_k, D) buffer
        qkv = torch.randn(*lead, hq + 2 * hk, d, generator=g)
        q, k = qkv[..., :hq, :], qkv[..., hq:hq + hk, :]
    else:
        q, k = torch.randn(*lead, hq, d, generator=g), torch.randn(*lead, hk, d, generator=g)
    q, k = q.to(DEVICE, case["dtype"]), k.to(DEVICE, case["dtype"])
    pos_shape = lead
    pos = torch.randint(0, case["max_pos"], pos_shape, generator=g).to(DEVICE, case["pos_dtype"])
    cfg = DPEConfig(case["window"], case["bounds"], case["scales"])
    mask = None
    if case["mask_kind"]:
        rows = hq if case["mask_kind"] == "per_q" else hk
        mask = (torch.rand(rows, case["rotary_dim"] // 2, generator=g) > 0.4).to(DEVICE)
    inv = llama_inv_freq(case["rotary_dim"], base=case["base"])
    return q, k, pos, inv, cfg, mask


@pytest.mark.parametrize("backend", compiled_backends())
def test_fuzz_against_oracle(backend):
    examples = 60 if backend != "triton" or DEVICE == "cuda" else 25  # the interpreter is slow

    @settings(max_examples=examples, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(rope_case())
    def check(case):
        q, k, pos, inv, cfg, mask = build(case)
        out = dpe_rope(q, k, pos, inv, cfg, mask, layout=case["layout"], rotary_dim=case["rotary_dim"],
                       backend=backend, check_inputs=case["max_pos"] <= (1 << 24))
        assert_rope_close(out, q, k, pos, inv, cfg, mask, case["layout"], case["rotary_dim"])

    check()


# ----------------------------------------------------------------------------- position limits
def _rope_args(positions):
    q = torch.randn(len(positions), 2, 8)
    k = torch.randn(len(positions), 1, 8)
    inv = 1.0 / (10000.0 ** (torch.arange(4, dtype=torch.float32) / 4))
    return q, k, torch.tensor(positions, dtype=torch.int64), inv, DPEConfig.uniform(4, [2, 2], 4)


def test_positions_at_2_pow_24_are_refused_by_default():
    q, k, pos, inv, cfg = _rope_args([0, (1 << 24) - 1])
    dpe_rope(q, k, pos, inv, cfg)  # the last exact position is fine
    q, k, pos, inv, cfg = _rope_args([0, 1 << 24])
    with pytest.raises(ValueError, match=r"2\^24"):
        dpe_rope(q, k, pos, inv, cfg)
    # check_inputs=False rotates them, rounded as float32(position) (HF's angle)
    q, k, pos, inv, cfg = _rope_args([1 << 24, (1 << 24) + 1])
    out = dpe_rope(q[:1].expand(2, -1, -1).contiguous(), k[:1].expand(2, -1, -1).contiguous(), pos, inv, cfg,
                   check_inputs=False, backend="reference")
    assert torch.equal(out.q_normal[0], out.q_normal[1])  # 2^24 + 1 rounds to 2^24 in float32


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inv_freq_is_refused(bad):
    q, k, pos, inv, cfg = _rope_args([0, 1, 2])
    inv[1] = bad
    with pytest.raises(ValueError, match="inv_freq must be finite"):
        dpe_rope(q, k, pos, inv, cfg)
