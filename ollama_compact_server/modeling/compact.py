"""Compact forward passes for the decoder families people run (Llama 3.x, Mistral, Qwen 2.5 /
3, Gemma 3, Phi-3 / Phi-4-mini), over the same weights as the transformers model they are
built from: one function per step instead of transformers' general-purpose modules, with
fused q/k/v and gate/up projections, norms' gains precomputed, and our slot KV cache and masks
prepared once per step. Other architectures keep transformers' modules.

The operations and their order follow transformers' own (norms in float32, rope as
``q * cos + rotate_half(q) * sin``, grouped-query attention as its sdpa path does it), so in
float32 a greedy decode equals transformers' token for token (tests/test_compact.py). The
projections are the model's own modules (dense, int8 / int4 / nf4, low-rank), so compressed
models and the batched adapter slots run here too: a fused projection applies each part's
adapters itself (LoRA / DoRA updates, DoRA / IA3 vectors), the others call the module, whose
forward the adapter bank may have wrapped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..compress import quant
from .quantized import CompressedLinear, Int8Linear

log = logging.getLogger(__name__)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3")
GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")


class Projection:
    """One matrix product over the rows of x: a projection module as it is (its forward, which
    the LoRA bank may have wrapped), or several fused into one matrix (``parts``: their
    output widths), whose LoRA updates the caller adds."""

    def __init__(self, paths: list[str], modules: list[Any]) -> None:
        self.paths = paths
        self.modules = modules
        self.parts = [int(m.out_features) for m in modules]
        self.module: Any = modules[0] if len(modules) == 1 else None
        self.weight: Any = None
        self.bias: Any = None
        self.packed: CompressedLinear | None = None
        if self.module is None:
            self._fuse(modules)

    def _fuse(self, modules: list[Any]) -> None:
        """Concatenates the weights once; the original modules then hold views of the fused
        tensors (no second copy), so their own forward and their shapes still work."""
        first = modules[0]
        if all(isinstance(m, nn.Linear) for m in modules):
            linears: list[nn.Linear] = modules
            with torch.no_grad():
                weight = torch.cat([m.weight for m in linears])
                bias = None
                if linears[0].bias is not None:
                    bias = torch.cat([m.bias for m in linears if m.bias is not None])
            start = 0
            for linear in linears:
                stop = start + linear.out_features
                linear.weight = nn.Parameter(weight[start:stop], requires_grad=False)
                if bias is not None:
                    linear.bias = nn.Parameter(bias[start:stop], requires_grad=False)
                start = stop
            self.weight, self.bias = weight, bias
            return
        if all(type(m) is Int8Linear for m in modules):
            self.packed = _fuse_int8(modules, int(first.in_features))
            return
        raise TypeError("these projections cannot be fused")

    def fused(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, q, in] -> [B, q, sum(parts)]
        if self.packed is not None:
            return self.packed.forward(x)
        return F.linear(x, self.weight, self.bias)


def _fuse_int8(modules: list[Any], in_features: int) -> Int8Linear:
    """One int8 module over the parts' rows; the parts keep views of it. With our CPU
    kernels the parts are blocked first and joined block by block (every part's rows are
    a whole number of blocks: fusable() checks)."""
    from ..compress.format import ModuleSpec
    from . import cpu_kernels

    blocked = cpu_kernels.get() is not None and all(m.qweight.device.type == "cpu" for m in modules)
    if blocked:
        for module in modules:
            module.to_blocked()
    else:
        for module in modules:
            module.to_rows()
    qweight = torch.cat([m.qweight for m in modules])
    scales = torch.cat([m.scales for m in modules])
    total = int(scales.shape[0])
    fused = Int8Linear(
        {"qweight": qweight, "scales": scales}, ModuleSpec("int8", in_features, total), None
    )
    fused_scales = torch.cat([m._scales_f32 for m in modules]) if blocked else scales
    if blocked:
        fused.blocked = True
        fused._scales_f32 = fused_scales
    start = 0
    block = quant.INT8_BLOCK_N
    for module in modules:
        stop = start + module.out_features
        if blocked:
            module.qweight = qweight[start // block : stop // block]
            module._scales_f32 = fused_scales[start:stop]
        else:
            module.qweight = qweight[start:stop]
        module.scales = scales[start:stop]
        start = stop
    return fused


def fusable(modules: list[Any]) -> bool:
    kinds = {type(m) for m in modules}
    if kinds == {nn.Linear}:
        dtypes = {m.weight.dtype for m in modules}
        biases = {m.bias is not None for m in modules}
        return len(dtypes) == 1 and len(biases) == 1
    if kinds != {Int8Linear} or any(m.bias is not None for m in modules):
        return False
    # blocked parts join block by block: each must be whole blocks
    return all(m.out_features % quant.INT8_BLOCK_N == 0 for m in modules)


def projection(prefix: str, parent: nn.Module, names: tuple[str, ...]) -> list[Projection]:
    """Fused where the parts allow it, else one per part."""
    modules = [getattr(parent, n) for n in names]
    paths = [f"{prefix}.{n}" for n in names]
    if fusable(modules):
        return [Projection(paths, modules)]
    return [Projection([p], [m]) for p, m in zip(paths, modules)]


class Norm:
    """RMSNorm as transformers computes it, gain precomputed: Gemma's (1 + w) in float32
    after the normalised float32 value; the others' w times the value cast back."""

    def __init__(self, module: Any, gemma: bool) -> None:
        self.gemma = gemma
        self.eps = float(getattr(module, "eps", getattr(module, "variance_epsilon", 1e-6)))
        weight = module.weight.detach()
        self.gain = (1.0 + weight.float()) if gemma else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.gemma:
            return (h * self.gain).type_as(x)
        return self.gain * h.to(x.dtype)


