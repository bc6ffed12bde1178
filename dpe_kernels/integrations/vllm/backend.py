"""The DPE attention backend for vLLM (V1 engine).

Per layer and step (``forward``):

1. the model handed unrotated ``q`` / ``k`` (the identity rotary of :mod:`.rotary`);
2. the step's new ``k`` (UNROTATED, as the model's ``k_proj`` made it) and ``v`` are written into
   vLLM's paged cache at ``slot_mapping``: the cache has exactly the spec, size and layout vLLM
   would use without DPE, so DPE costs no KV memory and one cached prefix serves every
   configuration;
3. :func:`dpe_kernels.dpe_paged_attention_rotary` attends over the paged cache through the block
   table, rotating each key as it is loaded (normal rotation inside the window, each sequence's
   scaled rotation beyond; docs/method.md), one softmax, and writes the layer's output in place.

Each sequence of a batch runs its own configuration: the metadata builder maps every request to an
index of the engine's :class:`~.requests.ConfigTable` (default, ``"off"``, per-request
``extra_args["dpe"]``, or by length), and the kernels take ``seq_config`` with the table's
``pair_scale`` / ``window`` / per-layer ``mask``. cos/sin come from one table of
``max_model_len`` rows per process and device (:func:`dpe_kernels.rotary_table`).

Cache layout: vLLM allocates each layer's cache as ``[num_blocks, H_k, block_size, C]`` with
``C = head_size + head_size_v`` (``KVCacheLayout.LBHNC``); one block's page is carved into two
head-major planes ``k [H_k, bs, D] | v [H_k, bs, Dv]`` and viewed as the
``[num_blocks, block_size, H, D]`` strided tensors the kernels take (no copy).

Hot path: a layer's FIRST call runs the public op with every check; it then records what cannot
change (backend, cache views, the layer's rotary facts) and every later call checks only what can
change per step (token count against the metadata's shapes, the cache tensor object, the
configuration table's version), in plain Python on host ints, and calls the registry's runner
directly: no tensor value is read on the host (``max_seqlen_*`` come from vLLM's host-side metadata).
"""
from __future__ import annotations

from dataclasses import dataclass
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
from vllm.v1.kv_cache_interface import KVCacheLayout

from vllm.logger import init_logger

from .requests import ConfigTable, row_keys
from .rotary import rotary_facts
from .settings import EngineSettings, engine_settings

__all__ = ["DPEAttentionBackend", "DPEAttentionImpl", "DPEMetadataBuilder", "DPEAttentionMetadata",
           "BACKEND_NAME", "rank_head_slices", "write_kv"]

from .selection import BACKEND_NAME  # get_name(): vLLM looks the backend up as AttentionBackendEnum[get_name()]
logger = init_logger("vllm.dpe_kernels")  # under vLLM's logger: its handler prints INFO


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
    """DPE attention over vLLM's paged KV cache (decoder self-attention); the cache is exactly
    the one vLLM would allocate without DPE (no ``customize_spec``)."""

    # The backend writes the cache itself (unrotated k and v, at slot_mapping).
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


@dataclass
class DPEAttentionMetadata:
    num_actual_tokens: int
    max_query_len: int  # host ints: the kernels' grid / path choice never reads the device
    max_seq_len: int
    query_start_loc: torch.Tensor  # int32 [B + 1]
    seq_lens: torch.Tensor  # int32 [B], keys incl. this step's tokens
    block_table: torch.Tensor  # int32 [B, max_blocks]
    slot_mapping: torch.Tensor  # int64 [T]
    seq_config: torch.Tensor  # int32 [B]: each sequence's index in `table`
    table: ConfigTable  # the engine's configurations (pair scales, windows, masks, cos/sin)


