"""Oracle steps/s of scripts/generate_ogbench_dataset.py with 1, 2, ... workers (a benchmark, not a test).

Workers are started and warmed up (env built) before the clock starts, so the numbers are the steady-state
generation rate that dominates a full run; the projections assume that rate for the official play sizes.

  python bench/bench_generate.py --env cube-double-play --workers 1 2 --episodes-per-worker 4
"""

import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass, field

import tyro

# An importable module (spawned workers unpickle init_worker/run_episode by module name; they inherit sys.path).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import generate_ogbench_dataset as gen  # noqa: E402


@dataclass
class Args:
    env: str = "cube-double-play"
    """cube-{single,double,triple,quadruple}-play"""
    workers: list[int] = field(default_factory=lambda: [1, 2])
    """worker counts to compare"""
    episodes_per_worker: int = 4
    """timed play episodes per worker"""
    episode_length: int = 1001
    """steps per episode (official: 1001)"""


def warm(_):
    return os.getpid()


def timed_episode(episode):
    """One episode plus the CPU seconds it took: steps per CPU-second does not depend on other load."""
    t = time.process_time()
    ep = gen.run_episode(episode)
    return ep, time.process_time() - t


if __name__ == "__main__":
    args = tyro.cli(Args)
    size = args.env.removeprefix("cube-").removesuffix("-v0").removesuffix("-play")
    cfg = dict(size=size, kind="play", task=None, length=args.episode_length, seed=0, noise=0.1, noise_smoothing=0.5)
    rates, cpu_rates = {}, {}
    for w in args.workers:
        with mp.get_context("spawn").Pool(w, initializer=gen.init_worker, initargs=(cfg,)) as pool:
            pool.map(warm, range(w), chunksize=1)  # every worker has built its env before the clock starts
            episodes = w * args.episodes_per_worker
            start, parent_cpu = time.time(), time.process_time()
            steps, worker_cpu = 0, 0.0
            for ep, cpu in pool.imap_unordered(timed_episode, range(episodes)):
                steps += len(ep["actions"])
                worker_cpu += cpu
            wall, parent_cpu = time.time() - start, time.process_time() - parent_cpu
        rates[w], cpu_rates[w] = steps / wall, steps / worker_cpu
        print(
            f"{w} worker(s): {steps} steps in {wall:.1f} s = {rates[w]:.0f} steps/s wall; "
            f"{cpu_rates[w]:.0f} steps per worker CPU-second; parent CPU {parent_cpu:.2f} s",
            flush=True,
        )
    base = min(rates)
    print(
        f"cores: {gen.num_cores()}, load average (1 min) at the end: {os.getloadavg()[0]:.1f} "
        "(above the core count, other processes share the cores and wall rates understate the scaling)"
    )
    for w in rates:
        print(
            f"speedup {w} vs {base} worker(s): wall {rates[w] / rates[base]:.2f}x, "
            f"ideal on {w} free cores {w * cpu_rates[w] / cpu_rates[base]:.2f}x"
        )
    for name, episodes in (("cube-double-play-v0", 1100), ("cube-triple-play-v0", 3300)):
        steps = episodes * 1001
        cores = gen.num_cores()
        print(
            f"projected {name} ({steps / 1e6:.1f}M steps): {steps / (cpu_rates[base] * cores) / 60:.0f} min on "
            f"{cores} free cores; {steps / max(rates.values()) / 60:.0f} min at this run's best wall rate"
        )
