"""dpe_paged_attention_rotary (dpe_kernels/paged_attention.py) and rotary_table (dpe_kernels/rope.py):
DPE attention over a paged cache of UNROTATED keys, rotated as they are loaded.

Every backend that runs here against the float64 oracle (the reference backend on float64 copies,
which gathers each sequence, rotates it from the table at its own configuration and runs the
attention formula), with the tolerance rule of conftest (error <= 2 x the same-dtype reference's
error + ATOL[dtype]). The semantics are pinned to the rest of the package twice: a single
configuration equals the rotated-cache path (dpe_rope_and_cache + dpe_paged_attention), and an
all-ones configuration equals plain RoPE attention.
"""
import math

import pytest
import torch

from conftest import DEVICE, llama_inv_freq, tolerance
from dpe_kernels import (DPEConfig, available_paged_backends, dpe_paged_attention, dpe_paged_attention_rotary,
                         rope_reference, rotary_table)

NEG_INF = float("-inf")
BACKENDS = [b for b in ("cpu", "triton") if b in available_paged_backends(DEVICE)]


def make_case(lens, q_lens, *, bs=16, h_q=4, h_k=2, d=16, dv=None, rotary_dim=None, dtype=torch.float32,
              configs=None, masked=False, head_major=False, device=DEVICE, table_rows=None):
    """Random paged inputs (kwargs of dpe_paged_attention_rotary). ``configs``: a list of
    (window, scales) with scales one per pair; sequence b uses configuration b % C."""
    dv = dv or d
    rotary_dim = rotary_dim or d
    p = rotary_dim // 2
    configs = configs or [(8, [1] * (p // 2) + [4] * (p - p // 2))]
    nblk = [math.ceil(n / bs) for n in lens]
    num_blocks = sum(nblk) + 3
    perm = torch.randperm(num_blocks, device=device)
    bt = torch.full((len(lens), max(nblk + [1]) + 1), 10 ** 6, dtype=torch.int32, device=device)  # garbage tail
    i = 0
    for b, n in enumerate(nblk):
        bt[b, :n] = perm[i: i + n].to(torch.int32)
        i += n
    if head_major:  # vLLM CPU's storage: [num_blocks, H, block_size, D] viewed token-major
        k_cache = torch.randn(num_blocks, h_k, bs, d, dtype=dtype, device=device).transpose(1, 2)
        v_cache = torch.randn(num_blocks, h_k, bs, dv, dtype=dtype, device=device).transpose(1, 2)
    else:
        k_cache = torch.randn(num_blocks, bs, h_k, d, dtype=dtype, device=device)
        v_cache = torch.randn(num_blocks, bs, h_k, dv, dtype=dtype, device=device)
    qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32, device=device)
    q = torch.randn(int(qsl[-1]), h_q, d, dtype=dtype, device=device)
    inv_freq = llama_inv_freq(rotary_dim, device=device)
    rows = table_rows or max(lens + [1])
    c = len(configs)
    mask = None
    if masked:
        mask = torch.rand(c, h_q, p, device=device) < 0.6
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, block_table=bt,
                seq_lens=torch.tensor(lens, dtype=torch.int32, device=device), query_start_loc=qsl,
                cos_sin=rotary_table(inv_freq, rows),
                pair_scale=torch.tensor([s for _, s in configs], dtype=torch.int64, device=device),
                window=torch.tensor([w for w, _ in configs], dtype=torch.int64, device=device),
                seq_config=torch.tensor([b % c for b in range(len(lens))], dtype=torch.int32, device=device),
                mask=mask, rotary_dim=rotary_dim), inv_freq


def f64(kw):
    return {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "cos_sin" else v)
            for k, v in kw.items()}


