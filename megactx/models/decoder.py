"""Llama / Qwen2 decoder-only transformer (Qwen2 = Llama + bias on q, k, v).

References: LLaMA (arXiv 2302.13971), Qwen2 (arXiv 2407.10671), and transformers' modeling_llama.py /
modeling_qwen2.py, whose parameter names we keep. Two fusions: q/k/v projections are one matmul (qkv_proj) and
gate/up one more (gate_up_proj); load_weights() maps the checkpoint's separate tensors into them.
Tokens of all sequences in a step are flattened to [T, hidden]; attention is the only per-sequence part and is
delegated to an attention backend that owns the KV cache.

With tensor parallelism (layers/parallel.py) a rank builds the same modules at its share of the sizes: its
attention heads and KV heads, its intermediate features, its vocabulary rows; load_weights() cuts each
checkpoint tensor to that share, so a rank never holds more than its shard.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megactx.config import ModelConfig
from megactx.errors import ModelLoadError
from megactx.layers.linear import Linear
from megactx.layers.parallel import SINGLE, TensorParallel
from megactx.layers.rotary import RotaryEmbedding, apply_rotary


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, tp: TensorParallel = SINGLE):
        super().__init__()
        self.layer_idx, self.tp = layer_idx, tp
        self.num_heads = tp.split(config.num_attention_heads, "attention heads")[1]
        self.num_kv_heads = tp.split(config.num_key_value_heads, "KV heads")[1]
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend) -> torch.Tensor:
        # x: [T, hidden]
        t = x.shape[0]
        qkv = self.qkv_proj(x).view(t, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        h, hk = self.num_heads, self.num_kv_heads
        if backend.rotates_queries:  # Dual Chunk Attention rotates each query three ways
            q, k = qkv[:, :h], apply_rotary(qkv[:, h:h + hk], cos, sin)
        else:
            q, k = apply_rotary(qkv[:, :h + hk], cos, sin).split([h, hk], dim=1)  # q and k in one pass
        v = qkv[:, h + hk:]  # q: [T, H, D], k, v: [T, Hkv, D]
        out = backend(self.layer_idx, q, k, v)  # [T, H, D]
        return self.tp.all_reduce(self.o_proj(out.reshape(t, self.q_size)))  # row-parallel: partial sums


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel = SINGLE):
        super().__init__()
        self.tp = tp
        self.intermediate_size = tp.split(config.intermediate_size, "intermediate_size")[1]
        self.gate_up_proj = Linear(config.hidden_size, 2 * self.intermediate_size, bias=config.mlp_bias)
        self.down_proj = Linear(self.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, hidden]. Few rows: one fused GEMV (memory bound). Many rows: two GEMMs, so that gate and up
        # come out contiguous (elementwise ops on the strided halves of a fused output measured 2.5x slower).
        i = self.intermediate_size
        if x.shape[0] <= 32:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_up_proj(x, slice(0, i)), self.gate_up_proj(x, slice(i, 2 * i))
        # in place: gate is a fresh output (or a view of one), and a new [T, intermediate] tensor costs its
        # allocation and first-touch page faults (hundreds of MB per 8K-token chunk)
        return self.tp.all_reduce(self.down_proj(F.silu(gate, inplace=True).mul_(up)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, tp: TensorParallel = SINGLE):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx, tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, tp)

    def forward(self, x, cos, sin, backend):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, backend)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel = SINGLE):
        super().__init__()
        rows = tp.vocab_split(config.vocab_size)[1]
        # an explicit weight skips nn.Embedding's random init, whose first call imports torch._dynamo (~1.7 s)
        self.embed_tokens = nn.Embedding(rows, config.hidden_size, _weight=torch.empty(rows, config.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(config, i, tp) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


# checkpoint name -> (fused parameter, shard index) ; shards are stacked along dim 0 in this order
_FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


class DecoderLM(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, tp: TensorParallel = SINGLE):
        super().__init__()
        self.config, self.tp = config, tp
        self.model = Backbone(config, tp)
        self.lm_head = Linear(config.hidden_size, tp.vocab_split(config.vocab_size)[1], bias=False)
        self.rotary = rotary  # not a module: its tables are computed on the target device, outside meta init

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, backend,
                seq_len: int | None = None) -> torch.Tensor:
        # input_ids, positions: [T] -> hidden: [T, hidden]
        cos, sin = self.rotary.cos_sin(positions, seq_len)
        # the compute dtype is the norms' (the matrices may be stored in another, see set_weight_dtype)
        x = self.embed(input_ids).to(self.model.norm.weight.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, backend)
        return self.model.norm(x)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [T] -> [T, hidden]; with tensor parallelism each rank looks up the ids in its vocabulary rows
        if self.tp.size == 1:
            return self.model.embed_tokens(input_ids)
        start, rows = self.tp.vocab_split(self.config.vocab_size)
        local = input_ids - start
        outside = (local < 0) | (local >= rows)
        x = self.model.embed_tokens(local.masked_fill(outside, 0))
        return self.tp.all_reduce(x.masked_fill_(outside[:, None], 0))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [N, hidden] -> [N, vocab] fp32 (tensor parallel: every rank's vocabulary shard, gathered)
        return self.tp.all_gather_last(self.lm_head(hidden).float())[:, :self.config.vocab_size]

    def set_weight_dtype(self, dtype: torch.dtype) -> None:
        """Store the matrices (projections, embedding, lm_head) in dtype; norms and biases stay in fp32."""
        for module in self.modules():
            if isinstance(module, (Linear, nn.Embedding)):
                module.weight.data = module.weight.data.to(dtype)

    def linear_layers(self) -> list[Linear]:
        return [m for m in self.modules() if isinstance(m, Linear)]

    def shard_sizes(self, fused: str) -> list[int]:
        """The fused parameter's parts on this rank (its heads, its intermediate features)."""
        c, n = self.config, self.tp.size
        if fused == "qkv_proj":
            return [c.num_attention_heads // n * c.head_dim, c.num_key_value_heads // n * c.head_dim,
                    c.num_key_value_heads // n * c.head_dim]
        return [c.intermediate_size // n, c.intermediate_size // n]

    def rank_share(self, target: str, fused: bool, tensor: torch.Tensor) -> torch.Tensor:
        """A checkpoint tensor -> the part this rank holds: column-parallel parts (q, k, v, gate, up) by output
        rows, row-parallel weights (o, down) by input columns and their biases on rank 0 only (the all-reduce
        adds them once), the embedding and LM head by vocabulary rows (zero rows past the vocabulary)."""
        tp = self.tp
        if tp.size == 1:
            return tensor
        if fused:
            part = tensor.shape[0] // tp.size
            return tensor.narrow(0, tp.rank * part, part)
        if target.endswith(("o_proj.weight", "down_proj.weight")):
            part = tensor.shape[1] // tp.size
            return tensor.narrow(1, tp.rank * part, part)
        if target.endswith(("o_proj.bias", "down_proj.bias")):
            return tensor if tp.rank == 0 else torch.zeros_like(tensor)
        if target in ("model.embed_tokens.weight", "lm_head.weight"):
            start, rows = tp.vocab_split(self.config.vocab_size)
            out = tensor.new_zeros(rows, tensor.shape[1])
            mine = tensor[start:start + rows]
            out[:len(mine)] = mine
            return out
        return tensor

    @torch.no_grad()
    def load_weights(self, weights, source: str) -> None:
        """Copy (name, tensor) pairs in HF naming into the parameters; every parameter must be filled."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.startswith("model.layers.") and ".rotary_emb." in name:
                continue
            target, shard = name, None
            for part, (fused, idx) in _FUSED.items():
                if f".{part}." in name:
                    target, shard = name.replace(f".{part}.", f".{fused}."), idx
            param = params.get(target)
            if param is None:
                continue  # tensors we do not use (e.g. rotary tables)
            if shard is None:
                dest = param
            else:
                sizes = self.shard_sizes(target.split(".")[-2])
                dest = param.narrow(0, sum(sizes[:shard]), sizes[shard])
            tensor = self.rank_share(target, shard is not None, tensor)
            if tuple(dest.shape) != tuple(tensor.shape):
                raise ModelLoadError(f"{source}: tensor {name} has shape {tuple(tensor.shape)}, "
                                     f"the config implies {tuple(dest.shape)}")
            dest.copy_(tensor)
            del tensor  # a dequantized fp32 copy: let it go before the next one is made
            loaded.add(target if shard is None else f"{target}#{shard}")
        if self.config.tie_word_embeddings or "lm_head.weight" not in loaded:
            self.lm_head.weight = self.model.embed_tokens.weight
            loaded.add("lm_head.weight")
        expected = set()
        for pname in params:
            fused = pname.split(".")[-2]
            if fused in ("qkv_proj", "gate_up_proj"):
                expected.update(f"{pname}#{i}" for i in range(len(self.shard_sizes(fused))))
            else:
                expected.add(pname)
        missing = sorted(expected - loaded)
        if missing:
            raise ModelLoadError(f"{source}: missing weight(s) {', '.join(m.split('#')[0] for m in missing[:4])}"
                                 f"{' ...' if len(missing) > 4 else ''}")
