"""The benchmarks (OGBench cube tasks, Robomimic low-dim tasks, gymnasium locomotion and its Minari datasets), shared by
the training scripts and the dataset generators: the env an --env names, its dataset (found, downloaded with a timeout,
or the command that makes it) and its checks, the env, the wrapper that executes an action chunk, and one seeded,
vectorized evaluation. Robomimic's files and robosuite env live in robomimic_tasks.py (imported here). Every bad input:
one `error:` line (runs.fail), exit code 2. Only episode_generator imports torch.

    env_id = envs.resolve_env_id("cube-single-play", task=1)  # cube-single-play-singletask-task1-v0
    env, data, ends, env_args = envs.load_dataset(env_id, args.dataset_path)
    res = envs.evaluate(envs.make_eval_envs(env_id, 4, horizon=5), act, episodes=50, seed=1001)  # success, return, ...
    envs.write_episodes("runs/x/eval_episodes.csv", res, step=0, env_steps=0, seed=1001)  # one row per episode
"""

import atexit
import contextlib
import functools
import os
import re
import sys
import warnings
from collections import deque
from collections.abc import Callable

# MuJoCo renders offscreen through EGL on a Linux machine without a display (before any env loads MuJoCo's GL).
if sys.platform == "linux" and not os.environ.get("DISPLAY"):
    os.environ.setdefault("MUJOCO_GL", "egl")

import gymnasium as gym
import numpy as np

from robomimic_tasks import RobomimicEnv, load_robomimic, resolve_robomimic_file
from runs import atomic, bounded_download, check, fail, require, why, worker_signals

# ---- families: which benchmark an env id belongs to
ROBOMIMIC_NAME = r"((lift|can|square|transport)-(mh|ph)|tool_hang-ph)(-low_dim|-image)?"  # lift-mh-low_dim: lift-mh
CUBE_NAME = r"(cube-(single|double|triple|quadruple)-play)(-singletask)?(-task([1-5]))?(-v0)?"
OGBENCH_ID = r"(cube-(single|double|triple|quadruple)|scene|puzzle-(3x3|4x4|4x5|4x6))-play-singletask-task[1-5]-v0"
LOCOMOTION_ENVS = ("Hopper-v5", "Walker2d-v5", "Ant-v5")  # gymnasium MuJoCo, as the authors' D4RL tasks
D4RL_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")  # a gymnasium env's dataset (.npz)
MINARI_ID = r"mujoco/([a-z0-9]+)/[a-z0-9_-]+-v\d+"  # Minari's mujoco/hopper/medium-v0: D4RL-style, on gymnasium envs


def family(env_id: str) -> str:
    """'robomimic', 'ogbench' or 'gym' (Minari ids too) for a resolved id; the first two are manipulation (success)."""
    return (
        "robomimic"
        if re.fullmatch(ROBOMIMIC_NAME, env_id)
        else "ogbench"
        if re.fullmatch(OGBENCH_ID, env_id)
        else "gym"
    )


def resolve_env_id(env: str, task: int | None = None, gym_ids=(), minari: bool = True) -> str:
    """The env id an --env value names: 'cube-triple-play' -> 'cube-triple-play-singletask-task2-v0' (task 2 unless
    --task, which also overrides a full id's); other OGBench singletask ids (scene, puzzle) as they are; Robomimic
    'lift-mh' (or 'lift-mh-low_dim') -> 'lift-mh'; Minari ids (mujoco/hopper/medium-v0); gymnasium ids in gym_ids
    (None: any registered one); minari=False refuses Minari ids (and leaves them out of the message)."""
    cube = re.fullmatch(CUBE_NAME, env)
    check(task is None or cube is None or 1 <= task <= 5, f"--task must be in 1..5, got {task}")
    if cube is not None:
        return f"{cube.group(1)}-singletask-task{task if task is not None else int(cube.group(5) or 2)}-v0"
    known = (minari and re.fullmatch(MINARI_ID, env)) or (env in gym.registry if gym_ids is None else env in gym_ids)
    if family(env) != "gym" or known:
        check(task is None, "--task only applies to cube-* names; drop it (or put the task in the full OGBench id)")
        return env.removesuffix("-low_dim")
    gyms = ", a gymnasium id like Hopper-v5" if gym_ids is None else "".join(f", {g}" for g in gym_ids)
    fail(
        f"unknown env '{env}'; valid: {', '.join(f'cube-{k}-play' for k in CUBE_PLAY_EPISODES)} (or a full id like "
        f"cube-double-play-singletask-task2-v0), Robomimic lift/can/square/transport-mh/ph or tool_hang-ph (+ -image)"
        + (f", Minari mujoco/hopper/medium-v0{gyms}" if minari else "")
    )


