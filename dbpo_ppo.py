"""DBPO: Drift-Based Policy Optimization, PPO fine-tuning of a pretrained one-step DBP generator
(arXiv 2604.03540; docs/algorithms.md §5; user guide: docs/dbpo.md).

The pretrained generator `mu(s, z)` (from `dbp_bc.py --save-model`) becomes the mean of a Gaussian actor
`pi(A | s, z) = N(mu_theta(s, z), diag(sigma(s)^2))`. A rollout draws `z ~ N(0, I)`, samples the chunk
`A = mu + sigma * n` and stores `z` with the transition, so the PPO ratio is exact: the latent's density is
the same in numerator and denominator and cancels. Only the executed prefix of the chunk enters the
likelihood. An anchor `||mu_theta(s, z) - mu_frozen(s, z)||^2` (same stored z) keeps the generator near its
pretrained manifold. Deployment is the mean path: one network evaluation per chunk.

One PPO transition = one chunk decision: the env executes Ta actions (fewer if the episode ends), the reward
of the transition is the SUM of the executed steps' rewards and gamma discounts per decision. Iterations are
counted as in the authors' code: iteration i = 0, 1, ... is an evaluation (mean path, no update) when
i % eval_interval == 0 and a rollout + PPO update otherwise. Layout follows CleanRL's ppo_continuous_action.py.
"""

import copy
import json
import math
import os
import random
import re
import shlex
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, fields
from typing import Literal, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro

STATE_FORMAT = "dbpo-state-v1"


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
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
    """record the first episode of every evaluation (first eval env) to <run dir>/videos/"""
    num_threads: int = 0
    """torch CPU threads (0: torch's default; 1 is much faster on a busy shared CPU)"""
    save_model: bool = True
    """write the resumable <run dir>/state.pt every --save-interval iterations, on Ctrl-C/SIGTERM and at the end,
    and the fine-tuned model <run dir>/dbpo_ppo.pt (dbp-v1 format) at the end"""
    save_interval: int = 10
    """write state.pt every this many iterations"""

    # Algorithm specific arguments
    checkpoint: Optional[str] = None
    """(required) the DBP checkpoint to fine-tune: `dbp_bc.py --save-model` output, or a `dbpo_ppo.py` dbpo_ppo.pt"""
    env_id: Optional[str] = None
    """the environment; default: the checkpoint's env (giving another one is refused)"""
    max_episode_steps: Optional[int] = None
    """override the env's time limit (default: OGBench's evaluation horizon / 1000 for locomotion)"""
    num_iterations: int = 1500
    """iterations, evaluation iterations included (every --eval-interval-th, starting with iteration 0)"""
    num_envs: int = 40
    """the number of parallel environments"""
    num_steps: int = 500
    """chunk decisions per environment per rollout; env steps per iteration ~ num_envs * num_steps * Ta"""
    actor_lr: float = 1e-5
    """peak learning rate of the actor (generator and log-std head)"""
    actor_min_lr: float = 3e-6
    """actor learning rate at the start of the warm-up and the end of the cosine cycle"""
    critic_lr: float = 1e-4
    """peak learning rate of the critic"""
    critic_min_lr: float = 3e-5
    """critic learning rate at the start of the warm-up and the end of the cosine cycle"""
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    """cosine: linear warm-up min -> peak over --lr-warmup-iters, then cosine back to min over the cycle; constant: peak"""
    lr_warmup_iters: int = 10
    """warm-up iterations of the learning-rate schedules (the actor's starts after the critic warm-up)"""
    lr_cycle_iters: Optional[int] = None
    """length of one cosine cycle (it restarts after it); default: --num-iterations"""
    weight_decay: float = 1e-6
    """AdamW weight decay of both optimizers"""
    gamma: float = 0.99
    """the discount factor gamma, per chunk decision"""
    gae_lambda: float = 0.95
    """the lambda for the general advantage estimation"""
    minibatch_size: int = 50000
    """the minibatch size (capped at the rollout size num_envs * num_steps)"""
    update_epochs: int = 5
    """the K epochs to update the policy"""
    norm_adv: bool = True
    """toggles advantages normalization (per minibatch)"""
    clip_coef: float = 0.02
    """the surrogate clipping coefficient"""
    clip_vloss: Optional[float] = None
    """if set, clip the value change to +-clip_vloss (off in the authors' code)"""
    ent_coef: float = 0.01
    """coefficient of the entropy bonus"""
    vf_coef: float = 0.5
    """coefficient of the value loss"""
    anchor_coef: float = 1.0
    """coefficient of the anchor loss ||mu_ft(s,z) - mu_frozen(s,z)||^2 (0 disables it)"""
    max_grad_norm: float = 0.5
    """the maximum norm for the gradient clipping (actor and critic separately)"""
    target_kl: Optional[float] = 0.02
    """stop the update epochs early once the approximate KL exceeds this"""
    critic_warmup_iters: int = 5
    """iterations 0 .. critic_warmup_iters-1 update only the critic"""
    reward_scaling: Literal["rollout_std", "running", "none"] = "rollout_std"
    """rollout_std: r / std(rewards of this rollout) (authors' code); running: r / running std of the discounted return"""
    timeout_as_terminal: bool = False
    """treat time-limit ends as terminal (authors' code); default: bootstrap them with gamma * V(final obs)"""
    logprob_min: Optional[float] = -2.0
    """clamp the new and old (normalized) log-likelihoods below at this value before the ratio (authors' code)"""
    init_std: float = 0.03
    """initial exploration std (log-std head bias = log init_std, zero weights)"""
    min_std: float = 0.03
    """lower clamp of the std"""
    max_std: float = 0.10
    """upper clamp of the std"""
    noise_clip: float = 3.0
    """exploration noise n ~ N(0, I) is clipped to +-noise_clip before A = mu + std * n"""
    normalize_logprob: bool = True
    """divide the executed-prefix log-likelihood (and entropy) by the prefix dimension Ta * act_dim"""
    eval_interval: int = 10
    """iteration i is an evaluation when i % eval_interval == 0; one more evaluation follows the last iteration"""
    num_eval_episodes: int = 100
    """episodes per evaluation (mean path)"""
    num_eval_envs: int = 10
    """parallel environments of the evaluation"""
    eval_latent: Literal["sample", "zero"] = "sample"
    """latent of the evaluation's mean path: sample (z ~ N(0,I) from a seeded generator, as DBP deploys) or zero"""
    resume: Optional[str] = None
    """a <run dir>/state.pt to continue from (networks, optimizers, counters, RNG); envs restart episodes"""
    eval_only: bool = False
    """only evaluate --checkpoint's mean path for num_eval_episodes episodes and exit"""
    runs_dir: str = "runs"
    """where run folders (tensorboard, state, model, videos) go"""
    run_name: Optional[str] = None
    """the run folder's name under --runs-dir (default: <env_id>__<exp_name>__<seed>__<unix time>)"""


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


