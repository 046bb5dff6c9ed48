"""Attention on the ops every transform can differentiate and batch."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["exact_attention"]


@contextlib.contextmanager
def exact_attention() -> Iterator[None]:
    """Within: ``F.scaled_dot_product_attention`` (and so ``nn.MultiheadAttention``, ``nn.Transformer*``) on its
    math backend, softmax(QKᵀ/√d + mask) V composed of elementary ops, and no ``nn.MultiheadAttention`` /
    ``nn.TransformerEncoderLayer`` inference fast path (restored after).

    torch's fused kernels (flash, memory-efficient, cuDNN) implement only a first-order backward: on torch 2.13
    (CPU, float64 too) nested ``jvp`` raises "Trying to use forward AD with
    _scaled_dot_product_flash_attention_for_cpu" and double backward "derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"; the eval-mode, no-grad fast
    path (``torch._native_multi_head_attention``, ``torch._transformer_encoder_layer_fwd``) has no forward-mode
    derivative either. On the math backend every order (nested jvp, double backward, forward-over-reverse)
    is exact (tests/test_transformer_toolkit.py). ``torch.func.vmap`` batches these elementary ops too, while it
    has no batching rule for the fused kernels or the fast path (it would run the vmapped points one after another).
    """
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
