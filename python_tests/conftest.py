"""Shared test set-up: tolerances (stated once), the float64 oracle, and the
backends under test.

Tolerance rule (flash-attn's): a kernel's max abs error against the float64
oracle is at most twice the error of the same-dtype PyTorch reference run
against the same oracle, plus a floor ATOL[dtype] for the case where that
reference error is ~0. Defined once, in dpe_kernels.tools.parity (``ATOL``,
``tolerance``), which `dpe parity` applies too; imported here.
"""
import os
import sys

import pytest
import torch

# Triton kernels run on the CPU through the interpreter; it must be on before
# any module defining a @triton.jit kernel is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dpe_kernels  # noqa: E402
from dpe_kernels import DPEConfig, available_rope_backends, dpe_rope, rope_reference  # noqa: E402
from dpe_kernels.tools.parity import ATOL, tolerance  # noqa: E402,F401  (the one tolerance rule)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def compiled_backends(device=DEVICE):
    """Every non-reference backend that runs here; the CPU extension must be built."""
    avail = available_rope_backends(device)
    if device == "cpu" and "cpu" not in avail:
        pytest.fail(f"the CPU extension is not loaded: {dpe_kernels.extension_error()}")
    return [b for b in avail if b != "reference"]


def oracle(q, k, positions, inv_freq, config, mask=None, layout="neox", rotary_dim=None):
    """float64 result of the definition in docs/method.md (angles formed in float32 as HF does)."""
    return rope_reference(q.double(), k.double(), positions, inv_freq, config, mask, layout=layout,
                          rotary_dim=rotary_dim, compute_dtype=torch.float64)


def assert_rope_close(got, q, k, positions, inv_freq, config, mask=None, layout="neox",
                      rotary_dim=None):
    """Check all four outputs of dpe_rope against the oracle with the rule above."""
    ref64 = oracle(q, k, positions, inv_freq, config, mask, layout, rotary_dim)
    same_dtype = rope_reference(q, k, positions, inv_freq, config, mask, layout=layout,
                                rotary_dim=rotary_dim)
    for name, g, r, o in zip(("q_normal", "k_normal", "q_scaled", "k_scaled"), got, same_dtype, ref64):
        assert g.shape == o.shape, f"{name}: shape {tuple(g.shape)} != {tuple(o.shape)}"
        assert g.dtype == q.dtype, f"{name}: dtype {g.dtype} != {q.dtype}"
        err = (g.double() - o).abs().max().item() if g.numel() else 0.0
        base = (r.double() - o).abs().max().item() if g.numel() else 0.0
        bound = tolerance(q.dtype, base)
        assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g} (reference error {base:.3g})"


def llama_inv_freq(rotary_dim, base=10000.0, device=DEVICE):
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --------------------------------------------------------------------------- attention
def attention_oracle(ins, window, **kw):
    """float64 attention of docs/method.md (the reference backend on float64 copies): (out, lse)."""
    from dpe_kernels.reference import attention_reference

    return attention_reference(*(t.double() for t in ins), window, kw.get("softmax_scale"),
                               key_padding_mask=kw.get("key_padding_mask"),
                               cu_seqlens_q=kw.get("cu_seqlens_q"), cu_seqlens_k=kw.get("cu_seqlens_k"))


def assert_attention_close(out, lse, ins, window, **kw):
    """Check dpe_attention's (out, lse) against the float64 oracle with the rule above.

    ``ins`` = (q_normal, q_scaled, k_normal, k_scaled, v); ``kw`` = softmax_scale,
    key_padding_mask, cu_seqlens_q, cu_seqlens_k. The same-dtype reference
    computes in float32 and rounds once. Rows without keys (lse -inf) must
    match exactly: out 0, lse -inf.
    """
    from dpe_kernels.reference import attention_reference

    dtype = ins[0].dtype
    o64, l64 = attention_oracle(ins, window, **kw)
    o_same, l_same = attention_reference(*ins, window, kw.get("softmax_scale"),
                                         key_padding_mask=kw.get("key_padding_mask"),
                                         cu_seqlens_q=kw.get("cu_seqlens_q"),
                                         cu_seqlens_k=kw.get("cu_seqlens_k"))
    assert out.shape == o64.shape, f"out: shape {tuple(out.shape)} != {tuple(o64.shape)}"
    assert out.dtype == dtype, f"out: dtype {out.dtype} != {dtype}"
    assert lse.shape == l64.shape, f"lse: shape {tuple(lse.shape)} != {tuple(l64.shape)}"
    assert lse.dtype == torch.float32, f"lse: dtype {lse.dtype} != float32"
    assert not out.isnan().any(), "out has NaN"
    assert not lse.isnan().any(), "lse has NaN"
    empty = l64 == float("-inf")
    assert torch.equal(lse == float("-inf"), empty), "lse: the rows without keys (-inf) differ"
    if empty.any():
        assert (out[empty] == 0).all(), "out: a row without keys is not 0"
    for name, g, r, o in (("out", out, o_same, o64), ("lse", lse, l_same, l64)):
        keep = ~empty if name == "lse" else torch.ones_like(empty)
        if not keep.any():
            continue
        err = (g.double() - o)[keep].abs().max().item()
        base = (r.double() - o)[keep].abs().max().item()
        bound = tolerance(dtype, base)
        assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g} (reference error {base:.3g})"


def make_attention_inputs(b, s_q, s_k, h_q, h_k, d, dtype=torch.float32, h_ks=None, dv=None, packed=False):
    """(q_normal, q_scaled, k_normal, k_scaled, v): [B, S, H, D], or [T, H, D] when packed."""
    h_ks = h_k if h_ks is None else h_ks
    dv = d if dv is None else dv
    lead_q, lead_k = ((s_q,), (s_k,)) if packed else ((b, s_q), (b, s_k))
    return (torch.randn(*lead_q, h_q, d).to(dtype), torch.randn(*lead_q, h_q, d).to(dtype),
            torch.randn(*lead_k, h_k, d).to(dtype), torch.randn(*lead_k, h_ks, d).to(dtype),
            torch.randn(*lead_k, h_k, dv).to(dtype))


def run_attention(ins, window, backend, **kw):
    """dpe_attention(*ins, window, return_lse=True, backend=backend, **kw): (out, lse)."""
    from dpe_kernels import dpe_attention

    return dpe_attention(*ins, window, return_lse=True, backend=backend, **kw)


@pytest.fixture
def fake_flash(monkeypatch):
    """The fake FA2 ``flash_attn`` (fakes/flash_attn.py) installed; returns its list of calls."""
    import dpe_kernels.backends.attention_flash as flash_backend
    from fakes.flash_attn import make_fake_flash_attn

    calls = []
    monkeypatch.setitem(sys.modules, "flash_attn", make_fake_flash_attn(calls))
    # The test seam: the flash backend, normally CUDA-only, accepts CPU tensors here.
    monkeypatch.setattr(flash_backend, "available",
                        lambda device: torch.device(device).type in ("cuda", "cpu") and
                        flash_backend.flash_module() is not None)
    return calls
