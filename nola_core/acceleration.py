"""Speed-ups for frozen ViT towers under mixed precision, each numerically equivalent to autocast.

Two measured problems, two context managers (both restore the module exactly on exit):

- `fused_attention(module)`: open_clip's blocks call `nn.MultiheadAttention` with batch-first
  inputs. With autocast on, or with gradients on, PyTorch leaves MHA's native fast path and
  runs `F.multi_head_attention_forward`, which transposes the input to sequence-first and
  multiplies the non-contiguous result by the packed in-projection; on CPU that lowers to a
  `bmm` against the weight expanded over the batch, copied in memory. Measured on this
  project's 2-core CPU with ViT-B/16: 5.6 images/s for a bf16-autocast forward against 6.8 in
  fp32, and most of a training step spent in `aten::copy_`. The replacement computes the same
  attention batch-first (`F.linear` on the contiguous input, `F.scaled_dot_product_attention`,
  out-projection), with the module's own parameters; SDPA picks the fused kernel (flash on CUDA).
- `precast_weights(module, dtype)`: CPU autocast caches its casts only for tensors that need a
  gradient, so the frozen weights of a tower are recast from fp32 on every forward. Casting
  the frozen weights and biases of `Linear`, `Conv*` and `MultiheadAttention` modules once gives
  the tensors autocast would have produced anyway, bit for bit, without the per-call copy.
  Trainable parameters (prompts, LayerNorm affines, heads) are left in fp32 for the optimizer.

`reduced_precision(module, device, precision)` applies both and opens the autocast context; it
is what feature extraction and prompt tuning use.
"""

from __future__ import annotations

import contextlib
import types
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from nola_core.runtime import autocast_context

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_PRECAST_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
BF16_FEATURE_MIN_COSINE = 0.999
"""Agreement bound under which `auto` extracts features in bf16 on the CPU: every image's bf16
feature within this cosine of its fp32 feature. Worst measured on real images: 0.99995 (tiny,
mini, ViT-B/16 CLIP and DINO; `python -m benchmarks.agreement`, BENCHMARKS.md), 20x margin in
1 - cosine."""
BF16_FEATURE_MEAN_COSINE = 0.9995
"""... and the mean over the images at least this (worst measured mean 0.99996)."""


