"""Blockwise quantization: reference semantics (CPU), op plumbing (opcheck, fake, compile,
autograd), bad input, and the CUDA kernel bit for bit against the reference (marked gpu)."""

from __future__ import annotations

import math

import pytest
import torch

import deepseek_kernels as dk
from deepseek_kernels.reference import FORMATS, dequantize_blockwise_ref, quantize_blockwise_ref

FMTS = list(FORMATS)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
# (shape, block): odd last dims, tail blocks, a single short row, 3-d.
SHAPES = [((1,), 16), ((17,), 32), ((3, 1000), 128), ((2, 3, 4097), 128), ((5, 256), 64), ((4, 96), 96)]
OPS = torch.ops.deepseek_kernels


def sid(shape, block):
    return "x".join(map(str, shape)) + f"-B{block}"


def rand(shape, dtype, device="cpu", scale=3.0):
    # Per-row magnitudes spanning decades, so blocks get very different scales.
    x = torch.randn(shape, device=device) * scale
    if len(shape) > 1:
        x = x * torch.logspace(-3, 3, shape[-2], device=device).unsqueeze(-1)
    return x.to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype != torch.int8 else t


def expand(scales, block, n):
    return scales.repeat_interleave(block, -1)[..., :n]


# ---------------------------------------------------------------- reference semantics (CPU)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT.get)
@pytest.mark.parametrize("shape,block", SHAPES, ids=[sid(*s) for s in SHAPES])
def test_roundtrip_error_bound(shape, block, dtype, fmt):
    x = rand(shape, dtype)
    q, s = dk.quantize_blockwise(x, fmt, block)
    nb = math.ceil(shape[-1] / block)
    assert q.shape == x.shape and q.dtype == FORMATS[fmt].dtype
    assert s.shape == (*shape[:-1], nb) and s.dtype == torch.float32
    xf = x.float()
    # scale is amax / qmax of each block (tail blocks included)
    pad = torch.nn.functional.pad(xf, (0, nb * block - shape[-1]))
    amax = pad.reshape(*shape[:-1], nb, block).abs().amax(-1)
    torch.testing.assert_close(s, amax / FORMATS[fmt].qmax, rtol=1e-6, atol=0)
    deq = dk.dequantize_blockwise(q, s, block)
    err = (deq - xf).abs()
    se = expand(s, block, shape[-1])
    if fmt == "int8":
        assert (err <= se * 0.5 * (1 + 1e-5)).all()  # round-to-nearest: half a step
    else:
        mant = 3 if fmt == "fp8_e4m3" else 2
        # relative half-ulp for normal values; absolute half of the smallest subnormal step otherwise
        sub = {"fp8_e4m3": 2.0**-9, "fp8_e5m2": 2.0**-16}[fmt]
        bound = torch.maximum(xf.abs() * 2.0 ** -(mant + 1), se * sub / 2) * (1 + 1e-5)
        assert (err <= bound).all()
    # the largest element of each block maps to +-qmax exactly
    assert torch.isfinite(deq).all()


@pytest.mark.parametrize("fmt", FMTS)
def test_zero_blocks_give_zero_codes_and_no_nan(fmt):
    x = torch.randn(4, 384)
    x[1] = 0
    x[2, 128:256] = 0
    x[3, 256:] = torch.randn(128) * 1e-39  # subnormal: its scale would underflow, so it flushes
    e = torch.zeros_like(x)
    q, s = dk.quantize_blockwise(x, fmt, 128, error=e)
    assert (s[1] == 0).all() and s[2, 1] == 0 and s[3, 2] == 0 and (s[0] > 0).all()
    assert (bits(q[1]) == 0).all() and (bits(q[2, 128:256]) == 0).all()
    assert (q[3, 256:].float() == 0).all()  # fp8 keeps the sign of zero (0x80 for -0)
    deq = dk.dequantize_blockwise(q, s, 128)
    assert torch.isfinite(deq).all() and (deq[1] == 0).all()
    assert torch.equal(e[3, 256:], x[3, 256:])  # nothing is lost: the flushed block stays in the residual


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_blocks_are_reported(fmt, bad):
    x = torch.randn(2, 300)
    x[1, 130] = bad
    e = torch.randn(2, 300) * 0.01
    e_before = e.clone()
    q, s = dk.quantize_blockwise(x, fmt, 128, error=e)
    assert torch.isnan(s[1, 1]) and torch.isfinite(s[0]).all() and torch.isfinite(s[1, [0, 2]]).all()
    assert not torch.isfinite(s).all()  # the found-inf check users run
    assert (bits(q[1, 128:256]) == 0).all()
    deq = dk.dequantize_blockwise(q, s, 128)
    assert torch.isnan(deq[1, 128:256]).all() and torch.isfinite(deq[0]).all()
    # residual of the bad block is left untouched; the others are updated
    assert torch.equal(e[1, 128:256], e_before[1, 128:256])
    assert not torch.equal(e[0], e_before[0])


