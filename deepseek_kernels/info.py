"""``deepseek_kernels.info()`` / ``deepseek-kernels info``: versions, GPU, build and op paths."""

from __future__ import annotations

import platform
import sys

import torch


def collect() -> dict:
    """Everything ``info()`` prints, as a dict (also stored in benchmark JSON files)."""
    import deepseek_kernels
    from deepseek_kernels import _extension
    from deepseek_kernels.ops._registry import describe, known_ops

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append(
                {
                    "index": i,
                    "name": p.name,
                    "capability": f"{p.major}.{p.minor}",
                    "sms": p.multi_processor_count,
                    "memory_gib": round(p.total_memory / 2**30, 1),
                }
            )
    device = torch.device("cuda") if gpus else torch.device("cpu")
    paths = {name: describe(name, device) for name in known_ops()}
    from deepseek_kernels.ops._registry import pdl_setting
    from deepseek_kernels.triton import _direct

    launch = {"direct_launch": _direct.enabled(), "programmatic_dependent_launch": pdl_setting()}
    return {
        "deepseek_kernels": deepseek_kernels.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "gpus": gpus,
        "extension": _extension.build_info(),
        "op_paths": paths,
        "launch": launch,
    }


def format_info(d: dict) -> str:
    lines = [
        f"deepseek_kernels {d['deepseek_kernels']}",
        f"  python {d['python']} on {d['platform']}",
        f"  torch {d['torch']} (CUDA {d['torch_cuda']}), triton {d['triton']}",
    ]
    if d["gpus"]:
        for g in d["gpus"]:
            lines.append(
                f"  GPU {g['index']}: {g['name']} (sm_{g['capability'].replace('.', '')}, {g['sms']} SMs, "
                f"{g['memory_gib']} GiB)"
            )
    else:
        lines.append("  GPU: none visible to torch (kernels run on CUDA GPUs; CPU paths use the reference)")
    ext = d["extension"]
    if ext.get("built"):
        lines.append(
            f"  CUDA extension: built for TORCH_CUDA_ARCH_LIST={ext['cuda_arch_list']} "
            f"(CUDA {ext['cuda_version']}, torch {ext['torch_version']})"
        )
    else:
        lines.append(f"  CUDA extension: not available ({ext['reason']})")
    launch = d.get("launch", {})
    if launch:
        on = lambda v: "on" if v else "off"  # noqa: E731
        lines.append(f"  eager launches: repeats through the compiled kernel {on(launch['direct_launch'])} "
                     f"(DSK_DIRECT_LAUNCH), programmatic dependent launches {launch['programmatic_dependent_launch']} "
                     f"(DSK_PDL; Hopper)")
    lines.append("  op paths here:")
    for name, path in d["op_paths"].items():
        lines.append(f"    {name:<24} {path}")
    return "\n".join(lines)


def info(file=None) -> dict:
    """Prints versions, the GPU, how the extension was built and which path each op takes."""
    d = collect()
    print(format_info(d), file=file or sys.stdout)
    return d
