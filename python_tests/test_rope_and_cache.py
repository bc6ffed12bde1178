"""dpe_rope with strided / in-place outputs, and dpe_rope_and_cache (rotate and
write into a paged KV cache) for every backend that runs here, against
dpe_rope + indexing and the float64 oracle; check_inputs=False reads no
tensor value on the host; bad input raises naming the argument."""
import pytest
import torch

from conftest import DEVICE, assert_rope_close, compiled_backends, llama_inv_freq
from dpe_kernels import DPEConfig, RopeCacheOutput, dpe_rope, dpe_rope_and_cache, rope_reference

BACKENDS = compiled_backends() + ["reference"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SENTINEL = 7.0


def make_mask(kind, hq, hk, npairs, seed=1):
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
    mask = make_mask(mask_kind, hq, hk, 16)
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
    mask = make_mask(mask_kind, hq, hk, 16)
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
    mask = make_mask(mask_kind, hq, hk, 16)
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
    mask = make_mask("per_q", hq, hk, 16)
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
def _op_args():
    a = _cache_args()
    ps = a["config"].pair_scales(DEVICE)
    mask = make_mask("per_kv", 4, 2, 8)
    q, k = a["q"].clone(), a["k"].clone()
    return (q, k, a["v"].clone(), a["positions"], a["inv_freq"], ps, mask, 4, 16, True,
            torch.tensor([3, -1, 0, 6], device=DEVICE), a["k_cache"].clone(), a["ks_cache"].clone(),
            a["v_cache"].clone(), torch.empty_like(q), torch.empty_like(q))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the CPU extension is needed")
def test_opcheck_rope_and_cache_and_strided_rope_out():
    torch.library.opcheck(torch.ops.dpe_kernels.rope_and_cache.default, _op_args())
    a = _op_args()
    rope_args = (a[0], a[1], a[3], a[4], a[5], a[6], a[7], a[8], a[9])
    outs = tuple(torch.empty(x.shape[0], x.shape[1], x.shape[2] + 3)[..., :x.shape[2]]
                 for x in torch.ops.dpe_kernels.rope(*rope_args))
    torch.library.opcheck(torch.ops.dpe_kernels.rope_out.default, rope_args + outs)


def test_opcheck_triton_out_ops():
    if "triton" not in BACKENDS:
        pytest.skip("triton is not usable here")
    from dpe_kernels.backends import rope_triton

    a = _op_args()
    torch.library.opcheck(torch.ops.dpe_kernels.rope_and_cache_triton.default, a)
    rope_args = (a[0], a[1], a[3], a[4], a[5], a[6], a[7], a[8], a[9])
    outs = tuple(x.clone() for x in rope_triton.rope_triton(*rope_args))
    torch.library.opcheck(torch.ops.dpe_kernels.rope_out_triton.default, rope_args + outs)


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
