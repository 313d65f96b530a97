"""The hierarchical bench suite's scaling figure (time per token vs log2 S) from synthetic rows:
no GPU needed."""

import pytest

from deepseek_kernels.bench.suites import hierarchical as suite


def _rows():
    rows = []
    for S in (524288, 8192, 32768, 131072):  # out of order on purpose
        for p, per_tok in (("fwd", 1e-5), ("fwd+bwd", 3e-5)):
            for hkv in (32, 8):
                rows.append({"S": S, "B": 1, "Hq": 32, "Hkv": hkv, "pass": p, "baseline": "window",
                             "ours_ms": per_tok * S * (1 + S / 2**20), "baseline_ms": per_tok * S})
            rows.append({"S": S, "B": 1, "Hq": 32, "Hkv": 32, "pass": p, "baseline": "sdpa",
                         "ours_ms": 1.0, "baseline_ms": 9.0})
        rows.append({"S": S, "W": 4096, "Hq": 32, "Hkv": 8, "pass": "decode", "baseline": "window",
                     "ours_ms": 0.02, "baseline_ms": 0.015})
        rows.append({"S": S, "W": 4096, "Hq": 32, "Hkv": 8, "pass": "decode", "baseline": "window",
                     "graph": True, "ours_ms": 0.01, "baseline_ms": 0.008})
    return rows


def test_scaling_is_per_token_and_sorted():
    d = suite.scaling(_rows())
    assert set(d) == {"fwd", "fwd+bwd", "decode", "decode (graphed)"}
    assert d["fwd"]["S"] == [8192, 32768, 131072, 524288]  # GQA and SDPA rows left out
    assert d["fwd"]["window_us"] == pytest.approx([1e-2] * 4)
    assert d["fwd+bwd"]["ours_us"][-1] == pytest.approx(3e-2 * 1.5)
    assert d["decode"]["ours_us"] == pytest.approx([20.0] * 4)  # decode: per step, not per context token
    assert d["decode (graphed)"]["window_us"] == pytest.approx([8.0] * 4)  # graphed rows kept apart


def test_scaling_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "hierarchical_scaling.png"
    assert suite.plot(path, _rows())
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not suite.plot(tmp_path / "none.png", [])
