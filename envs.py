"""The benchmarks (OGBench cube tasks, Robomimic low-dim tasks, gymnasium locomotion), shared by the training scripts
and the dataset generators: the env an --env names, its dataset (found, downloaded with a timeout, or the command that
regenerates it) and its checks, the env, the wrapper that executes an action chunk, and one seeded, vectorized
evaluation. Every bad input is one `error:` line (runs.fail), exit code 2. Only episode_generator imports torch.

    env_id = envs.resolve_env_id("cube-single-play", task=1)  # cube-single-play-singletask-task1-v0
    env, data, ends, env_args = envs.load_dataset(env_id, args.dataset_path)
    res = envs.evaluate(envs.make_eval_envs(env_id, 4, horizon=5), act, episodes=50, seed=1001)  # success, return, ...
"""
import atexit
import contextlib
import functools
import json
import os
import re
import shutil
import socket
import urllib.request
from collections import deque
from typing import Callable, Optional

import gymnasium as gym
import numpy as np

from runs import atomic, check, fail, why, worker_signals

# ---- families: which benchmark an env id belongs to
ROBOMIMIC_NAME = r"(lift|can|square)-(mh|ph)(-low_dim)?"  # the authors' spelling lift-mh-low_dim too
CUBE_NAME = r"(cube-(single|double|triple|quadruple)-play)(-singletask)?(-task([1-5]))?(-v0)?"
OGBENCH_ID = r"(cube-(single|double|triple|quadruple)|scene|puzzle-(3x3|4x4|4x5|4x6))-play-singletask-task[1-5]-v0"
LOCOMOTION_ENVS = ("Hopper-v5", "Walker2d-v5", "Ant-v5")  # gymnasium MuJoCo, as the authors' D4RL tasks
D4RL_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")  # a gymnasium env's dataset (.npz)


def family(env_id: str) -> str:
    """'robomimic', 'ogbench' or 'gym' for a resolved id; the first two are manipulation, with info['success']."""
    return "robomimic" if re.fullmatch(ROBOMIMIC_NAME, env_id) else "ogbench" if re.fullmatch(OGBENCH_ID, env_id) else "gym"


def resolve_env_id(env: str, task: Optional[int] = None, gym_ids=()) -> str:
    """The env id an --env value names: 'cube-triple-play' -> 'cube-triple-play-singletask-task2-v0' (task 2 unless
    --task, which also overrides a full id's); other OGBench singletask ids (scene, puzzle) as they are; Robomimic
    'lift-mh' (or 'lift-mh-low_dim') -> 'lift-mh'; gymnasium ids in gym_ids (None: any registered one)."""
    cube = re.fullmatch(CUBE_NAME, env)
    check(task is None or cube is None or 1 <= task <= 5, f"--task must be in 1..5, got {task}")
    if cube is not None:
        return f"{cube.group(1)}-singletask-task{task if task is not None else int(cube.group(5) or 2)}-v0"
    if family(env) != "gym" or (env in gym.registry if gym_ids is None else env in gym_ids):
        check(task is None, "--task only applies to cube-* names; drop it (or put the task in the full OGBench id)")
        return env.removesuffix("-low_dim")
    gyms = ", a gymnasium id like Hopper-v5" if gym_ids is None else "".join(f", {g}" for g in gym_ids)
    fail(f"unknown env '{env}'; valid: {', '.join(f'cube-{k}-play' for k in CUBE_PLAY_EPISODES)} (or a full id like "
         f"cube-double-play-singletask-task2-v0), Robomimic lift/can/square-mh/ph{gyms}")


# ---- OGBench: datasets in ~/.ogbench/data, else a bounded download, else the command that regenerates them
OGBENCH_DATA_DIR = "~/.ogbench/data"
CUBE_PLAY_EPISODES = {"single": 1000, "double": 1000, "triple": 3000, "quadruple": 5000}  # official sizes
ORACLE_STEPS_PER_SEC = 200  # per CPU core, measured with bench/bench_generate.py (README, Data)


