"""backends/attention_cpu.py on its own: many window blocks, padded and packed rows, linear
memory (no S x S matrix, no copied K/V). Its parity with the float64 oracle over shapes and
dtypes runs in test_attention.py (the ``cpu`` backend parameter)."""
import pytest
import torch

import dpe_kernels.backends.attention_cpu as cpu_backend
from conftest import assert_attention_close, make_attention_inputs as make, run_attention as run

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEADS = [(2, 2, 2), (6, 2, 2), (6, 2, 6)]  # (H_q, H_k, heads of k_scaled): MHA, GQA 3:1, per-q-head k_scaled


@pytest.mark.parametrize("rows", [8, 48, 256])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: "x".join(map(str, h)))
def test_cpu_blocks(monkeypatch, rows, heads):
    """Long prefill (S >> w) through many window blocks, block size not dividing S."""
    monkeypatch.setattr(cpu_backend, "CPU_WINDOW_ROWS", rows)
    h_q, h_k, h_ks = heads
    for dtype in DTYPES:
        ins = make(2, 301, 301, h_q, h_k, 16, dtype, h_ks=h_ks)
        out, lse = run(ins, 37, "cpu")
        assert_attention_close(out, lse, ins, 37)


@pytest.mark.parametrize("s_q", [120, 50, 2])
def test_cpu_blocks_padded_and_varlen(monkeypatch, s_q):
    """Many window blocks inside padded rows and packed sequences (block views at storage offsets)."""
    monkeypatch.setattr(cpu_backend, "CPU_WINDOW_ROWS", 16)
    s_k, window, lengths = 120, 9, [120, 77, 5]
    ins = make(len(lengths), s_q, s_k, 4, 2, 16, h_ks=4)
    kpm = torch.zeros(len(lengths), s_k, dtype=torch.bool)
    for b, n in enumerate(lengths):
        kpm[b, s_k - n:] = True
    out, lse = run(ins, window, "cpu", key_padding_mask=kpm)
    assert_attention_close(out, lse, ins, window, key_padding_mask=kpm)
    # the same sequences packed
    qsel = [(b, j) for b, n in enumerate(lengths) for j in range(s_q - min(s_q, n), s_q)]
    ksel = [(b, j) for b, n in enumerate(lengths) for j in range(s_k - n, s_k)]
    packed = tuple(t[[b for b, _ in sel], [j for _, j in sel]]
                   for t, sel in zip(ins, (qsel, qsel, ksel, ksel, ksel)))
    cu_q = torch.tensor([0] + list(torch.tensor([min(s_q, n) for n in lengths]).cumsum(0)))
    cu_k = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)))
    o_p, l_p = run(packed, window, "cpu", cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert_attention_close(o_p, l_p, packed, window, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert torch.allclose(o_p, out[[b for b, _ in qsel], [j for _, j in qsel]], atol=1e-5)


def test_cpu_backend_memory_is_linear(monkeypatch):
    """No S x S mask or score matrix and no copied K/V: every call of the aten
    op gets at most a (rows x (rows + w - 1)) band mask, and K/V that are views
    of the caller's k_normal / k_scaled / v storage with H_k heads."""
    seen = []
    real = cpu_backend._CPU_OP

    def spy(q, k, v, dropout_p, causal, attn_mask=None, scale=None):
        seen.append((tuple(q.shape), k, v, None if attn_mask is None else tuple(attn_mask.shape)))
        return real(q, k, v, dropout_p, causal, attn_mask=attn_mask, scale=scale)

    monkeypatch.setattr(cpu_backend, "_CPU_OP", spy)
    s, w = 700, 64
    ins = make(1, s, s, 8, 2, 16)
    out, lse = run(ins, w, "cpu")
    storages = {t.untyped_storage().data_ptr() for t in ins[2:]}
    rows = cpu_backend.CPU_WINDOW_ROWS
    for q_shape, k, v, mask_shape in seen:
        assert k.shape[1] == 2 and v.shape[1] == 2, "KV heads were repeated"
        assert k.untyped_storage().data_ptr() in storages and v.untyped_storage().data_ptr() in storages
        if mask_shape is not None:
            assert mask_shape[0] <= rows and mask_shape[1] <= rows + w - 1, mask_shape
    assert any(m is None and q[2] == s - w for q, _, _, m in seen), "the scaled pass is one causal call"
    assert len(seen) <= 4, "the window pass is a few calls, not one per block"
    assert_attention_close(out, lse, ins, w)
