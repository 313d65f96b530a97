"""Does training with compressed gradients reach the loss of plain DDP?

Trains the same seeded MLP with DistributedDataParallel on CPU ranks (gloo) three times: with
DDP's own fp32 all-reduce, and with ``quantized_allreduce_hook`` in int8 and fp8_e4m3 (error
feedback and stochastic rounding on), on the same data in the same order. Writes the loss curves
(JSON + PNG) and returns the final held-out losses.

    python -m deepseek_kernels.bench.ddp_convergence --out benchmarks/results/cpu

Data: a fixed random "teacher" MLP labels Gaussian inputs into 10 classes (with 10 % label
noise), 16384 training and 4096 held-out examples, generated from a seed, so the task is
learnable but not trivial and every run sees identical data.
"""

import argparse
import gc
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

CONFIGS = {
    "fp32 all-reduce (DDP default)": None,
    "int8 + EF": "int8",
    "fp8_e4m3 + EF": "fp8_e4m3",
}
DIM, HIDDEN, CLASSES = 32, 256, 10


def make_data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    teacher = [torch.randn(DIM, 64, generator=g) / DIM**0.5, torch.randn(64, CLASSES, generator=g) / 8]
    x = torch.randn(16384 + 4096, DIM, generator=g)
    logits = torch.tanh(x @ teacher[0]) @ teacher[1] * 6
    y = logits.argmax(1)
    noisy = torch.rand(len(y), generator=g) < 0.1
    y[noisy] = torch.randint(0, CLASSES, (int(noisy.sum()),), generator=g)
    return (x[:16384], y[:16384]), (x[16384:], y[16384:])


def make_model(seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(DIM, HIDDEN), torch.nn.GELU(),
        torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.GELU(),
        torch.nn.Linear(HIDDEN, CLASSES),
    )


def _train_rank(rank: int, world: int, port: int, fmt, steps: int, batch: int, result_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        from deepseek_kernels.distributed import register_quantized_comm_hook

        (xtr, ytr), (xte, yte) = make_data()
        model = DDP(make_model(), bucket_cap_mb=0.25)
        state = None
        if fmt is not None:
            state = register_quantized_comm_hook(model, fmt=fmt, block=128, stochastic=True, error_feedback=True, seed=11)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
        order = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(5))
        losses = []
        for step in range(steps):
            start = (step * batch * world) % (len(xtr) - batch * world)
            idx = order[start + rank * batch: start + (rank + 1) * batch]
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            losses.append(mean_loss.item() / world)
        with torch.no_grad():
            test_logits = model.module(xte)
            test_loss = F.cross_entropy(test_logits, yte).item()
            test_acc = (test_logits.argmax(1) == yte).float().mean().item()
        if rank == 0:
            out = {"train_loss": losses, "test_loss": test_loss, "test_acc": test_acc}
            if state is not None:
                out["bytes_sent"] = state.bytes_sent
                out["fp32_allreduce_bytes"] = state.fp32_allreduce_bytes
                out["compression_ratio"] = state.compression_ratio()
                out["residual_bytes"] = state.residual_bytes()
                out["nonfinite"] = state.check_nonfinite()
            Path(result_path).write_text(json.dumps(out))
        # Free the DDP reducer (it holds the Python hook) while the process group is alive: left
        # to interpreter shutdown its teardown sometimes aborted the process (seen with gloo).
        del model, opt, state
        gc.collect()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(steps: int = 300, world: int = 2, batch: int = 64, configs=None, progress: bool = True) -> dict:
    """Trains every config; returns {name: {train_loss: [...], test_loss, test_acc, ...}}."""
    configs = configs or CONFIGS
    results = {}
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, fmt) in enumerate(configs.items()):
            t0 = time.time()
            path = os.path.join(tmp, f"{i}.json")
            mp.spawn(_train_rank, args=(world, _free_port(), fmt, steps, batch, path), nprocs=world, join=True)
            results[name] = json.loads(Path(path).read_text())
            results[name]["seconds"] = time.time() - t0
            if progress:
                r = results[name]
                print(f"  {name:<30} test loss {r['test_loss']:.4f}  acc {r['test_acc']:.3f}  ({r['seconds']:.0f} s)",
                      flush=True)
    return results


def plot(results: dict, path: Path, steps: int, world: int) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax, dax) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    k = 10  # moving average over k steps
    base = torch.tensor(next(iter(results.values()))["train_loss"])
    for name, r in results.items():
        loss = torch.tensor(r["train_loss"])
        smooth = torch.nn.functional.avg_pool1d(loss.view(1, 1, -1), k, 1).view(-1)
        ax.plot(range(k - 1, len(loss)), smooth.numpy(), label=f"{name}: test loss {r['test_loss']:.4f}")
        dax.plot(range(len(loss)), (loss - base).numpy(), lw=0.8, label=name)
    ax.set_ylabel(f"train loss\n(mean over ranks, {k}-step avg)")
    ax.set_title(f"DDP on {world} gloo ranks, MLP on teacher-labelled data, {steps} steps", fontsize=10)
    ax.legend(fontsize=8)
    dax.set_ylabel("train loss minus\nfp32 all-reduce's")
    dax.set_xlabel("step")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/cpu")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--world", type=int, default=2)
    args = p.parse_args(argv)
    print(f"training {len(CONFIGS)} configs on {args.world} gloo ranks for {args.steps} steps")
    results = run(args.steps, args.world)
    base = results["fp32 all-reduce (DDP default)"]["test_loss"]
    for name, r in results.items():
        r["test_loss_vs_fp32"] = r["test_loss"] / base - 1
        print(f"  {name:<30} {100 * r['test_loss_vs_fp32']:+.2f} % test loss vs fp32")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ddp_convergence.json").write_text(json.dumps(
        {"steps": args.steps, "world": args.world, "torch": torch.__version__, "results": results}, indent=1) + "\n")
    if plot(results, out / "ddp_convergence.png", args.steps, args.world):
        print(f"wrote {out / 'ddp_convergence.json'} and {out / 'ddp_convergence.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
