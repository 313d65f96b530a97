"""W8A8 INT8 matmul: exact int32 accumulation (Triton kernel; under the interpreter on CPU),
the fused epilogue, per-token quantization, Int8Linear, quantize_model + SmoothQuant."""

import pytest
import torch
from torch import nn

import deepseek_kernels as dk
from deepseek_kernels.nn import Int8Linear, quantize_model
from deepseek_kernels.reference.int8_matmul import int8_matmul_ref, int8_mm_ref, quantize_per_token_ref
from pdl_utils import assert_pdl_gives_the_bits

OPS = torch.ops.deepseek_kernels
# (M, N, K): decode-sized M, odd K and N; the interpreter keeps CPU shapes small
SHAPES = [(1, 64, 64), (3, 136, 1000), (16, 64, 13653), (17, 200, 64), (40, 72, 333),
          (16, 64, 512), (64, 128, 256)]  # the last two: every tile full (the mask-free main loop)


def ids(s):
    return "M{}-N{}-K{}".format(*s)


def rand_i8(*shape):
    return torch.randint(-127, 128, shape, dtype=torch.int8)


def ulp_close(out, ref, terms=None):
    """Within one unit in the last place of the output dtype, plus the fp32 epilogue's own
    rounding (a few fp32 ulps of the terms it adds: |acc * a_scale * b_scale| and |bias|)."""
    eps = torch.finfo(out.dtype).eps
    terms = ref.double().abs() if terms is None else terms
    tol = ref.double().abs() * eps + 4 * 2.0**-24 * terms + torch.finfo(out.dtype).tiny
    return bool(((out.double() - ref.double()).abs() <= tol).all())


def terms_of(a, b, sa, sb, bias):
    t = int8_matmul_ref(a, b, sa, sb, None, torch.float64).abs()
    return t + bias.double().abs() if bias is not None else t


@pytest.mark.parametrize("shape", SHAPES, ids=ids)
def test_int32_accumulation_is_exact(shape):
    M, N, K = shape
    a, b = rand_i8(M, K), rand_i8(N, K)
    a[0, :] = 127  # extremes: the largest products
    b[0, :] = -127
    assert torch.equal(dk.int8_mm(a, b), int8_mm_ref(a, b))


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=ids)
def test_epilogue_matches_reference(shape, out_dtype, bias):
    M, N, K = shape
    a, b = rand_i8(M, K), rand_i8(N, K)
    sa, sb = torch.rand(M, 1) * 1e-3, torch.rand(N) * 1e-2
    bb = torch.randn(N) if bias else None
    out = dk.int8_matmul(a, b, sa, sb, bias=bb, out_dtype=out_dtype)
    assert out.dtype == out_dtype and out.shape == (M, N)
    assert ulp_close(out, int8_matmul_ref(a, b, sa, sb, bb, torch.float64), terms_of(a, b, sa, sb, bb))


def test_strided_and_batched_inputs():
    a_t, b = rand_i8(96, 7), rand_i8(40, 96)  # a as a transposed view: [7, 96] with K stride 7
    a = a_t.t()
    sa, sb = torch.rand(7, 1), torch.rand(40)
    assert torch.equal(dk.int8_mm(a, b[::1]), int8_mm_ref(a.contiguous(), b))
    out = dk.int8_matmul(a, b, sa, sb)
    assert ulp_close(out, int8_matmul_ref(a, b, sa, sb, None, torch.float64))
    a3, sa3 = rand_i8(2, 5, 96), torch.rand(2, 5, 1)  # leading batch dims are flattened
    out3 = dk.int8_matmul(a3, b, sa3, sb)
    assert out3.shape == (2, 5, 40)
    assert torch.equal(out3.reshape(10, 40), dk.int8_matmul(a3.reshape(10, 96), b, sa3.reshape(10, 1), sb))


def test_quantize_per_token():
    x = torch.randn(5, 300) * torch.logspace(-2, 2, 5).unsqueeze(1)
    x[3] = 0
    q, s = dk.quantize_per_token(x)
    assert q.dtype == torch.int8 and s.shape == (5, 1) and s.dtype == torch.float32
    assert s[3] == 0 and (q[3] == 0).all()
    torch.testing.assert_close(s[:3].view(-1), x[:3].abs().amax(1) / 127, rtol=1e-6, atol=0)
    assert ((q.float() * s - x).abs() <= s / 2 * (1 + 1e-5)).all()
    assert (q.abs().amax(1)[[0, 1, 2, 4]] == 127).all()
    smooth = torch.rand(300) + 0.5
    q2, s2 = dk.quantize_per_token(x, smooth=smooth)
    q2r, s2r = quantize_per_token_ref(x / smooth)
    assert torch.equal(q2, q2r) and torch.equal(s2, s2r)


@pytest.mark.parametrize("shape", [(64, 96, 128), (7, 130, 333)], ids=ids)
def test_end_to_end_error_below_two_percent(shape):
    M, N, K = shape
    x, w, bias = torch.randn(M, K), torch.randn(N, K) / K**0.5, torch.randn(N) * 0.1
    lin = nn.Linear(K, N)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(bias)
    q = Int8Linear.from_float(lin)
    ref = lin(x)
    err = ((q(x) - ref).norm() / ref.norm()).item()
    assert err < 0.02, err


def test_smoothing_reduces_error_with_outlier_channels():
    torch.manual_seed(1)
    K, N = 256, 128
    lin = nn.Linear(K, N)
    calib = torch.randn(64, K)
    calib[:, :4] *= 60  # a few outlier activation channels, as in LLMs
    x = torch.randn(32, K)
    x[:, :4] *= 60
    ref = lin(x)
    plain = nn.Sequential(lin)
    smoothed = nn.Sequential(nn.Linear(K, N))
    smoothed.load_state_dict(plain.state_dict())
    r_plain = quantize_model(plain, exclude=())
    r_smooth = quantize_model(smoothed, exclude=(), calibration=[calib], alpha=0.5)
    assert r_plain.swapped == ["0"] and r_smooth.smoothed
    err_plain = ((plain(x) - ref).norm() / ref.norm()).item()
    err_smooth = ((smoothed(x) - ref).norm() / ref.norm()).item()
    assert err_smooth < 0.7 * err_plain, (err_smooth, err_plain)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64, bias=False)
        self.lm_head = nn.Linear(64, 50)

    def forward(self, x):
        return self.lm_head(self.down(torch.relu(self.up(x))))


def test_quantize_model_swaps_and_reports():
    m = Tiny()
    x = torch.randn(4, 64)
    ref = m(x)
    report = quantize_model(m)
    assert report.swapped == ["up", "down"] and report.skipped == ["lm_head"]
    assert isinstance(m.up, Int8Linear) and type(m.lm_head) is nn.Linear
    assert report.bytes_saved > 0 and "saved" in str(report)
    assert ((m(x) - ref).norm() / ref.norm()) < 0.03
    assert "int8" in repr(m.up)
    m2 = Tiny()
    quantize_model(m2, include=["up"])
    assert isinstance(m2.up, Int8Linear) and type(m2.down) is nn.Linear


def test_int8linear_state_dict_round_trip():
    lin = nn.Linear(96, 40)
    q = Int8Linear.from_float(lin, smooth=torch.rand(96) + 0.5)
    sd = q.state_dict()
    assert set(sd) == {"weight", "weight_scale", "bias", "smooth"} and sd["weight"].dtype == torch.int8
    fresh = Int8Linear(96, 40, bias=True, smooth=True)
    fresh.load_state_dict(sd)
    x = torch.randn(3, 96)
    assert torch.equal(fresh(x), q(x))


def test_opcheck_fake_and_compile():
    a, b = rand_i8(5, 64), rand_i8(24, 64)
    sa, sb, bias = torch.rand(5, 1), torch.rand(24), torch.randn(24)
    torch.library.opcheck(OPS.int8_mm.default, (a, b))
    torch.library.opcheck(OPS.int8_matmul.default, (a, b, sa, sb, bias, torch.bfloat16))
    torch.library.opcheck(OPS.quantize_per_token.default, (torch.randn(5, 64), None))
    w = rand_i8(24, 64)
    for bias_, smooth in ((None, None), (torch.randn(24), torch.rand(64) + 0.5)):
        torch.library.opcheck(OPS.int8_linear.default, (torch.randn(5, 64), w, torch.rand(24), bias_, smooth))
    lin = Int8Linear.from_float(nn.Linear(64, 24))
    x = torch.randn(2, 5, 64)
    compiled = torch.compile(lin, fullgraph=True)
    # the compiled graph calls the int8_linear op, whose body runs the same kernels (interpreter) or reference
    # as the eager call: the same bits
    assert torch.equal(compiled(x), lin(x))


