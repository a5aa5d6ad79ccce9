# Drifting Field Policy (DFP): offline-to-online RL with a one-step drifting policy over action chunks.
# docs/algorithms.md §3; paper: Koo et al. 2026, "Drifting Field Policy", arXiv 2605.07727.
#   python dfp_offline_to_online.py --env cube-triple-play --K 4 --N 16
# Guarantees (validation, signals, resume, evaluation): docs/dfp_reliability.md.
# Offline: drift the actor toward the data chunk (L_BC) while Q-chunking critics learn from the data.
# Online: drift toward the top-K of N candidates of a slow EMA policy pi_old scored by the critic,
#   L = lambda * L_topK + L_BC, with the replay buffer seeded by the offline data.
import atexit
import contextlib
import functools
import importlib.util
import io
import itertools
import json
import math
import os
import random
import re
import shlex
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal, Optional, Tuple

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

import drift_field


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda will be used when available"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases (imported lazily)"""
    wandb_project_name: str = "drift-policies"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    capture_video: bool = False
    """if toggled, each evaluation's first episode is saved as <run folder>/videos/eval_<step>.mp4 (MUJOCO_GL=egl)"""
    save_model: bool = True
    """if toggled, checkpoints go to <run folder>/checkpoint.pt (every --save-interval, at the end, on Ctrl-C)"""
    num_threads: int = 0
    """torch CPU threads (0: torch's default)"""

    # Environment and data
    env: str = "cube-triple-play"
    """cube-{single,double,triple,quadruple}-play (task 2 unless --task), a full OGBench singletask id, or Robomimic {lift,can,square}-{mh,ph}"""
    task: Optional[int] = None
    """singletask task 1..5 (overrides the task in --env)"""
    dataset_path: Optional[str] = None
    """an OGBench .npz (with its -val twin) or a Robomimic low_dim_v15.hdf5; default: ~/.ogbench/data or ~/.robomimic, then a bounded download"""
    dataset_dir: Optional[str] = None
    """a folder of dataset shards (*.npz with -val twins), one in memory at a time (cube-quadruple-play-100m)"""
    shard_interval: int = 1000
    """offline steps between shard rotations with --dataset-dir"""

    # Algorithm specific arguments
    offline_steps: int = 1_000_000
    """gradient steps of the offline phase"""
    online_steps: int = 1_000_000
    """environment steps of the online phase"""
    horizon: int = 5
    """action chunk length h (executed open-loop)"""
    batch_size: int = 256
    """batch size B of every update"""
    lr: float = 3e-4
    """Adam learning rate of actor and critic"""
    discount: float = 0.99
    """discount gamma per environment step"""
    tau: float = 0.005
    """Polyak rate of the target critic"""
    hidden_dim: int = 512
    """width of actor and critic MLPs"""
    num_layers: int = 4
    """hidden layers of actor and critic MLPs"""
    num_critics: int = 2
    """critic ensemble size (aggregated by mean)"""
    num_gen: int = 8
    """generated samples per state for the drift losses"""
    temperatures: Tuple[float, ...] = (0.1,)
    """drift kernel temperatures R (official field)"""
    drift_field: Literal["official", "gaussian"] = "official"
    """official: the normalized multi-temperature loss (docs/algorithms.md §2); gaussian: the mean-shift field (§1)"""
    bandwidth: float = 1.0
    """Gaussian kernel bandwidth h_k for --drift-field gaussian"""
    alpha: float = 1.0
    """weight of the offline BC drift loss"""
    N: int = 16
    """online: candidates drawn from the EMA policy pi_old per state"""
    K: int = 4
    """online: top-K candidates by Q used as positives"""
    topk_weight: float = 0.5
    """online: lambda, the weight of the top-K drift loss"""
    bc_weight: float = 1.0
    """online: weight of the BC drift loss toward the batch chunk"""
    online_mode: Literal["hard", "soft"] = "hard"
    """hard: uniform top-K positives; soft: positives weighted by min-max normalized Q"""
    ema_tau: float = 1e-4
    """online: EMA rate of pi_old per update (reset to the actor at the switch)"""
    q_best_of: int = 16
    """actor samples scored by the critic to choose a' in the TD target"""
    act_best_of: int = 16
    """actor samples scored by the critic when acting (1: a single sample, no critic)"""
    start_training: int = 5000
    """online env steps before updates start"""
    utd_ratio: int = 1
    """online updates per env step"""
    buffer_size: int = 2_000_000
    """replay buffer capacity (offline data + online transitions)"""

    # Speed (off by default: the same update, wrapped; see docs/dfp.md, Performance)
    compile: bool = False
    """if toggled, the update (losses, backward, Adam, Polyak/EMA) is wrapped in torch.compile"""
    cudagraphs: bool = False
    """if toggled, the whole update is captured as a CUDA graph and replayed (needs CUDA; combines with --compile)"""

    # Logging, evaluation, checkpoints
    eval_interval: int = 100_000
    """steps between evaluations (also at step 1, at the end of the offline phase and at the end)"""
    eval_episodes: int = 50
    """episodes per evaluation (episode i: env seed seed + 1000 + i and its own policy noise)"""
    eval_envs: Optional[int] = None
    """envs stepped together in evaluation, in worker processes when > 1 (default: min(CPU cores, --eval-episodes))"""
    log_interval: int = 5000
    """steps between loss logs and progress lines"""
    save_interval: int = 100_000
    """steps (offline gradient steps, then online env steps) between checkpoints"""
    resume: Optional[str] = None
    """continue a run from this checkpoint"""
    eval_only: bool = False
    """only evaluate the policy of --checkpoint"""
    checkpoint: Optional[str] = None
    """checkpoint for --eval-only"""
    runs_dir: str = "runs"
    """where run folders (tensorboard, checkpoint, videos) go"""
    run_name: Optional[str] = None
    """the run folder's name under --runs-dir (default: <env_id>__<exp_name>__<seed>__<unix time>)"""


# ---- OGBench dataset resolution: the shared recipe. Every training script pastes this block unchanged
# ---- (CleanRL duplicates instead of importing); tests/test_generate_dataset.py checks the copies match.
# Order: --dataset-path if given; else ~/.ogbench/data/<dataset>.npz if present; else OGBench's download with
# a bounded socket timeout; if that fails, one error with the exact command that regenerates the file.
# Needs at module top: import os, re, socket / from typing import Optional
OGBENCH_DATA_DIR = "~/.ogbench/data"
CUBE_PLAY_EPISODES = {"single": 1000, "double": 1000, "triple": 3000, "quadruple": 5000}  # official sizes
ORACLE_STEPS_PER_SEC = 200  # per CPU core, measured with bench/bench_generate.py (README, Data)


def resolve_env_id(env: str, task: Optional[int] = None) -> str:
    """'cube-triple-play' -> 'cube-triple-play-singletask-task2-v0'; full ids pass; --task N overrides."""
    m = re.fullmatch(r"(cube-(single|double|triple|quadruple)-play)(-singletask)?(-task([1-5]))?(-v0)?", env)
    if m is None:
        valid = ", ".join(f"cube-{k}-play" for k in CUBE_PLAY_EPISODES)
        raise SystemExit(f"error: unknown env '{env}'; valid: {valid} (or a full id like cube-double-play-singletask-task2-v0)")
    if task is not None and not 1 <= task <= 5:
        raise SystemExit(f"error: --task must be in 1..5, got {task}")
    task = task if task is not None else int(m.group(5) or 2)  # task 2: the paper's default
    return f"{m.group(1)}-singletask-task{task}-v0"