# ---- OGBench: datasets in ~/.ogbench/data, else a bounded download, else the command that regenerates them
OGBENCH_DATA_DIR = "~/.ogbench/data"
CUBE_PLAY_EPISODES = {"single": 1000, "double": 1000, "triple": 3000, "quadruple": 5000}  # official sizes
CUBE_OBS_DIM = {"single": 28, "double": 37, "triple": 46, "quadruple": 55}  # observation size by number of cubes
ORACLE_STEPS_PER_SEC = 200  # per CPU core, measured with bench/bench_generate.py (README, Data)


def generate_command(dataset_file: str) -> str:
    """The scripts/generate_ogbench_dataset.py command that regenerates `dataset_file`, and how long it takes."""
    out_dir, name = os.path.split(os.path.abspath(os.path.expanduser(dataset_file)))
    m = re.fullmatch(r"cube-(single|double|triple|quadruple)-(play|expert-task([1-5]))-v0\.npz", name)
    if m is None:
        return "python scripts/generate_ogbench_dataset.py --help (not a standard dataset name; see the README, Data)"
    cmd = f"python scripts/generate_ogbench_dataset.py --env cube-{m.group(1)}-play"
    cmd += f" --kind expert --task {m.group(3)}" if m.group(3) else ""
    cmd += f" --out-dir {out_dir}" if out_dir != os.path.abspath(os.path.expanduser(OGBENCH_DATA_DIR)) else ""
    if m.group(3):
        return cmd  # expert demos stop once solved: minutes, not hours
    steps = int(CUBE_PLAY_EPISODES[m.group(1)] * 1.1) * 1001  # +10% val episodes, 1001 steps each
    cores = os.cpu_count() or 1
    minutes = steps / (ORACLE_STEPS_PER_SEC * cores) / 60
    return f"{cmd}  ({steps / 1e6:.1f}M oracle steps: about {minutes:.0f} min on {cores} CPU cores, faster with more)"


def ogbench_default_path(env_id: str) -> str:
    """Where the scripts look first for a singletask id's play file: ~/.ogbench/data/cube-double-play-v0.npz, -val."""
    return os.path.join(os.path.expanduser(OGBENCH_DATA_DIR), re.sub(r"-singletask-task\d", "", env_id) + ".npz")


def load_ogbench(env_id: str, dataset_path: str | None = None, env=None, timeout: float = 30.0):
    """(env, train, val) of a singletask id (ogbench.make_env_and_datasets; with `env`, only the data is read: a shard).
    The dataset: dataset_path (with its -val twin), else ~/.ogbench/data/<dataset>.npz, else OGBench's download (each
    connect and read bounded by `timeout` s); else one error with the command that regenerates it."""
    import ogbench

    if dataset_path is not None:
        path = os.path.abspath(os.path.expanduser(dataset_path))
        twin = path.replace(".npz", "-val.npz")  # ogbench's own rule for the -val twin
        check(
            os.path.isfile(path) and os.path.isfile(twin),
            f"--dataset-path {path} or its twin "
            f"{os.path.basename(twin)} does not exist; create both with: {generate_command(path)}",
        )
    else:
        path = ogbench_default_path(env_id)
        twin = path.replace(".npz", "-val.npz")
    if not (os.path.isfile(path) and os.path.isfile(twin)):  # not in the default folder (a given path was checked)
        data_dir, name = os.path.dirname(path), os.path.basename(path)[: -len(".npz")]  # cube-double-play-v0
        with bounded_download(
            timeout,
            [path + ".tmp", twin + ".tmp"],
            f"{name} is not in {data_dir} and downloading it",
            f"regenerate it locally with: {generate_command(path)}",
        ):
            ogbench.download_datasets([name], data_dir)
    try:
        if env is None:
            return quiet_ogbench(env_id, dataset_path=path)
        return env, *ogbench.make_env_and_datasets(env_id, dataset_path=path, dataset_only=True, cur_env=env)
    except Exception as e:  # a truncated zip, a text file named .npz, a missing key, another env's file, ...
        check_cube_size(env_id, path)
        fail(
            f"could not read dataset {path} ({why(e)}); it needs observations, actions, terminals, qpos, qvel (OGBench "
            f"format) and a -val twin; regenerate it with: {generate_command(path)}"
        )