def test_int8_linear_op_takes_2d_x_and_checks_its_arguments():
    """The op behind int8_linear (what torch.compile and the dispatcher run): x [M, K] (the function flattens
    leading dims before calling it); its fake impl and its body name bad arguments."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    w, ws = rand_i8(24, 64), torch.rand(24)
    with FakeTensorMode():
        fw, fws = torch.empty(24, 64, dtype=torch.int8), torch.empty(24)
        assert OPS.int8_linear(torch.empty(7, 64, dtype=torch.bfloat16), fw, fws, None, None).shape == (7, 24)
        with pytest.raises(ValueError, match=r"x as \[M, K\]"):
            OPS.int8_linear(torch.empty(2, 7, 64), fw, fws, None, None)
    with pytest.raises(ValueError, match=r"x as \[M, K\]"):
        OPS.int8_linear(torch.randn(2, 3, 64), w, ws, None, None)
    with pytest.raises(ValueError, match="K mismatch"):
        OPS.int8_linear(torch.randn(3, 63), w, ws, None, None)
    with pytest.raises(ValueError, match="weight_scale must be a float32"):
        OPS.int8_linear(torch.randn(3, 64), w, ws.double(), None, None)


def _straight_through_grads(x, w, ws, bias, smooth, grad):
    """fp64 gradients of the unquantized layer (x / smooth) @ (W * scale)^T + bias: what int8_linear's backward
    (quantization passed straight through) must give."""
    xr = x.detach().double().requires_grad_()
    br = None if bias is None else bias.detach().double().requires_grad_()
    xs = xr if smooth is None else xr / smooth.double()
    y = xs @ (w.double() * ws.double()[:, None]).t()
    if br is not None:
        y = y + br
    y.backward(grad.double())
    return xr.grad, None if br is None else br.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("smoothed", [False, True])
def test_int8_linear_backward_passes_gradients_straight_through(dtype, smoothed):
    """int8_linear is differentiable in x and bias (training the layers around a quantized one): dx = dy @ (W *
    scale) / smooth, dbias = sum dy; eager and torch.compile agree."""
    torch.manual_seed(0)
    w, ws = rand_i8(24, 64), torch.rand(24) + 0.1
    smooth = torch.rand(64) + 0.5 if smoothed else None
    bias = torch.randn(24, requires_grad=True)
    x = torch.randn(2, 5, 64, dtype=dtype, requires_grad=True)
    y = dk.int8_linear(x, w, ws, bias=bias, smooth=smooth)
    grad = torch.randn_like(y)
    y.backward(grad)
    dx_ref, db_ref = _straight_through_grads(x, w, ws, bias, smooth, grad.float())
    assert x.grad.dtype == dtype and bias.grad.dtype == bias.dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert torch.allclose(x.grad.double(), dx_ref, rtol=tol, atol=tol * dx_ref.abs().max().item())
    assert torch.allclose(bias.grad.double(), db_ref, rtol=tol, atol=tol * db_ref.abs().max().item())
    eager = (x.grad.clone(), bias.grad.clone())
    x.grad = bias.grad = None
    compiled = torch.compile(lambda x: dk.int8_linear(x, w, ws, bias=bias, smooth=smooth), fullgraph=True)
    compiled(x).backward(grad)
    assert torch.equal(x.grad, eager[0])  # the same matmul; inductor may sum dbias in another order
    assert torch.allclose(bias.grad, eager[1], rtol=1e-3 if dtype == torch.float16 else 1e-6, atol=1e-6)


def test_layers_before_an_int8linear_train():
    """A float layer before a frozen Int8Linear gets the gradient it would get through the dequantized weight."""
    torch.manual_seed(0)
    first, lin = nn.Linear(32, 64), nn.Linear(64, 16)
    q = Int8Linear.from_float(lin)
    x = torch.randn(7, 32)
    loss = q(torch.relu(first(x))).square().sum()
    loss.backward()
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0
    ref_first = nn.Linear(32, 64)
    ref_first.load_state_dict(first.state_dict())
    dq = (q.weight.float() * q.weight_scale[:, None])
    h = torch.relu(ref_first(x))
    # the forward's output is the quantized one; the backward goes through the dequantized weight
    y = q(h.detach()).detach() + (h @ dq.t() + q.bias) - (h @ dq.t() + q.bias).detach()
    y.square().sum().backward()
    assert torch.allclose(first.weight.grad, ref_first.weight.grad, rtol=1e-4, atol=1e-5)


def test_bad_input_raises_clear_errors():
    a, b = rand_i8(4, 64), rand_i8(8, 64)
    sa, sb = torch.rand(4, 1), torch.rand(8)
    with pytest.raises(ValueError, match="a_q must be int8"):
        dk.int8_matmul(a.float(), b, sa, sb)
    with pytest.raises(ValueError, match="K mismatch"):
        dk.int8_matmul(a, rand_i8(8, 63), sa, sb)
    with pytest.raises(ValueError, match="a_scale must have shape"):
        dk.int8_matmul(a, b, torch.rand(3, 1), sb)
    with pytest.raises(ValueError, match="b_scale must have shape"):
        dk.int8_matmul(a, b, sa, torch.rand(7))
    with pytest.raises(ValueError, match="b_scale must be float32"):
        dk.int8_matmul(a, b, sa, sb.double())
    with pytest.raises(ValueError, match="bias must have shape"):
        dk.int8_matmul(a, b, sa, sb, bias=torch.rand(9))
    with pytest.raises(ValueError, match="out_dtype"):
        dk.int8_matmul(a, b, sa, sb, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="one device"):
        dk.int8_mm(a, b.to("meta"))
    with pytest.raises(ValueError, match="alpha"):
        quantize_model(Tiny(), alpha=2.0)
    with pytest.raises(TypeError, match="nn.Linear"):
        Int8Linear.from_float(nn.Conv1d(3, 3, 1))


# ---- GPU (H200) ----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 3, 16, 17, 1000])
@pytest.mark.parametrize("NK", [(64, 64), (4096, 13653), (13653, 4096), (4096, 4096)], ids=lambda v: f"N{v[0]}-K{v[1]}")
def test_cuda_int8_matmul_matches_reference(M, NK):
    """Odd and full-tile shapes (M 16 with N = K = 4096: the mask-free main loop) on the GPU."""
    N, K = NK
    a = torch.randint(-127, 128, (M, K), dtype=torch.int8, device="cuda")
    b = torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda")
    assert torch.equal(dk.int8_mm(a, b).cpu(), int8_mm_ref(a.cpu(), b.cpu()))
    sa, sb, bias = torch.rand(M, 1, device="cuda") * 1e-3, torch.rand(N, device="cuda") * 1e-3, torch.randn(N, device="cuda")
    for od in (torch.bfloat16, torch.float16):
        out = dk.int8_matmul(a, b, sa, sb, bias=bias, out_dtype=od)
        args = (a.cpu(), b.cpu(), sa.cpu(), sb.cpu(), bias.cpu())
        assert ulp_close(out.cpu(), int8_matmul_ref(*args, torch.float64), terms_of(*args))


@pytest.mark.gpu
@pytest.mark.parametrize("M", [2048, 8192])
def test_cuda_int8_mm_exact_at_large_full_tile_shapes(M):
    """The large-M launch shapes with every tile full (mask-free main loop): exact int32 sums,
    checked against an fp64 GEMM on the GPU (exact here: |sum| <= 127^2 * 4096 < 2^53)."""
    N, K = 4096, 4096
    a = torch.randint(-127, 128, (M, K), dtype=torch.int8, device="cuda")
    b = torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda")
    a[0], b[0] = 127, -127
    want = a.double() @ b.double().T
    assert torch.equal(dk.int8_mm(a, b).double(), want)


@pytest.mark.gpu
@pytest.mark.parametrize("MNK", [(8195, 8200, 4112), (8192, 8192, 8192)], ids=str)
def test_cuda_eager_persistent_tma_path_matches_the_op(MNK):
    """Eager large GEMMs take the persistent TMA kernel; the registered op (dispatcher, the path
    torch.compile uses) the plain kernel: the same bits, ragged edges included, and exact sums."""
    from deepseek_kernels.triton import int8_matmul as tk

    M, N, K = MNK
    a = torch.randint(-127, 128, (M, K), dtype=torch.int8, device="cuda")
    b = torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda")
    assert tk.persistent_tma_config(M, N, K, torch.bfloat16) is not None and tk.tma_ok(a, b)
    assert tk.persistent_tma_config(M, N, K, torch.float32) is None  # its epilogue tile does not fit
    acc = dk.int8_mm(a, b)  # the op: the plain kernel (exact sums, tested above)
    assert torch.equal(acc[-7:].double(), a[-7:].double() @ b.double().T)
    # 0/1 operands with at most 2048 terms: every sum is an integer <= 2^11, exact in fp16
    small_a, small_b = (a % 2).to(torch.int8), (b % 2).to(torch.int8)
    small_b[:, 2048:] = 0
    one_a, one_b = torch.ones(M, 1, device="cuda"), torch.ones(N, device="cuda")
    got = dk.int8_matmul(small_a, small_b, one_a, one_b, out_dtype=torch.float16)
    assert torch.equal(got.double(), dk.int8_mm(small_a, small_b).double())
    sa, sb, bias = torch.rand(M, 1, device="cuda") * 1e-3, torch.rand(N, device="cuda") * 1e-3, torch.randn(N, device="cuda")
    out = dk.int8_matmul(a, b, sa, sb, bias=bias, out_dtype=torch.bfloat16)
    assert torch.equal(out, torch.ops.deepseek_kernels.int8_matmul(a, b, sa, sb, bias, torch.bfloat16))


# ---- quantize_per_token kernel and the eager fast path ----------------------------------------------

# rows of one tile (read once) and, past QUANTIZE_MAX_BLOCK_K = 16384, of several tiles (read twice)
QPT_SHAPES = [(1, 1), (3, 17), (5, 1000), (2, 4096), (1, 5000), (4, 9000), (1, 14336), (2, 20000)]


@pytest.mark.parametrize("shape", QPT_SHAPES, ids=str)
@pytest.mark.parametrize("smooth", [False, True], ids=["plain", "smooth"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_quantize_per_token_kernel_is_bit_exact(shape, smooth, dtype):
    """Through the op: the Triton kernel (interpreter on CPU, compiled on a GPU) against the reference."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = (torch.randn(*shape, device=dev) * 3).to(dtype)
    s = (torch.rand(shape[-1], device=dev) + 0.5) if smooth else None
    q, sc = torch.ops.deepseek_kernels.quantize_per_token(x, s)
    rq, rs = quantize_per_token_ref(x, s)
    assert torch.equal(q, rq) and torch.equal(sc, rs)


