"""The DPE attention backend for vLLM (V1 engine).

Per layer and step (``forward``):

1. the model handed unrotated ``q`` / ``k`` (the identity rotary of :mod:`.rotary`);
2. :func:`dpe_kernels.dpe_rope_and_cache` rotates the step's new tokens ONCE at their absolute
   positions and writes ``k_normal``, ``k_scaled`` and ``v`` into the paged cache at
   ``slot_mapping`` (keys already in the cache are never touched again), returning the
   queries' ``q_normal`` / ``q_scaled``;
3. :func:`dpe_kernels.dpe_paged_attention` attends over the paged cache through the block
   table (docs/method.md: normal logits inside the window, scaled beyond, one softmax) and writes the
   layer's output in place.

Cache layout: vLLM allocates each layer's cache as ``[num_blocks, H_k, block_size, C]`` with
``C = head_size + head_size_v`` from the spec that :meth:`DPEAttentionBackend.customize_spec`
widens to ``head_size = (1 + r) * D`` (``r = 1``, or ``n_rep`` scaled key heads per KV head for a
per-query-head mask). One block's page is carved into three head-major planes
``k_normal [H_k, bs, D] | k_scaled [H_s, bs, D] | v [H_k, bs, D]`` and viewed as the
``[num_blocks, block_size, H, D]`` strided tensors the kernels take (no copy).

Hot path: the metadata builder computes the token positions once per step for every layer.
A layer's FIRST call runs the package's public kernels with every check (dtypes, shapes,
strides, devices, overlaps, slot and block values); it then records what cannot change (the
kernels' backends, the cache page views, the pair scales, the mask) and every later call checks
only what can change per step (the token count against the metadata's shapes, the cache tensor
object), in plain Python on host ints, and calls the kernels' entry points directly: no tensor
value is read on the host (``max_seqlen_*`` come from vLLM's host-side metadata).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Optional

import torch

from vllm.config import VllmConfig, get_current_vllm_config_or_none
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

from vllm.logger import init_logger

from .rotary import rotary_facts
from .settings import EngineSettings, engine_settings

__all__ = ["DPEAttentionBackend", "DPEAttentionImpl", "DPEMetadataBuilder", "DPEAttentionMetadata",
           "BACKEND_NAME", "rank_head_slices"]

from .selection import BACKEND_NAME  # get_name(): vLLM looks the backend up as AttentionBackendEnum[get_name()]
logger = init_logger("vllm.dpe_kernels")  # under vLLM's logger: its handler prints INFO
# Scaled-key heads per KV head of the layers of this process (1, or n_rep with a per-query-head
# mask), recorded by the impls at construction for customize_spec (a classmethod without layer).
_SCALED_PER_KV: Optional[int] = None


def _kernels():
    """(rope_and_cache, paged_attention): the package's public engine kernels."""
    from dpe_kernels import dpe_paged_attention, dpe_rope_and_cache

    return dpe_rope_and_cache, dpe_paged_attention


def rank_head_slices(num_heads: int, num_kv_heads: int, tp_size: int, tp_rank: int):
    """``(q_slice, kv_slice)``: the model's query / KV heads that TP rank ``tp_rank`` holds,
    as vLLM's QKVParallelLinear splits them (KV heads replicated when ``num_kv_heads < tp``)."""
    if num_heads % tp_size:
        raise ValueError(f"num_heads ({num_heads}) must divide by the tensor-parallel size ({tp_size})")
    hq = num_heads // tp_size
    if num_kv_heads >= tp_size:
        if num_kv_heads % tp_size:
            raise ValueError(f"num_kv_heads ({num_kv_heads}) must divide by the TP size ({tp_size})")
        hk = num_kv_heads // tp_size
        kv0 = tp_rank * hk
    else:
        if tp_size % num_kv_heads:
            raise ValueError(f"the TP size ({tp_size}) must divide by num_kv_heads ({num_kv_heads})")
        hk = 1
        kv0 = tp_rank // (tp_size // num_kv_heads)
    return slice(tp_rank * hq, (tp_rank + 1) * hq), slice(kv0, kv0 + hk)