def generate_command(dataset_file: str) -> str:
    """The scripts/generate_ogbench_dataset.py command that regenerates `dataset_file`, and how long it takes."""
    out_dir, name = os.path.split(os.path.abspath(os.path.expanduser(dataset_file)))
    m = re.fullmatch(r"cube-(single|double|triple|quadruple)-(play|expert-task([1-5]))-v0\.npz", name)
    if m is None:
        return "python scripts/generate_ogbench_dataset.py --help (no standard dataset name; see the README's Data section)"
    cmd = f"python scripts/generate_ogbench_dataset.py --env cube-{m.group(1)}-play"
    cmd += f" --kind expert --task {m.group(3)}" if m.group(3) else ""
    cmd += f" --out-dir {out_dir}" if out_dir != os.path.abspath(os.path.expanduser(OGBENCH_DATA_DIR)) else ""
    if m.group(3):
        return cmd  # expert demos stop once solved: minutes, not hours
    steps, cores = int(CUBE_PLAY_EPISODES[m.group(1)] * 1.1) * 1001, os.cpu_count() or 1  # +10% val episodes of 1001 steps
    minutes = steps / (ORACLE_STEPS_PER_SEC * cores) / 60
    return f"{cmd}  ({steps / 1e6:.1f}M oracle steps: about {minutes:.0f} min on {cores} CPU cores, faster with more)"


def load_ogbench(env_id: str, dataset_path: Optional[str] = None, env=None, timeout: float = 30.0):
    """(env, train, val) of a singletask id (ogbench.make_env_and_datasets; with `env`, only the data is read: a shard).
    The dataset: dataset_path (with its -val twin), else ~/.ogbench/data/<dataset>.npz, else OGBench's download (each
    connect and read bounded by `timeout` s); else one error with the command that regenerates it."""
    import ogbench
    if dataset_path is not None:
        path = os.path.abspath(os.path.expanduser(dataset_path))
        twin = path.replace(".npz", "-val.npz")  # ogbench's own rule for the -val twin
        check(os.path.isfile(path) and os.path.isfile(twin), f"--dataset-path {path} or its twin "
              f"{os.path.basename(twin)} does not exist; create both with: {generate_command(path)}")
    else:
        name, data_dir = re.sub(r"-singletask-task\d", "", env_id), os.path.expanduser(OGBENCH_DATA_DIR)  # cube-double-play-v0
        path, twin = os.path.join(data_dir, f"{name}.npz"), os.path.join(data_dir, f"{name}-val.npz")
    if not (os.path.isfile(path) and os.path.isfile(twin)):  # not in the default folder (a given path was checked)
        old_timeout = socket.getdefaulttimeout()  # ogbench's downloader sets none: this bounds it
        socket.setdefaulttimeout(timeout)
        try:
            ogbench.download_datasets([name], data_dir)
        except (OSError, ValueError) as e:  # URLError, socket.timeout, ConnectionError are OSErrors
            fail(f"{name} is not in {data_dir} and downloading it failed ({why(e)}); regenerate it locally with: "
                 f"{generate_command(path)}")
        finally:
            socket.setdefaulttimeout(old_timeout)
            for p in (path + ".tmp", twin + ".tmp"):  # the downloader's half-written files, if any
                if os.path.exists(p):
                    os.remove(p)
    try:
        if env is None:
            return ogbench.make_env_and_datasets(env_id, dataset_path=path)
        return env, *ogbench.make_env_and_datasets(env_id, dataset_path=path, dataset_only=True, cur_env=env)
    except Exception as e:  # a truncated zip, a text file named .npz, a missing key, ...
        fail(f"could not read dataset {path} ({why(e)}); it needs observations, actions, terminals, qpos, qvel (OGBench "
             f"format) and a -val twin; regenerate it with: {generate_command(path)}")


