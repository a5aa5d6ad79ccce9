"""Robomimic camera rendering: the time to render one state's cameras, per task, as
scripts/render_robomimic_images.py does it (set a simulator state, forward, render each camera upright), on one
core (a benchmark, not a test). Wall times depend on other load; CPU times much less so: both are saved.

The states are the env's own after a seeded reset and random actions, not a file's (none is needed). MuJoCo renders
with the EGL of the machine (Mesa's llvmpipe on a CPU-only machine, a GPU's driver elsewhere).

  python bench/bench_render.py --out bench/results/render_cpu.json
"""

import os

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402  (bench/, above)
from bench_robomimic import gen  # noqa: E402  (scripts/generate_robomimic_dataset.py, loaded there)

from robomimic_tasks import ROBOMIMIC_TASKS, RobomimicEnv  # noqa: E402  (the repository root, above)


@dataclass
class Args:
    tasks: list[str] = field(default_factory=lambda: list(ROBOMIMIC_TASKS))
    """robomimic tasks, each rendered with its image id's cameras and size (<task>-ph-image)"""
    states: int = 30
    """timed states per task (after one untimed warm-up)"""
    out: str | None = None
    """a JSON file for the rows, the machine and this command"""


def make_env(task: str) -> RobomimicEnv:
    """The task's image env, from the env_args our generator writes (two arms: opposed, as robomimic's transport)."""
    args, spec = gen.make_env_args("lift", 400), ROBOMIMIC_TASKS[task]
    kw = {k: v for k, v in args["env_kwargs"].items() if k != "horizon"}
    if spec.arms == 2:
        kw.update(robots=["Panda", "Panda"], env_configuration="single-arm-opposed")
    return RobomimicEnv(f"{task}-ph-image", {**args, "env_name": spec.env, "env_kwargs": kw})


def main():
    a = tyro.cli(Args)
    rows = []
    for task in a.tasks:
        env = make_env(task)
        env.reset(seed=0)
        rng, sim = np.random.default_rng(0), env.env.sim
        states = []
        for _ in range(a.states + 1):  # states the env visits under random actions
            env.step(rng.uniform(-1, 1, env.action_space.shape).astype(np.float32))
            states.append(sim.get_state().flatten())
        sim.set_state_from_flattened(states[0])
        env.render_cameras()  # warm-up: the renderer's context and buffers
        wall, cpu = time.perf_counter(), time.process_time()
        for state in states[1:]:
            sim.set_state_from_flattened(state)
            frames = env.render_cameras()  # [C, H, W, 3]
        wall, cpu = (time.perf_counter() - wall) / a.states, (time.process_time() - cpu) / a.states
        assert frames.any(), f"{task}: the renderer returned black frames"
        layout = env.image_layout
        row = dict(
            task=task,
            cameras=layout["cameras"],
            size=[layout["height"], layout["width"]],
            wall_ms=1e3 * wall,
            cpu_ms=1e3 * cpu,
            cpu_ms_per_frame=1e3 * cpu / len(frames),
        )
        env.env.close()  # its renderer's context: a later task's renders would otherwise come back empty
        rows.append(row)
        print(
            f"{task}: {len(frames)} cameras at {layout['height']}x{layout['width']}: {row['wall_ms']:.0f} ms wall, "
            f"{row['cpu_ms']:.0f} ms CPU per state ({row['cpu_ms_per_frame']:.0f} ms CPU per frame)",
            flush=True,
        )
    load = os.getloadavg()[0]
    print(f"load average (1 min) at the end: {load:.1f} on {os.cpu_count()} cores")
    if a.out:
        command = "python bench/bench_render.py " + " ".join(sys.argv[1:])
        result = dict(command=command.strip(), config=asdict(a), machine=machine.info(), load_average=load, rows=rows)
        machine.save_json(result, a.out)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
