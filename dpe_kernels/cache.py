"""Decoding with DPE: a key/value cache rotated once, and the authors' re-rotating decode.

SPEC "Attention": rotations compose, so a key rotated ONCE at its absolute
normal index ``n`` and at its scaled indices ``n // s_g`` gives, against a
query rotated at ``m`` and at ``m // s_g + (w - w // s_g)``, exactly the
logits of the authors' decode path, which keeps the keys unrotated and
re-rotates the whole cache at every step by minus each key's relative
distance. So a DPE cache is an ordinary cache of three tensors
(``k_normal, k_scaled, v``) and a decode step is ``dpe_rope`` of the new
tokens, an append, and ``dpe_attention`` with ``S_q`` = the new tokens.

* :class:`DPEKVCache`: per-layer ``k_normal, k_scaled, v`` in preallocated
  buffers that grow by amortised doubling (appends copy the new tokens in;
  there is no ``torch.cat`` of the whole cache per step).
* :func:`dpe_attention_step`: rope the new tokens, append, attend (a thin
  composition of the three public pieces).
* :func:`decode_rerotate_reference`: the authors' formulation, vectorised
  over keys; the equivalence oracle of the tests and the baseline of
  ``bench/bench_attention.py``.
"""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch

from .config import DPEConfig, _is_int
from .rope import _cos_sin, _rotate, check_inference_only, dpe_rope

__all__ = ["DPEKVCache", "dpe_attention_step", "decode_rerotate_reference"]

_CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class _LayerCache:
    __slots__ = ("k_normal", "k_scaled", "v", "length")

    def __init__(self):
        self.k_normal: Optional[torch.Tensor] = None  # [B, capacity, H_k, D]
        self.k_scaled: Optional[torch.Tensor] = None  # [B, capacity, H_k or H_q, D]
        self.v: Optional[torch.Tensor] = None         # [B, capacity, H_k, Dv]
        self.length = 0

    @property
    def capacity(self) -> int:
        return 0 if self.k_normal is None else self.k_normal.shape[1]

    def views(self):
        n = self.length
        return self.k_normal[:, :n], self.k_scaled[:, :n], self.v[:, :n]


