"""DBP: Drift-Based Policy, one-step imitation of action chunks (arXiv 2604.03540; docs/algorithms.md §4).

A generator mu = f_theta(o_{t-To+1..t}, z), z ~ N(0, I) of the chunk's shape, maps an observation history to a
chunk of Tp actions in ONE forward pass (1 NFE). Training drifts G hypotheses x_g = f(o, z_g) per observation:
the expert chunk y+ attracts them, they repel each other, and each x regresses onto its frozen drifted copy:

    L = E || x - sg(x + V(x)) ||^2        (drift_field.drift_loss, docs/algorithms.md §2; or the field of §1)

Deployment: one z, one pass, then execute the Ta actions from index To-1 ("now": the chunk is aligned with the
history's first observation) and replan. `--loss mse` is the deterministic (z = 0) unimodal baseline.
Defaults are the authors' recipe (per-epoch schedule, EMA, min-max scaling, padding, 2% hold-out, U-Net
512-1024-2048); docs/dbp.md lists them and a CPU-sized recipe (--backbone mlp, fewer epochs).
Data: OGBench singletask datasets (play, or expert demos via --dataset-path), Robomimic low-dim files, or a
D4RL-layout .npz with --env a gymnasium id (Hopper-v5).

  python dbp_bc.py --env cube-single-play --task 1 --dataset-path ~/.ogbench/data/cube-single-expert-task1-v0.npz
  python dbp_bc.py --eval-only --checkpoint runs/<run>/dbp_bc_*.pt
"""

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering (before mujoco is imported)

import json
import math
import random
import re
import shlex
import signal
import socket
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Callable, Literal, Optional, Tuple

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro

import drift_field


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (training, the 2% hold-out, and the evaluation episodes and latents)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda will be enabled when available"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "drift-policies"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    capture_video: bool = False
    """record the first episode of the final evaluation to <run dir>/videos/"""
    save_model: bool = True
    """write <run dir>/dbp_bc.pt (atomically) every --save-interval steps, at the end and on SIGINT/SIGTERM"""
    save_interval: int = 10_000
    """gradient steps between checkpoints (0: only at the end and on a signal)"""
    keep_checkpoints: int = 10
    """also keep the policies of the last N saves as dbp_bc_<step>.pt (the paper averages the last 10; 0: none)"""
    num_threads: int = 0
    """torch CPU threads (0: torch's default)"""
    runs_dir: str = "runs"
    """where run folders (tensorboard, checkpoints, videos) go"""
    run_name: Optional[str] = None
    """the run folder's name under --runs-dir (default: <env_id>__<exp_name>__<seed>__<unix time>)"""

    # Data
    env: str = "cube-single-play"
    """OGBench dataset/env (cube-single-play, ..., or a full singletask id), Robomimic {lift,can,square}-{mh,ph}, or a gymnasium id (Hopper-v5) with a D4RL-layout --dataset-path"""
    task: Optional[int] = None
    """OGBench singletask task 1..5 (default: the id's task, else 2)"""
    dataset_path: Optional[str] = None
    """dataset: an OGBench-format .npz (e.g. cube-single-expert-task1-v0.npz, needs its -val twin), a D4RL-layout .npz for gymnasium envs, or a Robomimic low_dim_v15.hdf5"""
    val_ratio: float = 0.02
    """fraction of the episodes held out for losses/val_loss (authors: 2%, at least one episode when > 0)"""

    # Algorithm specific arguments
    loss: Literal["drift", "mse"] = "drift"
    """drift: the DBP drift loss over G hypotheses; mse: deterministic regression with the same network (z = 0)"""
    backbone: Literal["unet", "mlp"] = "unet"
    """generator: the paper's 1-D conditional U-Net with FiLM, or an MLP on concat(obs history, z) (CPU-sized runs)"""
    hidden_dim: int = 512
    """MLP width"""
    depth: int = 3
    """MLP hidden layers"""
    unet_dims: Tuple[int, ...] = (512, 1024, 2048)
    """U-Net channel widths per level (authors' code); Tp must be divisible by 2^(levels-1)"""
    unet_kernel_size: int = 5
    """U-Net convolution kernel size (odd)"""
    unet_groups: int = 8
    """U-Net GroupNorm groups (must divide every width)"""
    obs_horizon: Optional[int] = None
    """To: observations in the history (default by env family: manipulation 2, locomotion 1)"""
    pred_horizon: Optional[int] = None
    """Tp: actions per predicted chunk (default: manipulation 16, locomotion 4)"""
    action_horizon: Optional[int] = None
    """Ta: actions executed per chunk from index To-1 (default: manipulation 8, locomotion 4)"""
    num_hypotheses: int = 4
    """G: hypotheses generated per observation in training (the paper's default 4; G=1 is much worse)"""
    drift_mode: Literal["chunk", "step"] = "chunk"
    """chunk: drift on the flattened Tp*da chunk (default, better); step: drift per time step, averaged"""
    drift_field: Literal["official", "gaussian"] = "official"
    """official: the normalized multi-temperature loss of the published code (docs/algorithms.md §2); gaussian: the mean-shift field (§1)"""
    temperatures: Tuple[float, ...] = (0.02, 0.05, 0.2)
    """temperatures R of the official loss (code default; the paper's tuned value is 0.2 alone)"""
    bandwidth: float = 1.0
    """Gaussian kernel bandwidth h (normalized action units) for --drift-field gaussian"""
    num_epochs: int = 500
    """training budget in epochs over the training samples (an epoch = floor(samples / batch size) gradient steps)"""
    total_steps: Optional[int] = None
    """training budget in gradient steps; overrides --num-epochs (the lr schedule then ends at the last epoch begun)"""
    batch_size: int = 64
    """observations per batch (each gets G hypotheses)"""
    learning_rate: float = 1e-4
    """peak AdamW learning rate, reached after --warmup-epochs"""
    min_lr: float = 1e-5
    """learning rate at the first epoch and at the end of the cosine decay"""
    warmup_epochs: int = 100
    """epochs of linear warmup from --min-lr to --learning-rate (the lr changes once per epoch, as the authors')"""
    adam_betas: Tuple[float, float] = (0.9, 0.999)
    """AdamW betas"""
    weight_decay: float = 1e-6
    """AdamW weight decay"""
    max_grad_norm: float = 10.0
    """gradient clipping norm"""
    ema_every: int = 10
    """update the EMA weights (what is evaluated and saved) every this many gradient steps"""
    ema_start_epoch: int = 20
    """before this epoch the EMA is a plain copy of the weights; then decay_k = min(max, 1 - (1 + k)^-power)"""
    ema_power: float = 0.75
    """EMA warmup power"""
    ema_max_decay: float = 0.9999
    """EMA decay cap"""

    # Evaluation, logging, checkpoints
    eval_interval: int = 10_000
    """evaluate the EMA policy every this many gradient steps (0: only at the end)"""
    eval_episodes: int = 10
    """episodes per evaluation"""
    log_interval: int = 500
    """gradient steps between progress lines / tensorboard scalars (and the validation loss)"""
    resume: Optional[str] = None
    """continue a run exactly from its checkpoint (runs/<run>/dbp_bc.pt); architecture and data flags must match"""
    eval_only: bool = False
    """only evaluate --checkpoint(s) and exit"""
    checkpoint: Tuple[str, ...] = ()
    """checkpoint(s) for --eval-only; several (e.g. the last 10 of 3 seeds): each one's result, then mean +- std and stderr"""


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