def shard_paths(folder: str) -> list:
    """The dataset shards in a folder (cube-quadruple-play-100m): its *.npz files, sorted, each with its -val twin."""
    check(os.path.isdir(folder), f"--dataset-dir {folder} is not a folder")
    shards = sorted(os.path.join(folder, f) for f in os.listdir(folder) if re.search(r"(?<!-val)\.npz$", f))
    for p in shards:
        check(os.path.isfile(p.replace(".npz", "-val.npz")), f"the shard {p} has no -val twin; add it or remove the shard")
    check(shards, f"--dataset-dir {folder} holds no *.npz shards (+ -val twins)")
    return shards


# ---- Robomimic: lift, can and square low-dim files (~/.robomimic/<task>/<mh|ph>/low_dim_v15.hdf5)
ROBOMIMIC_DATA_DIR = "~/.robomimic"
ROBOMIMIC_TASKS = {"lift": ("Lift", 300), "can": ("PickPlaceCan", 300), "square": ("NutAssemblySquare", 400)}  # env, length
ROBOMIMIC_OBS_KEYS = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object")  # concatenated in this order
ROBOMIMIC_URL = "https://huggingface.co/datasets/robomimic/robomimic_datasets/resolve/main/v1.5/{}/{}/low_dim_v15.hdf5"


def robomimic_generate_command(env_id: str, path: str) -> str:
    """The scripts/generate_robomimic_dataset.py command that writes `path` for env_id."""
    task, kind = env_id.split("-")[:2]
    cmd = f"python scripts/generate_robomimic_dataset.py --task {task} --kind {kind}"
    default = os.path.expanduser(f"{ROBOMIMIC_DATA_DIR}/{task}/{kind}/low_dim_v15.hdf5")
    return cmd if os.path.abspath(os.path.expanduser(path)) == default else f"{cmd} --out {path}"


def resolve_robomimic_file(env_id: str, dataset_path: Optional[str] = None, timeout: float = 30.0) -> str:
    """The low-dim hdf5 for env_id: the given path, the default folder, or a bounded download (else one error)."""
    task, kind = env_id.split("-")[:2]
    if dataset_path is not None:
        path = os.path.abspath(os.path.expanduser(dataset_path))
        check(os.path.isfile(path), f"--dataset-path {path} does not exist; create it with: "
                                    f"{robomimic_generate_command(env_id, path)}")
        return path
    path = os.path.expanduser(f"{ROBOMIMIC_DATA_DIR}/{task}/{kind}/low_dim_v15.hdf5")
    if os.path.isfile(path):
        return path
    url, kind_dir = ROBOMIMIC_URL.format(task, kind), os.path.dirname(path)
    created = [d for d in (kind_dir, os.path.dirname(kind_dir), os.path.dirname(os.path.dirname(kind_dir))) if not os.path.isdir(d)]
    try:
        os.makedirs(kind_dir, exist_ok=True)
        with atomic(path) as tmp, urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f)  # the timeout bounds the connect and every read
    except (OSError, ValueError) as e:  # URLError, timeouts and refused connections are OSErrors
        for d in created:  # deepest first: remove the folders made for the download (only if still empty)
            with contextlib.suppress(OSError):
                os.rmdir(d)
        fail(f"{path} is missing and downloading {url} failed ({why(e)}); generate it with: "
             f"{robomimic_generate_command(env_id, path)}")
    return path


