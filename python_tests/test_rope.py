"""dpe_rope: every backend against the float64 oracle, plus input validation."""
import pytest
import torch

from conftest import (ATOL, DEVICE, assert_rope_close, compiled_backends, llama_inv_freq, oracle)
import dpe_kernels
from dpe_kernels import DPEConfig, RopeOutput, dpe_rope, rope_reference

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


def test_opcheck_rope_triton():
    if "triton" not in compiled_backends():
        pytest.skip("triton is not installed")
    import dpe_kernels.backends.rope_triton  # noqa: F401  (registers the op)

    torch.library.opcheck(torch.ops.dpe_kernels.rope_triton.default, _op_args())


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
