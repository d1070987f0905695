"""Model runner: the only place that builds tensors. Loads the model, owns the KV cache, runs one step."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from megactx.attention.backend import AttentionMetadata, DenseAttentionBackend, KVCacheTensors, SeqAttention
from megactx.attention.context_parallel import ContextParallel
from megactx.attention.dca import DualChunkAttentionBackend
from megactx.attention.sparse.patterns import SparsePatterns
from megactx.attention.sparse.prefill import SparsePrefill
from megactx.config import DCAConfig, ModelConfig, SparseConfig, parse_dtype
from megactx.config.hardware import cpu_has_native
from megactx.engine.scheduler import ScheduledChunk
from megactx.layers.linear import packing_available
from megactx.layers.parallel import SINGLE, TensorParallel
from megactx.layers.rotary import RotaryEmbedding
from megactx.loader import ModelSource
from megactx.models.decoder import DecoderLM

logger = logging.getLogger(__name__)
PACKED_AUTO_LIMIT = 4 * 2**30  # auto packs only when the fp32 copy is at most this size


def pack_weights(model: DecoderLM, mode: str, max_num_seqs: int, dtype: torch.dtype, device: torch.device) -> int:
    """Pack an fp32 copy of every matrix for batched decoding (see layers/linear.py); returns the bytes used."""
    layers = model.linear_layers()
    size = sum(m.weight.numel() * 4 for m in layers)
    usable = packing_available(device) and dtype == torch.float32
    if mode == "on" and not usable:
        logger.warning("packed weights need fp32 compute on a CPU build of torch with oneDNN; not packing")
    if mode == "off" or not usable or (mode == "auto" and (max_num_seqs == 1 or size > PACKED_AUTO_LIMIT)):
        return 0
    for m in layers:
        m.pack()
    return size


def build_model(source: ModelSource, dtype: torch.dtype, device: torch.device,
                weight_dtype: torch.dtype | None = None, tp: TensorParallel = SINGLE) -> DecoderLM:
    rotary = RotaryEmbedding(source.config, device)
    with torch.device("meta"):  # no random init: every parameter is overwritten by load_weights
        model = DecoderLM(source.config, rotary, tp)
    model = model.to_empty(device=device).to(dtype)
    if weight_dtype is not None and weight_dtype != dtype:
        # before loading, so each tensor is converted as it is copied in: the model is never held in fp32
        model.set_weight_dtype(weight_dtype)
    model.load_weights(source.iter_weights(), source.path)
    return model.eval()


def resolve_weight_dtype(name: str, source: ModelSource, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """auto: fp16 storage for quantized GGUF weights on a CPU (their values already carry less precision than
    fp16; decoding, bound by reading weights, is ~2x faster), else the compute dtype."""
    chosen = parse_dtype(name)
    if chosen is not None:
        return chosen
    return torch.float16 if source.quantized and device.type == "cpu" and dtype == torch.float32 else dtype


def warn_if_emulated(dtype: torch.dtype, device: torch.device) -> bool:
    """Log a warning when the compute dtype has no native support on this CPU (slower than fp32, not faster)."""
    if device.type != "cpu" or cpu_has_native(dtype):
        return False
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
    logger.warning("--dtype %s: this CPU (%s) has no native %s matrix instructions, so prefill and decode run "
                   "several times slower than in fp32; use --dtype fp32 here", name,
                   torch.backends.cpu.get_cpu_capability(), name)
    return True


@dataclass(slots=True)
class ChunkInput:
    """What the model reads of one scheduled chunk; plain data, so the ranks of a tensor-parallel group can be
    sent it (a Sequence also holds its request's sampling state)."""
    token_ids: list[int]  # the tokens at positions [start, start + len(token_ids))
    start: int  # tokens of the sequence already in the cache
    block_table: list[int]  # the KV blocks of positions [0, start + len(token_ids))
    num_prompt_tokens: int
    completes: bool  # the chunk reaches the end of the sequence: its last row's logits are wanted
    seq_id: int = -1  # the sequence's id: what sparse prefill keeps across its chunks is kept per sequence

    @classmethod
    def of(cls, ch: ScheduledChunk, block_size: int) -> "ChunkInput":
        seq, c, n = ch.seq, ch.seq.num_computed_tokens, ch.num_tokens
        return cls(seq.token_ids[c:c + n], c, seq.block_table[:-(-(c + n) // block_size)], seq.num_prompt_tokens,
                   ch.completes, seq.seq_id)


class ModelRunner:
    def __init__(self, source: ModelSource, dtype: str, device: str, num_blocks: int, block_size: int,
                 kv_dtype: str, weight_dtype: str = "auto", dca: DCAConfig | None = None,
                 sparse: tuple[SparseConfig, SparsePatterns] | None = None, packed_weights: str = "off",
                 max_num_seqs: int = 1, tp: TensorParallel = SINGLE, cp: ContextParallel | None = None):
        """tp: this rank's share of the heads (tensor parallelism); cp: its share of the positions (context
        parallelism), or None."""
        self.config: ModelConfig = source.config
        self.device = torch.device(device)
        self.dtype = parse_dtype(dtype) or torch.float32
        warn_if_emulated(self.dtype, self.device)
        self.weight_dtype = resolve_weight_dtype(weight_dtype, source, self.dtype, self.device)
        self.tp, self.cp = tp, cp
        self.model = build_model(source, self.dtype, self.device, self.weight_dtype, tp)
        packed = pack_weights(self.model, packed_weights, max_num_seqs, self.dtype, self.device)
        if packed:
            logger.info("Packed weights for batched decoding: %.0f MiB", packed / 2**20)
        c = self.config
        self.block_size = block_size
        self.kv_dtype = torch.int8 if kv_dtype == "int8" else parse_dtype(kv_dtype) or self.dtype
        self.dca = dca
        first_head, num_heads = tp.split(c.num_attention_heads, "attention heads")  # this rank's heads
        num_kv_heads = tp.split(c.num_key_value_heads, "KV heads")[1]
        cache = KVCacheTensors(c.num_hidden_layers, num_kv_heads, c.head_dim, num_blocks * block_size,
                               self.kv_dtype, self.device)
        heads = (num_heads, num_kv_heads, c.head_dim)
        prefill = None
        if sparse is not None:
            prefill = SparsePrefill(*sparse, c.num_hidden_layers, num_heads, c.head_dim ** -0.5, first_head)
        if dca is None:
            self.backend = DenseAttentionBackend(*heads, cache, prefill, cp)
        else:
            self.backend = DualChunkAttentionBackend(*heads, cache, dca, self.model.rotary, prefill, cp)

    def export_block(self, block: int) -> dict[str, torch.Tensor]:
        """A copy of one KV block: k, v [layers, Hkv, block_size, D] (and an int8 cache's scales [..., 1])."""
        s = slice(block * self.block_size, (block + 1) * self.block_size)
        return {name: torch.stack([t[:, s] for t in per_layer]).cpu()
                for name, per_layer in self.backend.cache.tensors().items()}

    def import_block(self, block: int, tensors: dict[str, torch.Tensor]) -> None:
        """Write a block read back from disk (as export_block gives it)."""
        s = slice(block * self.block_size, (block + 1) * self.block_size)
        for name, per_layer in self.backend.cache.tensors().items():
            for layer, t in enumerate(per_layer):
                t[:, s] = tensors[name][layer]

    def prepare(self, chunks: list[ChunkInput]):
        ids, positions, slot_parts, seqs, last_rows = [], [], [], [], []
        row = 0
        bs = self.block_size
        for ch in chunks:
            c, n = ch.start, len(ch.token_ids)
            ids.extend(ch.token_ids)
            positions.append(torch.arange(c, c + n))
            blocks = ch.block_table
            n_blocks = -(-(c + n) // bs)
            if _consecutive(blocks, n_blocks):  # one slice of the cache
                start = blocks[0] * bs
                key_slots = slice(start, start + c + n)
                slot_parts.append(torch.arange(start + c, start + c + n))
            else:
                table = torch.tensor(blocks[:n_blocks])
                pos = torch.arange(c + n)
                key_slots = (table[pos // bs] * bs + pos % bs).to(self.device)
                slot_parts.append(key_slots[c:].cpu())
            sparse = self.backend.sparse is not None and c < ch.num_prompt_tokens and \
                self.backend.sparse.applies(ch.num_prompt_tokens, n)
            seqs.append(SeqAttention(row, n, c, key_slots, sparse, ch.num_prompt_tokens, ch.seq_id))
            row += n
            if ch.completes:
                last_rows.append(row - 1)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        pos = torch.cat(positions).to(self.device)
        slots = torch.cat(slot_parts)
        if len(slots) > 1 and int(slots[-1]) - int(slots[0]) == len(slots) - 1 and bool((slots.diff() == 1).all()):
            slots = slice(int(slots[0]), int(slots[-1]) + 1)
        meta = AttentionMetadata(seqs, slots if isinstance(slots, slice) else slots.to(self.device))
        return input_ids, pos, meta, torch.tensor(last_rows, dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [n, hidden] rows of forward() -> logits [n, vocab] on the CPU
        return self.model.compute_logits(hidden).cpu()

    def forward(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute the chunks (the KV cache is written) -> final hidden states [T, hidden] of every computed token
        and the rows of the chunks that complete their sequence."""
        return self.forward_inputs([ChunkInput.of(ch, self.block_size) for ch in chunks])

    @torch.inference_mode()
    def forward_inputs(self, chunks: list[ChunkInput]) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids, positions, meta, last_rows = self.prepare(chunks)
        seq_len = max(ch.start + len(ch.token_ids) for ch in chunks)
        totals = torch.cat([torch.full((len(ch.token_ids),), ch.start + len(ch.token_ids))
                            for ch in chunks]).to(self.device)
        positions = self.backend.begin_step(meta, positions, totals)  # DCA: keys are rotated (and cached) at p % L
        if self.cp is None:
            return self.model(input_ids, positions, self.backend, seq_len=seq_len), last_rows
        own = self.backend.own  # context parallelism: this rank computes its rows, then every rank has them all
        hidden = self.model(input_ids[own], positions[own], self.backend, seq_len=seq_len)
        return self.cp.gather_rows(hidden, self.backend.owners), last_rows


def _consecutive(blocks: list[int], n: int) -> bool:
    """The first n blocks are b, b + 1, ... (shared prefix blocks can break the order)."""
    first = blocks[0]
    return blocks[n - 1] - first == n - 1 and all(b == first + i for i, b in enumerate(blocks[:n]))