def check_cube_size(env_id: str, path: str) -> None:
    """Refuse in one line a cube dataset made for another number of cubes than env_id's (its observation size says
    which); a file that cannot be read at all is left to the caller's message."""
    made = want = None
    with contextlib.suppress(Exception), np.load(path) as f:
        made = {v: k for k, v in CUBE_OBS_DIM.items()}.get(f["observations"].shape[-1])
        want = re.match(r"cube-(\w+?)-play", env_id).group(1)
    check(
        made is None or want is None or made == want,
        f"dataset {path} was made for cube-{made}-play (observations of size {CUBE_OBS_DIM.get(made)}), not for "
        f"{env_id} (size {CUBE_OBS_DIM.get(want)}); pass --env cube-{made}-play, or a dataset of {env_id}",
    )


def quiet_ogbench(env_id: str, **kwargs):
    """ogbench.make_env_and_datasets (with an env) without gymnasium's "Box low's/high's precision lowered" warnings:
    OGBench's action_space property builds a float64-bounded Box at each read (make, reset); read once, it becomes a
    float32 class attribute of the env's own subclass."""
    import ogbench

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r".*Box (low|high)'s precision lowered by casting to float32")
        out = ogbench.make_env_and_datasets(env_id, **kwargs)
        env = (out[0] if isinstance(out, tuple) else out).unwrapped
        env.__class__ = type(type(env).__name__, (type(env),), {"action_space": env.action_space})
    return out


def shard_paths(folder: str) -> list:
    """The dataset shards in a folder (cube-quadruple-play-100m): its *.npz files, sorted, each with its -val twin."""
    check(os.path.isdir(folder), f"--dataset-dir {folder} is not a folder")
    shards = sorted(os.path.join(folder, f) for f in os.listdir(folder) if re.search(r"(?<!-val)\.npz$", f))
    for p in shards:
        check(
            os.path.isfile(p.replace(".npz", "-val.npz")), f"the shard {p} has no -val twin; add it or remove the shard"
        )
    check(shards, f"--dataset-dir {folder} holds no *.npz shards (+ -val twins)")
    return shards


# ---- Minari: mujoco/<env>/<level>-v0 datasets in $MINARI_DATASETS_PATH (else ~/.minari/datasets), else a download
def load_minari(env_id: str, with_data: bool = True):
    """(env spec, data) of a Minari id: its dataset in the root, else one error with the command that makes it here
    (no download: minari's needs its [hf] extra, which the project does not install). The spec (of the env it was
    recorded on) must name the id's env (mujoco/hopper/... -> Hopper-v5). data (with_data): D4RL's layout,
    observations [N, O], actions [N, A], rewards, terminals, timeouts [N] (truncations)."""
    require("minari", f"the Minari dataset {env_id}")
    import minari

    root = os.path.abspath(os.path.expanduser(os.environ.get("MINARI_DATASETS_PATH") or "~/.minari/datasets"))
    folder, make = os.path.join(root, env_id), f"python scripts/generate_locomotion_dataset.py --dataset-id {env_id}"
    check(
        os.path.isdir(os.path.join(folder, "data")),
        f"the Minari dataset {env_id} is not in {root} (Minari datasets are not downloaded); make it with: {make}",
    )
    try:
        spec, name = (dataset := minari.load_dataset(env_id)).env_spec, re.fullmatch(MINARI_ID, env_id).group(1)
        check(
            spec is not None and spec.name.lower() == name,
            f"the Minari dataset {folder} was recorded on "
            f"{spec and spec.id}, not on the {name} env its id names; regenerate it with: {make} --overwrite",
        )
        if not with_data:
            return spec, None
        cols = [
            (
                ep.observations[:-1],
                ep.actions,
                ep.rewards,
                ep.terminations,  # observations [T + 1, O]: s_0 .. s_T
                ep.truncations | (~ep.terminations & (np.arange(len(ep.rewards)) == len(ep.rewards) - 1)),
            )
            for ep in dataset.iterate_episodes()
        ]
        return spec, {k: np.concatenate(v) for k, v in zip(D4RL_KEYS, zip(*cols, strict=True), strict=True)}
    except Exception as e:  # a truncated HDF5 file, damaged metadata, episodes of different layouts, ...
        fail(f"could not read the Minari dataset {folder} ({why(e)}); regenerate it with: {make} --overwrite")