def test_quantize_per_token_kernel_ties_and_non_finite_rows():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    # amax 127 -> scale 1: the halves are exact ties, rounded to even
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5],
                      [float("nan"), 1, 2, 3, 4, 5, 6, 7],
                      [float("inf"), 1, 2, 3, 4, 5, 6, 7],
                      [0.0] * 8], device=dev)
    q, sc = torch.ops.deepseek_kernels.quantize_per_token(x, None)
    assert q[0].tolist() == [127, 0, 2, 2, 0, -2, -2, 4]
    assert torch.isnan(sc[1]).all() and torch.isinf(sc[2]).all() and sc[3].item() == 0
    assert (q[1:] == 0).all()
    rq, rs = quantize_per_token_ref(x)
    assert torch.equal(q, rq) and torch.equal(sc.isnan(), rs.isnan())


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 4096), (16, 14336), (3, 16384), (2, 20000), (8192, 4096)], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_quantize_per_token_on_gpu_is_bit_exact(shape, dtype):
    """The compiled kernel on CUDA: one-tile rows up to 16384 (16 warps) and two-pass rows past it,
    plain and smoothed, bit-exact against the reference (the unmarked tests above run it only under
    the interpreter when the GPU tests are selected with -m gpu)."""
    x = (torch.randn(*shape, device="cuda") * 3).to(dtype)
    s = torch.rand(shape[-1], device="cuda") + 0.5
    for smooth in (None, s):
        q, sc = dk.quantize_per_token(x, smooth=smooth)
        rq, rs = quantize_per_token_ref(x, smooth)
        assert torch.equal(q, rq) and torch.equal(sc, rs)


def test_quantize_per_token_long_rows_with_non_finite_values():
    """Rows longer than one tile (two passes): a NaN or Inf in the second tile still reaches the scale."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(3, 20000, device=dev)
    x[1, 17000] = float("nan")
    x[2, 19999] = float("inf")
    q, sc = torch.ops.deepseek_kernels.quantize_per_token(x, None)
    rq, rs = quantize_per_token_ref(x)
    assert torch.isnan(sc[1]).all() and torch.isinf(sc[2]).all() and (q[1:] == 0).all()
    assert torch.equal(q, rq) and torch.equal(sc[0], rs[0])


def test_quantize_per_token_strided_and_batched():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(2, 3, 40, device=dev)[:, :, ::2]  # non-unit stride along K
    q, sc = dk.quantize_per_token(x)
    rq, rs = quantize_per_token_ref(x)
    assert q.shape == (2, 3, 20) and sc.shape == (2, 3, 1)
    assert torch.equal(q, rq) and torch.equal(sc, rs)


def _two_step(x, w, ws, bias, smooth):
    out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32
    xq, xs = dk.quantize_per_token(x.reshape(-1, x.shape[-1]), smooth=smooth)
    return dk.int8_matmul(xq, w, xs, ws, bias=bias, out_dtype=out_dtype).reshape(*x.shape[:-1], w.shape[0])


def _linear_inputs(M, N, K, extras, dev, dtype=torch.float16):
    x = torch.randn(M, K, device=dev).to(dtype)
    x[0, K // 2] = 40.0  # an outlier channel
    if "strided" in extras:  # a [M, K] view with stride 2 along K, and a leading batch dim
        x = torch.stack([x, x], -1)[..., 0].reshape(1, M, K)
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=dev)
    ws = torch.rand(N, device=dev) * 1e-2
    bias = torch.randn(N, device=dev).to(dtype) if "bias" in extras else None
    smooth = (torch.rand(K, device=dev) + 0.5) if "smooth" in extras else None
    return x, w, ws, bias, smooth


@pytest.mark.parametrize("M,N,K", [(1, 64, 64), (3, 136, 1000), (16, 72, 333), (17, 40, 64), (2, 33, 13)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("extras", ["plain", "bias", "smooth+bias", "strided+smooth"])
@pytest.mark.parametrize("path", ["ops", "direct"])
def test_int8_linear_is_bit_identical_to_the_two_ops(M, N, K, extras, path, monkeypatch):
    """int8_linear (any leading shape, strides, bias, smoothing, output dtype) gives the bits of
    quantize_per_token + int8_matmul, through the ops and through its eager GPU path (the two
    kernels launched directly; forced here under the Triton interpreter)."""
    import importlib

    from deepseek_kernels.ops._registry import interpreting

    ops_int8 = importlib.import_module("deepseek_kernels.ops.int8_matmul")  # the module, not the function

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if path == "direct" and dev == "cpu":
        if not interpreting():
            pytest.skip("the direct path needs a GPU or the Triton interpreter")
        monkeypatch.setattr(ops_int8, "eager_fast_path", lambda *tensors: True)
    x, w, ws, bias, smooth = _linear_inputs(M, N, K, extras, dev)
    out = dk.int8_linear(x, w, ws, bias=bias, smooth=smooth)
    assert out.dtype == x.dtype and out.shape == (*x.shape[:-1], N)
    monkeypatch.undo()
    assert torch.equal(out, _two_step(x, w, ws, bias, smooth))


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16, 33])
def test_int8_linear_eager_path_on_gpu(M):
    """On CUDA a plain eager int8_linear takes the direct launches; the bits equal the two ops'."""
    x, w, ws, bias, smooth = _linear_inputs(M, 14336, 4096, "smooth+bias", "cuda", torch.bfloat16)
    assert torch.equal(dk.int8_linear(x, w, ws, bias=bias, smooth=smooth), _two_step(x, w, ws, bias, smooth))