class DPEMetadataBuilder(AttentionMetadataBuilder[DPEAttentionMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config: VllmConfig, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._table: Optional[ConfigTable] = None
        self._zeros = torch.zeros(0, dtype=torch.int32, device=device)

    def table(self) -> ConfigTable:
        """The engine's configuration table (built at the first step: it needs the model's rotary)."""
        if self._table is None:
            settings = engine_settings(self.vllm_config)
            facts = rotary_facts()
            if settings is None or facts is None:
                raise RuntimeError("dpe: the DPE attention backend runs without DPE settings or rotary")
            self._table = ConfigTable(settings, facts.inv_freq, settings.dpe_config(facts.inv_freq))
        return self._table

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> DPEAttentionMetadata:
        m = common_attn_metadata
        t = int(m.num_actual_tokens)
        b = int(m.num_reqs)
        table = self.table()
        keys = row_keys(self.vllm_config, b)
        if keys is None or all(k[0] == "default" for k in keys):
            if self._zeros.shape[0] < b:
                self._zeros = torch.zeros(b, dtype=torch.int32, device=self.device)
            seq_config = self._zeros[:b]
        else:
            seq_config = torch.tensor([table.index(k) for k in keys], dtype=torch.int32).to(self.device,
                                                                                          non_blocking=True)
        return DPEAttentionMetadata(
            num_actual_tokens=t, max_query_len=int(m.max_query_len), max_seq_len=int(m.max_seq_len),
            query_start_loc=m.query_start_loc[: b + 1], seq_lens=m.seq_lens[:b],
            block_table=m.block_table_tensor[:b], slot_mapping=m.slot_mapping[:t], seq_config=seq_config,
            table=table)


def write_kv(k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor, k_cache: torch.Tensor,
             v_cache: torch.Tensor) -> None:
    """The step's unrotated ``k`` / ``v`` ``[T, H_k, D]`` into the ``[num_blocks, block_size, H_k, D]``
    cache views at ``slot_mapping`` (negative: padding, skipped)."""
    if k.device.type == "cuda":
        from dpe_kernels.backends.paged_triton import cache_write_triton

        cache_write_triton(k, v, slot_mapping, k_cache, v_cache)
        return
    if slot_mapping.numel() and int(slot_mapping.min()) < 0:  # CPU tensors: a host read, no device sync
        keep = slot_mapping >= 0
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    bs = k_cache.shape[1]
    blk = torch.div(slot_mapping, bs, rounding_mode="floor")
    off = slot_mapping - blk * bs
    k_cache[blk, off] = k
    v_cache[blk, off] = v


@dataclass
class _LayerState:
    layer_index: int
    rotary_dim: int
    neox: bool
    q_slice: slice
    checked: bool = False
    # recorded by the first (fully checked) call:
    backend: str = ""
    kv_cache: Optional[torch.Tensor] = None  # the cache tensor object the views below were made of
    views: tuple = ()
    info: object = None  # PagedInfo template (static fields)
    version: int = -1  # of the configuration table the tensors below come from
    tensors: tuple = ()  # (cos_sin, pair_scale, window)
    mask: Optional[torch.Tensor] = None


class _Scratch:
    """Per-process reused lse buffers of the fast path (layers run one after another)."""

    def __init__(self):
        self.bufs = {}

    def lse(self, t: int, hq: int, device) -> torch.Tensor:
        buf = self.bufs.get(device)
        if buf is None or buf.numel() < t * hq:
            buf = self.bufs[device] = torch.empty(max(t * hq, 1), dtype=torch.float32, device=device)
        return buf[: t * hq].view(t, hq)


_SCRATCH = _Scratch()


def _device_tensors(table: ConfigTable, device) -> tuple:
    """``(cos_sin, pair_scale, window)`` of ``table`` on ``device``, cached on the table per version."""
    cache = table.__dict__.setdefault("_dpe_device", {})
    hit = cache.get(device)
    if hit is not None and hit[0] == table.version:
        return hit[1]
    from dpe_kernels import rotary_table

    cos_sin = hit[1][0] if hit is not None else rotary_table(table.inv_freq.to(device), table.settings.max_model_len)
    tensors = (cos_sin, table.pair_scale(device), table.window(device))
    cache[device] = (table.version, tensors)
    return tensors


class DPEAttentionImpl(AttentionImpl):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes, sliding_window, kv_cache_dtype: str, logits_soft_cap=None,
                 attn_type: str = AttentionType.DECODER, kv_sharing_target_layer_name=None, **extra):
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
        self._state: Optional[_LayerState] = None

    def process_weights_after_loading(self, act_dtype: torch.dtype):
        # Runs once the whole model is built: the rotary is known; resolve and check the default
        # configuration now so that a mismatch fails at engine start, not at the first request.
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

    def _layer_state(self, layer) -> _LayerState:
        from vllm.distributed import parallel_state
        from vllm.model_executor.models.utils import extract_layer_index

        facts, _ = self._model_config()
        s = self.settings
        tp = getattr(parallel_state, "_TP", None)  # None outside an engine (unit tests, benchmarks)
        size, rank = (1, 0) if tp is None else (tp.world_size, tp.rank_in_group)
        q_sl, _ = rank_head_slices(s.num_heads, s.num_kv_heads, size, rank)
        return _LayerState(layer_index=extract_layer_index(layer.layer_name), rotary_dim=facts.rotary_dim,
                           neox=facts.is_neox_style, q_slice=q_sl)

    def _views(self, kv_cache: torch.Tensor):
        """``(k_cache, v_cache)`` ``[num_blocks, block_size, H_k, D]`` views of one layer's page."""
        nb, hk, bs, c = kv_cache.shape
        d = self.head_size
        if hk != self.num_kv_heads or c != 2 * d:
            raise ValueError(f"dpe: unexpected KV cache shape {list(kv_cache.shape)} for {hk} KV heads, "
                             f"head_size {d}")
        flat = kv_cache.view(nb, hk * bs * c)  # the page of a block is one contiguous run (LBHNC)
        n_k = hk * bs * d

        def plane(lo, hi):  # head-major [nb, H, bs, D] -> [nb, bs, H, D] (strided, no copy)
            return flat[:, lo:hi].view(nb, hk, bs, d).transpose(1, 2)

        return plane(0, n_k), plane(n_k, 2 * n_k)

    def _refresh(self, st: _LayerState, table: ConfigTable, device) -> None:
        """The table's tensors and this layer's mask, when the table gained a configuration."""
        st.tensors = _device_tensors(table, device)
        st.mask = table.layer_mask(st.layer_index, st.q_slice, device)
        st.version = table.version

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
        if (t > query.shape[0] or m.slot_mapping.shape[0] != t or m.seq_config.shape[0] != b
                or m.seq_lens.shape[0] != b or m.query_start_loc.shape[0] != b + 1 or m.max_query_len > t):
            raise ValueError(f"dpe: inconsistent attention metadata: {t} tokens, {b} sequences, slot_mapping "
                             f"{tuple(m.slot_mapping.shape)}, seq_config {tuple(m.seq_config.shape)}, seq_lens "
                             f"{tuple(m.seq_lens.shape)}, query_start_loc {tuple(m.query_start_loc.shape)}, "
                             f"max_query_len {m.max_query_len}")
        if kv_cache is not st.kv_cache:  # a new cache tensor (re-allocated): new checked views
            st.views = self._views(kv_cache)
            st.kv_cache = kv_cache
            st.info.num_blocks, st.info.block_size = st.views[0].shape[0], st.views[0].shape[1]
        if m.table.version != st.version:
            self._refresh(st, m.table, query.device)
        k_cache, v_cache = st.views
        info = st.info
        if m.max_seq_len > m.block_table.shape[1] * info.block_size or m.max_seq_len > st.tensors[0].shape[0]:
            raise ValueError(f"dpe: max_seq_len {m.max_seq_len} exceeds what the block table or the cos/sin "
                             "table addresses")
        q = query[:t] if query.shape[0] != t else query
        write_kv(key[:t], value[:t], m.slot_mapping, k_cache, v_cache)
        out = output[:t] if output.shape[0] != t else output
        info.T_q, info.B, info.max_blocks = t, b, m.block_table.shape[1]
        info.max_seqlen_q, info.max_seqlen_k = m.max_query_len, m.max_seq_len
        cos_sin, pair_scale, window = st.tensors
        from dpe_kernels.backends import run_paged_rotary

        run_paged_rotary(st.backend, q, k_cache, v_cache, m.block_table, m.seq_lens, m.query_start_loc, cos_sin,
                         pair_scale, window, m.seq_config, st.mask, st.rotary_dim, st.neox, self.scale, info, out,
                         _SCRATCH.lse(t, q.shape[1], q.device))
        return output

    def _forward_checked(self, layer, query, key, value, kv_cache, attn_metadata, output,
                         output_scale=None, output_block_scale=None) -> torch.Tensor:
        """The public op with every check (a layer's first call); records the fast path's state."""
        from dpe_kernels import dpe_paged_attention_rotary
        from dpe_kernels.backends import pick
        from dpe_kernels.backends.shapes import PagedInfo

        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("dpe: fused output quantization is not supported")
        if self._state is None:
            self._state = self._layer_state(layer)
        st = self._state
        m = attn_metadata
        t = m.num_actual_tokens
        k_cache, v_cache = self._views(kv_cache)
        self._refresh(st, m.table, query.device)
        write_kv(key[:t], value[:t], m.slot_mapping, k_cache, v_cache)
        cos_sin, pair_scale, window = st.tensors
        dpe_paged_attention_rotary(query[:t], k_cache, v_cache, m.block_table, m.seq_lens, m.query_start_loc, cos_sin,
                                   pair_scale, window, seq_config=m.seq_config, mask=st.mask,
                                   rotary_dim=st.rotary_dim, layout="neox" if st.neox else "gptj",
                                   softmax_scale=self.scale, max_seqlen_q=m.max_query_len,
                                   max_seqlen_k=m.max_seq_len, out=output[:t], check_inputs=True,
                                   backend=self.settings.options.backend)
        # What the fast path needs from now on.
        st.backend = pick("paged_rotary", self.settings.options.backend, query.device, query.dtype)
        st.kv_cache, st.views = kv_cache, (k_cache, v_cache)
        info = PagedInfo()
        info.H_q, info.H_k, info.H_ks = query.shape[1], k_cache.shape[2], k_cache.shape[2]
        info.D, info.Dv = query.shape[2], v_cache.shape[3]
        info.num_blocks, info.block_size = k_cache.shape[0], k_cache.shape[1]
        st.info = info
        st.checked = st.backend != "reference"
        return output
