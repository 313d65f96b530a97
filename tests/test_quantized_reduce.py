"""The DDP hook's fused ops: quantize_blockwise_into (padded send buffers), dequantize_sum_blockwise
and requantize_sum_blockwise (sum of W quantized shards, re-quantized). Reference semantics and op
plumbing on CPU; the CUDA kernels bit for bit against the reference (marked gpu)."""

from __future__ import annotations

import pytest
import torch

import deepseek_kernels as dk
from deepseek_kernels.reference import (
    FORMATS,
    dequantize_blockwise_ref,
    dequantize_sum_blockwise_ref,
    quantize_blockwise_into_ref,
    quantize_blockwise_ref,
    requantize_sum_blockwise_ref,
)

FMTS = list(FORMATS)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
OPS = torch.ops.deepseek_kernels
# (W, shape of one summand, block): one rank, odd W, tail blocks, rows, non-power-of-two blocks.
SUM_CASES = [(1, (256,), 128), (2, (17,), 16), (3, (3, 1000), 128), (4, (4, 96), 96), (5, (2, 3, 4097), 128),
             (8, (4096,), 128)]


def cid(w, shape, block):
    return f"W{w}-" + "x".join(map(str, shape)) + f"-B{block}"


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype != torch.int8 else t


def shards(world, shape, block, fmt, device="cpu", seed=0):
    """W quantized tensors of different magnitudes: q [W, *shape], scales [W, ..., nb]."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    qs, ss = [], []
    for w in range(world):
        x = (torch.randn(shape, generator=g) * 10.0 ** (w % 3 - 1)).to(device)
        q, s = quantize_blockwise_ref(x, fmt, block)
        qs.append(q)
        ss.append(s)
    return torch.stack(qs), torch.stack(ss)


# ---------------------------------------------------------------- reference semantics (CPU)


@pytest.mark.parametrize("average", [False, True], ids=["sum", "mean"])
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("world,shape,block", SUM_CASES, ids=[cid(*c) for c in SUM_CASES])
def test_dequantize_sum_is_the_ordered_fp32_sum(world, shape, block, fmt, average):
    q, s = shards(world, shape, block, fmt)
    out = dk.dequantize_sum_blockwise(q, s, block, average=average)
    # the definition, written out independently: ascending w, one rounding per op
    acc = None
    for w in range(world):
        d = q[w].float() * s[w].repeat_interleave(block, -1)[..., : shape[-1]]
        acc = d if acc is None else acc + d
    if average:
        acc = acc / torch.full_like(acc, float(world))
    assert out.shape == shape and out.dtype == torch.float32
    assert torch.equal(out, acc)
    # and it is the sum of the dequantized tensors up to fp32 rounding
    # (each add rounds once, relative to the partial sums' magnitudes: at most sum |d_w|)
    parts = [dequantize_blockwise_ref(q[w], s[w], block).double() for w in range(world)]
    div = world if average else 1
    exact, mags = sum(parts) / div, sum(p.abs() for p in parts) / div
    assert ((out.double() - exact).abs() <= mags * world * 2**-23).all()
    for od in (torch.float16, torch.bfloat16):
        assert torch.equal(dk.dequantize_sum_blockwise(q, s, block, average=average, out_dtype=od), out.to(od))


@pytest.mark.parametrize("stochastic", [False, True], ids=["rne", "sr"])
@pytest.mark.parametrize("edtype", [None, torch.float32, torch.bfloat16], ids=lambda d: "noEF" if d is None else "EF-" + DT[d])
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("world,shape,block", SUM_CASES, ids=[cid(*c) for c in SUM_CASES])
def test_requantize_sum_is_quantize_of_the_sum(world, shape, block, fmt, edtype, stochastic):
    q, s = shards(world, shape, block, fmt)
    e = None if edtype is None else (torch.randn(shape) * 0.01).to(edtype)
    e_ref = None if e is None else e.clone()
    q2, s2 = dk.requantize_sum_blockwise(q, s, block, average=True, stochastic=stochastic, seed=77, error=e)
    total = dk.dequantize_sum_blockwise(q, s, block, average=True)
    q_ref, s_ref = dk.quantize_blockwise(total, fmt, block, stochastic=stochastic, seed=77, error=e_ref)
    assert q2.dtype == q.dtype and q2.shape == shape and s2.shape == s.shape[1:]
    assert torch.equal(bits(q2), bits(q_ref)) and torch.equal(s2, s_ref)
    if e is not None:
        assert torch.equal(e, e_ref)


@pytest.mark.parametrize("fmt", FMTS)
def test_nonfinite_shard_blocks_propagate(fmt):
    q, s = shards(3, (512,), 128, fmt)
    s[1, 2] = float("nan")  # one rank's block 2 was non-finite
    out = dk.dequantize_sum_blockwise(q, s, 128, average=True)
    assert torch.isnan(out[256:384]).all() and torch.isfinite(out[:256]).all() and torch.isfinite(out[384:]).all()
    e = torch.randn(512) * 0.01
    e_before = e.clone()
    q2, s2 = dk.requantize_sum_blockwise(q, s, 128, average=True, error=e)
    assert torch.isnan(s2[2]) and torch.isfinite(s2[[0, 1, 3]]).all()
    assert (bits(q2[256:384]) == 0).all()
    assert torch.equal(e[256:384], e_before[256:384]) and not torch.equal(e[:256], e_before[:256])


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("n,m,block", [(1, 256, 128), (17, 32, 16), (300, 1024, 128), (1024, 1024, 128),
                                       (1000, 1000, 96)], ids=lambda v: str(v))
def test_quantize_into_is_quantize_zero_padded(n, m, block, fmt):
    x = torch.randn(n) * 3
    e = torch.randn(n) * 0.01
    e_ref = e.clone()
    q_out = torch.full((m,), 0x7F, dtype=torch.uint8).view(FORMATS[fmt].dtype)  # poison: 127 / NaN-ish bits
    s_out = torch.full((-(-m // block),), float("nan"))
    dk.quantize_blockwise_into(x, fmt, block, q_out, s_out, stochastic=True, seed=4, error=e)
    # the quantization of x zero-padded to m elements, with x's own residual update
    q_ref, s_ref = quantize_blockwise_ref(torch.nn.functional.pad(x, (0, m - n)), fmt, block, stochastic=True, seed=4,
                                          error=torch.nn.functional.pad(e_ref, (0, m - n)))
    assert torch.equal(bits(q_out), bits(q_ref)) and torch.equal(s_out, s_ref)
    _, _ = quantize_blockwise_ref(x, fmt, block, stochastic=True, seed=4, error=e_ref)
    assert torch.equal(e, e_ref)


def test_hook_pipeline_reduces_like_the_unfused_one():
    """The fused reduce step gives the mean of the shards within one rounding of the old
    dequantize -> mean -> quantize path (summation order is now fixed: ascending rank)."""
    q, s = shards(4, (1024,), 128, "int8")
    parts = torch.stack([dequantize_blockwise_ref(q[w], s[w], 128) for w in range(4)])
    total = dequantize_sum_blockwise_ref(q, s, 128, average=True)
    assert (total - parts.mean(0)).abs().max() <= parts.abs().max() * 2**-21


# ---------------------------------------------------------------- op plumbing (CPU)


def _opcheck(opname, args, fp8: bool):
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if fp8:
        # SchemaCheckMode compares with allclose, which has no fp8 kernel (see test_quantization)
        utils = utils[1:]
    torch.library.opcheck(getattr(OPS, opname).default, args, test_utils=utils)


@pytest.mark.parametrize("fmt", FMTS)
def test_opcheck_cpu(fmt):
    q, s = shards(3, (2, 200), 64, fmt)
    fp8 = fmt != "int8"
    _opcheck("dequantize_sum_blockwise", (q, s, 64, True, torch.bfloat16), fp8)
    _opcheck("requantize_sum_blockwise", (q, s, 64, True, False, 0, None), fp8)
    _opcheck("requantize_sum_blockwise", (q, s, 64, False, True, 9, torch.zeros(2, 200)), fp8)
    x = torch.randn(300)
    q_out = torch.empty(512, dtype=FORMATS[fmt].dtype)
    _opcheck("quantize_blockwise_into", (x, fmt, 128, True, 3, torch.zeros(300), q_out, torch.empty(4)), fp8)
    key = torch.tensor([12345], dtype=torch.int32)  # the optional device-resident key
    _opcheck("quantize_blockwise_into", (x, fmt, 128, True, 3, None, q_out, torch.empty(4), key), fp8)
    _opcheck("requantize_sum_blockwise", (q, s, 64, True, True, 9, None, key), fp8)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(8, 3, 1000, dtype=torch.float8_e4m3fn)
        s = torch.empty(8, 3, 8)
        out = dk.dequantize_sum_blockwise(q, s, 128, out_dtype=torch.bfloat16)
        assert out.shape == (3, 1000) and out.dtype == torch.bfloat16
        q2, s2 = dk.requantize_sum_blockwise(q, s, 128, error=torch.empty(3, 1000))
        assert q2.shape == (3, 1000) and q2.dtype == torch.float8_e4m3fn and s2.shape == (3, 8)
        dk.quantize_blockwise_into(torch.empty(100), "int8", 128, torch.empty(256, dtype=torch.int8), torch.empty(2))


def _hook_like(x, e1, e2, q_out, s_out):
    dk.quantize_blockwise_into(x, "int8", 64, q_out, s_out, stochastic=True, seed=3, error=e1)
    q2, s2 = dk.requantize_sum_blockwise(q_out.view(2, -1), s_out.view(2, -1), 64, average=True, stochastic=True,
                                         seed=5, error=e2)
    return dk.dequantize_sum_blockwise(torch.stack([q2, q2]), torch.stack([s2, s2]), 64)


def test_torch_compile_fullgraph_cpu():
    x = torch.randn(500)
    a = (torch.randn(500) * 0.01, torch.randn(256) * 0.01, torch.empty(512, dtype=torch.int8), torch.empty(8))
    b = (a[0].clone(), a[1].clone(), torch.empty(512, dtype=torch.int8), torch.empty(8))
    eager = _hook_like(x, *a)
    compiled = torch.compile(_hook_like, fullgraph=True)(x, *b)
    assert torch.equal(eager, compiled)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # in-place residuals survive functionalization
    assert torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])  # and so do the written send buffers


def _bad_sum_cases():
    q, s = shards(2, (256,), 128, "int8")
    return [
        ("q must be int8", dict(q=q.float(), scales=s)),
        ("at least two dimensions", dict(q=q[0], scales=s[0])),
        ("W >= 1", dict(q=q[:0], scales=s[:0])),
        ("scales must have shape", dict(q=q, scales=s[:, :1])),
        ("scales must have shape", dict(q=q, scales=s, block=64)),
        ("scales must be float32", dict(q=q, scales=s.double())),
        ("scales must be on the device", dict(q=q, scales=s.to("meta"))),
        ("block", dict(q=q, scales=s, block=24)),
    ]


@pytest.mark.parametrize("needle,kwargs", _bad_sum_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_sum_input_raises_clear_error(needle, kwargs):
    with pytest.raises(ValueError, match=needle):
        dk.dequantize_sum_blockwise(**kwargs)
    with pytest.raises(ValueError, match=needle):
        dk.requantize_sum_blockwise(**kwargs)


def test_bad_requantize_and_into_input():
    q, s = shards(2, (256,), 128, "int8")
    with pytest.raises(ValueError, match="error must have the shape"):
        dk.requantize_sum_blockwise(q, s, 128, error=torch.zeros(2, 256))
    with pytest.raises(ValueError, match="contiguous"):
        dk.requantize_sum_blockwise(q.view(2, 1, 256), s.view(2, 1, 2), 128, error=torch.zeros(1, 512)[:, ::2])
    with pytest.raises(ValueError, match="out_dtype"):
        dk.dequantize_sum_blockwise(q, s, 128, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="seed"):
        dk.requantize_sum_blockwise(q, s, 128, stochastic=True, seed=-1)
    x = torch.randn(300)
    ok = dict(q_out=torch.empty(512, dtype=torch.int8), scales_out=torch.empty(4))
    for needle, kw in [
        ("fmt", dict(fmt="int4")),
        ("x must be 1-d", dict(x=x.view(3, 100))),
        ("x must be float32", dict(x=x.int())),
        ("q_out must hold int8 codes", dict(q_out=torch.empty(512, dtype=torch.float8_e4m3fn))),
        ("q_out must hold at least", dict(q_out=torch.empty(256, dtype=torch.int8), scales_out=torch.empty(2))),
        ("contiguous 1-d", dict(q_out=torch.empty(2, 256, dtype=torch.int8))),
        ("scales_out must be a contiguous float32 \\[4\\]", dict(scales_out=torch.empty(3))),
        ("scales_out", dict(scales_out=torch.empty(4, dtype=torch.float64))),
        ("on the device of x", dict(scales_out=torch.empty(4, device="meta"))),
        ("error must have the shape", dict(error=torch.zeros(512))),
        ("block", dict(block=8)),
    ]:
        args = {"x": x, "fmt": "int8", "block": 128, **ok, **kw}
        with pytest.raises(ValueError, match=needle):
            dk.quantize_blockwise_into(**args)
    with pytest.raises(ValueError, match="block"):  # straight into the op: the kernel validates too
        OPS.quantize_blockwise_into(x, "int8", 24, False, 0, None, ok["q_out"], ok["scales_out"])


def test_explain_names_the_reference_on_cpu():
    q, s = shards(2, (256,), 128, "int8")
    assert "reference" in dk.explain("dequantize_sum_blockwise", q, s, 128)
    assert "reference" in dk.explain("requantize_sum_blockwise", q, s, 128)
    x = torch.randn(100)
    assert "reference" in dk.explain("quantize_blockwise_into", x, "int8", 128, torch.empty(128, dtype=torch.int8),
                                     torch.empty(1))


# ---------------------------------------------------------------- CUDA kernels (H200)

GPU_SUM_CASES = SUM_CASES + [
    (2, (3_276_800,), 128),  # a 25 MiB bucket's shard at W=2
    (8, (819_200,), 128),  # ... at W=8
    (7, (1001,), 16),  # cols not a multiple of 16: scalar path
    (3, (2, 3000), 2048),  # blocks longer than the registers a lane caches
    (16, (5, 256), 64),
]


@pytest.fixture
def poison_cuda():
    def poison():
        junk = torch.empty(64 << 20, dtype=torch.uint8, device="cuda").fill_(0xFF)
        del junk

    return poison


@pytest.mark.gpu
@pytest.mark.parametrize("average", [False, True], ids=["sum", "mean"])
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("world,shape,block", GPU_SUM_CASES, ids=[cid(*c) for c in GPU_SUM_CASES])
def test_cuda_dequantize_sum_matches_reference(world, shape, block, fmt, average, poison_cuda):
    q, s = shards(world, shape, block, fmt, "cuda")
    if shape[-1] >= 2 * block:
        s[0, ..., 1] = float("nan")  # a non-finite block on one rank
    q_cpu, s_cpu = q.cpu(), s.cpu()
    for od in DTYPES:
        poison_cuda()
        out = dk.dequantize_sum_blockwise(q, s, block, average=average, out_dtype=od)
        ref = dequantize_sum_blockwise_ref(q_cpu, s_cpu, block, average=average, out_dtype=od)
        assert torch.equal(out.cpu().nan_to_num(7.0), ref.nan_to_num(7.0)), od
        assert torch.equal(out.cpu().isnan(), ref.isnan())


@pytest.mark.gpu
@pytest.mark.parametrize("stochastic", [False, True], ids=["rne", "sr"])
@pytest.mark.parametrize("edtype", [None, torch.float32, torch.bfloat16, torch.float16], ids=lambda d: "noEF" if d is None else "EF-" + DT[d])
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("world,shape,block", GPU_SUM_CASES, ids=[cid(*c) for c in GPU_SUM_CASES])
def test_cuda_requantize_sum_matches_reference(world, shape, block, fmt, edtype, stochastic, poison_cuda):
    q, s = shards(world, shape, block, fmt, "cuda")
    if shape[-1] >= 3 * block:
        s[world - 1, ..., 1] = float("nan")  # non-finite block: NaN scale, zero codes, residual kept
        s[..., 2] *= 1e-38  # a block whose re-quantized scale underflows (flushed to 0)
    e = None if edtype is None else (torch.randn(shape, device="cuda") * 0.01).to(edtype)
    e_ref = None if e is None else e.cpu()
    poison_cuda()
    q2, s2 = dk.requantize_sum_blockwise(q, s, block, average=True, stochastic=stochastic, seed=99, error=e)
    q_ref, s_ref = requantize_sum_blockwise_ref(q.cpu(), s.cpu(), block, average=True, stochastic=stochastic, seed=99,
                                                error=e_ref)
    assert torch.equal(bits(q2).cpu(), bits(q_ref))
    assert torch.equal(s2.cpu().isnan(), s_ref.isnan())
    assert torch.equal(s2.cpu().nan_to_num(7.0), s_ref.nan_to_num(7.0))
    if e is not None:
        assert torch.equal(e.cpu(), e_ref)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DT.get)
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("n,m,offset", [(1, 256, 0), (17, 1024, 0), (4097, 8192, 0), (6_553_600, 6_553_600, 0),
                                        (6_553_601, 6_553_856, 0), (1000, 1024, 1), (4096, 4112, 16)],
                         ids=lambda v: str(v))
def test_cuda_quantize_into_matches_reference(n, m, offset, fmt, dtype, poison_cuda):
    """offset: q_out starts that many bytes into a larger buffer (1: the unaligned scalar path)."""
    x = (torch.randn(n, device="cuda") * 3).to(dtype)
    e = torch.randn(n, device="cuda") * 0.01
    e_ref = e.cpu()
    poison_cuda()
    block = 128
    code = FORMATS[fmt].dtype
    buf = torch.full((m + offset,), 0xFF, dtype=torch.uint8, device="cuda")
    q_out = buf[offset:].view(code)
    s_out = torch.full((-(-m // block),), float("nan"), device="cuda")
    dk.quantize_blockwise_into(x, fmt, block, q_out, s_out, stochastic=True, seed=21, error=e)
    q_ref = torch.empty(m, dtype=code)
    s_ref = torch.empty(-(-m // block))
    quantize_blockwise_into_ref(x.cpu(), fmt, block, q_ref, s_ref, stochastic=True, seed=21, error=e_ref)
    assert torch.equal(bits(q_out).cpu(), bits(q_ref)) and torch.equal(s_out.cpu(), s_ref)
    assert torch.equal(e.cpu(), e_ref)
    assert (buf[:offset] == 0xFF).all()  # nothing written before the buffer


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FMTS)
def test_cuda_opcheck_compile_and_explain(fmt):
    q, s = shards(4, (3, 384), 128, fmt, "cuda")
    fp8 = fmt != "int8"
    _opcheck("dequantize_sum_blockwise", (q, s, 128, True, torch.bfloat16), fp8)
    _opcheck("requantize_sum_blockwise", (q, s, 128, True, True, 5, torch.zeros(3, 384, device="cuda")), fp8)
    x = torch.randn(1000, device="cuda")
    _opcheck("quantize_blockwise_into", (x, fmt, 128, True, 3, torch.zeros_like(x),
                                         torch.empty(1024, dtype=FORMATS[fmt].dtype, device="cuda"),
                                         torch.empty(8, device="cuda")), fp8)
    assert "CUDA kernel" in dk.explain("requantize_sum_blockwise", q, s, 128)
    assert "CUDA kernel" in dk.explain("dequantize_sum_blockwise", q, s, 128)

    def f(q, s, e):
        q2, s2 = dk.requantize_sum_blockwise(q, s, 128, average=True, stochastic=True, seed=3, error=e)
        return dk.dequantize_sum_blockwise(torch.stack([q2, q2]), torch.stack([s2, s2]), 128)

    e1 = torch.randn(3, 384, device="cuda") * 0.01
    e2 = e1.clone()
    assert torch.equal(f(q, s, e1), torch.compile(f, fullgraph=True)(q, s, e2)) and torch.equal(e1, e2)


@pytest.mark.gpu
def test_cuda_bad_input_straight_into_the_op():
    """The C++ checks (no Python in front): every bad argument raises, nothing crashes."""
    q, s = shards(2, (256,), 128, "int8", "cuda")
    with pytest.raises(ValueError, match="scales must have shape"):
        OPS.dequantize_sum_blockwise(q, s[:, :1], 128, False, torch.float32)
    with pytest.raises(ValueError, match="at least two dimensions"):
        OPS.requantize_sum_blockwise(q[0], s[0], 128, False, False, 0, None)
    with pytest.raises(ValueError, match="scales must be float32"):
        OPS.requantize_sum_blockwise(q, s.double(), 128, False, False, 0, None)
    with pytest.raises(ValueError, match="q must be int8"):
        OPS.dequantize_sum_blockwise(q.float(), s, 128, False, torch.float32)
    with pytest.raises(ValueError, match="error must have the shape"):
        OPS.requantize_sum_blockwise(q, s, 128, False, False, 0, torch.zeros(255, device="cuda"))
    with pytest.raises(ValueError, match="error must be on the device"):
        OPS.requantize_sum_blockwise(q, s, 128, False, False, 0, torch.zeros(256))
    with pytest.raises(ValueError, match="out_dtype"):
        OPS.dequantize_sum_blockwise(q, s, 128, False, torch.int32)
    x = torch.randn(300, device="cuda")
    q_out, s_out = torch.empty(512, dtype=torch.int8, device="cuda"), torch.empty(4, device="cuda")
    with pytest.raises(ValueError, match="q_out must hold int8 codes"):
        OPS.quantize_blockwise_into(x, "int8", 128, False, 0, None, q_out.view(torch.uint8), s_out)
    with pytest.raises(ValueError, match="q_out must hold at least"):
        OPS.quantize_blockwise_into(x, "int8", 128, False, 0, None, q_out[:256], s_out[:2])
    with pytest.raises(ValueError, match="scales_out must be a contiguous float32"):
        OPS.quantize_blockwise_into(x, "int8", 128, False, 0, None, q_out, s_out[:3])
    with pytest.raises(ValueError, match="x must be 1-d"):
        OPS.quantize_blockwise_into(x.view(3, 100), "int8", 128, False, 0, None, q_out, s_out)
    with pytest.raises(ValueError, match="on the device of x"):
        OPS.quantize_blockwise_into(x, "int8", 128, False, 0, None, q_out, s_out.cpu())


# ---------------------------------------------------------------- the device-resident key

def _keyed_cases(device):
    from deepseek_kernels.ops.quantization import key_value

    g = torch.Generator().manual_seed(5)
    x = (torch.randn(4097, generator=g) * 3).to(device)
    q, s = shards(3, (1000,), 128, "int8", device)
    key = torch.tensor([key_value(77)], dtype=torch.int32, device=device)
    other = torch.tensor([key_value(78)], dtype=torch.int32, device=device)
    return x, q, s, key, other


def _into(x, fmt, key=None, seed=77):
    code = FORMATS[fmt].dtype
    q_out = torch.empty(4352, dtype=code, device=x.device)
    s_out = torch.empty(34, device=x.device)
    e = torch.full_like(x, 0.01)
    dk.quantize_blockwise_into(x, fmt, 128, q_out, s_out, stochastic=True, seed=seed, error=e, key=key)
    return bits(q_out), s_out, e


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("fmt", FMTS)
def test_key_tensor_replaces_the_seed_bit_for_bit(fmt, device):
    """key = key_value(seed) gives exactly the seed's results; another key changes the codes (so the
    key, not the seed argument, drives the stochastic rounding)."""
    x, q, s, key, other = _keyed_cases(device)
    by_seed = _into(x, fmt)
    by_key = _into(x, fmt, key=key, seed=12345)  # the seed argument is ignored when key is given
    assert all(torch.equal(a, b) for a, b in zip(by_seed, by_key))
    assert not torch.equal(_into(x, fmt, key=other, seed=77)[0], by_seed[0])
    if device == "cuda":  # the kernel reads the key at run time: the reference agrees with it
        ref = [t.cpu() for t in _into(x.cpu(), fmt, key=key.cpu())]
        assert all(torch.equal(a.cpu(), b) for a, b in zip(by_key, ref))
    q2a, s2a = dk.requantize_sum_blockwise(q, s, 128, average=True, stochastic=True, seed=77)
    q2b, s2b = dk.requantize_sum_blockwise(q, s, 128, average=True, stochastic=True, seed=3, key=key)
    assert torch.equal(bits(q2a), bits(q2b)) and torch.equal(s2a, s2b)
    q2c, _ = dk.requantize_sum_blockwise(q, s, 128, average=True, stochastic=True, seed=77, key=other)
    assert not torch.equal(bits(q2c), bits(q2a))


def test_bad_key_raises_clear_error():
    x, q, s, key, _ = _keyed_cases("cpu")
    for bad, needle in ((key.long(), "int32 tensor of one element"), (key.repeat(2), "int32 tensor of one element"),
                        (key.to("meta"), "device of the data"), (7, "torch.Tensor or None")):
        with pytest.raises((ValueError, TypeError), match=needle):
            _into(x, "int8", key=bad)
        with pytest.raises((ValueError, TypeError), match=needle):
            dk.requantize_sum_blockwise(q, s, 128, stochastic=True, seed=1, key=bad)


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["wide", "narrow"])
def test_cuda_forced_reduce_forms_match_reference(form):
    """The sum + requantize kernel picks its launch form by size (narrow: 4-code vectors, 8 shards per
    step, for shards under one wave; wide: 16-code vectors otherwise), so the cases above reach each form
    only at some sizes. The benchmark knob DSK_REDUCE_FORM (read once per process) forces one form on
    every case: rerun the kernel-vs-reference cases in a child process with each."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "DSK_REDUCE_FORM": form}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", __file__,
                          "-k", "test_cuda_requantize_sum_matches_reference"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "failed" not in run.stdout, run.stdout[-2000:]
