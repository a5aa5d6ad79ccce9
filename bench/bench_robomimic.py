"""Robomimic env speed: robosuite 1.5 lift / can / square steps/s, and scripted-expert generation steps/s
(a benchmark, not a test). One process, one core.

Env steps use random actions from a seeded reset (episodes are not ended, so no reset is inside the timing);
resets are timed separately (robosuite rebuilds the model at every reset). The generator rate is whole
episodes of scripts/generate_robomimic_dataset.py (its resets included) for the tasks it has an expert for.
Wall rates depend on other load; steps per CPU-second much less so: both are printed.

  python bench/bench_robomimic.py --steps 500 --episodes 4
"""

import os

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import importlib.util
import time
from dataclasses import dataclass, field

import numpy as np
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location(
    "generate_robomimic_dataset", os.path.join(ROOT, "scripts", "generate_robomimic_dataset.py")
)
gen = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gen)


@dataclass
class Args:
    tasks: list[str] = field(default_factory=lambda: ["lift", "can", "square"])
    """robomimic tasks whose env speed to measure"""
    steps: int = 500
    """timed env steps per task"""
    resets: int = 3
    """timed resets per task"""
    episodes: int = 4
    """timed generator episodes per task (lift and can: the tasks with a scripted expert), --kind mh noise mix"""


def timed(fn, *args):
    """(fn(*args), wall seconds, CPU seconds of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def resets(env, n: int) -> list:
    return [env.reset(seed=i) for i in range(n)]


def steps(env, actions: np.ndarray) -> list:
    return [env.step(a) for a in actions]


def episodes(n: int) -> list:
    return [gen.run_episode(i) for i in range(n)]


if __name__ == "__main__":
    args = tyro.cli(Args)
    rng = np.random.default_rng(0)
    for task in args.tasks:
        env_args = gen.make_env_args(task, gen.ROBOMIMIC_TASKS[task][1])
        env, build_wall, _ = timed(gen.RobomimicEnv, f"{task}-mh", env_args)
        _, reset_wall, reset_cpu = timed(resets, env, args.resets)
        actions = rng.uniform(-1, 1, (args.steps, 7))
        _, wall, cpu = timed(steps, env, actions)
        print(
            f"{task}: env steps/s {args.steps / wall:.0f} wall, {args.steps / cpu:.0f} per CPU-second | reset "
            f"{reset_wall / args.resets:.2f} s wall ({reset_cpu / args.resets:.2f} CPU s) | build {build_wall:.1f} s",
            flush=True,
        )
        if task in gen.OBJECT_POS:  # has a scripted expert
            gen.init_worker(dict(task=task, kind="mh", length=gen.ROBOMIMIC_TASKS[task][1], seed=0, noise=None))
            eps, wall, cpu = timed(episodes, args.episodes)
            n_steps = sum(len(e["actions"]) for e in eps)
            success = np.mean([bool(e["success"]) for e in eps])
            print(
                f"{task} generator: {n_steps} steps in {args.episodes} episodes, {n_steps / wall:.0f} steps/s wall, "
                f"{n_steps / cpu:.0f} per CPU-second (resets included), success {success:.2f}",
                flush=True,
            )
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.1f} on {gen.num_cores()} cores")