@pytest.mark.parametrize("fmt", FMTS)
def test_stochastic_rounding_is_unbiased(fmt):
    torch.manual_seed(1)
    x = torch.randn(1, 256)
    n = 2000
    acc = torch.zeros(1, 256, dtype=torch.float64)
    q0, s0 = dk.quantize_blockwise(x, fmt, 128)
    for seed in range(n):
        q, s = dk.quantize_blockwise(x, fmt, 128, stochastic=True, seed=seed)
        acc += dk.dequantize_blockwise(q, s, 128).double()
    mean = acc / n
    step = expand(s0, 128, 256).double()  # a bound on the gap between neighbours (int8: exact)
    if fmt != "int8":
        step = x.double().abs() * 2.0 ** -(3 if fmt == "fp8_e4m3" else 2) + step * 2.0**-8
    # each draw is one of two neighbours a gap <= step apart: std of the mean <= step / (2 sqrt(n))
    assert ((mean - x.double()).abs() <= 5 * step / (2 * math.sqrt(n)) + 1e-7).all()
    # and deterministic rounding is biased on the same data (the test can fail)
    det_bias = (dk.dequantize_blockwise(q0, s0, 128).double() - x.double()).abs().mean()
    assert (mean - x.double()).abs().mean() < det_bias / 4


@pytest.mark.parametrize("fmt", FMTS)
def test_stochastic_rounding_reproducible_and_seeded(fmt):
    x = torch.randn(3, 500)
    a = dk.quantize_blockwise(x, fmt, 128, stochastic=True, seed=7)
    b = dk.quantize_blockwise(x, fmt, 128, stochastic=True, seed=7)
    c = dk.quantize_blockwise(x, fmt, 128, stochastic=True, seed=8)
    assert torch.equal(bits(a[0]), bits(b[0])) and torch.equal(a[1], b[1])
    assert (bits(a[0]) != bits(c[0])).float().mean() > 0.05
    # draws only ever pick one of the two neighbours of the exact value
    deq_sr = dk.dequantize_blockwise(a[0], a[1], 128)
    qn, _ = dk.quantize_blockwise(x, fmt, 128)
    deq_rn = dk.dequantize_blockwise(qn, a[1], 128)
    step = expand(a[1], 128, 500) * (1.0 if fmt == "int8" else 0) + x.abs() * (0.0 if fmt == "int8" else 0.26)
    assert ((deq_sr - x).abs() <= step * (1 + 1e-5) + 1e-6 * expand(a[1], 128, 500) + 2**-9 * expand(a[1], 128, 500)).all()
    assert not torch.equal(deq_sr, deq_rn)
    # torch.manual_seed controls seed=None draws
    torch.manual_seed(3)
    d = dk.quantize_blockwise(x, fmt, 128, stochastic=True)
    torch.manual_seed(3)
    e = dk.quantize_blockwise(x, fmt, 128, stochastic=True)
    assert torch.equal(bits(d[0]), bits(e[0]))


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("edtype", [torch.float32, torch.bfloat16], ids=DT.get)
def test_error_feedback_updates_residual_and_converges(fmt, edtype):
    x = torch.randn(2, 256)
    e = torch.zeros(2, 256, dtype=edtype)
    q, s = dk.quantize_blockwise(x, fmt, 128, error=e)
    expected = (x - dk.dequantize_blockwise(q, s, 128)).to(edtype)
    assert torch.equal(e, expected)
    # With feedback the running mean of what was sent converges to x; without it the bias stays.
    e = torch.zeros(2, 256, dtype=edtype)
    sent_ef = torch.zeros(2, 256, dtype=torch.float64)
    steps = 200
    for _ in range(steps):
        q, s = dk.quantize_blockwise(x, fmt, 128, error=e)
        sent_ef += dk.dequantize_blockwise(q, s, 128).double()
    q, s = dk.quantize_blockwise(x, fmt, 128)
    bias_plain = (dk.dequantize_blockwise(q, s, 128).double() - x.double()).abs().mean()
    bias_ef = (sent_ef / steps - x.double()).abs().mean()
    assert bias_ef < bias_plain / 20


