"""Regenerate OGBench cube datasets locally, in the official format (see the README's Data section).

OGBench downloads its datasets on first use; without network access they can be regenerated here,
because the pip package ships the scripted experts that made them (`ogbench.manipspace.oracles`).

  --kind play    the official play recipe: a plan oracle with smoothed noise picks a random top cube and
                 places it at a random spot (or on another cube), then does it again, for 1001 steps.
                 Writes <out-dir>/cube-X-play-v0.npz and cube-X-play-v0-val.npz (+10% episodes), which
                 ogbench.make_env_and_datasets('cube-X-play-singletask-taskN-v0', dataset_path=...) loads.
  --kind expert  demonstrations of singletask task N: each episode starts from the task's own initial
                 state and the same oracle moves the cubes to that task's goal (moving a blocking cube
                 aside first when needed), stopping once solved. Writes cube-X-expert-taskN-v0.npz (+ -val),
                 with the per-episode success in `episode_success`.

Example: python scripts/generate_ogbench_dataset.py --env cube-double-play --workers 8
"""

import os

# One BLAS/OpenMP thread per worker process: the workers are the parallelism (set before numpy loads).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("MUJOCO_GL", "egl")  # headless; nothing is rendered anyway

import hashlib
import json
import multiprocessing as mp
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: envs, runs
from envs import CUBE_PLAY_EPISODES, OGBENCH_DATA_DIR  # noqa: E402
from runs import atomic, check, fail, parse  # noqa: E402