class DPEKVCache:
    """Key/value cache for DPE attention: keys rotated once, at insertion.

    Per layer it holds ``k_normal``, ``k_scaled`` (as returned by
    :func:`~dpe_kernels.dpe_rope` at the tokens' absolute positions) and
    ``v``, each ``[B, S, H, D]`` (``k_scaled`` has ``H_q`` heads when the
    rotary mask is per query head; ``v`` may have its own head dim). The
    buffers are preallocated; when an append does not fit, the capacity
    becomes ``max(2 * capacity, needed)`` and the old contents are copied
    once, so a generation of ``S`` tokens copies ``O(S)`` tokens in total.
    Pass ``initial_capacity`` = the longest sequence you expect to never
    reallocate.

    Batches with unequal lengths use left padding (as Hugging Face batched
    generation does): the caller rotates each row's tokens at that row's
    positions and passes its ``key_padding_mask`` ``[B, S_k]`` to
    ``dpe_attention``; the cache itself only stores tensors.

    Inference only (like ``dpe_rope``): inputs that require grad while grad
    mode is on raise ``ValueError``.

    Args:
        num_layers: number of layers (``layer`` arguments index ``0 .. num_layers-1``).
        initial_capacity: tokens per layer allocated at the first append
            (more if the first append is longer).
    """

    def __init__(self, num_layers: int, *, initial_capacity: int = 256):
        if not _is_int(num_layers):
            raise TypeError(f"num_layers must be an int, got {type(num_layers).__name__}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if not _is_int(initial_capacity):
            raise TypeError(f"initial_capacity must be an int, got {type(initial_capacity).__name__}")
        if initial_capacity < 1:
            raise ValueError(f"initial_capacity must be >= 1, got {initial_capacity}")
        self.num_layers = num_layers
        self.initial_capacity = initial_capacity
        self._layers: List[_LayerCache] = [_LayerCache() for _ in range(num_layers)]

    # ------------------------------------------------------------------ queries
    def _layer(self, layer) -> _LayerCache:
        if not _is_int(layer):
            raise TypeError(f"layer must be an int, got {type(layer).__name__}")
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer}")
        return self._layers[layer]

    def get_seq_length(self, layer: int = 0) -> int:
        """Number of tokens cached in ``layer`` (0 before its first append)."""
        return self._layer(layer).length

    def get_capacity(self, layer: int = 0) -> int:
        """Tokens ``layer`` can hold before its buffers grow (0 before its first append)."""
        return self._layer(layer).capacity

    def __len__(self) -> int:
        return self.num_layers

    def __repr__(self) -> str:
        lens = [c.length for c in self._layers]
        return f"DPEKVCache(num_layers={self.num_layers}, seq_lengths={lens})"

    # ------------------------------------------------------------------ updates
    def update(self, layer: int, k_normal: torch.Tensor, k_scaled: torch.Tensor,
               v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append the new tokens of ``layer`` and return views of everything cached.

        Args:
            layer: layer index.
            k_normal: ``[B, S_new, H_k, D]``, keys rotated at their normal positions.
            k_scaled: ``[B, S_new, H_k or H_q, D]``, keys rotated at their scaled positions.
            v: ``[B, S_new, H_k, Dv]``.

        Returns:
            ``(k_normal, k_scaled, v)``, views ``[B, S_cached + S_new, H, D]`` of
            the cache buffers, ready for ``dpe_attention(q_normal, q_scaled,
            k_normal, k_scaled, v, window)`` with the ``S_new`` new queries.
            They are valid until the next ``update``/``crop``/``reset`` of
            this layer (a later append may move the buffers).
        """
        lc = self._layer(layer)
        self._check(lc, k_normal, k_scaled, v)
        new = k_normal.shape[1]
        need = lc.length + new
        if need > lc.capacity:
            self._grow(lc, k_normal, k_scaled, v, need)
        end = lc.length + new
        if new:
            lc.k_normal[:, lc.length:end].copy_(k_normal)
            lc.k_scaled[:, lc.length:end].copy_(k_scaled)
            lc.v[:, lc.length:end].copy_(v)
        lc.length = end
        return lc.views()

    def crop(self, length: int) -> None:
        """Keep the first ``length`` tokens of every layer (e.g. after rejected draft tokens)."""
        if not _is_int(length):
            raise TypeError(f"length must be an int, got {type(length).__name__}")
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        for lc in self._layers:
            lc.length = min(lc.length, length)

    def reset(self) -> None:
        """Forget every cached token and release the buffers."""
        self._layers = [_LayerCache() for _ in range(self.num_layers)]

    # ------------------------------------------------------------------ internals
    def _grow(self, lc: _LayerCache, k_normal, k_scaled, v, need: int) -> None:
        cap = max(need, 2 * lc.capacity, self.initial_capacity)
        old = (lc.k_normal, lc.k_scaled, lc.v)
        bufs = []
        for t, o in zip((k_normal, k_scaled, v), old):
            b = torch.empty((t.shape[0], cap, t.shape[2], t.shape[3]), dtype=t.dtype, device=t.device)
            if o is not None and lc.length:
                b[:, :lc.length].copy_(o[:, :lc.length])
            bufs.append(b)
        lc.k_normal, lc.k_scaled, lc.v = bufs

    @staticmethod
    def _check(lc: _LayerCache, k_normal, k_scaled, v) -> None:
        names = ("k_normal", "k_scaled", "v")
        ts = (k_normal, k_scaled, v)
        for name, t in zip(names, ts):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 4:
                raise ValueError(f"{name} must be [B, S_new, H, D], got shape {list(t.shape)}")
        if k_normal.dtype not in _CACHE_DTYPES:
            raise TypeError(f"k_normal must be a float32, float16, bfloat16 or float64 tensor, got {k_normal.dtype}")
        for name, t in (("k_scaled", k_scaled), ("v", v)):
            if t.dtype != k_normal.dtype:
                raise TypeError(f"{name} must have the dtype of k_normal ({k_normal.dtype}), got {t.dtype}")
            if t.device != k_normal.device:
                raise ValueError(f"{name} must be on the device of k_normal ({k_normal.device}), got {t.device}")
            if t.shape[:2] != k_normal.shape[:2]:
                raise ValueError(f"{name} must have the [B, S_new] of k_normal {list(k_normal.shape[:2])}, "
                                 f"got shape {list(t.shape)}")
        hk, d = k_normal.shape[2], k_normal.shape[3]
        if hk == 0:
            raise ValueError("k_normal must have at least one head")
        if k_scaled.shape[3] != d:
            raise ValueError(f"k_scaled must have the head_dim of k_normal ({d}), got {k_scaled.shape[3]}")
        if k_scaled.shape[2] % hk != 0:
            raise ValueError(f"k_scaled must have H_k={hk} heads or a multiple (H_q), got {k_scaled.shape[2]}")
        if v.shape[2] != hk:
            raise ValueError(f"v must have the heads of k_normal ({hk}), got {v.shape[2]}")
        check_inference_only("DPEKVCache", zip(names, ts))
        if lc.k_normal is None:
            return
        # Everything must match what this layer holds (its buffers, also after crop(0)).
        for name, t, buf in zip(names, ts, (lc.k_normal, lc.k_scaled, lc.v)):
            if t.dtype != buf.dtype:
                raise TypeError(f"{name} must have the dtype of the cached tensors ({buf.dtype}), got {t.dtype}")
            if t.device != buf.device:
                raise ValueError(f"{name} must be on the device of the cached tensors ({buf.device}), "
                                 f"got {t.device}")
            if t.shape[0] != buf.shape[0]:
                raise ValueError(f"{name} must have the batch size of the cache ({buf.shape[0]}), got {t.shape[0]}")
            if t.shape[2:] != buf.shape[2:]:
                raise ValueError(f"{name} must have [H, D] = {list(buf.shape[2:])} like the cached {name}, "
                                 f"got {list(t.shape[2:])}")


# ------------------------------------------------------------------------------- decode step
def dpe_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: Optional[torch.Tensor],
    inv_freq: torch.Tensor,
    config: DPEConfig,
    cache: DPEKVCache,
    layer: int,
    mask: Optional[torch.Tensor] = None,
    *,
    key_padding_mask: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    layout: str = "neox",
    rotary_dim: Optional[int] = None,
    rope_backend: str = "auto",
    backend: str = "auto",
    return_lse: bool = False,
):
    """One attention call of a layer with a :class:`DPEKVCache`: prefill, a prefill chunk, or decode.

    ``dpe_rope`` rotates the new tokens (``q, k`` unrotated, ``[B, S_new, H, D]``)
    at ``positions`` (``[B, S_new]`` or ``[1, S_new]``; None means
    ``cache length + 0 .. S_new-1``, right for unpadded batches), the rotated
    keys and ``v`` are appended to ``cache`` at ``layer``, and ``dpe_attention``
    attends the ``S_new`` queries (the last ``S_new`` positions) over
    everything cached. ``mask``: this layer's key-dimension mask; default
    ``config.layer_mask(layer)`` when the config holds one.
    ``key_padding_mask`` ``[B, S_cached + S_new]`` (left padding) goes to
    ``dpe_attention``. Returns what ``dpe_attention`` returns.
    """
    from .attention import dpe_attention

    if not isinstance(cache, DPEKVCache):
        raise TypeError(f"cache must be a DPEKVCache, got {type(cache).__name__}")
    if positions is None:
        if not isinstance(q, torch.Tensor) or q.dim() != 4:
            raise ValueError("positions=None needs batched q [B, S_new, H_q, D]")
        start = cache.get_seq_length(layer)
        positions = torch.arange(start, start + q.shape[1], device=q.device)[None]
    rope_kw = dict(layout=layout, rotary_dim=rotary_dim, backend=rope_backend)
    if mask is None and isinstance(config, DPEConfig) and config.mask is not None:
        rope_kw["layer"] = layer
    q_n, k_n, q_s, k_s = dpe_rope(q, k, positions, inv_freq, config, mask, **rope_kw)
    k_n, k_s, v = cache.update(layer, k_n, k_s, v)
    return dpe_attention(q_n, q_s, k_n, k_s, v, config.window, softmax_scale=softmax_scale,
                         key_padding_mask=key_padding_mask, return_lse=return_lse, backend=backend)


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
    distance to the query (SPEC "Attention"): for a query at ``m`` and a key
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
        as in :func:`~dpe_kernels.rope_reference`.
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
    cos_n, sin_n = _cos_sin(-dist, inv_freq, compute)                   # [B, S_k, P]
    cs, ss = [], []
    for s, b0, b1 in zip(config.scales, config.group_boundaries, config.group_boundaries[1:]):
        c, si = _cos_sin(n // s - (m // s + (w - w // s)), inv_freq, compute)
        cs.append(c[..., b0:b1])
        ss.append(si[..., b0:b1])
    cos_s, sin_s = torch.cat(cs, -1), torch.cat(ss, -1)

    kr = k_cache[..., :rotary_dim].to(compute)
    k_pass = k_cache[..., rotary_dim:].to(compute)
    k_norm = torch.cat([_rotate(kr, cos_n, sin_n, neox), k_pass], -1)   # [B, S_k, H_k, D]
    k_scal = torch.cat([_rotate(kr, cos_s, sin_s, neox), k_pass], -1)
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
