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
* the authors' formulation, :func:`dpe_kernels.reference.decode_rerotate_reference`,
  is the equivalence oracle of the tests and the baseline of the attention
  benchmark.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .config import DPEConfig
from .rope import dpe_rope
from .utils import REFERENCE_DTYPES, check_inference_only, is_int

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

    @staticmethod
    def _check(lc: _LayerCache, k_normal, k_scaled, v) -> None:
        names = ("k_normal", "k_scaled", "v")
        ts = (k_normal, k_scaled, v)
        for name, t in zip(names, ts):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 4:
                raise ValueError(f"{name} must be [B, S_new, H, D], got shape {list(t.shape)}")
        if k_normal.dtype not in REFERENCE_DTYPES:
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