# make_env's: a Minari id's env spec, read once per process and root ($MINARI_DATASETS_PATH, part of the cache key)
minari_env_spec = functools.lru_cache(maxsize=None)(lambda env_id, root: load_minari(env_id, with_data=False)[0])


# ---- datasets of every family, checked against their env
def load_dataset(env_id: str, dataset_path: str | None = None, env=None, reward_shift=0.0, min_len=1, obs_keys=None):
    """(env, data, episode_ends [N] bool, env_args) of a resolved id, checked by check_dataset; data: observations
    [N, O], actions [N, A], and rewards, masks, terminals, next_observations (OGBench, Robomimic) or rewards, terminals,
    timeouts (D4RL's layout: a Minari id's or a .npz); a Robomimic image id's also images uint8 [N, C, H, W, 3] (or a
    lazy reader) beside its low-dim observations. env_args: how to rebuild a Robomimic env (else None), with its
    image_layout. env: reuse this env."""
    env_args = None
    if family(env_id) == "robomimic":  # data/demo_N of a low-dim file; the env from the file's env_args
        data, ends, env_args = load_robomimic(env_id, resolve_robomimic_file(env_id, dataset_path), obs_keys)
        env = env or RobomimicEnv(env_id, env_args, reward_shift)
        want, have = getattr(env, "image_layout", None), env_args.get("image_layout")  # cameras and their size
        check(
            want == have,
            f"--env {env_id}: the env observes {want} but the dataset holds {have}; pass a file rendered (or an env "
            f"built) for the same cameras and image size",
        )
    elif family(env_id) == "ogbench":
        env, data, _ = load_ogbench(env_id, dataset_path, env)
        ends = data["terminals"] > 0  # ogbench drops each episode's final state and marks the new last step
    elif re.fullmatch(MINARI_ID, env_id):
        check(
            dataset_path is None, f"--env {env_id} is a Minari dataset (in its root, not a file): drop --dataset-path"
        )
        data = load_minari(env_id)[1]
    else:
        check(
            dataset_path is not None,
            f"--env {env_id} is a gymnasium env: it needs --dataset-path to a D4RL-layout "
            f".npz ({', '.join(D4RL_KEYS)}), or a Minari id like mujoco/hopper/medium-v0",
        )
        path = os.path.abspath(os.path.expanduser(dataset_path))
        check(os.path.isfile(path), f"--dataset-path {path} does not exist (or is a folder); pass a D4RL-layout .npz")
        try:
            with np.load(path) as f:
                data = {k: f[k] for k in D4RL_KEYS if k in f.files}
        except Exception as e:  # a truncated zip, a text file named .npz, ...
            fail(f"cannot read --dataset-path {path} as a NumPy .npz ({why(e)[:80]}); is the file complete?")
        missing = [k for k in D4RL_KEYS if k not in data]
        check(not missing, f"{path} lacks the keys {missing}; a D4RL-layout dataset needs {', '.join(D4RL_KEYS)}")
    if family(env_id) == "gym":  # D4RL's layout; gymnasium's env, or the one the Minari dataset was recorded on
        env, ends = env or make_env(env_id), (data["terminals"] > 0) | (data["timeouts"] > 0)
    check_dataset(data, env, dataset_path or env_id, min_len)
    return env, data, ends, env_args