def test_noncontiguous_inputs_match_contiguous():
    base = torch.randn(300, 64)
    xt = base.t()  # [64, 300], last-dim stride 64
    assert not xt.is_contiguous()
    for fmt in FMTS:
        a = dk.quantize_blockwise(xt, fmt, 128, stochastic=True, seed=5)
        b = dk.quantize_blockwise(xt.contiguous(), fmt, 128, stochastic=True, seed=5)
        assert torch.equal(bits(a[0]), bits(b[0])) and torch.equal(a[1], b[1])


def test_out_dtypes_and_autograd_through_scales():
    x = torch.randn(3, 200)
    q, s = dk.quantize_blockwise(x, "int8", 64)
    for od in DTYPES:
        out = dk.dequantize_blockwise(q, s, 64, out_dtype=od)
        assert out.dtype == od
        torch.testing.assert_close(out, dequantize_blockwise_ref(q, s, 64, od), rtol=0, atol=0)
    s = s.clone().requires_grad_(True)
    out = dk.dequantize_blockwise(q, s, 64)
    g = torch.randn_like(out)
    out.backward(g)
    expected = torch.nn.functional.pad(g * q.float(), (0, 256 - 200)).reshape(3, 4, 64).sum(-1)
    torch.testing.assert_close(s.grad, expected)


# ---------------------------------------------------------------- op plumbing


@pytest.mark.parametrize("fmt", FMTS)
def test_opcheck_cpu(fmt):
    x = torch.randn(3, 200)
    torch.library.opcheck(OPS.quantize_blockwise.default, (x, fmt, 64, False, 0, None))
    torch.library.opcheck(OPS.quantize_blockwise.default, (x, fmt, 64, True, 11, torch.zeros_like(x)))
    q, s = dk.quantize_blockwise(x, fmt, 64)
    _opcheck_dequantize(q, s, 64, torch.bfloat16)
    _opcheck_dequantize(q, s.requires_grad_(True), 64, torch.float32)


def _opcheck_dequantize(q, s, block, out_dtype):
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if q.dtype != torch.int8:
        # torch's SchemaCheckMode compares inputs with allclose, which has no fp8 kernel; check
        # the "no mutation" part of the schema by hand instead.
        utils = utils[1:]
        q_before, s_before = q.clone(), s.detach().clone()
        dk.dequantize_blockwise(q, s, block, out_dtype)
        assert torch.equal(bits(q), bits(q_before)) and torch.equal(s, s_before)
    torch.library.opcheck(OPS.dequantize_blockwise.default, (q, s, block, out_dtype), test_utils=utils)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(5, 7, 1000, dtype=torch.bfloat16)
        q, s = dk.quantize_blockwise(x, "fp8_e5m2", 128)
        assert q.shape == x.shape and q.dtype == torch.float8_e5m2
        assert s.shape == (5, 7, 8) and s.dtype == torch.float32
        out = dk.dequantize_blockwise(q, s, 128, torch.float16)
        assert out.shape == x.shape and out.dtype == torch.float16


def _roundtrip_with_feedback(x, e):
    q, s = dk.quantize_blockwise(x, "int8", 128, stochastic=True, seed=3, error=e)
    return dk.dequantize_blockwise(q, s, 128, torch.float32), s


