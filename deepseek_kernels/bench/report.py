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
    """Bar chart of ours vs baseline (GB/s or TFLOP/s) with the measured ceiling. False when
    matplotlib is unavailable or there is nothing to plot (a ``--filter`` that matched no case)."""
    if not rows:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    bandwidth = all("ours_gbps" in r for r in rows)
    key, unit = ("gbps", "GB/s") if bandwidth else ("tflops", "TFLOP/s")
    names = [r["case"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows) + 2), 5))
    xs = range(len(rows))
    w = 0.38
    ax.bar([x - w / 2 for x in xs], [r.get(f"ours_{key}", 0) for r in rows], w, label="deepseek_kernels")
    ax.bar([x + w / 2 for x in xs], [r.get(f"baseline_{key}", 0) for r in rows], w,
           label=rows[0].get("baseline_impl", "baseline") if rows else "baseline")
    ceiling = ceilings.get("copy_bytes_per_s", 0) / 1e9 if bandwidth else ceilings.get("bf16_flops_per_s", 0) / 1e12
    if ceiling:
        ax.axhline(ceiling, color="k", ls="--", lw=1, label=f"measured {'copy' if bandwidth else 'bf16 mm'} ceiling")
    for x, r in zip(xs, rows):
        if "speedup" in r:
            ax.text(x, r.get(f"ours_{key}", 0), f"{r['speedup']:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(unit)
    ax.set_title(title, fontsize=10)
    ax.set_ylim(0, max(ceiling, *(r.get(f"ours_{key}", 0) for r in rows), *(r.get(f"baseline_{key}", 0) for r in rows)) * 1.12)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