def load_robomimic(env_id: str, path: str):
    """(data, episode_ends, env_args) from data/demo_N/{actions, rewards, dones, obs/*, next_obs/*} (numeric order):
    observations, actions, rewards - 1 (as the authors), masks = 1 - dones, terminals = dones or a demo's end, next_observations."""
    import h5py
    task = env_id.split("-")[0]
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        fail(f"{path} is not a readable HDF5 file ({e}); regenerate it with: {robomimic_generate_command(env_id, path)}")
    with f:
        check("data" in f and "env_args" in f["data"].attrs,
              f"{path} has no 'data' group with an env_args attribute; it is not a robomimic dataset")
        try:
            env_args = json.loads(f["data"].attrs["env_args"])
            env_name = env_args["env_name"]
        except (ValueError, KeyError, TypeError):
            fail(f"{path}: data.attrs['env_args'] is not JSON with env_name and env_kwargs")
        owner = {v[0]: k for k, v in ROBOMIMIC_TASKS.items()}.get(env_name)
        check(owner == task, f"{path} holds robosuite env '{env_name}' ({owner or 'not lift, can or square'}), but --env "
                             f"{env_id} needs {ROBOMIMIC_TASKS[task][0]}; pass the file for this task")
        demos = sorted((k for k in f["data"] if re.fullmatch(r"demo_\d+", k)), key=lambda k: int(k[5:]))  # demo_10 after demo_9
        check(demos, f"{path} has no data/demo_N groups")
        need = ["actions", "rewards", "dones"] + [f"{o}/{k}" for o in ("obs", "next_obs") for k in ROBOMIMIC_OBS_KEYS]
        parts = {k: [] for k in ("observations", "actions", "rewards", "dones", "next_observations")}
        for demo in demos:
            g = f["data"][demo]
            missing = [k for k in need if k not in g]
            check(not missing, f"{path}: data/{demo} lacks {missing}; low-dim observations need {list(ROBOMIMIC_OBS_KEYS)}")
            parts["observations"].append(np.concatenate([g["obs"][k][()] for k in ROBOMIMIC_OBS_KEYS], -1))  # [T, O]
            parts["next_observations"].append(np.concatenate([g["next_obs"][k][()] for k in ROBOMIMIC_OBS_KEYS], -1))
            for k in ("actions", "rewards", "dones"):
                parts[k].append(g[k][()])
    ends = np.concatenate([np.arange(len(a)) == len(a) - 1 for a in parts["actions"]])  # [N] last step of each demo
    cat = {k: np.concatenate(v).astype(np.float32) for k, v in parts.items()}
    check(all(len(v) == len(ends) for v in cat.values()) and cat["actions"].ndim == 2,
          f"{path}: per-demo arrays of different lengths (actions, rewards, dones, obs, next_obs)")
    return {"observations": cat["observations"], "actions": cat["actions"],
            "rewards": cat["rewards"] - 1.0,  # sparse 0/1 -> -1/0 (offline and online)
            "masks": 1.0 - cat["dones"],  # no bootstrap after done (success, or a demo's end)
            "terminals": np.maximum(cat["dones"], ends).astype(np.float32),  # chunks never cross demos
            "next_observations": cat["next_observations"]}, ends, env_args


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
        length = ROBOMIMIC_TASKS[env_id.split("-")[0]][1]
        self.max_episode_steps = max_episode_steps or min(length, kwargs.get("horizon", length))
        self.reward_shift, self.render_mode, self.t = reward_shift, render_mode, 0
        self.action_space = gym.spaces.Box(-1.0, 1.0, (self.env.action_dim,), np.float32)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, self._obs(self.env.reset()).shape, np.float32)

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