def generate_command(dataset_file: str) -> str:
    """The scripts/generate_ogbench_dataset.py command that regenerates `dataset_file`, and how long it takes."""
    out_dir, name = os.path.split(os.path.abspath(os.path.expanduser(dataset_file)))
    m = re.fullmatch(r"cube-(single|double|triple|quadruple)-(play|expert-task([1-5]))-v0\.npz", name)
    if m is None:
        return "python scripts/generate_ogbench_dataset.py --help  (no standard dataset name; see the README's Data section)"
    cmd = f"python scripts/generate_ogbench_dataset.py --env cube-{m.group(1)}-play"
    if m.group(3):
        cmd += f" --kind expert --task {m.group(3)}"
    if out_dir != os.path.abspath(os.path.expanduser(OGBENCH_DATA_DIR)):
        cmd += f" --out-dir {out_dir}"
    if m.group(3):
        return cmd  # expert demos stop once solved: minutes, not hours
    steps = int(CUBE_PLAY_EPISODES[m.group(1)] * 1.1) * 1001  # +10% validation episodes of 1001 steps
    cores = os.cpu_count() or 1
    minutes = steps / (ORACLE_STEPS_PER_SEC * cores) / 60
    return f"{cmd}\n  ({steps / 1e6:.1f}M oracle steps: about {minutes:.0f} min on {cores} CPU cores, faster with more)"


def load_ogbench(env_id: str, dataset_path: Optional[str] = None, compact: bool = False, timeout: float = 30.0):
    """(env, train_dataset, val_dataset) for a singletask id such as cube-double-play-singletask-task2-v0."""
    import ogbench

    splits = env_id.split("-")
    dataset_name = "-".join(splits[: splits.index("singletask")] + splits[-1:])  # cube-double-play-v0
    if dataset_path is not None:
        dataset_path = os.path.abspath(os.path.expanduser(dataset_path))
        val_path = dataset_path.replace(".npz", "-val.npz")  # ogbench's own rule for the -val twin
        if not (os.path.isfile(dataset_path) and os.path.isfile(val_path)):
            raise SystemExit(
                f"error: --dataset-path {dataset_path} or its twin {os.path.basename(val_path)} does not exist. "
                f"Create both with:\n  {generate_command(dataset_path)}"
            )
    else:
        data_dir = os.path.expanduser(OGBENCH_DATA_DIR)
        dataset_path = os.path.join(data_dir, f"{dataset_name}.npz")
        val_path = os.path.join(data_dir, f"{dataset_name}-val.npz")
        if not (os.path.isfile(dataset_path) and os.path.isfile(val_path)):
            # ogbench's downloader sets no timeout; a default socket timeout bounds every connect and read,
            # so a dead network fails after `timeout` seconds without progress instead of hanging.
            old_timeout = socket.getdefaulttimeout()
            socket.setdefaulttimeout(timeout)
            try:
                ogbench.download_datasets([dataset_name], data_dir)
            except (OSError, ValueError) as e:  # URLError, socket.timeout, ConnectionError are OSErrors
                raise SystemExit(
                    f"error: {dataset_name} is not in {data_dir} and downloading it failed "
                    f"({type(e).__name__}: {e}). Regenerate it locally with:\n  {generate_command(dataset_path)}"
                ) from None
            finally:
                socket.setdefaulttimeout(old_timeout)
                for p in (dataset_path, val_path):  # the downloader's half-written <file>.tmp, if any
                    if os.path.exists(p + ".tmp"):
                        os.remove(p + ".tmp")
    return ogbench.make_env_and_datasets(env_id, dataset_path=dataset_path, compact_dataset=compact)


# ---- end of OGBench dataset resolution

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

OTHER_ENV_RE = r"(scene|puzzle-(3x3|4x4|4x5|4x6))-play-singletask-task[1-5]-v0"  # ids beyond the cube names


def mlp(in_dim: int, out_dim: int, hidden_dim: int, num_layers: int, layer_norm: bool) -> nn.Sequential:
    layers, d = [], in_dim
    for _ in range(num_layers):
        layers += [nn.Linear(d, hidden_dim), nn.GELU()] + ([nn.LayerNorm(hidden_dim)] if layer_norm else [])
        d = hidden_dim
    return nn.Sequential(*layers, nn.Linear(d, out_dim))


class Actor(nn.Module):
    """One-step pushforward policy a = f_theta(s, eps), eps ~ N(0, I), dim(eps) = dim(a) = h * action_dim."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, num_layers: int):
        super().__init__()
        self.act_dim = act_dim
        self.net = mlp(obs_dim + act_dim, act_dim, hidden_dim, num_layers, layer_norm=False)

    def forward(self, obs: torch.Tensor, n: int, generator=None) -> torch.Tensor:
        """n chunks per state: obs [B, O] -> actions [B, n, D], clipped to [-1, 1] (1 NFE each).
        generator: None (the global RNG) or a list of B CPU torch.Generators, one per state (evaluation)."""
        obs = obs[:, None, :].expand(-1, n, -1)  # [B, n, O]
        eps = (torch.randn(*obs.shape[:2], self.act_dim, device=obs.device) if generator is None else
               torch.stack([torch.randn(n, self.act_dim, generator=g) for g in generator]).to(obs.device))  # [B, n, D]
        return self.net(torch.cat([obs, eps], -1)).clamp(-1.0, 1.0)


class Critic(nn.Module):
    """Ensemble of E Q(s, a_chunk) MLPs run as one batched network (one matmul per layer), returning [E, ...]: member e
    is mlp(O + D, 1, hidden_dim, num_layers, layer_norm=True) with slice e of the stacked weights."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, num_layers: int, num_critics: int):
        super().__init__()
        E, dims = num_critics, [obs_dim + act_dim] + [hidden_dim] * num_layers + [1]
        bound = lambda d_in: 1.0 / d_in**0.5  # noqa: E731  nn.Linear's init: U(-1/sqrt(d_in), 1/sqrt(d_in))
        self.weights = nn.ParameterList(nn.init.uniform_(torch.empty(E, i, o), -bound(i), bound(i))  # W_e^T
                                        for i, o in zip(dims[:-1], dims[1:]))
        self.biases = nn.ParameterList(nn.init.uniform_(torch.empty(E, 1, o), -bound(i), bound(i))
                                       for i, o in zip(dims[:-1], dims[1:]))
        self.norm_weights = nn.ParameterList(torch.ones(E, 1, hidden_dim) for _ in range(num_layers))
        self.norm_biases = nn.ParameterList(torch.zeros(E, 1, hidden_dim) for _ in range(num_layers))

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        x = torch.cat([obs, actions], -1)  # [..., O + D]
        E, lead = len(self.weights[0]), x.shape[:-1]
        x = x.reshape(1, -1, x.shape[-1]).expand(E, -1, -1)  # the same inputs for every member, [E, N, O + D]
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.bmm(x, w) + b  # x_e @ W_e^T + b_e for every member e at once, [E, N, out]
            if i < len(self.norm_weights):  # GELU, then LayerNorm with each member's own scale and shift
                x = torch.addcmul(self.norm_biases[i], F.layer_norm(F.gelu(x), x.shape[-1:]), self.norm_weights[i])
        return x.reshape(E, *lead)  # [E, ...]


