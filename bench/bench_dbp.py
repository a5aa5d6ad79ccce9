"""Per-chunk inference latency of the DBP generator at batch 1 (one forward pass = one action chunk, 1 NFE).

Times Policy(obs_hist, z) -> chunk (normalization + generator + unnormalization + clip), as in evaluation,
for the MLP and U-Net backbones with untrained weights of the script's default sizes (latency does not
depend on the weights). Reports the median and the 10/90th percentiles over --iters calls after warmup.

  python bench/bench_dbp.py                       # CPU, default sizes, cube-single dims (obs 28, action 5)
  python bench/bench_dbp.py --device cuda         # where a GPU is available
"""

import os
import sys
import time
from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dbp_bc  # noqa: E402


@dataclass
class Args:
    device: str = "cpu"
    """cpu or cuda"""
    num_threads: int = 1
    """torch CPU threads"""
    obs_dim: int = 28
    """observation dim (cube-single: 28)"""
    action_dim: int = 5
    """action dim"""
    obs_horizon: int = 2
    """To"""
    pred_horizon: int = 16
    """Tp"""
    hidden_dim: int = 512
    """MLP width (dbp_bc.py default)"""
    depth: int = 3
    """MLP depth (dbp_bc.py default)"""
    unet_dims: Tuple[int, ...] = (512, 1024, 2048)
    """U-Net widths (dbp_bc.py's default, the authors' code)"""
    extra_unet_dims: Tuple[int, ...] = (64, 128, 256)
    """a second, small U-Net size to time (CPU-sized runs); empty to skip"""
    warmup: int = 20
    """untimed calls first"""
    iters: int = 300
    """timed calls"""


def time_policy(policy, args, device):
    obs = torch.randn(1, args.obs_horizon, args.obs_dim, device=device)  # [1, To, obs_dim]
    times = []
    for i in range(args.warmup + args.iters):
        z = torch.randn(1, args.pred_horizon, args.action_dim, device=device)  # [1, Tp, da]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        chunk = policy(obs, z)
        if device.type == "cuda":
            torch.cuda.synchronize()
        else:
            chunk.sum().item()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1e3
    return np.percentile(ms, 50), np.percentile(ms, 10), np.percentile(ms, 90)


if __name__ == "__main__":
    args = tyro.cli(Args)
    torch.set_num_threads(args.num_threads)
    device = torch.device(args.device)
    stats = {"obs_offset": torch.zeros(args.obs_dim), "obs_scale": torch.ones(args.obs_dim),
             "action_offset": torch.zeros(args.action_dim), "action_scale": torch.ones(args.action_dim)}
    common = dict(obs_dim=args.obs_dim, action_dim=args.action_dim, obs_horizon=args.obs_horizon, pred_horizon=args.pred_horizon)
    configs = [("mlp", dict(hidden_dim=args.hidden_dim, depth=args.depth)), ("unet", dict(down_dims=list(args.unet_dims)))]
    if args.extra_unet_dims:
        configs.append(("unet", dict(down_dims=list(args.extra_unet_dims))))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device {device}, {args.num_threads} thread(s), load average {load:.2f}, torch {torch.__version__}")
    print(f"{'backbone':<28} {'params':>10} {'median ms':>10} {'p10 ms':>8} {'p90 ms':>8} {'chunks/s':>9}")
    for backbone, kw in configs:
        gen = dbp_bc.make_generator(backbone, **common, **kw).to(device).eval()
        policy = dbp_bc.Policy(gen, stats, -torch.ones(args.action_dim), torch.ones(args.action_dim)).to(device)
        med, p10, p90 = time_policy(policy, args, device)
        name = backbone + ("" if backbone == "mlp" else " " + "-".join(str(d) for d in kw["down_dims"]))
        params = sum(p.numel() for p in gen.parameters())
        print(f"{name:<28} {params:>10} {med:>10.3f} {p10:>8.3f} {p90:>8.3f} {1e3 / med:>9.0f}")