def cpu_supports_bf16() -> bool:
    """True when oneDNN has native bf16 kernels here (AVX-512 BF16 or AMX), so bf16 is a speed-up."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(device: torch.device, precision: str = "auto", extraction: bool = False) -> str:
    """`auto` → bf16 on CUDA; on the CPU, bf16 for feature extraction (`extraction=True`) where
    bf16 is native (`cpu_supports_bf16`), fp32 otherwise and for training.

    Why extraction only: there bf16 is 3-6x faster on such a CPU and its features were measured
    against fp32 on real images (tiny, mini, ViT-B/16 CLIP and DINO: per-image cosine >=
    `BF16_FEATURE_MIN_COSINE`, mean >= `BF16_FEATURE_MEAN_COSINE`; BENCHMARKS.md, "Precision
    policy", tests/test_precision_auto.py); training under bf16 was not checked that way.
    Artifact keys hold this resolved value, never "auto", so a machine where it differs does not
    reuse the other's features.
    """
    if precision == "auto":
        if device.type == "cuda":
            return "bf16"
        return "bf16" if extraction and device.type == "cpu" and cpu_supports_bf16() else "fp32"
    if precision not in _DTYPES:
        raise ValueError(f"unknown precision {precision!r}; choose auto, fp32, bf16 or fp16")
    return precision


def compute_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    return _DTYPES[resolve_precision(device, precision)]


def _fused_self_attention(self: nn.MultiheadAttention, query, key, value, key_padding_mask=None,
                          need_weights=True, attn_mask=None, average_attn_weights=True, is_causal=False):
    """`nn.MultiheadAttention.forward` for batch-first self-attention, through SDPA.

    Anything else (cross-attention, padding masks, attention weights asked for, separate
    q/k/v projections) goes to the original forward unchanged.
    """
    plain = (
        query is key and key is value and self.batch_first and query.dim() == 3 and not need_weights
        and key_padding_mask is None and self._qkv_same_embed_dim and self.in_proj_weight is not None
        and self.bias_k is None and not self.add_zero_attn
    )
    if not plain:
        return type(self).forward(self, query, key, value, key_padding_mask=key_padding_mask,
                                  need_weights=need_weights, attn_mask=attn_mask,
                                  average_attn_weights=average_attn_weights, is_causal=is_causal)
    batch, length, width = query.shape
    heads = self.num_heads
    qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)
    q, k, v = qkv.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
    if attn_mask is not None and attn_mask.dim() == 3:  # [batch*heads, L, S] as MHA takes it
        attn_mask = attn_mask.view(batch, heads, *attn_mask.shape[-2:])
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.to(q.dtype)
    dropout = self.dropout if self.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout,
                                         is_causal=is_causal and attn_mask is None)
    out = out.transpose(1, 2).reshape(batch, length, width)
    return self.out_proj(out), None


@contextlib.contextmanager
def fused_attention(module: nn.Module) -> Iterator[int]:
    """Route every `nn.MultiheadAttention` in `module` through batch-first SDPA for the duration.

    Parameter names, identities and state dicts are untouched (only the instances' `forward`
    is overridden, then removed); yields how many attention modules were patched.
    """
    patched = [m for m in module.modules() if isinstance(m, nn.MultiheadAttention) and "forward" not in vars(m)]
    for attention in patched:
        attention.forward = types.MethodType(_fused_self_attention, attention)
    try:
        yield len(patched)
    finally:
        for attention in patched:
            vars(attention).pop("forward", None)


@contextlib.contextmanager
def precast_weights(module: nn.Module, dtype: torch.dtype) -> Iterator[int]:
    """Cast frozen matmul/conv weights and biases to `dtype` for the duration; restore them after.

    Only parameters with `requires_grad=False` move, in place (`param.data`), so optimizers and
    DDP keep their references; yields how many tensors were cast. A no-op for fp32.
    """
    saved: list[tuple[nn.Parameter, torch.Tensor]] = []
    if dtype != torch.float32:
        seen: set[int] = set()
        for sub in module.modules():
            if isinstance(sub, _PRECAST_MODULES):
                names = ("weight", "bias")
            elif isinstance(sub, nn.MultiheadAttention):
                names = ("in_proj_weight", "in_proj_bias")
            else:
                continue
            for name in names:
                parameter = getattr(sub, name, None)
                if (not isinstance(parameter, nn.Parameter) or parameter.requires_grad or id(parameter) in seen
                        or not parameter.is_floating_point() or parameter.dtype == dtype):
                    continue
                seen.add(id(parameter))
                saved.append((parameter, parameter.data))
                parameter.data = parameter.data.to(dtype)
    try:
        yield len(saved)
    finally:
        for parameter, original in saved:
            parameter.data = original


@contextlib.contextmanager
def reduced_precision(module: nn.Module | None, device: torch.device, precision: str = "auto",
                      fuse_attention: bool = True, precast: bool = True):
    """Autocast at `precision`, plus (when `module` is given) fused attention and pre-cast weights.

    Numerically this is autocast: pre-casting yields exactly the tensors autocast would use,
    and the fused attention computes the same function (to float rounding) as MHA's own path.
    Feature extraction passes its resolved precision (`FeatureConfig.resolved_precision`).
    """
    precision = resolve_precision(device, precision)
    dtype = _DTYPES[precision]
    with contextlib.ExitStack() as stack:
        if module is not None and fuse_attention:
            stack.enter_context(fused_attention(module))
        if module is not None and precast and dtype != torch.float32 and device.type in ("cpu", "cuda"):
            stack.enter_context(precast_weights(module, dtype))
        stack.enter_context(autocast_context(device, precision))
        yield dtype
