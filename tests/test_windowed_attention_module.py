"""nn.WindowedAttention: drop-in state-dict keys, equals plain causal attention when the window
covers the sequence, gradients reach every projection."""

import torch
import torch.nn.functional as F

from deepseek_kernels.nn import WindowedAttention
from deepseek_kernels.nn.attention import rotary


def plain_attention(m: WindowedAttention, x: torch.Tensor, window: int) -> torch.Tensor:
    """The same block written with SDPA and an explicit sliding-window mask."""
    B, S, _ = x.shape
    q = rotary(m.q_proj(x).view(B, S, m.num_heads, m.head_dim), torch.arange(S), m.rope_theta)
    k = rotary(m.k_proj(x).view(B, S, m.num_kv_heads, m.head_dim), torch.arange(S), m.rope_theta)
    v = m.v_proj(x).view(B, S, m.num_kv_heads, m.head_dim)
    rep = m.num_heads // m.num_kv_heads
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    i, j = torch.arange(S).unsqueeze(1), torch.arange(S).unsqueeze(0)
    mask = (j <= i) & (i - j < window)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return m.o_proj(o.transpose(1, 2).reshape(B, S, -1))


def test_state_dict_keys_match_a_standard_attention_block():
    m = WindowedAttention(64, 4, num_kv_heads=2, window=8)
    assert set(m.state_dict()) == {"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"}
    other = WindowedAttention(64, 4, num_kv_heads=2, window=8)
    other.load_state_dict(m.state_dict())
    x = torch.randn(2, 11, 64)
    torch.testing.assert_close(other(x), m(x))


def test_matches_sdpa_with_the_same_window_and_weights():
    torch.manual_seed(0)
    for window in (3, 50):
        m = WindowedAttention(64, 4, num_kv_heads=2, window=window)
        x = torch.randn(2, 19, 64)
        torch.testing.assert_close(m(x), plain_attention(m, x, window), rtol=1e-4, atol=1e-5)


def test_gradients_reach_every_projection():
    m = WindowedAttention(32, 2, window=4, sinks=1)
    m(torch.randn(1, 9, 32)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_non_deterministic_backward_gives_the_same_gradients():
    torch.manual_seed(0)
    a = WindowedAttention(32, 4, num_kv_heads=2, window=5, sinks=1)
    b = WindowedAttention(32, 4, num_kv_heads=2, window=5, sinks=1, deterministic=False)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 19, 32)
    a(x).square().sum().backward()
    b(x).square().sum().backward()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_bad_input_names_the_expected_shape():
    import pytest

    m = WindowedAttention(32, 4, window=8)
    for bad in (torch.randn(1, 10, 31), torch.randn(10, 32)):
        with pytest.raises(ValueError, match=r"x must be \[batch, seq, hidden=32\]"):
            m(bad)
