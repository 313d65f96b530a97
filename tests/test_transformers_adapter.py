"""window_attention as a Hugging Face transformers attention implementation, checked against the
model's own eager attention on a small randomly initialised Mistral (sliding window 5)."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from deepseek_kernels.integrations.transformers import NAME, attention_forward, register  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float32


def _models(sliding_window=5, **cfg):
    from transformers import MistralConfig, MistralForCausalLM

    register()
    config = MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           sliding_window=sliding_window, attention_dropout=0.0, **cfg)
    torch.manual_seed(0)
    ours = MistralForCausalLM(copy.deepcopy(config)).to(DEV, DTYPE).eval()  # configs must not be shared:
    ours.set_attn_implementation(NAME)                                       # the implementation lives there
    ref = MistralForCausalLM(copy.deepcopy(config)).to(DEV, DTYPE).eval()
    ref.load_state_dict(ours.state_dict())
    ref.set_attn_implementation("eager")
    assert ours.config._attn_implementation == NAME and ref.config._attn_implementation == "eager"
    return ours, ref


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("sliding_window", [5, None], ids=["window5", "full"])
def test_logits_match_eager_attention(sliding_window):
    ours, ref = _models(sliding_window)
    ids = torch.randint(0, 97, (2, 23), device=DEV)
    with torch.no_grad():
        assert rel(ours(ids).logits, ref(ids).logits) < 1e-4


def test_left_padding_matches_eager_attention():
    ours, ref = _models()
    ids = torch.randint(0, 97, (3, 19), device=DEV)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0  # left padding
    mask[2, :1] = 0
    with torch.no_grad():
        a, b = ours(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits
    valid = mask.bool()
    assert rel(a[valid], b[valid]) < 1e-4


def test_greedy_generation_with_kv_cache_matches_eager():
    ours, ref = _models()
    ids = torch.randint(0, 97, (2, 9), device=DEV)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(ours.generate(ids, **kw), ref.generate(ids, **kw))


def test_gradients_match_eager_attention():
    ours, ref = _models()
    ours.train(), ref.train()
    ids = torch.randint(0, 97, (2, 17), device=DEV)
    ours(ids, labels=ids).loss.backward()
    ref(ids, labels=ids).loss.backward()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert rel(p.grad, q.grad) < 1e-3, name


def test_unsupported_features_raise_clearly():
    q = torch.randn(1, 4, 3, 8)
    k = v = torch.randn(1, 2, 3, 8)

    class M(torch.nn.Module):
        is_causal = True

    m = M().train()
    with pytest.raises(NotImplementedError, match="dropout"):
        attention_forward(m, q, k, v, None, dropout=0.1)
    with pytest.raises(NotImplementedError, match="soft-capping"):
        attention_forward(m.eval(), q, k, v, None, softcap=30.0)
    m.sinks = torch.zeros(4)
    with pytest.raises(NotImplementedError, match="sink"):
        attention_forward(m, q, k, v, None)
    del m.sinks
    with pytest.raises(ValueError, match="padding mask"):
        attention_forward(m, q, k, v, torch.ones(1, 3, 3))
