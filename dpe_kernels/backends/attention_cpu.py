"""The ``cpu`` attention backend: two passes of
``aten._scaled_dot_product_flash_attention_for_cpu`` (a sliding-window pass
with the normal q/k, block by block under a small band mask, and a causal
pass on shifted scaled q/k), merged by log-sum-exp. No ``S x S`` matrix or
mask; GQA without copying KV heads. It does not validate: its caller has
(:class:`~dpe_kernels.backends.shapes.AttentionInfo` carries what it learnt)."""
from __future__ import annotations

import torch

from ..merge import merge_partials_nonempty
from ..utils import host_ints
from .shapes import AttentionInfo

__all__ = ["cpu_attention", "available", "CPU_WINDOW_ROWS"]

_INF = float("inf")
_CPU_OP = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)

# Window pass: query rows per block, counted after folding the n_rep query
# heads of a KV head into the rows (256 rows: the aten kernel's 64-row
# tiles). A block of b positions attends to b + window - 1 keys under a band
# mask, so about b logits per query are masked-out waste; folding keeps b
# small (256 / n_rep) while the kernel gets enough rows.
CPU_WINDOW_ROWS = 256


def available(device: torch.device) -> bool:
    """CPU tensors, with the aten CPU flash-attention op present."""
    return device.type == "cpu" and _CPU_OP is not None


def _op_cpu(q, k, v, scale, causal, mask=None):
    """aten._scaled_dot_product_flash_attention_for_cpu on ``[B, H, S, D]``
    tensors (any strides with a unit last stride, overlapping views included;
    one head_dim for q, k and v). Returns (out [B, H, S_q, D], lse [B, H, S_q]
    float32; a row whose keys are all masked gets lse 0, not -inf: callers
    never pass one)."""
    return _CPU_OP(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)


def _sdpa_cpu(q, k, v, scale, causal):
    """One attention call on ``[B, S, H, D]``-layout views (transposed to
    ``[B, H, S, D]`` without a copy; the op honours strides). ``k`` has H_k
    heads (native GQA: query head h reads KV head h // n_rep, no copy) or H_q
    heads with ``v`` at H_k (then one call per query-head residue r, on
    strided head views). Causal is top-left aligned. Returns ``(out [B, S_q,
    H_q, Dv], lse [B, S_q, H_q])`` (callers never pass a row without keys)."""
    h_q, h_k, h_v = q.shape[2], k.shape[2], v.shape[2]
    if h_k != h_v:  # per-query-head keys against per-KV-head values
        n_rep = h_q // h_v
        out = q.new_empty((*q.shape[:3], v.shape[-1]))
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        for r in range(n_rep):
            o, l = _sdpa_cpu(q[:, :, r::n_rep], k[:, :, r::n_rep], v, scale, causal)
            out[:, :, r::n_rep] = o
            lse[:, :, r::n_rep] = l
        return out, lse
    o, l = _op_cpu(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale, causal)
    return o.transpose(1, 2), l.transpose(1, 2)


_band_cache: dict = {}


def _band_mask(rows: int, window: int, n_rep: int, dtype, device) -> torch.Tensor:
    """``[n_rep * rows, rows + window - 1]`` additive mask, the ``[rows, rows +
    window - 1]`` band (row i sees columns i .. i + window - 1) stacked n_rep
    times. Column c of a block whose first query sits at position p is key
    p - window + 1 + c. Cached (a few per run)."""
    key = (rows, window, n_rep, dtype, str(device))
    m = _band_cache.get(key)
    if m is None:
        c = torch.arange(rows + window - 1, device=device)
        i = torch.arange(rows, device=device)[:, None]
        ok = (c >= i) & (c <= i + window - 1)
        m = torch.zeros(ok.shape, dtype=dtype, device=device).masked_fill_(~ok, -_INF)
        m = m.repeat(n_rep, 1)
        if len(_band_cache) > 16:
            _band_cache.clear()
        _band_cache[key] = m
    return m


