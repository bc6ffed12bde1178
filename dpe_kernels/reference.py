"""The float64-capable oracles, in one place: what a parity tester compares against.

* :func:`rope_reference`: the unfused DPE rotary step, written the way the
  authors' code does it (also the benchmark baseline of the fused kernels).
* :func:`attention_reference`: the attention formula of docs/method.md with the full logit
  matrix (small sizes only).
* :func:`decode_rerotate_reference`: the authors' decode step, which keeps keys
  unrotated and re-rotates the whole cache at every step (the equivalence oracle
  of the rotate-once cache and a benchmark baseline).
* :func:`paged_attention_reference`: the paged oracle (each sequence's pages
  gathered by :func:`gather_sequence`, then :func:`attention_reference`);
  :func:`paged_attention_rotary_reference` the same over a cache of UNROTATED keys, each
  sequence rotated at its own configuration from a cos/sin table.

Each computes in float64 for float64 inputs (or ``compute_dtype=torch.float64``)
and does no input validation beyond its own shape checks: the public ops
(``dpe_rope(..., backend="reference")``, ``dpe_attention(..., backend="reference")``)
validate first.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from .config import DPEConfig

__all__ = ["rope_reference", "attention_reference", "decode_rerotate_reference", "rope_cos_sin",
           "rotate_pairs", "gather_sequence", "paged_attention_reference", "table_rotate", "rotary_indices",
           "paged_attention_rotary_reference"]

_INF = float("inf")

# --------------------------------------------------------------------------- rope
def rope_cos_sin(index: torch.Tensor, inv_freq: torch.Tensor, compute_dtype: torch.dtype):
    """cos and sin of the angles ``float32(index) * inv_freq``: ``[..., P]`` each."""
    # The angle is float32(index) * inv_freq in float32, as Hugging Face does;
    # only then is it widened (to float64 for the float64 oracle).
    angle = (index.to(torch.float32)[..., None] * inv_freq).to(compute_dtype)
    return angle.cos(), angle.sin()


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool) -> torch.Tensor:
    """x: [..., H, R]; cos/sin: [..., P] per token, broadcast over heads."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    if neox:
        x1, x2 = x.chunk(2, dim=-1)
        cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
        rotated = torch.cat([-x2, x1], -1)
    else:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        cos, sin = cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)
        rotated = torch.stack([-x2, x1], -1).flatten(-2)
    return x * cos + rotated * sin