# ---- datasets of every family, checked against their env
def load_dataset(env_id: str, dataset_path: Optional[str] = None, env=None, reward_shift: float = 0.0, min_len: int = 1):
    """(env, data, episode_ends [N] bool, env_args) of a resolved id, checked by check_dataset; data: observations [N, O],
    actions [N, A], and rewards, masks, terminals, next_observations (OGBench, Robomimic) or rewards, terminals, timeouts
    (D4RL). env_args: how to rebuild a Robomimic env (else None). env: reuse this env (another shard)."""
    env_args = None
    if family(env_id) == "robomimic":  # data/demo_N of a low-dim file; the env from the file's env_args
        data, ends, env_args = load_robomimic(env_id, resolve_robomimic_file(env_id, dataset_path))
        env = env or RobomimicEnv(env_id, env_args, reward_shift)
    elif family(env_id) == "ogbench":
        env, data, _ = load_ogbench(env_id, dataset_path, env)
        ends = data["terminals"] > 0  # ogbench drops each episode's final state and marks the new last step
    else:
        check(dataset_path is not None, f"--env {env_id} is a gymnasium env: it needs --dataset-path to a D4RL-layout "
                                        f".npz ({', '.join(D4RL_KEYS)})")
        path = os.path.abspath(os.path.expanduser(dataset_path))
        check(os.path.isfile(path), f"--dataset-path {path} does not exist (or is a folder); pass a D4RL-layout .npz")
        try:
            with np.load(path) as f:
                data = {k: f[k] for k in D4RL_KEYS if k in f.files}
        except Exception as e:  # a truncated zip, a text file named .npz, ...
            fail(f"cannot read --dataset-path {path} as a NumPy .npz ({why(e)[:80]}); is the file complete?")
        missing = [k for k in D4RL_KEYS if k not in data]
        check(not missing, f"{path} lacks the keys {missing}; a D4RL-layout dataset needs {', '.join(D4RL_KEYS)}")
        env = env or make_env(env_id)
        ends = (data["terminals"] > 0) | (data["timeouts"] > 0)
    check_dataset(data, env, dataset_path or env_id, min_len)
    return env, data, ends, env_args


def check_dataset(data: dict, env, name: str, min_len: int = 1) -> None:
    """Refuse (one line) a dataset that does not fit `env`: observations (and next_observations) [N, O] and actions
    [N, A] of the env's sizes, every array of the same length N >= min_len, no NaN or inf, actions within bounds."""
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    for k, d in (("observations", obs_dim), ("next_observations", obs_dim), ("actions", act_dim)):
        if k in data or k != "next_observations":  # next_observations: where the format has them
            got = tuple(data[k].shape) if k in data else "missing"
            check(k in data and data[k].ndim == 2 and data[k].shape[1] == d, f"dataset {name}: '{k}' must have shape "
                  f"[N, {d}] for this env, got {got}; check --env/--task or regenerate the dataset")
    lengths = {k: len(v) for k, v in data.items()}
    check(len(set(lengths.values())) == 1, f"dataset {name}: arrays have different lengths {lengths}; one entry per step")
    n = len(data["observations"])
    check(n >= min_len, f"dataset {name} has only {n} transitions, fewer than one chunk ({min_len})")
    bad = next((k for k, v in data.items() if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all()), None)
    check(bad is None, f"dataset {name}: the dataset contains non-finite values in '{bad}'; regenerate it")
    low, high = env.action_space.low.astype(np.float64), env.action_space.high.astype(np.float64)
    bad = np.flatnonzero(((data["actions"] < low - 1e-4) | (data["actions"] > high + 1e-4)).any(1))
    check(len(bad) == 0, f"dataset {name}: {len(bad)} actions lie outside the env's action bounds [{low.min():g}, "
                         f"{high.max():g}] (the first at index {bad[:1].tolist()}); is it for this env, and unnormalized?")


# ---- envs: one per family, the chunk wrapper, vectorized evaluation envs
def make_env(env_id: str, env_args=None, render: bool = False, reward_shift: float = 0.0,
             max_episode_steps: Optional[int] = None) -> gym.Env:
    """The env of a resolved id: Robomimic's robosuite env rebuilt from env_args (reward: success + reward_shift),
    OGBench's singletask env, or gymnasium's; render: env.render() returns RGB frames."""
    limit = {} if max_episode_steps is None else {"max_episode_steps": max_episode_steps}
    if family(env_id) == "robomimic":
        return RobomimicEnv(env_id, env_args, reward_shift, max_episode_steps, "rgb_array" if render else None)
    if family(env_id) == "ogbench":
        import ogbench
        env = ogbench.make_env_and_datasets(env_id, env_only=True, **limit)
        if render:  # OGBench renders RGB arrays but declares no render mode
            env.unwrapped.render_mode = "rgb_array"
            env.unwrapped.metadata = {**env.unwrapped.metadata, "render_modes": ["rgb_array"], "render_fps": 20}
        return env
    try:
        return gym.make(env_id, **({"render_mode": "rgb_array"} if render else {}), **limit)
    except gym.error.Error as e:
        fail(f"cannot make gymnasium env '{env_id}' ({why(e)}); use a MuJoCo id like Hopper-v5 or an OGBench cube env")