def check_dataset(data: dict, env, name: str, min_len: int = 1) -> None:
    """Refuse (one line) a dataset that does not fit `env`: observations (and next_observations) [N, O] and actions
    [N, A] of the env's sizes, every array of the same length N >= min_len, no NaN or inf, actions within bounds."""
    layout = getattr(env, "image_layout", None)  # an image env's observations: the low-dim part; images apart
    obs_dim, act_dim = layout["low_dim"] if layout else env.observation_space.shape[0], env.action_space.shape[0]
    for k, d in (("observations", obs_dim), ("next_observations", obs_dim), ("actions", act_dim)):
        if k in data or k != "next_observations":  # next_observations: where the format has them
            got = tuple(data[k].shape) if k in data else "missing"
            check(
                k in data and data[k].ndim == 2 and data[k].shape[1] == d,
                f"dataset {name}: '{k}' must have shape "
                f"[N, {d}] for this env, got {got}; check --env/--task or regenerate the dataset",
            )
    lengths = {k: len(v) for k, v in data.items()}
    check(
        len(set(lengths.values())) == 1, f"dataset {name}: arrays have different lengths {lengths}; one entry per step"
    )
    n = len(data["observations"])
    check(n >= min_len, f"dataset {name} has only {n} transitions, fewer than one chunk ({min_len})")
    bad = next((k for k, v in data.items() if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all()), None)
    check(bad is None, f"dataset {name}: the dataset contains non-finite values in '{bad}'; regenerate it")
    low, high = env.action_space.low.astype(np.float64), env.action_space.high.astype(np.float64)
    bad = np.flatnonzero(((data["actions"] < low - 1e-4) | (data["actions"] > high + 1e-4)).any(1))
    check(
        len(bad) == 0,
        f"dataset {name}: {len(bad)} actions lie outside the env's action bounds [{low.min():g}, "
        f"{high.max():g}] (the first at index {bad[:1].tolist()}); is it for this env, and unnormalized?",
    )


# ---- envs: one per family, the chunk wrapper, vectorized evaluation envs
def make_env(
    env_id: str, env_args=None, render: bool = False, reward_shift: float = 0.0, max_episode_steps: int | None = None
) -> gym.Env:
    """The env of a resolved id: Robomimic's robosuite env rebuilt from env_args (reward: success + reward_shift),
    OGBench's singletask env, gymnasium's, or the one a Minari dataset was recorded on; render: RGB frames."""
    if family(env_id) == "robomimic":
        return RobomimicEnv(env_id, env_args, reward_shift, max_episode_steps, "rgb_array" if render else None)
    if family(env_id) == "ogbench":
        env = quiet_ogbench(env_id, env_only=True, max_episode_steps=max_episode_steps)  # None: the env's own
        if render:  # OGBench renders RGB arrays but declares no render mode
            env.unwrapped.render_mode = "rgb_array"
            env.unwrapped.metadata = {**env.unwrapped.metadata, "render_modes": ["rgb_array"], "render_fps": 20}
        return env
    spec = (
        minari_env_spec(env_id, os.environ.get("MINARI_DATASETS_PATH")) if re.fullmatch(MINARI_ID, env_id) else env_id
    )
    try:
        return gym.make(spec, **({"render_mode": "rgb_array"} if render else {}), max_episode_steps=max_episode_steps)
    except gym.error.Error as e:
        fail(f"cannot make gymnasium env '{env_id}' ({why(e)}); use a MuJoCo id like Hopper-v5 or an OGBench cube env")