# --------------------------------------------------------------------------- backend
class DPEAttentionBackend(AttentionBackend):
    """DPE attention over vLLM's paged KV cache (decoder self-attention)."""

    # The backend writes the cache itself (rotating the keys on the way in).
    forward_includes_kv_cache_update: bool = True
    supported_dtypes: ClassVar[list] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto", "float16", "bfloat16"]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls():
        return DPEAttentionImpl

    @staticmethod
    def get_builder_cls():
        return DPEMetadataBuilder

    @classmethod
    def supported_kv_cache_layouts(cls):
        return (KVCacheLayout.LBHNC,)  # one layer's page per block is one contiguous run

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """Keys ``[k_normal | k_scaled]``: ``head_size = (1 + r) * D``, values ``D``."""
        r = _SCALED_PER_KV
        if r is None:
            settings = engine_settings(get_current_vllm_config_or_none())
            r = 1 if settings is None or not settings.per_query_head_mask else \
                settings.num_heads // settings.num_kv_heads
        d = spec.head_size
        return replace(spec, head_size=(1 + r) * d, head_size_v=spec.head_size_v)


@dataclass
class DPEAttentionMetadata:
    num_actual_tokens: int
    max_query_len: int  # host ints: the kernels' grid / path choice never reads the device
    max_seq_len: int
    query_start_loc: torch.Tensor  # int32 [B + 1]
    seq_lens: torch.Tensor  # int32 [B], keys incl. this step's tokens
    block_table: torch.Tensor  # int32 [B, max_blocks]
    slot_mapping: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T], absolute position of every new token


