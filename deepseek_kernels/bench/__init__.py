"""The shared benchmark harness (``deepseek-kernels bench``).

Every suite times our kernel and the baseline a user would use instead in the same process,
reports ms, GB/s or TFLOP/s, the share of the ceiling measured in the same run and the speedup,
and writes ``<out>/<suite>.json`` (with GPU clocks, power, temperature, versions and the git
commit) and ``<out>/<suite>.png`` (plus ``<out>/<suite>_scaling.png`` from a suite's ``plot(path, rows)``,
when it has one). Without a CUDA GPU it runs the accuracy checks only.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

from deepseek_kernels.bench import harness, report
from deepseek_kernels.bench.harness import Case, Impl, run_case
from deepseek_kernels.bench.suites import SUITES

__all__ = ["Case", "Impl", "SUITES", "run_case", "run_suites", "select_cases"]


def _accuracy_table(rows: list[dict]) -> str:
    lines = [f"  {'case':<34} {'path':<12} {'matches ref':<17} rel error (see suite)"]
    for r in rows:
        lines.append(
            f"  {r['case']:<34} {r['path']:<12} {str(r['matches_reference']):<17} {r['roundtrip_rel_error']:.2e}"
        )
    return "\n".join(lines)


def select_cases(cases: list[Case], pattern: "re.Pattern | str") -> list[Case]:
    """The cases whose name the regular expression matches anywhere (``re.search``), in order."""
    pattern = re.compile(pattern) if isinstance(pattern, str) else pattern
    return [c for c in cases if pattern.search(c.name)]


def _print_row_notes(title: str, rows: list[dict], notes) -> None:
    """Prints ``title`` and one line per row for which ``notes(row)`` lists something."""
    noted = [(r["case"], notes(r)) for r in rows]
    noted = [(case, lines) for case, lines in noted if lines]
    if noted:
        print(title)
        for case, lines in noted:
            print(f"  {case}: " + "; ".join(lines))


def run_suites(names: list[str] | None = None, *, out: str | None = None, quick: bool = False,
               reps: int = 30, make_plot: bool = True, case_filter: str | None = None) -> int:
    """Runs the named suites (all when None). Returns a process exit code. ``case_filter``: a regular
    expression; only the cases whose name it matches (``re.search``) are timed."""
    names = names or list(SUITES)
    try:
        pattern = re.compile(case_filter) if case_filter else None
    except re.error as e:
        print(f"--filter {case_filter!r} is not a valid regular expression: {e}", file=sys.stderr)
        return 2
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        print(f"unknown suite(s) {unknown}; available: {sorted(SUITES)}", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    out_dir = Path(out) if out else Path("benchmarks") / "results" / harness.gpu_slug()
    failed = False
    for name in names:
        suite = SUITES[name]
        print(f"== {name}: accuracy on {device} (op vs reference, small odd shapes)")
        acc = suite.accuracy(device)
        print(_accuracy_table(acc))
        if not all(r["matches_reference"] for r in acc):
            print(f"!! {name}: some cases differ from the reference", file=sys.stderr)
            failed = True
        summary = suite.summary() if hasattr(suite, "summary") else None
        if summary is not None:
            print(f"== {name}: summary\n{summary['text']}")
        if not cuda:
            print(f"== {name}: timing needs a CUDA GPU; none is visible here, so only accuracy was checked.")
            continue
        from tqdm.auto import tqdm

        telemetry_before = harness.gpu_telemetry()
        host_before = harness.host_probe()
        ceilings = {"copy_bytes_per_s": harness.measure_copy_bandwidth()}
        print(f"== {name}: measured copy bandwidth {ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s; host probe "
              f"{host_before} (eager rows are host-bound: see harness.host_probe)")
        rows = []
        cases = suite.cases(quick=quick)
        if pattern is not None:
            cases = select_cases(cases, pattern)
            print(f"== {name}: {len(cases)} case(s) match --filter {case_filter!r}")
        errors = []
        for case in tqdm(cases, desc=name, unit="case", file=sys.stdout):
            try:
                rows.append(run_case(case, ceilings, reps=reps))
            except Exception as e:  # one broken case must not cost the timings of the others
                errors.append(f"{case.name}: {type(e).__name__}: {e}")
                rows.append({"case": f"{case.name} (FAILED)", **case.params, "error": errors[-1]})
            torch.cuda.empty_cache()
        telemetry_after = harness.gpu_telemetry()
        host_after = harness.host_probe()
        print(f"\n{suite.TITLE}  ({torch.cuda.get_device_name(0)}; host probe after: {host_after})")
        print(report.format_table(rows))
        _print_row_notes("clock limits at the end of timing rounds (NVML; the times of those rounds ran slower "
                         "clocks):", rows, harness.clock_limited_rounds)
        _print_row_notes("SM clock during the timing rounds (min/mean per round, NVML sampled every 2 ms):", rows,
                         harness.round_clock_summary)
        if errors:
            failed = True
            print(f"!! {name}: {len(errors)} case(s) failed (their rows carry the error):\n  "
                  + "\n  ".join(e.splitlines()[0][:300] for e in errors), file=sys.stderr)
        payload = {
            "suite": name,
            "title": suite.TITLE,
            "quick": quick,
            "case_filter": case_filter,
            "environment": harness.environment(),
            "gpu_telemetry": {"before": telemetry_before, "after": telemetry_after},
            "host_probe": {"before": host_before, "after": host_after},
            "ceilings": ceilings,
            "accuracy": acc,
            "summary": summary,
            "rows": rows,
        }
        if hasattr(suite, "scaling"):
            payload["scaling"] = suite.scaling(rows)
        json_path = out_dir / f"{name}.json"
        report.write_json(json_path, payload)
        print(f"wrote {json_path}")
        if make_plot and report.plot(out_dir / f"{name}.png", f"{suite.TITLE} ({torch.cuda.get_device_name(0)})", rows, ceilings):
            print(f"wrote {out_dir / f'{name}.png'}")
        # a suite may draw its own figure beside the JSON (plot(path, rows) -> bool)
        if make_plot and hasattr(suite, "plot") and suite.plot(out_dir / f"{name}_scaling.png", rows):
            print(f"wrote {out_dir / f'{name}_scaling.png'}")
    return 1 if failed else 0