class ChunkEnv(gym.Wrapper):
    """step(chunk) runs the chunk's actions open-loop up to the episode's end (one worker round trip per chunk): reward
    = their sum, info['steps'] = env steps taken (all of them: `executed_steps`), info['frames'] while `record` is set.
    obs_horizon None (DFP): obs [O], chunk [h * A] (h actions, flattened). obs_horizon To (DBP, DBPO): obs = the last
    To observations [To, O] (the first one repeated after a reset), chunk [h, A] (the Ta executed actions)."""

    def __init__(self, env: gym.Env, horizon: int, obs_horizon: int | None = None):
        super().__init__(env)
        self.obs_horizon, self.act_dim, self.record, self.executed_steps = (
            obs_horizon,
            env.action_space.shape[0],
            False,
            0,
        )
        low, high = env.action_space.low, env.action_space.high
        if obs_horizon is None:  # [h * A]
            self.action_space = gym.spaces.Box(
                np.tile(low, horizon), np.tile(high, horizon), dtype=env.action_space.dtype
            )
        else:  # [h, A], and obs [To, O]
            self.action_space = gym.spaces.Box(np.stack([low] * horizon), np.stack([high] * horizon), dtype=np.float32)
            self.observation_space = gym.spaces.Box(
                -np.inf, np.inf, (obs_horizon, *env.observation_space.shape), np.float32
            )

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self.history = deque([np.asarray(obs, np.float32)] * (self.obs_horizon or 1), maxlen=self.obs_horizon or 1)
        return (obs if self.obs_horizon is None else np.stack(self.history)), info

    def step(self, chunk):
        total, frames, start = 0.0, [], self.executed_steps
        for a in np.asarray(chunk).reshape(-1, self.act_dim):
            obs, r, terminated, truncated, info = self.env.step(a)
            total, self.executed_steps = total + r, self.executed_steps + 1
            self.history.append(np.asarray(obs, np.float32))
            if self.record:
                frames.append(self.env.render())
            if terminated or truncated:
                break
        obs = obs if self.obs_horizon is None else np.stack(self.history)
        return (
            obs,
            total,
            terminated,
            truncated,
            {**info, "steps": self.executed_steps - start, **({"frames": frames} if frames else {})},
        )


def make_chunk_env(env_id: str, horizon: int, obs_horizon: int | None = None, **env_kwargs) -> ChunkEnv:
    """ChunkEnv(make_env(env_id, **env_kwargs)), with gymnasium's episode statistics (info['episode'], in env steps,
    at an episode's end). In a worker process, SIGINT is ignored first (worker_signals)."""
    worker_signals()
    return ChunkEnv(gym.wrappers.RecordEpisodeStatistics(make_env(env_id, **env_kwargs)), horizon, obs_horizon)


def make_eval_envs(env_id: str, num_envs: int, horizon: int, obs_horizon: int | None = None, **env_kwargs):
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


def evaluate(
    envs, act: Callable, episodes: int, seed: int, stop: Callable = lambda: False, video_path: str | None = None
) -> dict | None:
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
    rows = np.array([results[i] for i in range(episodes)], dtype=np.float64)  # [episodes, 3 + len(sums)]
    return {
        **dict(zip(("success", "return", "length", *sums), rows.mean(0).tolist(), strict=True)),
        "episodes": rows[:, :3],
    }


EPISODE_COLUMNS = ("step", "env_steps", "episode", "env_seed", "success", "return", "length")  # write_episodes' CSV


def write_episodes(path: str, res: dict, step: int, env_steps: int, seed: int) -> None:
    """Add one evaluation's episodes (res["episodes"] of evaluate) to the CSV `path` (EPISODE_COLUMNS), atomically.
    Rows of this step or later (a resumed run redoing them) are replaced."""
    n = len(EPISODE_COLUMNS)
    old = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2) if os.path.exists(path) else np.zeros((0, n))
    new = [[step, env_steps, i, seed + i, *row] for i, row in enumerate(res["episodes"])]
    rows = np.concatenate([old[old[:, 0] < step], np.array(new, dtype=np.float64).reshape(-1, n)])
    with atomic(path) as tmp:
        np.savetxt(
            tmp, rows, delimiter=",", header=",".join(EPISODE_COLUMNS), comments="", fmt=["%d"] * 4 + ["%.10g"] * 3
        )
