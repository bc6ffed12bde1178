"""What argument validation learnt of a call, handed to the backends: the shapes of
one ``dpe_attention`` / ``dpe_paged_attention`` call. Plain records, no logic: the
checks that fill them are :mod:`dpe_kernels.checks`."""
from __future__ import annotations

__all__ = ["AttentionInfo", "PagedInfo"]


class AttentionInfo:
    """Layout (``varlen``), sizes, and for the packed layout ``seqlens``, one
    ``(q_start, S_q, k_start, S_k)`` per sequence."""
    __slots__ = ("varlen", "B", "S_q", "S_k", "H_q", "H_k", "H_ks", "D", "Dv", "seqlens")

    def __init__(self, **kw):
        for k in AttentionInfo.__slots__:
            setattr(self, k, kw.get(k))

    def with_head_dims(self, dim: int) -> "AttentionInfo":
        """A copy with ``D = Dv = dim`` (the cpu backend pads q/k or v to one head dim)."""
        new = AttentionInfo(**{k: getattr(self, k) for k in AttentionInfo.__slots__})
        new.D = new.Dv = dim
        return new


class PagedInfo:
    """Shapes of one paged call (all from metadata, never from tensor values)."""
    __slots__ = ("T_q", "H_q", "H_k", "H_ks", "D", "Dv", "B", "num_blocks", "block_size",
                 "max_blocks", "max_seqlen_q", "max_seqlen_k")

    def __init__(self, **kw):
        for k in PagedInfo.__slots__:
            setattr(self, k, kw.get(k))