class DPEMetadataBuilder(AttentionMetadataBuilder[DPEAttentionMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config: VllmConfig, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> DPEAttentionMetadata:
        m = common_attn_metadata
        t = int(m.num_actual_tokens)
        b = int(m.num_reqs)
        qsl = m.query_start_loc[: b + 1]
        seq_lens = m.seq_lens[:b]
        if m.positions is not None:
            positions = m.positions[:t].to(torch.int64)
        else:
            # Queries are the last q_len_b positions of each sequence (vLLM schedules a
            # request's tokens contiguously), computed once per step for all layers.
            q_lens = qsl[1:] - qsl[:-1]
            req = torch.repeat_interleave(torch.arange(b, device=qsl.device), q_lens, output_size=t)
            offset = (seq_lens - q_lens - qsl[:-1]).to(torch.int64)
            positions = torch.arange(t, device=qsl.device, dtype=torch.int64) + offset[req]
        return DPEAttentionMetadata(
            num_actual_tokens=t, max_query_len=int(m.max_query_len), max_seq_len=int(m.max_seq_len),
            query_start_loc=qsl, seq_lens=seq_lens, block_table=m.block_table_tensor[:b],
            slot_mapping=m.slot_mapping[:t], positions=positions)


@dataclass
class _LayerState:
    config: object  # DPEConfig
    mask: Optional[torch.Tensor]
    inv_freq: torch.Tensor
    layout: str
    rotary_dim: int
    checked: bool = False
    # recorded by the first (fully checked) call:
    pair_scales: Optional[torch.Tensor] = None
    rope_backend: str = ""
    paged_backend: str = ""
    kv_cache: Optional[torch.Tensor] = None  # the cache tensor object the views below were made of
    views: tuple = ()
    info: object = None  # PagedInfo template (static fields)
    rope_fn: object = None
    paged_fn: object = None
    window: int = 0
    neox: bool = True


class _Scratch:
    """Per-process reused outputs of the fast path (layers run one after another): one flat
    buffer per (dtype, device) kind, and the views of it per token count (looked up once per call)."""

    def __init__(self):
        self.bufs = {}
        self.views = {}

    def get(self, t: int, hq: int, d: int, dtype, device):
        """``(q_normal, q_scaled, lse)`` views for ``t`` tokens."""
        key = (t, hq, d, dtype, device)
        v = self.views.get(key)
        if v is None:
            n = t * hq * d
            buf = self.bufs.get((dtype, device))
            if buf is None or buf.numel() < 2 * n:
                buf = torch.empty(max(2 * n, 1), dtype=dtype, device=device)
                self.bufs[(dtype, device)] = buf
                self.views.clear()  # views of the old buffer
            lse_buf = self.bufs.get(("lse", device))
            if lse_buf is None or lse_buf.numel() < t * hq:
                lse_buf = torch.empty(max(t * hq, 1), dtype=torch.float32, device=device)
                self.bufs[("lse", device)] = lse_buf
                self.views.clear()
            if len(self.views) > 4096:
                self.views.clear()
            v = (buf[:n].view(t, hq, d), buf[n:2 * n].view(t, hq, d), lse_buf[:t * hq].view(t, hq))
            self.views[key] = v
        return v


_SCRATCH = _Scratch()


class DPEAttentionImpl(AttentionImpl):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes, sliding_window, kv_cache_dtype: str, logits_soft_cap=None,
                 attn_type: str = AttentionType.DECODER, kv_sharing_target_layer_name=None, **extra):
        global _SCALED_PER_KV
        settings = engine_settings(get_current_vllm_config_or_none())
        if settings is None:
            raise RuntimeError("dpe: the DPE attention backend was selected but the engine has no "
                               "additional_config['dpe'] (one engine configuration per process)")
        why = []
        if alibi_slopes is not None:
            why.append("ALiBi")
        if sliding_window is not None:
            why.append(f"sliding window ({sliding_window})")
        if logits_soft_cap:
            why.append(f"logits soft-cap ({logits_soft_cap})")
        if attn_type != AttentionType.DECODER:
            why.append(f"attention type {attn_type!r}")
        if kv_sharing_target_layer_name is not None:
            why.append("cross-layer KV sharing")
        if extra.get("sinks") is not None:
            why.append("attention sinks")
        if kv_cache_dtype not in ("auto", "float16", "bfloat16", "float32"):
            why.append(f"kv_cache_dtype={kv_cache_dtype!r}")
        if why:
            raise ValueError(f"dpe: this layer uses {', '.join(why)}, which DPE attention does not support")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = None
        self.settings: EngineSettings = settings
        self.scaled_heads = num_heads if settings.per_query_head_mask else num_kv_heads
        r = self.scaled_heads // num_kv_heads
        if _SCALED_PER_KV is not None and _SCALED_PER_KV != r:
            raise ValueError("dpe: layers with different head counts are not supported")
        _SCALED_PER_KV = r
        self._state: Optional[_LayerState] = None

    def process_weights_after_loading(self, act_dtype: torch.dtype):
        # Runs once the whole model is built: the rotary is known; resolve and check the config
        # now so that a mismatch fails at engine start, not at the first request.
        from vllm.distributed import parallel_state

        facts, cfg = self._model_config()
        self._facts = facts
        tp = getattr(parallel_state, "_TP", None)  # None outside an engine (unit tests, benchmarks)
        if tp is None or tp.rank_in_group == 0:
            logger.info_once("%s; rotary_dim %d (%s)", self.settings.summary(cfg), facts.rotary_dim,
                             "neox" if facts.is_neox_style else "gptj")

    def _model_config(self):
        facts = getattr(self, "_facts", None) or rotary_facts()
        if facts is None:
            raise ValueError("dpe: the model built no rotary embedding the DPE plugin replaces "
                             "(vLLM RotaryEmbedding / Llama3RotaryEmbedding); its rotary is not supported")
        if facts.head_size != self.head_size:
            raise ValueError(f"dpe: rotary head_size {facts.head_size} != attention head_size {self.head_size}")
        return facts, self.settings.dpe_config(facts.inv_freq)

    def _layer_state(self, layer, device) -> _LayerState:
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
        from vllm.model_executor.models.utils import extract_layer_index

        facts, cfg = self._model_config()
        mask = None
        if cfg.mask is not None:
            s = self.settings
            q_sl, kv_sl = rank_head_slices(s.num_heads, s.num_kv_heads,
                                           get_tensor_model_parallel_world_size(),
                                           get_tensor_model_parallel_rank())
            full = cfg.layer_mask(extract_layer_index(layer.layer_name))
            mask = full[q_sl] if full.shape[0] == s.num_heads and s.num_heads != s.num_kv_heads else full[kv_sl]
            mask = mask.contiguous().to(device)
            if mask.shape[0] not in (self.num_heads, self.num_kv_heads):
                raise ValueError(f"dpe: the rank's mask has {mask.shape[0]} heads, the layer "
                                 f"{self.num_heads} / {self.num_kv_heads}")
        return _LayerState(config=cfg, mask=mask, inv_freq=facts.inv_freq.to(device),
                           layout="neox" if facts.is_neox_style else "gptj", rotary_dim=facts.rotary_dim)

    def _views(self, kv_cache: torch.Tensor):
        """``(k_cache, ks_cache, v_cache)`` ``[num_blocks, block_size, H, D]`` views of one layer's page."""
        nb, hk, bs, c = kv_cache.shape
        d = self.head_size
        if hk != self.num_kv_heads or c != (2 + self.scaled_heads // hk) * d:
            raise ValueError(f"dpe: unexpected KV cache shape {list(kv_cache.shape)} for {hk} KV heads, "
                             f"{self.scaled_heads} scaled-key heads, head_size {d}")
        flat = kv_cache.view(nb, hk * bs * c)  # the page of a block is one contiguous run (LBHNC)
        n_k, n_s = hk * bs * d, self.scaled_heads * bs * d

        def plane(lo, hi, heads):  # head-major [nb, H, bs, D] -> [nb, bs, H, D] (strided, no copy)
            return flat[:, lo:hi].view(nb, heads, bs, d).transpose(1, 2)

        return (plane(0, n_k, hk), plane(n_k, n_k + n_s, self.scaled_heads),
                plane(n_k + n_s, 2 * n_k + n_s, hk))

    def forward(self, layer: AttentionLayer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: Optional[DPEAttentionMetadata], output: torch.Tensor,
                output_scale=None, output_block_scale=None) -> torch.Tensor:
        if attn_metadata is None:  # profiling / warm-up run without a batch
            return output
        st = self._state
        if st is None or not st.checked or output_scale is not None or output_block_scale is not None:
            return self._forward_checked(layer, query, key, value, kv_cache, attn_metadata, output,
                                         output_scale, output_block_scale)
        # Fast path: only what can change per step, on host ints.
        m = attn_metadata
        t = m.num_actual_tokens
        b = m.block_table.shape[0]
        if (t > query.shape[0] or m.slot_mapping.shape[0] != t or m.positions.shape[0] != t
                or m.seq_lens.shape[0] != b or m.query_start_loc.shape[0] != b + 1 or m.max_query_len > t):
            raise ValueError(f"dpe: inconsistent attention metadata: {t} tokens, {b} sequences, slot_mapping "
                             f"{tuple(m.slot_mapping.shape)}, positions {tuple(m.positions.shape)}, seq_lens "
                             f"{tuple(m.seq_lens.shape)}, query_start_loc {tuple(m.query_start_loc.shape)}, "
                             f"max_query_len {m.max_query_len}")
        if kv_cache is not st.kv_cache:  # a new cache tensor (re-allocated): new checked views
            st.views = self._views(kv_cache)
            st.kv_cache = kv_cache
            st.info.num_blocks, st.info.block_size = st.views[0].shape[0], st.views[0].shape[1]
        k_cache, ks_cache, v_cache = st.views
        info = st.info
        if m.max_seq_len > m.block_table.shape[1] * info.block_size:
            raise ValueError(f"dpe: max_seq_len {m.max_seq_len} exceeds what the block table addresses")
        q = query[:t] if query.shape[0] != t else query
        qn, qs, lse = _SCRATCH.get(t, q.shape[1], q.shape[2], q.dtype, q.device)
        st.rope_fn(q, key[:t], value[:t], m.positions, st.inv_freq, st.pair_scales, st.mask, st.window,
                   st.rotary_dim, st.neox, m.slot_mapping, k_cache, ks_cache, v_cache, qn, qs)
        out = output[:t] if output.shape[0] != t else output
        if st.paged_backend == "triton":
            st.paged_fn(qn, qs, k_cache, ks_cache, v_cache, m.block_table, m.seq_lens, m.query_start_loc,
                        st.window, self.scale, m.max_query_len, m.max_seq_len, out, lse, False)
        else:
            info.T_q, info.B, info.max_blocks = t, b, m.block_table.shape[1]
            info.max_seqlen_q, info.max_seqlen_k = m.max_query_len, m.max_seq_len
            st.paged_fn(qn, qs, k_cache, ks_cache, v_cache, m.block_table, m.seq_lens, m.query_start_loc,
                        st.window, self.scale, info, out, lse)
        return output

    def _forward_checked(self, layer, query, key, value, kv_cache, attn_metadata, output,
                         output_scale=None, output_block_scale=None) -> torch.Tensor:
        """The public kernels with every check (a layer's first call); records the fast path's state."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("dpe: fused output quantization is not supported")
        if self._state is None:
            self._state = self._layer_state(layer, query.device)
        st = self._state
        t = attn_metadata.num_actual_tokens
        k_cache, ks_cache, v_cache = self._views(kv_cache)
        rope_and_cache, paged = _kernels()
        qn, qs = rope_and_cache(query[:t], key[:t], value[:t], attn_metadata.positions, st.inv_freq, st.config,
                                k_cache, ks_cache, v_cache, attn_metadata.slot_mapping, mask=st.mask,
                                layout=st.layout, rotary_dim=st.rotary_dim, check_inputs=True)
        paged(qn, qs, k_cache, ks_cache, v_cache, attn_metadata.block_table, attn_metadata.seq_lens,
              attn_metadata.query_start_loc, st.config.window, softmax_scale=self.scale,
              max_seqlen_q=attn_metadata.max_query_len, max_seqlen_k=attn_metadata.max_seq_len,
              out=output[:t], check_inputs=True)
        self._record_fast_path(st, query, kv_cache, (k_cache, ks_cache, v_cache))
        return output

    def _record_fast_path(self, st: _LayerState, query, kv_cache, views) -> None:
        from dpe_kernels import ops
        from dpe_kernels.backends import pick
        from dpe_kernels.backends.shapes import PagedInfo

        rope_b = pick("rope_and_cache", "auto", query.device)
        paged_b = pick("paged", "auto", query.device, query.dtype)
        if rope_b == "reference" or paged_b == "reference" or (rope_b != "triton" and not ops.HAS_EXT):
            return  # no fast kernels here: every call takes the checked path
        st.rope_backend, st.paged_backend = rope_b, paged_b
        if rope_b == "triton":
            from dpe_kernels.backends.rope_triton import rope_and_cache_triton as rope_fn
        else:
            rope_fn = torch.ops.dpe_kernels.rope_and_cache
        if paged_b == "triton":
            from dpe_kernels.backends.paged_triton import paged_attention_triton as paged_fn
        else:
            from dpe_kernels.backends.paged_cpu import paged_attention_cpu as paged_fn
        st.rope_fn, st.paged_fn = rope_fn, paged_fn
        st.window, st.neox = int(st.config.window), st.layout == "neox"
        st.pair_scales = st.config.pair_scales(query.device)
        if st.mask is not None:
            st.mask = st.mask.contiguous()
        st.kv_cache, st.views = kv_cache, views
        k_cache, ks_cache, v_cache = views
        info = PagedInfo()
        info.H_q, info.H_k, info.H_ks = query.shape[1], k_cache.shape[2], ks_cache.shape[2]
        info.D, info.Dv = query.shape[2], v_cache.shape[3]
        info.num_blocks, info.block_size = k_cache.shape[0], k_cache.shape[1]
        st.info = info
        st.checked = True