class ChunkEnv(gym.Wrapper):
    """step(chunk) runs the chunk's actions open-loop up to the episode's end (one worker round trip per chunk): reward
    = their sum, info['steps'] = env steps taken (all of them: `executed_steps`), info['frames'] while `record` is set.
    obs_horizon None (DFP): obs [O], chunk [h * A] (h actions, flattened). obs_horizon To (DBP, DBPO): obs = the last
    To observations [To, O] (the first one repeated after a reset), chunk [h, A] (the Ta executed actions)."""

    def __init__(self, env: gym.Env, horizon: int, obs_horizon: Optional[int] = None):
        super().__init__(env)
        self.obs_horizon, self.act_dim, self.record, self.executed_steps = obs_horizon, env.action_space.shape[0], False, 0
        low, high = env.action_space.low, env.action_space.high
        if obs_horizon is None:  # [h * A]
            self.action_space = gym.spaces.Box(np.tile(low, horizon), np.tile(high, horizon), dtype=env.action_space.dtype)
        else:  # [h, A], and obs [To, O]
            self.action_space = gym.spaces.Box(np.stack([low] * horizon), np.stack([high] * horizon), dtype=np.float32)
            self.observation_space = gym.spaces.Box(-np.inf, np.inf, (obs_horizon, *env.observation_space.shape), np.float32)

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self.history = deque([np.asarray(obs, np.float32)] * (self.obs_horizon or 1), maxlen=self.obs_horizon or 1)
        return (obs if self.obs_horizon is None else np.stack(self.history)), info

    def step(self, chunk):
        total, frames = 0.0, []
        for steps, a in enumerate(np.asarray(chunk).reshape(-1, self.act_dim), 1):
            obs, r, terminated, truncated, info = self.env.step(a)
            total += r
            self.executed_steps += 1
            self.history.append(np.asarray(obs, np.float32))
            if self.record:
                frames.append(self.env.render())
            if terminated or truncated:
                break
        obs = obs if self.obs_horizon is None else np.stack(self.history)
        return obs, total, terminated, truncated, {**info, "steps": steps, **({"frames": frames} if frames else {})}


def make_chunk_env(env_id: str, horizon: int, obs_horizon: Optional[int] = None, **env_kwargs) -> ChunkEnv:
    """ChunkEnv(make_env(env_id, **env_kwargs)), with gymnasium's episode statistics (info['episode'], in env steps,
    at an episode's end). In a worker process, SIGINT is ignored first (worker_signals)."""
    worker_signals()
    return ChunkEnv(gym.wrappers.RecordEpisodeStatistics(make_env(env_id, **env_kwargs)), horizon, obs_horizon)


def make_eval_envs(env_id: str, num_envs: int, horizon: int, obs_horizon: Optional[int] = None, **env_kwargs):
    """num_envs make_chunk_env() envs stepped together: in this process for 1, in worker processes for more.
    Autoreset is off: evaluate() resets each env itself, with the seed of the episode it starts."""
    from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv
    fns = [functools.partial(make_chunk_env, env_id, horizon, obs_horizon, **env_kwargs)] * num_envs
    if num_envs == 1:
        return SyncVectorEnv(fns, autoreset_mode=AutoresetMode.DISABLED)
    envs = AsyncVectorEnv(fns, autoreset_mode=AutoresetMode.DISABLED)
    atexit.register(envs.close)  # before multiprocessing's own exit handler, which would wait on the workers
    return envs


