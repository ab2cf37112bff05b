"""The vLLM V1 attention backend: TurboQuant-packed K/V inside vLLM's paged blocks, plus the seed's
flush buffer (exact newest tokens) as a raw pool with one row per running request.

Data flow of one layer in one step (see tq_vllm.window for which tokens are exact):
  do_kv_cache_update: every new token is encoded into its paged slot (turboquant::write_cache;
      on CUDA the decode tokens' write runs on a side stream, beside this layer's attention,
      which does not read it: attend.SideStream); decode tokens and sink tokens are also
      copied exact into their raw-pool slot (turboquant::write_raw);
  forward: decode requests (query length 1, first in the batch) run
      turboquant::paged_decode_attention over their compressed pages and raw-pool row; prefill
      requests are split into segments that share one exact/compressed split and attend over
      the compressed prefix, the raw pool and their own exact chunk; then the prefill tokens of
      each request's last group are copied into the raw pool (after, so that the group that the
      chunk started in is still there while it is read).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from tq_ops import _env
from tq_ops.codec import TQCodec, exact16_matrices
from tq_ops.ops.write_cache import warm_up_write_cache
from tq_vllm import attend, compat
from tq_vllm import config as tq_config
from tq_vllm.rows import RawRows
from tq_vllm.window import Segment, segments as split_segments

from vllm.v1.attention.backend import (  # noqa: E402
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)

logger = logging.getLogger("tq_vllm")


def _is_ours(backend_cls) -> bool:
    return isinstance(backend_cls, type) and issubclass(backend_cls, TQAttentionBackend)


class TQAttentionBackend(AttentionBackend):
    """Selected as CUSTOM (every vLLM), TQ_KV (vLLM >= 0.32), or on CPU with TQ_VLLM_ENABLE=1."""

    accept_output_buffer: bool = True
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = list(tq_config.SUPPORTED_DTYPES)
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls():
        return TQAttentionImpl

    @staticmethod
    def get_builder_cls():
        return TQMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None):
        # The packed page holds whole fp16 scalars per component and kernels tile 16 tokens.
        return [MultipleOf(16)]

    @classmethod
    def get_preferred_block_size(cls, default_block_size: int) -> int:
        # A multiple of the flush interval keeps prefix-cache hits on flush points.
        group = tq_config.window_for(tq_config.format_for(128)).group
        if group > 1 and group % 16 == 0 and default_block_size % group:
            return group * max(1, -(-default_block_size // group))
        return default_block_size

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return not tq_config.layer_problems(head_size=head_size)

    @classmethod
    def supported_kv_cache_layouts(cls):
        from vllm.v1.kv_cache_interface import KVCacheLayout

        # (blocks, heads, tokens, slot) physically: each (block, head) page is contiguous,
        # which is tq_ops.layout's page.
        return (KVCacheLayout.LBHNC,)

    @classmethod
    def customize_spec(cls, spec):
        from vllm.v1.kv_cache_interface import FullAttentionSpec

        if type(spec) is not FullAttentionSpec or spec.sliding_window is not None:
            return spec
        slot = tq_config.format_for(spec.head_size).slot_bytes
        return dataclasses.replace(spec, dtype=torch.uint8, state_content_bytes=slot)

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                           cache_dtype_str: str = "auto") -> tuple[int, ...]:
        return (num_blocks, num_kv_heads, block_size * tq_config.format_for(head_size).slot_bytes)

    @classmethod
    def validate_configuration(cls, head_size, dtype, kv_cache_dtype, block_size, use_mla,
                               has_sink, use_sparse, *args, **kwargs) -> list[str]:
        reasons = super().validate_configuration(head_size, dtype, kv_cache_dtype, block_size,
                                                 use_mla, has_sink, use_sparse, *args, **kwargs)
        return reasons + tq_config.layer_problems(
            head_size=head_size, dtype=dtype, kv_cache_dtype=kv_cache_dtype, use_mla=use_mla,
            has_sink=has_sink, use_sparse=use_sparse,
            attn_type=kwargs.get("attn_type", "decoder"),
            has_sliding_window=kwargs.get("has_sliding_window", False))


class TQKVBackend(TQAttentionBackend):
    """The same backend under its own name (vLLM >= 0.32: --attention-backend TQ_KV)."""

    @staticmethod
    def get_name() -> str:
        return "TQ_KV"


def check_selector_config(sel) -> None:
    """For the CPU platform, which never calls validate_configuration."""
    tq_config.raise_if_problems(tq_config.layer_problems(
        head_size=sel.head_size, dtype=sel.dtype, kv_cache_dtype=sel.kv_cache_dtype,
        use_mla=getattr(sel, "use_mla", False), has_sink=getattr(sel, "has_sink", False),
        use_sparse=getattr(sel, "use_sparse", False),
        attn_type=getattr(sel, "attn_type", "decoder"),
        has_sliding_window=getattr(sel, "has_sliding_window", False)))


@dataclass
class TQMetadata:
    """Per-step metadata (shared by every layer of the group).

    Device tensors the captured decode path reads are slices of the builder's persistent buffers.
    block_table (B, MB) int32 and slot_mapping (T,) are vLLM's.  kv_lens / raw_lens / raw_index
    (B,) int32: per request, the compressed end (= ring start) and exact-token count of its last
    position, and its raw-pool row.  pre_rows / post_rows / slots (>= T,) int64: each token's
    raw-pool row for the write before attention (decode and sink tokens) and after it (prefill
    tokens of the request's last group), the scratch row otherwise, and its slot."""

    num_reqs: int
    num_actual_tokens: int
    num_decodes: int
    block_table: Tensor
    slot_mapping: Tensor
    kv_lens: Tensor
    raw_lens: Tensor
    raw_index: Tensor
    pre_rows: Tensor
    post_rows: Tensor
    slots: Tensor
    rows_host: list[int] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    segment_plan: attend.SegmentPlan | None = None  # the segments as device tensors (GPU path)
    decode_kv_max: int = 0  # host: the largest compressed end among decode rows


class TQMetadataBuilder(AttentionMetadataBuilder[TQMetadata]):
    # Uniform decode batches (query length 1 + spec tokens) are replayed as full CUDA graphs:
    # decode reads only persistent buffers and launches fixed grids.  Mixed batches run the
    # prefill segments eagerly (host loop over segments), so not ALWAYS.
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_BATCH

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        if hasattr(self, "_init_reorder_batch_threshold"):
            self._init_reorder_batch_threshold(1)
        else:
            self.reorder_batch_threshold = 1
        self.fmt = tq_config.format_for(kv_cache_spec.head_size)
        self.window = tq_config.window_for(self.fmt)
        cache = vllm_config.cache_config
        tq_config.raise_if_problems(tq_config.scheduling_problems(
            self.fmt, block_size=cache.block_size,
            prefix_caching=bool(getattr(cache, "enable_prefix_caching", False))))
        sched = vllm_config.scheduler_config
        self.max_reqs = int(sched.max_num_seqs)
        self.scratch_row = self.max_reqs
        max_tokens = max(int(sched.max_num_batched_tokens), self.max_reqs) + 64
        self.device = torch.device(device)
        # Persistent device buffers (fixed addresses: captured graphs read them), rows
        # (kv_lens, raw_lens, raw_index) per request and (pre_rows, post_rows, slots) per token.
        # Each step computes them on the host from vLLM's host copies and sends them in a few
        # copies: computed on the device they were about 60 tiny kernels per step, each a
        # launch on the GPU's critical path between two decode graphs.
        self.req_rows = self._initial_req_rows().to(self.device)
        self.tok_rows = self._initial_tok_rows(max_tokens).to(self.device)
        self.kv_lens, self.raw_lens, self.raw_index = self.req_rows.unbind(0)
        self.pre_rows, self.post_rows, self.slots = self.tok_rows.unbind(0)
        # host staging, two sets used in turn: a set is refilled only after its copies of two
        # steps ago are done (asynchronous scheduling builds a step while the last one runs)
        cuda = self.device.type == "cuda"
        self._staging = [(self._initial_req_rows(pin=cuda),
                          self._initial_tok_rows(max_tokens, pin=cuda)) for _ in range(2)]
        self._staged = [torch.cuda.Event() if cuda else None for _ in range(2)]
        self._turn = 0
        self.runner = compat.find_model_runner()
        self.rows = RawRows(self.max_reqs, self.window)
        self._capturing = False

    def _initial_req_rows(self, pin: bool = False) -> Tensor:
        """Host (kv_lens, raw_lens, raw_index) rows before any step: raw_index the scratch row."""
        rows = torch.zeros((3, self.max_reqs), dtype=torch.int32)
        rows[2] = self.scratch_row
        return rows.pin_memory() if pin else rows

    def _initial_tok_rows(self, max_tokens: int, pin: bool = False) -> Tensor:
        """Host (pre_rows, post_rows, slots) rows before any step: rows the scratch row."""
        rows = torch.zeros((3, max_tokens), dtype=torch.int64)
        rows[:2] = self.scratch_row
        return rows.pin_memory() if pin else rows

    def _send(self, kv_lens: Tensor, raw_lens: Tensor, rows: Tensor, pre: Tensor,
              post: Tensor, slots: Tensor) -> None:
        """Host rows of this step into the persistent device buffers: the request block whole
        (3 x max_reqs int32, one copy) and the token rows' first T entries (three copies)."""
        n, t = kv_lens.shape[0], pre.shape[0]
        req, tok = self._staging[self._turn]
        done = self._staged[self._turn]
        if done is not None:
            done.synchronize()
        req[0, :n] = kv_lens
        req[1, :n] = raw_lens
        req[2, :n] = rows
        tok[0, :t] = pre
        tok[1, :t] = post
        tok[2, :t] = slots
        self.req_rows.copy_(req, non_blocking=True)
        for i in range(3):
            self.tok_rows[i, :t].copy_(tok[i, :t], non_blocking=True)
        if done is not None:
            done.record()
        self._turn ^= 1

    def build_for_cudagraph_capture(self, common_attn_metadata):
        # Capture runs on dummy requests: every row goes to the scratch row, so capture never
        # touches a live request's exact tokens.
        self._capturing = True
        try:
            return self.build(0, common_attn_metadata)
        finally:
            self._capturing = False

    def _assign_rows(self, cam: CommonAttentionMetadata, first_pos: list[int],
                     seq_cpu: list[int]) -> list[int]:
        n = cam.num_reqs
        if self._capturing:
            return [self.scratch_row] * n
        if self.runner is not None:
            ids = compat.batch_request_ids(self.runner, n)
            return self.rows.assign(ids, compat.live_request_ids(self.runner), first_pos, seq_cpu)
        req_idx = compat.request_table_index(cam)
        if req_idx is not None:
            return [int(r) for r in req_idx[:n]]
        raise RuntimeError("tq_vllm: cannot identify requests (no model runner with an input "
                           "batch and no req_idx in the attention metadata); with vLLM's model "
                           "runner V2 before 0.32 set VLLM_USE_V2_MODEL_RUNNER=0")

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> TQMetadata:
        cam = common_attn_metadata
        n, t = cam.num_reqs, cam.num_actual_tokens
        qsl_cpu = cam.query_start_loc_cpu[: n + 1].tolist()
        qlens = [qsl_cpu[i + 1] - qsl_cpu[i] for i in range(n)]
        num_decodes = 0
        while num_decodes < n and qlens[num_decodes] == 1:
            num_decodes += 1
        seq_cpu = compat.seq_lens_cpu(cam).tolist()
        first_pos = [seq_cpu[i] - qlens[i] for i in range(n)]
        rows = self._assign_rows(cam, first_pos, seq_cpu)

        w = self.window
        seq = torch.tensor(seq_cpu, dtype=torch.int64)
        last = seq - 1
        rows_t = torch.tensor(rows, dtype=torch.int64)
        pre, post, slots = attend.raw_write_plan(w, torch.tensor(qsl_cpu, dtype=torch.int64),
                                                 seq, rows_t, t, num_decodes, self.scratch_row)
        self._send(w.ring_start_t(last), w.raw_len_t(last), rows_t, pre, post, slots)

        decode_kv_max = max((w.ring_start(seq_cpu[b] - 1) for b in range(num_decodes)),
                            default=0)
        segs: list[Segment] = []
        for b in range(num_decodes, n):
            segs += split_segments(w, b, qsl_cpu[b], first_pos[b], seq_cpu[b])
        # rows on FlashAttention's pages whether or not a layer uses it (<= 63 rows of scratch
        # per request): the plan is shared by every layer of the step
        plan = (attend.segment_plan(segs, cam.block_table_tensor[:n], self.raw_index[:n],
                                    self.device, w.sink_tokens, attend.FLASH_PAGE_ROWS)
                if segs and self.device.type == "cuda" else None)
        return TQMetadata(num_reqs=n, num_actual_tokens=t, num_decodes=num_decodes,
                          block_table=cam.block_table_tensor[:n],
                          slot_mapping=cam.slot_mapping[:t], kv_lens=self.kv_lens[:n],
                          raw_lens=self.raw_lens[:n], raw_index=self.raw_index[:n],
                          pre_rows=self.pre_rows, post_rows=self.post_rows, slots=self.slots,
                          rows_host=rows, segments=segs, segment_plan=plan,
                          decode_kv_max=decode_kv_max)


def _metadata_for(layer) -> TQMetadata | None:
    from vllm.forward_context import get_forward_context

    md = get_forward_context().attn_metadata
    if isinstance(md, list):
        md = md[0] if md else None
    if isinstance(md, dict):
        md = md.get(layer.layer_name)
    return md


def _pages(kv_cache: Tensor) -> Tensor:
    """vLLM's per-layer cache tensor as tq_ops' (num_blocks, Hkv, block_size * slot_bytes)."""
    if kv_cache.dim() == 3:
        return kv_cache
    if not kv_cache.is_contiguous():
        raise RuntimeError("tq_vllm: the KV cache view is not contiguous; the backend needs the "
                           "LBHNC layout (set VLLM_KV_CACHE_LAYOUT accordingly)")
    return kv_cache.view(kv_cache.shape[0], kv_cache.shape[1], -1)


class TQAttentionImpl(AttentionImpl[TQMetadata]):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes=None, sliding_window=None, kv_cache_dtype: str = "auto",
                 logits_soft_cap=None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, **kwargs) -> None:
        tq_config.raise_if_problems(tq_config.layer_problems(
            head_size=head_size, kv_cache_dtype=kv_cache_dtype, attn_type=attn_type,
            has_sliding_window=sliding_window is not None, alibi=alibi_slopes is not None,
            logits_soft_cap=logits_soft_cap, kv_sharing=kv_sharing_target_layer_name is not None,
            has_sink=kwargs.get("sinks") is not None))
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.fmt = tq_config.format_for(head_size)
        self.window = tq_config.window_for(self.fmt)
        from vllm.config import get_current_vllm_config

        sched = get_current_vllm_config().scheduler_config
        self.num_rows = int(sched.max_num_seqs) + 1
        # the most tokens one step writes (warm_up_write_cache)
        self.max_write_tokens = int(sched.max_num_batched_tokens)
        self.write_variants_compiled = False
        self.codec: TQCodec | None = None
        self.builtin_codebooks = False
        self.exact16_matrices = False
        self.raw_key: Tensor | None = None
        self.raw_value: Tensor | None = None
        self.side = attend.SideStream()
        # vLLM's FlashAttention for the decoded prefix of chunked prefills (attend.Flash),
        # looked up on the first CUDA call
        self.flash: attend.Flash | None = None
        self._flash_looked_up = False

    def _ensure(self, device: torch.device, dtype: torch.dtype) -> None:
        """Codec tensors and the raw pool, allocated on the first (profiling) call so that the
        profiler counts them before the KV cache is sized, and before any graph capture."""
        if self.codec is None or self.codec.device != device:
            self.codec = TQCodec.build(self.fmt, device)
            self.builtin_codebooks = attend.has_builtin_codebooks(self.codec)
            # a host check of the matrices, once per codec and before any graph capture
            self.exact16_matrices = exact16_matrices(self.codec.rotation,
                                                     self.codec.qjl_projection)
        if device.type == "cuda":
            self.side.prepare(device)
            if not self._flash_looked_up:
                self._flash_looked_up = True
                if _env.prefill_flash_enabled():
                    self.flash, which = compat.flash_varlen(self.head_size)
                else:
                    which = "TQ_PREFILL_FLASH=0"
                logger.info("tq_vllm: the decoded prefix of chunked prefills goes to %s",
                            which if self.flash is not None
                            else f"the Triton prefill kernel ({which})")
        if self.raw_key is None or self.raw_key.device != device or self.raw_key.dtype != dtype:
            shape = (self.num_rows, self.window.row_slots, self.num_kv_heads, self.head_size)
            self.raw_key = torch.zeros(shape, dtype=dtype, device=device)
            self.raw_value = torch.zeros(shape, dtype=dtype, device=device)
            logger.info("tq_vllm: raw pool of %d request rows x %d tokens per layer (%.1f MiB)",
                        self.num_rows, self.window.row_slots,
                        2 * self.raw_key.numel() * self.raw_key.element_size() / 2**20)

    def do_kv_cache_update(self, layer, key: Tensor, value: Tensor, kv_cache: Tensor,
                           slot_mapping: Tensor) -> None:
        md = _metadata_for(layer)
        if md is None:
            return
        self._ensure(key.device, key.dtype)
        n = min(key.shape[0], slot_mapping.shape[0])
        k = key[:n].view(n, self.num_kv_heads, self.head_size)
        v = value[:n].view(n, self.num_kv_heads, self.head_size)
        pages = _pages(kv_cache)
        if (key.device.type == "cuda" and not self.write_variants_compiled
                and not torch.cuda.is_current_stream_capturing()):
            # vLLM's eager warm-up steps before graph capture get here first: every write
            # variant compiles now, not at the first long prompt (seconds each)
            self.write_variants_compiled = True
            c, f = self.codec, self.fmt
            tokens = warm_up_write_cache(pages, c.rotation, c.qjl_projection, c.key_centroids,
                                         c.value_centroids, f.key_mse_bits, f.use_qjl,
                                         f.value_bits, self.exact16_matrices,
                                         self.max_write_tokens, key.dtype, slot_mapping.dtype)
            logger.debug("tq_vllm: cache writes compiled for %s tokens", tokens)
        nd = min(md.num_decodes, n) if key.device.type == "cuda" else 0
        if nd:
            with self.side.fork(key.device):
                self._write_cache(k[:nd], v[:nd], pages, slot_mapping[:nd])
        if n > nd:
            self._write_cache(k[nd:], v[nd:], pages, slot_mapping[nd:n])
        attend.write_raw(self.raw_key, self.raw_value, k, v, md.pre_rows[:n], md.slots[:n],
                         slot_mapping[:n])

    def _write_cache(self, k: Tensor, v: Tensor, pages: Tensor, slot_mapping: Tensor) -> None:
        c, f = self.codec, self.fmt
        torch.ops.turboquant.write_cache(k, v, pages, slot_mapping, c.rotation, c.qjl_projection,
                                         c.key_centroids, c.value_centroids, f.key_mse_bits,
                                         f.use_qjl, f.value_bits, self.exact16_matrices)

    def forward(self, layer, query: Tensor, key: Tensor, value: Tensor, kv_cache: Tensor,
                attn_metadata: TQMetadata, output: Tensor | None = None, output_scale=None,
                output_block_scale=None, **kwargs) -> Tensor:
        try:
            return self._forward(query, key, value, kv_cache, attn_metadata, output,
                                 output_scale, output_block_scale)
        finally:
            # after the attention's launches: the decode write forked by do_kv_cache_update
            # ran beside them
            self.side.join()

    def _forward(self, query: Tensor, key: Tensor, value: Tensor, kv_cache: Tensor,
                 attn_metadata: TQMetadata, output: Tensor | None, output_scale,
                 output_block_scale) -> Tensor:
        if output is None:
            output = torch.empty_like(query)
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("tq_vllm: fused output quantization is not supported")
        self._ensure(query.device, query.dtype)
        md = attn_metadata
        if md is None:  # profiling / dummy run
            return output.fill_(0)
        t, hq, d, hkv = md.num_actual_tokens, self.num_heads, self.head_size, self.num_kv_heads
        q = query[:t].view(t, hq, d)
        out = output[:t].view(t, hq, d)
        cache = _pages(kv_cache)
        nd = md.num_decodes
        if nd:
            block_table = md.block_table[:nd]
            if q.device.type == "cpu":
                # The reference body decodes every page of the table it is given; on the CPU
                # (no graphs) hand it only the pages that hold compressed tokens.
                block_size = cache.shape[2] // self.fmt.slot_bytes
                block_table = block_table[:, :max(1, -(-md.decode_kv_max // block_size))]
            out[:nd] = attend.decode(self.codec, self.window, q[:nd], cache, block_table,
                                     md.kv_lens[:nd], self.raw_key, self.raw_value,
                                     md.raw_index[:nd], md.raw_lens[:nd], self.scale,
                                     self.builtin_codebooks)
        if md.segments:
            k = key[:t].view(t, hkv, d)
            v = value[:t].view(t, hkv, d)
            if q.device.type == "cuda":
                plan = md.segment_plan or attend.segment_plan(
                    md.segments, md.block_table, md.raw_index, q.device,
                    self.window.sink_tokens, attend.FLASH_PAGE_ROWS)
                attend.prefill_varlen(self.codec, self.window, plan, q, k, v, cache,
                                      self.raw_key, self.raw_value, self.scale, out,
                                      self.flash)
            else:
                attend.prefill_contiguous(self.codec, self.window, md.segments, q, k, v, cache,
                                          md.block_table, self.raw_key, self.raw_value,
                                          md.rows_host, self.scale, out)
            attend.write_raw(self.raw_key, self.raw_value, k, v, md.post_rows[:t],
                             md.slots[:t], md.slot_mapping[:t])
        return output