def rope_reference(q, k, positions, inv_freq, config: DPEConfig, mask=None, *, layout="neox",
                   rotary_dim=None, compute_dtype: torch.dtype = torch.float32):
    """Unfused PyTorch DPE rotary step, structured like the authors' code.

    One cos/sin table per group scale over all pairs, sliced to the group's
    pairs and concatenated; both rotations computed for every head; the
    scaled result selected per key dimension with ``where``; KV heads copied
    to every query head for a per-query-head mask. Computes in
    ``compute_dtype`` (float64 makes it the test oracle) and returns that
    dtype if it is float64, else the dtype of q. No input validation: call
    :func:`dpe_kernels.dpe_rope` with ``backend="reference"`` for that.
    """
    out_dtype = torch.float64 if compute_dtype == torch.float64 else q.dtype
    d = q.shape[-1]
    rotary_dim = d if rotary_dim is None else rotary_dim
    neox = layout == "neox"
    w = config.window
    pos = positions.to(torch.int64)
    if q.dim() == 4 and pos.dim() == 1:
        pos = pos[None]

    cos_n, sin_n = rope_cos_sin(pos, inv_freq, compute_dtype)
    cq, sq, ck, sk = [], [], [], []
    for s, b0, b1 in zip(config.scales, config.group_boundaries, config.group_boundaries[1:]):
        c, si = rope_cos_sin(pos // s + (w - w // s), inv_freq, compute_dtype)
        cq.append(c[..., b0:b1])
        sq.append(si[..., b0:b1])
        c, si = rope_cos_sin(pos // s, inv_freq, compute_dtype)
        ck.append(c[..., b0:b1])
        sk.append(si[..., b0:b1])
    cos_qs, sin_qs = torch.cat(cq, -1), torch.cat(sq, -1)
    cos_ks, sin_ks = torch.cat(ck, -1), torch.cat(sk, -1)

    hq, hk = q.shape[-2], k.shape[-2]
    if mask is not None:
        mask_dims = torch.cat([mask, mask], -1) if neox else mask.repeat_interleave(2, -1)  # [H_m, R]
        if mask.shape[0] != hk:  # per query head: the authors copy KV heads to every query head
            k = k.repeat_interleave(hq // hk, dim=-2)
    qr, q_pass = q[..., :rotary_dim].to(compute_dtype), q[..., rotary_dim:].to(compute_dtype)
    kr = k[..., :rotary_dim].to(compute_dtype)
    k_pass = k[..., rotary_dim:].to(compute_dtype)

    q_normal = rotate_pairs(qr, cos_n, sin_n, neox)
    q_scaled = rotate_pairs(qr, cos_qs, sin_qs, neox)
    k_normal_all = rotate_pairs(kr, cos_n, sin_n, neox)
    k_scaled = rotate_pairs(kr, cos_ks, sin_ks, neox)
    if mask is not None:
        q_mask = mask_dims if mask.shape[0] == hq else mask_dims.repeat_interleave(hq // hk, 0)
        q_scaled = torch.where(q_mask, q_scaled, q_normal)
        k_scaled = torch.where(mask_dims, k_scaled, k_normal_all)
        # k_normal keeps H_k heads: take one copy per KV head.
        k_normal = k_normal_all if mask.shape[0] == hk else k_normal_all[..., :: hq // hk, :]
        k_pass_n = k_pass if mask.shape[0] == hk else k_pass[..., :: hq // hk, :]
    else:
        k_normal, k_pass_n = k_normal_all, k_pass

    def finish(rot, rest):
        return torch.cat([rot, rest], -1).to(out_dtype)

    return (finish(q_normal, q_pass), finish(k_normal, k_pass_n), finish(q_scaled, q_pass),
            finish(k_scaled, k_pass))


# --------------------------------------------------------------------------- attention
def attention_reference(q_normal, q_scaled, k_normal, k_scaled, v, window, softmax_scale=None, *,
                        key_padding_mask=None, cu_seqlens_q=None, cu_seqlens_k=None):
    """The formula of docs/method.md with the full ``[B, H_q, S_q, S_k]`` logit matrix.

    KV heads are repeated per query head, both logit matrices are formed and
    selected by distance, causal/padding masked, one softmax. Computes in
    float64 for float64 inputs (returns float64 out and lse), else in float32
    (out in the dtype of q, lse float32). No validation: call
    :func:`dpe_kernels.dpe_attention` with ``backend="reference"`` for that. Small sizes only.
    """
    if cu_seqlens_q is not None:
        cq, ck = [int(x) for x in cu_seqlens_q.tolist()], [int(x) for x in cu_seqlens_k.tolist()]
        lse_dtype = torch.float64 if q_normal.dtype == torch.float64 else torch.float32
        out = q_normal.new_zeros((*q_normal.shape[:-1], v.shape[-1]))
        lse = torch.full(q_normal.shape[:-1], -_INF, dtype=lse_dtype, device=q_normal.device)
        for b in range(len(cq) - 1):
            qa, qb, ka, kb = cq[b], cq[b + 1], ck[b], ck[b + 1]
            if qb == qa:
                continue
            o, l = attention_reference(q_normal[None, qa:qb], q_scaled[None, qa:qb], k_normal[None, ka:kb],
                                       k_scaled[None, ka:kb], v[None, ka:kb], window, softmax_scale)
            out[qa:qb] = o[0]
            lse[qa:qb] = l[0]
        return out, lse

    cdt = torch.float64 if q_normal.dtype == torch.float64 else torch.float32
    b, s_q, h_q, d = q_normal.shape
    s_k = k_normal.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    dev = q_normal.device

    def heads(x):  # [B, S, h, X] -> [B, H_q, S, X] in cdt, KV heads copied per query head
        x = x.to(cdt).transpose(1, 2)
        return x.repeat_interleave(h_q // x.shape[1], dim=1) if x.shape[1] != h_q else x

    logit_n = heads(q_normal) @ heads(k_normal).transpose(-1, -2) * scale
    logit_s = heads(q_scaled) @ heads(k_scaled).transpose(-1, -2) * scale
    q_pos = torch.arange(s_q, device=dev) + (s_k - s_q)
    k_pos = torch.arange(s_k, device=dev)
    dist = q_pos[:, None] - k_pos[None, :]
    logits = torch.where(dist < window, logit_n, logit_s)
    allowed = (dist >= 0)[None, None]
    if key_padding_mask is not None:
        kpm = key_padding_mask.to(dev)
        allowed = allowed & kpm[:, None, None, :] & kpm[:, None, s_k - s_q:, None]
    logits = logits.masked_fill(~allowed, -_INF)
    lse = torch.logsumexp(logits, dim=-1)  # -inf for a row with no key
    probs = torch.exp(logits - torch.where(lse == -_INF, 0.0, lse)[..., None])
    out = probs @ heads(v)
    out_dtype = torch.float64 if cdt == torch.float64 else q_normal.dtype
    return out.transpose(1, 2).to(out_dtype), lse.transpose(1, 2).contiguous()


# --------------------------------------------------------------------------- paged
def gather_sequence(cache: torch.Tensor, block_table: torch.Tensor, b: int, seq_len: int) -> torch.Tensor:
    """Keys ``0 .. seq_len-1`` of sequence ``b`` of a paged cache as one contiguous ``[seq_len, H, D]`` copy."""
    bs = cache.shape[1]
    n_blocks = (seq_len + bs - 1) // bs
    idx = block_table[b, :n_blocks].to(torch.int64)
    return cache.index_select(0, idx).reshape(n_blocks * bs, *cache.shape[2:])[:seq_len]


def paged_attention_reference(q_normal, q_scaled, k_cache, ks_cache, v_cache, block_table, seq_lens,
                              query_start_loc, window, softmax_scale, out, lse):
    """Oracle of paged attention: gather every sequence's pages and run :func:`attention_reference`
    (float64 inputs compute in float64). Writes ``out`` / ``lse`` rows of sequences with queries;
    leaves the others."""
    qsl = [int(x) for x in query_start_loc.tolist()]
    lens = [int(x) for x in seq_lens.tolist()]
    for b, n in enumerate(lens):
        qa, qb = qsl[b], qsl[b + 1]
        if qb == qa:
            continue
        kn, ks, v = (gather_sequence(c, block_table, b, n)[None] for c in (k_cache, ks_cache, v_cache))
        o, l = attention_reference(q_normal[None, qa:qb], q_scaled[None, qa:qb], kn, ks, v, window, softmax_scale)
        out[qa:qb] = o[0]
        lse[qa:qb] = l[0]


# ------------------------------------------------------------------------------- authors' decode
def decode_rerotate_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    position: Union[int, torch.Tensor, None],
    inv_freq: torch.Tensor,
    config: DPEConfig,
    mask: Optional[torch.Tensor] = None,
    *,
    softmax_scale: Optional[float] = None,
    layout: str = "neox",
    rotary_dim: Optional[int] = None,
) -> torch.Tensor:
    """One DPE decode step as the authors' code computes it (re-rotating the cache).

    The cache holds UNROTATED keys; the new query is left unrotated, and
    every cached key is rotated, at every step, by minus its relative
    distance to the query (docs/method.md, "Attention"): for a query at ``m`` and a key
    at ``n``, pair ``i`` of group scale ``s``:

    * normal keys: ``-(m - n)``;
    * scaled keys, key dimension (mask True): ``-((m // s + w - w // s) - n // s)``;
    * scaled keys, other dims (mask False): ``-(m - n)``;

    then logits ``<q, k_normal> * scale`` where ``m - n < w``, else
    ``<q, k_scaled> * scale``, one softmax, and the output. With a
    per-query-head mask the KV heads are copied to every query head, as the
    authors do. Vectorised over keys (no Python loop over tokens); memory
    ``O(S_k * H * D)`` per call. Test oracle and benchmark baseline only.

    Args:
        q: ``[B, 1, H_q, D]``, unrotated.
        k_cache: ``[B, S_k, H_k, D]``, unrotated; the last key is the query's own token.
        v_cache: ``[B, S_k, H_k, Dv]``.
        position: the query's absolute position ``m`` (int, or int tensor
            ``[B]`` per row); key ``j`` sits at ``m - (S_k - 1 - j)``, and keys
            at negative positions (left padding) are ignored. None: ``S_k - 1``.
        inv_freq, config, mask, layout, rotary_dim: as for ``dpe_rope``
            (``mask`` is this layer's ``[H_q or H_k, P]``).
        softmax_scale: default ``1 / sqrt(D)``.

    Returns:
        ``[B, 1, H_q, Dv]`` in the dtype of ``q`` (computed in float64 for
        float64 inputs, else float32). Angles are ``float32(index) * inv_freq``
        as in :func:`rope_reference`.
    """
    if q.dim() != 4 or q.shape[1] != 1:
        raise ValueError(f"q must be [B, 1, H_q, D], got shape {list(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape[0] != q.shape[0] or k_cache.shape[3] != q.shape[3]:
        raise ValueError(f"k_cache must be [B, S_k, H_k, D] with the B and D of q, got {list(k_cache.shape)}")
    if v_cache.dim() != 4 or v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"v_cache must be [B, S_k, H_k, Dv] like k_cache, got {list(v_cache.shape)}")
    if not isinstance(config, DPEConfig):
        raise TypeError(f"config must be a DPEConfig, got {type(config).__name__}")
    if layout not in ("neox", "gptj"):
        raise ValueError(f"layout must be 'neox' or 'gptj', got {layout!r}")
    b, s_k, hk, d = k_cache.shape
    hq = q.shape[2]
    if hk == 0 or hq % hk:
        raise ValueError(f"the number of q heads ({hq}) must be a multiple of the number of k_cache heads ({hk})")
    rep = hq // hk
    rotary_dim = d if rotary_dim is None else rotary_dim
    npairs = rotary_dim // 2
    if config.num_pairs != npairs or inv_freq.shape != (npairs,):
        raise ValueError(f"config and inv_freq must cover the {npairs} pairs of rotary_dim={rotary_dim}")
    if mask is None and config.mask is not None:
        raise ValueError("config has a per-layer mask: pass this layer's mask=")
    if mask is not None and (mask.dim() != 2 or mask.shape[1] != npairs or mask.shape[0] not in (hq, hk)):
        raise ValueError(f"mask must be [H_q={hq} or H_k={hk}, P={npairs}], got {list(mask.shape)}")
    dev = q.device
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = d ** -0.5 if softmax_scale is None else float(softmax_scale)
    w, neox = config.window, layout == "neox"

    if position is None:
        position = s_k - 1
    m = torch.as_tensor(position, dtype=torch.int64, device=dev).reshape(-1)
    if m.numel() not in (1, b):
        raise ValueError(f"position must be an int or [B={b}] ints, got {list(m.shape)}")
    m = m.expand(b)[:, None]                                            # [B, 1]
    n = m - (s_k - 1) + torch.arange(s_k, device=dev)[None]             # [B, S_k] key positions
    dist = m - n                                                        # >= 0

    # Rotation of every cached key by minus its relative distance: one cos/sin
    # table per group scale, sliced to the group's pairs (the authors' layout).
    cos_n, sin_n = rope_cos_sin(-dist, inv_freq, compute)                   # [B, S_k, P]
    cs, ss = [], []
    for s, b0, b1 in zip(config.scales, config.group_boundaries, config.group_boundaries[1:]):
        c, si = rope_cos_sin(n // s - (m // s + (w - w // s)), inv_freq, compute)
        cs.append(c[..., b0:b1])
        ss.append(si[..., b0:b1])
    cos_s, sin_s = torch.cat(cs, -1), torch.cat(ss, -1)

    kr = k_cache[..., :rotary_dim].to(compute)
    k_pass = k_cache[..., rotary_dim:].to(compute)
    k_norm = torch.cat([rotate_pairs(kr, cos_n, sin_n, neox), k_pass], -1)   # [B, S_k, H_k, D]
    k_scal = torch.cat([rotate_pairs(kr, cos_s, sin_s, neox), k_pass], -1)
    if mask is not None:
        mask_dims = torch.cat([mask, mask], -1) if neox else mask.repeat_interleave(2, -1)
        mask_dims = torch.cat([mask_dims, mask_dims.new_zeros(mask.shape[0], d - rotary_dim)], -1)
        if mask.shape[0] != hk:  # per query head: KV heads copied to every query head
            k_norm_h = k_norm.repeat_interleave(rep, dim=2)
            k_scal = torch.where(mask_dims, k_scal.repeat_interleave(rep, dim=2), k_norm_h)
        else:
            k_scal = torch.where(mask_dims, k_scal, k_norm)
    hs = k_scal.shape[2]

    qc = q[:, 0].to(compute)                                            # [B, H_q, D], unrotated
    # Logits per query head against its KV head, without copying KV for the normal pass.
    ln = torch.einsum("bkrd,bskd->bkrs", qc.view(b, hk, rep, d), k_norm).reshape(b, hq, s_k)
    if hs == hk:
        ls = torch.einsum("bkrd,bskd->bkrs", qc.view(b, hk, rep, d), k_scal).reshape(b, hq, s_k)
    else:
        ls = torch.einsum("bhd,bshd->bhs", qc, k_scal)
    logits = torch.where((dist < w)[:, None], ln, ls) * scale           # [B, H_q, S_k]
    logits = logits.masked_fill((n < 0)[:, None], float("-inf"))
    p = torch.softmax(logits, -1).nan_to_num(0.0)
    out = torch.einsum("bkrs,bskd->bkrd", p.view(b, hk, rep, s_k), v_cache.to(compute))
    return out.reshape(b, 1, hq, v_cache.shape[3]).to(q.dtype)


# --------------------------------------------------------------------------- paged, unrotated keys
def table_rotate(x: torch.Tensor, index: torch.Tensor, cos_sin: torch.Tensor, rotary_dim: int, neox: bool,
                 compute_dtype: torch.dtype) -> torch.Tensor:
    """``x [S, H, D]`` rotated pair by pair at the table rows ``index [S, H, P]`` (int64) of
    ``cos_sin [N, 2P]`` (cos | sin); dims past ``rotary_dim`` pass through. Returns ``compute_dtype``."""
    p = rotary_dim // 2
    pair = torch.arange(p, device=x.device)
    cos = cos_sin[index, pair].to(compute_dtype)  # [S, H, P]
    sin = cos_sin[index, p + pair].to(compute_dtype)
    xr = x[..., :rotary_dim].to(compute_dtype)
    if neox:
        a, b = xr[..., :p], xr[..., p:]
        rot = torch.cat([a * cos - b * sin, a * sin + b * cos], -1)
    else:
        a, b = xr[..., 0::2], xr[..., 1::2]
        rot = torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)
    return torch.cat([rot, x[..., rotary_dim:].to(compute_dtype)], -1)


def rotary_indices(pos: torch.Tensor, pair_scale: torch.Tensor, window: int, key_dims: torch.Tensor):
    """Table rows of tokens at positions ``pos [S]`` for the heads of ``key_dims [H, P]`` (bool):
    ``(normal [S, H, P], q_scaled [S, H, P], k_scaled [S, H, P])`` as docs/method.md remaps them.
    A query before the window's end (``pos < window``) reads no scaled key: its scaled row is its
    normal one, so no row past the last position is ever needed."""
    pos = pos.to(torch.int64)[:, None, None]
    s = pair_scale.to(torch.int64)[None, None, :]
    kd = key_dims[None]
    normal = pos.expand(-1, key_dims.shape[0], -1)
    k_scaled = torch.where(kd, pos // s, pos)
    q_scaled = torch.where(kd & (pos >= window), pos // s + (window - window // s), pos)
    return normal, q_scaled, k_scaled


def paged_attention_rotary_reference(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, cos_sin,
                                     pair_scale, window, seq_config, mask, rotary_dim, neox, softmax_scale,
                                     out, lse):
    """Oracle of :func:`dpe_kernels.dpe_paged_attention_rotary`: for each sequence, its unrotated keys
    gathered and rotated at their positions (normal, and scaled per query head), its queries rotated
    at theirs (rotated in float32 and rounded to ``q``'s dtype, where every backend uses them), then
    :func:`attention_reference` (float64 math for float64 ``q``). Writes ``out`` /
    ``lse`` rows of sequences with queries; leaves the others."""
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qsl = [int(x) for x in query_start_loc.tolist()]
    lens = [int(x) for x in seq_lens.tolist()]
    cfgs = [int(x) for x in seq_config.tolist()]
    h_q, h_k = q.shape[1], k_cache.shape[2]
    n_rep = h_q // h_k
    p = rotary_dim // 2
    for b, n in enumerate(lens):
        qa, qb = qsl[b], qsl[b + 1]
        if qb == qa:
            continue
        c = cfgs[b]
        w = int(window[c])
        kd = mask[c].to(torch.bool) if mask is not None else torch.ones(h_q, p, dtype=torch.bool, device=q.device)
        k = gather_sequence(k_cache, block_table, b, n).repeat_interleave(n_rep, 1)  # [n, H_q, D]
        v = gather_sequence(v_cache, block_table, b, n)
        kn_i, _, ks_i = rotary_indices(torch.arange(n, device=q.device), pair_scale[c], w, kd)
        qn_i, qs_i, _ = rotary_indices(torch.arange(n - (qb - qa), n, device=q.device), pair_scale[c], w, kd)
        def rot(x, index):  # operands in q's dtype, as a rotated cache would hold them (exact for float64)
            return table_rotate(x, index, cos_sin, rotary_dim, neox, cdt).to(q.dtype).to(cdt)

        o, l = attention_reference(rot(q[qa:qb], qn_i)[None], rot(q[qa:qb], qs_i)[None], rot(k, kn_i)[None],
                                   rot(k, ks_i)[None], v.to(cdt)[None], w, softmax_scale)
        out[qa:qb] = o[0].to(out.dtype)
        lse[qa:qb] = l[0].to(lse.dtype)
