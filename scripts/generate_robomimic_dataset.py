"""Generate Robomimic-format low-dim datasets (lift, can) with scripted, noisy experts, without network access.

The official robomimic v1.5 files come from human teleoperation; offline they cannot be downloaded. This script
drives robosuite 1.5 with a scripted expert and writes a file in the same layout, which dfp_offline_to_online.py
and dbp_bc.py read exactly as an official file:

  data.attrs['env_args'] = JSON {env_name, env_version, type: 1, env_kwargs} (controller in the robosuite <= 1.4
                           OSC_POSE format, as in the official files, so the conversion to 1.5 is exercised)
  data/demo_N/{actions [T,7], rewards [T], dones [T], states [T,S], obs/<key> [T,d], next_obs/<key> [T,d]}
  (keys robot0_eef_pos, robot0_eef_quat, robot0_gripper_qpos, object; demo attrs num_samples, noise, success and
  model_file, the episode's MuJoCo XML as in robomimic's files: robosuite draws e.g. lift's cube size per episode)

Experts: lift = reach above the cube, descend, close, lift; can = the same grasp, carry over the target bin,
lower, release, move away. Each episode draws a noise level (Gaussian noise added to the translation actions):
  --kind mh  "multi-human": thirds at noise 0.1, 0.5, 1.2 (better / okay / worse), failures kept
  --kind ph  "proficient-human": all at noise 0.05
Episodes end a few steps after the first success (rewards = success per step, dones = success or last step,
robomimic's done_mode 2) or, failing, after the task's episode length (lift 300, can 300).

Example: python scripts/generate_robomimic_dataset.py --task lift --kind mh --episodes 300 --workers 2
         (add --image to render image_v15.hdf5 beside it, for lift-mh-image)
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one thread per worker process: the workers are the parallelism
os.environ.setdefault("MUJOCO_GL", "egl")  # headless; nothing is rendered

import hashlib
import json
import multiprocessing as mp
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from robomimic_tasks import ROBOMIMIC_TASKS, RobomimicEnv, robomimic_default_path
from runs import atomic, check, fail, parse, require


def num_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@dataclass
class Args:
    task: Literal["lift", "can", "square"] = "lift"
    """robomimic task (square has no scripted expert yet: refused)"""
    kind: Literal["mh", "ph"] = "mh"
    """mh: mixed-quality episodes (three noise levels, failures kept); ph: low-noise episodes"""
    episodes: int = 300
    """episodes to write (the official lift/can mh files hold 300 demos, ph 200)"""
    episode_length: int | None = None
    """step cap per episode; default the task's evaluation length (lift 300, can 300); stored as
    env_kwargs['horizon']"""
    workers: int = num_cores()
    """worker processes, one per CPU core by default"""
    seed: int = 0
    """random seed; the file depends on the seed only, not on --workers"""
    out: str | None = None
    """output file; default ~/.robomimic/<task>/<kind>/low_dim_v15.hdf5 (where the training scripts look)"""
    overwrite: bool = False
    """replace an existing output file"""
    resume: bool = True
    """keep finished episodes in a hidden folder beside --out, so rerunning an interrupted command continues it"""
    noise: float | None = None
    """one noise level for every episode instead of the --kind mix (0 = the noise-free expert)"""
    image: bool = False
    """then render the file's image observations into image_v15.hdf5 beside --out (the task's cameras, robomimic's
    layout: scripts/render_robomimic_images.py on the finished file)"""


NOISE_MIX = {"mh": (0.1, 0.5, 1.2), "ph": (0.05,)}  # per-episode translation-noise std, drawn in turn
POST_SUCCESS_STEPS = 5  # steps recorded after the first success (the expert keeps holding)
OSC_POSE_1_4 = {  # the controller of the official files, in robosuite <= 1.4's format
    "type": "OSC_POSE",
    "input_max": 1,
    "input_min": -1,
    "output_max": [0.05, 0.05, 0.05, 0.5, 0.5, 0.5],
    "output_min": [-0.05, -0.05, -0.05, -0.5, -0.5, -0.5],
    "kp": 150,
    "damping": 1,
    "impedance_mode": "fixed",
    "kp_limits": [0, 300],
    "damping_limits": [0, 10],
    "position_limits": None,
    "orientation_limits": None,
    "uncouple_pos_ori": True,
    "control_delta": True,
    "interpolation": None,
    "ramp_ratio": 0.2,
}


def make_env_args(task: str, horizon: int) -> dict:
    kwargs = dict(
        has_renderer=False,
        has_offscreen_renderer=False,
        ignore_done=True,
        use_object_obs=True,
        use_camera_obs=False,
        control_freq=20,
        controller_configs=OSC_POSE_1_4,
        robots=["Panda"],
        camera_depths=False,
        camera_heights=84,
        camera_widths=84,
        reward_shaping=False,
        horizon=horizon,
    )
    return {"env_name": ROBOMIMIC_TASKS[task][0], "env_version": "1.5.2", "type": 1, "env_kwargs": kwargs}


def check_args(args: Args) -> dict:
    """Validate everything up front (exit 2, nothing written) and return the resolved settings."""
    check(
        args.task != "square",
        "square has no scripted expert yet; use --task lift or --task can (or the official file from robomimic)",
    )
    length = args.episode_length if args.episode_length is not None else ROBOMIMIC_TASKS[args.task][1]
    check(
        args.episodes >= 1 and args.workers >= 1 and length >= 2,
        f"--episodes and --workers must be >= 1 and "
        f"--episode-length >= 2, got {args.episodes}, {args.workers}, {length}",
    )
    check(args.noise is None or args.noise >= 0, f"--noise must be >= 0, got {args.noise}")
    out = os.path.abspath(os.path.expanduser(args.out or robomimic_default_path(f"{args.task}-{args.kind}")))
    check(args.overwrite or not os.path.exists(out), f"{out} exists; pass --overwrite to replace it")
    image = os.path.join(os.path.dirname(out), "image_v15.hdf5")
    check(not args.image or args.overwrite or not os.path.exists(image), f"{image} exists; pass --overwrite")
    try:  # last, because it creates the folder
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with tempfile.TemporaryFile(dir=os.path.dirname(out)):
            pass
    except OSError as e:
        fail(f"cannot write to {os.path.dirname(out)} ({e.strerror or e}); choose a writable --out")
    return dict(length=length, out=out)


# ---------------------------------------------------------------------------------------------
# Scripted experts: state machines on the low-dim observation, translation by a P-controller.
# obs = [eef_pos 3, eef_quat 4, gripper_qpos 2, object ...]; where the object block holds the cube / can position:
# lift: cube_pos first; can (robosuite 1.5 order): Can_to_robot0_eef_pos 3, Can_to_robot0_eef_quat 4, Can_pos 3, ...
# ---------------------------------------------------------------------------------------------
OPEN, CLOSED = -1.0, 1.0
OBJECT_POS = {"lift": slice(9, 12), "can": slice(16, 19)}


def move(eef: np.ndarray, target: np.ndarray, gain: float = 10.0) -> np.ndarray:
    return np.clip((target - eef) * gain, -1.0, 1.0)  # delta-position action; 1 = 5 cm per step at most


class Expert:
    """Pick (both tasks): above the object, down, close; then lift (lift) or carry to the bin and release (can)."""

    def __init__(self, task: str, place_xyz: np.ndarray | None = None):
        self.task, self.place_xyz, self.phase, self.count = task, place_xyz, "above", 0

    def act(self, obs: np.ndarray) -> np.ndarray:
        eef, obj = obs[0:3], obs[OBJECT_POS[self.task]]
        grip, a = OPEN, np.zeros(3)
        hover = obj + np.array([0.0, 0.0, 0.08])
        grasp = obj + np.array([0.0, 0.0, 0.0 if self.task == "lift" else 0.02])
        if self.phase == "above":
            a = move(eef, hover)
            if np.linalg.norm((hover - eef)[:2]) < 0.01 and abs(hover[2] - eef[2]) < 0.02:
                self.phase = "down"
        elif self.phase == "down":
            a = move(eef, grasp)
            if np.linalg.norm(grasp - eef) < 0.01:
                self.phase, self.count = "close", 0
        elif self.phase == "close":
            a, grip, self.count = move(eef, grasp), CLOSED, self.count + 1
            if self.count >= 10:
                self.phase = "up"
        elif self.phase == "up":
            grip = CLOSED
            if self.task == "lift":
                a = move(eef, np.array([eef[0], eef[1], 1.0]))
            else:
                carry = np.array([eef[0], eef[1], self.place_xyz[2] + 0.25])
                a = move(eef, carry)
                if eef[2] > self.place_xyz[2] + 0.2:
                    self.phase = "carry"
            if np.linalg.norm(obj - eef) > 0.05:  # the object slipped out: try again
                self.phase = "above"
        elif self.phase == "carry":
            grip, target = CLOSED, self.place_xyz + np.array([0.0, 0.0, 0.2])
            a = move(eef, target)
            if np.linalg.norm((target - eef)[:2]) < 0.02:
                self.phase, self.count = "release", 0
        elif self.phase == "release":
            a, self.count = move(eef, self.place_xyz + np.array([0.0, 0.0, 0.2])), self.count + 1
            if self.count >= 8:
                self.phase = "away"
        elif self.phase == "away":
            a = move(eef, self.place_xyz + np.array([0.0, 0.0, 0.35]))
        return np.concatenate([a, np.zeros(3), [grip]])  # [7]: dx dy dz, no rotation, gripper


# ---------------------------------------------------------------------------------------------
# Worker side: one env per process, one episode per job.
# ---------------------------------------------------------------------------------------------
_W = {}


def init_worker(cfg: dict) -> None:
    _W.update(cfg=cfg, env=RobomimicEnv(f"{cfg['task']}-mh", make_env_args(cfg["task"], cfg["length"])))


def episode_noise(cfg: dict, episode: int) -> float:
    return cfg["noise"] if cfg["noise"] is not None else NOISE_MIX[cfg["kind"]][episode % len(NOISE_MIX[cfg["kind"]])]


def run_episode(episode: int) -> dict:
    """One seeded episode (env seed and noise from --seed and the episode index alone)."""
    cfg, env = _W["cfg"], _W["env"]
    env_seed, noise_seed = np.random.SeedSequence([cfg["seed"], episode]).generate_state(2)
    rng, noise = np.random.default_rng(int(noise_seed)), episode_noise(cfg, episode)
    obs, _ = env.reset(seed=int(env_seed))
    u = env.env  # the robosuite env: the can's target bin is privileged information the expert may use
    place = u.target_bin_placements[u.object_to_id["can"]].copy() if cfg["task"] == "can" else None
    expert = Expert(cfg["task"], place)
    rec = {k: [] for k in ("obs", "next_obs", "actions", "rewards", "states")}
    first_success = None
    for t in range(cfg["length"]):
        action = expert.act(obs)
        action[:3] += noise * rng.standard_normal(3)  # teleoperation-like imprecision in translation
        action = np.clip(action, -1.0, 1.0)
        rec["states"].append(u.sim.get_state().flatten())
        next_obs, reward, _, _, _ = env.step(action)
        for k, v in (("obs", obs), ("next_obs", next_obs), ("actions", action), ("rewards", reward)):
            rec[k].append(v)
        obs = next_obs
        if reward > 0 and first_success is None:
            first_success = t
        if first_success is not None and t >= first_success + POST_SUCCESS_STEPS:
            break
    rewards = np.asarray(rec["rewards"], np.float32)
    dones = rewards.copy()
    dones[-1] = 1.0  # robomimic's done_mode 2: done at success and at the end
    out = dict(
        obs=np.asarray(rec["obs"], np.float32),
        next_obs=np.asarray(rec["next_obs"], np.float32),
        actions=np.asarray(rec["actions"], np.float32),
        rewards=rewards,
        dones=dones,
        states=np.asarray(rec["states"], np.float64),
    )
    out.update(noise=np.float32(noise), success=np.bool_(first_success is not None))
    out.update(model_file=np.str_(u.sim.model.get_xml()))  # this episode's MuJoCo model: lift's cube size is drawn
    return out


def indexed_episode(episode: int):
    return episode, run_episode(episode)


def split_obs(flat: np.ndarray) -> dict:
    """[T, O] -> the robomimic obs keys (eef_pos 3, eef_quat 4, gripper_qpos 2, object rest)."""
    return {
        "robot0_eef_pos": flat[:, 0:3],
        "robot0_eef_quat": flat[:, 3:7],
        "robot0_gripper_qpos": flat[:, 7:9],
        "object": flat[:, 9:],
    }


def write_hdf5(path: str, episodes: list, env_args: dict) -> None:
    """Write every episode as data/demo_N, atomically (a hidden temporary file, then renamed)."""
    import h5py

    with atomic(path) as tmp, h5py.File(tmp, "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = json.dumps(env_args)
        data.attrs["total"] = int(sum(len(e["actions"]) for e in episodes))
        for i, ep in enumerate(episodes):
            g = data.create_group(f"demo_{i}")
            g.attrs.update(num_samples=len(ep["actions"]), noise=float(ep["noise"]), success=bool(ep["success"]))
            if "model_file" in ep:  # robomimic's attribute: replaying `states` needs the episode's own model
                g.attrs["model_file"] = str(ep["model_file"])
            for k in ("actions", "rewards", "dones", "states"):
                g.create_dataset(k, data=ep[k])
            for group in ("obs", "next_obs"):
                for k, v in split_obs(ep[group]).items():
                    g.create_dataset(f"{group}/{k}", data=v)


def fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


if __name__ == "__main__":
    args = parse(Args)
    for module in ("robosuite", "h5py"):  # the Robomimic extra: one line, exit 2, before check_args makes a folder
        require(module, "scripts/generate_robomimic_dataset.py")
    run = check_args(args)
    cfg = dict(task=args.task, kind=args.kind, length=run["length"], seed=args.seed, noise=args.noise)
    workers = min(args.workers, args.episodes)
    print(
        f"generating {run['out']}: {args.episodes} {args.task} episodes of up to {run['length']} steps "
        f"({args.kind}, noise {args.noise if args.noise is not None else NOISE_MIX[args.kind]}), {workers} worker(s), "
        f"seed {args.seed}",
        flush=True,
    )

    # Finished episodes go to a hidden parts folder named after what determines them: a rerun continues.
    key = hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]
    parts_dir = os.path.join(os.path.dirname(run["out"]), f".{os.path.basename(run['out'])}-{key}.parts")
    if not args.resume:
        shutil.rmtree(parts_dir, ignore_errors=True)
    os.makedirs(parts_dir, exist_ok=True)

    def part(i: int) -> str:
        return os.path.join(parts_dir, f"{i:06d}.npz")

    todo = [i for i in range(args.episodes) if not os.path.exists(part(i))]
    if len(todo) < args.episodes:
        print(f"resuming: {args.episodes - len(todo)} episodes already done in {parts_dir}", flush=True)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill` unwinds like Ctrl-C: workers are stopped too
    start = time.time()
    done, steps, last_print = args.episodes - len(todo), 0, start
    workers = min(workers, max(len(todo), 1))
    pool = None
    if workers == 1:
        if todo:
            init_worker(cfg)
        results = ((i, run_episode(i)) for i in todo)
    else:  # spawn: fresh interpreters (no MuJoCo state inherited); files assembled by episode index
        pool = mp.get_context("spawn").Pool(workers, initializer=init_worker, initargs=(cfg,))
        results = pool.imap_unordered(indexed_episode, todo, chunksize=1)
    try:
        for i, ep in results:
            with atomic(part(i)) as tmp:  # a hidden .npz beside the part, renamed once complete
                np.savez(tmp, **ep)
            done, steps = done + 1, steps + len(ep["actions"])
            now = time.time()
            if now - last_print >= 10 or done == args.episodes:
                last_print = now
                eta = (now - start) / (done - args.episodes + len(todo)) * (args.episodes - done)
                print(
                    f"episodes {done}/{args.episodes} | {steps / (now - start):.0f} steps/s | elapsed "
                    f"{fmt_time(now - start)} | ETA {fmt_time(eta)}",
                    flush=True,
                )
    finally:
        if pool is not None:
            pool.terminate()  # also on Ctrl-C: no orphaned workers
            pool.join()
    gen_time = time.time() - start

    episodes = []
    for i in range(args.episodes):
        with np.load(part(i)) as f:
            episodes.append({k: f[k] for k in f.files})
    write_hdf5(run["out"], episodes, make_env_args(args.task, run["length"]))
    shutil.rmtree(parts_dir)
    print(f"wrote {run['out']}")
    rate = steps / max(gen_time, 1e-9)
    print(f"{steps} new steps in {fmt_time(gen_time)} ({rate:.0f} steps/s with {workers} worker(s))")
    noise = np.array([float(e["noise"]) for e in episodes])
    succ = np.array([bool(e["success"]) for e in episodes])
    for level in sorted(set(noise.tolist())):
        sel = noise == level
        print(f"noise {level:g}: success {succ[sel].mean():.3f} ({succ[sel].sum()}/{sel.sum()} episodes)")
    print(f"success rate: {succ.mean():.3f} ({succ.sum()}/{len(succ)} episodes)")
    if args.image:  # the renderer on the finished file: the same state replay as for an official file
        from scripts.render_robomimic_images import render_file

        render_file(run["out"], workers=args.workers, overwrite=args.overwrite)