def assert_close_to_oracle(out, lse, kw):
    o64, l64 = dpe_paged_attention_rotary(**f64(kw), backend="reference", return_lse=True)
    o_same, l_same = dpe_paged_attention_rotary(**kw, backend="reference", return_lse=True)
    dtype = kw["q"].dtype
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    empty = l64 == NEG_INF
    assert torch.equal(lse == NEG_INF, empty), "lse: the rows without keys differ"
    for name, g, r, o in (("out", out, o_same, o64), ("lse", lse, l_same, l64)):
        keep = ~empty
        if not keep.any():
            continue
        err = (g.double() - o)[keep].abs().max().item()
        base = (r.double() - o)[keep].abs().max().item()
        bound = tolerance(dtype, base)
        assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g} (reference error {base:.3g})"


# --------------------------------------------------------------------------- the table
def test_rotary_table_is_cos_sin_of_the_float32_angle():
    inv = llama_inv_freq(16, device="cpu")
    t = rotary_table(inv, 5000)
    pos = torch.tensor([0, 1, 7, 4095, 4999])
    angle = (pos.to(torch.float32)[:, None] * inv).double()
    assert t.shape == (5000, 16) and t.dtype == torch.float32
    assert torch.equal(t[pos, :8], angle.cos().float())
    assert torch.equal(t[pos, 8:], angle.sin().float())


def test_rotary_table_refuses_bad_input():
    inv = llama_inv_freq(8, device="cpu")
    with pytest.raises(ValueError, match="num_positions"):
        rotary_table(inv, 0)
    with pytest.raises(ValueError, match="num_positions"):
        rotary_table(inv, (1 << 24) + 1)
    with pytest.raises(TypeError, match="inv_freq"):
        rotary_table(inv.double(), 10)
    with pytest.raises(TypeError, match="num_positions"):
        rotary_table(inv, 10.0)


