"""Training with compressed gradients reaches the loss of plain DDP (2 gloo ranks, seeded)."""

from deepseek_kernels.bench.ddp_convergence import CONFIGS, run


def test_compressed_ddp_matches_fp32_loss():
    results = run(steps=300, world=2, progress=False)
    base = results["fp32 all-reduce (DDP default)"]["test_loss"]
    first = results["fp32 all-reduce (DDP default)"]["train_loss"][0]
    assert base < 0.6 * first  # it did learn
    int8 = results["int8 + EF"]
    fp8 = results["fp8_e4m3 + EF"]
    assert abs(int8["test_loss"] / base - 1) <= 0.01, int8["test_loss"]
    assert abs(fp8["test_loss"] / base - 1) <= 0.02, fp8["test_loss"]
    for r in (int8, fp8):
        assert 0.25 < r["compression_ratio"] < 0.27 and not r["nonfinite"]
    assert set(results) == set(CONFIGS)