# ---- DBP networks: generators mu = gen(obs_hist, z), shared unchanged with dbpo_ppo.py (only torch imports)
# Contract (see the checkpoint format in the README): obs_hist [B, To, obs_dim] and the returned chunk
# [B, Tp, act_dim] are both *normalized* (obs_n = (obs - obs_offset) / obs_scale,
# a = a_n * action_scale + action_offset); z ~ N(0, I) has the chunk's shape [B, Tp, act_dim].
# One forward pass = one chunk (1 NFE); no time input anywhere.
class MLPGenerator(nn.Module):
    """mu = MLP(concat(flatten(obs_hist), flatten(z))): the default backbone for low-dimensional states."""

    def __init__(self, obs_dim: int, action_dim: int, obs_horizon: int, pred_horizon: int, hidden_dim: int = 512, depth: int = 3):
        super().__init__()
        self.obs_dim, self.action_dim = obs_dim, action_dim
        self.obs_horizon, self.pred_horizon = obs_horizon, pred_horizon
        self.cond_dim = obs_horizon * obs_dim  # size of features(obs_hist), e.g. for DBPO's log-std head
        layers, d_in = [], self.cond_dim + pred_horizon * action_dim
        for _ in range(depth):
            layers += [nn.Linear(d_in, hidden_dim), nn.Mish()]
            d_in = hidden_dim
        layers.append(nn.Linear(d_in, pred_horizon * action_dim))
        self.net = nn.Sequential(*layers)

    def features(self, obs_hist: torch.Tensor) -> torch.Tensor:
        """The observation features the generator is conditioned on: flatten(obs_hist) [B, To*obs_dim]."""
        return obs_hist.flatten(1)

    def forward(self, obs_hist: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.features(obs_hist), z.flatten(1)], dim=-1)  # [B, To*obs_dim + Tp*act_dim]
        return self.net(x).view(-1, self.pred_horizon, self.action_dim)  # [B, Tp, act_dim]


class Conv1dBlock(nn.Module):
    """Conv1d -> GroupNorm -> Mish, length preserving."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, n_groups: int):
        super().__init__()
        self.block = nn.Sequential(nn.Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2), nn.GroupNorm(n_groups, c_out), nn.Mish())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class FiLMResBlock1d(nn.Module):
    """Two conv blocks; between them FiLM from the condition: h <- scale(c) * h + bias(c); plus a residual."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int, kernel_size: int, n_groups: int):
        super().__init__()
        self.conv1 = Conv1dBlock(c_in, c_out, kernel_size, n_groups)
        self.conv2 = Conv1dBlock(c_out, c_out, kernel_size, n_groups)
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * c_out))
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)  # [B, c_out, T]
        scale, bias = self.film(cond).unsqueeze(-1).chunk(2, dim=1)  # [B, c_out, 1] each
        h = self.conv2(scale * h + bias)
        return h + self.skip(x)