def test_strided_scale_and_bias_vectors():
    """Scales, bias and smoothing given as strided views (every other element) are read correctly
    by the GEMM and by int8_linear."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    M, N, K = 3, 40, 64
    a = torch.randint(-127, 128, (M, K), dtype=torch.int8, device=dev)
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=dev)
    sa, sb = torch.rand(M, 2, device=dev)[:, :1], torch.rand(2 * N, device=dev)[::2]
    bias = torch.randn(2 * N, device=dev)[::2]
    assert not sb.is_contiguous() and not bias.is_contiguous()
    got = dk.int8_matmul(a, w, sa, sb, bias=bias, out_dtype=torch.float32)
    want = dk.int8_matmul(a, w, sa.contiguous(), sb.contiguous(), bias=bias.contiguous(), out_dtype=torch.float32)
    assert torch.equal(got, want)
    x = torch.randn(M, K, device=dev)
    smooth = (torch.rand(2 * K, device=dev) + 0.5)[::2]
    got = dk.int8_linear(x, w, sb, bias=bias, smooth=smooth)
    want = dk.int8_linear(x, w, sb.contiguous(), bias=bias.contiguous(), smooth=smooth.contiguous())
    assert torch.equal(got, want)


def test_int8_linear_batched_fp32_and_non_finite_rows():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(2, 3, 48, device=dev)
    x[1, 2, 5] = float("nan")  # that row's scale is NaN: its outputs are NaN in both paths
    w = torch.randint(-127, 128, (20, 48), dtype=torch.int8, device=dev)
    ws = torch.rand(20, device=dev)
    out = dk.int8_linear(x, w, ws)
    want = _two_step(x, w, ws, None, None)
    assert out.shape == (2, 3, 20) and out.dtype == torch.float32
    assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out.nan_to_num(), want.nan_to_num())
    assert out[1, 2].isnan().all() and not out[0].isnan().any()


def test_int8_linear_bad_input_names_the_argument():
    w = torch.randint(-127, 128, (8, 16), dtype=torch.int8)
    ws = torch.rand(8)
    with pytest.raises(ValueError, match="K mismatch"):
        dk.int8_linear(torch.randn(2, 15), w, ws)
    with pytest.raises(ValueError, match="weight must be int8"):
        dk.int8_linear(torch.randn(2, 16), w.float(), ws)
    with pytest.raises(ValueError, match=r"weight_scale must be a float32 tensor of shape \[N\]"):
        dk.int8_linear(torch.randn(2, 16), w, ws[:4])
    with pytest.raises(ValueError, match=r"smooth must be a floating-point tensor of shape \[K\]"):
        dk.int8_linear(torch.randn(2, 16), w, ws, smooth=torch.ones(8))
    with pytest.raises(ValueError, match="x must be a floating-point tensor"):
        dk.int8_linear(torch.ones(2, 16, dtype=torch.int8), w, ws)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 4, 16])
def test_int8linear_on_gpu_llm_shape(M):
    """Int8Linear at an LLM shape: the bits of the two ops, and close to the bf16 nn.Linear."""
    x = torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16)
    lin = torch.nn.Linear(4096, 14336, bias=True).to("cuda", torch.bfloat16)
    q = Int8Linear.from_float(lin)
    out = q(x)
    assert torch.equal(out, _two_step(x, q.weight, q.weight_scale, q.bias, None))
    err = ((out.float() - lin(x).float()).norm() / lin(x).float().norm()).item()
    assert err < 2e-2, err


@pytest.mark.gpu
def test_eager_fast_path_matches_the_op_and_steps_aside_when_traced():
    """Plain eager CUDA calls launch the kernels directly; the result is bit-identical to the
    registered op's, and under a dispatch mode / torch.compile the registered op runs instead."""
    from torch.utils._python_dispatch import TorchDispatchMode

    x = torch.randn(7, 300, device="cuda", dtype=torch.bfloat16)
    w = torch.randint(-127, 128, (129, 300), device="cuda", dtype=torch.int8)
    ws, bias = torch.rand(129, device="cuda"), torch.randn(129, device="cuda", dtype=torch.bfloat16)
    xq, xs = dk.quantize_per_token(x)
    oq, os_ = torch.ops.deepseek_kernels.quantize_per_token(x, None)
    assert torch.equal(xq, oq) and torch.equal(xs, os_)
    out = dk.int8_matmul(xq, w, xs, ws, bias=bias)
    assert torch.equal(out, torch.ops.deepseek_kernels.int8_matmul(xq, w, xs, ws, bias, torch.bfloat16))

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Seen() as seen:
        dk.int8_matmul(xq, w, xs, ws, bias=bias)
        dk.quantize_per_token(x)
    assert any("deepseek_kernels.int8_matmul" in o for o in seen.ops), seen.ops
    assert any("deepseek_kernels.quantize_per_token" in o for o in seen.ops), seen.ops
    compiled = torch.compile(lambda x: dk.int8_matmul(*dk.quantize_per_token(x)[:1], w, dk.quantize_per_token(x)[1], ws),
                             fullgraph=True)
    assert torch.equal(compiled(x), dk.int8_matmul(xq, w, xs, ws))


@pytest.mark.parametrize("tma_store", [False, True], ids=["pointer-store", "tma-store"])
@pytest.mark.parametrize("persistent", [None, 3], ids=["one-tile-per-program", "persistent-3"])
@pytest.mark.parametrize("M,N,K", [(1, 64, 64), (17, 200, 96), (40, 72, 336)], ids=lambda v: str(v))
def test_tma_kernel_is_exact(M, N, K, persistent, tma_store):
    """The TMA-descriptor kernels (tune_int8.py --tma [--persistent] [--tma-store]): exact int32
    accumulation with out-of-range rows/columns zero-filled by the descriptors, and the same
    epilogue bits as the pointer kernel; the persistent one with 3 programs striding over the tiles;
    with ``tma_store`` the tile leaves through a descriptor clipped at the ragged edges (the
    poisoned rows and columns past the view must stay untouched)."""
    from deepseek_kernels.ops._registry import interpreting
    from deepseek_kernels.triton import int8_matmul as tk

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randint(-127, 128, (M, K), dtype=torch.int8, device=dev)
    b = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=dev)
    if not tk.tma_ok(a, b):
        pytest.skip("TMA needs compute capability 9+ (or the interpreter)")
    assert interpreting() or dev == "cuda"
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)
    kw = dict(persistent_programs=persistent, tma_store=tma_store)
    # outputs are [M, N] views into poisoned [M + 5, N + 8] buffers (16-byte aligned rows)
    acc_buf = torch.full((M + 5, N + 8), -7, dtype=torch.int32, device=dev)
    acc = acc_buf[:M, :N]
    tk.launch_tma(a, b, acc, None, None, None, cfg, apply_epilogue=False, **kw)
    assert torch.equal(acc.cpu(), int8_mm_ref(a.cpu(), b.cpu()))
    assert (acc_buf[M:] == -7).all() and (acc_buf[:, N:] == -7).all()
    sa, sb = torch.rand(M, device=dev), torch.rand(N, device=dev)
    bias = torch.randn(N, device=dev)
    out_buf = torch.full((M + 5, N + 8), float("nan"), dtype=torch.bfloat16, device=dev)
    out = out_buf[:M, :N]
    tk.launch_tma(a, b, out, sa, sb, bias, cfg, **kw)
    assert torch.equal(out, dk.int8_matmul(a, b, sa, sb, bias=bias, out_dtype=torch.bfloat16))
    assert out_buf[M:].isnan().all() and out_buf[:, N:].isnan().all()
    if tma_store:  # rows of N + 1 bf16 elements are not 16-byte aligned
        odd = torch.empty(M, N + 1, dtype=torch.bfloat16, device=dev)[:, :N]
        assert not tk.tma_store_ok(odd)
        with pytest.raises(ValueError, match="tma_store"):
            tk.launch_tma(a, b, odd, sa, sb, bias, cfg, **kw)
    a8, b8 = a[:, :K - 8].contiguous(), b[:, :K - 8].contiguous()
    assert not tk.tma_ok(a8, b8)  # rows of K - 8 bytes are not 16-byte aligned: the pointer kernel


# ---- direct launches (deepseek_kernels.triton._direct) ------------------------------------------------


def _direct_launch(monkeypatch, on: bool):
    from deepseek_kernels.triton import _direct

    monkeypatch.setenv("DSK_DIRECT_LAUNCH", "1" if on else "0")
    _direct.refresh()
    return _direct.enabled()


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K", [(1, 14336, 4096), (3, 200, 96), (37, 4096, 4096), (2048, 4096, 4096)], ids=str)
def test_direct_launch_repeats_equal_the_jit_launch(M, N, K, monkeypatch):
    """Eager int8_matmul / quantize_per_token calls repeat through DirectLaunch after the first:
    every repeat (fresh data of the same shape, each out dtype and bias dtype: new keys) gives the
    bits of Triton's own launch (DSK_DIRECT_LAUNCH=0) of the same inputs."""
    import importlib

    ops = importlib.import_module("deepseek_kernels.ops.int8_matmul")  # the module, not the function

    def inputs():
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8)
        return x, w, torch.rand(N, device="cuda") * 1e-2

    cases = [(od, bd) for od in (torch.bfloat16, torch.float16, torch.float32) for bd in (None, torch.float32, od)]
    runs = [(inputs(), od, bd) for _ in range(3) for od, bd in cases]

    def results():
        outs = []
        for (x, w, ws), od, bd in runs:
            bias = None if bd is None else torch.linspace(-1, 1, N, device="cuda").to(bd)
            xq, xs = dk.quantize_per_token(x)
            outs.append((xq, xs, dk.int8_matmul(xq, w, xs, ws, bias=bias, out_dtype=od)))
        return outs

    _gemv_path(monkeypatch, False)  # the decode rows' C++ path would bypass DirectLaunch
    _cubin_path(monkeypatch, False)  # and the C++ launch of the compiled GEMM above 16 rows
    assert not _direct_launch(monkeypatch, False)
    want = results()
    assert _direct_launch(monkeypatch, True)
    hits = ops._MATMUL_LAUNCH.hits if ops._MATMUL_LAUNCH is not None else 0
    got = results()
    for (gq, gs, go), (wq, ws_, wo) in zip(got, want):
        assert torch.equal(gq, wq) and torch.equal(gs, ws_) and torch.equal(go, wo)
    assert ops._MATMUL_LAUNCH.hits >= hits + 2 * len(cases)  # the 2nd and 3rd rounds repeat every key
    assert ops._QUANTIZE_LAUNCH.hits > 0


def _cubin_path(monkeypatch, on: bool):
    """Turns the C++ launch of the compiled GEMM (eager, M > 16) on or off; the extension module when on."""
    import importlib

    ops = importlib.import_module("deepseek_kernels.ops.int8_matmul")
    monkeypatch.setenv("DSK_INT8_CUBIN", "1" if on else "0")
    monkeypatch.setattr(ops, "_CUBIN_EXT", [])
    return ops._cubin_ext()


_SYNTH_PTX = """
.visible .entry gemm(
\t.param .u64 .ptr .global .align 1 gemm_param_0,
{rest}
)
.maxntid 256, 1, 1
"""


def _ptx(types):
    lines = [f"\t.param .u64 .ptr .global .align 1 gemm_param_{i}," for i in range(1, 6)]
    lines += [f"\t.param .{t} gemm_param_{6 + i}," for i, t in enumerate(types)]
    return _SYNTH_PTX.format(rest="\n".join(lines).rstrip(","))


