"""Cost of the drift loss next to the policy network it trains, measured in one run.

For each shape, times forward+backward of `drift_field.drift_loss` (and of the Gaussian
`mean_shift_field` drift) and of a 4x512 GELU MLP on the same number of rows (B * Cg generated
samples), and reports the ratio. The target is a drift loss that costs at most 10% of the MLP step.
Peak memory is the largest amount allocated during one step above what was allocated before it
(CUDA: the allocator's peak; CPU: the running sum of the profiler's allocation events).

    python bench/bench_drift_field.py                 # CPU, and CUDA when present
    python bench/bench_drift_field.py --device cpu --iters 50 --threads 1
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import drift_field  # noqa: E402

SHAPES = [  # (label, B, Cg, Cp, S)
    ("DFP offline  (pos = data chunk)", 256, 8, 1, 25),
    ("DFP online   (pos = top-4)", 256, 8, 4, 25),
    ("DBP chunk    (Tp=16 x da=2)", 256, 8, 1, 32),
]


def mlp(in_dim: int, out_dim: int, hidden: int = 512, layers: int = 4) -> torch.nn.Module:
    mods, d = [], in_dim
    for _ in range(layers):
        mods += [torch.nn.Linear(d, hidden), torch.nn.GELU()]
        d = hidden
    return torch.nn.Sequential(*mods, torch.nn.Linear(d, out_dim))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_step(fn, device: torch.device, iters: int, warmup: int = 5) -> float:
    """Median wall time of fn() in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return 1e3 * sorted(times)[len(times) // 2]


def peak_memory_mb(fn, device: torch.device) -> float:
    """Peak extra memory of one fn() call, in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Allocation (+) and free (-) events in time order: the running sum's maximum is the peak.
    events = sorted((e for e in prof.events() if e.cpu_memory_usage != 0), key=lambda e: e.time_range.start)
    running = peak = 0
    for e in events:
        running += e.cpu_memory_usage
        peak = max(peak, running)
    return peak / 2**20


def run(device: torch.device, iters: int) -> None:
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"\n## device: {device} ({what}), torch {torch.__version__}")
    print(
        "| shape | B x Cg x Cp x S | drift_loss ms | gaussian field ms | MLP 4x512 ms | drift / MLP | drift peak MiB "
        "| MLP peak MiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label, B, Cg, Cp, S in SHAPES:
        obs_dim = 46  # cube-triple observation; the MLP maps concat(s, eps) -> action chunk
        net = mlp(obs_dim + S, S).to(device)
        state = torch.randn(B * Cg, obs_dim + S, device=device)
        gen_leaf = torch.randn(B, Cg, S, device=device, requires_grad=True)  # stands in for the MLP output
        pos = torch.randn(B, Cp, S, device=device)

        def drift_step(gen_leaf=gen_leaf, pos=pos):  # this shape's tensors, bound now
            loss, _ = drift_field.drift_loss(gen_leaf, pos)
            loss.mean().backward()

        def gaussian_step(x=gen_leaf, pos=pos):
            v = drift_field.mean_shift_field(x.detach(), pos, x.detach(), bandwidth=1.0)
            ((x - (x + v).detach()) ** 2).mean().backward()

        def mlp_step(net=net, state=state):
            net(state).pow(2).mean().backward()

        t_drift = time_step(drift_step, device, iters)
        t_gauss = time_step(gaussian_step, device, iters)
        t_mlp = time_step(mlp_step, device, iters)
        m_drift, m_mlp = peak_memory_mb(drift_step, device), peak_memory_mb(mlp_step, device)
        print(
            f"| {label} | {B}x{Cg}x{Cp}x{S} | {t_drift:.2f} | {t_gauss:.2f} | {t_mlp:.2f} | {t_drift / t_mlp:.1%} "
            f"| {m_drift:.1f} | {m_mlp:.1f} |"
        )


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--device",
        choices=["all", "cpu", "cuda"],
        default="all",
        help="where to measure (all: CPU, and CUDA when present)",
    )
    p.add_argument("--iters", type=int, default=30, help="timed iterations per measurement (median reported)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA device is visible; use --device cpu")
    if args.device in ("all", "cpu"):
        run(torch.device("cpu"), args.iters)
    if args.device == "cuda" or (args.device == "all" and torch.cuda.is_available()):
        run(torch.device("cuda"), args.iters)