@dataclass(slots=True)
class Layer:
    index: int
    input_norm: Norm
    qkv: list[Projection]
    q_norm: Norm | None
    k_norm: Norm | None
    o: nn.Module
    post_attention_norm: Norm | None  # Gemma's sandwich norms
    pre_ff_norm: Norm
    gate_up: list[Projection]
    down: nn.Module
    post_ff_norm: Norm | None
    layer_type: str  # which mask and rope it uses
    scaling: float


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class CompactModel:
    """A transformers causal LM of one of :data:`FAMILIES`, run by one function; or the
    language model of a vision-language model (``backbone``: its decoder, ``prefix``: the
    decoder's module path, which adapters name)."""

    def __init__(self, model: Any, backbone: Any = None, prefix: str = "model") -> None:
        backbone = backbone if backbone is not None else model.model
        config: Any = backbone.config
        self.model = model
        self.config = config
        self.family = str(config.model_type)
        gemma = self.family == "gemma3_text"
        self.embed = backbone.embed_tokens
        self.final_norm = Norm(backbone.norm, gemma)
        self.rotary = backbone.rotary_emb
        self.head = model.lm_head
        self.softcap = getattr(config, "final_logit_softcapping", None) if gemma else None
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        self.groups = self.heads // self.kv_heads
        act = str(getattr(config, "hidden_activation", None) or config.hidden_act)
        self.gelu = act in GELU_TANH
        partial = float(getattr(config, "partial_rotary_factor", None) or 1.0)
        self.rotary_dim = int(self.head_dim * partial)
        if act in GELU_TANH:
            self.act = lambda t: F.gelu(t, approximate="tanh")
        elif act == "silu":
            self.act = F.silu
        else:
            raise TypeError(f"activation {act} is not compiled in")
        self.gate_first = self.family != "phi3"  # phi3 computes up * act(gate); same value
        layer_types = list(getattr(config, "layer_types", None) or [])
        self.layer_types = layer_types
        if gemma:
            scaling = float(config.query_pre_attn_scalar) ** -0.5
        else:
            scaling = self.head_dim**-0.5
        self.layers: list[Layer] = []
        for i, block in enumerate(backbone.layers):
            attn, mlp = block.self_attn, block.mlp
            path = f"{prefix}.layers.{i}"
            if self.family == "phi3":
                qkv = [Projection([f"{path}.self_attn.qkv_proj"], [attn.qkv_proj])]
                gate_up = [Projection([f"{path}.mlp.gate_up_proj"], [mlp.gate_up_proj])]
            else:
                qkv = projection(f"{path}.self_attn", attn, ("q_proj", "k_proj", "v_proj"))
                gate_up = projection(f"{path}.mlp", mlp, ("gate_proj", "up_proj"))
            has_qk_norm = hasattr(attn, "q_norm")
            self.layers.append(
                Layer(
                    index=i,
                    input_norm=Norm(block.input_layernorm, gemma),
                    qkv=qkv,
                    q_norm=Norm(attn.q_norm, gemma) if has_qk_norm else None,
                    k_norm=Norm(attn.k_norm, gemma) if has_qk_norm else None,
                    o=attn.o_proj,
                    post_attention_norm=Norm(block.post_attention_layernorm, gemma)
                    if gemma
                    else None,
                    pre_ff_norm=Norm(
                        block.pre_feedforward_layernorm
                        if gemma
                        else block.post_attention_layernorm,
                        gemma,
                    ),
                    gate_up=gate_up,
                    down=mlp.down_proj,
                    post_ff_norm=Norm(block.post_feedforward_layernorm, gemma) if gemma else None,
                    layer_type=layer_types[i] if layer_types else "full_attention",
                    scaling=scaling,
                )
            )
        self.lora: Any = None  # the LoRA bank, set by the runner when adapters arrive
        self.kernels: dict[int, Any] = {}  # the C decode step per KV cache (None: not held)

    # ------------------------------------------------------------------ pieces

    def _project(self, x: torch.Tensor, parts: list[Projection]) -> list[torch.Tensor]:
        """The outputs of a list of (possibly fused) projections, split per projection,
        each with its rows' LoRA update when adapters take part in this forward."""
        outs: list[torch.Tensor] = []
        bank = self.lora
        active = bank is not None and bank.rows.active
        for proj in parts:
            if proj.module is not None:  # as it is: an adapter-wrapped forward adapts itself
                outs.append(proj.module.forward(x))
                continue
            pieces = list(torch.split(proj.fused(x), proj.parts, dim=-1))
            if active:  # each part's own adapters: LoRA / DoRA updates, DoRA / IA3 vectors
                for i, path in enumerate(proj.paths):
                    layer = bank.layers.get(path)
                    if layer is not None:
                        pieces[i] = layer.adapt(x, pieces[i])
            outs.extend(pieces)
        return outs

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> dict[str, Any]:
        types = sorted(set(self.layer_types)) if self.family == "gemma3_text" else [None]
        out: dict[str, Any] = {}
        for layer_type in types:
            if layer_type is None:
                cos, sin = self.rotary(x, positions)
                out["default"] = (cos.unsqueeze(1), sin.unsqueeze(1))
            else:
                cos, sin = self.rotary(x, positions, layer_type)
                out[layer_type] = (cos.unsqueeze(1), sin.unsqueeze(1))
        return out

    def _kernel(self, cache: Any, h: torch.Tensor) -> Any:
        """The C decode step for this cache, when it can run this step: float32 on the CPU,
        no adapter row, every projection held by the kernels (decided once per cache)."""
        if h.dtype != torch.float32 or h.device.type != "cpu":
            return None
        if self.lora is not None and self.lora.rows.active:
            return None
        key = id(cache)
        if key not in self.kernels:
            self.kernels = {key: self._make_kernel(cache)}  # one cache per runner
        return self.kernels[key]

    def _make_kernel(self, cache: Any) -> Any:
        from . import cpu_kernels
        from .decode_kernel import DecodeKernel, Unsupported

        lib = cpu_kernels.get()
        if lib is None:
            return None
        try:
            return DecodeKernel(self, cache, lib)
        except Unsupported as exc:
            log.info("%s: decode steps run on torch (%s)", self.family, exc)
            return None

    def _angles(self, h: torch.Tensor, positions: torch.Tensor) -> dict[str, Any]:
        """Rope cos / sin per layer type as [B, rotary] (the C step's form)."""
        batch = h.shape[0]
        if self.family == "gemma3_text":
            out = {}
            for layer_type in sorted(set(self.layer_types)):
                cos, sin = self.rotary(h, positions, layer_type)
                out[layer_type] = (
                    cos.reshape(batch, -1).contiguous(),
                    sin.reshape(batch, -1).contiguous(),
                )
            return out
        cos, sin = self.rotary(h, positions)
        return {
            "default": (cos.reshape(batch, -1).contiguous(), sin.reshape(batch, -1).contiguous())
        }

    @staticmethod
    def _apply_rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rotary = cos.shape[-1]
        if rotary == t.shape[-1]:
            return (t * cos) + (rotate_half(t) * sin)
        rot, rest = t[..., :rotary], t[..., rotary:]  # partial rotary (Phi-4-mini)
        return torch.cat([(rot * cos) + (rotate_half(rot) * sin), rest], dim=-1)

    def _attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """q: [B, H, q, D]; k, v: [B, KV, L, D]; mask: bool [B, 1, q, L] -> [B, q, H * D],
        grouped-query heads handled as transformers' sdpa path does."""
        batch, _, length, _ = q.shape
        if self.groups > 1 and length == 1:
            query = q.reshape(batch, self.kv_heads, self.groups, self.head_dim)
            out = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scale)
        else:
            if self.groups > 1:
                k = k[:, :, None].expand(batch, self.kv_heads, self.groups, *k.shape[2:])
                k = k.reshape(batch, self.heads, *k.shape[3:])
                v = v[:, :, None].expand(batch, self.kv_heads, self.groups, *v.shape[2:])
                v = v.reshape(batch, self.heads, *v.shape[3:])
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        out = out.reshape(batch, -1, length, self.head_dim).transpose(1, 2).contiguous()
        return out.reshape(batch, length, -1)

    # ------------------------------------------------------------------ forward

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        masks: Any,
        cache: Any,
        keep: int = 1,
        hidden_only: bool = False,
        step: bool = False,
        embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: [B, q]; ``masks``: a bool mask [B, 1, q, L] or one per layer
        type; ``cache``: the bound slot KV cache. Returns the logits of the last ``keep``
        columns ([B, keep, V]; keep 0: every column), or the final hidden states.

        ``step``: a decode step (one new token per row), which the C decode step may run.
        Prompt tokens always take the torch path, even one alone (the rest of a prompt whose
        beginning the cache held): its last-bit results then do not depend on how much of
        the prompt was cached, and a reply is the same with or without prefix reuse.
        ``embeds``: the input embeddings instead of the ids' (a prompt with images)."""
        h = self.embed(input_ids) if embeds is None else embeds  # [B, q, hidden]
        batch, length = input_ids.shape
        kernel = self._kernel(cache, h) if step and length == 1 else None
        if kernel is not None:
            flat = h.reshape(batch, -1).contiguous()  # [B, hidden], advanced in place
            kernel.run(flat, positions.reshape(-1).contiguous(), self._angles(flat, positions))
            if kernel.head is not None and not hidden_only:
                return kernel.logits(flat).view(batch, 1, -1)
            return self._finish(flat.view(batch, 1, -1), keep, hidden_only)
        rope = self._rope(h, positions)
        for layer in self.layers:
            residual = h
            x = layer.input_norm(h)
            parts = self._project(x, layer.qkv)
            if len(parts) == 1:  # phi3's own fused qkv_proj
                q_size = self.heads * self.head_dim
                kv_size = self.kv_heads * self.head_dim
                parts = list(torch.split(parts[0], [q_size, kv_size, kv_size], dim=-1))
            q = parts[0].view(batch, length, -1, self.head_dim)
            k = parts[1].view(batch, length, -1, self.head_dim)
            v = parts[2].view(batch, length, -1, self.head_dim).transpose(1, 2)
            if layer.q_norm is not None and layer.k_norm is not None:
                q, k = layer.q_norm(q), layer.k_norm(k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            cos, sin = rope[layer.layer_type] if len(rope) > 1 else rope["default"]
            q, k = self._apply_rope(q, cos, sin), self._apply_rope(k, cos, sin)
            k, v = cache.update(k, v, layer.index)
            mask = masks[layer.layer_type] if isinstance(masks, dict) else masks
            x = layer.o.forward(self._attention(q, k, v, mask, layer.scaling))
            if layer.post_attention_norm is not None:
                x = layer.post_attention_norm(x)
            h = residual + x
            residual = h
            x = layer.pre_ff_norm(h)
            gate_up = self._project(x, layer.gate_up)
            if len(gate_up) == 1:  # phi3's own fused gate_up_proj
                gate, up = gate_up[0].chunk(2, dim=-1)
            else:
                gate, up = gate_up
            x = layer.down.forward(self.act(gate) * up if self.gate_first else up * self.act(gate))
            if layer.post_ff_norm is not None:
                x = layer.post_ff_norm(x)
            h = residual + x
        return self._finish(h, keep, hidden_only)

    def _finish(self, h: torch.Tensor, keep: int, hidden_only: bool) -> torch.Tensor:
        h = self.final_norm(h)
        if hidden_only:
            return h
        if keep:
            h = h[:, -keep:]
        logits = self.head.forward(h)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def compact_for(model: Any) -> CompactModel | None:
    """The compact forward of ``model`` (of a vision-language model, of its language model),
    or None for an architecture it does not cover (or any layer it cannot run: it says why
    once, and transformers' modules serve instead)."""
    backbone, prefix = getattr(model, "model", None), "model"
    if getattr(getattr(model, "config", None), "vision_config", None) is not None:
        for name in ("language_model", "text_model"):  # LLaVA, Gemma 3; Idefics3, SmolVLM
            if hasattr(backbone, name):
                backbone, prefix = getattr(backbone, name), f"model.{name}"
                break
        else:
            return None
        if not hasattr(model, "lm_head"):
            return None
    config = getattr(backbone, "config", None)
    family = getattr(config, "model_type", None)
    if family not in FAMILIES or backbone is None:
        return None
    if getattr(config, "attn_logit_softcapping", None):
        log.info("%s: attention softcapping is not compiled in; transformers serves it", family)
        return None
    try:
        return CompactModel(model, backbone, prefix)
    except (TypeError, AttributeError) as exc:
        log.info("%s: compact forward unavailable (%s); transformers serves it", family, exc)
        return None