def test_torch_compile_fullgraph_cpu():
    x = torch.randn(4, 520)
    e1, e2 = torch.randn(4, 520) * 0.01, None
    e2 = e1.clone()
    eager = _roundtrip_with_feedback(x, e1)
    compiled = torch.compile(_roundtrip_with_feedback, fullgraph=True)(x, e2)
    torch.testing.assert_close(compiled[0], eager[0], rtol=0, atol=0)
    torch.testing.assert_close(compiled[1], eager[1], rtol=0, atol=0)
    assert torch.equal(e1, e2)  # the in-place residual update survives functionalization


# ---------------------------------------------------------------- bad input


def _bad_quantize_cases():
    x = torch.randn(4, 256)
    return [
        ("fmt", dict(x=x, fmt="int4")),
        ("block", dict(x=x, block=0)),
        ("block", dict(x=x, block=24)),
        ("block", dict(x=x, block=512)),
        ("block", dict(x=x, block=128.0)),
        ("x must be float32", dict(x=torch.ones(4, 256, dtype=torch.int32))),
        ("at least one dimension", dict(x=torch.tensor(1.0))),
        ("error must be float32", dict(x=x, error=torch.zeros(4, 256, dtype=torch.int32))),
        ("error must have the shape", dict(x=x, error=torch.zeros(4, 255))),
        ("error must be on the device", dict(x=x, error=torch.zeros(4, 256, device="meta"))),
        ("contiguous", dict(x=x, error=torch.zeros(256, 4).t())),
        ("seed", dict(x=x, stochastic=True, seed=-1)),
        ("seed", dict(x=x, stochastic=True, seed=2**63)),
    ]


