"""Speed of dfp_offline_to_online.py: training updates per second (offline and online phase) and per-action
inference latency at batch 1 (1 NFE, and best-of-N by the critic), on random data of a cube env's shapes.

    python bench/bench_dfp.py                      # default networks (4x512), cube-triple shapes
    python bench/bench_dfp.py --hidden-dim 256 --obs-dim 28 --device cuda
Numbers depend on the machine and on what else runs on it: report them with `uptime`'s load average.
"""
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import dfp_offline_to_online as dfp  # noqa: E402


@dataclass
class BenchArgs:
    obs_dim: int = 46
    """observation dim (cube-single 28, double 37, triple 46, quadruple 55)"""
    act_dim: int = 5
    """per-step action dim"""
    horizon: int = 5
    """action chunk length h"""
    hidden_dim: int = 512
    """network width"""
    num_layers: int = 4
    """hidden layers"""
    batch_size: int = 256
    """training batch size"""
    updates: int = 20
    """timed updates per phase (after 3 warm-up updates)"""
    actions: int = 200
    """timed action selections per inference mode"""
    threads: Optional[int] = None
    """torch CPU threads (default: torch's choice)"""
    device: str = "cpu"
    """cpu or cuda"""


def main():
    b = tyro.cli(BenchArgs)
    if b.threads:
        torch.set_num_threads(b.threads)
    dev = torch.device(b.device)
    args = dfp.Args(horizon=b.horizon, hidden_dim=b.hidden_dim, num_layers=b.num_layers, batch_size=b.batch_size)
    D = b.act_dim * b.horizon
    actor = dfp.Actor(b.obs_dim, D, b.hidden_dim, b.num_layers).to(dev)
    critic = dfp.Critic(b.obs_dim, D, b.hidden_dim, b.num_layers, args.num_critics).to(dev)
    target = dfp.Critic(b.obs_dim, D, b.hidden_dim, b.num_layers, args.num_critics).to(dev)
    ema = dfp.Actor(b.obs_dim, D, b.hidden_dim, b.num_layers).to(dev)
    opt = torch.optim.Adam(list(actor.parameters()) + list(critic.parameters()), lr=args.lr)
    update = dfp.make_update(args, actor, critic, target, ema, opt)

    rng = np.random.default_rng(0)
    n = 10_000
    data = {
        "observations": rng.normal(size=(n, b.obs_dim)).astype(np.float32),
        "next_observations": rng.normal(size=(n, b.obs_dim)).astype(np.float32),
        "actions": rng.uniform(-1, 1, (n, b.act_dim)).astype(np.float32),
        "rewards": -np.ones(n, np.float32),
        "masks": np.ones(n, np.float32),
        "terminals": (np.arange(n) % 1000 == 999).astype(np.float32),
    }

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    print(f"device {dev}, threads {torch.get_num_threads()}, networks {b.num_layers}x{b.hidden_dim}, "
          f"obs {b.obs_dim}, chunk {b.horizon}x{b.act_dim}, batch {b.batch_size}, load average {os.getloadavg()}")
    for online in (False, True):
        for i in range(3 + b.updates):
            if i == 3:
                sync()
                t = time.perf_counter()
            batch = dfp.sample_chunks(data, 0, n, n, rng, b.batch_size, b.horizon, args.discount)
            out = update({k: torch.as_tensor(v, device=dev) for k, v in batch.items()}, online=online)
        out.tolist()  # sync
        dt = (time.perf_counter() - t) / b.updates
        print(f"train {'online ' if online else 'offline'}: {1 / dt:7.2f} updates/s ({dt * 1e3:.1f} ms/update)")

    obs = torch.randn(1, b.obs_dim, device=dev)
    for n_best in (1, 16):
        for i in range(10 + b.actions):
            if i == 10:
                sync()
                t = time.perf_counter()
            a = dfp.best_of_n(actor, critic, obs, n_best)[0].cpu().numpy()
        dt = (time.perf_counter() - t) / b.actions
        print(f"act best-of-{n_best:<2d}: {dt * 1e3:6.2f} ms per chunk ({dt * 1e3 / b.horizon:.2f} ms per env step), "
              f"chunk shape {a.shape}")


if __name__ == "__main__":
    main()