def test_cubin_params_follow_the_ptx_entry():
    """The C++ launch's parameter list comes from the PTX entry: the six pointers, the integers Triton kept (those
    equal to 1 are constants), 64 bits for a value outside int32, at most two trailing 64-bit pointers (Triton's
    scratch). Any other layout is declined (the key keeps Triton's launcher), never misread."""
    from deepseek_kernels.ops.int8_matmul import cubin_params

    ints = (300, 200, 1000, 1000, 1, 1000, 1, 200, 1)  # M, N, K, strides of a_q and b_q, then out's (N, 1)
    kept = [10, 11, 12, 13, 15, 17]  # 32-bit M, N, K, a_q.stride(0), b_q.stride(0), out.stride(0)
    assert cubin_params(_ptx(["u32"] * 6 + ["u64", "u64"]), "gemm", ints) == list(range(6)) + kept + [30, 30]
    assert cubin_params(_ptx(["u32"] * 6), "gemm", ints) == list(range(6)) + kept
    assert cubin_params(_ptx(["u32"] * 6 + ["u64"]), "gemm", ints) == list(range(6)) + kept + [30]
    wide = (300, 200, 1000, 2**31 + 16, 1, 1000, 1, 200, 1)  # a row stride past int32: a 64-bit parameter
    assert cubin_params(_ptx(["u32"] * 3 + ["u64"] + ["u32"] * 2 + ["u64"] * 2), "gemm", wide) == (
        list(range(6)) + [10, 11, 12, 23, 15, 17, 30, 30])
    assert cubin_params(_ptx(["u32"] * 9 + ["u64"] * 2), "gemm", ints) is None  # the 1s kept: declined
    assert cubin_params(_ptx(["u32"] * 6 + ["u64"] * 3), "gemm", ints) is None  # three trailing pointers
    assert cubin_params(_ptx(["u32"] * 5), "gemm", ints) is None  # too few
    assert cubin_params(_ptx(["u32"] * 6), "other", ints) is None  # another entry


_COMPILE_CHILD = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from deepseek_kernels.ops.int8_matmul import cubin_params
from deepseek_kernels.triton.int8_matmul import _int8_matmul_kernel as kernel

names = [p.name for p in kernel.params]
flags = dict(APPLY_EPILOGUE=True, HAS_BIAS=True, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, EVEN_MN=False,
             EVEN_K=False, PDL=False)
ones = {"stride_ak", "stride_bk", "stride_on"}
types = {"a_ptr": "*i8", "b_ptr": "*i8", "out_ptr": "*bf16", "bias_ptr": "*bf16", "a_scale_ptr": "*fp32",
         "b_scale_ptr": "*fp32"}
signature = {n: "constexpr" if n in flags or n in ones else types.get(n, "i32") for n in names}
constants = {(i,): flags[n] if n in flags else 1 for i, n in enumerate(names) if n in flags or n in ones}
try:
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                              target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=2))
except Exception as e:
    print(json.dumps({"skip": f"{type(e).__name__}: {e}"[:300]}))
    sys.exit(0)
print(json.dumps({"params": cubin_params(compiled.asm["ptx"], compiled.name, (300, 200, 1000, 1000, 1, 1000, 1, 200, 1))}))
"""


def test_cubin_params_of_a_real_triton_compile():
    """The same reading of the PTX this Triton emits for the GEMM, compiled for sm_90 without a GPU (in a child
    process with the interpreter off; the integers equal to 1 given as the constants Triton's specialization makes
    them)."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_CHILD], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in result:  # an older Triton's ASTSource / compile signature
        pytest.skip(f"this Triton does not compile for sm_90 without a GPU here ({result['skip']})")
    params = result["params"]
    assert params is not None and params[:12] == list(range(6)) + [10, 11, 12, 13, 15, 17], params
    assert params[12:] == [30] * (len(params) - 12) and len(params) <= 14, params


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K", [(17, 96, 64), (300, 200, 1000), (2048, 4096, 4096)], ids=str)
def test_cubin_launch_repeats_equal_the_triton_launch(M, N, K, monkeypatch):
    """Eager int8_matmul above 16 rows: the first call of a key goes through Triton and registers the compiled
    kernel; repeats (fresh data, every out dtype and bias dtype) launch it from C++ and give the bits of Triton's
    own launch; a strided a_q is its own key; an a_q off 16 bytes or b_scale as [N, 1] is declined (Triton's
    path, still exact)."""
    ext = _cubin_path(monkeypatch, True)
    if ext is None:
        pytest.skip("the CUDA extension's C++ GEMM launch is not available here")
    assert _direct_launch(monkeypatch, True)

    def operands(strided=False):
        a = torch.randint(-127, 128, (M, 2 * K if strided else K), device="cuda", dtype=torch.int8)
        a = a[:, :K] if strided else a
        b = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8)
        return a, b, torch.rand(M, 1, device="cuda") * 1e-3, torch.rand(N, device="cuda") * 1e-3

    calls = []
    for od in (torch.bfloat16, torch.float16, torch.float32):
        for bd in (None, torch.float32, od):
            for strided in (False, True):
                bias = None if bd is None else torch.linspace(-1, 1, N, device="cuda").to(bd)
                calls += [(operands(strided), bias, od) for _ in range(2)]

    launches = ext.int8_matmul_cubin_launches()
    got = [dk.int8_matmul(*ops_, bias=bias, out_dtype=od) for ops_, bias, od in calls]
    keys = {(od, None if bias is None else bias.dtype, a.stride(0)) for (a, *_), bias, od in calls}
    assert ext.int8_matmul_cubin_launches() - launches == len(calls) - len(keys)  # all but each key's first call
    _cubin_path(monkeypatch, False)
    want = [dk.int8_matmul(*ops_, bias=bias, out_dtype=od) for ops_, bias, od in calls]  # Triton's launcher
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and torch.equal(g, w), i
    assert ulp_close(got[0].cpu(), int8_matmul_ref(*(t.cpu() for t in calls[0][0]), None, torch.float64))

    ext = _cubin_path(monkeypatch, True)
    a, b, sa, sb = operands()
    dk.int8_matmul(a, b, sa, sb)  # registered (or already)
    launches = ext.int8_matmul_cubin_launches()
    buf = torch.empty(M * K + 16, device="cuda", dtype=torch.int8)
    a_off = buf[1:1 + M * K].view(M, K)
    a_off.copy_(a)
    for args in ((a_off, b, sa, sb), (a, b, sa, sb.view(N, 1))):
        assert torch.equal(dk.int8_matmul(*args), dk.int8_matmul(a, b, sa, sb))
    assert ext.int8_matmul_cubin_launches() - launches == 2  # only the two reference calls took the C++ launch


@pytest.mark.gpu
def test_cubin_launch_errors_graphs_and_hooks(monkeypatch):
    """Bad operands still raise int8_matmul's errors (the C++ launch declines them); a registered key captured in a
    CUDA graph replays the launch; with a launch-enter hook set (a profiler), calls keep Triton's launcher."""
    import importlib

    from triton import knobs

    ops = importlib.import_module("deepseek_kernels.ops.int8_matmul")
    ext = _cubin_path(monkeypatch, True)
    if ext is None:
        pytest.skip("the CUDA extension's C++ GEMM launch is not available here")
    assert _direct_launch(monkeypatch, True)
    M, N, K = 40, 96, 128
    a = torch.randint(-127, 128, (M, K), device="cuda", dtype=torch.int8)
    b = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8)
    sa, sb = torch.rand(M, 1, device="cuda"), torch.rand(N, device="cuda")
    want = dk.int8_matmul(a, b, sa, sb)
    with pytest.raises(ValueError, match="a_scale must have shape"):
        dk.int8_matmul(a, b, torch.rand(M + 1, 1, device="cuda"), sb)
    with pytest.raises(ValueError, match="K mismatch"):
        dk.int8_matmul(a, b[:, :64], sa, sb)
    with pytest.raises(ValueError, match="out_dtype"):
        dk.int8_matmul(a, b, sa, sb, out_dtype=torch.int32)

    out = torch.empty_like(want)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        dk.int8_matmul(a, b, sa, sb)
        graph = torch.cuda.CUDAGraph()
        launches = ext.int8_matmul_cubin_launches()
        with torch.cuda.graph(graph, stream=stream):
            out.copy_(dk.int8_matmul(a, b, sa, sb))
    torch.cuda.current_stream().wait_stream(stream)
    assert ext.int8_matmul_cubin_launches() == launches + 1
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)

    chain = knobs.runtime.launch_enter_hook
    seen = []
    if hasattr(chain, "add"):
        chain.add(seen.append)
        cleanup = lambda: chain.remove(seen.append)  # noqa: E731
    else:
        monkeypatch.setattr(knobs.runtime, "launch_enter_hook", seen.append)
        cleanup = lambda: None  # noqa: E731
    try:
        launches, hits = ext.int8_matmul_cubin_launches(), ops._MATMUL_LAUNCH.hits
        assert torch.equal(dk.int8_matmul(a, b, sa, sb), want)
        assert ext.int8_matmul_cubin_launches() == launches and ops._MATMUL_LAUNCH.hits == hits + 1 and seen
    finally:
        cleanup()