# --------------------------------------------------------------------------- against the oracle
CASES = {
    # lens, q_lens: decode rows, prefill, chunked prefill (q_len < len), an empty sequence, q_len 0
    "decode": ([37, 5, 64, 17], [1, 1, 1, 1]),
    "mixed": ([37, 20, 64, 9, 0], [1, 20, 7, 0, 0]),
    "prefill": ([40, 33], [40, 33]),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("masked", [False, True])
def test_matches_oracle_mixed_configs(backend, case, masked):
    lens, q_lens = CASES[case]
    # three configurations in one batch: DPE with a short window, DPE with other scales, plain RoPE
    configs = [(8, [1, 2, 4, 8, 8, 16, 16, 16]), (5, [3, 3, 1, 1, 2, 2, 7, 7]), (1, [1] * 8)]
    kw, _ = make_case(lens, q_lens, configs=configs, masked=masked)
    out, lse = dpe_paged_attention_rotary(**kw, backend=backend, return_lse=True)
    assert_close_to_oracle(out, lse, kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes(backend, dtype):
    kw, _ = make_case([37, 20, 50], [1, 20, 1], dtype=dtype, masked=True)
    out, lse = dpe_paged_attention_rotary(**kw, backend=backend, return_lse=True)
    assert_close_to_oracle(out, lse, kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_half_operands_rounded_to_the_dtype(backend, dtype, masked):
    """Rotated queries and keys are rounded to the cache's dtype before the dot products, in decode and
    prefill rows alike, as a rotated cache (and the HF integration) holds them: the lse (float32) then
    equals the same-dtype reference's, which rounds there. Measured (cpu): decode rows within 1e-6,
    prefill rows within 6e-5 (the prefill attention's own error); without the rounding the decode
    rows move by 9e-5 - 3e-4 (float16) and 6e-4 - 1.4e-3 (bfloat16)."""
    kw, _ = make_case([37, 20, 50, 64], [1, 20, 1, 1], dtype=dtype, masked=masked,
                      configs=[(8, [1, 2, 4, 8, 8, 16, 16, 16]), (1, [1] * 8)])
    _, lse = dpe_paged_attention_rotary(**kw, backend=backend, return_lse=True)
    _, want = dpe_paged_attention_rotary(**kw, backend="reference", return_lse=True)
    err = (lse - want).abs()
    decode = [0, 21, 22]  # query rows of the sequences with one query
    assert err[decode].max() < 1e-5 and err.max() < 1e-4, (err[decode].max(), err.max())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["neox", "gptj"])
def test_partial_rotary_layouts_head_major_dv(backend, layout):
    kw, _ = make_case([45, 30, 3], [1, 6, 1], d=16, dv=8, rotary_dim=8, head_major=True,
                      configs=[(6, [2, 2, 8, 8])], bs=8)
    out, lse = dpe_paged_attention_rotary(**kw, layout=layout, backend=backend, return_lse=True)
    o64, l64 = dpe_paged_attention_rotary(**f64(kw), layout=layout, backend="reference", return_lse=True)
    assert (out.double() - o64).abs().max() < 1e-4 and (lse.double() - l64).abs().max() < 1e-4


# --------------------------------------------------------------------------- the method, twice
@pytest.mark.parametrize("masked", [False, True])
def test_equals_the_rotated_cache_path(masked):
    """One configuration: rotating keys on load equals rotating them once into a widened cache
    (dpe_rope_and_cache) and dpe_paged_attention over it (float64, both reference backends)."""
    h_q, h_k, d, bs = 4, 2, 16, 8
    lens, q_lens = [29, 12], [1, 12]
    config = DPEConfig.uniform(6, [1, 2, 4, 8], num_pairs=d // 2)
    mask = (torch.rand(h_q, d // 2) < 0.6) if masked else None
    kw, inv_freq = make_case(lens, q_lens, h_q=h_q, h_k=h_k, d=d, bs=bs, dtype=torch.float64,
                             configs=[(config.window, config.pair_scales().tolist())])
    kw["mask"] = None if mask is None else mask[None]
    got = dpe_paged_attention_rotary(**kw, backend="reference")
    # the rotated cache: every key of every sequence rotated once at its position
    k_cache, v_cache, bt = kw["k_cache"], kw["v_cache"], kw["block_table"]
    nb = k_cache.shape[0]
    h_ks = h_q if masked else h_k
    kc = torch.zeros(nb, bs, h_k, d, dtype=torch.float64)
    ksc = torch.zeros(nb, bs, h_ks, d, dtype=torch.float64)
    vc = torch.zeros_like(v_cache)
    qn_all, qs_all = torch.empty_like(kw["q"]), torch.empty_like(kw["q"])
    qsl = kw["query_start_loc"].tolist()
    for b, n in enumerate(lens):
        slots = torch.tensor([int(bt[b, i // bs]) * bs + i % bs for i in range(n)], dtype=torch.int64)
        k = k_cache[slots // bs, slots % bs]
        v = v_cache[slots // bs, slots % bs]
        q = torch.zeros(n, h_q, d, dtype=torch.float64)
        qa, qb = qsl[b], qsl[b + 1]
        q[n - (qb - qa):] = kw["q"][qa:qb]
        qn, kn, qs, ks = rope_reference(q, k, torch.arange(n), inv_freq, config, mask, compute_dtype=torch.float64)
        kc[slots // bs, slots % bs], ksc[slots // bs, slots % bs], vc[slots // bs, slots % bs] = kn, ks, v
        qn_all[qa:qb], qs_all[qa:qb] = qn[n - (qb - qa):], qs[n - (qb - qa):]
    want = dpe_paged_attention(qn_all, qs_all, kc, ksc, vc, bt, kw["seq_lens"], kw["query_start_loc"], config.window,
                               backend="reference")
    # the two differ only by the table's float32 rounding of cos / sin
    assert (got - want).abs().max() < 1e-5


def test_all_ones_is_plain_rope():
    """A configuration with every scale 1 is plain RoPE attention, whatever its window."""
    from dpe_kernels.reference import rope_cos_sin, rotate_pairs

    kw, inv_freq = make_case([33], [33], dtype=torch.float64, configs=[(4, [1] * 8)])
    got = dpe_paged_attention_rotary(**kw, backend="reference")
    n, bs = 33, kw["k_cache"].shape[1]
    slots = torch.tensor([int(kw["block_table"][0, i // bs]) * bs + i % bs for i in range(n)])
    k = kw["k_cache"][slots // bs, slots % bs]
    v = kw["v_cache"][slots // bs, slots % bs]
    cos, sin = rope_cos_sin(torch.arange(n), inv_freq, torch.float64)
    q, k = rotate_pairs(kw["q"], cos, sin, True), rotate_pairs(k, cos, sin, True)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(2, 1).transpose(0, 1), v.repeat_interleave(2, 1).transpose(0, 1),
        is_causal=True).transpose(0, 1)
    assert (got - want).abs().max() < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_positions_past_2_20(backend):
    """A decode query at position 2^20 + 9 over keys spread to 2^20: block-table entries all point at
    a few physical blocks (as shared prefixes do), so the cache stays tiny; the oracle forms every
    index in int64."""
    bs, n = 64, (1 << 20) + 10
    kw, _ = make_case([n], [1], bs=bs, h_q=2, h_k=1, d=4, configs=[(1000, [1, 64])], table_rows=n)
    nblocks = math.ceil(n / bs)
    kw["block_table"] = (torch.arange(nblocks, dtype=torch.int32) % kw["k_cache"].shape[0])[None]
    out, lse = dpe_paged_attention_rotary(**kw, backend=backend, return_lse=True)
    o64, l64 = dpe_paged_attention_rotary(**f64(kw), backend="reference", return_lse=True)
    assert (out.double() - o64).abs().max() < 1e-4
    assert (lse.double() - l64).abs().max() < 1e-4


# --------------------------------------------------------------------------- bad input
def test_bad_input_names_the_argument():
    kw, _ = make_case([20, 9], [1, 1], configs=[(4, [1] * 4 + [2] * 4), (4, [1] * 8)])
    call = lambda **over: dpe_paged_attention_rotary(**{**kw, **over})  # noqa: E731
    with pytest.raises(ValueError, match="cos_sin has 10 rows"):
        call(cos_sin=kw["cos_sin"][:10].contiguous())
    with pytest.raises(ValueError, match="seq_config"):
        call(seq_config=torch.tensor([0, 2], dtype=torch.int32))
    with pytest.raises(TypeError, match="seq_config"):
        call(seq_config=torch.tensor([0], dtype=torch.int32))
    with pytest.raises(ValueError, match="seq_config is required"):
        call(seq_config=None)
    with pytest.raises(ValueError, match="pair_scale must be >= 1"):
        call(pair_scale=torch.zeros(2, 8, dtype=torch.int64))
    with pytest.raises(TypeError, match="pair_scale"):
        call(pair_scale=torch.ones(2, 7, dtype=torch.int64))
    with pytest.raises(ValueError, match="window must have one entry per configuration"):
        call(window=torch.tensor([4]))
    with pytest.raises(ValueError, match="window must be >= 1"):
        call(window=torch.tensor([4, 0]))
    with pytest.raises(TypeError, match="mask must be a bool"):
        call(mask=torch.ones(2, 2, 8, dtype=torch.bool))  # per-KV-head rows: refused, name the fix
    with pytest.raises(TypeError, match="cos_sin"):
        call(cos_sin=kw["cos_sin"].double())
    with pytest.raises(ValueError, match="rotary_dim"):
        call(rotary_dim=5)
    with pytest.raises(ValueError, match="layout"):
        call(layout="llama")
    with pytest.raises(ValueError, match="longer than the cos_sin table"):
        call(cos_sin=kw["cos_sin"][:15].contiguous(), check_inputs=False, max_seqlen_k=20, max_seqlen_q=1)
    with pytest.raises(ValueError, match="q must be"):
        call(q=kw["q"][0])