def check(cond, msg: str):
    if not cond:
        fail(msg)


LOCOMOTION_ENVS = ("Hopper-v5", "Walker2d-v5", "Ant-v5")
OGBENCH_ENV = re.compile(r"cube-(single|double|triple|quadruple)-play-singletask-task[1-5]-v0")


def check_env_id(env_id: str) -> str:
    """Supported: OGBench cube singletask ids (as dbp_bc.py writes them) and gymnasium MuJoCo locomotion."""
    check(env_id in LOCOMOTION_ENVS or OGBENCH_ENV.fullmatch(str(env_id)) or is_robomimic(str(env_id)),
          f"unsupported env '{env_id}'; use an OGBench singletask id like cube-single-play-singletask-task1-v0, "
          f"a Robomimic task like lift-mh, or one of {', '.join(LOCOMOTION_ENVS)}")
    return env_id


def gym_env_id(env_id: str) -> str:
    """cube-single-play-singletask-task1-v0 -> cube-single-singletask-task1-v0 (OGBench drops the dataset type)."""
    return env_id.replace("-play-singletask", "-singletask") if OGBENCH_ENV.fullmatch(env_id) else env_id


class ChunkEnv(gym.Wrapper):
    """Receding-horizon control (docs/algorithms.md §4) as an env: observation = the last To observations
    [To, obs_dim] (at reset the first one repeated, as in dbp_bc.py's training); action = the executed prefix
    [Ta, act_dim]; reward = sum of the executed steps' rewards; stops early when the episode ends inside the chunk.
    With record=True it keeps the rendered frames of the last finished episode in `last_frames`."""

    def __init__(self, env: gym.Env, obs_horizon: int, action_horizon: int, record: bool = False):
        super().__init__(env)
        self.obs_horizon, self.record = obs_horizon, record
        obs_dim, act_space = env.observation_space.shape[0], env.action_space
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (obs_horizon, obs_dim), np.float32)
        self.action_space = gym.spaces.Box(
            np.repeat(act_space.low[None], action_horizon, 0), np.repeat(act_space.high[None], action_horizon, 0), dtype=np.float32
        )
        self.executed_steps = 0  # env steps actually taken (an episode can end inside a chunk)
        self.frames, self.last_frames = [], []

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self.history = deque([np.asarray(obs, np.float32)] * self.obs_horizon, maxlen=self.obs_horizon)
        if self.record:
            self.last_frames, self.frames = self.frames, [self.env.render()]
        return np.stack(self.history), info

    def step(self, chunk):
        total_reward = 0.0
        for action in chunk:  # [act_dim] each
            obs, reward, terminated, truncated, info = self.env.step(action)
            self.history.append(np.asarray(obs, np.float32))
            total_reward += float(reward)
            self.executed_steps += 1
            if self.record:
                self.frames.append(self.env.render())
            if terminated or truncated:
                break
        return np.stack(self.history), total_reward, terminated, truncated, info


def make_env(env_id, idx, obs_horizon, action_horizon, max_episode_steps=None, render=False, env_args=None):
    def thunk():
        if is_robomimic(env_id):  # robosuite env rebuilt from the checkpoint's env_args (Robomimic block)
            env = RobomimicEnv(env_id, env_args, max_episode_steps=max_episode_steps, render_mode="rgb_array" if render else None)
            return ChunkEnv(gym.wrappers.RecordEpisodeStatistics(env), obs_horizon, action_horizon, record=render)
        if OGBENCH_ENV.fullmatch(env_id):
            import ogbench  # noqa: F401  (registers the cube envs with gymnasium)
        kwargs = {} if max_episode_steps is None else {"max_episode_steps": max_episode_steps}
        if render and OGBENCH_ENV.fullmatch(env_id):  # OGBench renders rgb arrays but declares no render modes
            env = gym.make(gym_env_id(env_id), disable_env_checker=True, **kwargs)
            env.unwrapped.render_mode = "rgb_array"
        else:
            env = gym.make(gym_env_id(env_id), **({"render_mode": "rgb_array"} if render else {}), **kwargs)
        env = gym.wrappers.RecordEpisodeStatistics(env)
        return ChunkEnv(env, obs_horizon, action_horizon, record=render)

    return thunk


