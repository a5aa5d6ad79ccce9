"""Generate Robomimic-format low-dim datasets (lift, can) with scripted, noisy experts, without network access.

The official robomimic v1.5 files come from human teleoperation; offline they cannot be downloaded. This script
drives robosuite 1.5 with a scripted expert and writes a file in the same layout, which dfp_offline_to_online.py
and dbp_bc.py read exactly as an official file:

  data.attrs['env_args'] = JSON {env_name, env_version, type: 1, env_kwargs} (controller in the robosuite <= 1.4
                           OSC_POSE format, as in the official files, so the conversion to 1.5 is exercised)
  data/demo_N/{actions [T,7], rewards [T], dones [T], states [T,S], obs/<key> [T,d], next_obs/<key> [T,d]}
  (keys robot0_eef_pos, robot0_eef_quat, robot0_gripper_qpos, object; demo attrs num_samples, noise, success)

Experts: lift = reach above the cube, descend, close, lift; can = the same grasp, carry over the target bin,
lower, release, move away. Each episode draws a noise level (Gaussian noise added to the translation actions):
  --kind mh  "multi-human": thirds at noise 0.1, 0.5, 1.2 (better / okay / worse), failures kept
  --kind ph  "proficient-human": all at noise 0.05
Episodes end a few steps after the first success (rewards = success per step, dones = success or last step,
robomimic's done_mode 2) or, failing, after the task's episode length (lift 300, can 300).

Example: python scripts/generate_robomimic_dataset.py --task lift --kind mh --episodes 300 --workers 2
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one thread per worker process: the workers are the parallelism
os.environ.setdefault("MUJOCO_GL", "egl")  # headless; nothing is rendered

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
from typing import Literal, Optional

import gymnasium as gym
import numpy as np
import tyro


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
    episode_length: Optional[int] = None
    """step cap per episode; default the task's evaluation length (lift 300, can 300); stored as env_kwargs['horizon']"""
    workers: int = num_cores()
    """worker processes, one per CPU core by default"""
    seed: int = 0
    """random seed; the file depends on the seed only, not on --workers"""
    out: Optional[str] = None
    """output file; default ~/.robomimic/<task>/<kind>/low_dim_v15.hdf5 (where the training scripts look)"""
    overwrite: bool = False
    """replace an existing output file"""
    resume: bool = True
    """keep finished episodes in a hidden folder beside --out, so rerunning an interrupted command continues it"""
    noise: Optional[float] = None
    """one noise level for every episode instead of the --kind mix (0 = the noise-free expert)"""


NOISE_MIX = {"mh": (0.1, 0.5, 1.2), "ph": (0.05,)}  # per-episode translation-noise std, drawn in turn
POST_SUCCESS_STEPS = 5  # steps recorded after the first success (the expert keeps holding)
OSC_POSE_1_4 = {  # the controller of the official files, in robosuite <= 1.4's format
    "type": "OSC_POSE", "input_max": 1, "input_min": -1, "output_max": [0.05, 0.05, 0.05, 0.5, 0.5, 0.5],
    "output_min": [-0.05, -0.05, -0.05, -0.5, -0.5, -0.5], "kp": 150, "damping": 1, "impedance_mode": "fixed",
    "kp_limits": [0, 300], "damping_limits": [0, 10], "position_limits": None, "orientation_limits": None,
    "uncouple_pos_ori": True, "control_delta": True, "interpolation": None, "ramp_ratio": 0.2,
}


def make_env_args(task: str, horizon: int) -> dict:
    kwargs = dict(has_renderer=False, has_offscreen_renderer=False, ignore_done=True, use_object_obs=True,
                  use_camera_obs=False, control_freq=20, controller_configs=OSC_POSE_1_4, robots=["Panda"],
                  camera_depths=False, camera_heights=84, camera_widths=84, reward_shaping=False, horizon=horizon)
    return {"env_name": ROBOMIMIC_TASKS[task][0], "env_version": "1.5.2", "type": 1, "env_kwargs": kwargs}



# ---- Robomimic: the shared recipe for lift, can and square low-dim files. Every script that reads them pastes
# ---- this block unchanged (as the OGBench block); tests/test_robomimic.py checks the copies match.
# Order: --dataset-path if given; else ~/.robomimic/<task>/<mh|ph>/low_dim_v15.hdf5 if present; else a download
# with a bounded timeout; if that fails, one error naming the file and the command that generates it.
# Needs at module top: import json, os, re / import numpy as np / import gymnasium as gym (h5py, robosuite lazily)
ROBOMIMIC_DATA_DIR = "~/.robomimic"
ROBOMIMIC_TASKS = {"lift": ("Lift", 300), "can": ("PickPlaceCan", 300), "square": ("NutAssemblySquare", 400)}  # env, length
ROBOMIMIC_OBS_KEYS = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object")  # concatenated in this order
ROBOMIMIC_URL = "https://huggingface.co/datasets/robomimic/robomimic_datasets/resolve/main/v1.5/{}/{}/low_dim_v15.hdf5"