@pytest.mark.gpu
def test_direct_launch_repeats_feed_a_launch_enter_hook(monkeypatch):
    """A repeat through DirectLaunch skips building Triton's launch metadata only while no enter hook is set: with
    one set (profilers set one), each repeat passes the hook the kernel's metadata, as Triton's own launch does."""
    import importlib

    from triton import knobs

    ops = importlib.import_module("deepseek_kernels.ops.int8_matmul")
    _gemv_path(monkeypatch, False)
    assert _direct_launch(monkeypatch, True)
    M, N, K = 40, 96, 64
    a = torch.randint(-127, 128, (M, K), device="cuda", dtype=torch.int8)
    b = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8)
    sa, sb = torch.rand(M, 1, device="cuda"), torch.rand(N, device="cuda")
    want = dk.int8_matmul(a, b, sa, sb)  # the first launch of this key (a miss: Triton's own launch)
    seen = []

    def hook(metadata):
        seen.append(None if metadata is None else metadata.get()["name"])

    chain = knobs.runtime.launch_enter_hook
    if hasattr(chain, "add"):  # Triton 3.8: a HookChain
        chain.add(hook)
        cleanup = lambda: chain.remove(hook)  # noqa: E731
    else:
        monkeypatch.setattr(knobs.runtime, "launch_enter_hook", hook)
        cleanup = lambda: None  # noqa: E731
    try:
        hits = ops._MATMUL_LAUNCH.hits
        got = dk.int8_matmul(a, b, sa, sb)
        assert ops._MATMUL_LAUNCH.hits == hits + 1, "the repeat did not go through DirectLaunch"
    finally:
        cleanup()
    assert seen and seen[-1] is not None and "int8_matmul" in seen[-1], seen
    assert torch.equal(got, want)


@pytest.mark.gpu
def test_direct_launch_unaligned_and_strided_operands(monkeypatch):
    """A pointer off 16-byte alignment takes Triton's launch (its compile assumes aligned pointers
    where it saw them); another row stride is another key. Results stay exact."""
    _gemv_path(monkeypatch, False)  # the C++ decode path would take the aligned calls
    assert _direct_launch(monkeypatch, True)
    M, N, K = 5, 96, 64
    a = torch.randint(-127, 128, (M, K), device="cuda", dtype=torch.int8)
    b = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8)
    one_a, one_b = torch.ones(M, 1, device="cuda"), torch.ones(N, device="cuda")
    want = int8_mm_ref(a.cpu(), b.cpu()).double()
    for _ in range(2):  # the aligned key twice (a direct repeat), then unaligned copies of the same shape
        assert torch.equal(dk.int8_matmul(a, b, one_a, one_b, out_dtype=torch.float32).double().cpu(), want)
    buf = torch.empty(M * K + 1, device="cuda", dtype=torch.int8)
    a_off = buf[1:].view(M, K)
    a_off.copy_(a)
    assert a_off.data_ptr() % 16
    assert torch.equal(dk.int8_matmul(a_off, b, one_a, one_b, out_dtype=torch.float32).double().cpu(), want)
    wide = torch.randint(-127, 128, (M, 2 * K), device="cuda", dtype=torch.int8)
    wide[:, :K] = a
    assert torch.equal(dk.int8_matmul(wide[:, :K], b, one_a, one_b, out_dtype=torch.float32).double().cpu(), want)
    x = torch.randn(M, 2 * K, device="cuda", dtype=torch.float16)
    for xv in (x[:, :K], x[:, :K].contiguous(), x[:, 1:K + 1]):  # row stride 2K, K; an unaligned start
        q, s = dk.quantize_per_token(xv)
        rq, rs = quantize_per_token_ref(xv.cpu())
        assert torch.equal(q.cpu(), rq) and torch.equal(s.cpu(), rs)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16])
def test_int8_linear_programmatic_dependent_launch(M, monkeypatch):
    """DSK_PDL=1: the GEMM starts before its quantize kernel ends and waits for it (griddepcontrol).
    Fifty back-to-back calls on fresh inputs, eager and replayed from a CUDA graph, give the bits of
    the ordinary launches: a GEMM that read the codes too early would use the previous call's."""
    from deepseek_kernels.ops._registry import pdl_enabled, programmatic_launches

    _gemv_path(monkeypatch, False)  # the Triton pair (the C++ one: test_int8_linear_gemv_programmatic_chain_is_exact)
    N, K = 14336, 4096
    w = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8)
    ws = torch.rand(N, device="cuda") * 1e-3
    xs = [torch.randn(M, K, device="cuda", dtype=torch.bfloat16) for _ in range(50)]
    with programmatic_launches(False):
        want = [dk.int8_linear(x, w, ws) for x in xs]
    with programmatic_launches(True):
        assert pdl_enabled(xs[0], "int8_linear")
        assert all(torch.equal(dk.int8_linear(x, w, ws), r) for x, r in zip(xs, want))
        static_x = xs[0].clone()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static_out = dk.int8_linear(static_x, w, ws)
    for x, r in zip(xs, want):
        static_x.copy_(x)
        g.replay()
        assert torch.equal(static_out, r)


@pytest.mark.gpu
@pytest.mark.parametrize("cpp", [False, True], ids=["triton", "cpp"])
@pytest.mark.parametrize("M,N,K", [(1, 14336, 4096), (16, 4100, 80), (5, 300, 1008)], ids=str)
def test_decode_matmul_prefetch_before_the_wait_is_safe(cpp, M, N, K, monkeypatch):
    """A decode int8_matmul launched programmatically starts before the kernel before it ends, and the C++
    GEMV prefetches its weight rows into L2 before it waits for that kernel. Here that kernel writes the very
    weights (a per-token quantize of N rows, itself a programmatic launch that lets the next kernel start at
    once): a GEMM that used bytes fetched before the wait would use the previous iteration's codes. Thirty
    chained calls on fresh data, eager and replayed from a CUDA graph (which runs the Triton kernel), give the
    bits of plain launches, on the Triton kernel and on the C++ one."""
    from deepseek_kernels.ops._registry import pdl_enabled, programmatic_launches
    from deepseek_kernels.ops.int8_matmul import _launch_quantize_per_token

    if cpp:
        _needs_gemv(monkeypatch)
        from deepseek_kernels import _extension

        assert _extension._C.int8_gemv_prefetch_bytes() > 0
    else:
        _gemv_path(monkeypatch, False)
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launches need sm_90")
    a = torch.randint(-127, 128, (M, K), dtype=torch.int8, device="cuda")
    sa = torch.rand(M, 1, device="cuda") * 1e-3
    xs = [torch.randn(N, K, device="cuda", dtype=torch.float16) for _ in range(30)]

    def step(x, pdl):
        b, sb = _launch_quantize_per_token(x, None, direct=True, pdl=pdl)
        return dk.int8_matmul(a, b, sa, sb.reshape(-1))

    with programmatic_launches(False):
        want = [step(x, False) for x in xs]
        b, sb = OPS.quantize_per_token(xs[-1], None)
        assert torch.equal(want[-1], OPS.int8_matmul(a, b, sa, sb.reshape(-1), None, torch.bfloat16))
    with programmatic_launches(True):
        assert pdl_enabled(a, "int8_matmul")
    assert_pdl_gives_the_bits(lambda x: step(x, True), xs, want)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16])
def test_int8_linear_gemv_programmatic_chain_is_exact(M, monkeypatch):
    """The C++ decode pair (quantize -> GEMV) as a programmatic launch chain (``pdl=True``: the GEMV
    prefetches weights, then waits for the codes) gives the bits of plain launches, call after call."""
    _needs_gemv(monkeypatch)
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launches need sm_90")
    N, K = 14336, 4096
    w = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8)
    ws = torch.rand(N, device="cuda") * 1e-3
    xs = [torch.randn(M, K, device="cuda", dtype=torch.bfloat16) for _ in range(40)]
    want = [OPS.int8_linear_gemv(x, w, ws, None, None, False) for x in xs]
    got = [OPS.int8_linear_gemv(x, w, ws, None, None, True) for x in xs]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    xq, xs0 = OPS.quantize_per_token(xs[0], None)
    assert torch.equal(OPS.int8_gemv(xq, w, xs0, ws, None, torch.bfloat16, True), want[0])


# ---- the C++ decode path (csrc/int8: int8_gemv, int8_linear_gemv) ------------------------------------


def _gemv_path(monkeypatch, on: bool) -> bool:
    """Turns the eager C++ decode path on or off (DSK_INT8_GEMV); whether it serves cuda:0 now."""
    import importlib

    ops = importlib.import_module("deepseek_kernels.ops.int8_matmul")
    monkeypatch.setenv("DSK_INT8_GEMV", "1" if on else "0")
    monkeypatch.setattr(ops, "_GEMV_EXT", [])
    return ops._gemv_ready(torch.empty(0, device="cuda"))


def _needs_gemv(monkeypatch):
    if not _gemv_path(monkeypatch, True):
        pytest.skip("the CUDA extension's decode kernels are not available here")


