"""Decoding with DPE: a key/value cache rotated once (:class:`DPEKVCache`) and one
cached attention call of a layer (:func:`dpe_attention_step`).

Rotations compose (docs/method.md), so keys rotated ONCE at their absolute
normal and scaled positions give, against a query rotated at its own, exactly
the logits of the authors' decode path, which re-rotates the whole cache at
every step (:func:`dpe_kernels.reference.decode_rerotate_reference`, the
equivalence oracle). A DPE cache is therefore an ordinary cache of three
tensors (``k_normal, k_scaled, v``); a step is the rotary step of the new
tokens, an append, and DPE attention of the new queries over the cache.
Not here: kernels (:mod:`dpe_kernels.backends`) and paged caches (engines keep
those; :func:`dpe_kernels.dpe_paged_attention` reads them).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

from . import backends, checks
from .backends.shapes import AttentionInfo
from .config import DPEConfig
from .utils import is_int, scaled_key_heads

__all__ = ["DPEKVCache", "dpe_attention_step"]


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

    def buffers(self):
        return None if self.k_normal is None else (self.k_normal, self.k_scaled, self.v)

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
        if not is_int(num_layers):
            raise TypeError(f"num_layers must be an int, got {type(num_layers).__name__}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if not is_int(initial_capacity):
            raise TypeError(f"initial_capacity must be an int, got {type(initial_capacity).__name__}")
        if initial_capacity < 1:
            raise ValueError(f"initial_capacity must be >= 1, got {initial_capacity}")
        self.num_layers = num_layers
        self.initial_capacity = initial_capacity
        self._layers: List[_LayerCache] = [_LayerCache() for _ in range(num_layers)]

    # ------------------------------------------------------------------ queries
    def _layer(self, layer) -> _LayerCache:
        if not is_int(layer):
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
        checks.cache_append(k_normal, k_scaled, v, lc.buffers())
        return self._append(lc, k_normal, k_scaled, v)

    def _append(self, lc: "_LayerCache", k_normal, k_scaled, v):
        """The append itself (inputs checked by the caller)."""
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
        if not is_int(length):
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

    Each argument is checked once (the checks of ``dpe_rope``, ``v`` and the
    layer's buffers, ``key_padding_mask`` / ``softmax_scale``), each backend
    picked once, and the two kernels called directly.
    """
    if not isinstance(cache, DPEKVCache):
        raise TypeError(f"cache must be a DPEKVCache, got {type(cache).__name__}")
    lc = cache._layer(layer)
    if positions is None:
        if not isinstance(q, torch.Tensor) or q.dim() != 4:
            raise ValueError("positions=None needs batched q [B, S_new, H_q, D]")
        positions = torch.arange(lc.length, lc.length + q.shape[1], device=q.device)[None]
    if mask is None and isinstance(config, DPEConfig) and config.mask is not None:
        mask = checks.rope_mask(config, None, layer)
    rotary_dim = checks.rope_args(q, k, positions, inv_freq, config, mask, layout, rotary_dim)
    checks.rope_values(positions, inv_freq)
    _check_step_v(k, v)
    hks = scaled_key_heads(k.shape[2], mask)
    new_shapes = (k.shape, (*k.shape[:2], hks, k.shape[3]), v.shape)
    checks.cache_matches(tuple(_Meta(q.dtype, q.device, s) for s in new_shapes), lc.buffers())
    b, s_q, h_q, d = q.shape
    s_k = lc.length + s_q
    checks.window_and_scale(config.window, softmax_scale)
    checks.key_padding_mask(key_padding_mask, b, s_k, q.device)
    rope_name = backends.pick("rope", rope_backend, q.device)
    attn_name = backends.pick("attention", backend, q.device, q.dtype, d, v.shape[3])
    q_n, k_n, q_s, k_s = backends.run_rope(rope_name, q, k, positions, inv_freq, config, mask, layout, rotary_dim,
                                           None)
    k_n, k_s, v = cache._append(lc, k_n, k_s, v)
    info = AttentionInfo(varlen=False, B=b, S_q=s_q, S_k=s_k, H_q=h_q, H_k=k.shape[2], H_ks=hks, D=d, Dv=v.shape[3])
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(d)
    return backends.run_attention(attn_name, q_n, q_s, k_n, k_s, v, config.window, scale, key_padding_mask, None,
                                  None, info, return_lse)


class _Meta:
    """dtype / device / shape of a tensor not computed yet (the rotated keys), for checks.cache_matches."""
    __slots__ = ("dtype", "device", "shape")

    def __init__(self, dtype, device, shape):
        self.dtype, self.device, self.shape = dtype, device, torch.Size(shape)


def _check_step_v(k, v) -> None:
    """``k`` batched and ``v`` ``[B, S_new, H_k, Dv]`` like ``k`` (what the cache stores)."""
    if k.dim() != 4:
        raise ValueError(f"k_normal must be [B, S_new, H, D], got shape {list(k.shape)}")
    checks.tensor("v", v)
    if v.dim() != 4:
        raise ValueError(f"v must be [B, S_new, H, D], got shape {list(v.shape)}")
    checks.same_dtype("v", v, "k_normal", k.dtype)
    checks.same_device("v", v, "k_normal", k.device)
    if v.shape[:2] != k.shape[:2]:
        raise ValueError(f"v must have the [B, S_new] of k_normal {list(k.shape[:2])}, got shape {list(v.shape)}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"v must have the heads of k_normal ({k.shape[2]}), got {v.shape[2]}")
    checks.inference_only("DPEKVCache", (("v", v),))