def is_robomimic(env: str) -> bool:
    """lift-mh, can-ph, square-mh, ... (also the authors' spelling lift-mh-low_dim)."""
    return re.fullmatch(r"(lift|can|square)-(mh|ph)(-low_dim)?", env) is not None


def robomimic_env_id(env: str) -> str:
    return env.removesuffix("-low_dim")  # lift-mh-low_dim -> lift-mh


def robomimic_fail(msg: str):
    import sys

    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def robomimic_generate_command(env_id: str, path: str) -> str:
    """The scripts/generate_robomimic_dataset.py command that writes `path` for env_id."""
    task, kind = robomimic_env_id(env_id).split("-")
    cmd = f"python scripts/generate_robomimic_dataset.py --task {task} --kind {kind}"
    if os.path.abspath(os.path.expanduser(path)) != os.path.expanduser(f"{ROBOMIMIC_DATA_DIR}/{task}/{kind}/low_dim_v15.hdf5"):
        cmd += f" --out {path}"
    return cmd


def resolve_robomimic_file(env_id: str, dataset_path: Optional[str] = None, timeout: float = 30.0) -> str:
    """The low-dim hdf5 for env_id: the given path, the default folder, or a bounded download (else one error)."""
    import shutil
    import urllib.request

    task, kind = robomimic_env_id(env_id).split("-")
    if dataset_path is not None:
        path = os.path.abspath(os.path.expanduser(dataset_path))
        if not os.path.isfile(path):
            robomimic_fail(f"--dataset-path {path} does not exist; create it with: {robomimic_generate_command(env_id, path)}")
        return path
    path = os.path.expanduser(f"{ROBOMIMIC_DATA_DIR}/{task}/{kind}/low_dim_v15.hdf5")
    if os.path.isfile(path):
        return path
    url, tmp = ROBOMIMIC_URL.format(task, kind), f"{path}.{os.getpid()}.part"
    kind_dir = os.path.dirname(path)
    created = [d for d in (kind_dir, os.path.dirname(kind_dir), os.path.dirname(os.path.dirname(kind_dir))) if not os.path.isdir(d)]
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f)  # the timeout bounds the connect and every read
        os.replace(tmp, path)
    except (OSError, ValueError) as e:  # URLError, timeouts and refused connections are OSErrors
        if os.path.exists(tmp):
            os.remove(tmp)
        for d in created:  # deepest first: remove the folders made for the download (only if still empty)
            try:
                os.rmdir(d)
            except OSError:
                pass
        robomimic_fail(f"{path} is missing and downloading {url} failed ({type(e).__name__}: {e}); "
                       f"generate it with: {robomimic_generate_command(env_id, path)}")
    return path


def load_robomimic(env_id: str, path: str):
    """(data, episode_ends, env_args) from data/demo_N/{actions, rewards, dones, obs/*, next_obs/*}, demos in numeric
    order. data has observations, actions, rewards (shifted by -1, as the authors), masks = 1 - dones, terminals =
    dones (and 1 at each demo's last step), next_observations; episode_ends marks each demo's last step."""
    import h5py

    task = robomimic_env_id(env_id).split("-")[0]
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        robomimic_fail(f"{path} is not a readable HDF5 file ({e}); regenerate it with: {robomimic_generate_command(env_id, path)}")
    with f:
        if "data" not in f or "env_args" not in f["data"].attrs:
            robomimic_fail(f"{path} has no 'data' group with an env_args attribute; it is not a robomimic dataset")
        try:
            env_args = json.loads(f["data"].attrs["env_args"])
            env_name = env_args["env_name"]
        except (ValueError, KeyError, TypeError):
            robomimic_fail(f"{path}: data.attrs['env_args'] is not JSON with env_name and env_kwargs")
        owner = {v[0]: k for k, v in ROBOMIMIC_TASKS.items()}.get(env_name)
        if owner != task:
            robomimic_fail(f"{path} holds robosuite env '{env_name}' ({owner or 'not lift, can or square'}), but --env "
                           f"{env_id} needs {ROBOMIMIC_TASKS[task][0]}; pass the file for this task")
        demos = sorted((k for k in f["data"] if re.fullmatch(r"demo_\d+", k)), key=lambda k: int(k[5:]))  # demo_10 after demo_9
        if not demos:
            robomimic_fail(f"{path} has no data/demo_N groups")
        need = ["actions", "rewards", "dones"] + [f"{o}/{k}" for o in ("obs", "next_obs") for k in ROBOMIMIC_OBS_KEYS]
        parts = {k: [] for k in ("observations", "actions", "rewards", "dones", "next_observations")}
        for demo in demos:
            g = f["data"][demo]
            missing = [k for k in need if k not in g]
            if missing:
                robomimic_fail(f"{path}: data/{demo} lacks {missing}; low-dim observations need {list(ROBOMIMIC_OBS_KEYS)}")
            parts["observations"].append(np.concatenate([g["obs"][k][()] for k in ROBOMIMIC_OBS_KEYS], -1))  # [T, O]
            parts["next_observations"].append(np.concatenate([g["next_obs"][k][()] for k in ROBOMIMIC_OBS_KEYS], -1))
            for k in ("actions", "rewards", "dones"):
                parts[k].append(g[k][()])
    lengths = [len(a) for a in parts["actions"]]
    ends = np.zeros(sum(lengths), bool)
    ends[np.cumsum(lengths) - 1] = True  # [N] last step of each demo
    cat = {k: np.concatenate(v).astype(np.float32) for k, v in parts.items()}
    if any(len(v) != len(ends) for v in cat.values()) or cat["actions"].ndim != 2:
        robomimic_fail(f"{path}: per-demo arrays of different lengths (actions, rewards, dones, obs, next_obs)")
    data = {
        "observations": cat["observations"], "actions": cat["actions"],
        "rewards": cat["rewards"] - 1.0,  # sparse 0/1 -> -1/0 (offline and online)
        "masks": 1.0 - cat["dones"],  # no bootstrap after done (success, or a demo's end)
        "terminals": np.maximum(cat["dones"], ends).astype(np.float32),  # chunks never cross demos
        "next_observations": cat["next_observations"],
    }
    return data, ends, env_args