def q_mean(critic: Critic, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Mean-aggregated Q of n chunks per state: obs [B, O], actions [B, n, D] -> [B, n]."""
    return critic(obs[:, None, :].expand(-1, actions.shape[1], -1), actions).mean(0)


@torch.no_grad()
def best_of_n(actor: Actor, critic: Critic, obs: torch.Tensor, n: int) -> torch.Tensor:
    """Draw n chunks and keep the one the critic likes best: obs [B, O] -> [B, D]. n = 1: a plain sample."""
    cand = actor(obs, n)  # [B, n, D]
    if n == 1:
        return cand[:, 0]
    best, _ = drift_field.top_k(cand, q_mean(critic, obs, cand), 1)  # [B, 1, D]
    return best[:, 0]


KEYS = ("observations", "actions", "rewards", "masks", "terminals", "next_observations")


def to_tensors(data: dict, device) -> dict:
    """The transition arrays a sampler needs, as float32 tensors on the training device."""
    return {k: torch.as_tensor(np.asarray(data[k], dtype=np.float32), device=device) for k in KEYS}


class ReplayBuffer:
    """Flat transitions on the training device (offline data first, online ones appended; a ring once full),
    sampled as h-step chunks."""

    def __init__(self, data: dict, capacity: int):
        n = len(data["observations"])
        self.capacity, self.size, self.ptr = max(capacity, n + 1), n, n % max(capacity, n + 1)
        self.num_added = 0  # online transitions added so far
        self.tensors = {k: torch.cat([v, v.new_empty((self.capacity - n,) + v.shape[1:])]) for k, v in data.items()}

    def add(self, **transition):
        """One transition of host values (an environment step)."""
        self.extend({k: torch.as_tensor(np.asarray(transition[k], dtype=np.float32))[None] for k in KEYS})

    def extend(self, part: dict):
        """Transitions [n, ...] in order: one copy per key (a checkpoint's online part on resume)."""
        n = len(part["observations"])
        idx = (self.ptr + torch.arange(n)) % self.capacity
        for k in KEYS:
            self.tensors[k][idx.to(self.tensors[k].device)] = part[k].to(self.tensors[k].device)
        self.ptr, self.size, self.num_added = (self.ptr + n) % self.capacity, min(self.size + n, self.capacity), self.num_added + n

    def online_part(self) -> dict:
        """The last online transitions in insertion order, on the CPU (what a checkpoint stores)."""
        n = min(self.num_added, self.capacity)
        idx = (self.ptr - n + torch.arange(n)) % self.capacity
        return {k: v[idx.to(v.device)].cpu() for k, v in self.tensors.items()}

    def sample(self, gen: torch.Generator, batch_size: int, h: int, gamma: float) -> dict:
        return sample_chunks(self.tensors, self.ptr - self.size, self.size, self.capacity, gen, batch_size, h, gamma)


def sample_chunks(data: dict, start: int, size: int, capacity: int, gen: torch.Generator, batch_size: int, h: int,
                  gamma: float) -> dict:
    """Chunks s_t, a_t..a_{t+h-1} of the stored data (oldest entry at `start`, ring-wise), never past the newest entry.
    Device indexing with the device generator `gen` only: no host copy, no sync (docs/algorithms.md §3)."""
    dev = data["rewards"].device
    idx = (start + torch.randint(0, size - h + 1, (batch_size,), device=dev, generator=gen)) % capacity  # [B]
    j = (idx[:, None] + torch.arange(h, device=dev)) % capacity  # [B, h]
    discounts = gamma ** torch.arange(h, device=dev, dtype=torch.float32)  # [h]
    return {
        "observations": data["observations"][idx],  # [B, O]
        "actions": data["actions"][j].reshape(batch_size, -1),  # [B, h * A]
        "rewards": data["rewards"][j] @ discounts,  # sum_k gamma^k r_{t+k}, [B]
        "masks": data["masks"][j].amin(1),  # min_k mask_{t+k}, [B]
        "valid": (data["terminals"][j[:, :-1]].sum(1) == 0).float(),  # 0 if the episode ends inside the chunk, [B]
        "next_observations": data["next_observations"][j[:, -1]],  # s_{t+h}, [B, O]
    }


def drift(args, gen: torch.Tensor, pos: torch.Tensor, pos_weight: Optional[torch.Tensor] = None):
    """Drift loss of gen [B, G, D] toward pos [B, P, D] (the generated samples are the negatives)."""
    if args.drift_field == "official":  # (docs/algorithms.md §2)
        loss, info = drift_field.drift_loss(gen, pos, temperatures=args.temperatures, pos_weight=pos_weight)
        # The loss is ~1 per temperature by construction (the force is RMS-normalized); the raw force is informative.
        return loss.mean(), info["scale"], sum(info[f"force_sq_{r}"] for r in args.temperatures)
    x = gen.detach()  # (docs/algorithms.md §1): V(x) = V_p+(x) - V_q-(x), L = || x - sg(x + V(x)) ||^2
    v = drift_field.mean_shift_field(x, pos, x, args.bandwidth, pos_weight=pos_weight)
    return (gen - (x + v)).pow(2).mean(), v.norm(dim=-1).mean(), v.pow(2).mean()


def critic_loss(args, actor, critic, target_critic, batch):
    """Chunked TD: y = r_chunk + gamma^h * mask * Qtarget(s_{t+h}, a'), a' = best of q_best_of actor samples."""
    with torch.no_grad():
        next_a = best_of_n(actor, critic, batch["next_observations"], args.q_best_of)  # [B, D]
        next_q = target_critic(batch["next_observations"], next_a).mean(0)  # [B]
        y = batch["rewards"] + args.discount**args.horizon * batch["masks"] * next_q
    q = critic(batch["observations"], batch["actions"])  # [E, B]
    return ((q - y).pow(2) * batch["valid"]).mean(), q.mean()


def actor_loss_offline(args, actor, batch):
    """L = alpha * drift(gen = num_gen samples of pi_theta(.|s), pos = the data chunk)."""
    gen = actor(batch["observations"], args.num_gen)  # [B, G, D]
    loss, scale, force = drift(args, gen, batch["actions"][:, None, :])
    return args.alpha * loss, loss, torch.zeros_like(loss), scale, force


def actor_loss_online(args, actor, ema_actor, q_fn, batch):
    """L = lambda * drift(gen, pos = top-K of N ~ pi_old by Q) + bc_weight * drift(gen, pos = the batch chunk)."""
    obs = batch["observations"]
    with torch.no_grad():
        cand = ema_actor(obs, args.N)  # a^(1..N) ~ pi_old(.|s), [B, N, D]
        q = q_fn(obs, cand)  # [B, N]
        pos, idx = drift_field.top_k(cand, q, args.K)  # P_K(s), [B, K, D]
        weight = None
        if args.online_mode == "soft":  # u = (Q - min) / (max - min) -> [-1, 1], negative weights clipped (ref code)
            q_min, q_max = q.min(1, keepdim=True).values, q.max(1, keepdim=True).values
            u = torch.where(q_max - q_min > 1e-8, (q - q_min) / (q_max - q_min).clamp(min=1e-8), torch.ones_like(q))
            weight = (2.0 * u - 1.0).gather(1, idx).clamp(min=0.0)  # [B, K], the best one has weight 1
    gen = actor(obs, args.num_gen)  # fresh samples of pi_theta, reused by both terms, [B, G, D]
    loss_topk, _, _ = drift(args, gen, pos, weight)
    loss_bc, scale, force = drift(args, gen, batch["actions"][:, None, :])
    return args.topk_weight * loss_topk + args.bc_weight * loss_bc, loss_bc, loss_topk, scale, force


def make_update(args, actor, critic, target_critic, ema_actor, optimizer):
    critic_params, target_params = list(critic.parameters()), list(target_critic.parameters())
    actor_params, ema_params = list(actor.parameters()), list(ema_actor.parameters())

    def update(batch: dict, online: bool) -> torch.Tensor:
        """One gradient step on critic + actor (one Adam, as the ref code), Polyak target, EMA pi_old online.
        No host sync inside (no .item(), no branch on tensor values): --compile and --cudagraphs wrap it whole."""
        optimizer.zero_grad(set_to_none=True)
        lc, q = critic_loss(args, actor, critic, target_critic, batch)
        if online:
            la, lbc, ltop, scale, force = actor_loss_online(args, actor, ema_actor, lambda o, a: q_mean(critic, o, a), batch)
        else:
            la, lbc, ltop, scale, force = actor_loss_offline(args, actor, batch)
        (lc + la).backward()
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(target_params, critic_params, args.tau)  # theta' <- (1 - tau) theta' + tau theta
            if online:  # pi_old <- (1 - tau_ema) pi_old + tau_ema pi_theta
                torch._foreach_lerp_(ema_params, actor_params, args.ema_tau)
        return torch.stack([lc, lbc, ltop, q, scale, force]).detach()  # stays on device: no sync in the hot loop

    return update


class CudaGraphUpdate:
    """--cudagraphs: the whole update captured once per phase as a CUDA graph, replayed on each batch copied into
    static inputs. The first `warmup` calls of a phase run eagerly on a side stream (allocating Adam's state)."""

    def __init__(self, update, warmup: int = 3):
        self.update, self.warmup, self.phases = update, warmup, {}

    def __call__(self, batch: dict, online: bool) -> torch.Tensor:
        p = self.phases.setdefault(online, {"calls": 0, "inputs": {k: torch.empty_like(v) for k, v in batch.items()}})
        for k, v in batch.items():
            p["inputs"][k].copy_(v)  # the graph reads its inputs from these fixed addresses
        p["calls"] += 1
        if p["calls"] <= self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.update(p["inputs"], online)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if "graph" not in p:  # capture records the kernels without running them; the replay below runs them
            p["graph"] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(p["graph"]):
                p["out"] = self.update(p["inputs"], online)
        p["graph"].replay()
        return p["out"].clone()


LOSS_NAMES = ("losses/critic", "losses/drift_bc", "losses/drift_topk", "stats/q_mean", "stats/drift_scale",
              "stats/drift_bc_force_sq")  # scale and force of the BC drift toward the data chunk


# ---- validation: every refusal is one line `error: ...` on stderr and exit code 2, before anything is written ----
def fail(msg: str):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def check(ok, msg: str):
    if not ok:
        fail(msg)


def shared(fn, *a, **kw):
    """Call a function of the shared dataset-resolution block, turning its SystemExit('error: ...') into fail()."""
    try:
        return fn(*a, **kw)
    except SystemExit as e:
        if isinstance(e.code, str) and e.code.startswith("error: "):
            fail(e.code[len("error: "):])
        raise


def parse_args() -> Args:
    """tyro.cli, with its parse errors (a bad type, an unknown flag, a value outside a Literal) as one error line."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stderr(buf):
            return tyro.cli(Args)
    except SystemExit as e:
        if e.code in (0, None):
            raise
        lines = [line.strip(" │|") for line in buf.getvalue().splitlines() if line.strip()][1:]  # below the title
        rule = lambda line: re.fullmatch(r"[─\-+╰╯]*", line)  # noqa: E731  (boxed or plain, as the output allows)
        fail(" ".join(itertools.takewhile(lambda x: not rule(x), itertools.dropwhile(rule, lines))) + "; see --help")


def check_args(args: Args):
    """The range of every flag (a NaN fails every comparison, so it is refused too)."""
    rules = {  # rule: (test, flags)
        ">= 1": (lambda v: v >= 1, ("horizon", "batch_size", "hidden_dim", "num_layers", "num_critics", "num_gen", "N",
                 "q_best_of", "act_best_of", "utd_ratio", "buffer_size", "eval_interval", "eval_episodes",
                 "log_interval", "save_interval", "shard_interval")),
        ">= 0": (lambda v: v >= 0, ("seed", "offline_steps", "online_steps", "start_training", "num_threads")),
        "a finite number > 0": (lambda v: 0 < v < math.inf, ("lr", "bandwidth")),
        "a finite number >= 0": (lambda v: 0 <= v < math.inf, ("alpha", "topk_weight", "bc_weight")),
        "in (0, 1]": (lambda v: 0 < v <= 1, ("discount", "tau")),
        "in [0, 1]": (lambda v: 0 <= v <= 1, ("ema_tau",)),
    }
    for rule, (ok, flags) in rules.items():
        for k in flags:
            check(ok(getattr(args, k)), f"--{k.replace('_', '-')} must be {rule}, got {getattr(args, k)}")
    check(len(args.temperatures) > 0 and all(math.isfinite(t) and t > 0 for t in args.temperatures),
          f"--temperatures must be finite numbers > 0, got {args.temperatures}")
    check(1 <= args.K <= args.N, f"--K must be in 1..N = 1..{args.N}, got {args.K}")
    check(args.offline_steps + args.online_steps >= 1, "--offline-steps + --online-steps must be >= 1")
    check(args.eval_envs is None or args.eval_envs >= 1, f"--eval-envs must be >= 1, got {args.eval_envs}")
    check(not (args.eval_only and args.resume), "give --eval-only --checkpoint PATH or --resume PATH, not both")
    check(not args.eval_only or args.checkpoint is not None, "--eval-only needs --checkpoint PATH")
    check(args.checkpoint is None or args.eval_only, "--checkpoint is for --eval-only; to continue a run use --resume")
    check(args.dataset_path is None or args.dataset_dir is None, "give --dataset-path or --dataset-dir, not both")
    for k, v in (("run-name", args.run_name), ("exp-name", args.exp_name)):
        check(v is None or (v not in ("", ".", "..") and "/" not in v and os.sep not in v),
              f"--{k} must be a plain folder name (no '/'), got {v!r}")
    for flag, on, module in (("--track", args.track, "wandb"), ("--capture-video", args.capture_video, "moviepy")):
        check(not on or importlib.util.find_spec(module), f"{flag} needs {module}: pip install {module}")


def check_file(path: str, what: str):
    check(os.path.exists(path), f"{what} {path} does not exist")
    check(os.path.isfile(path), f"{what} {path} is a folder, not a file")
    check(os.access(path, os.R_OK), f"{what} {path} is not readable (check its permissions)")


def check_creatable(folder: str, what: str):
    """`folder` is a writable folder or can be created: its nearest existing ancestor is a writable folder."""
    p = os.path.abspath(folder)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    check(os.path.isdir(p), f"{what} {folder} cannot be created: {p} is a file")
    check(os.access(p, os.W_OK | os.X_OK), f"{what} {folder} cannot be created: {p} is not writable")


def check_data_paths(args: Args, env_id: str):
    if is_robomimic(env_id):  # the Robomimic block checks its .hdf5 file itself
        check(args.dataset_dir is None, "--dataset-dir is for OGBench shards; give a Robomimic file with --dataset-path")
    elif args.dataset_path is not None:  # a missing file is reported by load_ogbench, with the command that makes it
        p = os.path.expanduser(args.dataset_path)
        check(p.endswith(".npz"), f"--dataset-path {p} must be an OGBench .npz file")
        for f in (p, p.replace(".npz", "-val.npz")):
            check(not os.path.isdir(f), f"--dataset-path {f} is a folder, not a .npz file")
            check(not os.path.exists(f) or os.access(f, os.R_OK), f"--dataset-path {f} is not readable")
    if args.dataset_dir is not None:
        check(os.path.isdir(args.dataset_dir), f"--dataset-dir {args.dataset_dir} is not a folder")
        for p in shard_paths(args.dataset_dir):
            check_file(p.replace(".npz", "-val.npz"), "the validation twin of shard")
        check(shard_paths(args.dataset_dir), f"--dataset-dir {args.dataset_dir} holds no *.npz shards (+ -val twins)")


def shard_paths(folder: str) -> list:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if re.search(r"(?<!-val)\.npz$", f))


CKPT_FORMAT = "dfp-v1"
CKPT_KEYS = ("args", "env_id", "run_name", "step", "phase", "obs_dim", "act_dim", "actor", "critic", "target_critic",
             "ema_actor", "optimizer", "rng", "buffer_online", "shard_idx", "last_success", "eval_pending")


def load_checkpoint(path: str, flag: str) -> dict:
    """A checkpoint written by this script (format dfp-v1), else a refusal."""
    check_file(path, flag)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated, not a torch file, ...
        fail(f"{flag} {path} cannot be read as a checkpoint ({type(e).__name__}: {str(e)[:100]}); "
             "pass a checkpoint.pt of this script")
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    check(fmt == CKPT_FORMAT, f"{flag} {path} is not a checkpoint of dfp_offline_to_online.py (format {fmt!r}, "
          f"expected {CKPT_FORMAT!r}); pass the checkpoint.pt of a DFP run")
    missing = [k for k in CKPT_KEYS if k not in ckpt]
    check(not missing, f"{flag} {path} lacks {', '.join(missing)}; it is damaged, pass another checkpoint")
    return ckpt


def plan_run_dir(args: Args, env_id: str, ckpt: Optional[dict]) -> Tuple[str, str]:
    """(run name, run folder), checked to be creatable; nothing is created here."""
    if ckpt is not None:  # --resume and --eval-only stay in the checkpoint's folder
        run_dir = os.path.dirname(os.path.abspath(args.resume or args.checkpoint))
        if args.resume:
            check(os.access(run_dir, os.W_OK | os.X_OK), f"the run folder {run_dir} of --resume is not writable")
        elif args.capture_video:
            check_creatable(os.path.join(run_dir, "videos"), "the video folder")
        return ckpt["run_name"], run_dir
    check(not os.path.exists(args.runs_dir) or os.path.isdir(args.runs_dir),
          f"--runs-dir {args.runs_dir} is a file; pass a folder (default runs)")
    run_name = args.run_name or f"{env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join(args.runs_dir, run_name)
    check(not os.path.isfile(run_dir), f"the run folder {run_dir} is a file; pass another --run-name")
    check(not os.path.exists(os.path.join(run_dir, "checkpoint.pt")), f"the run folder {run_dir} already holds a run; "
          f"pass another --run-name, or continue it with --resume {os.path.join(run_dir, 'checkpoint.pt')}")
    check_creatable(run_dir, "the run folder")
    return run_name, run_dir


def resolve_env(args) -> str:
    if is_robomimic(args.env):  # lift-mh, can-ph, ... (Robomimic block)
        check(args.task is None, "--task only applies to OGBench envs")
        return robomimic_env_id(args.env)
    if re.fullmatch(OTHER_ENV_RE, args.env):
        check(args.task is None, "--task only applies to cube-* names; put the task in the full id instead")
        return args.env
    return shared(resolve_env_id, args.env, args.task)


def check_dataset(ds: dict, env, name: str, min_len: int):
    """Refuse a dataset whose keys, shapes or values do not fit the environment, with the fix."""
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    need = {"observations": obs_dim, "next_observations": obs_dim, "actions": act_dim}
    for k, d in need.items():
        got = tuple(ds[k].shape) if k in ds else "missing"
        check(k in ds and ds[k].ndim == 2 and ds[k].shape[1] == d, f"dataset {name}: '{k}' must have shape "
              f"[N, {d}] for this env, got {got}; check --env/--task or regenerate the dataset")
    n = len(ds["observations"])
    for k in ("actions", "rewards", "masks", "terminals", "next_observations"):
        check(k in ds and len(ds[k]) == n, f"dataset {name}: '{k}' missing or not of length {n}")
    check(n >= min_len, f"dataset {name} has only {n} transitions, fewer than one chunk")
    for k, v in ds.items():
        check(not np.issubdtype(v.dtype, np.floating) or np.isfinite(v).all(), f"dataset {name}: the dataset "
              f"contains non-finite values in '{k}'; regenerate it or drop those transitions")


def load_data(env_id: str, path: Optional[str], horizon: int, env=None):
    """(env, train) for one dataset file, with clear errors for files that are not OGBench datasets."""
    try:
        if env is None:
            env, train, _ = shared(load_ogbench, env_id, path)
        else:
            import ogbench

            train, _ = ogbench.make_env_and_datasets(env_id, dataset_path=path, dataset_only=True, cur_env=env)
    except Exception as e:  # a truncated zip, a text file named .npz, a missing key, ...
        why = (str(e).splitlines() or [""])[0][:200]
        fail(f"could not read dataset {path or env_id} ({type(e).__name__}: {why}); it needs observations, actions, "
             "terminals, qpos, qvel (OGBench format) and a -val twin")
    check_dataset(train, env, path or env_id, horizon + 1)
    return env, train


# ---- signals, evaluation, checkpoints ----
class Interrupt:
    """SIGINT / SIGTERM. Until `armed` (nothing written yet) a signal exits at once. Then the first one sets `signum`:
    the loops stop within one env or gradient step, save and exit 128 + signum. A second one exits at once."""

    def __init__(self):
        self.signum, self.armed = 0, False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self)

    def __call__(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signum or not self.armed:
            os.write(2, f"\n{name}: exiting at once\n".encode())  # os.write: safe inside a handler
            os._exit(128 + signum)
        self.signum = signum
        os.write(2, f"\n{name}: stopping after this step (send it again to exit at once)\n".encode())

    def requested(self) -> bool:
        return self.signum != 0


def make_eval_env(env_id: str, horizon: int = 1, env_args: Optional[dict] = None, render: bool = False):
    """The env for evaluation, taking a whole chunk per step() (ChunkEnv); Robomimic's is built from env_args."""
    import multiprocessing
    import ogbench

    if multiprocessing.parent_process() is not None:  # a worker: Ctrl-C reaches the whole process group, and only
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process acts on it (it closes the workers);
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # SIGTERM ends the worker (not the handler of the main process)
    if is_robomimic(env_id):
        return ChunkEnv(RobomimicEnv(env_id, env_args, -1.0, render_mode="rgb_array" if render else None), horizon)
    return ChunkEnv(ogbench.make_env_and_datasets(env_id, env_only=True), horizon)


class ChunkEnv(gym.Wrapper):
    """step(chunk [h * A]) runs the h actions open-loop up to the episode's end (one worker round trip per chunk);
    reward: their sum; info['steps']: env steps taken; info['frames']: rendered frames while `record` is set."""

    def __init__(self, env, horizon: int):
        super().__init__(env)
        self.record, self.act_dim = False, env.action_space.shape[0]
        low, high = np.tile(env.action_space.low, horizon), np.tile(env.action_space.high, horizon)
        self.action_space = gym.spaces.Box(low, high, dtype=env.action_space.dtype)

    def step(self, chunk):
        total, frames = 0.0, []
        for steps, a in enumerate(chunk.reshape(-1, self.act_dim), 1):
            obs, r, terminated, truncated, info = self.env.step(a)
            total += r
            if self.record:
                frames.append(self.env.render())
            if terminated or truncated:
                break
        return obs, total, terminated, truncated, {**info, "steps": steps, **({"frames": frames} if frames else {})}


def make_eval_envs(env_id: str, num_envs: int, horizon: int, env_args: Optional[dict] = None, render: bool = False):
    """num_envs ChunkEnvs stepped together: in this process for 1, in worker processes for more.
    Autoreset is off: evaluate() resets each env itself, with the seed of the episode it starts."""
    from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv

    fns = [functools.partial(make_eval_env, env_id, horizon, env_args, render)] * num_envs
    if num_envs == 1:
        return SyncVectorEnv(fns, autoreset_mode=AutoresetMode.DISABLED)
    envs = AsyncVectorEnv(fns, autoreset_mode=AutoresetMode.DISABLED)
    atexit.register(envs.close)  # before multiprocessing's own exit handler, which would wait on the workers
    return envs


def episode_generator(seed: int, episode: int) -> torch.Generator:
    """The policy noise of evaluation episode `episode`: its own stream, whatever else runs."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, episode]).generate_state(1)[0]))


@torch.no_grad()
def evaluate(envs, actor, critic, act_best_of: int, episodes: int, seed: int, device, video_path: Optional[str] = None,
             stop=lambda: False):
    """(success rate, mean return, mean length, mean critic value of the chosen chunks) over `episodes` episodes on
    the M ChunkEnvs of `envs`, success = info['success'] at the last step; None if stop() became true. Episode i has
    env seed seed + i and noise episode_generator(seed, i): the result does not depend on M."""
    M = envs.num_envs
    episode = np.full(M, -1)  # the episode each env runs, -1: none left
    ret, length, q_sum, n_chunks, gens = np.zeros(M), np.zeros(M, int), np.zeros(M), np.zeros(M, int), [None] * M
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
                ret[j], length[j], q_sum[j], n_chunks[j], next_episode = 0.0, 0, 0.0, 0, next_episode + 1
        if mask.any():
            o, _ = envs.reset(seed=seeds, options={"reset_mask": mask})
            obs[mask] = o[mask]
        if video_path is not None:
            envs.set_attr("record", [j == 0 and episode[0] == 0 for j in range(M)])  # env 0 runs episode 0 first

    start(range(M))
    while (episode >= 0).any():
        if stop():
            return None
        act = np.flatnonzero(episode >= 0)
        o = torch.as_tensor(obs[act], device=device)  # [B, O]
        cand = actor(o, act_best_of, [gens[j] for j in act])  # best-of-N as in best_of_n, [B, N, D]
        q = q_mean(critic, o, cand)  # [B, N]
        best, idx = drift_field.top_k(cand, q, 1)  # [B, 1, D]: the chunk the critic likes best
        chunks[act] = best[:, 0].cpu().numpy()
        q_sum[act] += q.gather(1, idx)[:, 0].cpu().numpy()  # its value, logged as eval/q_chosen
        n_chunks[act] += 1
        next_obs, r, terminated, truncated, info = envs.step(chunks)
        if "frames" in info and info["_frames"][0]:
            frames += info["frames"][0]
        ended = []
        for j in act:
            ret[j], length[j], obs[j] = ret[j] + r[j], length[j] + info["steps"][j], next_obs[j]
            if terminated[j] or truncated[j]:
                success = float(info["success"][j]) if "success" in info else 0.0
                results[episode[j]] = (success, ret[j], length[j], q_sum[j] / n_chunks[j])
                ended.append(j)
        if ended:
            start(ended)
    if len(frames) > 1:
        from moviepy import ImageSequenceClip

        os.makedirs(os.path.dirname(video_path), exist_ok=True)
        tmp = video_path[: -len(".mp4")] + ".tmp.mp4"
        ImageSequenceClip(frames, fps=30).write_videofile(tmp, logger=None)
        os.replace(tmp, video_path)
    return tuple(float(v) for v in np.mean([results[i] for i in range(episodes)], 0))


def save_checkpoint(path: str, state: dict):
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-write never leaves a broken checkpoint


def leave(code: int, envs, track: bool = False):
    """Exit now, after a signal, all saved: close what holds resources, skip the slow teardown (torch, MuJoCo)."""
    if track:
        import wandb

        wandb.finish()
    with contextlib.suppress(Exception):  # its workers may be gone already (a signal to the process group)
        envs.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def resume_command(ckpt_path: str) -> str:
    """This run's command line with --resume ckpt_path in place of any --resume."""
    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip or a == "--resume" or a.startswith("--resume="):
            skip = a == "--resume"
            continue
        argv.append(a)
    return shlex.join(["python", sys.argv[0], *argv, "--resume", os.path.abspath(ckpt_path)])


if __name__ == "__main__":
    args = parse_args()
    check_args(args)
    stop = Interrupt()  # from here on a signal exits at once, until the first checkpoint can be written
    ckpt = load_checkpoint(args.resume, "--resume") if args.resume else None
    if args.eval_only:  # the policy, the env and the evaluation seeds come from the checkpoint
        ckpt = load_checkpoint(args.checkpoint, "--checkpoint")
        for k in ("env", "task", "horizon", "hidden_dim", "num_layers", "num_critics", "act_best_of", "seed"):
            setattr(args, k, ckpt["args"][k])
    env_id = resolve_env(args)
    check(ckpt is None or ckpt["env_id"] == env_id,
          f"checkpoint was made for {ckpt and ckpt['env_id']}, not {env_id}; pass the same --env/--task")
    if not args.eval_only:
        check_data_paths(args, env_id)
    run_name, run_dir = plan_run_dir(args, env_id, ckpt)

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    check(not args.cudagraphs or device.type == "cuda",
          "--cudagraphs needs a CUDA device (and no --no-cuda); drop the flag on CPU")
    sampler = torch.Generator(device=device).manual_seed(args.seed)  # chunk sampling, on the training device

    # ---- environment and data (validated: a refusal here still writes nothing) ----
    shards, shard_idx, train, env_args = [], 0, None, None
    if args.eval_only:
        env_args = ckpt.get("env_args")  # Robomimic: the env is rebuilt from the checkpoint, not from the data file
        env = make_eval_env(env_id, env_args=env_args).env  # for its sizes
    elif is_robomimic(env_id):  # Robomimic: robosuite env from the file's env_args; rewards - 1 offline and online
        data_name = resolve_robomimic_file(env_id, args.dataset_path)
        print(f"loading {data_name} ...", flush=True)
        train, _, env_args = load_robomimic(env_id, data_name)
        env = RobomimicEnv(env_id, env_args, reward_shift=-1.0)
        check_dataset(train, env, env_id, args.horizon + 1)
    else:  # OGBench: one .npz file, or the shards of --dataset-dir one at a time
        if args.dataset_dir is not None:
            shards = shard_paths(args.dataset_dir)
            shard_idx = ckpt["shard_idx"] if ckpt is not None else 0
            check(shard_idx < len(shards), f"the checkpoint reads shard {shard_idx} but --dataset-dir holds {len(shards)}")
        path = shards[shard_idx] if shards else args.dataset_path
        data_name = (f"{args.dataset_dir} ({len(shards)} shards)" if shards else
                     path or f"{OGBENCH_DATA_DIR}/{env_id.split('-singletask')[0]}-v0.npz")
        print(f"loading {path or data_name} ...", flush=True)
        env, train = load_data(env_id, path, args.horizon)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    check(ckpt is None or (ckpt["obs_dim"], ckpt["act_dim"]) == (obs_dim, act_dim),
          f"the checkpoint's observation/action sizes {ckpt and (ckpt['obs_dim'], ckpt['act_dim'])} differ from "
          f"{env_id}'s {(obs_dim, act_dim)}; pass the env it was made for")
    D = act_dim * args.horizon  # flattened chunk dimension
    data = to_tensors(train, device) if train is not None else None  # the offline data on the training device

    # ---- networks ----
    actor = Actor(obs_dim, D, args.hidden_dim, args.num_layers).to(device)
    critic = Critic(obs_dim, D, args.hidden_dim, args.num_layers, args.num_critics).to(device)
    target_critic = Critic(obs_dim, D, args.hidden_dim, args.num_layers, args.num_critics).to(device)
    target_critic.load_state_dict(critic.state_dict())
    ema_actor = Actor(obs_dim, D, args.hidden_dim, args.num_layers).to(device)  # pi_old, reset at the switch
    ema_actor.load_state_dict(actor.state_dict())
    # capturable: Adam's step counters live on the GPU, so a CUDA graph can replay the optimizer step too
    optimizer = torch.optim.Adam(list(actor.parameters()) + list(critic.parameters()), lr=args.lr,
                                 capturable=args.cudagraphs)
    nets = {"actor": actor, "critic": critic, "target_critic": target_critic, "ema_actor": ema_actor}
    if ckpt is not None:
        try:
            for name, module in [*nets.items(), ("optimizer", optimizer)]:
                module.load_state_dict(ckpt[name])
        except (RuntimeError, ValueError, KeyError) as e:
            fail(f"checkpoint does not match these networks ({str(e).splitlines()[0]}); "
                 "use the --horizon/--hidden-dim/--num-layers/--num-critics it was made with")
        for group in optimizer.param_groups:
            group["lr"] = args.lr  # --lr applies on resume (e.g. a lower one after a non-finite loss)

    num_eval_envs = min(args.eval_envs or os.cpu_count() or 1, args.eval_episodes)
    envs = make_eval_envs(env_id, num_eval_envs, args.horizon, env_args, args.capture_video)  # after every check: worker processes start here

    def run_evaluation(step: int):
        """(success, return, length, q_chosen) of the policy now, or None if a signal abandoned the evaluation."""
        video = os.path.join(run_dir, "videos", f"eval_{step}.mp4") if args.capture_video else None
        print(f"evaluating step {step}: {args.eval_episodes} episodes on {num_eval_envs} envs", flush=True)
        t = time.time()
        try:
            res = evaluate(envs, actor, critic, args.act_best_of, args.eval_episodes, args.seed + 1000, device, video,
                           stop.requested)
        except (EOFError, ConnectionError):  # workers ended by a SIGTERM sent to the whole process group
            if not stop.requested():
                raise
            res = None
        if res is None:
            print(f"evaluation at step {step} interrupted: no result", flush=True)
            return None
        print(f"eval step {step}: success {res[0]:.3f} return {res[1]:.3f} length {res[2]:.1f} q {res[3]:.6f} "
              f"({args.eval_episodes} episodes, {time.time() - t:.1f} s)", flush=True)
        return res

    threads = torch.get_num_threads()
    if args.eval_only:
        print(f"dfp eval-only: {env_id} | checkpoint {args.checkpoint} (step {ckpt['step']}) | device {device} | "
              f"threads {threads} | eval envs {num_eval_envs}", flush=True)
        actor.eval()
        stop.armed = True  # a signal abandons the evaluation: no result
        res = run_evaluation(ckpt["step"])
        if res is None:
            leave(128 + stop.signum, envs)
        print(f"eval-only {env_id} step {ckpt['step']}: success {res[0]:.3f} return {res[1]:.3f} "
              f"length {res[2]:.1f} q {res[3]:.6f} over {args.eval_episodes} episodes")
        sys.exit(0)

    total = args.offline_steps + args.online_steps
    print(f"dfp: {env_id} | data {data_name}: {len(train['observations'])} transitions | device {device} | "
          f"threads {threads} | eval envs {num_eval_envs} | run folder {run_dir} | steps {total}", flush=True)

    # ---- logging ----
    os.makedirs(run_dir, exist_ok=True)
    ckpt_path = os.path.join(run_dir, "checkpoint.pt")
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=run_name, save_code=True, resume="allow", id=run_name[-40:])
    from torch.utils.tensorboard import SummaryWriter

    start_step = ckpt["step"] + 1 if ckpt is not None else 1
    writer = SummaryWriter(run_dir, purge_step=start_step)  # a resumed run never writes a step twice
    if ckpt is None:
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))

    update = make_update(args, actor, critic, target_critic, ema_actor, optimizer)
    if args.compile:
        update = torch.compile(update)
    if args.cudagraphs:
        update = CudaGraphUpdate(update)
    buffer, obs, queue = None, None, []
    ep_return, ep_length, last_success = 0.0, 0, float("nan")
    if ckpt is not None:  # resume exactly: step, RNG states, replay buffer (the env restarts its episode)
        last_success = ckpt["last_success"]
        random.setstate(ckpt["rng"]["python"])
        np.random.set_state(ckpt["rng"]["numpy"])
        sampler.set_state(ckpt["rng"]["sampler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if ckpt["phase"] == "online":
            buffer = ReplayBuffer(data, min(args.buffer_size, len(data["observations"]) + args.online_steps))
            buffer.extend(ckpt["buffer_online"])
            obs, _ = env.reset(seed=args.seed + ckpt["step"])
        print(f"resumed {run_name} from {args.resume} at step {ckpt['step']} ({ckpt['phase']})")

    def checkpoint_state(step: int, eval_pending: bool) -> dict:
        return {
            "format": CKPT_FORMAT, "args": asdict(args), "env_id": env_id, "run_name": run_name, "step": step,
            "phase": "offline" if step <= args.offline_steps else "online", "last_success": last_success,
            "obs_dim": obs_dim, "act_dim": act_dim, "eval_pending": eval_pending,  # eval_pending: redo it on resume
            "env_args": env_args,  # Robomimic: how to rebuild the env (None for OGBench)
            "actor": actor.state_dict(), "critic": critic.state_dict(), "target_critic": target_critic.state_dict(),
            "ema_actor": ema_actor.state_dict(), "optimizer": optimizer.state_dict(), "shard_idx": shard_idx,
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "sampler": sampler.get_state(),
                    "torch": torch.get_rng_state()},
            "buffer_online": buffer.online_part() if buffer is not None else None,
        }

    nonfinite = torch.zeros(3, dtype=torch.bool, device=device)  # per loss, checked at log/eval/save time only
    stats, n_stats = torch.zeros(len(LOSS_NAMES), device=device), 0
    t0, t0_step = time.time(), start_step

    def check_finite(step: int):
        """Stop (exit 1) on a non-finite loss or parameter, before it is evaluated or saved over a good checkpoint."""
        params = ((f"{name}.{k}", v) for name, net in nets.items() for k, v in net.state_dict().items())  # lazy
        bad = LOSS_NAMES[int(nonfinite.nonzero()[0])] if nonfinite.any() else next(
            (k for k, v in params if not torch.isfinite(v).all()), None)  # a loss, else a parameter (critic.weights.0)
        if bad is not None:
            kept = f"the last good checkpoint is {ckpt_path}" if os.path.isfile(ckpt_path) else "no checkpoint was written"
            print(f"error: {bad} became non-finite by step {step}; stopping ({kept}). Try a lower --lr "
                  f"(with --resume to continue from the checkpoint).", file=sys.stderr)
            sys.exit(1)

    def evaluate_and_log(step: int) -> bool:
        """Evaluate and log at `step`; False if a signal abandoned the evaluation."""
        global last_success
        check_finite(step)
        res = run_evaluation(step)
        if res is None:
            return False
        last_success = res[0]
        for tag, v in zip(("eval/success", "eval/episodic_return", "eval/episodic_length", "eval/q_chosen"), res):
            writer.add_scalar(tag, v, step)
        return True

    def interrupted(step: int, eval_pending: bool):
        writer.close()
        if args.save_model:
            check_finite(step)
            save_checkpoint(ckpt_path, checkpoint_state(step, eval_pending))
            print(f"interrupted at step {step}; checkpoint saved to {ckpt_path}; continue with:\n  "
                  f"{resume_command(ckpt_path)}", flush=True)
        else:
            print(f"interrupted at step {step}; no checkpoint (--no-save-model)", flush=True)
        leave(128 + stop.signum, envs, args.track)

    stop.armed = True  # from here on a signal stops the run at the next step, with a checkpoint
    if ckpt is not None and ckpt["eval_pending"]:  # the evaluation of the saved step, interrupted before
        if not evaluate_and_log(ckpt["step"]):
            interrupted(ckpt["step"], eval_pending=True)
        if args.save_model:  # done: a later resume from this checkpoint must not log it again
            save_checkpoint(ckpt_path, checkpoint_state(ckpt["step"], False))
    for step in range(start_step, total + 1):
        if step <= args.offline_steps:
            # ---- offline: one gradient step on a batch of data chunks ----
            if shards and step % args.shard_interval == 0 and len(shards) > 1:
                shard_idx = (shard_idx + 1) % len(shards)
                del train
                env, train = load_data(env_id, shards[shard_idx], args.horizon, env)
                data = to_tensors(train, device)
                writer.add_scalar("charts/shard", shard_idx, step)
            n = len(data["observations"])
            batch = sample_chunks(data, 0, n, n, sampler, args.batch_size, args.horizon, args.discount)
            out = update(batch, online=False)
            nonfinite |= ~torch.isfinite(out[:3])
            stats, n_stats = stats + out, n_stats + 1
        else:
            if buffer is None:  # ---- the switch: seed the buffer with the offline data, reset pi_old ----
                buffer = ReplayBuffer(data, min(args.buffer_size, len(data["observations"]) + args.online_steps))
                ema_actor.load_state_dict(actor.state_dict())
                obs, _ = env.reset(seed=args.seed)
            # ---- online: act (best-of-N, open-loop chunk), store, update ----
            if not queue:  # one host-to-device and one device-to-host copy per chunk of h steps
                o = torch.as_tensor(obs, dtype=torch.float32, device=device)[None]
                queue = list(best_of_n(actor, critic, o, args.act_best_of)[0].cpu().numpy().reshape(-1, act_dim))
            action = queue.pop(0)
            next_obs, reward, terminated, truncated, info = env.step(action)
            buffer.add(observations=obs, actions=action, rewards=reward, masks=1.0 - terminated,
                       terminals=float(terminated or truncated), next_observations=next_obs)
            ep_return, ep_length, obs = ep_return + reward, ep_length + 1, next_obs
            if terminated or truncated:
                writer.add_scalar("charts/episodic_return", ep_return, step)
                writer.add_scalar("charts/episodic_length", ep_length, step)
                writer.add_scalar("charts/success", float(info.get("success", 0.0)), step)
                obs, _ = env.reset()
                queue, ep_return, ep_length = [], 0.0, 0
            if step - args.offline_steps >= args.start_training:
                for _ in range(args.utd_ratio):
                    out = update(buffer.sample(sampler, args.batch_size, args.horizon, args.discount), online=True)
                    nonfinite |= ~torch.isfinite(out[:3])
                    stats, n_stats = stats + out, n_stats + 1

        # ---- logging, evaluation, checkpoints ----
        if step % args.log_interval == 0 or step == total:
            check_finite(step)
            vals = (stats / max(n_stats, 1)).tolist()  # a device sync, once per log interval
            for name, v in zip(LOSS_NAMES, vals if n_stats else ()):
                writer.add_scalar(name, v, step)
            sps = (step - t0_step + 1) / (time.time() - t0)
            writer.add_scalar("charts/SPS", sps, step)
            eta = (total - step) / max(sps, 1e-9)
            phase = "offline" if step <= args.offline_steps else "online"
            print(f"step {step}/{total} [{phase}] SPS {sps:.1f} ETA {eta / 60:.1f} min | critic {vals[0]:.4f} "
                  f"drift_bc {vals[1]:.4f} drift_topk {vals[2]:.4f} q {vals[3]:.2f} | success {last_success:.2f}",
                  flush=True)
            stats, n_stats = torch.zeros_like(stats), 0
        eval_due = step == 1 or step % args.eval_interval == 0 or step == args.offline_steps or step == total
        if eval_due and not evaluate_and_log(step):
            interrupted(step, eval_pending=True)
        if stop.signum:
            interrupted(step, eval_pending=False)
        if args.save_model and (step % args.save_interval == 0 or step == total):
            check_finite(step)  # never overwrite a good checkpoint with non-finite weights
            save_checkpoint(ckpt_path, checkpoint_state(step, False))

    writer.close()
    envs.close()
    print(f"final {env_id} step {total}: success {last_success:.3f} over {args.eval_episodes} episodes ({run_dir})")