def num_cores() -> int:
    """CPU cores this process may use (respects taskset / container limits where the OS reports them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@dataclass
class Args:
    env: str = "cube-double-play"
    """dataset: cube-single-play, cube-double-play, cube-triple-play or cube-quadruple-play (a full id like
    cube-triple-play-v0 works too)"""
    kind: Literal["play", "expert"] = "play"
    """play: the official play recipe; expert: demonstrations that solve singletask --task"""
    task: int | None = None
    """singletask task 1..5 to demonstrate (only with --kind expert)"""
    episodes: int | None = None
    """training episodes, plus 10% more for the -val file; default: the official size for play (single/double 1000,
    triple 3000, quadruple 5000), 1000 for expert"""
    episode_length: int | None = None
    """steps per episode; default 1001 for play (official); for expert the cap is the task's evaluation horizon
    (single 200, double 500, triple/quadruple 1000), episodes end once solved"""
    workers: int = num_cores()
    """worker processes, one per CPU core by default"""
    seed: int = 0
    """random seed; the files depend on the seed only, not on --workers"""
    out_dir: str = OGBENCH_DATA_DIR
    """output folder (OGBench's default data folder, where the training scripts look)"""
    overwrite: bool = False
    """replace existing output files"""
    resume: bool = True
    """keep finished episodes in a hidden folder in --out-dir, so rerunning an interrupted command continues it;
    --no-resume starts over"""
    noise: float = 0.1
    """oracle plan noise (official play recipe: 0.1)"""
    noise_smoothing: float = 0.5
    """Gaussian smoothing (in steps) of the plan noise (official: 0.5)"""


EVAL_HORIZON = {"single": 200, "double": 500, "triple": 1000, "quadruple": 1000}  # max_episode_steps of cube-X-v0
# Probability that a play target is "on top of another cube", drawn once per episode (official recipe).
P_STACK_RANGE = {"single": (0.0, 0.0), "double": (0.0, 0.25), "triple": (0.05, 0.35), "quadruple": (0.1, 0.5)}
CUBE_SIZE = 0.04  # cube edge (m); also OGBench's success radius around a goal
SUCCESS_RADIUS = 0.04
DTYPES = dict(
    observations=np.float32, actions=np.float32, terminals=bool, qpos=np.float32, qvel=np.float32, episode_success=bool
)  # the dtypes of OGBench's own generator (terminals are stored as bool, the loader casts them)


def check_args(args: Args) -> dict:
    """Validate everything up front and return the run's resolved settings."""
    # Also accepted: a singletask id (cube-double-play-singletask-task2-v0), whose task serves --kind expert.
    m = re.fullmatch(
        r"(?:cube-)?(single|double|triple|quadruple)(?:-play)?(?:-singletask)?(?:-task(\d+))?(?:-v0)?", args.env
    )
    check(
        m is not None, f"unknown --env '{args.env}'; valid: " + ", ".join(f"cube-{s}-play" for s in CUBE_PLAY_EPISODES)
    )
    size = m.group(1)
    if args.kind == "expert":
        task = args.task if args.task is not None else (int(m.group(2)) if m.group(2) else None)
        check(task is not None and 1 <= task <= 5, f"--kind expert needs --task in 1..5, got {task}")
        args.task = task
        name = f"cube-{size}-expert-task{task}-v0"
    else:
        check(args.task is None, "--task only applies to --kind expert (play data serves every task)")
        name = f"cube-{size}-play-v0"
    episodes = (
        args.episodes if args.episodes is not None else (CUBE_PLAY_EPISODES[size] if args.kind == "play" else 1000)
    )
    length = args.episode_length
    if length is None:
        length = 1001 if args.kind == "play" else EVAL_HORIZON[size]
    for flag, value in (("--episodes", episodes), ("--episode-length", length), ("--workers", args.workers)):
        check(value > 0, f"{flag} must be positive, got {value}")
    check(length >= 2, f"--episode-length must be at least 2, got {length}")
    check(args.noise >= 0 and args.noise_smoothing >= 0, "--noise and --noise-smoothing must be non-negative")
    out_dir = os.path.abspath(os.path.expanduser(args.out_dir))
    paths = [os.path.join(out_dir, f"{name}.npz"), os.path.join(out_dir, f"{name}-val.npz")]
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not args.overwrite:
        fail(f"{existing[0]} exists; pass --overwrite to replace it")
    # Last check, because it creates the folder: it must exist and accept a file.
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        fail(f"cannot write to --out-dir {out_dir} ({e.strerror or e}); choose a writable folder")
    val_episodes = max(1, episodes // 10)  # official: num_episodes // 10 extra episodes for validation
    return dict(size=size, name=name, episodes=episodes, val_episodes=val_episodes, length=length, paths=paths)


# ---------------------------------------------------------------------------------------------
# Worker side: one env + oracle per process, one episode per job.
# ---------------------------------------------------------------------------------------------
_W = {}  # this process's env, oracle and settings


def init_worker(cfg: dict) -> None:
    import warnings

    import gymnasium

    # OGBench's spaces are float64 boxes that gymnasium casts to float32, with a warning per env: nothing to act on
    warnings.filterwarnings("ignore", r".*Box (low|high)'s precision lowered by casting to float32")
    import ogbench  # noqa: F401  (registers the cube-*-v0 envs)
    from ogbench.manipspace.oracles.plan.cube_plan import CubePlanOracle

    env = gymnasium.make(
        f"cube-{cfg['size']}-v0", terminate_at_goal=False, mode="data_collection", max_episode_steps=cfg["length"]
    )
    env.reset(seed=0)  # builds the MuJoCo model once
    oracle = CubePlanOracle(env=env, noise=cfg["noise"], noise_smoothing=cfg["noise_smoothing"])
    _W.update(cfg=cfg, env=env, oracle=oracle)
    if cfg["kind"] == "expert":
        env.unwrapped.set_tasks()  # task_infos are only built in task mode; we need the init/goal states
        _W["task_info"] = env.unwrapped.task_infos[cfg["task"] - 1]


def episode_seeds(seed: int, episode: int) -> tuple[int, int]:
    """Per-episode seeds (numpy's global RNG, env RNG): files depend on --seed, not on --workers."""
    a, b = np.random.SeedSequence([seed, episode]).generate_state(2)
    return int(a), int(b)


def run_episode(episode: int) -> dict:
    np_seed, env_seed = episode_seeds(_W["cfg"]["seed"], episode)
    np.random.seed(np_seed)  # the oracle draws its keyframe jitter and plan noise from numpy's global RNG
    if _W["cfg"]["kind"] == "play":
        ep = play_episode(_W["env"], _W["oracle"], _W["cfg"]["size"], env_seed)
    else:
        ep = expert_episode(_W["env"], _W["oracle"], _W["task_info"], _W["cfg"]["length"], env_seed)
    return {k: np.asarray(v, dtype=DTYPES[k]) for k, v in ep.items()}  # compact arrays cross the process pipe


def indexed_episode(episode: int) -> tuple[int, dict]:
    return episode, run_episode(episode)


def play_episode(env, oracle, size: str, env_seed: int) -> dict:
    """The official play recipe: follow the plan; when it is done, set a new random target."""
    ob, info = env.reset(seed=env_seed)  # random arm pose, cube poses and first target
    p_stack = np.random.uniform(*P_STACK_RANGE[size])
    oracle.reset(ob, info)
    obs, actions, terminals, qpos, qvel = [], [], [], [], []
    done = False
    while not done:
        action = np.clip(oracle.select_action(ob, info), -1, 1)
        next_ob, _, terminated, truncated, info = env.step(action)
        done = terminated or truncated  # truncated after --episode-length steps
        if oracle.done:
            agent_ob, agent_info = env.unwrapped.set_new_target(p_stack=p_stack)
            oracle.reset(agent_ob, agent_info)
        obs.append(ob)
        actions.append(action)
        terminals.append(done)
        qpos.append(info["prev_qpos"])  # the state of `ob` (before the action)
        qvel.append(info["prev_qvel"])
        ob = next_ob
    return dict(observations=obs, actions=actions, terminals=terminals, qpos=qpos, qvel=qvel)


def cube_xyzs(u) -> np.ndarray:
    return np.array([u._data.joint(f"object_joint_{i}").qpos[:3] for i in range(u._num_cubes)])  # [n, 3]


def task_solved(u, goals: np.ndarray) -> bool:
    """OGBench's singletask success: every cube within 4 cm of its goal."""
    return bool(np.all(np.linalg.norm(cube_xyzs(u) - goals, axis=-1) <= SUCCESS_RADIUS))


def next_move(xyzs: np.ndarray, goals: np.ndarray, bounds: np.ndarray):
    """Choose the next pick-and-place: (cube, target xyz). Greedy, bottom-up, clearing blockers when stuck."""
    n = len(xyzs)

    def flat(a, b):  # horizontal distance
        return np.linalg.norm(a[:2] - b[:2])

    def on_top(i):  # cubes resting on cube i
        return [j for j in range(n) if j != i and xyzs[j][2] > xyzs[i][2] + 0.02 and flat(xyzs[j], xyzs[i]) < CUBE_SIZE]

    def occupants(p, i):  # cubes other than i sitting where cube i should go
        return [j for j in range(n) if j != i and flat(xyzs[j], p) < CUBE_SIZE and abs(xyzs[j][2] - p[2]) < 0.03]

    def support(p, i):  # for a goal above the table: the cube it would rest on, if any
        below = [
            j for j in range(n) if j != i and flat(xyzs[j], p) < 0.02 and abs(xyzs[j][2] - (p[2] - CUBE_SIZE)) < 0.02
        ]
        return below[0] if below else None

    todo = [i for i in range(n) if np.linalg.norm(xyzs[i] - goals[i]) > SUCCESS_RADIUS]
    for i in sorted(todo, key=lambda i: goals[i][2]):  # bottom of a stack first
        if on_top(i) or occupants(goals[i], i):
            continue
        if goals[i][2] < 0.03:
            return i, goals[i]
        s = support(goals[i], i)
        if s is not None:  # stack on the actual cube below, not on its nominal goal
            return i, np.array([xyzs[s][0], xyzs[s][1], xyzs[s][2] + CUBE_SIZE])

    # Stuck (swap, cycle, a buried cube, an occupied goal): move a blocking cube to a free spot on the table.
    blockers = [j for i in todo for j in on_top(i) + occupants(goals[i], i)] + todo
    for j in blockers:
        while on_top(j):  # take the top of its stack
            j = on_top(j)[0]
        if xyzs[j][2] < 0.03 and j not in todo and not any(j in occupants(goals[i], i) for i in todo):
            continue  # settled on the table and in nobody's way
        keep_clear = np.concatenate([xyzs[:, :2], goals[:, :2]])
        best, best_gap = None, -1.0
        for _ in range(100):
            xy = np.random.uniform(*bounds)
            gap = np.min(np.linalg.norm(keep_clear - xy, axis=-1))
            if gap > best_gap:
                best, best_gap = xy, gap
            if gap > 2 * CUBE_SIZE:
                break
        return j, np.array([best[0], best[1], 0.02])
    return todo[0], goals[todo[0]]  # unreachable in practice


def set_subgoal(u, oracle, goals: np.ndarray) -> None:
    """Point the data-collection target (the oracle's input) at the next move, and replan."""
    from ogbench.manipspace import lie

    cube, xyz = next_move(cube_xyzs(u), goals, u._target_sampling_bounds)
    u._target_block = cube
    for i in range(u._num_cubes):  # as set_new_target does: only the target's mocap is in the scene
        mocap = u._cube_target_mocap_ids[i]
        u._data.mocap_pos[mocap] = xyz if i == cube else (0, 0, -0.3)
        u._data.mocap_quat[mocap] = lie.SO3.identity().wxyz.tolist()  # task goals have yaw 0
    oracle.reset(u.compute_observation(), u.compute_ob_info())


def expert_episode(env, oracle, task_info: dict, max_steps: int, env_seed: int) -> dict:
    """Drive the task's initial state to its goal. The episode ends once the plan is done and the task solved."""
    import mujoco
    from ogbench.manipspace import lie

    u = env.unwrapped
    env.reset(seed=env_seed)  # random arm pose (data-collection mode)
    # Cubes at the task's initial state, with the randomization of task mode: +-1 cm in x,y and a random yaw.
    for i, xyz in enumerate(task_info["init_xyzs"]):
        pos = xyz.copy()
        pos[:2] += u.np_random.uniform(-0.01, 0.01, size=2)
        u._data.joint(f"object_joint_{i}").qpos[:3] = pos
        u._data.joint(f"object_joint_{i}").qpos[3:] = lie.SO3.from_z_radians(u.np_random.uniform(0, 2 * np.pi)).wxyz
    u.pre_step()
    mujoco.mj_forward(u._model, u._data)
    u.post_step()
    goals = task_info["goal_xyzs"]
    ob = u.compute_observation()
    set_subgoal(u, oracle, goals)
    info = u.compute_ob_info()

    obs, actions, terminals, qpos, qvel = [], [], [], [], []
    for t in range(max_steps):
        last = t == max_steps - 1
        if oracle.done:
            if task_solved(u, goals):
                last = True  # `ob` is the solved state: it ends the episode
            else:
                set_subgoal(u, oracle, goals)  # next cube, or a retry after a failed grasp
        action = np.clip(oracle.select_action(ob, info), -1, 1)
        next_ob, _, _, _, info = env.step(action)
        obs.append(ob)
        actions.append(action)
        terminals.append(last)
        qpos.append(info["prev_qpos"])
        qvel.append(info["prev_qvel"])
        if last:
            break
        ob = next_ob
    # Success of the last recorded state (the state of obs[-1], whose qpos is qpos[-1]).
    success = bool(
        np.all(np.linalg.norm(np.asarray(qpos[-1])[14:].reshape(-1, 7)[:, :3] - goals, axis=-1) <= SUCCESS_RADIUS)
    )
    return dict(observations=obs, actions=actions, terminals=terminals, qpos=qpos, qvel=qvel, episode_success=[success])


# ---------------------------------------------------------------------------------------------
# Main side: validate, fan out episodes, gather them in episode order, write atomically.
# ---------------------------------------------------------------------------------------------


def fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


if __name__ == "__main__":
    args = parse(Args)
    run = check_args(args)
    total_episodes = run["episodes"] + run["val_episodes"]
    cfg = dict(
        size=run["size"],
        kind=args.kind,
        task=args.task,
        length=run["length"],
        seed=args.seed,
        noise=args.noise,
        noise_smoothing=args.noise_smoothing,
    )
    workers = min(args.workers, total_episodes)
    print(
        f"generating {run['name']}: {run['episodes']} + {run['val_episodes']} (val) episodes of "
        f"{'up to ' if args.kind == 'expert' else ''}{run['length']} steps, {workers} worker(s), seed {args.seed}",
        flush=True,
    )

    # Finished episodes go to a hidden parts folder named after everything that determines them; a rerun
    # of the same command reuses them (every episode is seeded by --seed and its index alone).
    key = hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]
    parts_dir = os.path.join(os.path.dirname(run["paths"][0]), f".{run['name']}-{key}.parts")
    if not args.resume:
        shutil.rmtree(parts_dir, ignore_errors=True)
    os.makedirs(parts_dir, exist_ok=True)

    def part(i: int) -> str:
        return os.path.join(parts_dir, f"{i:06d}.npz")

    todo = [i for i in range(total_episodes) if not os.path.exists(part(i))]
    if len(todo) < total_episodes:
        print(f"resuming: {total_episodes - len(todo)} episodes already done in {parts_dir}", flush=True)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill` unwinds like Ctrl-C: workers are stopped too
    start = time.time()
    done, steps, last_print = total_episodes - len(todo), 0, start
    workers = min(workers, max(len(todo), 1))
    pool = None
    if workers == 1:
        if todo:
            init_worker(cfg)
        results = ((i, run_episode(i)) for i in todo)
    else:
        # spawn: fresh interpreters (no MuJoCo state inherited through fork). Results arrive in any order;
        # the files are assembled by episode index, so they are the same for any --workers.
        pool = mp.get_context("spawn").Pool(workers, initializer=init_worker, initargs=(cfg,))
        results = pool.imap_unordered(indexed_episode, todo, chunksize=1)
    try:
        for i, ep in results:
            with atomic(part(i)) as tmp:  # a hidden .npz beside the part, renamed once complete
                np.savez(tmp, **ep)
            done, steps = done + 1, steps + len(ep["actions"])
            now = time.time()
            if now - last_print >= 10 or done == total_episodes:
                last_print = now
                eta = (now - start) / (done - total_episodes + len(todo)) * (total_episodes - done)
                print(
                    f"episodes {done}/{total_episodes} | {steps / (now - start):.0f} steps/s | "
                    f"elapsed {fmt_time(now - start)} | ETA {fmt_time(eta)}",
                    flush=True,
                )
    finally:
        if pool is not None:
            pool.terminate()  # also on Ctrl-C: no orphaned workers
            pool.join()
    gen_time = time.time() - start

    # Concatenate in episode order; the last val_episodes episodes form the -val file (as OGBench does).
    episodes = []
    for i in range(total_episodes):
        with np.load(part(i)) as f:
            episodes.append({k: f[k] for k in f.files})
    # Both files appear only once both are complete; -val first (the inner one), so a train file never exists
    # without its twin.
    with atomic(run["paths"][0]) as train_tmp, atomic(run["paths"][1]) as val_tmp:
        for tmp, eps in ((train_tmp, episodes[: run["episodes"]]), (val_tmp, episodes[run["episodes"] :])):
            np.savez_compressed(tmp, **{k: np.concatenate([e[k] for e in eps]) for k in eps[0]})
    shutil.rmtree(parts_dir)

    print(f"wrote {run['paths'][0]} and {run['paths'][1]}")
    rate = steps / max(gen_time, 1e-9)
    print(f"{steps} new steps in {fmt_time(gen_time)} ({rate:.0f} steps/s with {workers} worker(s))")
    if args.kind == "expert":
        succ = np.array([e["episode_success"][0] for e in episodes])
        print(f"success rate: {succ.mean():.3f} ({succ.sum()}/{len(succ)} episodes solved task {args.task})")