class RobomimicEnv(gym.Env):
    """A robosuite 1.5 env built from a file's env_args, as a gymnasium env: obs = concat of ROBOMIMIC_OBS_KEYS,
    reward = success (0/1) + reward_shift, terminated at success, truncated after the task's episode length
    (or a shorter env_kwargs['horizon'] / max_episode_steps); info['success']."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(self, env_id: str, env_args, reward_shift: float = 0.0, max_episode_steps: Optional[int] = None,
                 render_mode: Optional[str] = None):
        import robosuite
        from robosuite.controllers.composite.composite_controller_factory import refactor_composite_controller_config

        self.env_args = json.loads(env_args) if isinstance(env_args, str) else env_args
        kwargs = dict(self.env_args["env_kwargs"])
        if "controller_configs" in kwargs:  # robosuite <= 1.4 format (an OSC_POSE dict) -> 1.5 composite; 1.5 passes
            kwargs["controller_configs"] = refactor_composite_controller_config(kwargs["controller_configs"], "Panda", ["right"])
        kwargs.update(has_renderer=False, has_offscreen_renderer=render_mode == "rgb_array", use_camera_obs=False,
                      ignore_done=True)  # episodes end here, not in robosuite
        self.env = robosuite.make(self.env_args["env_name"], **kwargs)
        length = ROBOMIMIC_TASKS[robomimic_env_id(env_id).split("-")[0]][1]
        self.max_episode_steps = max_episode_steps or min(length, kwargs.get("horizon", length))
        self.reward_shift, self.render_mode, self.t = reward_shift, render_mode, 0
        self.action_space = gym.spaces.Box(-1.0, 1.0, (self.env.action_dim,), np.float32)
        obs_dim = len(self._obs(self.env.reset()))
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)

    def _obs(self, raw: dict) -> np.ndarray:
        raw = {**raw, "object": raw["object-state"]}  # robomimic's name for robosuite's object-state
        return np.concatenate([raw[k] for k in ROBOMIMIC_OBS_KEYS]).astype(np.float32)

    def reset(self, *, seed: Optional[int] = None, options=None):
        super().reset(seed=seed)
        if seed is not None:  # robosuite draws placements and arm noise from env.rng (shared with its samplers)
            self.env.rng.bit_generator.state = np.random.default_rng(seed).bit_generator.state
        self.t = 0
        return self._obs(self.env.reset()), {}

    def step(self, action):
        raw, _, _, _ = self.env.step(np.clip(np.asarray(action, np.float64), -1.0, 1.0))
        self.t += 1
        success = float(self.env._check_success())
        return self._obs(raw), success + self.reward_shift, bool(success), self.t >= self.max_episode_steps, {"success": success}

    def render(self):
        return self.env.sim.render(width=256, height=256, camera_name="agentview")[::-1]  # mujoco images are upside down


# ---- end of Robomimic


def fail(msg: str):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def check_args(args: Args) -> dict:
    """Validate everything up front (exit 2, nothing written) and return the resolved settings."""
    if args.task == "square":
        fail("square has no scripted expert yet; use --task lift or --task can (or the official file from robomimic)")
    length = args.episode_length if args.episode_length is not None else ROBOMIMIC_TASKS[args.task][1]
    if args.episodes < 1 or args.workers < 1 or length < 2:
        fail(f"--episodes and --workers must be >= 1 and --episode-length >= 2, got {args.episodes}, {args.workers}, {length}")
    if args.noise is not None and args.noise < 0:
        fail(f"--noise must be >= 0, got {args.noise}")
    out = os.path.abspath(os.path.expanduser(args.out or f"{ROBOMIMIC_DATA_DIR}/{args.task}/{args.kind}/low_dim_v15.hdf5"))
    if os.path.exists(out) and not args.overwrite:
        fail(f"{out} exists; pass --overwrite to replace it")
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

    def __init__(self, task: str, place_xyz: Optional[np.ndarray] = None):
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
    out = dict(obs=np.asarray(rec["obs"], np.float32), next_obs=np.asarray(rec["next_obs"], np.float32),
               actions=np.asarray(rec["actions"], np.float32), rewards=rewards, dones=dones,
               states=np.asarray(rec["states"], np.float64))
    out.update(noise=np.float32(noise), success=np.bool_(first_success is not None))
    return out


def indexed_episode(episode: int):
    return episode, run_episode(episode)


def split_obs(flat: np.ndarray) -> dict:
    """[T, O] -> the robomimic obs keys (eef_pos 3, eef_quat 4, gripper_qpos 2, object rest)."""
    return {"robot0_eef_pos": flat[:, 0:3], "robot0_eef_quat": flat[:, 3:7], "robot0_gripper_qpos": flat[:, 7:9],
            "object": flat[:, 9:]}


def write_hdf5(path: str, episodes: list, env_args: dict) -> None:
    """Write every episode as data/demo_N to a hidden temporary file, then rename it (atomic)."""
    import h5py

    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            data = f.create_group("data")
            data.attrs["env_args"] = json.dumps(env_args)
            data.attrs["total"] = int(sum(len(e["actions"]) for e in episodes))
            for i, ep in enumerate(episodes):
                g = data.create_group(f"demo_{i}")
                g.attrs.update(num_samples=len(ep["actions"]), noise=float(ep["noise"]), success=bool(ep["success"]))
                for k in ("actions", "rewards", "dones", "states"):
                    g.create_dataset(k, data=ep[k])
                for group in ("obs", "next_obs"):
                    for k, v in split_obs(ep[group]).items():
                        g.create_dataset(f"{group}/{k}", data=v)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


if __name__ == "__main__":
    args = tyro.cli(Args)
    run = check_args(args)
    cfg = dict(task=args.task, kind=args.kind, length=run["length"], seed=args.seed, noise=args.noise)
    workers = min(args.workers, args.episodes)
    print(f"generating {run['out']}: {args.episodes} {args.task} episodes of up to {run['length']} steps "
          f"({args.kind}, noise {args.noise if args.noise is not None else NOISE_MIX[args.kind]}), {workers} worker(s), "
          f"seed {args.seed}", flush=True)

    # Finished episodes go to a hidden parts folder named after what determines them: a rerun continues.
    key = hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]
    parts_dir = os.path.join(os.path.dirname(run["out"]), f".{os.path.basename(run['out'])}-{key}.parts")
    if not args.resume:
        shutil.rmtree(parts_dir, ignore_errors=True)
    os.makedirs(parts_dir, exist_ok=True)
    part = lambda i: os.path.join(parts_dir, f"{i:06d}.npz")  # noqa: E731
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
            with open(part(i) + ".tmp", "wb") as f:
                np.savez(f, **ep)
            os.replace(part(i) + ".tmp", part(i))
            done, steps = done + 1, steps + len(ep["actions"])
            now = time.time()
            if now - last_print >= 10 or done == args.episodes:
                last_print = now
                eta = (now - start) / (done - args.episodes + len(todo)) * (args.episodes - done)
                print(f"episodes {done}/{args.episodes} | {steps / (now - start):.0f} steps/s | elapsed "
                      f"{fmt_time(now - start)} | ETA {fmt_time(eta)}", flush=True)
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
    print(f"{steps} new steps in {fmt_time(gen_time)} ({steps / max(gen_time, 1e-9):.0f} steps/s with {workers} worker(s))")
    noise = np.array([float(e["noise"]) for e in episodes])
    succ = np.array([bool(e["success"]) for e in episodes])
    for level in sorted(set(noise.tolist())):
        sel = noise == level
        print(f"noise {level:g}: success {succ[sel].mean():.3f} ({succ[sel].sum()}/{sel.sum()} episodes)")
    print(f"success rate: {succ.mean():.3f} ({succ.sum()}/{len(succ)} episodes)")