@pytest.mark.parametrize("needle,kwargs", _bad_quantize_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_quantize_input_raises_clear_error(needle, kwargs):
    x = kwargs.pop("x")
    with pytest.raises(ValueError, match=needle):
        dk.quantize_blockwise(x, **kwargs)


def test_bad_dequantize_input_raises_clear_error():
    q, s = dk.quantize_blockwise(torch.randn(4, 256), "int8", 128)
    with pytest.raises(ValueError, match="q must be int8"):
        dk.dequantize_blockwise(q.float(), s)
    with pytest.raises(ValueError, match="scales must have shape"):
        dk.dequantize_blockwise(q, s[:, :1])
    with pytest.raises(ValueError, match="scales must have shape"):
        dk.dequantize_blockwise(q, s, block=64)
    with pytest.raises(ValueError, match="scales must be float32"):
        dk.dequantize_blockwise(q, s.double())
    with pytest.raises(ValueError, match="out_dtype"):
        dk.dequantize_blockwise(q, s, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="scales must be on the device"):
        dk.dequantize_blockwise(q, s.to("meta"))


def test_direct_torch_ops_call_validates_too():
    x = torch.randn(4, 256)
    with pytest.raises(ValueError, match="fmt"):
        OPS.quantize_blockwise(x, "int4", 128, False, 0, None)
    with pytest.raises(ValueError, match="block"):
        OPS.quantize_blockwise(x, "int8", 8, False, 0, None)


def test_explain_names_the_path():
    x = torch.randn(4, 256)
    assert "reference" in dk.explain("quantize_blockwise", x, "int8", 128)
    q, s = dk.quantize_blockwise(x)
    assert "reference" in dk.explain("dequantize_blockwise", q, s, 128)
    with pytest.raises(ValueError, match="unknown op"):
        dk.explain("no_such_op", x)


# ---------------------------------------------------------------- CUDA kernel (H200)

GPU_SHAPES = SHAPES + [((7, 4096), 128), ((3, 2, 1040), 16), ((2, 3000), 2048), ((1, 8192), 4096)]


@pytest.fixture
def poison_cuda():
    """Fills freed cached CUDA memory with 0xFF bytes (NaN for floats and fp8, -1 for int8), so
    outputs that land there and are not fully written show up."""

    def poison():
        junk = torch.empty(64 << 20, dtype=torch.uint8, device="cuda").fill_(0xFF)
        del junk

    return poison


@pytest.mark.gpu
@pytest.mark.parametrize("stochastic", [False, True], ids=["rne", "sr"])
@pytest.mark.parametrize("edtype", [None, torch.float32, torch.bfloat16, torch.float16], ids=lambda d: "noEF" if d is None else "EF-" + DT[d])
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT.get)
@pytest.mark.parametrize("shape,block", GPU_SHAPES, ids=[sid(*s) for s in GPU_SHAPES])
def test_cuda_matches_reference_bit_for_bit(shape, block, dtype, fmt, edtype, stochastic, poison_cuda):
    x = rand(shape, dtype, "cuda")
    x.view(-1)[:: max(1, x.numel() // 5)] = 0  # some exact zeros
    if x.shape[-1] >= 2 * block and dtype != torch.float16:
        x[..., block : 2 * block] *= 1e-37  # a block whose scale underflows (flushed to 0)
    e = None if edtype is None else (torch.randn(shape, device="cuda") * 0.01).to(edtype)
    e_ref = None if e is None else e.cpu()
    poison_cuda()
    q, s = dk.quantize_blockwise(x, fmt, block, stochastic=stochastic, seed=1234, error=e)
    q_ref, s_ref = quantize_blockwise_ref(x.cpu(), fmt, block, stochastic=stochastic, seed=1234, error=e_ref)
    assert torch.equal(bits(q).cpu(), bits(q_ref))
    assert torch.equal(s.cpu(), s_ref)
    if e is not None:
        assert torch.equal(e.cpu(), e_ref)
    for od in DTYPES:
        poison_cuda()
        out = dk.dequantize_blockwise(q, s, block, od)
        assert torch.equal(out.cpu(), dequantize_blockwise_ref(q_ref, s_ref, block, od))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FMTS)
def test_cuda_strided_unaligned_and_nonfinite(fmt):
    base = torch.randn(2, 1000, 8, device="cuda", dtype=torch.bfloat16)
    cases = {
        "transposed": base.transpose(1, 2),  # last-dim stride 8: copied to contiguous
        "row-strided": base[:, :, 0].unsqueeze(1).expand(2, 3, 1000)[:, 1],
        "unaligned": torch.randn(4, 1001, device="cuda", dtype=torch.bfloat16)[:, 1:],  # scalar path
        "sliced-rows": torch.randn(64, 512, device="cuda")[::3],
    }
    for name, x in cases.items():
        q, s = dk.quantize_blockwise(x, fmt, 128, stochastic=True, seed=9)
        q_ref, s_ref = quantize_blockwise_ref(x.cpu(), fmt, 128, stochastic=True, seed=9)
        assert torch.equal(bits(q).cpu(), bits(q_ref)), name
        assert torch.equal(s.cpu(), s_ref), name
    x = torch.randn(3, 384, device="cuda")
    x[1, 200] = float("nan")
    x[2, 5] = float("inf")
    e = torch.randn_like(x) * 0.1
    e_ref = e.cpu()
    q, s = dk.quantize_blockwise(x, fmt, 128, error=e)
    q_ref, s_ref = quantize_blockwise_ref(x.cpu(), fmt, 128, error=e_ref)
    assert torch.equal(bits(q).cpu(), bits(q_ref))
    # NaN != NaN, so compare the NaN masks and the finite scales separately
    assert torch.equal(torch.isnan(s).cpu(), torch.isnan(s_ref)) and torch.isnan(s[1, 1]) and torch.isnan(s[2, 0])
    fin = torch.isfinite(s_ref)
    assert torch.equal(s.cpu()[fin], s_ref[fin])
    assert torch.equal(e.cpu(), e_ref)


@pytest.mark.gpu
def test_cuda_large_tensor_matches_reference_on_gpu():
    x = torch.randn(4096, 16384, device="cuda", dtype=torch.bfloat16)  # 2^26 elements
    for fmt in ("int8", "fp8_e4m3"):
        q, s = dk.quantize_blockwise(x, fmt, 128)
        q_ref, s_ref = quantize_blockwise_ref(x, fmt, 128)
        assert torch.equal(bits(q), bits(q_ref)) and torch.equal(s, s_ref)
        out = dk.dequantize_blockwise(q, s, 128, torch.bfloat16)
        assert torch.equal(out, dequantize_blockwise_ref(q_ref, s_ref, 128, torch.bfloat16))


@pytest.mark.gpu
def test_cuda_stochastic_unbiased_and_explain():
    x = torch.randn(1, 4096, device="cuda")
    acc = torch.zeros_like(x, dtype=torch.float64)
    n = 1000
    for seed in range(n):
        q, s = dk.quantize_blockwise(x, "int8", 128, stochastic=True, seed=seed)
        acc += dk.dequantize_blockwise(q, s, 128).double()
    step = expand(s, 128, 4096).double()
    assert ((acc / n - x.double()).abs() <= 5 * step / (2 * math.sqrt(n))).all()
    assert "CUDA kernel" in dk.explain("quantize_blockwise", x)
    assert "16-byte" in dk.explain("quantize_blockwise", x)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FMTS)