def load_file(path: str, flag: str, what: str):
    check(os.path.isfile(path), f"{flag} {path} does not exist; {what}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        fail(f"cannot read {flag} {path} ({type(e).__name__}: not a complete torch file); {what}")


def all_finite(tree) -> bool:
    """True if every floating tensor/array in a nested dict/list is finite."""
    if isinstance(tree, dict):
        return all(all_finite(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return all(all_finite(v) for v in tree)
    if isinstance(tree, torch.Tensor) and tree.is_floating_point():
        return bool(torch.isfinite(tree).all())
    if isinstance(tree, np.ndarray) and np.issubdtype(tree.dtype, np.floating):
        return bool(np.isfinite(tree).all())
    return True


def load_checkpoint(path: Optional[str]) -> dict:
    """Read and check a dbp_bc.py checkpoint (contract: format dbp-v1); one-line errors for anything else."""
    what = "pass the dbp_bc.pt written by dbp_bc.py --save-model"
    check(path is not None, f"--checkpoint is required: the DBP model to fine-tune ({what})")
    ckpt = load_file(path, "--checkpoint", what)
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    check(fmt != STATE_FORMAT, f"{path} is a dbpo_ppo.py training state: continue it with --resume {path}")
    keys = ("env_id", "backbone", "generator_kwargs", "model", "obs_dim", "action_dim", "obs_horizon", "pred_horizon",
            "action_horizon", "obs_offset", "obs_scale", "action_offset", "action_scale", "action_low", "action_high")
    check(fmt == "dbp-v1" and all(k in ckpt for k in keys), f"{path} is not a DBP checkpoint (format dbp-v1, got {fmt!r}); {what}")
    To, Tp, Ta = ckpt["obs_horizon"], ckpt["pred_horizon"], ckpt["action_horizon"]
    check(1 <= To <= Tp and 1 <= Ta and To - 1 + Ta <= Tp, f"{path} has inconsistent horizons To={To}, Tp={Tp}, Ta={Ta} (need To-1+Ta <= Tp)")
    check(all_finite(ckpt), f"{path} contains NaN or infinite values; retrain it")
    return ckpt


def build_generator(ckpt: dict, state_dict: dict) -> nn.Module:
    try:
        generator = make_generator(ckpt["backbone"], **ckpt["generator_kwargs"])
        generator.load_state_dict(state_dict)
    except (RuntimeError, ValueError, TypeError) as e:
        fail(f"the checkpoint's weights do not fit its backbone/generator_kwargs ({str(e).splitlines()[0]})")
    return generator


def executed(chunk: torch.Tensor, obs_horizon: int, action_horizon: int) -> torch.Tensor:
    """The executed prefix A_exec = A[To-1 : To-1+Ta] of a chunk [B, Tp, act_dim] -> [B, Ta, act_dim]."""
    return chunk[:, obs_horizon - 1 : obs_horizon - 1 + action_horizon]


def prefix_log_prob(mu, std, chunk, obs_horizon, action_horizon, normalize=True):
    """log pi(A_exec | s, z) = sum_{k in prefix} sum_j log N(A_kj; mu_kj(s,z), std_kj(s)^2)  -> [B]
    (divided by Ta * act_dim with normalize). Unexecuted coordinates never enter."""
    mu, std, chunk = (executed(x, obs_horizon, action_horizon) for x in (mu, std, chunk))  # [B, Ta, act_dim]
    logp = (-0.5 * ((chunk - mu) / std) ** 2 - std.log() - 0.5 * math.log(2 * math.pi)).sum((1, 2))
    return logp / chunk[0].numel() if normalize else logp


def prefix_entropy(std, obs_horizon, action_horizon, normalize=True):
    """H = sum_{k in prefix} sum_j (0.5 + 0.5 log(2 pi) + log std_kj)  -> [B], normalized like the log-prob."""
    ex = executed(std, obs_horizon, action_horizon)
    ent = (0.5 + 0.5 * np.log(2 * np.pi) + ex.log()).sum((1, 2))
    return ent / ex[0].numel() if normalize else ent


class DBPOAgent(nn.Module):
    """Gaussian actor around the pretrained generator, frozen anchor copy, critic, and the checkpoint's normalizers."""

    def __init__(self, ckpt: dict, generator: nn.Module, anchor: nn.Module, init_std=0.03, min_std=0.03, max_std=0.10):
        super().__init__()
        self.obs_horizon, self.pred_horizon, self.action_horizon = ckpt["obs_horizon"], ckpt["pred_horizon"], ckpt["action_horizon"]
        self.action_dim = ckpt["action_dim"]
        self.generator = generator  # mu_theta(s, z), trainable
        self.anchor = anchor.requires_grad_(False)  # mu_frozen(s, z): the pretrained weights, never updated
        # log sigma(s) = W f(s) + b with W = 0, b = log init_std: starts state-independent at init_std
        self.log_std_head = nn.Linear(generator.cond_dim, self.pred_horizon * self.action_dim)
        nn.init.zeros_(self.log_std_head.weight)
        nn.init.constant_(self.log_std_head.bias, float(np.log(init_std)))
        self.log_std_min, self.log_std_max = float(np.log(min_std)), float(np.log(max_std))
        # critic V(s): MLP 3x256 Mish on the normalized, flattened observation history (authors' code)
        layers, d = [], generator.cond_dim
        for _ in range(3):
            layers += [nn.Linear(d, 256), nn.Mish()]
            d = 256
        self.critic = nn.Sequential(*layers, nn.Linear(d, 1))
        # an mse-trained DBP ignores z (it was trained with z = 0): keep z = 0 so mu is what was trained
        self.zero_latent = ckpt.get("loss") == "mse"
        f32 = lambda k: torch.as_tensor(ckpt[k], dtype=torch.float32)  # noqa: E731
        self.register_buffer("obs_offset", f32("obs_offset"))
        self.register_buffer("obs_scale", f32("obs_scale"))
        self.register_buffer("action_offset", f32("action_offset"))
        self.register_buffer("action_scale", f32("action_scale"))
        # env action bounds in normalized units: clipping here = clipping the env action after unnormalizing
        self.register_buffer("action_low_n", (f32("action_low") - self.action_offset) / self.action_scale)
        self.register_buffer("action_high_n", (f32("action_high") - self.action_offset) / self.action_scale)

    def actor_parameters(self):
        return list(self.generator.parameters()) + list(self.log_std_head.parameters())

    def normalize_obs(self, obs: torch.Tensor) -> torch.Tensor:
        return (obs - self.obs_offset) / self.obs_scale  # [B, To, obs_dim]

    def sample_latent(self, batch: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        shape = (batch, self.pred_horizon, self.action_dim)  # dim(z) = dim(chunk)
        if self.zero_latent:
            return torch.zeros(shape, device=self.obs_offset.device)
        return torch.randn(shape, device=self.obs_offset.device, generator=generator)

    def get_value(self, obs_n: torch.Tensor) -> torch.Tensor:
        return self.critic(obs_n.flatten(1)).squeeze(-1)  # [B]

    def dist_params(self, obs_n: torch.Tensor, z: torch.Tensor):
        """mu(s, z) [B, Tp, act_dim] from one generator pass; std(s) = exp(clamp(log-std head(f(s))))."""
        mu = self.generator(obs_n, z)
        log_std = self.log_std_head(self.generator.features(obs_n)).view_as(mu)
        return mu, log_std.clamp(self.log_std_min, self.log_std_max).exp()

    @torch.no_grad()
    def act(self, obs_n: torch.Tensor, z: torch.Tensor, deterministic=False, noise_clip=3.0, normalize_logprob=True):
        """Rollout: A = clip(mu + std * clip(n, +-noise_clip)); deterministic: A = clip(mu) (the 1-NFE mean path).
        Returns the normalized chunk [B, Tp, act_dim] and its executed-prefix log-likelihood [B]."""
        mu, std = self.dist_params(obs_n, z)
        chunk = mu if deterministic else mu + std * torch.randn_like(mu).clamp(-noise_clip, noise_clip)
        chunk = torch.maximum(torch.minimum(chunk, self.action_high_n), self.action_low_n)
        return chunk, prefix_log_prob(mu, std, chunk, self.obs_horizon, self.action_horizon, normalize_logprob)

    def env_actions(self, chunk: torch.Tensor) -> np.ndarray:
        """Normalized chunk -> the executed prefix in env units [B, Ta, act_dim] (numpy, for envs.step)."""
        prefix = executed(chunk, self.obs_horizon, self.action_horizon)
        return (prefix * self.action_scale + self.action_offset).cpu().numpy()


def dbpo_loss(agent: DBPOAgent, obs_n, z, chunk, old_logprob, advantages, returns, old_values, args: Args):
    """L = L_clip + vf_coef * L_V - ent_coef * H + anchor_coef * L_anchor on one minibatch; returns (loss, info)."""
    To, Ta = agent.obs_horizon, agent.action_horizon
    mu, std = agent.dist_params(obs_n, z)  # the stored z: pi_theta(A|s,z) / pi_old(A|s,z) is the exact PPO ratio
    new_logprob = prefix_log_prob(mu, std, chunk, To, Ta, args.normalize_logprob)
    entropy = prefix_entropy(std, To, Ta, args.normalize_logprob)
    if args.logprob_min is not None:  # authors' code: both sides clamped below; where both bind, ratio = 1, no gradient
        new_logprob, old_logprob = new_logprob.clamp(min=args.logprob_min), old_logprob.clamp(min=args.logprob_min)
    logratio = new_logprob - old_logprob
    ratio = logratio.exp()
    with torch.no_grad():
        old_approx_kl = (-logratio).mean()
        approx_kl = ((ratio - 1) - logratio).mean()  # http://joschu.net/blog/kl-approx.html
        clipfrac = ((ratio - 1.0).abs() > args.clip_coef).float().mean()
    if args.norm_adv:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    # clipped surrogate: max(-A r, -A clip(r, 1-eps, 1+eps))
    pg_loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)).mean()
    new_values = agent.get_value(obs_n)
    if args.clip_vloss is not None:
        v_clipped = old_values + (new_values - old_values).clamp(-args.clip_vloss, args.clip_vloss)
        v_loss = 0.5 * torch.max((new_values - returns) ** 2, (v_clipped - returns) ** 2).mean()
    else:
        v_loss = 0.5 * ((new_values - returns) ** 2).mean()
    # anchor: ||mu_theta(s,z) - mu_frozen(s,z)||^2, same stored z, mean over the whole chunk (authors' code: mse)
    with torch.no_grad():
        mu_frozen = agent.anchor(obs_n, z)
    anchor_loss = ((mu - mu_frozen) ** 2).mean()
    loss = pg_loss - args.ent_coef * entropy.mean() + args.vf_coef * v_loss + args.anchor_coef * anchor_loss
    info = {"policy_loss": pg_loss.detach(), "value_loss": v_loss.detach(), "entropy": entropy.mean().detach(),
            "anchor_loss": anchor_loss.detach(), "approx_kl": approx_kl, "old_approx_kl": old_approx_kl,
            "clipfrac": clipfrac, "std": executed(std, To, Ta).mean().detach(), "ratio": ratio.detach(), "loss": loss.detach()}
    return loss, info


def update(agent: DBPOAgent, actor_optimizer, critic_optimizer, minibatch, args: Args, update_actor: bool):
    """One gradient step on one minibatch; during the critic warm-up only the critic moves.
    A non-finite loss stops before any parameter changes (the caller names the quantity)."""
    loss, info = dbpo_loss(agent, *minibatch, args)
    if not torch.isfinite(loss):
        return info
    actor_optimizer.zero_grad()
    critic_optimizer.zero_grad()
    loss.backward()
    info["actor_grad_norm"] = nn.utils.clip_grad_norm_(agent.actor_parameters(), args.max_grad_norm)
    info["critic_grad_norm"] = nn.utils.clip_grad_norm_(agent.critic.parameters(), args.max_grad_norm)
    critic_optimizer.step()
    if update_actor:
        actor_optimizer.step()
    return info


def compute_gae(rewards, values, dones, next_value, gamma, gae_lambda):
    """GAE over one rollout. rewards, values, dones: [T, N]; dones[t] = 1 if the episode ended at decision t
    (for a truncated episode the bootstrap gamma * V(final obs) is already inside rewards[t]); next_value [N]:
    V of the observation after the last decision. Returns (advantages, returns), each [T, N]."""
    advantages = torch.zeros_like(rewards)
    lastgaelam = 0.0
    for t in reversed(range(rewards.shape[0])):
        nextvalues = next_value if t == rewards.shape[0] - 1 else values[t + 1]
        nextnonterminal = 1.0 - dones[t]
        delta = rewards[t] + gamma * nextvalues * nextnonterminal - values[t]  # delta_t = r_t + gamma V(s') - V(s)
        advantages[t] = lastgaelam = delta + gamma * gae_lambda * nextnonterminal * lastgaelam
    return advantages, advantages + values


def rollout_std_scaling(rewards: np.ndarray) -> np.ndarray:
    """Authors' code: r / (std(r over the whole rollout [T, N]) + 1e-8)."""
    return rewards / (rewards.std() + 1e-8)


class RewardScaler:
    """Running reward scaling: r / std(G) with G_t = gamma * G_{t-1} + r_t per env, reset at episode ends.
    The statistics take in a whole rollout before it is scaled, so the first rollout already gets a sensible
    scale (updating per step would divide the first, identical returns by a near-zero std)."""

    def __init__(self, num_envs: int, gamma: float, epsilon: float = 1e-8):
        self.gamma, self.epsilon = gamma, epsilon
        self.returns = np.zeros(num_envs)
        self.mean, self.var, self.count = 0.0, 1.0, 0.0

    def __call__(self, rewards: np.ndarray, dones: np.ndarray) -> np.ndarray:
        """rewards, dones: [T, N] of one rollout -> scaled rewards [T, N]."""
        returns = np.zeros_like(rewards)
        for t in range(len(rewards)):
            self.returns = self.returns * self.gamma + rewards[t]
            returns[t] = self.returns
            self.returns[dones[t]] = 0.0
        batch_mean, batch_var, n = returns.mean(), returns.var(), returns.size
        delta, total = batch_mean - self.mean, self.count + n  # parallel mean/variance update (Chan et al.)
        self.var = (self.var * self.count + batch_var * n + delta**2 * self.count * n / total) / total
        self.mean, self.count = self.mean + delta * n / total, total
        return rewards / np.sqrt(self.var + self.epsilon)

    def state_dict(self):
        return {"returns": self.returns.copy(), "mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state):
        self.returns, self.mean, self.var, self.count = state["returns"].copy(), state["mean"], state["var"], state["count"]


def scheduled_lr(k: int, peak: float, low: float, warmup: int, cycle: int, schedule: str = "cosine") -> float:
    """Learning rate after k scheduler steps (authors' CosineAnnealingWarmupRestarts): within a cycle of `cycle`
    steps, linear low -> peak over `warmup` steps, then low + (peak - low) (1 + cos(pi (k - warmup) / (cycle - warmup))) / 2."""
    if schedule == "constant":
        return peak
    k %= cycle
    if k < warmup:
        return low + (peak - low) * k / warmup
    return low + (peak - low) * (1 + math.cos(math.pi * (k - warmup) / (cycle - warmup))) / 2


class Interrupted(Exception):
    """Raised by StopFlag.raise_if_set after SIGINT/SIGTERM."""


class NonFinite(Exception):
    """A NaN/inf loss term, parameter or reward (the message names it)."""


class StopFlag:
    """First SIGINT/SIGTERM: remember it (the loops poll `raise_if_set` each env step / minibatch);
    a second one exits at once with 128 + signal."""

    def __init__(self):
        self.signum = None
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self.handle)

    def handle(self, signum, frame):
        if self.signum is not None:
            os._exit(128 + signum)
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping (send it again to exit at once)", file=sys.stderr, flush=True)

    def raise_if_set(self):
        if self.signum is not None:
            raise Interrupted


@torch.no_grad()
def evaluate(agent: DBPOAgent, envs, num_episodes: int, seed: int, zero_latent=False, stop=None, video=None):
    """Mean path (no exploration noise, 1 NFE per chunk). Every env runs a fixed quota of episodes, so short
    (e.g. early-success) episodes are not over-counted. Same seed -> same initial states and latents (own
    generator). video = (folder, name): the first episode of env 0 is written there as <name>.mp4."""
    device = agent.obs_offset.device
    quota = np.array([num_episodes // envs.num_envs + (i < num_episodes % envs.num_envs) for i in range(envs.num_envs)])
    finished = np.zeros(envs.num_envs, dtype=int)
    returns, lengths, successes = [], [], []
    latent_rng = torch.Generator(device).manual_seed(seed)
    obs, _ = envs.reset(seed=seed)
    while (finished < quota).any():
        if stop is not None:
            stop.raise_if_set()
        obs_n = agent.normalize_obs(torch.as_tensor(obs, device=device))
        z = agent.sample_latent(envs.num_envs, latent_rng)
        chunk, _ = agent.act(obs_n, torch.zeros_like(z) if zero_latent else z, deterministic=True)
        obs, _, _, _, infos = envs.step(agent.env_actions(chunk))
        if "final_info" in infos:
            final = infos["final_info"]
            for i in np.flatnonzero(infos["_final_info"]):
                if finished[i] < quota[i]:
                    returns.append(float(final["episode"]["r"][i]))
                    lengths.append(int(final["episode"]["l"][i]))
                    if "success" in final and final["_success"][i]:
                        successes.append(float(final["success"][i]))
                if i == 0 and finished[0] == 0 and video is not None:
                    from gymnasium.utils.save_video import save_video

                    save_video(envs.envs[0].last_frames, video[0], name_prefix=video[1], fps=envs.envs[0].metadata.get("render_fps", 30))
                    os.replace(os.path.join(video[0], f"{video[1]}-episode-0.mp4"), os.path.join(video[0], f"{video[1]}.mp4"))
                finished[i] += 1
    success = float(np.mean(successes)) if successes else float("nan")
    return {"episodic_return": float(np.mean(returns)), "episodic_length": float(np.mean(lengths)), "success_rate": success,
            "success_stderr": float(np.std(successes) / np.sqrt(len(successes))) if successes else float("nan")}


def save_atomic(obj, path: str):
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)  # a crash mid-write never leaves a truncated file behind


def check_args(args: Args):
    """Every flag's range, before any work (exit 2 with one line)."""
    for f in fields(Args):
        value = getattr(args, f.name)
        if isinstance(value, float):
            check(math.isfinite(value), f"--{f.name.replace('_', '-')} must be a finite number, got {value}")
    positive = ("num_iterations", "num_envs", "num_steps", "update_epochs", "num_eval_episodes", "num_eval_envs",
                "minibatch_size", "eval_interval", "save_interval", "actor_lr", "actor_min_lr", "critic_lr",
                "critic_min_lr", "clip_coef", "max_grad_norm", "noise_clip", "lr_cycle_iters", "max_episode_steps",
                "target_kl", "clip_vloss")
    for name in positive:
        value = getattr(args, name)
        check(value is None or value > 0, f"--{name.replace('_', '-')} must be > 0, got {value}")
    for name in ("seed", "num_threads", "weight_decay", "ent_coef", "vf_coef", "anchor_coef", "critic_warmup_iters", "lr_warmup_iters"):
        value = getattr(args, name)
        check(value >= 0, f"--{name.replace('_', '-')} must be >= 0, got {value}")
    check(0 < args.gamma <= 1, f"--gamma must be in (0, 1], got {args.gamma}")
    check(0 <= args.gae_lambda <= 1, f"--gae-lambda must be in [0, 1], got {args.gae_lambda}")
    check(args.actor_min_lr <= args.actor_lr and args.critic_min_lr <= args.critic_lr,
          "the min learning rates must not exceed the peak ones (--actor-min-lr <= --actor-lr, --critic-min-lr <= --critic-lr)")
    check(0 < args.min_std <= args.init_std <= args.max_std,
          f"need 0 < --min-std <= --init-std <= --max-std, got {args.min_std}, {args.init_std}, {args.max_std}")
    check(not (args.eval_only and args.resume), "--eval-only evaluates --checkpoint; drop --resume")


def resume_command(state_path: str) -> str:
    """This run's command line with --resume <state_path> in place of any earlier --resume."""
    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip or a == "--resume" or a.startswith("--resume="):
            skip = a == "--resume"
            continue
        argv.append(a)
    return shlex.join(["python", sys.argv[0], *argv, "--resume", state_path])


def format_eval(result: dict, n: int) -> str:
    return (f"return {result['episodic_return']:.4f} | length {result['episodic_length']:.2f} | "
            f"success {result['success_rate']:.4f} +- {result['success_stderr']:.4f} ({n} episodes, mean path)")


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_args(args)
    ckpt = load_checkpoint(args.checkpoint)
    env_id = check_env_id(ckpt["env_id"])
    check(args.env_id in (None, env_id), f"the checkpoint was trained on {env_id}, not {args.env_id}; drop --env-id or pass a checkpoint trained on {args.env_id}")
    To, Tp, Ta = ckpt["obs_horizon"], ckpt["pred_horizon"], ckpt["action_horizon"]
    state = None
    if args.resume is not None:
        what = "pass the <run dir>/state.pt of an earlier dbpo_ppo.py run"
        state = load_file(args.resume, "--resume", what)
        fmt = state.get("format") if isinstance(state, dict) else None
        check(fmt == STATE_FORMAT, f"{args.resume} is not a dbpo_ppo.py state (format {STATE_FORMAT}, got {fmt!r}); {what}")
        check(state["env_id"] == env_id, f"{args.resume} fine-tunes {state['env_id']}, but --checkpoint is for {env_id}")
        check(state["num_envs"] == args.num_envs, f"{args.resume} ran with --num-envs {state['num_envs']}; resume with the same value")
        check(state["iteration"] < args.num_iterations or not state["finished"],
              f"{args.resume} already finished {state['iteration']} iterations; raise --num-iterations to continue")
        check(all_finite(state["agent"]), f"{args.resume} contains NaN or infinite weights")
        check(args.run_name in (None, state["run_name"]), f"{args.resume} belongs to run {state['run_name']}; drop --run-name")
    run_name = state["run_name"] if state else args.run_name or f"{env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.dirname(os.path.abspath(args.resume)) if state else os.path.abspath(os.path.join(args.runs_dir, run_name))
    state_path = os.path.join(run_dir, "state.pt")
    if not args.eval_only or args.capture_video:
        check(state or not os.path.exists(state_path), f"{run_dir} already holds a run; continue it with --resume {state_path} or pick another --run-name")
        parent = os.path.abspath(run_dir)
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        check(os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK), f"cannot create the run folder {run_dir}: {parent} is not a writable folder; pick another --runs-dir")

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    # env setup: SAME_STEP autoreset, so a finished episode's last observation arrives in infos["final_obs"]
    # in the same step (needed to bootstrap truncated episodes) and the returned observation is the reset one
    eval_envs = gym.vector.SyncVectorEnv(
        [make_env(env_id, i, To, Ta, args.max_episode_steps, render=args.capture_video and i == 0, env_args=ckpt.get("env_args"))
         for i in range(args.num_eval_envs)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    obs_dim, act_dim = eval_envs.single_observation_space.shape[-1], eval_envs.single_action_space.shape[-1]
    check((obs_dim, act_dim) == (ckpt["obs_dim"], ckpt["action_dim"]),
          f"the checkpoint expects obs/action dims {ckpt['obs_dim']}/{ckpt['action_dim']} but {env_id} has {obs_dim}/{act_dim}")

    generator = build_generator(ckpt, ckpt["model"])
    anchor = build_generator(ckpt, ckpt.get("anchor_model", ckpt["model"]))  # a dbpo_ppo.pt anchors to the original DBP
    agent = DBPOAgent(ckpt, generator, anchor, args.init_std, args.min_std, args.max_std).to(device)
    actor_optimizer = torch.optim.AdamW(agent.actor_parameters(), lr=args.actor_lr, weight_decay=args.weight_decay)
    critic_optimizer = torch.optim.AdamW(agent.critic.parameters(), lr=args.critic_lr, weight_decay=args.weight_decay)
    reward_scaler = RewardScaler(args.num_envs, args.gamma)
    start_iteration, global_step = 0, 0
    try:
        if "dbpo" in ckpt:  # continuing from a dbpo_ppo.pt: keep its log-std head and critic
            agent.log_std_head.load_state_dict(ckpt["dbpo"]["log_std_head"])
            agent.critic.load_state_dict(ckpt["dbpo"]["critic"])
        if state is not None:
            agent.load_state_dict(state["agent"])
            actor_optimizer.load_state_dict(state["actor_optimizer"])
            critic_optimizer.load_state_dict(state["critic_optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        fail(f"{args.resume or args.checkpoint} does not fit the networks of --checkpoint {args.checkpoint} ({str(e).splitlines()[0][:200]})")
    if state is not None:
        reward_scaler.load_state_dict(state["reward_scaler"])
        start_iteration, global_step = state["iteration"], state["global_step"]
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"])
    eval_seed = args.seed + 100_000  # every evaluation sees the same initial states and latents: before/after are paired
    video_dir = os.path.join(run_dir, "videos")
    print(f"dbpo_ppo: {env_id} | checkpoint {args.checkpoint} ({ckpt['backbone']}, To={To} Tp={Tp} Ta={Ta}) | device {device} | "
          f"threads {torch.get_num_threads()} | run folder {run_dir if not args.eval_only or args.capture_video else '- (eval only)'}", flush=True)
    if args.capture_video:
        os.makedirs(video_dir, exist_ok=True)
    stop = StopFlag()

    if args.eval_only:
        try:
            result = evaluate(agent, eval_envs, args.num_eval_episodes, eval_seed, args.eval_latent == "zero", stop,
                              (video_dir, "eval-only") if args.capture_video else None)
        except Interrupted:
            sys.stderr.flush()
            os._exit(128 + stop.signum)  # nothing to save; skip the interpreter's slow final garbage collection
        print(f"final eval {env_id}: {format_eval(result, args.num_eval_episodes)}")
        sys.exit(0)

    from torch.utils.tensorboard import SummaryWriter

    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True, config=vars(args),
                   name=run_name, monitor_gym=True, save_code=True)
    os.makedirs(run_dir, exist_ok=True)
    writer = SummaryWriter(run_dir, purge_step=start_iteration if state else None)  # TB step = iteration, never written twice
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n%s" % ("\n".join([f"|{key}|{value}|" for key, value in vars(args).items()])))
    if state is not None:
        print(f"resumed {run_name} at iteration {start_iteration} ({global_step} env steps)")

    envs = gym.vector.SyncVectorEnv(
        [make_env(env_id, i, To, Ta, args.max_episode_steps, env_args=ckpt.get("env_args")) for i in range(args.num_envs)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    envs.action_space.seed(args.seed)

    # ALGO Logic: Storage setup (one row per chunk decision)
    T, N = args.num_steps, args.num_envs
    obs_buf = torch.zeros((T, N, To, obs_dim), device=device)  # normalized observation histories
    z_buf = torch.zeros((T, N, Tp, act_dim), device=device)  # the latents: stored so the ratio is exact
    chunk_buf = torch.zeros((T, N, Tp, act_dim), device=device)  # sampled (clipped) normalized chunks
    logprob_buf = torch.zeros((T, N), device=device)
    raw_reward_buf, done_np = np.zeros((T, N)), np.zeros((T, N), dtype=bool)  # env rewards (summed over each chunk)
    bootstrap_buf = torch.zeros((T, N), device=device)  # gamma * V(final obs) where an episode was truncated
    value_buf = torch.zeros((T, N), device=device)
    cycle = args.lr_cycle_iters or args.num_iterations

    def run_eval(iteration):
        result = evaluate(agent, eval_envs, args.num_eval_episodes, eval_seed, args.eval_latent == "zero", stop,
                          (video_dir, f"eval-iter{iteration}") if args.capture_video else None)
        for key, value in result.items():
            writer.add_scalar(f"eval/{key}", value, iteration)
        writer.add_scalar("eval/env_steps", global_step, iteration)
        return result

    def training_state(iteration, finished=False):
        """A consistent, detached copy of everything needed to continue after `iteration` iterations."""
        return {"format": STATE_FORMAT, "env_id": env_id, "run_name": run_name, "iteration": iteration, "finished": finished,
                "global_step": global_step, "num_envs": args.num_envs, "agent": copy.deepcopy(agent.state_dict()),
                "actor_optimizer": copy.deepcopy(actor_optimizer.state_dict()),
                "critic_optimizer": copy.deepcopy(critic_optimizer.state_dict()),
                "reward_scaler": reward_scaler.state_dict(), "args": vars(args),
                "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}}

    # TRY NOT TO MODIFY: start the game
    start_time = time.time()
    steps_at_start, rollout_time, update_time = global_step, 0.0, 0.0
    next_obs, _ = envs.reset(seed=args.seed + start_iteration)
    snapshot, iteration, result = None, start_iteration, None
    try:
        for iteration in range(start_iteration, args.num_iterations):
            snapshot = training_state(iteration)  # what an interruption inside this iteration saves
            # learning rates at this iteration (authors' schedulers step once per iteration, the actor's after the critic warm-up)
            for opt, peak, low, k in ((critic_optimizer, args.critic_lr, args.critic_min_lr, iteration),
                                      (actor_optimizer, args.actor_lr, args.actor_min_lr, max(iteration - args.critic_warmup_iters, 0))):
                for group in opt.param_groups:
                    group["lr"] = scheduled_lr(k, peak, low, args.lr_warmup_iters, cycle, args.lr_schedule)
            if iteration % args.eval_interval == 0:  # an evaluation iteration: mean path, no update
                result = run_eval(iteration)
                print(f"eval at iteration {iteration}: {format_eval(result, args.num_eval_episodes)}", flush=True)
                if (iteration + 1) % args.save_interval == 0 and args.save_model:
                    save_atomic(training_state(iteration + 1), state_path)
                continue
            t0 = time.time()
            steps_before = sum(envs.get_attr("executed_steps"))
            episode_returns, episode_successes = [], []
            for step in range(T):
                stop.raise_if_set()
                obs_n = agent.normalize_obs(torch.as_tensor(next_obs, device=device))  # [N, To, obs_dim]
                with torch.no_grad():
                    z = agent.sample_latent(N)  # [N, Tp, act_dim]
                    chunk, logprob = agent.act(obs_n, z, noise_clip=args.noise_clip, normalize_logprob=args.normalize_logprob)
                    value_buf[step] = agent.get_value(obs_n)
                obs_buf[step], z_buf[step], chunk_buf[step], logprob_buf[step] = obs_n, z, chunk, logprob

                # TRY NOT TO MODIFY: execute the game and log data.
                next_obs, reward, terminations, truncations, infos = envs.step(agent.env_actions(chunk))
                dones = np.logical_or(terminations, truncations)
                raw_reward_buf[step], done_np[step], bootstrap_buf[step] = reward, dones, 0.0
                if "final_obs" in infos:
                    # default: bootstrap on truncation, not on termination: r_t += gamma * V(final obs); the episode ends here
                    truncated_only = np.flatnonzero(infos["_final_obs"] & truncations & ~terminations)
                    if truncated_only.size and not args.timeout_as_terminal:
                        final_obs = torch.as_tensor(np.stack(infos["final_obs"][truncated_only]), device=device)
                        with torch.no_grad():
                            bootstrap_buf[step, truncated_only] = args.gamma * agent.get_value(agent.normalize_obs(final_obs))
                    final = infos["final_info"]
                    for i in np.flatnonzero(final["_episode"]):
                        episode_returns.append(float(final["episode"]["r"][i]))
                        if "success" in final and final["_success"][i]:
                            episode_successes.append(float(final["success"][i]))
            if not np.isfinite(raw_reward_buf).all():
                raise NonFinite("env reward")
            if args.reward_scaling == "rollout_std":
                rewards = rollout_std_scaling(raw_reward_buf)
            else:
                rewards = reward_scaler(raw_reward_buf, done_np) if args.reward_scaling == "running" else raw_reward_buf
            reward_buf = torch.as_tensor(rewards, dtype=torch.float32, device=device) + bootstrap_buf  # V is in scaled units
            done_buf = torch.as_tensor(done_np, dtype=torch.float32, device=device)
            iteration_steps = sum(envs.get_attr("executed_steps")) - steps_before
            global_step += iteration_steps
            t1 = time.time()

            # bootstrap value if not done
            with torch.no_grad():
                next_value = agent.get_value(agent.normalize_obs(torch.as_tensor(next_obs, device=device)))
                advantages, returns = compute_gae(reward_buf, value_buf, done_buf, next_value, args.gamma, args.gae_lambda)

            # flatten the batch
            b_obs, b_z, b_chunk = obs_buf.flatten(0, 1), z_buf.flatten(0, 1), chunk_buf.flatten(0, 1)
            b_logprobs, b_advantages = logprob_buf.flatten(), advantages.flatten()
            b_returns, b_values = returns.flatten(), value_buf.flatten()

            # Optimizing the policy and value network
            batch_size = T * N
            minibatch_size = min(args.minibatch_size, batch_size)
            update_actor = iteration >= args.critic_warmup_iters
            infos_mb, stop_epochs = [], False
            for epoch in range(args.update_epochs):
                b_inds = torch.randperm(batch_size, device=device)
                for start in range(0, batch_size, minibatch_size):
                    stop.raise_if_set()
                    mb = b_inds[start : start + minibatch_size]
                    info = update(agent, actor_optimizer, critic_optimizer,
                                  (b_obs[mb], b_z[mb], b_chunk[mb], b_logprobs[mb], b_advantages[mb], b_returns[mb], b_values[mb]),
                                  args, update_actor)
                    if not torch.isfinite(info["loss"]):
                        raise NonFinite(next(k for k in ("policy_loss", "value_loss", "entropy", "anchor_loss", "loss") if not torch.isfinite(info[k])))
                    infos_mb.append(info)
                    if args.target_kl is not None and info["approx_kl"] > args.target_kl:
                        stop_epochs = True  # the policy moved too far from the one that collected the data
                        break
                if stop_epochs:
                    break
            bad = [name for name, p in agent.named_parameters() if not torch.isfinite(p).all()]
            if bad:
                raise NonFinite(f"parameter {bad[0]}")
            t2 = time.time()
            rollout_time, update_time = rollout_time + t1 - t0, update_time + t2 - t1

            y_pred, y_true = b_values.cpu().numpy(), b_returns.cpu().numpy()
            var_y = np.var(y_true)
            explained_var = np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y

            # TRY NOT TO MODIFY: record rewards for plotting purposes (tensorboard step = iteration)
            mean = lambda key: torch.stack([i[key] for i in infos_mb]).float().mean().item()  # noqa: E731
            scalars = {"charts/env_steps": global_step, "charts/actor_lr": actor_optimizer.param_groups[0]["lr"],
                       "charts/critic_lr": critic_optimizer.param_groups[0]["lr"], "charts/std": mean("std"),
                       "charts/advantage_std": b_advantages.std().item(), "charts/reward_mean": raw_reward_buf.mean(),
                       "losses/explained_variance": explained_var, "losses/update_epochs_done": epoch + 1,
                       "losses/minibatches_done": len(infos_mb), "losses/approx_kl_last": infos_mb[-1]["approx_kl"].item()}
            for key in ("value_loss", "policy_loss", "entropy", "anchor_loss", "old_approx_kl", "approx_kl", "clipfrac",
                        "actor_grad_norm", "critic_grad_norm"):
                scalars[f"losses/{key}"] = mean(key)
            if episode_returns:
                scalars["charts/episodic_return"] = np.mean(episode_returns)
            if episode_successes:
                scalars["charts/success_rate"] = np.mean(episode_successes)
            sps = int((global_step - steps_at_start) / (time.time() - start_time))
            scalars.update({"charts/SPS": sps, "charts/rollout_SPS": iteration_steps / (t1 - t0)})
            for key, value in scalars.items():
                writer.add_scalar(key, value, iteration)
            eta = (time.time() - start_time) / (iteration - start_iteration + 1) * (args.num_iterations - iteration - 1)
            ret = f"{np.mean(episode_returns):.2f}" if episode_returns else "n/a"
            succ = f" | success {np.mean(episode_successes):.3f}" if episode_successes else ""
            print(f"iter {iteration}/{args.num_iterations} | env steps {global_step} | SPS {sps} | return {ret}{succ} | "
                  f"kl {scalars['losses/approx_kl']:.4f} | anchor {scalars['losses/anchor_loss']:.2e} | std {scalars['charts/std']:.3f} | "
                  f"ev {explained_var:.2f} | {'actor+critic' if update_actor else 'critic warm-up'} | ETA {eta / 60:.1f} min", flush=True)
            if (iteration + 1) % args.save_interval == 0 and args.save_model:
                save_atomic(training_state(iteration + 1), state_path)

        iteration = args.num_iterations
        snapshot = training_state(args.num_iterations)
        if (args.num_iterations - 1) % args.eval_interval != 0 or result is None:  # the last iteration trained: evaluate it
            result = run_eval(args.num_iterations)
        print(f"timing: rollout {(global_step - steps_at_start) / max(rollout_time, 1e-9):.1f} env steps/s, "
              f"update {(global_step - steps_at_start) / max(update_time, 1e-9):.1f} env steps/s "
              f"({global_step - steps_at_start} env steps, {rollout_time:.1f}s rollout, {update_time:.1f}s update; busy CPUs slow both)")
    except Interrupted:
        envs.close()
        eval_envs.close()
        writer.close()
        if args.save_model:
            save_atomic(snapshot, state_path)
            print(f"interrupted in iteration {iteration}: saved {state_path} ({snapshot['iteration']} iterations done); "
                  f"continue with:\n  {resume_command(state_path)}", flush=True)
        else:
            print(f"interrupted in iteration {iteration}: nothing saved (--no-save-model)", flush=True)
        sys.stderr.flush()
        os._exit(128 + stop.signum)  # everything is saved and closed; skip the interpreter's slow final garbage collection
    except NonFinite as e:
        print(f"error: non-finite {e} in iteration {iteration}; stopped without saving"
              + (f" (the last good state is {state_path})" if os.path.exists(state_path) else ""), file=sys.stderr)
        sys.exit(1)

    if args.save_model:
        save_atomic(training_state(args.num_iterations, finished=True), state_path)
        # a dbp_bc.py-format checkpoint with the fine-tuned generator: dbp_bc.py and dbpo_ppo.py --eval-only load it
        model = {k: v for k, v in ckpt.items() if k not in ("train_model", "optimizer", "ema_decay_step", "rng", "global_time", "dbpo")}
        model["model"] = {k: v.cpu() for k, v in agent.generator.state_dict().items()}
        model["anchor_model"] = {k: v.cpu() for k, v in agent.anchor.state_dict().items()}
        model["dbpo"] = {"log_std_head": agent.log_std_head.state_dict(), "critic": agent.critic.state_dict(),
                         "args": vars(args), "global_step": global_step}
        save_atomic(model, os.path.join(run_dir, "dbpo_ppo.pt"))
    envs.close()
    eval_envs.close()
    writer.close()
    print(f"final: {args.num_iterations} iterations | {global_step} env steps | eval {format_eval(result, args.num_eval_episodes)}"
          + (f" | model {os.path.join(run_dir, 'dbpo_ppo.pt')}" if args.save_model else ""))
