"""DPEKVCache and decoding: the rotate-once cache gives the authors' re-rotating decode.

Most equivalence checks use power-of-two frequencies: ``float32(position) *
2^-e`` is exact, so the rotate-once path (angles at absolute positions) and
the re-rotate path (angles at relative distances) see exact angles and must
agree to float64 rounding; this isolates the algebra (rotations compose,
floor-division indices, masks, GQA) from the float32 angle rounding that any
RoPE at absolute positions has. One test uses real Llama frequencies at
positions past 2^16 and bounds the difference by that angle rounding.
"""
import pytest
import torch

from conftest import ATOL, llama_inv_freq, tolerance
from dpe_kernels import DPEConfig, rope_reference
from dpe_kernels.attention import dpe_attention
from dpe_kernels.cache import DPEKVCache, dpe_attention_step
from dpe_kernels.reference import decode_rerotate_reference

F64 = torch.float64


# ----------------------------------------------------------------------------- helpers
def pow2_inv_freq(npairs):
    """Frequencies 2^0 .. 2^-13 (the span of base 10000): exact float32 angles for positions < 2^24."""
    return 2.0 ** -(torch.arange(npairs, dtype=torch.float32) * 14 // npairs)


def make_cfg(npairs, window):
    # Scale 1 (a group that never changes), non-powers of two, window not divisible by the scales.
    return DPEConfig(window=window, group_boundaries=(0, npairs // 4, npairs // 2, 3 * npairs // 4, npairs),
                     scales=(2, 1, 3, 8))


def make_mask(kind, hq, hk, npairs, seed=1):
    if kind is None:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.rand(hq if kind == "per_q" else hk, npairs, generator=g) > 0.3


def make_qkv(b, s, hq, hk, d, dtype, seed=0, dv=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s, hq, d, generator=g, dtype=F64).to(dtype)
    k = torch.randn(b, s, hk, d, generator=g, dtype=F64).to(dtype)
    v = torch.randn(b, s, hk, dv or d, generator=g, dtype=F64).to(dtype)
    return q, k, v


def brute_dpe(q_n, q_s, k_n, k_s, v, window, scale=None):
    """float64 brute force of docs/method.md, "Attention" (bottom-right causal), for checking the reference."""
    b, sq, hq, d = q_n.shape
    sk = k_n.shape[1]
    scale = d ** -0.5 if scale is None else scale
    kn = k_n.repeat_interleave(hq // k_n.shape[2], 2)
    ks = k_s.repeat_interleave(hq // k_s.shape[2], 2)
    vv = v.repeat_interleave(hq // v.shape[2], 2)
    ln = torch.einsum("bqhd,bkhd->bhqk", q_n, kn)
    ls = torch.einsum("bqhd,bkhd->bhqk", q_s, ks)
    dist = (sk - sq + torch.arange(sq))[:, None] - torch.arange(sk)[None]
    logits = torch.where(dist < window, ln, ls).mul(scale).masked_fill(dist < 0, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), vv)


def rope64(q, k, positions, inv, cfg, mask):
    return rope_reference(q.to(F64), k.to(F64), positions, inv, cfg, mask, compute_dtype=F64)


def assert_rule(got, want64, ref_same_dtype, what=""):
    """conftest's rule: error vs float64 <= 2 x (same-dtype reference error) + ATOL[dtype]."""
    err = (got.to(F64) - want64).abs().max().item()
    if got.dtype == F64:
        assert err <= 1e-10, f"{what}: float64 error {err:.3g}"
        return
    base = (ref_same_dtype.to(F64) - want64).abs().max().item()
    bound = tolerance(got.dtype, base)
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g} (reference error {base:.3g})"


class CachePath:
    """Rotate-once decoding: float64 via rope_reference + reference attention (exact algebra);
    float32 via the public dpe_attention_step with the default (compiled) backends."""

    def __init__(self, dtype, inv, cfg, mask, num_layers=1, layer=0, initial_capacity=4):
        self.dtype, self.inv, self.cfg, self.mask, self.layer = dtype, inv, cfg, mask, layer
        self.cache = DPEKVCache(num_layers, initial_capacity=initial_capacity)

    def step(self, q, k, v, positions, key_padding_mask=None):
        if self.dtype == F64:
            q_n, k_n, q_s, k_s = rope64(q, k, positions, self.inv, self.cfg, self.mask)
            k_n, k_s, v = self.cache.update(self.layer, k_n, k_s, v)
            return dpe_attention(q_n, q_s, k_n, k_s, v, self.cfg.window, key_padding_mask=key_padding_mask,
                                 backend="reference")
        return dpe_attention_step(q, k, v, positions, self.inv, self.cfg, self.cache, self.layer, self.mask,
                                  key_padding_mask=key_padding_mask)


# ----------------------------------------------------------------------------- the oracle itself
@pytest.mark.parametrize("mask_kind", [None, "per_q", "per_kv"])
@pytest.mark.parametrize("heads", [(4, 2), (3, 3)])
@pytest.mark.parametrize("offset", [0, 70_001])
@pytest.mark.parametrize("layout", ["neox", "gptj"])
def test_rerotate_reference_equals_rotate_once_formula(mask_kind, heads, offset, layout):
    """decode_rerotate_reference (authors) == the formula of docs/method.md on keys/queries rotated at absolute positions."""
    hq, hk = heads
    d, w = 16, 5
    cfg, inv = make_cfg(d // 2, w), pow2_inv_freq(d // 2)
    mask = make_mask(mask_kind, hq, hk, d // 2)
    q, k, v = make_qkv(2, 23, hq, hk, d, F64)
    for s_k in (1, 4, 5, 6, 11, 23):  # shorter than, at, and well beyond the window
        pos = offset + torch.arange(s_k)[None]
        q_n, k_n, q_s, k_s = rope_reference(q[:, :s_k], k[:, :s_k], pos, inv, cfg, mask, layout=layout,
                                            compute_dtype=F64)
        want = brute_dpe(q_n[:, -1:], q_s[:, -1:], k_n, k_s, v[:, :s_k], w)
        got = decode_rerotate_reference(q[:, s_k - 1:s_k], k[:, :s_k], v[:, :s_k], offset + s_k - 1, inv, cfg,
                                        mask, layout=layout)
        torch.testing.assert_close(got, want, atol=1e-11, rtol=0)


def test_rerotate_reference_partial_rotary_and_padding():
    d, rd, hq, hk, w = 12, 8, 2, 1, 3
    cfg, inv = make_cfg(rd // 2, w), pow2_inv_freq(rd // 2)
    q, k, v = make_qkv(1, 9, hq, hk, d, F64, dv=5)
    pos = torch.arange(9)[None] + 100
    q_n, k_n, q_s, k_s = rope_reference(q, k, pos, inv, cfg, None, rotary_dim=rd, compute_dtype=F64)
    want = brute_dpe(q_n[:, -1:], q_s[:, -1:], k_n, k_s, v, w)
    got = decode_rerotate_reference(q[:, -1:], k, v, 108, inv, cfg, rotary_dim=rd)
    torch.testing.assert_close(got, want, atol=1e-11, rtol=0)
    # Per-row positions: a left-padded row (position 4 of 9 keys) ignores its first 4 keys.
    got2 = decode_rerotate_reference(q[:, -1:].expand(2, -1, -1, -1), k.expand(2, -1, -1, -1),
                                     v.expand(2, -1, -1, -1), torch.tensor([8, 4]), inv, cfg, rotary_dim=rd)
    alone = decode_rerotate_reference(q[:, -1:], k[:, 4:], v[:, 4:], 4, inv, cfg, rotary_dim=rd)
    torch.testing.assert_close(got2[1:], alone, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------- cache == re-rotate decode
@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("mask_kind", [None, "per_q", "per_kv"])
@pytest.mark.parametrize("heads", [(8, 2), (4, 4)])
@pytest.mark.parametrize("offset", [0, 70_001])
def test_cache_decode_equals_rerotate(dtype, mask_kind, heads, offset):
    """Prefill P tokens into the cache, then decode steps past 2w: each equals the authors' decode."""
    hq, hk = heads
    d, w, prompt, steps = 32, 6, 7, 9
    cfg, inv = make_cfg(d // 2, w), pow2_inv_freq(d // 2)
    mask = make_mask(mask_kind, hq, hk, d // 2)
    q, k, v = make_qkv(1, prompt + steps, hq, hk, d, dtype)
    path = CachePath(dtype, inv, cfg, mask, initial_capacity=4)
    path.step(q[:, :prompt], k[:, :prompt], v[:, :prompt], offset + torch.arange(prompt)[None])
    for t in range(prompt, prompt + steps):
        got = path.step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], torch.tensor([[offset + t]]))
        assert got.shape == (1, 1, hq, d) and got.dtype == dtype
        assert path.cache.get_seq_length() == t + 1
        kw = dict(inv_freq=inv, config=cfg, mask=mask)
        want64 = decode_rerotate_reference(q[:, t:t + 1].to(F64), k[:, :t + 1].to(F64), v[:, :t + 1].to(F64),
                                           offset + t, **kw)
        ref = decode_rerotate_reference(q[:, t:t + 1], k[:, :t + 1], v[:, :t + 1], offset + t, **kw)
        assert_rule(got, want64, ref, f"step at position {offset + t}")
    assert path.cache.get_capacity() == 28  # 4 (initial) -> 7 (prompt) -> 14 -> 28 (doubling)


def test_cache_decode_config_mask_by_layer():
    """dpe_attention_step takes this layer's mask from config.mask [layers, H, P] by cache layer."""
    hq, hk, d, w = 4, 2, 16, 4
    inv = pow2_inv_freq(d // 2)
    layer_masks = torch.rand(3, hq, d // 2, generator=torch.Generator().manual_seed(3)) > 0.5
    cfg = make_cfg(d // 2, w).with_mask(layer_masks)
    q, k, v = make_qkv(1, 12, hq, hk, d, torch.float32)
    cache = DPEKVCache(3)
    dpe_attention_step(q[:, :8], k[:, :8], v[:, :8], None, inv, cfg, cache, 2)
    assert cache.get_seq_length(2) == 8 and cache.get_seq_length(0) == 0
    for t in range(8, 12):
        got = dpe_attention_step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], None, inv, cfg, cache, 2)
        want64 = decode_rerotate_reference(q[:, t:t + 1].double(), k[:, :t + 1].double(), v[:, :t + 1].double(),
                                           t, inv, cfg.with_mask(None), layer_masks[2])
        ref = decode_rerotate_reference(q[:, t:t + 1], k[:, :t + 1], v[:, :t + 1], t, inv, cfg.with_mask(None),
                                        layer_masks[2])
        assert_rule(got, want64, ref, f"step {t}")


def test_cache_decode_real_frequencies_past_2_16():
    """Llama frequencies at positions past 2^16. (1) The cache path matches the float64 rotate-once
    oracle (angles float32(position) * inv_freq as HF forms them) by the tolerance rule. (2) That
    oracle differs from the authors' re-rotating decode only through the float32 rounding of the
    absolute angles (plain HF RoPE has the same), within its first-order bound."""
    hq, hk, d, w, offset = 8, 2, 64, 16, 2**16 + 777
    cfg, inv = DPEConfig.uniform(w, [4, 4, 2, 16, 32, 32, 16, 128], d // 2), llama_inv_freq(d, device="cpu")
    mask = make_mask("per_q", hq, hk, d // 2)
    q, k, v = make_qkv(1, 40, hq, hk, d, torch.float32)
    pos = offset + torch.arange(40)[None]
    path = CachePath(torch.float32, inv, cfg, mask)
    path.step(q[:, :30], k[:, :30], v[:, :30], pos[:, :30])
    scale = d ** -0.5
    # Angle error per pair, any index <= offset + 40 + w, query and key: half an ulp of the float32
    # product (<= |angle| 2^-24) plus cos/sin rounding. A logit moves by <= scale sum_i |q_i||k_i| e_i,
    # the softmax output by <= 2 max|v| max|logit change|.
    e = 2 * (((offset + 40 + w) * inv.double()) * 2.0**-24 + 2.0**-23)
    pair = lambda x: torch.cat([x[..., : d // 2, None], x[..., d // 2:, None]], -1).norm(dim=-1).double()
    for t in range(30, 40):
        got = path.step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], pos[:, t:t + 1])
        want64, ref = (x[:, -1:] for x in _prefill_oracles(q[:, :t + 1], k[:, :t + 1], v[:, :t + 1],
                                                           pos[:, :t + 1], inv, cfg, mask))
        assert_rule(got, want64, ref, f"step {t}")
        authors64 = decode_rerotate_reference(q[:, t:t + 1].double(), k[:, :t + 1].double(),
                                              v[:, :t + 1].double(), offset + t, inv, cfg, mask)
        kp = pair(k[0, :t + 1]).repeat_interleave(hq // hk, 1)          # [S, H_q, P]
        dlogit = scale * (pair(q[0, t])[None] * kp * e).sum(-1).max().item()
        gap = (want64 - authors64).abs().max().item()
        assert gap <= 2 * v[0, :t + 1].abs().max().item() * dlogit, (t, gap, dlogit)


# ----------------------------------------------------------------------------- prefill == decode, chunks
def _prefill_oracles(q, k, v, positions, inv, cfg, mask):
    """Full prefill: float64 (oracle) and same-dtype reference (rope_reference + reference attention)."""
    q_n, k_n, q_s, k_s = rope64(q, k, positions, inv, cfg, mask)
    want64 = dpe_attention(q_n, q_s, k_n, k_s, v.to(F64), cfg.window, backend="reference")
    r = rope_reference(q, k, positions, inv, cfg, mask)
    ref = dpe_attention(r[0], r[2], r[1], r[3], v, cfg.window, backend="reference")
    return want64, ref


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("mask_kind", [None, "per_q"])
def test_prefill_equals_prefill_then_decode(dtype, mask_kind):
    hq, hk, d, w, s, c = 6, 2, 32, 5, 21, 8
    cfg, inv = make_cfg(d // 2, w), pow2_inv_freq(d // 2)
    mask = make_mask(mask_kind, hq, hk, d // 2)
    q, k, v = make_qkv(1, s, hq, hk, d, dtype)
    pos = 3 + torch.arange(s)[None]
    full = CachePath(dtype, inv, cfg, mask).step(q, k, v, pos)
    split = CachePath(dtype, inv, cfg, mask)
    split.step(q[:, :s - c], k[:, :s - c], v[:, :s - c], pos[:, :s - c])
    dec = torch.cat([split.step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], pos[:, t:t + 1])
                     for t in range(s - c, s)], 1)
    want64, ref = _prefill_oracles(q, k, v, pos, inv, cfg, mask)
    assert_rule(full, want64, ref, "full prefill")
    assert_rule(dec, want64[:, s - c:], ref[:, s - c:], "decode steps")
    if dtype == F64:
        torch.testing.assert_close(dec, full[:, s - c:], atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("chunk", [1, 3, 4, 7, 16, 40])
def test_chunked_prefill(dtype, chunk):
    hq, hk, d, w, s = 4, 1, 32, 6, 29
    cfg, inv = make_cfg(d // 2, w), pow2_inv_freq(d // 2)
    mask = make_mask("per_q", hq, hk, d // 2)
    q, k, v = make_qkv(2, s, hq, hk, d, dtype, seed=5)
    pos = torch.arange(s)[None]
    path = CachePath(dtype, inv, cfg, mask, initial_capacity=2)
    outs = [path.step(q[:, i:i + chunk], k[:, i:i + chunk], v[:, i:i + chunk], pos[:, i:i + chunk])
            for i in range(0, s, chunk)]
    got = torch.cat(outs, 1)
    want64, ref = _prefill_oracles(q, k, v, pos, inv, cfg, mask)
    assert_rule(got, want64, ref, f"chunk {chunk}")
    assert path.cache.get_seq_length() == s


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_left_padded_batch_decode(dtype):
    """B=2 with left padding (positions restart at each row's first real token) == each row alone."""
    hq, hk, d, w, s, steps = 4, 2, 16, 4, 11, 5
    cfg, inv = make_cfg(d // 2, w), pow2_inv_freq(d // 2)
    mask = make_mask("per_kv", hq, hk, d // 2)
    pads = [0, 4]
    q, k, v = make_qkv(2, s + steps, hq, hk, d, dtype, seed=7)
    slot = torch.arange(s + steps)
    pos = torch.stack([(slot - p).clamp(min=0) for p in pads])            # [2, S]
    kpm = torch.stack([slot >= p for p in pads])                          # True = real token
    batched = CachePath(dtype, inv, cfg, mask)
    pre = batched.step(q[:, :s], k[:, :s], v[:, :s], pos[:, :s], key_padding_mask=kpm[:, :s])
    assert (pre[1, :pads[1]] == 0).all()  # padded query rows give 0
    dec = [batched.step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], pos[:, t:t + 1],
                        key_padding_mask=kpm[:, :t + 1]) for t in range(s, s + steps)]
    for b, p in enumerate(pads):
        alone = CachePath(dtype, inv, cfg, mask)
        sl = slice(p, None)
        want_pre = alone.step(q[b:b + 1, sl][:, :s - p], k[b:b + 1, sl][:, :s - p], v[b:b + 1, sl][:, :s - p],
                              torch.arange(s - p)[None])
        torch.testing.assert_close(pre[b:b + 1, p:], want_pre, atol=1e-12 if dtype == F64 else ATOL[dtype],
                                   rtol=0)
        for i, t in enumerate(range(s, s + steps)):
            ref64 = decode_rerotate_reference(q[b:b + 1, t:t + 1].double(), k[b:b + 1, p:t + 1].double(),
                                              v[b:b + 1, p:t + 1].double(), t - p, inv, cfg, mask)
            ref = decode_rerotate_reference(q[b:b + 1, t:t + 1], k[b:b + 1, p:t + 1], v[b:b + 1, p:t + 1],
                                            t - p, inv, cfg, mask)
            assert_rule(dec[i][b:b + 1], ref64, ref, f"row {b} step {t}")


# ----------------------------------------------------------------------------- the cache object
def test_capacity_growth_keeps_contents():
    cache = DPEKVCache(2, initial_capacity=2)
    assert cache.get_seq_length(1) == 0 and cache.get_capacity(1) == 0
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(2, n, 3, 8, generator=g) for n in [1, 1, 1, 2, 1, 9, 30, 1, 1, 3]]
    ptrs, caps = [], []
    for i, x in enumerate(chunks):
        kn, ks, v = cache.update(1, x, 2 * x.repeat_interleave(2, 2), x[..., :5] - 1)
        allx = torch.cat(chunks[:i + 1], 1)
        assert torch.equal(kn, allx) and torch.equal(ks, 2 * allx.repeat_interleave(2, 2))
        assert torch.equal(v, allx[..., :5] - 1)
        caps.append(cache.get_capacity(1))
        ptrs.append(cache._layers[1].k_normal.data_ptr())
    assert caps == [2, 2, 4, 8, 8, 16, 45, 90, 90, 90]  # max(2 x capacity, needed)
    moves = sum(a != b for a, b in zip(ptrs, ptrs[1:]))
    assert moves == 5  # one move per growth, none per append within capacity
    assert cache.get_seq_length(1) == 50 and cache.get_seq_length(0) == 0
    # crop keeps the buffers and lets the next append overwrite the tail
    cache.crop(45)
    kn, _, _ = cache.update(1, torch.zeros(2, 1, 3, 8), torch.zeros(2, 1, 6, 8), torch.zeros(2, 1, 3, 5))
    assert kn.shape[1] == 46 and torch.equal(kn[:, :45], torch.cat(chunks, 1)[:, :45]) and (kn[:, 45] == 0).all()
    cache.reset()
    assert cache.get_seq_length(1) == 0 and cache.get_capacity(1) == 0
    kn, _, _ = cache.update(1, torch.ones(1, 3, 4, 4), torch.ones(1, 3, 4, 4), torch.ones(1, 3, 4, 4))
    assert kn.shape == (1, 3, 4, 4)  # a reset cache takes new shapes


def test_update_returns_views_of_preallocated_buffers():
    cache = DPEKVCache(1, initial_capacity=64)
    kn, ks, v = cache.update(0, torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 8))
    kn2, _, _ = cache.update(0, torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8))
    assert kn2.data_ptr() == kn.data_ptr() and kn2.shape[1] == 6 and kn2.is_contiguous()
    empty = cache.update(0, torch.randn(1, 0, 2, 8), torch.randn(1, 0, 2, 8), torch.randn(1, 0, 2, 8))
    assert empty[0].shape[1] == 6


def _kv(b=1, s=2, h=2, d=8, hs=None, dv=None, dtype=torch.float32):
    return (torch.randn(b, s, h, d, dtype=dtype), torch.randn(b, s, hs or h, d, dtype=dtype),
            torch.randn(b, s, h, dv or d, dtype=dtype))


@pytest.mark.parametrize("call, exc, match", [
    (lambda c: DPEKVCache(0), ValueError, "num_layers"),
    (lambda c: DPEKVCache(2.0), TypeError, "num_layers"),
    (lambda c: DPEKVCache(1, initial_capacity=0), ValueError, "initial_capacity"),
    (lambda c: c.update(2, *_kv()), ValueError, "layer"),
    (lambda c: c.update(-1, *_kv()), ValueError, "layer"),
    (lambda c: c.update("0", *_kv()), TypeError, "layer"),
    (lambda c: c.get_seq_length(5), ValueError, "layer"),
    (lambda c: c.update(0, None, *_kv()[1:]), TypeError, "k_normal"),
    (lambda c: c.update(0, *_kv()[:2], torch.randn(2, 2, 8)), ValueError, "v"),
    (lambda c: c.update(0, torch.ones(1, 2, 2, 8, dtype=torch.int32), *_kv()[1:]), TypeError, "k_normal"),
    (lambda c: c.update(0, *_kv(hs=3)), ValueError, "k_scaled"),
    (lambda c: c.update(0, *_kv()[:2], torch.randn(1, 2, 4, 8)), ValueError, "v"),
    (lambda c: c.update(0, _kv()[0], torch.randn(1, 2, 2, 4), _kv()[2]), ValueError, "k_scaled"),
    (lambda c: c.update(0, _kv()[0], torch.randn(1, 3, 2, 8), _kv()[2]), ValueError, "k_scaled"),
    (lambda c: c.update(0, *_kv()[:2], torch.randn(1, 2, 2, 8, dtype=torch.float64)), TypeError, "v"),
    (lambda c: c.update(0, torch.randn(1, 2, 2, 8, requires_grad=True), *_kv()[1:]), ValueError, "requires grad"),
    (lambda c: c.crop(-1), ValueError, "length"),
    # against what layer 1 already holds: [1, S, 2, 8] float32, k_scaled 4 heads, Dv 6
    (lambda c: c.update(1, *_kv(b=2, hs=4, dv=6)), ValueError, "batch size"),
    (lambda c: c.update(1, *_kv(h=1, hs=4, dv=6)), ValueError, "k_normal"),
    (lambda c: c.update(1, *_kv(hs=2, dv=6)), ValueError, "k_scaled"),
    (lambda c: c.update(1, *_kv(hs=4, dv=8)), ValueError, "v"),
    (lambda c: c.update(1, *_kv(hs=4, dv=6, dtype=torch.bfloat16)), TypeError, "k_normal"),
    (lambda c: dpe_attention_step(*_kv(), None, torch.ones(4), DPEConfig.uniform(2, [1], 4), object(), 0),
     TypeError, "cache"),
])
def test_bad_input(call, exc, match):
    c = DPEKVCache(2)
    c.update(1, *_kv(hs=4, dv=6))
    with pytest.raises(exc, match=match):
        call(c)
    assert c.get_seq_length(1) == 2  # a rejected update changes nothing


def test_rerotate_reference_bad_input():
    cfg, inv = make_cfg(4, 3), pow2_inv_freq(4)
    q, k, v = make_qkv(1, 5, 2, 1, 8, torch.float32)
    with pytest.raises(ValueError, match="q must be"):
        decode_rerotate_reference(q, k, v, 4, inv, cfg)
    with pytest.raises(ValueError, match="v_cache"):
        decode_rerotate_reference(q[:, -1:], k, v[:, :3], 4, inv, cfg)
    with pytest.raises(ValueError, match="mask"):
        decode_rerotate_reference(q[:, -1:], k, v, 4, inv, cfg, torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="position"):
        decode_rerotate_reference(q[:, -1:], k, v, torch.tensor([1, 2, 3]), inv, cfg)
