"""Per-chunk inference latency of the DBP generator at batch 1 (one forward pass = one action chunk, 1 NFE), and the
time of one training step at --batch-size.

Times Policy(obs_hist, z) -> chunk (normalization + generator + unnormalization + clip), as in evaluation,
for the MLP and U-Net backbones with untrained weights of the script's default sizes (latency does not
depend on the weights). Reports the median and the 10/90th percentiles over --iters calls after warmup.
Training: dbp_bc.update (drift loss over G = 4 hypotheses per observation, backward, clipping, AdamW) on random
normalized batches of --batch-size observations, the best of 3 blocks of --train-iters steps (0: skip).

  python bench/bench_dbp.py                       # CPU, default sizes, cube-single dims (obs 28, action 5)
  python bench/bench_dbp.py --device cuda --out bench/results/dbp_cuda.json   # where a GPU is available
"""

import os
import shlex
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dbp_bc  # noqa: E402  (importable once the repository root is on sys.path)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402  (bench/ on sys.path)


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
    num_layers: int = 3
    """MLP hidden layers (dbp_bc.py default)"""
    unet_dims: tuple[int, ...] = (512, 1024, 2048)
    """U-Net widths (dbp_bc.py's default, the authors' code)"""
    extra_unet_dims: tuple[int, ...] = (64, 128, 256)
    """a second, small U-Net size to time (CPU-sized runs); empty to skip"""
    warmup: int = 20
    """untimed calls first"""
    iters: int = 300
    """timed calls"""
    batch_size: int = 64
    """observations per training step (dbp_bc.py's default)"""
    train_iters: int = 20
    """timed training steps per block (0: no training rows)"""
    out: str | None = None
    """also write the rows as JSON to this path (with the machine: GPU name, versions)"""


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


def time_train_step(gen, args, device, blocks: int = 3) -> float:
    """ms per dbp_bc.update step (the script's defaults: loss flags, lr, clipping), the best of `blocks` blocks."""
    a = dbp_bc.Args()
    opt = torch.optim.AdamW(gen.parameters(), weight_decay=a.weight_decay)  # as dbp_bc.build
    obs = torch.randn(args.batch_size, args.obs_horizon, args.obs_dim, device=device)  # [B, To, O]
    chunk = torch.rand(args.batch_size, args.pred_horizon, args.action_dim, device=device) * 2 - 1  # [B, Tp, A]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        return dbp_bc.update(gen, opt, obs, chunk, a.lr, a)

    for _ in range(3):  # warm-up: AdamW's state, cuDNN's choices
        step()
    best = float("inf")
    for _ in range(blocks):
        sync()
        t0 = time.perf_counter()
        for _ in range(args.train_iters):
            loss = step()[0]
        loss.item()  # the block's last step has finished (a device sync)
        best = min(best, (time.perf_counter() - t0) / args.train_iters)
    return best * 1e3


if __name__ == "__main__":
    args = tyro.cli(Args)
    torch.set_num_threads(args.num_threads)
    device = torch.device(args.device)
    stats = {
        "obs_offset": torch.zeros(args.obs_dim),
        "obs_scale": torch.ones(args.obs_dim),
        "action_offset": torch.zeros(args.action_dim),
        "action_scale": torch.ones(args.action_dim),
    }
    common = dict(
        obs_dim=args.obs_dim, action_dim=args.action_dim, obs_horizon=args.obs_horizon, pred_horizon=args.pred_horizon
    )
    configs = [
        ("mlp", dict(hidden_dim=args.hidden_dim, num_layers=args.num_layers)),
        ("unet", dict(down_dims=list(args.unet_dims))),
    ]
    if args.extra_unet_dims:
        configs.append(("unet", dict(down_dims=list(args.extra_unet_dims))))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device {device}, {args.num_threads} thread(s), load average {load:.2f}, torch {torch.__version__}")
    print(
        f"{'backbone':<28} {'params':>10} {'median ms':>10} {'p10 ms':>8} {'p90 ms':>8} {'chunks/s':>9} "
        f"{'train ms':>9} (batch {args.batch_size})"
    )
    here = os.path.relpath(os.path.abspath(__file__), os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    results = {
        "command": "python " + shlex.join([here] + sys.argv[1:]),
        "device": str(device),
        "machine": machine.info(device.type),
        "batch_size": args.batch_size,
        "rows": [],
    }
    for backbone, kw in configs:
        gen = dbp_bc.make_generator(backbone, **common, **kw).to(device).eval()
        policy = dbp_bc.Policy(gen, stats, -torch.ones(args.action_dim), torch.ones(args.action_dim)).to(device)
        med, p10, p90 = time_policy(policy, args, device)
        name = backbone + ("" if backbone == "mlp" else " " + "-".join(str(d) for d in kw["down_dims"]))
        params = sum(p.numel() for p in gen.parameters())
        train_ms = time_train_step(gen.train(), args, device) if args.train_iters > 0 else float("nan")
        print(f"{name:<28} {params:>10} {med:>10.3f} {p10:>8.3f} {p90:>8.3f} {1e3 / med:>9.0f} {train_ms:>9.2f}")
        results["rows"].append(
            {
                "backbone": name,
                "params": params,
                "act_ms_median": med,
                "act_ms_p10": p10,
                "act_ms_p90": p90,
                "train_ms_per_step": train_ms,
            }
        )
        if args.out:
            machine.save_json(results, args.out)