GEMV_SHAPES = [(1, 14336, 4096), (16, 14336, 4096), (1, 4096, 14336), (3, 200, 1008), (9, 13, 48), (8, 64, 64),
               (16, 1, 16), (5, 4096, 4096)]


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K", GEMV_SHAPES, ids=str)
def test_gemv_sums_are_exact_and_bits_equal_the_triton_op(M, N, K, monkeypatch):
    """int8_gemv: exact int32 sums (fp32 output, unit scales: the sum rounded once to fp32, extremes
    included), and for every output and bias dtype the bits of the Triton op (same epilogue order)."""
    _needs_gemv(monkeypatch)
    a = torch.randint(-127, 128, (M, K), dtype=torch.int8, device="cuda")
    b = torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda")
    a[0], b[0] = 127, -127
    ones_m, ones_n = torch.ones(M, 1, device="cuda"), torch.ones(N, device="cuda")
    got = OPS.int8_gemv(a, b, ones_m, ones_n, None, torch.float32)
    assert torch.equal(got.cpu(), int8_mm_ref(a.cpu(), b.cpu()).float())
    sa, sb = torch.rand(M, 1, device="cuda") * 1e-3, torch.rand(N, device="cuda") * 1e-3
    for od in (torch.bfloat16, torch.float16, torch.float32):
        for bd in (None, torch.float32, torch.bfloat16, torch.float16):
            bias = None if bd is None else torch.randn(N, device="cuda").to(bd)
            want = OPS.int8_matmul(a, b, sa, sb, bias, od)  # the dispatcher: the Triton kernel
            assert torch.equal(OPS.int8_gemv(a, b, sa, sb, bias, od), want), (od, bd)
            assert torch.equal(dk.int8_matmul(a, b, sa, sb, bias=bias, out_dtype=od), want), (od, bd)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 4, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("extras", ["plain", "smooth+bias", "strided"])
def test_int8_linear_gemv_bits_equal_the_two_triton_ops(M, dtype, extras, monkeypatch):
    """int8_linear_gemv (quantize + GEMV from C++) gives the bits of the Triton quantize_per_token and
    int8_matmul ops, non-finite rows included (NaN and Inf: scale NaN / Inf, codes 0)."""
    _needs_gemv(monkeypatch)
    N, K = 4096, 1024
    x, w, ws, bias, smooth = _linear_inputs(M, N, K, extras, "cuda", dtype)
    if M > 1:
        x = x.clone()
        x[..., 1, 3] = float("nan")
        x[..., M - 1, 7] = float("inf")
    out_dtype = dtype if dtype != torch.float32 else torch.float32
    xq, xs = OPS.quantize_per_token(x.reshape(-1, K), smooth)
    want = OPS.int8_matmul(xq, w, xs, ws, bias, out_dtype).reshape(*x.shape[:-1], N)
    got = OPS.int8_linear_gemv(x.reshape(-1, K), w, ws, bias, smooth).reshape(*x.shape[:-1], N)
    same_bits = dict(rtol=0, atol=0, equal_nan=True)  # the rows with NaN / Inf are NaN on both sides
    torch.testing.assert_close(got, want, **same_bits)
    assert got[..., 0, :].isfinite().all()
    assert dk.explain("int8_linear", x, w, ws, bias=bias, smooth=smooth).startswith("cuda: deepseek_kernels._C")
    torch.testing.assert_close(dk.int8_linear(x, w, ws, bias=bias, smooth=smooth), want, **same_bits)


@pytest.mark.gpu
@pytest.mark.parametrize("lead", [(1,), (2, 3), (4, 1, 4)], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_int8_linear_eager_entry_takes_any_leading_dims(lead, dtype, monkeypatch):
    """The pybind11 entry (int8_linear_eager, what dk.int8_linear calls eagerly) flattens x [..., K] itself and
    returns [..., N] with the Triton ops' bits, N off a multiple of 16 and a strided x included."""
    _needs_gemv(monkeypatch)
    from deepseek_kernels import _extension

    N, K = 300, 1024
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda")
    ws, bias = torch.rand(N, device="cuda") * 1e-2, torch.randn(N, device="cuda", dtype=dtype)
    smooth = torch.rand(K, device="cuda", dtype=dtype) + 0.5
    x = torch.randn(*lead, 2 * K, device="cuda", dtype=dtype)[..., ::2]  # strided along K
    got = _extension._C.int8_linear_eager(x, w, ws, bias, smooth)
    assert got is not None and got.shape == (*lead, N) and got.dtype == dtype
    xq, xs = OPS.quantize_per_token(x.reshape(-1, K), smooth)
    want = OPS.int8_matmul(xq, w, xs, ws, bias, dtype).reshape(*lead, N)
    assert torch.equal(got, want)
    assert torch.equal(dk.int8_linear(x, w, ws, bias=bias, smooth=smooth), want)


@pytest.mark.gpu
def test_eager_entries_decline_without_launching_or_raising(monkeypatch):
    """int8_gemv_eager / int8_linear_eager return None (the caller's general path then runs, and raises the clear
    errors) for operands the decode kernels do not take: 17 rows, K off 16, wrong scale shapes, a weight on the
    CPU, an x needing grad, a stream capturing a CUDA graph (test_int8_linear_gemv_in_a_cuda_graph); dk.int8_linear still names the bad
    argument."""
    _needs_gemv(monkeypatch)
    from deepseek_kernels import _extension

    C = _extension._C
    K, N = 64, 32
    x = torch.randn(4, K, device="cuda")
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda")
    ws = torch.rand(N, device="cuda")
    assert C.int8_linear_eager(x, w, ws, None, None) is not None
    declined = {"17 rows": (torch.randn(17, K, device="cuda"), w, ws), "K off 16": (x[:, :40], w[:, :40], ws),
                "scale shape": (x, w, torch.rand(N + 1, device="cuda")), "scale dtype": (x, w, ws.double()),
                "weight on cpu": (x, w.cpu(), ws), "grad": (x.clone().requires_grad_(), w, ws)}
    for name, (xx, ww, ss) in declined.items():
        assert C.int8_linear_eager(xx, ww, ss, None, None) is None, name
    xq = torch.randint(-127, 128, (4, K), dtype=torch.int8, device="cuda")
    sa = torch.rand(4, 1, device="cuda")
    assert C.int8_gemv_eager(xq, w, sa, ws, None, torch.bfloat16) is not None
    assert C.int8_gemv_eager(xq, w, sa[:3], ws, None, torch.bfloat16) is None
    assert C.int8_gemv_eager(xq, w, sa, ws, None, torch.int32) is None
    with torch.no_grad():  # no grad wanted: the fast path takes it
        assert C.int8_linear_eager(x.clone().requires_grad_(), w, ws, None, None) is not None
    with pytest.raises(ValueError, match="weight_scale"):
        dk.int8_linear(x, w, torch.rand(N + 1, device="cuda"))
    with pytest.raises(ValueError, match="a_scale"):
        dk.int8_matmul(xq, w, sa[:3], ws)
    with pytest.raises(ValueError, match="weight_scale"):  # a missing operand reaches the named error too
        dk.int8_linear(x, w, None)
    with pytest.raises(TypeError, match="a_scale"):
        dk.int8_matmul(xq, w, None, ws)


@pytest.mark.gpu
def test_gemv_route_and_its_switch(monkeypatch):
    """Eager aligned decode calls take the C++ op (the default: DSK_INT8_GEMV unset); M 17, K off a multiple
    of 16, an unaligned operand, a float64 bias and DSK_INT8_GEMV=0 take the Triton path; every path gives
    the Triton op's bits."""
    import importlib

    _needs_gemv(monkeypatch)
    a = torch.randint(-127, 128, (4, 4096 + 32), dtype=torch.int8, device="cuda")
    b = torch.randint(-127, 128, (300, 4096 + 32), dtype=torch.int8, device="cuda")
    sa, sb = torch.rand(4, 1, device="cuda"), torch.rand(300, device="cuda")
    assert dk.explain("int8_matmul", a, b, sa, sb).startswith("cuda: deepseek_kernels._C int8_gemv")
    cases = {"unaligned rows": (a[:, 16:16 + 4095], b[:, 16:16 + 4095]),  # K 4095
             "K off 16": (a[:, :4090], b[:, :4090]),
             "unaligned start": (a[:, 8:8 + 4096], b[:, 8:8 + 4096]),
             "aligned view": (a[:, 16:16 + 4096], b[:, 16:16 + 4096])}
    for name, (av, bv) in cases.items():
        path = dk.explain("int8_matmul", av, bv, sa, sb)
        assert path.startswith("cuda: deepseek_kernels._C") == (name == "aligned view"), (name, path)
        assert torch.equal(dk.int8_matmul(av, bv, sa, sb), OPS.int8_matmul(av, bv, sa, sb, None, torch.bfloat16))
    big = torch.randint(-127, 128, (17, 4096), dtype=torch.int8, device="cuda")
    assert dk.explain("int8_matmul", big, b[:, :4096], torch.rand(17, 1, device="cuda"), sb).startswith("triton")
    bias64 = torch.randn(300, device="cuda", dtype=torch.float64)
    assert dk.explain("int8_matmul", a, b, sa, sb, bias=bias64).startswith("triton")
    assert not _gemv_path(monkeypatch, False)
    assert dk.explain("int8_matmul", a, b, sa, sb).startswith("triton")
    monkeypatch.delenv("DSK_INT8_GEMV")  # unset: the C++ path is the default where it is built
    monkeypatch.setattr(importlib.import_module("deepseek_kernels.ops.int8_matmul"), "_GEMV_EXT", [])
    assert dk.explain("int8_matmul", a, b, sa, sb).startswith("cuda: deepseek_kernels._C int8_gemv")


@pytest.mark.gpu
def test_gemv_ops_reject_bad_input_by_name(monkeypatch):
    _needs_gemv(monkeypatch)
    a = torch.randint(-127, 128, (4, 64), dtype=torch.int8, device="cuda")
    b = torch.randint(-127, 128, (32, 64), dtype=torch.int8, device="cuda")
    sa, sb = torch.rand(4, 1, device="cuda"), torch.rand(32, device="cuda")
    with pytest.raises(ValueError, match="1 to 16 rows"):
        OPS.int8_gemv(torch.zeros(17, 64, dtype=torch.int8, device="cuda"), b, torch.rand(17, device="cuda"), sb, None,
                      torch.bfloat16)
    with pytest.raises(ValueError, match="multiple of 16"):
        OPS.int8_gemv(a[:, :40], b[:, :40], sa, sb, None, torch.bfloat16)
    with pytest.raises(ValueError, match="16-byte aligned"):
        OPS.int8_gemv(a, torch.zeros(32, 80, dtype=torch.int8, device="cuda")[:, 1:65], sa, sb, None, torch.bfloat16)
    with pytest.raises(ValueError, match="a_scale must have shape"):
        OPS.int8_gemv(a, b, torch.rand(5, device="cuda"), sb, None, torch.bfloat16)
    with pytest.raises(ValueError, match="b_scale must be float32"):
        OPS.int8_gemv(a, b, sa, sb.half(), None, torch.bfloat16)
    with pytest.raises(ValueError, match="bias must be a floating-point tensor"):
        OPS.int8_gemv(a, b, sa, sb, torch.rand(31, device="cuda"), torch.bfloat16)
    with pytest.raises(ValueError, match="out_dtype"):
        OPS.int8_gemv(a, b, sa, sb, None, torch.int32)
    with pytest.raises(ValueError, match="a_q must be int8"):
        OPS.int8_gemv(a.float(), b, sa, sb, None, torch.bfloat16)
    x = torch.randn(4, 64, device="cuda")
    with pytest.raises(ValueError, match="smooth must be a floating-point tensor"):
        OPS.int8_linear_gemv(x, b, sb, None, torch.rand(63, device="cuda"))
    with pytest.raises(ValueError, match="weight_scale must be a float32 tensor"):
        OPS.int8_linear_gemv(x, b, sb.double(), None, None)
    with pytest.raises(ValueError, match="K mismatch"):
        OPS.int8_linear_gemv(x[:, :48], b, sb, None, None)


@pytest.mark.gpu
def test_int8_linear_gemv_in_a_cuda_graph(monkeypatch):
    """Eager decode calls take the C++ op; under CUDA-graph capture the Triton kernels run (the faster
    GPU time): replays on fresh inputs give the eager call's bits."""
    _needs_gemv(monkeypatch)
    N, K = 14336, 4096
    w = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8)
    ws = torch.rand(N, device="cuda") * 1e-3
    xs = [torch.randn(2, K, device="cuda", dtype=torch.bfloat16) for _ in range(5)]
    want = [dk.int8_linear(x, w, ws) for x in xs]
    assert dk.explain("int8_linear", xs[0], w, ws).startswith("cuda: deepseek_kernels._C")
    static_x = xs[0].clone()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_out = dk.int8_linear(static_x, w, ws)
        assert dk.explain("int8_linear", static_x, w, ws).startswith("triton")
        from deepseek_kernels import _extension
        assert _extension._C.int8_linear_eager(static_x, w, ws, None, None) is None  # declined: nothing launched
    for x, r in zip(xs, want):
        static_x.copy_(x)
        g.replay()
        assert torch.equal(static_out, r)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16, 300])
