"""nn.WindowedAttention(mode="hierarchical"): same state-dict keys as the window mode, the
hierarchical op on the projected q/k/v, gradients reach every projection, bad modes rejected."""

import pytest
import torch

from deepseek_kernels.nn import WindowedAttention
from deepseek_kernels.nn.attention import rotary
from deepseek_kernels.reference.hierarchical_attention import hierarchical_attention_ref


def test_hierarchical_mode_runs_the_hierarchical_op():
    m = WindowedAttention(64, 4, num_kv_heads=2, window=16, sinks=1, mode="hierarchical", block=16)
    window_mode = WindowedAttention(64, 4, num_kv_heads=2, window=16, sinks=1)
    window_mode.load_state_dict(m.state_dict())  # the same keys: one checkpoint serves both modes
    x = torch.randn(2, 70, 64, requires_grad=True)
    y = m(x)
    B, S, _ = x.shape
    q = rotary(m.q_proj(x).view(B, S, 4, 16), torch.arange(S), m.rope_theta)
    k = rotary(m.k_proj(x).view(B, S, 2, 16), torch.arange(S), m.rope_theta)
    v = m.v_proj(x).view(B, S, 2, 16)
    o = hierarchical_attention_ref(q, k, v, window=16, block=16, sinks=1)
    torch.testing.assert_close(y, m.o_proj(o.reshape(B, S, -1)), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(y, window_mode(x))  # the far context is seen
    y.square().mean().backward()
    for p in m.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert "mode=hierarchical" in repr(m)


def test_bad_mode_and_configuration():
    with pytest.raises(ValueError, match="mode must be"):
        WindowedAttention(64, 4, window=16, mode="global")
    with pytest.raises(ValueError, match="window must be a positive multiple of block"):
        WindowedAttention(64, 4, window=24, mode="hierarchical", block=16)