class UNetGenerator(nn.Module):
    """mu = UNet1d(z; FiLM(flatten(obs_hist))): the paper's conditional 1-D U-Net over the chunk's time axis,
    with no time embedding (z plays the role of the diffusion input, but there is only one pass)."""

    def __init__(self, obs_dim: int, action_dim: int, obs_horizon: int, pred_horizon: int, down_dims=(64, 128, 256), kernel_size: int = 5, n_groups: int = 8):
        super().__init__()
        down_dims = [int(d) for d in down_dims]
        if pred_horizon % (2 ** (len(down_dims) - 1)) != 0:
            raise ValueError(f"pred_horizon {pred_horizon} must be divisible by 2^(len(down_dims)-1) = {2 ** (len(down_dims) - 1)}")
        self.obs_dim, self.action_dim = obs_dim, action_dim
        self.obs_horizon, self.pred_horizon = obs_horizon, pred_horizon
        self.cond_dim = cond_dim = obs_horizon * obs_dim
        dims = [action_dim] + down_dims
        self.down = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
            last = i == len(down_dims) - 1
            self.down.append(nn.ModuleList([
                FiLMResBlock1d(c_in, c_out, cond_dim, kernel_size, n_groups),
                FiLMResBlock1d(c_out, c_out, cond_dim, kernel_size, n_groups),
                nn.Identity() if last else nn.Conv1d(c_out, c_out, 3, stride=2, padding=1),  # T -> T/2
            ]))
        self.mid = nn.ModuleList([FiLMResBlock1d(dims[-1], dims[-1], cond_dim, kernel_size, n_groups) for _ in range(2)])
        self.up = nn.ModuleList()
        for c_skip, c_out in reversed(list(zip(down_dims[:-1], down_dims[1:]))):  # skip widths, deepest first
            self.up.append(nn.ModuleList([
                FiLMResBlock1d(2 * c_out, c_skip, cond_dim, kernel_size, n_groups),
                FiLMResBlock1d(c_skip, c_skip, cond_dim, kernel_size, n_groups),
                nn.ConvTranspose1d(c_skip, c_skip, 4, stride=2, padding=1),  # T/2 -> T
            ]))
        self.final = nn.Sequential(Conv1dBlock(down_dims[0], down_dims[0], kernel_size, n_groups), nn.Conv1d(down_dims[0], action_dim, 1))

    def features(self, obs_hist: torch.Tensor) -> torch.Tensor:
        """The observation features the generator is conditioned on: flatten(obs_hist) [B, To*obs_dim]."""
        return obs_hist.flatten(1)

    def forward(self, obs_hist: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        cond = self.features(obs_hist)  # [B, To*obs_dim]
        x = z.transpose(1, 2)  # [B, act_dim, Tp]: channels = action dims, length = chunk time
        skips = []
        for res1, res2, downsample in self.down:
            x = res2(res1(x, cond), cond)
            skips.append(x)
            x = downsample(x)
        for res in self.mid:
            x = res(x, cond)
        for res1, res2, upsample in self.up:  # the skip popped first is the deepest level, at x's resolution
            x = upsample(res2(res1(torch.cat([x, skips.pop()], dim=1), cond), cond))
        return self.final(x).transpose(1, 2)  # [B, Tp, act_dim]


def make_generator(backbone: str, **kwargs) -> nn.Module:
    """Rebuild a generator from a checkpoint: make_generator(ckpt["backbone"], **ckpt["generator_kwargs"])."""
    classes = {"mlp": MLPGenerator, "unet": UNetGenerator}
    if backbone not in classes:
        raise ValueError(f"unknown backbone '{backbone}'; expected one of {sorted(classes)}")
    return classes[backbone](**kwargs)


# ---- end of DBP networks


# ---- Bad input, signals ----
def fail(msg: str):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def check(cond, msg: str) -> None:
    if not cond:
        fail(msg)


class Interrupted(Exception):
    """Raised at a step boundary (or an env step in evaluation) after SIGINT/SIGTERM, so the run saves and exits."""


STOP = {"signum": None, "raise_now": True}  # raise_now: before training nothing needs saving, so unwind at once


def on_signal(signum, frame):
    if STOP["signum"] is not None:
        os._exit(128 + signum)  # a second signal: exit at once
    STOP["signum"] = signum
    if STOP["raise_now"]:
        print(f"interrupted by {signal.Signals(signum).name} (not training: nothing to save)", flush=True)
        sys.exit(128 + signum)


def check_stop() -> None:
    if STOP["signum"] is not None:
        raise Interrupted()


# ---- Normalization, sampling, schedules: small functions the tests import ----
def is_ogbench(env: str) -> bool:
    return env.startswith("cube-")  # cube-single-play, ..., and the resolved ...-singletask-taskN-v0 ids


def is_manipulation(env: str) -> bool:
    """OGBench cube and Robomimic: manipulation tasks with a success signal (gymnasium locomotion envs have none)."""
    return is_ogbench(env) or is_robomimic(env)


HORIZONS = {"manipulation": (2, 16, 8), "locomotion": (1, 4, 4)}  # (To, Tp, Ta) of the authors' task configs


def default_horizons(env: str) -> Tuple[int, int, int]:
    """Manipulation as the authors' PushT/BlockPush/Kitchen, locomotion as their D4RL Hopper."""
    return HORIZONS["manipulation" if is_manipulation(env) else "locomotion"]


def compute_normalization(observations: np.ndarray, actions: np.ndarray, range_eps: float = 1e-4) -> dict:
    """Per-dimension min-max scaling to [-1, 1] of observations and actions (the authors' normalizer):
    x_n = (x - offset) / scale, offset = (max + min) / 2, scale = (max - min) / 2; a constant dimension
    (range < range_eps) gets scale 1, so it maps to 0."""
    stats = {}
    for name, x in (("obs", observations), ("action", actions)):
        lo, hi = x.min(0).astype(np.float64), x.max(0).astype(np.float64)
        stats[f"{name}_offset"] = torch.as_tensor((hi + lo) / 2, dtype=torch.float32)
        stats[f"{name}_scale"] = torch.as_tensor(np.where(hi - lo < range_eps, 1.0, (hi - lo) / 2), dtype=torch.float32)
    return stats


def episode_bounds(episode_ends: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """For every step i: the first and last index of its episode. episode_ends[i] = True at an episode's last step."""
    ends = episode_ends.astype(bool).copy()
    ends[-1] = True  # a trailing unfinished episode ends with the data
    last = np.flatnonzero(ends)
    first = np.concatenate([[0], last[:-1] + 1])
    lengths = last - first + 1
    return np.repeat(first, lengths), np.repeat(last, lengths)


def holdout_episodes(num_episodes: int, val_ratio: float, seed: int) -> np.ndarray:
    """Validation mask over episodes (the authors' split): round(ratio * n) episodes, at least 1 and at most
    n - 1 (none for ratio 0 or a single episode), drawn with a generator seeded by `seed`."""
    val = np.zeros(num_episodes, dtype=bool)
    if val_ratio > 0 and num_episodes > 1:
        k = min(max(1, round(num_episodes * val_ratio)), num_episodes - 1)
        val[np.random.default_rng(seed).choice(num_episodes, size=k, replace=False)] = True
    return val


def sample_steps(episode_ends: np.ndarray, obs_horizon: int, pred_horizon: int, action_horizon: int) -> np.ndarray:
    """The "now" steps t that can be samples (the authors' sequence sampler, pad_before = To-1, pad_after = Ta-1):
    every t whose chunk a_{t-To+1 .. t-To+Tp} runs at most Ta-1 steps past its episode's last step. The history
    may reach To-1 steps before the episode's start. Both are padded by repetition (chunk_indices)."""
    _, last = episode_bounds(episode_ends)
    t = np.arange(len(episode_ends))
    return t[t - obs_horizon + pred_horizon - last <= action_horizon - 1]


def chunk_indices(t: torch.Tensor, ep_first: torch.Tensor, ep_last: torch.Tensor, obs_horizon: int, pred_horizon: int):
    """Data indices of the sample at step t (Diffusion Policy's alignment): the obs history o_{t-To+1..t} and
    the chunk a_{t-To+1..t-To+Tp}, whose index To-1 is the action taken at t. Indices are clamped to t's episode,
    so they never cross a boundary: the history repeats the episode's first obs, the chunk repeats the first
    action before the start and the LAST action after the end (padding)."""
    t, lo, hi = t[:, None], ep_first[:, None], ep_last[:, None]  # [B, 1]
    obs_idx = torch.clamp(t - (obs_horizon - 1) + torch.arange(obs_horizon, device=t.device), lo, hi)  # [B, To]
    act_idx = torch.clamp(t - (obs_horizon - 1) + torch.arange(pred_horizon, device=t.device), lo, hi)  # [B, Tp]
    return obs_idx, act_idx


def check_horizons(obs_horizon: int, pred_horizon: int, action_horizon: int) -> None:
    """The paper's validity conditions: To <= Tp and To - 1 + Ta <= Tp, all >= 1."""
    check(min(obs_horizon, pred_horizon, action_horizon) >= 1 and obs_horizon - 1 + action_horizon <= pred_horizon,
          f"need 1 <= --obs-horizon, --action-horizon and obs_horizon - 1 + action_horizon <= pred_horizon "
          f"(the executed slice must lie in the chunk); got To={obs_horizon}, Tp={pred_horizon}, Ta={action_horizon}")


def lr_at(epoch: int, lr: float, min_lr: float, warmup_epochs: int, num_epochs: int) -> float:
    """The authors' per-epoch schedule: linear min_lr -> lr over warmup_epochs, then cosine back to min_lr at num_epochs."""
    if epoch < warmup_epochs:
        return min_lr + (lr - min_lr) * epoch / warmup_epochs
    progress = min(1.0, (epoch - warmup_epochs) / max(1, num_epochs - warmup_epochs))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def ema_decay(k: int, power: float, max_decay: float) -> float:
    """Decay for the k-th EMA update (k = 0, 1, ...), as Diffusion Policy's EMAModel: 0 for the first two
    updates, then 1 - (1 + k - 1)^-power, capped."""
    step = k - 1
    return 0.0 if step <= 0 else min(max_decay, 1.0 - (1.0 + step) ** -power)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.mul_(decay).add_(p.detach(), alpha=1.0 - decay)  # theta_ema <- d theta_ema + (1 - d) theta
    for be, b in zip(ema.buffers(), model.buffers()):
        be.copy_(b)


def ema_schedule(step: int, steps_per_epoch: int, every: int, start_epoch: int) -> Optional[int]:
    """What the EMA does after gradient step `step` (0-based): None (no update), -1 (plain copy, before
    start_epoch) or k, the index of this decayed update since start_epoch (for ema_decay)."""
    if step % every:
        return None
    start = start_epoch * steps_per_epoch
    return -1 if step < start else step // every - (start + every - 1) // every


STATS = ("obs_offset", "obs_scale", "action_offset", "action_scale")  # the normalization a Policy and a checkpoint hold


class Policy(nn.Module):
    """Generator + normalization: raw obs history -> raw action chunk, clipped to the env's bounds (1 NFE)."""

    def __init__(self, gen: nn.Module, stats: dict, action_low, action_high):
        super().__init__()
        self.gen = gen
        for k, v in {**stats, "action_low": action_low, "action_high": action_high}.items():
            self.register_buffer(k, torch.as_tensor(v, dtype=torch.float32).clone())

    def normalize_obs(self, obs: torch.Tensor) -> torch.Tensor:
        return (obs - self.obs_offset) / self.obs_scale  # obs_n = (obs - offset) / scale

    @torch.no_grad()
    def forward(self, obs_hist: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        chunk_n = self.gen(self.normalize_obs(obs_hist), z)  # [B, Tp, da] normalized
        chunk = chunk_n * self.action_scale + self.action_offset  # a = a_n * scale + offset
        return torch.maximum(torch.minimum(chunk, self.action_high), self.action_low)

    def stats(self) -> dict:
        return {k: getattr(self, k).detach().cpu().clone() for k in STATS}


def load_policy(ckpt: dict) -> Policy:
    """Rebuild the EMA policy stored in a checkpoint dict (format dbp-v1, docs/dbp.md)."""
    gen = make_generator(ckpt["backbone"], **ckpt["generator_kwargs"])
    gen.load_state_dict(ckpt["model"])
    return Policy(gen, {k: ckpt[k] for k in STATS}, ckpt["action_low"], ckpt["action_high"]).eval()


def rollout(env, chunk_fn: Callable[[np.ndarray], np.ndarray], obs_horizon: int, action_horizon: int, seed: int) -> dict:
    """One episode with receding-horizon control. chunk_fn(obs_hist [To, obs_dim]) -> chunk [Tp, da];
    execute chunk[To-1 : To-1+Ta] step by step (stopping early if the episode ends), then replan."""
    obs, info = env.reset(seed=seed)
    history = deque([obs] * obs_horizon, maxlen=obs_horizon)  # at reset the first obs fills the history
    ep_return, length = 0.0, 0
    while True:
        chunk = chunk_fn(np.stack(history))  # [Tp, da]
        for action in chunk[obs_horizon - 1 : obs_horizon - 1 + action_horizon]:  # the executed slice
            check_stop()  # a signal is honoured within one env step
            obs, reward, terminated, truncated, info = env.step(action)
            history.append(obs)
            ep_return, length = ep_return + float(reward), length + 1
            if terminated or truncated:
                return {"return": ep_return, "length": length, "success": float(info.get("success", 0.0))}


def evaluate(policy: Policy, env, episodes: int, obs_horizon: int, action_horizon: int, seed: int, device) -> dict:
    """Mean return / success / length over `episodes` episodes with their own seeds (env: seed + 10000 + i;
    z: a generator seeded with `seed`), independent of the training RNG: --eval-only on a checkpoint
    reproduces the evaluation logged at its step."""
    z_rng = torch.Generator(device="cpu").manual_seed(seed)

    def chunk_fn(obs_hist: np.ndarray) -> np.ndarray:
        z = torch.randn(1, policy.gen.pred_horizon, policy.gen.action_dim, generator=z_rng).to(device)  # [1, Tp, da]
        obs_t = torch.as_tensor(obs_hist, dtype=torch.float32, device=device)[None]  # [1, To, obs_dim]
        return policy(obs_t, z)[0].cpu().numpy()

    results = [rollout(env, chunk_fn, obs_horizon, action_horizon, seed=seed + 10_000 + i) for i in range(episodes)]
    return {k: float(np.mean([r[k] for r in results])) for k in ("return", "success", "length")}


def compute_loss(gen: nn.Module, obs_hist: torch.Tensor, chunk: torch.Tensor, loss: str = "drift", num_hypotheses: int = 4,
                 drift_mode: str = "chunk", field: str = "official", temperatures=(0.02, 0.05, 0.2), bandwidth: float = 1.0):
    """DBP loss for a batch of normalized obs histories [B, To, obs_dim] and expert chunks [B, Tp, da].
    Returns (scalar loss, info dict of detached tensors)."""
    B, Tp, da = chunk.shape
    if loss == "mse":  # deterministic regression: one output per observation, z fixed to 0
        pred = gen(obs_hist, torch.zeros_like(chunk))  # [B, Tp, da]
        mse = (pred - chunk).pow(2).mean()
        return mse, {"chunk_mse": mse.detach()}
    G = num_hypotheses
    z = torch.randn(B * G, Tp, da, device=chunk.device)  # z ~ N(0, I), one per hypothesis
    x = gen(obs_hist.repeat_interleave(G, dim=0), z).view(B, G, Tp, da)  # G hypotheses per observation
    info = {"chunk_mse": (x[:, 0] - chunk).pow(2).mean().detach(), "hypothesis_std": x.std(dim=1).mean().detach()}
    if drift_mode == "chunk":  # one drift on the flattened chunk: S = Tp * da
        gens, poss = [x.reshape(B, G, Tp * da)], [chunk.reshape(B, 1, Tp * da)]
    else:  # step mode: the same objective on each step slice (S = da), averaged over the Tp steps
        gens, poss = [x[:, :, t] for t in range(Tp)], [chunk[:, None, t] for t in range(Tp)]
    if field == "gaussian":
        # V = V_p+ - V_q-, Gaussian kernel of bandwidth h, negatives = the hypotheses themselves (docs/algorithms.md §1).
        # No global scale, so all step slices can go in one batched call.
        g = torch.cat(gens, dim=0)  # [B or B*Tp, G, S]
        V = drift_field.mean_shift_field(g, torch.cat(poss, dim=0), g.detach(), bandwidth)
        total = (g - (g + V).detach()).pow(2).mean()  # L = || x - sg(x + V(x)) ||^2
        info["drift_sq"] = V.pow(2).mean().detach()
        return total, info
    total = 0.0
    for g, p in zip(gens, poss):  # normalized loss (docs/algorithms.md §2): one call per drifting space (own scale)
        l, inf = drift_field.drift_loss(g, p, temperatures=temperatures)  # [B]
        total = total + l.mean() / len(gens)
        for k, v in inf.items():
            info[k] = info.get(k, 0.0) + v.detach() / len(gens)
    return total, info


# ---- Envs, data, checkpoints: every check before any work ----
def format_eval(res: dict, env_id: str) -> str:
    """One parseable line: eval/success (OGBench singletask and Robomimic), eval/episodic_return, eval/episode_length."""
    success = f"eval/success={res['success']:.4f} " if is_manipulation(env_id) else ""
    return f"{success}eval/episodic_return={res['return']:.4f} eval/episode_length={res['length']:.1f}"


def block_call(fn, *a, **kw):
    """Call a shared-block function whose errors are SystemExit('error: ...') (exit 1) and turn them into fail()."""
    try:
        return fn(*a, **kw)
    except SystemExit as e:
        if isinstance(e.code, str):
            fail(e.code.removeprefix("error: "))
        raise


def make_eval_env(env_id: str, render: bool = False, env_args: Optional[str] = None):
    """The evaluation env: OGBench singletask or Robomimic (episodes end at success) or a gymnasium env."""
    if is_robomimic(env_id):  # rebuilt from the env_args JSON the checkpoint stores
        return RobomimicEnv(env_id, env_args, **({"render_mode": "rgb_array"} if render else {}))
    if is_ogbench(env_id):
        import ogbench

        env = ogbench.make_env_and_datasets(env_id, env_only=True)
        if render:  # OGBench's render() always returns an RGB array but leaves render_mode None
            env.unwrapped.render_mode = "rgb_array"
            env.unwrapped.metadata = {**env.unwrapped.metadata, "render_modes": ["rgb_array"], "render_fps": 20}
        return env
    try:
        return gym.make(env_id, **({"render_mode": "rgb_array"} if render else {}))
    except gym.error.Error as e:
        fail(f"cannot make gymnasium env '{env_id}' ({type(e).__name__}); use a MuJoCo id like Hopper-v5 or an OGBench cube env")


def load_demonstrations(args: Args):
    """(env, env_id, observations [N, obs_dim], actions [N, da], episode_ends [N]), every problem a one-line error."""
    path = None if args.dataset_path is None else os.path.abspath(os.path.expanduser(args.dataset_path))
    check(path is None or os.path.isfile(path), f"--dataset-path {path} does not exist")
    if is_robomimic(args.env):  # read by the Robomimic block, which checks the file itself
        env_id, keys = robomimic_env_id(args.env), ()
    elif is_ogbench(args.env):
        env_id = block_call(resolve_env_id, args.env, args.task)
        keys = ("observations", "actions", "terminals", "qpos", "qvel")  # ogbench reads qpos, qvel for singletask
    else:
        env_id, keys = args.env, ("observations", "actions", "rewards", "terminals", "timeouts")
        check(path is not None, f"--env {args.env} is not an OGBench cube env, so it needs --dataset-path to a D4RL-layout "
                                f".npz (observations, actions, rewards, terminals, timeouts)")
    if path is not None and keys:  # readable, with the keys, before anything heavier (ogbench would die with a bare KeyError)
        try:
            with np.load(path) as f:
                missing = [k for k in keys if k not in f.files]
        except Exception as e:
            fail(f"cannot read --dataset-path {path} as .npz ({type(e).__name__}); is it complete and a NumPy .npz?")
        check(not missing, f"{path} lacks the keys {missing}; the dataset needs {', '.join(keys)}")
    try:
        if is_robomimic(args.env):  # data/demo_N of a low-dim file; the env from the file's env_args
            train, ends, env_args = load_robomimic(env_id, resolve_robomimic_file(env_id, args.dataset_path))
            env, obs, actions = RobomimicEnv(env_id, env_args), train["observations"], train["actions"]
        elif is_ogbench(args.env):
            env, train, _ = block_call(load_ogbench, env_id, path)
            # ogbench drops each episode's final state (it has no next state) and marks the new last step terminal
            obs, actions, ends = train["observations"], train["actions"], train["terminals"] > 0
        else:
            with np.load(path) as f:
                data = {k: f[k] for k in keys}
            env = make_eval_env(env_id)
            obs, actions = data["observations"], data["actions"]
            lengths = {k: len(v) for k, v in data.items()}
            check(len(set(lengths.values())) == 1, f"{path}: arrays have different lengths {lengths}; they must all have one entry per step")
            ends = np.logical_or(data["terminals"] > 0, data["timeouts"] > 0)
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as e:
        fail(f"cannot read the dataset {path or env_id} ({type(e).__name__}: {str(e)[:120]}); is the file complete?")
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    check(obs.ndim == 2 and obs.shape[1] == obs_dim and len(obs) > 0,
          f"dataset observations have shape {obs.shape}, but {env_id} observations have dim {obs_dim}; is the dataset for this env?")
    check(actions.ndim == 2 and actions.shape[1] == act_dim and len(actions) == len(obs) == len(ends),
          f"dataset actions have shape {actions.shape} ({len(obs)} observations), but {env_id} has action dim {act_dim}")
    check(np.isfinite(obs).all() and np.isfinite(actions).all(), f"dataset {path or env_id} has NaN or infinite observations/actions")
    low, high = env.action_space.low.astype(np.float64), env.action_space.high.astype(np.float64)
    bad = np.flatnonzero(((actions < low - 1e-4) | (actions > high + 1e-4)).any(1))
    check(len(bad) == 0, f"{len(bad)} dataset actions lie outside {env_id}'s action bounds [{low.min():g}, {high.max():g}] "
                         f"(first at index {bad[:1].tolist()}); is the dataset for this env, and unnormalized?")
    return env, env_id, obs.astype(np.float32), actions.astype(np.float32), np.asarray(ends).astype(bool)


CKPT_KEYS = ("env_id", "backbone", "generator_kwargs", "model", "obs_dim", "action_dim", "obs_horizon", "pred_horizon",
             "action_horizon", "obs_offset", "obs_scale", "action_offset", "action_scale", "action_low", "action_high")
# flags a --resume must share with the checkpoint's run (others, e.g. --total-steps or --eval-interval, may change)
RESUME_KEYS = ("backbone", "hidden_dim", "depth", "unet_dims", "unet_kernel_size", "unet_groups", "obs_horizon", "pred_horizon",
               "action_horizon", "loss", "num_hypotheses", "drift_mode", "drift_field", "env", "task", "dataset_path", "seed",
               "val_ratio", "batch_size")
TRAIN_STATE = ("train_model", "optimizer", "rng", "wall_time")  # what dbp_bc.pt has beyond the policy snapshots


def read_checkpoint(path: str, flag: str, train_state: bool = False) -> dict:
    """A dbp-v1 checkpoint, or a one-line error (missing, truncated, another script's, a policy-only snapshot)."""
    check(os.path.isfile(path), f"{flag} {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        fail(f"cannot read {flag} {path} ({type(e).__name__}); is it a complete dbp_bc.pt?")
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
    check(fmt == "dbp-v1", f"{flag} {path} is not a DBP checkpoint (format {fmt!r}, expected 'dbp-v1' as dbp_bc.py writes)")
    missing = [k for k in CKPT_KEYS if k not in ckpt]
    check(not missing, f"{flag} {path} lacks the keys {missing} of the dbp-v1 format")
    check(not train_state or "train_model" in ckpt, f"{flag} {path} holds only a policy (a dbp_bc_<step>.pt snapshot); resume from the run's dbp_bc.pt")
    return ckpt


def save_checkpoint(path: str, ckpt: dict) -> None:
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-write never leaves a truncated checkpoint


def validate_args(args: Args) -> None:
    """Every flag's range, before any work (exit 2 with one line)."""
    ints = {"--num-epochs": (args.num_epochs, 1), "--batch-size": (args.batch_size, 1), "--eval-episodes": (args.eval_episodes, 1),
            "--log-interval": (args.log_interval, 1), "--eval-interval": (args.eval_interval, 0), "--save-interval": (args.save_interval, 0),
            "--keep-checkpoints": (args.keep_checkpoints, 0), "--num-threads": (args.num_threads, 0), "--num-hypotheses": (args.num_hypotheses, 1),
            "--hidden-dim": (args.hidden_dim, 1), "--depth": (args.depth, 1), "--warmup-epochs": (args.warmup_epochs, 0),
            "--ema-every": (args.ema_every, 1), "--ema-start-epoch": (args.ema_start_epoch, 0), "--unet-groups": (args.unet_groups, 1),
            "--total-steps": (1 if args.total_steps is None else args.total_steps, 1)}
    for flag, (value, lo) in ints.items():
        check(value >= lo, f"{flag} must be at least {lo}, got {value}")
    positive = {"--learning-rate": args.learning_rate, "--min-lr": args.min_lr, "--max-grad-norm": args.max_grad_norm,
                "--ema-power": args.ema_power, "--bandwidth": args.bandwidth}
    for flag, value in positive.items():
        check(math.isfinite(value) and value > 0, f"{flag} must be a positive finite number, got {value}")
    check(args.min_lr <= args.learning_rate, f"--min-lr {args.min_lr} must not exceed --learning-rate {args.learning_rate}")
    check(math.isfinite(args.weight_decay) and args.weight_decay >= 0, f"--weight-decay must be finite and >= 0, got {args.weight_decay}")
    check(all(0 <= b < 1 for b in args.adam_betas), f"--adam-betas must lie in [0, 1), got {args.adam_betas}")
    check(0 <= args.ema_max_decay <= 1, f"--ema-max-decay must lie in [0, 1], got {args.ema_max_decay}")
    check(0 <= args.val_ratio < 0.5, f"--val-ratio must lie in [0, 0.5), got {args.val_ratio}")
    check(args.temperatures and all(math.isfinite(r) and r > 0 for r in args.temperatures), f"--temperatures must be positive numbers, got {args.temperatures}")
    check(args.unet_kernel_size >= 1 and args.unet_kernel_size % 2 == 1, f"--unet-kernel-size must be odd, got {args.unet_kernel_size}")
    check(args.task is None or 1 <= args.task <= 5, f"--task must be in 1..5, got {args.task}")
    To, Tp, Ta = (v if v is not None else d for v, d in zip((args.obs_horizon, args.pred_horizon, args.action_horizon), default_horizons(args.env)))
    args.obs_horizon, args.pred_horizon, args.action_horizon = To, Tp, Ta  # chosen by env family unless given
    check_horizons(To, Tp, Ta)
    if args.backbone == "unet":
        check(len(args.unet_dims) >= 1 and min(args.unet_dims) >= 1, f"--unet-dims must be positive widths, got {args.unet_dims}")
        check(Tp % (2 ** (len(args.unet_dims) - 1)) == 0, f"--backbone unet halves the chunk {len(args.unet_dims) - 1} times: "
                                                          f"--pred-horizon {Tp} must be divisible by {2 ** (len(args.unet_dims) - 1)} (or pass fewer --unet-dims)")
        check(all(d % args.unet_groups == 0 for d in args.unet_dims), f"--unet-groups {args.unet_groups} must divide every --unet-dims width {args.unet_dims}")
    check(args.run_name is None or (args.run_name and "/" not in args.run_name and args.run_name not in (".", "..")), f"--run-name must be a plain folder name, got {args.run_name!r}")
    check(not os.path.exists(args.runs_dir) or os.path.isdir(args.runs_dir), f"--runs-dir {args.runs_dir} exists and is not a folder; pass another --runs-dir")
    parent = os.path.abspath(args.runs_dir)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    check(os.path.isdir(parent) and os.access(parent, os.W_OK), f"--runs-dir {args.runs_dir} cannot be created ({parent} is not a writable folder)")
    if args.loss == "drift" and args.num_hypotheses < 2:
        print("warning: --num-hypotheses 1 leaves the hypotheses nothing to repel; the paper finds G=1 much worse")


def resume_command(ckpt_path: str) -> str:
    """This command line with --resume <ckpt_path> in place of any --resume / --run-name / --runs-dir given."""
    argv, drop = sys.argv[1:], ("--resume", "--run-name", "--runs-dir")
    keep = [a for i, a in enumerate(argv) if a.split("=")[0] not in drop and (i == 0 or argv[i - 1] not in drop)]
    return shlex.join(["python", sys.argv[0], *keep, "--resume", ckpt_path])


def eval_only(args: Args, device: torch.device) -> None:
    """--eval-only: evaluate each --checkpoint (everything needed is in it), then mean +- std and stderr over them."""
    check(len(args.checkpoint) > 0, "--eval-only needs --checkpoint PATH [PATH ...] (dbp_bc.pt or dbp_bc_<step>.pt files)")
    check(args.eval_episodes >= 1 and args.num_threads >= 0, "--eval-episodes must be >= 1 and --num-threads >= 0")
    ckpts = [read_checkpoint(p, "--checkpoint") for p in args.checkpoint]
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    print(f"start: eval-only of {len(ckpts)} checkpoint(s) | device {device} | threads {torch.get_num_threads()}", flush=True)
    envs, results = {}, []
    for path, ckpt in zip(args.checkpoint, ckpts):
        env_id, t0 = ckpt["env_id"], time.time()
        env = envs[env_id] if env_id in envs else envs.setdefault(env_id, make_eval_env(env_id, env_args=ckpt.get("env_args")))
        res = evaluate(load_policy(ckpt).to(device), env, args.eval_episodes, ckpt["obs_horizon"], ckpt["action_horizon"], args.seed, device)
        results.append(res)
        print(f"eval-only {path} ({env_id} step {ckpt.get('step')}): {format_eval(res, env_id)} "
              f"({args.eval_episodes} episodes, {time.time() - t0:.1f}s)", flush=True)
    key = "success" if all(is_manipulation(c["env_id"]) for c in ckpts) else "return"
    v = np.array([r[key] for r in results])
    std = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    print(f"final eval-only over {len(v)} checkpoint(s): eval/{key} mean {v.mean():.4f} +- std {std:.4f} "
          f"(stderr {std / math.sqrt(len(v)):.4f}, {args.eval_episodes} episodes each)")


if __name__ == "__main__":
    args = tyro.cli(Args)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    if args.eval_only:
        eval_only(args, device)
        sys.exit(0)

    # ---- every check before any work: flags, the resumed checkpoint, the run folder, the data ----
    validate_args(args)  # also fills in To, Tp, Ta by env family
    resume_ckpt = None
    if args.resume is not None:
        resume_ckpt = read_checkpoint(args.resume, "--resume", train_state=True)
        old, now = resume_ckpt.get("args", {}), json.loads(json.dumps(asdict(args)))  # json: tuples -> lists, as saved
        diff = {k: (old.get(k), now[k]) for k in RESUME_KEYS if old.get(k) != now[k]}
        check(not diff, f"--resume: these flags differ from the checkpoint's run (checkpoint, now): {diff}")
    elif args.run_name is not None:
        check(not os.path.exists(os.path.join(args.runs_dir, args.run_name, "dbp_bc.pt")),
              f"{os.path.join(args.runs_dir, args.run_name)} already holds a run: continue it with --resume, or pass another --run-name")
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic

    env, env_id, observations, actions, episode_ends = load_demonstrations(args)
    env_args = json.dumps(env.env_args) if is_robomimic(env_id) else None  # Robomimic: how to rebuild the env (JSON)
    obs_dim, action_dim = observations.shape[1], actions.shape[1]
    if resume_ckpt is not None:
        check((resume_ckpt["obs_dim"], resume_ckpt["action_dim"]) == (obs_dim, action_dim),
              f"--resume: the checkpoint has obs/action dims {resume_ckpt['obs_dim']}/{resume_ckpt['action_dim']}, the data {obs_dim}/{action_dim}")
    To, Tp, Ta = args.obs_horizon, args.pred_horizon, args.action_horizon
    # samples: "now" steps with at most Ta-1 padded chunk steps, split by episode into train / 2% validation
    ep_first, ep_last = episode_bounds(episode_ends)  # [N] each
    episode_of = np.searchsorted(np.unique(ep_first), ep_first)  # [N] episode index of every step
    val_episode = holdout_episodes(int(episode_of[-1]) + 1, args.val_ratio, args.seed)
    steps = sample_steps(episode_ends, To, Tp, Ta)
    train_t, val_t = steps[~val_episode[episode_of[steps]]], steps[val_episode[episode_of[steps]]]
    check(len(train_t) > 0, f"no training samples: every training episode is shorter than Tp - To - Ta + 2 = {Tp - To - Ta + 2} steps")
    steps_per_epoch = max(1, len(train_t) // args.batch_size)  # the authors drop the last partial batch
    total_steps = args.total_steps or args.num_epochs * steps_per_epoch
    num_epochs = math.ceil(total_steps / steps_per_epoch)  # the lr schedule's length

    if resume_ckpt is not None:  # a resumed run continues in its own folder
        run_dir = os.path.dirname(os.path.abspath(args.resume))
    else:
        run_dir = os.path.join(args.runs_dir, args.run_name or f"{env_id}__{args.exp_name}__{args.seed}__{int(time.time())}")
    run_name = os.path.basename(run_dir)
    ckpt_path = os.path.join(run_dir, "dbp_bc.pt")
    print(f"start: env {env_id} | data {args.dataset_path or 'OGBench default'}: {len(observations)} steps, {len(val_episode)} episodes "
          f"({int(val_episode.sum())} held out), {len(train_t)} train / {len(val_t)} val samples | {total_steps} steps = {num_epochs} epochs "
          f"of {steps_per_epoch} | device {device} | threads {torch.get_num_threads()} | run dir {run_dir}", flush=True)
    os.makedirs(run_dir, exist_ok=True)

    # ---- data on the device, normalized: min-max to [-1, 1] with statistics of all demonstrations ----
    stats = compute_normalization(observations, actions)
    obs_n = ((torch.as_tensor(observations) - stats["obs_offset"]) / stats["obs_scale"]).to(device)  # [N, obs_dim]
    act_n = ((torch.as_tensor(actions) - stats["action_offset"]) / stats["action_scale"]).to(device)  # [N, da]
    ep_first, ep_last = torch.as_tensor(ep_first, device=device), torch.as_tensor(ep_last, device=device)
    train_t, val_t = torch.as_tensor(train_t, device=device), torch.as_tensor(val_t[:1024], device=device)  # val: a fixed subset

    def batch(t: torch.Tensor):
        obs_idx, act_idx = chunk_indices(t, ep_first[t], ep_last[t], To, Tp)
        return obs_n[obs_idx], act_n[act_idx]  # [B, To, obs_dim], [B, Tp, da]

    # ---- generator, its EMA copy, optimizer ----
    gen_kwargs = dict(obs_dim=obs_dim, action_dim=action_dim, obs_horizon=To, pred_horizon=Tp)
    if args.backbone == "mlp":
        gen_kwargs.update(hidden_dim=args.hidden_dim, depth=args.depth)
    else:
        gen_kwargs.update(down_dims=list(args.unet_dims), kernel_size=args.unet_kernel_size, n_groups=args.unet_groups)
    gen = make_generator(args.backbone, **gen_kwargs).to(device)
    ema_gen = make_generator(args.backbone, **gen_kwargs).to(device)
    ema_gen.load_state_dict(gen.state_dict())
    ema_gen.requires_grad_(False)
    optimizer = torch.optim.AdamW(gen.parameters(), lr=args.min_lr, betas=tuple(args.adam_betas), weight_decay=args.weight_decay)
    loss_flags = (args.loss, args.num_hypotheses, args.drift_mode, args.drift_field, args.temperatures, args.bandwidth)
    policy = Policy(ema_gen, stats, env.action_space.low, env.action_space.high).to(device).eval()  # what is evaluated and saved
    start_step, wall_time = 0, 0.0
    if resume_ckpt is not None:
        gen.load_state_dict(resume_ckpt["train_model"])
        ema_gen.load_state_dict(resume_ckpt["model"])
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        start_step, wall_time = resume_ckpt["step"], resume_ckpt["wall_time"]
        rng = resume_ckpt["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"])
        print(f"resuming {run_name} at step {start_step}")
    print(f"generator: {args.backbone}, {sum(p.numel() for p in gen.parameters())} parameters; To={To} Tp={Tp} Ta={Ta}", flush=True)

    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True, config=vars(args), name=run_name, save_code=True)
    from torch.utils.tensorboard import SummaryWriter

    # purge_step: on resume, drop whatever the interrupted run logged after its checkpoint, so no step is written twice
    writer = SummaryWriter(run_dir, purge_step=start_step + 1 if resume_ckpt is not None else None)
    if resume_ckpt is None:
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n%s" % ("\n".join([f"|{key}|{value}|" for key, value in vars(args).items()])))
    nonfinite = torch.zeros(2, dtype=torch.bool, device=device)  # [loss, grad norm] was non-finite at some step
    t_start = time.time()

    def assert_finite(step: int) -> None:
        """Stop (exit 1) naming the first non-finite quantity, before anything is saved: a good checkpoint stays."""
        names = [n for n, bad in zip(("loss", "gradient norm"), nonfinite.tolist()) if bad]
        names += [f"parameter {n}" for m in (gen, ema_gen) for n, p in m.named_parameters() if not torch.isfinite(p).all()]
        if names:
            kept = f"{ckpt_path} keeps the last finite state" if os.path.exists(ckpt_path) else "nothing was saved"
            print(f"error: non-finite {names[0]} by step {step} (try a lower --learning-rate); stopped, {kept}", file=sys.stderr)
            sys.exit(1)

    def make_checkpoint(step: int) -> dict:
        return {
            "format": "dbp-v1", "args": json.loads(json.dumps(asdict(args))), "env_id": env_id,
            "obs_dim": obs_dim, "action_dim": action_dim, "obs_horizon": To, "pred_horizon": Tp, "action_horizon": Ta,
            "backbone": args.backbone, "generator_kwargs": gen_kwargs, "loss": args.loss,
            "env_args": env_args,
            "model": {k: v.cpu() for k, v in ema_gen.state_dict().items()},
            **policy.stats(), "action_low": policy.action_low.cpu(), "action_high": policy.action_high.cpu(), "step": step,
            # training state, for an exact --resume (not in the dbp_bc_<step>.pt snapshots)
            "train_model": {k: v.cpu() for k, v in gen.state_dict().items()}, "optimizer": optimizer.state_dict(),
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None},
            "wall_time": wall_time + time.time() - t_start,
        }

    def save(step: int) -> None:
        """dbp_bc.pt (for --resume) and the policy snapshot dbp_bc_<step>.pt, keeping the last --keep-checkpoints."""
        assert_finite(step)
        ckpt = make_checkpoint(step)
        save_checkpoint(ckpt_path, ckpt)
        if args.keep_checkpoints > 0:
            save_checkpoint(os.path.join(run_dir, f"dbp_bc_{step}.pt"), {k: v for k, v in ckpt.items() if k not in TRAIN_STATE})
            snaps = sorted((int(m.group(1)), f) for f in os.listdir(run_dir) if (m := re.fullmatch(r"dbp_bc_(\d+)\.pt", f)))
            for _, f in snaps[: -args.keep_checkpoints]:
                os.remove(os.path.join(run_dir, f))

    @torch.no_grad()
    def validation_loss() -> Optional[Tuple[float, float]]:
        """(loss, chunk_mse) of the trained generator on the held-out samples, with its own seeded latents."""
        if len(val_t) == 0:
            return None
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.type == "cuda" else []):
            torch.manual_seed(args.seed)  # fork_rng: the training RNG stream is untouched
            out = [compute_loss(gen, *batch(val_t[i : i + args.batch_size]), *loss_flags) for i in range(0, len(val_t), args.batch_size)]
        return float(np.mean([o[0].item() for o in out])), float(np.mean([o[1]["chunk_mse"].item() for o in out]))

    def run_eval(step: int, capture_video: bool = False) -> dict:
        eval_env = env
        if capture_video:
            eval_env = gym.wrappers.RecordVideo(make_eval_env(env_id, render=True, env_args=env_args),
                                                os.path.join(run_dir, "videos"), episode_trigger=lambda i: i == 0)
        print(f"evaluating step {step} ({args.eval_episodes} episodes)", flush=True)
        t0 = time.time()
        res = evaluate(policy, eval_env, args.eval_episodes, To, Ta, args.seed, device)
        writer.add_scalar("eval/episodic_return", res["return"], step)
        writer.add_scalar("eval/episode_length", res["length"], step)
        if is_manipulation(env_id):
            writer.add_scalar("eval/success", res["success"], step)
        print(f"eval step {step}: {format_eval(res, env_id)} ({args.eval_episodes} episodes, {time.time() - t0:.1f}s)", flush=True)
        if capture_video:
            eval_env.close()
        return res

    # ---- training loop: per-epoch shuffled batches, drift G hypotheses toward the expert chunk, EMA, repeat ----
    STOP["raise_now"] = False  # from here a signal is honoured at the next gradient step or env step, and saved
    done, perm, decay = start_step, None, 0.0
    try:
        for step in range(start_step, total_steps):
            check_stop()
            epoch, i = divmod(step, steps_per_epoch)
            if perm is None or i == 0:  # the epoch's shuffle is a function of (seed, epoch): a resume continues it
                order = torch.randperm(len(train_t), generator=torch.Generator().manual_seed(args.seed * 1_000_003 + epoch))
                perm = train_t[order.to(device)]
            lr = lr_at(epoch, args.learning_rate, args.min_lr, args.warmup_epochs, num_epochs)
            for group in optimizer.param_groups:
                group["lr"] = lr
            obs_hist, chunk = batch(perm[i * args.batch_size : (i + 1) * args.batch_size])
            loss, info = compute_loss(gen, obs_hist, chunk, *loss_flags)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(gen.parameters(), args.max_grad_norm)
            optimizer.step()
            nonfinite |= torch.stack([~torch.isfinite(loss.detach()), ~torch.isfinite(grad_norm)])  # no sync here
            k = ema_schedule(step, steps_per_epoch, args.ema_every, args.ema_start_epoch)
            if k == -1:  # before --ema-start-epoch: a plain copy
                ema_gen.load_state_dict(gen.state_dict())
            elif k is not None:
                decay = ema_decay(k, args.ema_power, args.ema_max_decay)
                ema_update(ema_gen, gen, decay)
            done = step + 1

            if done % args.log_interval == 0 or done == total_steps:
                assert_finite(done)
                sps = (done - start_step) / max(time.time() - t_start, 1e-9)
                eta = (total_steps - done) / max(sps, 1e-9)
                for name, value in [("losses/loss", loss.item()), ("losses/grad_norm", grad_norm.item()),  # .item(): sync, only here
                                    *[(f"losses/{k}", float(v)) for k, v in info.items()],
                                    ("charts/learning_rate", lr), ("charts/ema_decay", decay), ("charts/epoch", epoch), ("charts/SPS", sps)]:
                    writer.add_scalar(name, value, done)
                val = validation_loss()
                if val is not None:
                    writer.add_scalar("losses/val_loss", val[0], done)
                    writer.add_scalar("losses/val_chunk_mse", val[1], done)
                print(f"step {done}/{total_steps} | epoch {epoch} | loss {loss.item():.4f} | chunk_mse {float(info['chunk_mse']):.4f} "
                      + (f"| val_loss {val[0]:.4f} " if val else "") + f"| SPS {sps:.0f} | ETA {int(eta // 60)}m{int(eta % 60):02d}s", flush=True)
            if args.eval_interval > 0 and done % args.eval_interval == 0 and done != total_steps:
                assert_finite(done)
                run_eval(done)
            if args.save_model and args.save_interval > 0 and done % args.save_interval == 0 and done != total_steps:
                save(done)
        if args.save_model:
            save(total_steps)
            print(f"saved {ckpt_path}")
        res = run_eval(total_steps, capture_video=args.capture_video)
    except Interrupted:
        if args.save_model:
            save(done)
        saved = f"saved {ckpt_path}; continue with:\n  {resume_command(ckpt_path)}" if args.save_model else "nothing saved (--no-save-model)"
        print(f"interrupted by {signal.Signals(STOP['signum']).name} at step {done}; {saved}", flush=True)
        sys.exit(128 + STOP["signum"])
    env.close()
    writer.close()
    print(f"final: {total_steps} steps, wall time {(wall_time + time.time() - t_start) / 60:.1f} min, {format_eval(res, env_id)}")
