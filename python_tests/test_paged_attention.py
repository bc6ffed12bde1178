"""dpe_paged_attention (dpe_kernels/paged_attention.py) with every backend that runs here
against the float64 oracle: the reference backend on float64 copies, which
gathers every sequence's pages and runs dpe_attention's reference.

Tolerances: the rule of conftest (ATOL there, stated once): error <= 2 x the
same-dtype reference's error + ATOL[dtype].

Random pages: shuffled block tables, blocks shared between sequences (prefix
caching), unused block-table entries holding out-of-range garbage (never
read), seq_len not a multiple of block_size, windows shorter and longer than
the context, q_len 0 / 1 / many in one batch, GQA with scaled keys per KV
head and per query head, caches as views into one engine buffer (head-major
as vLLM's CPU cache, token-major, padded). Without a GPU the Triton kernel
runs under TRITON_INTERPRET=1 with 16 x 16 tiles: sizes stay tiny.

Backend-specific tests (the cpu decode paths and its compiled kernel, Triton's split-KV and
its compilation for GPUs): backends/test_paged_cpu.py, backends/test_paged_triton.py.
"""
import contextlib
import itertools
import math
from unittest import mock

import pytest
import torch

from conftest import ATOL, DEVICE, tolerance
from dpe_kernels import available_paged_backends, dpe_paged_attention

NEG_INF = float("-inf")
HAS_TRITON = "triton" in available_paged_backends(DEVICE)
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="the triton backend needs triton, and CUDA or "
                                                         "TRITON_INTERPRET=1")
# the backends under test on this machine; "cpu_chunked" is the cpu backend with its decode
# fallback (aten's flash op over gathered chunks, used without the compiled extension) in place of
# the compiled paged_decode kernel
BACKENDS = (["cpu", "cpu_chunked"] if DEVICE == "cpu" else []) + (["triton"] if HAS_TRITON else [])


@contextlib.contextmanager
def backend_context(backend):
    """The backend name dpe_paged_attention gets, with the decode fallback forced for cpu_chunked."""
    if backend != "cpu_chunked":
        yield backend
        return
    import dpe_kernels.backends.paged_cpu as pc

    real = pc.ops.has_kernel
    with mock.patch.object(pc.ops, "has_kernel", lambda op, key: op != "paged_decode" and real(op, key)):
        yield "cpu"