# ---- evaluation: episode i has env seed seed + i and its own noise stream, whatever the number of envs
def episode_generator(seed: int, episode: int):
    """The torch.Generator (CPU) of evaluation episode `episode`: its own noise stream, whatever else runs."""
    import torch
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, episode]).generate_state(1)[0]))


def evaluate(envs, act: Callable, episodes: int, seed: int, stop: Callable = lambda: False,
             video_path: Optional[str] = None) -> Optional[dict]:
    """Means over `episodes` episodes on the M ChunkEnvs of `envs` (make_eval_envs): success (info['success'] at an
    episode's last step, NaN without), return, length (env steps), and each statistic act reports (averaged over an
    episode's chunks first); None if stop() became true (polled before every chunk). Episode i has env seed seed + i
    and noise episode_generator(seed, i): the result does not depend on M. video_path: episode 0 as an mp4.
    act(obs [B, ...] float32 array, generators: B torch.Generators) -> chunks [B, ...], or (chunks, {name: [B]})."""
    M = envs.num_envs
    episode = np.full(M, -1)  # the episode each env runs, -1: none left
    ret, length, n_chunks, gens, sums = np.zeros(M), np.zeros(M, int), np.zeros(M, int), [None] * M, {}
    obs = np.zeros((M,) + envs.single_observation_space.shape, np.float32)
    chunks = np.zeros((M,) + envs.single_action_space.shape, np.float32)  # idle envs (no episode left) get zeros
    results, frames, next_episode = {}, [], 0

    def start(js):  # the next episodes on envs js
        nonlocal next_episode
        mask, seeds = np.zeros(M, bool), [None] * M
        for j in js:
            episode[j] = next_episode if next_episode < episodes else -1
            if episode[j] >= 0:
                mask[j], seeds[j], gens[j] = True, seed + next_episode, episode_generator(seed, next_episode)
                ret[j], length[j], n_chunks[j], next_episode = 0.0, 0, 0, next_episode + 1
                for s in sums.values():
                    s[j] = 0.0
        if mask.any():
            o, _ = envs.reset(seed=seeds, options={"reset_mask": mask})
            obs[mask] = o[mask]
        if video_path is not None:
            envs.set_attr("record", [j == 0 and episode[0] == 0 for j in range(M)])  # env 0 runs episode 0 first

    try:
        start(range(M))
        while (episode >= 0).any():
            if stop():
                return None
            live = np.flatnonzero(episode >= 0)
            out = act(obs[live], [gens[j] for j in live])
            out, stats = out if isinstance(out, tuple) else (out, {})
            chunks[live] = np.asarray(out).reshape((len(live),) + chunks.shape[1:])
            for k, v in stats.items():  # e.g. DFP's critic value of the chosen chunk, eval/q_chosen
                sums.setdefault(k, np.zeros(M))[live] += v
            n_chunks[live] += 1
            next_obs, r, terminated, truncated, info = envs.step(chunks)
            if "frames" in info and info["_frames"][0]:
                frames += info["frames"][0]
            ended = []
            for j in live:
                ret[j], length[j], obs[j] = ret[j] + r[j], length[j] + info["steps"][j], next_obs[j]
                if terminated[j] or truncated[j]:
                    success = float(info["success"][j]) if "success" in info and info["_success"][j] else float("nan")
                    results[episode[j]] = (success, ret[j], length[j], *(s[j] / n_chunks[j] for s in sums.values()))
                    ended.append(j)
            if ended:
                start(ended)
    except (EOFError, ConnectionError):  # workers ended by a signal sent to the whole process group
        if stop():
            return None
        raise
    if len(frames) > 1:
        from moviepy import ImageSequenceClip
        os.makedirs(os.path.dirname(os.path.abspath(video_path)), exist_ok=True)
        with atomic(video_path) as tmp:
            ImageSequenceClip(frames, fps=30).write_videofile(tmp, logger=None)
    means = np.mean([results[i] for i in range(episodes)], 0)
    return dict(zip(("success", "return", "length", *sums), (float(v) for v in means)))