def test_cuda_opcheck_and_compile(fmt):
    x = torch.randn(8, 384, device="cuda", dtype=torch.bfloat16)
    torch.library.opcheck(OPS.quantize_blockwise.default, (x, fmt, 128, False, 0, None))
    torch.library.opcheck(OPS.quantize_blockwise.default, (x, fmt, 128, True, 5, torch.zeros_like(x, dtype=torch.float32)))
    q, s = dk.quantize_blockwise(x, fmt, 128)
    _opcheck_dequantize(q, s, 128, torch.bfloat16)
    e1 = torch.randn(8, 384, device="cuda", dtype=torch.float32) * 0.01
    e2 = e1.clone()

    def f(x, e):
        q, s = dk.quantize_blockwise(x, fmt, 128, stochastic=True, seed=3, error=e)
        return dk.dequantize_blockwise(q, s, 128, torch.bfloat16)

    eager = f(x, e1)
    compiled = torch.compile(f, fullgraph=True)(x, e2)
    assert torch.equal(eager, compiled) and torch.equal(e1, e2)


@pytest.mark.gpu
def test_cuda_bad_input():
    x = torch.randn(4, 256, device="cuda")
    with pytest.raises(ValueError, match="error must be on the device"):
        dk.quantize_blockwise(x, error=torch.zeros(4, 256))
    q, s = dk.quantize_blockwise(x)
    with pytest.raises(ValueError, match="scales must be on the device"):
        dk.dequantize_blockwise(q, s.cpu())
    with pytest.raises(ValueError, match="fmt"):
        OPS.quantize_blockwise(x, "int4", 128, False, 0, None)
    # straight into the C++ op (no Python checks): every bad argument raises, nothing crashes
    with pytest.raises(ValueError, match="error must have the shape"):
        OPS.quantize_blockwise(x, "int8", 128, False, 0, torch.zeros(4, 255, device="cuda"))
    with pytest.raises(ValueError, match="error must be float32"):
        OPS.quantize_blockwise(x, "int8", 128, False, 0, torch.zeros(4, 256, device="cuda", dtype=torch.int32))
    with pytest.raises(ValueError, match="error must be on the device"):
        OPS.quantize_blockwise(x, "int8", 128, False, 0, torch.zeros(4, 256))
    with pytest.raises(ValueError, match="x must be float32"):
        OPS.quantize_blockwise(x.int(), "int8", 128, False, 0, None)
    with pytest.raises(ValueError, match="block"):
        OPS.quantize_blockwise(x, "int8", 24, False, 0, None)
    with pytest.raises(ValueError, match="scales must have shape"):
        OPS.dequantize_blockwise(q, s[:, :1], 128, torch.float32)
    with pytest.raises(ValueError, match="scales must be float32"):
        OPS.dequantize_blockwise(q, s.double(), 128, torch.float32)
    with pytest.raises(ValueError, match="q must be int8"):
        OPS.dequantize_blockwise(q.float(), s, 128, torch.float32)
    with pytest.raises(ValueError, match="out_dtype"):
        OPS.dequantize_blockwise(q, s, 128, torch.int32)