def test_int8_linear_backward_on_gpu(M):
    """Gradients through int8_linear on CUDA bf16 (the forward's kernels, the backward's dequantized matmul) match
    the straight-through formula, eager and compiled."""
    torch.manual_seed(0)
    w, ws = rand_i8(512, 256).cuda(), (torch.rand(512) + 0.1).cuda() / 127
    smooth = (torch.rand(256) + 0.5).cuda()
    x = torch.randn(M, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = dk.int8_linear(x, w, ws, smooth=smooth)
    grad = torch.randn_like(y)
    y.backward(grad)
    dx_ref, _ = _straight_through_grads(x, w, ws, None, smooth, grad.float())
    assert torch.allclose(x.grad.double(), dx_ref, rtol=2e-2, atol=2e-2 * dx_ref.abs().max().item())
    eager, x.grad = x.grad.clone(), None
    torch.compile(lambda x: dk.int8_linear(x, w, ws, smooth=smooth), fullgraph=True)(x).backward(grad)
    # inductor fuses the backward's casts and division (bf16 intermediates may round differently): 1 ulp apart
    assert torch.allclose(x.grad.float(), eager.float(), rtol=8e-3, atol=1e-3 * eager.float().abs().max().item())


@pytest.mark.gpu
def test_quantized_model_under_torch_compile_reduce_overhead():
    """quantize_model's layers under torch.compile(mode="reduce-overhead") (inductor + CUDA-graph trees: the one-line
    way to decode without per-call host time) give the eager model's bits on fresh inputs at decode sizes and above.
    Inductor calls the ``int8_linear`` op (opaque: inside, the same kernels as eager, with their programmatic
    dependent launch) rather than tracing the Triton kernels (torch 2.11's inductor drops their launch options)."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256))  # ReLU: exact in any kernel
    model = model.to("cuda", torch.bfloat16)
    quantize_model(model)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True, dynamic=False)
    with torch.no_grad():
        first = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16)
        out, code = run_and_get_code(compiled, first)
        assert "deepseek_kernels.int8_linear" in "".join(code), "inductor's code does not call the int8_linear op"
        assert torch.equal(out, model(first))
        for M in (1, 1, 1, 16, 16, 16, 40):  # repeats: warm-up, recording, then replays of the CUDA graph
            x = torch.randn(M, 256, device="cuda", dtype=torch.bfloat16)
            got = compiled(x).clone()  # a replay's output is overwritten by the next replay
            assert torch.equal(got, model(x)), M
    torch._dynamo.reset()


@pytest.mark.skipif(not hasattr(OPS, "int8_gemv"), reason="the CUDA extension is not built")
def test_eager_entries_decline_cpu_tensors():
    """The pybind11 eager entries return None for CPU operands and for a missing required operand (no GPU needed):
    int8_linear / int8_matmul on the CPU run the reference."""
    from deepseek_kernels import _extension

    x, w, ws = torch.randn(2, 64), torch.randint(-127, 128, (32, 64), dtype=torch.int8), torch.rand(32)
    assert _extension._C.int8_linear_eager(x, w, ws, None, None) is None
    assert not _extension._C.int8_linear_eager_ok(x, w, ws, None, None)
    xq, sa = torch.randint(-127, 128, (2, 64), dtype=torch.int8), torch.rand(2, 1)
    assert _extension._C.int8_gemv_eager(xq, w, sa, ws, None, torch.bfloat16) is None
    assert not _extension._C.int8_gemv_eager_ok(xq, w, sa, ws, None, torch.bfloat16)
    # a missing required operand: None too (the general path then names it)
    assert _extension._C.int8_linear_eager(x, w, None, None, None) is None
    assert _extension._C.int8_gemv_eager(xq, w, None, ws, None, torch.bfloat16) is None


@pytest.mark.skipif(not hasattr(OPS, "int8_gemv"), reason="the CUDA extension is not built")
def test_gemv_ops_have_fake_impls_for_tracing():
    """The C++ decode ops' fake impls (torch.compile / export): output shapes and dtypes, and the
    argument checks of the public functions, on meta tensors (no GPU needed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        a, b = torch.empty(3, 64, dtype=torch.int8), torch.empty(40, 64, dtype=torch.int8)
        out = OPS.int8_gemv(a, b, torch.empty(3, 1), torch.empty(40), None, torch.float16)
        assert out.shape == (3, 40) and out.dtype == torch.float16
        x = torch.empty(2, 64, dtype=torch.bfloat16)
        out = OPS.int8_linear_gemv(x, b, torch.empty(40), torch.empty(40, dtype=torch.bfloat16), None)
        assert out.shape == (2, 40) and out.dtype == torch.bfloat16
        with pytest.raises(ValueError, match="K mismatch"):
            OPS.int8_gemv(a, b[:, :48], torch.empty(3, 1), torch.empty(40), None, torch.float16)
