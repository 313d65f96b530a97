"""Result tables, JSON files and plots for benchmark suites."""

from __future__ import annotations

import json
from pathlib import Path


def _fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def format_table(rows: list[dict]) -> str:
    """A fixed-width table: case, ours/baseline ms, GB/s or TFLOP/s, % of ceiling, speedup."""
    header = ("case", "ours ms", "base ms", "ours rate", "base rate", "% ceil", "speedup")
    lines = []
    for r in rows:
        if "ours_gbps" in r:
            rate = lambda role: _fmt(r.get(f"{role}_gbps"), ".0f") + " GB/s"  # noqa: E731
            pct = _fmt(r.get("ours_pct_copy"), ".1f") + " copy"
        else:
            rate = lambda role: _fmt(r.get(f"{role}_tflops"), ".0f") + " TF/s"  # noqa: E731
            pct = _fmt(r.get("ours_pct_mm"), ".1f") + " mm"
        lines.append(
            (
                r["case"],
                _fmt(r.get("ours_ms"), ".4f"),
                _fmt(r.get("baseline_ms"), ".4f"),
                rate("ours"),
                rate("baseline") if "baseline_ms" in r else "-",
                pct,
                _fmt(r.get("speedup"), ".2f") + "x" if "speedup" in r else "-",
            )
        )
    widths = [max(len(str(x[i])) for x in [header, *lines]) for i in range(len(header))]
    out = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(str(v).ljust(w) for v, w in zip(line, widths)) for line in lines]
    return "\n".join(out)


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def plot(path: Path, title: str, rows: list[dict], ceilings: dict) -> bool:
    """Bar chart of ours vs baseline with the measured ceiling: TFLOP/s for compute-bound rows, GB/s for
    bandwidth rows (those with bytes counted), one panel each when a suite has both (the int8 suite: large
    GEMMs and decode GEMVs), the speedup over each pair. False when matplotlib is unavailable or there is
    nothing to plot (a ``--filter`` that matched no case)."""
    if not rows:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = [(key, unit, part) for key, unit, part in (
        ("tflops", "TFLOP/s", [r for r in rows if "ours_gbps" not in r and "ours_tflops" in r]),
        ("gbps", "GB/s", [r for r in rows if "ours_gbps" in r])) if part]
    if not panels:  # rows without a rate: the speedups alone
        panels = [("speedup", "speedup (x)", rows)]
    width = max(6, 1.3 * max(len(part) for _, _, part in panels) + 2)
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, 5 * len(panels)), squeeze=False)
    for ax, (key, unit, part) in zip(axes[:, 0], panels):
        _panel(ax, key, unit, part, ceilings)
    axes[0, 0].set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _panel(ax, key: str, unit: str, rows: list[dict], ceilings: dict) -> None:
    """One panel of :func:`plot`: ours and the baseline per row, the ceiling of the unit as a line."""
    value = (lambda r, role: r.get("speedup", 0) if role == "ours" else 1.0) if key == "speedup" else (
        lambda r, role: r.get(f"{role}_{key}") or 0)
    xs = range(len(rows))
    w = 0.38
    baselines = {r.get("baseline_impl", "baseline") for r in rows}
    ax.bar([x - w / 2 for x in xs], [value(r, "ours") for r in rows], w, label="deepseek_kernels")
    ax.bar([x + w / 2 for x in xs], [value(r, "baseline") for r in rows], w,
           label=baselines.pop() if len(baselines) == 1 else "baseline (named in each case)")
    ceiling = {"gbps": ceilings.get("copy_bytes_per_s", 0) / 1e9,
               "tflops": ceilings.get("bf16_flops_per_s", 0) / 1e12}.get(key, 0)
    if ceiling:
        ax.axhline(ceiling, color="k", ls="--", lw=1, label=f"measured {'copy' if key == 'gbps' else 'bf16 mm'} ceiling")
    for x, r in zip(xs, rows):
        if "speedup" in r:
            ax.text(x, value(r, "ours"), f"{r['speedup']:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r["case"] for r in rows], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(unit)
    top = max([ceiling] + [value(r, role) for r in rows for role in ("ours", "baseline")])
    ax.set_ylim(0, (top or 1) * 1.12)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False)