def _cpu_window_pass(qn, kn, v, window, scale, off, out, lse):
    """Window pass (distances 0 .. w-1) of every query, written to out/lse.

    * Queries at positions p < w see every key 0 .. p: plain causal attention
      (one call, or a non-causal prefix call + a causal call when off > 0).
    * The other queries go in blocks of ``block`` positions; the block starting
      at position pa sees keys pa-w+1 .. pa+block-1 through one ``[block,
      block + w - 1]`` band mask (about ``block`` masked-out logits per query:
      the waste). All full blocks of a sequence run as ONE call: the blocks
      are the batch dimension, each block's keys an overlapping strided view
      of K and V (no copy), the band mask broadcast over the batch.
    * GQA: the n_rep query heads of one KV head are folded into the query axis
      of each block (one copy of q), so each block has n_rep * block rows per
      KV head: the kernel runs its efficient tile sizes while a block spans
      few positions.

    Few calls in all: on a busy CPU every parallel op waits for its threads.
    """
    bsz, s_q, h_q, d = qn.shape
    h_k, dv = kn.shape[2], v.shape[-1]
    n_rep = h_q // h_k
    # Rows [0, j_a): positions < w, all their keys are in the window.
    j_a = min(s_q, max(0, window - off))
    if j_a:
        if off == 0:
            o, l = _sdpa_cpu(qn[:, :j_a], kn[:, :j_a], v[:, :j_a], scale, True)
        elif j_a == 1:
            o, l = _sdpa_cpu(qn[:, :1], kn[:, : off + 1], v[:, : off + 1], scale, False)
        else:
            o_p, l_p = _sdpa_cpu(qn[:, :j_a], kn[:, :off], v[:, :off], scale, False)
            o_c, l_c = _sdpa_cpu(qn[:, :j_a], kn[:, off: off + j_a], v[:, off: off + j_a], scale, True)
            o, l = merge_partials_nonempty(o_p, l_p, o_c, l_c)
        out[:, :j_a] = o
        lse[:, :j_a] = l
    n_b = s_q - j_a
    if n_b == 0:
        return
    if n_b == 1:  # (decode) one query sees every key of its window: no mask
        ka = off + j_a - window + 1
        o, l = _sdpa_cpu(qn[:, j_a:], kn[:, ka:], v[:, ka:], scale, False)
        out[:, j_a:] = o
        lse[:, j_a:] = l
        return
    block = max(16, CPU_WINDOW_ROWS // n_rep)
    n_blk, rem = divmod(n_b, block)
    if n_blk == 0:
        block, n_blk, rem = n_b, 1, 0
    kb = block + window - 1  # keys per block
    ka0 = off + j_a - window + 1  # first key of the first block (>= 1)
    sb, ss, sh, sd = kn.stride()
    vb, vs, vh, vd = v.stride()

    def fold(q, nblk, rows):  # [B, nblk*rows, H_q, D] -> [B, nblk, H_k, n_rep*rows, D] (one copy)
        q = q.reshape(bsz, nblk, rows, h_k, n_rep, d).permute(0, 1, 3, 4, 2, 5).contiguous()
        return q.view(bsz, nblk, h_k, n_rep * rows, d)

    def unfold_into(rows_sl, o, l, nblk, rows):  # o [B, nblk, H_k, n_rep*rows, Dv] -> out rows
        out[:, rows_sl].view(bsz, nblk, rows, h_k, n_rep, dv).copy_(
            o.view(bsz, nblk, h_k, n_rep, rows, dv).permute(0, 1, 4, 2, 3, 5))
        lse[:, rows_sl].view(bsz, nblk, rows, h_k, n_rep).copy_(
            l.view(bsz, nblk, h_k, n_rep, rows).permute(0, 1, 4, 2, 3))

    mask = _band_mask(block, window, n_rep, qn.dtype, qn.device)
    qf = fold(qn[:, j_a: j_a + n_blk * block], n_blk, block)
    outs, lses = [], []
    for b in range(bsz):  # (the batch dim carries the blocks: one call per sequence)
        k_win = kn.as_strided((n_blk, h_k, kb, d), (block * ss, sh, ss, sd),
                              kn.storage_offset() + b * sb + ka0 * ss)
        v_win = v.as_strided((n_blk, h_k, kb, dv), (block * vs, vh, vs, vd),
                             v.storage_offset() + b * vb + ka0 * vs)
        o, l = _op_cpu(qf[b], k_win, v_win, scale, False, mask)
        outs.append(o)
        lses.append(l)
    o_all = outs[0].unsqueeze(0) if bsz == 1 else torch.stack(outs)
    l_all = lses[0].unsqueeze(0) if bsz == 1 else torch.stack(lses)
    unfold_into(slice(j_a, j_a + n_blk * block), o_all, l_all, n_blk, block)
    if rem:  # the last, partial block
        ja = j_a + n_blk * block
        ka = off + ja - window + 1
        o, l = _op_cpu(fold(qn[:, ja:], 1, rem)[:, 0], kn[:, ka:].transpose(1, 2), v[:, ka:].transpose(1, 2),
                       scale, False, _band_mask(rem, window, n_rep, qn.dtype, qn.device))
        unfold_into(slice(ja, s_q), o.unsqueeze(1), l.unsqueeze(1), 1, rem)


def _cpu_scaled_pass(qs, ks, v, window, scale, j0):
    """Scaled logits, queries j >= j0 (position p = S_k - S_q + j), keys n <= p - window.
    Returns (out, lse) for those S_q - j0 queries."""
    s_q, s_k = qs.shape[1], ks.shape[1]
    q = qs[:, j0:]
    n_keys = s_k - window  # keys 0 .. S_k - w - 1 are ever seen
    if j0 > 0:
        # First query (position w) sees key 0 only: square, top-left causal.
        return _sdpa_cpu(q, ks[:, :n_keys], v[:, :n_keys], scale, True)
    prefix = n_keys - s_q  # keys every query sees
    if s_q == 1 or prefix == 0:
        return _sdpa_cpu(q, ks[:, :n_keys], v[:, :n_keys], scale, s_q > 1)
    o_p, l_p = _sdpa_cpu(q, ks[:, :prefix], v[:, :prefix], scale, False)
    o_c, l_c = _sdpa_cpu(q, ks[:, prefix:n_keys], v[:, prefix:n_keys], scale, True)
    return merge_partials_nonempty(o_p, l_p, o_c, l_c)


def _cpu_dense(qn, qs, kn, ks, v, window, scale, out, lse):
    """All B rows the same length (no padding): writes out [B, S_q, H_q, Dv], lse [B, S_q, H_q]."""
    s_q, s_k = qn.shape[1], kn.shape[1]
    if s_q == 0 or qn.shape[0] == 0:  # (the aten op must never see an empty dim)
        return
    off = s_k - s_q  # position of query 0
    _cpu_window_pass(qn, kn, v, window, scale, off, out, lse)
    # Scaled pass (distances >= w): the queries at positions >= w (rows j >= j0),
    # merged in place by lse; rows before j0 keep the window pass alone.
    j0 = max(0, window - off)
    if j0 < s_q:
        o_s, l_s = _cpu_scaled_pass(qs, ks, v, window, scale, j0)
        _, l = merge_partials_nonempty(out[:, j0:], lse[:, j0:], o_s, l_s, out=out[:, j0:])
        lse[:, j0:] = l


def _as_last_dim_contiguous(t):
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def cpu_attention(qn, qs, kn, ks, v, window, scale, key_padding_mask, info: AttentionInfo):
    """``(out, lse)`` of DPE attention on CPU tensors (inputs already validated)."""
    qn, qs, kn, ks, v = (_as_last_dim_contiguous(t) for t in (qn, qs, kn, ks, v))
    if info.Dv != info.D:
        # The aten op wants one head_dim for q, k and v: zero-pad the narrower
        # side (a copy; zero dims change no logit and no output).
        pad = torch.nn.functional.pad
        if info.Dv < info.D:
            v = pad(v, (0, info.D - info.Dv))
        else:
            qn, qs, kn, ks = (pad(t, (0, info.Dv - info.D)) for t in (qn, qs, kn, ks))
        out, lse = cpu_attention(qn, qs, kn, ks, v, window, scale, key_padding_mask,
                                  info.with_head_dims(max(info.D, info.Dv)))
        return out[..., : info.Dv].contiguous(), lse
    out_shape = (*qn.shape[:-1], info.Dv)
    if info.varlen:
        out = qn.new_zeros(out_shape)
        lse = torch.full(qn.shape[:-1], -_INF, dtype=torch.float32, device=qn.device)
        for qa, sq, ka, sk in info.seqlens:
            if sq == 0:
                continue
            sl_q, sl_k = slice(qa, qa + sq), slice(ka, ka + sk)
            _cpu_dense(qn[None, sl_q], qs[None, sl_q], kn[None, sl_k], ks[None, sl_k], v[None, sl_k],
                       window, scale, out[None, sl_q], lse[None, sl_q])
        return out, lse
    s_q, s_k = info.S_q, info.S_k
    lengths = None
    if key_padding_mask is not None and s_k > 0:
        lengths = host_ints(key_padding_mask.sum(1))
        if all(n == s_k for n in lengths):
            lengths = None
    if lengths is None:
        out = qn.new_empty(out_shape)
        lse = torch.empty(qn.shape[:-1], dtype=torch.float32, device=qn.device)
        _cpu_dense(qn, qs, kn, ks, v, window, scale, out, lse)
        return out, lse
    out = qn.new_zeros(out_shape)
    lse = torch.full(qn.shape[:-1], -_INF, dtype=torch.float32, device=qn.device)
    for b, n in enumerate(lengths):  # left padding: row b's real tokens are its last n slots
        nq = min(s_q, n)
        if nq == 0:
            continue
        bs = slice(b, b + 1)
        _cpu_dense(qn[bs, s_q - nq:], qs[bs, s_q - nq:], kn[bs, s_k - n:], ks[bs, s_k - n:],
                   v[bs, s_k - n:], window, scale, out[bs, s_q - nq:], lse[bs, s_q - nq:])
    return out, lse