# --------------------------------------------------------------------------- cases
def make_case(lens, q_lens, *, bs=16, h_q=6, h_k=2, h_ks=None, d=16, dv=None, dtype=torch.float32,
              layout="contig", shared=0, device=DEVICE):
    """Random paged inputs: (args tuple for dpe_paged_attention, ...).

    ``shared``: the first ``shared`` logical blocks of every sequence long
    enough are ONE set of physical blocks (prefix caching). ``layout``:
    ``contig`` (three contiguous caches), ``head_major`` (one engine buffer
    ``[NB, H_k, bs, 2D + Dv + 8]`` seen through permuted views, as vLLM's CPU
    cache), ``token_major`` (one buffer ``[NB + 2, bs, H_k, 2D + Dv + 8]``,
    blocks 1.. used: big block / token / head strides).
    """
    h_ks = h_k if h_ks is None else h_ks
    dv = d if dv is None else dv
    n_log = [-(-n // bs) for n in lens]
    n_own = [max(0, n - shared) if n > 0 else 0 for n in n_log]
    nb = shared + sum(n_own) + 3  # + spare blocks nobody uses
    perm = torch.randperm(nb).tolist()
    it = iter(perm[shared:])
    max_blocks = max(n_log + [1]) + 2
    bt = torch.full((len(lens), max_blocks), nb + 1000, dtype=torch.int32)  # garbage beyond each seq
    for b, n in enumerate(n_log):
        row = perm[:min(shared, n)] + [next(it) for _ in range(n - min(shared, n))]
        bt[b, :n] = torch.tensor(row, dtype=torch.int32)
    r = lambda *s: torch.randn(*s, device=device).to(dtype)  # noqa: E731
    if layout == "contig":
        kc, ksc, vc = r(nb, bs, h_k, d), r(nb, bs, h_ks, d), r(nb, bs, h_k, dv)
    else:
        width = 2 * d + dv + 8
        if layout == "head_major":
            buf = r(nb, h_k, bs, width).transpose(1, 2)          # [NB, bs, H_k, W] view
        else:
            buf = r(nb + 2, bs, h_k, width)[1: nb + 1]
        kc, vc = buf[..., :d], buf[..., 2 * d: 2 * d + dv]
        if h_ks == h_k:
            ksc = buf[..., d: 2 * d]
        else:
            ksc = r(nb, h_ks, bs, d + 8).transpose(1, 2)[..., 4: 4 + d]
    t_q = sum(q_lens)
    qn, qs = r(t_q, h_q, d), r(t_q, h_q, d)
    sl = torch.tensor(lens, dtype=torch.int32, device=device)
    qsl = torch.tensor([0] + list(itertools.accumulate(q_lens)), dtype=torch.int32, device=device)
    return qn, qs, kc, ksc, vc, bt.to(device), sl, qsl


def reference(args, window, dtype=None, **kw):
    """(out, lse) of the reference backend, in float64 when dtype is float64."""
    if dtype is not None:
        args = tuple(a.to(dtype) if a.is_floating_point() else a for a in args)
    return dpe_paged_attention(*args, window, return_lse=True, backend="reference", **kw)


def assert_paged_close(out, lse, args, window, **kw):
    """conftest's rule against the float64 oracle; rows without keys exactly out 0, lse -inf."""
    dtype = args[0].dtype
    o64, l64 = reference(args, window, torch.float64, **kw)
    o_same, l_same = reference(args, window, **kw)
    assert out.shape == o64.shape and out.dtype == dtype, (out.shape, out.dtype)
    assert lse.shape == l64.shape and lse.dtype == torch.float32, (lse.shape, lse.dtype)
    assert not out.isnan().any() and not lse.isnan().any()
    empty = l64 == NEG_INF
    assert torch.equal(lse == NEG_INF, empty), "lse: the rows without keys (-inf) differ"
    assert (out[empty] == 0).all(), "out: a row without keys is not 0"
    for name, g, ref, o in (("out", out, o_same, o64), ("lse", lse, l_same, l64)):
        keep = ~empty if name == "lse" else torch.ones_like(empty)
        if not keep.any():
            continue
        err = (g.double() - o)[keep].abs().max().item()
        base = (ref.double() - o)[keep].abs().max().item()
        bound = tolerance(dtype, base)
        assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g} (reference error {base:.3g})"


def run(backend, args, window, **kw):
    lens = args[6].tolist()
    q_lens = (args[7][1:] - args[7][:-1]).tolist()
    with backend_context(backend) as name:
        return dpe_paged_attention(*args, window, max_seqlen_q=max(q_lens, default=0),
                                   max_seqlen_k=max(lens, default=0), return_lse=True, backend=name, **kw)


def check(backend, args, window, **kw):
    out, lse = run(backend, args, window, **kw)
    assert_paged_close(out, lse, args, window, **kw)
    return out, lse


# --------------------------------------------------------------------------- the oracle itself
def test_reference_gathers_pages_as_dpe_attention_sees_them():
    """The oracle equals dpe_attention on the hand-gathered contiguous keys."""
    from dpe_kernels import dpe_attention

    args = make_case([37, 20], [3, 20], bs=8, shared=2, dtype=torch.float64)
    qn, qs, kc, ksc, vc, bt, sl, qsl = args
    out, lse = reference(args, 5)
    for b, (qa, qb) in enumerate(zip(qsl.tolist(), qsl[1:].tolist())):
        n = int(sl[b])
        idx = bt[b, : -(-n // 8)].long()
        kk = [c[idx].reshape(-1, *c.shape[2:])[:n][None] for c in (kc, ksc, vc)]
        o, l = dpe_attention(qn[None, qa:qb], qs[None, qa:qb], *kk, 5, return_lse=True, backend="reference")
        torch.testing.assert_close(out[qa:qb], o[0], rtol=0, atol=0)
        torch.testing.assert_close(lse[qa:qb], l[0], rtol=0, atol=0)


# --------------------------------------------------------------------------- decode
DECODE_LENS = [37, 5, 100, 1, 64]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [1, 7, 40, 200], ids=lambda w: f"w{w}")
@pytest.mark.parametrize("bs", [16, 8], ids=lambda b: f"bs{b}")
def test_decode(backend, window, bs):
    """One query per sequence; window 200 is longer than every context."""
    check(backend, make_case(DECODE_LENS, [1] * 5, bs=bs, shared=1), window)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("h_ks", [2, 6], ids=["ks_per_kv_head", "ks_per_q_head"])
@pytest.mark.parametrize("layout", ["head_major", "token_major"])
def test_decode_gqa_and_engine_layouts(backend, h_ks, layout):
    check(backend, make_case(DECODE_LENS, [1] * 5, h_ks=h_ks, layout=layout, bs=16, shared=2), 20)


# --------------------------------------------------------------------------- prefill / mixed
MIXED = [  # (seq_lens, q_lens): decode, skipped, chunked prefill, full prefill, spec-decode-like
    ([37, 5, 60, 1, 45], [1, 0, 20, 1, 45]),
    ([18, 33], [18, 3]),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(MIXED)))
@pytest.mark.parametrize("window", [1, 9, 100], ids=lambda w: f"w{w}")
def test_mixed_batches(backend, case, window):
    lens, q_lens = MIXED[case]
    check(backend, make_case(lens, q_lens, bs=8, shared=1), window)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("h_ks", [2, 6], ids=["ks_per_kv_head", "ks_per_q_head"])
def test_mixed_gqa_head_major(backend, h_ks):
    check(backend, make_case(*MIXED[0], bs=16, h_ks=h_ks, layout="head_major", shared=1), 11)


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_size_not_a_power_of_two(backend):
    check(backend, make_case(*MIXED[0], bs=24, shared=1), 30)
    check(backend, make_case(DECODE_LENS, [1] * 5, bs=24, layout="head_major"), 30)


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_head_dim_differs(backend):
    check(backend, make_case(*MIXED[0], bs=8, d=16, dv=32), 9)
    check(backend, make_case(DECODE_LENS, [1] * 5, bs=8, d=32, dv=16), 9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mixed", [False, True], ids=["decode", "mixed"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision(backend, mixed, dtype):
    lens, q_lens = MIXED[0] if mixed else (DECODE_LENS, [1] * 5)
    check(backend, make_case(lens, q_lens, bs=16, dtype=dtype, layout="head_major"), 12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_scale_and_sequences_without_queries(backend):
    """A batch where some sequences have no query (q_len 0, even seq_len 0)."""
    args = make_case([0, 50, 7, 0], [0, 2, 0, 0], bs=8)
    check(backend, args, 6, softmax_scale=0.7)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_out_is_written_and_returned(backend):
    args = make_case(*MIXED[0], bs=8)
    want, want_lse = run(backend, args, 9)
    out = torch.full_like(want, 123.0)
    with backend_context(backend) as name:
        got = dpe_paged_attention(*args, 9, out=out, backend=name)
    assert got is out
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    # a strided out (a view into a wider buffer) is honoured too
    wide = torch.zeros(want.shape[0], want.shape[1], want.shape[2] + 5, dtype=want.dtype, device=want.device)
    with backend_context(backend) as name:
        got, lse = dpe_paged_attention(*args, 9, out=wide[..., 2: 2 + want.shape[2]], return_lse=True,
                                       backend=name)
    torch.testing.assert_close(wide[..., 2: 2 + want.shape[2]], want, rtol=0, atol=0)
    assert (wide[..., :2] == 0).all() and (wide[..., 2 + want.shape[2]:] == 0).all()
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)


def test_auto_picks_cpu_on_cpu_tensors():
    args = make_case(*MIXED[0], bs=8, device="cpu")
    torch.testing.assert_close(dpe_paged_attention(*args, 9), dpe_paged_attention(*args, 9, backend="cpu"),
                               rtol=0, atol=0)


def test_empty_batch_and_no_queries():
    for backend in BACKENDS + ["reference"]:
        args = make_case([5, 9], [0, 0], bs=8)
        with backend_context(backend) as name:
            out, lse = dpe_paged_attention(*args, 4, return_lse=True, backend=name)
        assert out.shape == (0, 6, 16) and lse.shape == (0, 6)


# --------------------------------------------------------------------------- check_inputs=False
HOST_READS = ("item", "tolist", "__bool__", "__int__", "__index__", "__float__")


def _forbid_host_reads(monkeypatch):
    def boom(self, *a, **k):
        raise RuntimeError("a tensor value was read on the host")

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, boom)


@pytest.mark.parametrize("backend,mixed", [(b, m) for b in BACKENDS for m in (False, True)
                                           if not (b.startswith("cpu") and m)])
def test_check_inputs_false_reads_no_tensor_value(monkeypatch, backend, mixed):
    """With check_inputs=False (and max_seqlen_* given) no tensor value is read
    on the host: .item / .tolist / bool / int / index of a tensor all raise
    while it runs. (The cpu backend reads the lengths of a mixed batch on
    the host by design: only its decode path is host-read free.)"""
    lens, q_lens = MIXED[0] if mixed else (DECODE_LENS, [1] * 5)
    args = make_case(lens, q_lens, bs=16)
    want = run(backend, args, 9)[0]
    kw = dict(max_seqlen_q=max(q_lens), max_seqlen_k=max(lens))
    with monkeypatch.context() as m, backend_context(backend) as kw["backend"]:
        _forbid_host_reads(m)
        with pytest.raises(RuntimeError, match="read on the host"):
            dpe_paged_attention(*args, 9, check_inputs=True, **kw)  # the value checks do read
        got = dpe_paged_attention(*args, 9, check_inputs=False, **kw)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# --------------------------------------------------------------------------- validation
def _bad(args, **changes):
    names = ("q_normal", "q_scaled", "k_cache", "ks_cache", "v_cache", "block_table", "seq_lens",
             "query_start_loc")
    kw = dict(zip(names, args))
    kw.update(changes)
    return kw


BAD = [  # (changes given the good case, exception, words the message must name)
    (lambda a: dict(block_table=a[5].float()), TypeError, "block_table"),
    (lambda a: dict(seq_lens=a[6][:-1]), ValueError, "seq_lens"),
    (lambda a: dict(query_start_loc=a[7][:-1]), ValueError, "query_start_loc"),
    (lambda a: dict(q_scaled=a[1][:, :3]), ValueError, "q_scaled"),
    (lambda a: dict(q_normal=a[0][None]), ValueError, "q_normal"),
    (lambda a: dict(k_cache=a[2].double()), TypeError, "k_cache"),
    (lambda a: dict(ks_cache=a[3][:, :, :1].expand(-1, -1, 3, -1)), ValueError, "ks_cache"),
    (lambda a: dict(v_cache=a[4][:, :, :1]), ValueError, "v_cache"),
    (lambda a: dict(v_cache=a[4][:2]), ValueError, "v_cache"),
    (lambda a: dict(k_cache=a[2].repeat_interleave(2, -1)[..., ::2]), ValueError, "k_cache"),  # stride 2
    (lambda a: dict(k_cache=a[2][..., :8]), ValueError, "k_cache"),
]


@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_metadata_names_the_argument(i):
    change, exc, word = BAD[i]
    args = make_case(*MIXED[0], bs=8, device="cpu")
    kw = _bad(args, **change(args))
    for check_inputs in (True, False):  # metadata checks stay with check_inputs=False
        with pytest.raises(exc, match=word):
            dpe_paged_attention(**kw, window=9, check_inputs=check_inputs, backend="reference")


BAD_VALUES = [
    (lambda a: dict(query_start_loc=a[7] + 1), "query_start_loc"),             # does not start at 0
    (lambda a: dict(query_start_loc=a[7].flip(0)), "query_start_loc"),         # decreasing
    (lambda a: dict(query_start_loc=torch.cat([a[7][:-1], a[7][-1:] - 1])), "query_start_loc"),
    (lambda a: dict(seq_lens=a[6].clone().fill_(2)), "seq_lens"),              # < q_len
    (lambda a: dict(seq_lens=a[6] + 1000), "seq_lens"),                         # beyond the table
    (lambda a: dict(block_table=torch.where(a[5] == a[5][0, 0], -1, a[5])), "block_table"),
    (lambda a: dict(block_table=a[5].clone().fill_(10 ** 6)), "block_table"),
]


@pytest.mark.parametrize("i", range(len(BAD_VALUES)))
def test_bad_values_name_the_argument(i):
    change, word = BAD_VALUES[i]
    args = make_case(*MIXED[0], bs=8, device="cpu")
    with pytest.raises(ValueError, match=word):
        dpe_paged_attention(**_bad(args, **change(args)), window=9, backend="cpu")


def test_bad_scalars_and_options():
    args = make_case(*MIXED[0], bs=8, device="cpu")
    t_q = args[0].shape[0]
    cases = [
        (dict(window=0), ValueError, "window"),
        (dict(window=2.5), TypeError, "window"),
        (dict(softmax_scale=float("nan")), ValueError, "softmax_scale"),
        (dict(softmax_scale="x"), TypeError, "softmax_scale"),
        (dict(max_seqlen_q=t_q + 1), ValueError, "max_seqlen_q"),
        (dict(max_seqlen_q=1), ValueError, "max_seqlen_q"),       # shorter than the longest query
        (dict(max_seqlen_k=10), ValueError, "max_seqlen_k"),      # shorter than the longest sequence
        (dict(max_seqlen_k=-1), ValueError, "max_seqlen_k"),
        (dict(max_seqlen_k=10 ** 9), ValueError, "max_seqlen_k"),
        (dict(out=torch.empty(t_q, 6, 15)), ValueError, "out"),
        (dict(out=torch.empty(t_q, 6, 16, dtype=torch.float64)), TypeError, "out"),
        (dict(backend="cuda"), ValueError, "backend"),
    ]
    for kw, exc, word in cases:
        full = dict(window=9)
        full.update(kw)
        with pytest.raises(exc, match=word):
            dpe_paged_attention(*args, **full)


def test_float64_only_on_the_reference_and_inference_only():
    args = make_case(*MIXED[0], bs=8, device="cpu", dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        dpe_paged_attention(*args, 9, backend="cpu")
    assert dpe_paged_attention(*args, 9).dtype == torch.float64  # auto -> reference
    args = make_case(*MIXED[0], bs=8, device="cpu")
    q = args[0].clone().requires_grad_()
    with pytest.raises(ValueError, match="q_normal"):
        dpe_paged_attention(q, *args[1:], 9)
    with torch.no_grad():
        dpe_paged_attention(q, *args[1:], 9)


@pytest.mark.skipif(HAS_TRITON, reason="triton runs here")
def test_triton_unavailable_is_a_clear_error():
    args = make_case(*MIXED[0], bs=8, device="cpu")
    with pytest.raises(ValueError, match="triton"):
        dpe_paged_attention(*args, 9, backend="triton")


def test_default_scale_is_inverse_sqrt_head_dim():
    args = make_case(*MIXED[0], bs=8, device="cpu")
    torch.testing.assert_close(dpe_paged_attention(*args, 9, backend="cpu"),
                               dpe_paged_attention(*args, 9, softmax_scale=1 / math.sqrt(16), backend="cpu"),
                               rtol=0, atol=0)
