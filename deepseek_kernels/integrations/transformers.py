"""Hugging Face ``transformers`` adapter: ``window_attention`` as an attention implementation.

    from deepseek_kernels.integrations.transformers import register
    name = register()                      # "deepseek_window"
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation=name)
    # or, on an existing model: model.set_attn_implementation(name)

Models that set ``config.sliding_window`` (Mistral, Qwen2, Gemma 2/3 local layers, ...) pass the
window to the attention function per layer; layers without one run full causal attention (a
window as long as the keys). Padding masks are honoured by unpadding into the op's packed
varlen layout (the 2-D mask reaches us through the mask interface registered alongside);
packed sequences (``cu_seq_lens_q/k`` from the data collator) are passed through. Features the
op does not have raise ``NotImplementedError`` naming the feature instead of computing
something else: attention dropout while training, logit soft-capping, learned per-head sink
logits (``module.sinks``, GPT-OSS), returning attention weights.

``transformers`` is an optional dependency: importing this module does not import it;
:func:`register` does.
"""

from __future__ import annotations

import torch

from deepseek_kernels.ops.attention import window_attention

NAME = "deepseek_window"


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      sliding_window: int | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """The attention-function signature of ``transformers``: ``query [B, Hq, Sq, D]``,
    ``key/value [B, Hkv, Sk, D]`` (already through the KV cache) -> ``([B, Sq, Hq, D], None)``."""
    if dropout and module.training:
        raise NotImplementedError(f"{NAME}: attention dropout ({dropout}) is not supported; set the config's "
                                  "attention_dropout to 0 or use another attn_implementation for this model")
    if kwargs.get("softcap") is not None:
        raise NotImplementedError(f"{NAME}: attention logit soft-capping is not supported")
    if getattr(module, "sinks", None) is not None:
        raise NotImplementedError(f"{NAME}: learned sink logits (module.sinks) are not supported; the op's "
                                  "`sinks` keeps the first tokens visible instead")
    if kwargs.get("output_attentions"):
        raise NotImplementedError(f"{NAME}: output_attentions=True needs the attention weights; use 'eager'")
    causal = getattr(module, "is_causal", True)
    if sliding_window is None:
        sliding_window = getattr(module, "sliding_window", None)
    Sq, Sk = query.shape[2], key.shape[2]
    # no window: full attention, i.e. a window at least as long as every sequence
    window = int(sliding_window) if sliding_window else max(Sq, Sk)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, S, H, D], unit stride on D
    common = dict(window=window, causal=causal, softmax_scale=scaling)

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None:  # packed sequences in one row (B == 1), as flash-attention receives them
        if q.shape[0] != 1:
            raise ValueError(f"{NAME}: cu_seq_lens_q needs the packed layout (batch 1), got batch {q.shape[0]}")
        out = window_attention(q[0], k[0], v[0], cu_seqlens_q=cu_q.to(torch.int32),
                               cu_seqlens_k=(cu_k if cu_k is not None else cu_q).to(torch.int32),
                               max_seqlen_q=kwargs.get("max_length_q"), max_seqlen_k=kwargs.get("max_length_k"),
                               **common)
        return out.unsqueeze(0), None

    if attention_mask is None:
        return window_attention(q, k, v, **common), None
    if attention_mask.dim() != 2 or attention_mask.shape != (key.shape[0], Sk):
        raise ValueError(f"{NAME}: expected a 2-D padding mask [batch, keys] = [{key.shape[0]}, {Sk}], got "
                         f"{tuple(attention_mask.shape)} (static caches that pad the keys are not supported)")
    return _unpadded(q, k, v, attention_mask.bool(), common), None


def _unpadded(q, k, v, mask, common):
    """Padded batch -> packed varlen -> padded output (zeros at padded query positions). Valid
    queries are the mask's last Sq columns: left or right padding both keep queries and keys
    end-aligned within each sequence, which is the op's rule."""
    B, Sq = q.shape[:2]
    q_mask = mask[:, -Sq:]
    k_len, q_len = mask.sum(1, dtype=torch.int32), q_mask.sum(1, dtype=torch.int32)
    zero = torch.zeros(1, dtype=torch.int32, device=q.device)
    cu_k, cu_q = torch.cat([zero, k_len.cumsum(0, dtype=torch.int32)]), torch.cat([zero, q_len.cumsum(0, dtype=torch.int32)])
    out_p = window_attention(q[q_mask], k[mask], v[mask], cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                             max_seqlen_q=int(q_len.max()), max_seqlen_k=int(k_len.max()), **common)
    out = q.new_zeros(q.shape)
    out[q_mask] = out_p
    return out


def register(name: str = NAME) -> str:
    """Registers the attention function (and its mask preparation) with ``transformers`` under
    ``name``; returns the name to pass as ``attn_implementation``."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask
    except ImportError as e:
        raise ImportError("deepseek_kernels.integrations.transformers needs `transformers` "
                          "(pip install transformers)") from e
    AttentionInterface.register(name, attention_forward)
    # padding-only 2-D masks (None when there is no padding), like flash-attention gets them
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, flash_attention_mask)
    return name
