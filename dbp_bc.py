"""DBP: Drift-Based Policy, one-step imitation of action chunks (arXiv 2604.03540; docs/algorithms.md §4).

    python dbp_bc.py --env cube-single-play --task 1 --dataset-path ~/.ogbench/data/cube-single-expert-task1-v0.npz

A generator mu = f(o_{t-To+1..t}, z), z ~ N(0, I), maps an observation history to a chunk of Tp actions in ONE pass.
Training drifts G hypotheses x_g = f(o, z_g) per observation toward the expert chunk y+ (they repel each other):
L = E || x - sg(x + V(x)) ||^2 (drift_field.drift_loss). Deployment: one z, one pass, execute the Ta actions from index
To-1 ("now"), replan. Defaults: the authors' recipe (docs/dbp.md). Benchmarks and evaluation: envs.py; plumbing: runs.py.
"""

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering (before mujoco is imported)

import functools
import json
import math
import re
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Literal

import numpy as np
import torch
import torch.nn as nn

import drift_field
import envs
import runs


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (training, the 2% hold-out, and the evaluation episodes and latents)"""
    run_name: str | None = None
    """the run folder's name under --runs-dir (default: <env_id>__<exp_name>__<seed>__<unix time>)"""
    runs_dir: str = "runs"
    """where run folders (tensorboard, checkpoints, videos) go"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda will be enabled when available"""
    num_threads: int = 0
    """torch CPU threads (0: torch's default)"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "drift-policies"
    """the wandb's project name"""
    wandb_entity: str | None = None
    """the entity (team) of wandb's project"""
    save_interval: int = 10_000
    """gradient steps between checkpoints (0: only at the end and on a signal)"""
    save_model: bool = True
    """write <run dir>/dbp_bc.pt (atomically) every --save-interval steps, at the end and on SIGINT/SIGTERM"""
    keep_checkpoints: int = 10
    """also keep the policies of the last N saves as dbp_bc_<step>.pt (the paper averages the last 10; 0: none)"""
    capture_video: bool = False
    """record the first episode of the final evaluation to <run dir>/videos/"""
    env: str = "cube-single-play"
    """OGBench dataset/env (cube-single-play, ..., or a full singletask id), Robomimic {lift,can,square}-{mh,ph}, or a gymnasium id (Hopper-v5) with a D4RL-layout --dataset-path"""
    task: int | None = None
    """OGBench singletask task 1..5 (default: the id's task, else 2)"""
    dataset_path: str | None = None
    """dataset: an OGBench-format .npz (e.g. cube-single-expert-task1-v0.npz, needs its -val twin), a D4RL-layout .npz for gymnasium envs, or a Robomimic low_dim_v15.hdf5"""
    val_ratio: float | None = None
    """fraction of episodes held out for losses/val_loss (>= 1 if > 0); default: locomotion 0 (authors' D4RL configs), else 2%"""
    eval_interval: int = 10_000
    """evaluate the EMA policy every this many gradient steps (0: only at the end)"""
    eval_episodes: int = 10
    """episodes per evaluation (episode i: env seed seed + 10000 + i and its own latent stream)"""
    eval_envs: int | None = None
    """envs stepped together in evaluation, in worker processes when > 1 (default: min(CPU cores, --eval-episodes))"""
    log_interval: int = 500
    """gradient steps between progress lines / tensorboard scalars (and the validation loss)"""
    resume: str | None = None
    """continue a run exactly from its checkpoint (runs/<run>/dbp_bc.pt); architecture and data flags must match"""
    eval_only: bool = False
    """only evaluate --checkpoint(s) and exit"""
    checkpoint: tuple[str, ...] = ()
    """checkpoint(s) for --eval-only; several (e.g. the last 10 of 3 seeds): each one's result, then mean +- std and stderr"""

    # Algorithm specific arguments
    loss: Literal["drift", "mse"] = "drift"
    """drift: the DBP drift loss over G hypotheses; mse: deterministic regression with the same network (z = 0)"""
    backbone: Literal["unet", "mlp"] = "unet"
    """generator: the paper's 1-D conditional U-Net with FiLM, or an MLP on concat(obs history, z) (CPU-sized runs)"""
    hidden_dim: int = 512
    """MLP width"""
    depth: int = 3
    """MLP hidden layers"""
    unet_dims: tuple[int, ...] = (512, 1024, 2048)
    """U-Net channel widths per level (authors' code); Tp must be divisible by 2^(levels-1)"""
    unet_kernel_size: int = 5
    """U-Net convolution kernel size (odd)"""
    unet_groups: int = 8
    """U-Net GroupNorm groups (must divide every width)"""
    obs_horizon: int | None = None
    """To: observations in the history (default by env family: OGBench 2, Robomimic and locomotion 1)"""
    pred_horizon: int | None = None
    """Tp: actions per predicted chunk (default: OGBench 16, Robomimic and locomotion 4)"""
    action_horizon: int | None = None
    """Ta: actions executed per chunk from index To-1 (default: OGBench 8, Robomimic and locomotion 4)"""
    max_episode_steps: int | None = None
    """time limit of the evaluation episodes (default: Robomimic 400 as the authors' task configs, else the env's)"""
    normalization: Literal["authors", "minmax"] = "authors"
    """authors: Robomimic obs / one global max|obs|, actions unscaled, else per-dim min-max; minmax: min-max everywhere"""
    num_hypotheses: int = 4
    """G: hypotheses generated per observation in training (the paper's default 4; G=1 is much worse)"""
    drift_mode: Literal["chunk", "step"] = "chunk"
    """chunk: drift on the flattened Tp*da chunk (default, better); step: drift per time step, averaged"""
    drift_field: Literal["official", "gaussian"] = "official"
    """official: the normalized multi-temperature loss of the published code (docs/algorithms.md §2); gaussian: the mean-shift field (§1)"""
    temperatures: tuple[float, ...] = (0.02, 0.05, 0.2)
    """temperatures R of the official loss (code default; the paper's tuned value is 0.2 alone)"""
    bandwidth: float = 1.0
    """Gaussian kernel bandwidth h (normalized action units) for --drift-field gaussian"""
    num_epochs: int = 500
    """training budget in epochs over the training samples (an epoch = floor(samples / batch size) gradient steps)"""
    total_steps: int | None = None
    """training budget in gradient steps; overrides --num-epochs (the lr schedule then ends at the last epoch begun)"""
    batch_size: int = 64
    """observations per batch (each gets G hypotheses)"""
    lr: float = 1e-4
    """peak AdamW learning rate, reached after --warmup-epochs"""
    min_lr: float = 1e-5
    """learning rate at the first epoch and at the end of the cosine decay"""
    warmup_epochs: int = 100
    """epochs of linear warmup from --min-lr to --lr (the lr changes once per epoch, as the authors')"""
    adam_betas: tuple[float, float] = (0.9, 0.999)
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


# ---- the networks (imported by dbpo_ppo.py): mu = gen(obs_hist [B, To, obs_dim], z [B, Tp, act_dim]) -> [B, Tp, act_dim],
# all normalized (Policy); one forward pass = one chunk (1 NFE), no time input anywhere.
class MLPGenerator(nn.Module):
    """mu = MLP(concat(flatten(obs_hist), flatten(z))): the default backbone for low-dimensional states."""

    def __init__(
        self, obs_dim: int, action_dim: int, obs_horizon: int, pred_horizon: int, hidden_dim: int = 512, depth: int = 3
    ):
        super().__init__()
        self.obs_dim, self.action_dim, self.obs_horizon, self.pred_horizon = (
            obs_dim,
            action_dim,
            obs_horizon,
            pred_horizon,
        )
        self.cond_dim = (
            obs_horizon * obs_dim
        )  # the condition flatten(obs_hist) [B, To*obs_dim], as DBPO's log-std head's
        dims = [self.cond_dim + pred_horizon * action_dim] + [hidden_dim] * depth
        self.net = nn.Sequential(
            *[m for d_in, d_out in zip(dims[:-1], dims[1:]) for m in (nn.Linear(d_in, d_out), nn.Mish())],
            nn.Linear(dims[-1], pred_horizon * action_dim),
        )

    def forward(self, obs_hist: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        x = torch.cat([obs_hist.flatten(1), z.flatten(1)], dim=-1)  # [B, To*obs_dim + Tp*act_dim]
        return self.net(x).view(-1, self.pred_horizon, self.action_dim)  # [B, Tp, act_dim]


def Conv1dBlock(c_in: int, c_out: int, kernel_size: int, n_groups: int) -> nn.Sequential:  # noqa: N802 (the authors' name)
    """Conv1d -> GroupNorm -> Mish, length preserving; inside `block`, as theirs: the same state-dict names."""
    return nn.Sequential(
        OrderedDict(
            block=nn.Sequential(
                nn.Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2), nn.GroupNorm(n_groups, c_out), nn.Mish()
            )
        )
    )


class FiLMResBlock1d(nn.Module):
    """Two conv blocks; between them FiLM from the condition: h <- scale(c) * h + bias(c); plus a residual."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int, kernel_size: int, n_groups: int):
        super().__init__()
        self.conv1 = Conv1dBlock(c_in, c_out, kernel_size, n_groups)
        self.conv2 = Conv1dBlock(c_out, c_out, kernel_size, n_groups)
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * c_out))
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, bias = self.film(cond).unsqueeze(-1).chunk(2, dim=1)  # [B, c_out, 1] each
        return self.conv2(scale * self.conv1(x) + bias) + self.skip(x)  # conv1(x): [B, c_out, T]


class UNetGenerator(nn.Module):
    """mu = UNet1d(z; FiLM(flatten(obs_hist))): the paper's conditional 1-D U-Net over the chunk's time axis (no time input)."""

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        obs_horizon: int,
        pred_horizon: int,
        down_dims=(64, 128, 256),
        kernel_size: int = 5,
        n_groups: int = 8,
    ):
        super().__init__()
        down_dims = [int(d) for d in down_dims]
        if pred_horizon % (2 ** (len(down_dims) - 1)) != 0:
            raise ValueError(
                f"pred_horizon {pred_horizon} must be divisible by 2^(len(down_dims)-1) = {2 ** (len(down_dims) - 1)}"
            )
        self.obs_dim, self.action_dim, self.obs_horizon, self.pred_horizon = (
            obs_dim,
            action_dim,
            obs_horizon,
            pred_horizon,
        )
        self.cond_dim = obs_horizon * obs_dim
        res = lambda c_in, c_out: FiLMResBlock1d(c_in, c_out, self.cond_dim, kernel_size, n_groups)  # noqa: E731
        dims = [action_dim] + down_dims
        self.down = nn.ModuleList(
            nn.ModuleList(
                [
                    res(c_in, c_out),
                    res(c_out, c_out),
                    nn.Identity() if i == len(down_dims) - 1 else nn.Conv1d(c_out, c_out, 3, stride=2, padding=1),
                ]
            )  # T -> T/2
            for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:]))
        )
        self.mid = nn.ModuleList([res(dims[-1], dims[-1]) for _ in range(2)])
        self.up = nn.ModuleList(
            nn.ModuleList(
                [
                    res(2 * c_out, c_skip),
                    res(c_skip, c_skip),  # skip widths, deepest first
                    nn.ConvTranspose1d(c_skip, c_skip, 4, stride=2, padding=1),
                ]
            )  # T/2 -> T
            for c_skip, c_out in reversed(list(zip(down_dims[:-1], down_dims[1:])))
        )
        self.final = nn.Sequential(
            Conv1dBlock(dims[1], dims[1], kernel_size, 8), nn.Conv1d(dims[1], action_dim, 1)
        )  # 8: theirs

    def forward(self, obs_hist: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        cond, x, skips = (
            obs_hist.flatten(1),
            z.transpose(1, 2),
            [],
        )  # [B, To*obs_dim]; x [B, act_dim, Tp]: channels = dims
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


# ---- the deployed policy
STATS = ("obs_offset", "obs_scale", "action_offset", "action_scale")  # the normalization a Policy and a checkpoint hold
ROBOMIMIC_OBS_KEYS = (
    "object",
    "robot0_eef_pos",
    "robot0_eef_quat",
    "robot0_gripper_qpos",
)  # the authors' task configs' order


class Policy(nn.Module):
    """Generator + normalization: raw obs history -> raw action chunk, clipped to the env's bounds (1 NFE)."""

    def __init__(self, gen: nn.Module, stats: dict, action_low, action_high):
        super().__init__()
        self.gen = gen
        for k, v in {**stats, "action_low": action_low, "action_high": action_high}.items():
            self.register_buffer(k, torch.as_tensor(v, dtype=torch.float32).clone())

    @torch.no_grad()
    def forward(self, obs_hist: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        chunk_n = self.gen(
            (obs_hist - self.obs_offset) / self.obs_scale, z
        )  # obs_n = (obs - offset) / scale; [B, Tp, da]
        chunk = chunk_n * self.action_scale + self.action_offset  # a = a_n * scale + offset
        return torch.maximum(torch.minimum(chunk, self.action_high), self.action_low)

    def stats(self) -> dict:
        return {k: getattr(self, k).detach().cpu().clone() for k in STATS}


def load_policy(ckpt: dict) -> Policy:
    """Rebuild the EMA policy stored in a checkpoint dict (format dbp-v1, docs/dbp.md)."""
    gen = make_generator(ckpt["backbone"], **ckpt["generator_kwargs"])
    gen.load_state_dict(ckpt["model"])
    return Policy(gen, {k: ckpt[k] for k in STATS}, ckpt["action_low"], ckpt["action_high"]).eval()


# ---- data: scaling, episodes, the 2% hold-out, the samples and their padded chunks
def compute_normalization(
    observations: np.ndarray, actions: np.ndarray, robomimic: bool = False, range_eps=1e-4
) -> dict:
    """x_n = (x - offset) / scale: per-dim min-max to [-1, 1] (the authors' "limits": offset (max + min) / 2, scale (max -
    min) / 2; range < range_eps: 1, min); robomimic (their loader): obs / ONE global max|obs|, actions as they are."""
    stats = {}
    for name, x in (("obs", observations), ("action", actions)):
        lo, hi = x.min(0).astype(np.float64), x.max(0).astype(np.float64)
        const = hi - lo < range_eps
        offset, scale = np.where(const, lo, (hi + lo) / 2), np.where(const, 1.0, (hi - lo) / 2)
        if robomimic:  # obs: x_n = x / max|obs| (one number for every dimension); actions: x_n = x
            offset, scale = np.zeros_like(lo), np.full_like(lo, (np.abs(x).max() or 1.0) if name == "obs" else 1.0)
        stats[f"{name}_offset"], stats[f"{name}_scale"] = (
            torch.as_tensor(v, dtype=torch.float32) for v in (offset, scale)
        )
    return stats


def episode_bounds(episode_ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every step i: the first and last index of its episode. episode_ends[i] = True at an episode's last step."""
    last = np.flatnonzero(
        np.append(episode_ends[:-1].astype(bool), True)
    )  # a trailing unfinished episode ends with the data
    first = np.concatenate([[0], last[:-1] + 1])
    return np.repeat(first, last - first + 1), np.repeat(last, last - first + 1)


def holdout_episodes(num_episodes: int, val_ratio: float, seed: int) -> np.ndarray:
    """Validation mask over episodes (the authors' split): round(ratio * n), within 1..n-1 (none for ratio 0), seeded."""
    val = np.zeros(num_episodes, dtype=bool)
    if val_ratio > 0 and num_episodes > 1:
        k = min(max(1, round(num_episodes * val_ratio)), num_episodes - 1)
        val[np.random.default_rng(seed).choice(num_episodes, size=k, replace=False)] = True
    return val


def sample_steps(
    episode_ends: np.ndarray, obs_horizon: int, pred_horizon: int, action_horizon: int, pad=True
) -> np.ndarray:
    """The "now" steps t whose chunk a_{t-To+1..t-To+Tp} ends at most Ta-1 steps past its episode, or with pad=False inside it."""
    t, (_, last) = np.arange(len(episode_ends)), episode_bounds(episode_ends)
    return t[t - obs_horizon + pred_horizon - last <= (action_horizon - 1 if pad else 0)]


def chunk_indices(t: torch.Tensor, ep_first: torch.Tensor, ep_last: torch.Tensor, obs_horizon: int, pred_horizon: int):
    """Data indices of the sample at step t (Diffusion Policy's alignment): the history o_{t-To+1..t} and the chunk
    a_{t-To+1..t-To+Tp}, whose index To-1 is the action at t; clamped to t's episode, so the history repeats its first
    obs, the chunk its first action before the start and its LAST action after the end (padding)."""
    t, lo, hi = t[:, None], ep_first[:, None], ep_last[:, None]  # [B, 1]
    obs_idx = torch.clamp(t - (obs_horizon - 1) + torch.arange(obs_horizon, device=t.device), lo, hi)  # [B, To]
    act_idx = torch.clamp(t - (obs_horizon - 1) + torch.arange(pred_horizon, device=t.device), lo, hi)  # [B, Tp]
    return obs_idx, act_idx


# ---- the loss, the update, and the authors' per-epoch schedule and EMA
def compute_loss(
    gen: nn.Module,
    obs_hist: torch.Tensor,
    chunk: torch.Tensor,
    loss: str = "drift",
    num_hypotheses: int = 4,
    drift_mode: str = "chunk",
    field: str = "official",
    temperatures=(0.02, 0.05, 0.2),
    bandwidth: float = 1.0,
    noise: torch.Tensor | None = None,
):
    """(loss, info of detached tensors) on normalized obs histories [B, To, obs_dim], expert chunks [B, Tp, da]; noise: z."""
    B, Tp, da = chunk.shape
    if loss == "mse":  # deterministic regression: one output per observation, z fixed to 0
        mse = (gen(obs_hist, torch.zeros_like(chunk)) - chunk).pow(2).mean()  # pred [B, Tp, da]
        return mse, {"chunk_mse": mse.detach()}
    G = num_hypotheses
    z = torch.randn(B * G, Tp, da, device=chunk.device) if noise is None else noise  # z ~ N(0, I), one per hypothesis
    x = gen(obs_hist.repeat_interleave(G, dim=0), z).view(B, G, Tp, da)  # G hypotheses per observation
    info = {"chunk_mse": (x[:, 0] - chunk).pow(2).mean().detach(), "hypothesis_std": x.std(dim=1).mean().detach()}
    # chunk mode: one drift on the flattened chunk (S = Tp * da); step mode: the same on each step (S = da), averaged
    gens, poss = (
        ([x.reshape(B, G, Tp * da)], [chunk.reshape(B, 1, Tp * da)])
        if drift_mode == "chunk"
        else ([x[:, :, t] for t in range(Tp)], [chunk[:, None, t] for t in range(Tp)])
    )
    if field == "gaussian":
        # V = V_p+ - V_q-, Gaussian kernel h, negatives = the hypotheses (docs/algorithms.md §1); no global scale: one call
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


def update(
    gen: nn.Module,
    optimizer,
    obs_hist: torch.Tensor,
    chunk: torch.Tensor,
    lr: float,
    loss_flags: tuple,
    max_grad_norm: float,
):
    """One AdamW step at learning rate lr: (loss, gradient norm before clipping, info), left on the device (no sync)."""
    optimizer.param_groups[0]["lr"] = lr  # one group
    loss, info = compute_loss(gen, obs_hist, chunk, *loss_flags)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(gen.parameters(), max_grad_norm)
    optimizer.step()
    return loss.detach(), grad_norm, info


def lr_at(epoch: int, lr: float, min_lr: float, warmup_epochs: int, num_epochs: int) -> float:
    """The authors' per-epoch schedule: linear min_lr -> lr over warmup_epochs, then cosine back to min_lr at num_epochs."""
    if epoch < warmup_epochs:
        return min_lr + (lr - min_lr) * epoch / warmup_epochs
    progress = min(1.0, (epoch - warmup_epochs) / max(1, num_epochs - warmup_epochs))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def ema_decay(k: int, power: float, max_decay: float) -> float:
    """Decay of the k-th EMA update (k = 0, 1, ...), as Diffusion Policy's EMAModel: 0, 0, then 1 - k^-power, capped."""
    return 0.0 if k <= 1 else min(max_decay, 1.0 - k**-power)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for pe, p in zip(ema.parameters(), model.parameters()):  # (the generators hold no buffers)
        pe.mul_(decay).add_(p.detach(), alpha=1.0 - decay)  # theta_ema <- d theta_ema + (1 - d) theta


def ema_schedule(step: int, steps_per_epoch: int, every: int, start_epoch: int) -> int | None:
    """After gradient step `step`: None (no EMA update), -1 (a plain copy, before start_epoch) or k (for ema_decay)."""
    if step % every:
        return None
    start = start_epoch * steps_per_epoch
    return -1 if step < start else step // every - (start + every - 1) // every


# ---- acting and evaluation: receding-horizon control, one network pass per chunk
@torch.no_grad()
def act(policy: Policy, action_horizon: int, obs: np.ndarray, gens) -> np.ndarray:
    """The executed slice chunk[To-1 : To-1+Ta] [B, Ta, A] for histories obs [B, To, O], z of episode b from gens[b]. One
    pass per row: a row's actions do not depend on the rest of the batch (bit for bit), nor evaluations on --eval-envs."""
    gen, device = policy.gen, policy.obs_offset.device
    z = torch.stack([torch.randn(gen.pred_horizon, gen.action_dim, generator=g) for g in gens]).to(device)  # [B, Tp, A]
    chunk = torch.cat(
        [policy(o[None], zb[None]) for o, zb in zip(torch.as_tensor(obs, device=device), z)]
    )  # [B, Tp, A]
    return chunk[:, gen.obs_horizon - 1 : gen.obs_horizon - 1 + action_horizon].cpu().numpy()  # [B, Ta, A]


EVAL_TAGS = (("success", "eval/success"), ("return", "eval/episodic_return"), ("length", "eval/episode_length"))


def evaluate(policy: Policy, eval_envs, args, stop: runs.Stop, label: str, video=None) -> dict | None:
    """envs.evaluate (episode i: env seed seed + 10000 + i) printed as `label: tag=mean ...` (res["line"]); None: stopped."""
    t0, Ta = time.time(), eval_envs.single_action_space.shape[0]
    res = envs.evaluate(
        eval_envs, functools.partial(act, policy, Ta), args.eval_episodes, args.seed + 10_000, stop.requested, video
    )
    if res is not None:
        res["line"] = " ".join(f"{tag}={res[k]:.4f}" for k, tag in EVAL_TAGS if not math.isnan(res[k]))
    print(
        f"{label}: "
        + (f"{res['line']} ({args.eval_episodes} episodes, {time.time() - t0:.1f}s)" if res else "interrupted"),
        flush=True,
    )
    return res


# ---- every check before any work (runs.parse: one `error:` line, exit 2): a table of ranges, then the rules
RANGES = {  # requirement: (test, flags)
    "at least 1": (
        lambda v: v is None or v >= 1,
        (
            "num_epochs",
            "total_steps",
            "batch_size",
            "eval_episodes",
            "eval_envs",
            "log_interval",
            "num_hypotheses",
            "hidden_dim",
            "depth",
            "ema_every",
            "unet_groups",
            "max_episode_steps",
        ),
    ),
    "at least 0": (
        lambda v: v >= 0,
        ("eval_interval", "save_interval", "keep_checkpoints", "num_threads", "warmup_epochs", "ema_start_epoch"),
    ),
    "a positive finite number": (
        lambda v: 0 < v < math.inf,
        ("lr", "min_lr", "max_grad_norm", "ema_power", "bandwidth"),
    ),
    "a finite number >= 0": (lambda v: 0 <= v < math.inf, ("weight_decay",)),
    "in [0, 1]": (lambda v: 0 <= v <= 1, ("ema_max_decay",)),
    "in [0, 0.5)": (lambda v: v is None or 0 <= v < 0.5, ("val_ratio",)),
    "two numbers in [0, 1)": (lambda v: all(0 <= b < 1 for b in v), ("adam_betas",)),
    "positive finite numbers": (lambda v: len(v) > 0 and all(0 < r < math.inf for r in v), ("temperatures",)),
    "odd": (lambda v: v >= 1 and v % 2 == 1, ("unet_kernel_size",)),
}


def rules(args: Args):
    """The (ok, message) rules runs.parse checks in order; fills in the horizons not given by env family."""
    yield from runs.ranges(args, RANGES)
    yield (
        not args.eval_only or args.checkpoint,
        "--eval-only needs --checkpoint PATH [PATH ...] (dbp_bc.pt or dbp_bc_<step>.pt)",
    )
    yield args.min_lr <= args.lr, f"--min-lr {args.min_lr} must not exceed --lr {args.lr}"
    yield (
        args.run_name not in ("", ".", "..") and "/" not in (args.run_name or ""),
        f"--run-name must be a plain folder name, got {args.run_name!r}",
    )
    # (To, Tp, Ta) of the authors' D4RL and Robomimic low-dim configs 1/4/4, OGBench their PushT-style 2/16/8; max_steps 400
    fam = envs.family(envs.resolve_env_id(args.env, args.task, gym_ids=None))  # an unknown env is refused here
    args.max_episode_steps = args.max_episode_steps or (400 if fam == "robomimic" else None)
    args.val_ratio = (0.0 if fam == "gym" else 0.02) if args.val_ratio is None else args.val_ratio
    To, Tp, Ta = (
        d if v is None else v
        for v, d in zip(
            (args.obs_horizon, args.pred_horizon, args.action_horizon), (2, 16, 8) if fam == "ogbench" else (1, 4, 4)
        )
    )
    args.obs_horizon, args.pred_horizon, args.action_horizon = To, Tp, Ta
    yield (
        min(To, Tp, Ta) >= 1 and To - 1 + Ta <= Tp,
        (
            "need 1 <= --obs-horizon, --action-horizon and obs_horizon - 1 + "
            "action_horizon <= pred_horizon (the paper's rule: the executed "
            f"slice must lie in the chunk); got To={To}, Tp={Tp}, Ta={Ta}"
        ),
    )
    n, dims, unet = (
        len(args.unet_dims) - 1,
        args.unet_dims,
        args.backbone == "unet",
    )  # the U-Net halves the chunk n times
    yield (
        not unet or (n >= 0 and min(dims) >= 1 and Tp % 2**n == 0),
        f"--backbone unet halves the chunk {n} times: it needs "
        f"positive --unet-dims and --pred-horizon {Tp} divisible by 2^{n} (or fewer --unet-dims); got {dims}",
    )
    yield (
        not unet or (all(d % args.unet_groups == 0 for d in dims) and dims[0] % 8 == 0),
        f"--unet-groups {args.unet_groups} "
        f"must divide every --unet-dims width {dims}, and 8 (the final block's groups, as the authors') the first",
    )


# ---- checkpoints (format dbp-v1, read by dbpo_ppo.py; docs/dbp.md)
CKPT_KEYS = (
    "env_id",
    "backbone",
    "generator_kwargs",
    "model",
    "obs_dim",
    "action_dim",
    "obs_horizon",
    "pred_horizon",
    "action_horizon",
    "obs_offset",
    "obs_scale",
    "action_offset",
    "action_scale",
    "action_low",
    "action_high",
)
TRAIN_STATE = ("train_model", "optimizer", "rng", "wall_time")  # what dbp_bc.pt has beyond the policy snapshots
RESUME_KEYS = (
    "backbone",
    "hidden_dim",
    "depth",
    "unet_dims",
    "unet_kernel_size",
    "unet_groups",
    "obs_horizon",
    "pred_horizon",
    "action_horizon",
    "loss",
    "num_hypotheses",
    "drift_mode",
    "drift_field",
    "env",
    "task",
    "dataset_path",
    "seed",
    "val_ratio",
    "batch_size",
    "normalization",
)  # flags a --resume must share (--total-steps, intervals may change)
HINT = "pass a run's dbp_bc.pt (a dbp_bc_<step>.pt snapshot holds only a policy: it can be evaluated, not resumed)"


def eval_only(args: Args, device: torch.device, stop: runs.Stop) -> None:
    """--eval-only: evaluate each --checkpoint (everything needed is in it), then mean +- std and stderr over them."""
    ckpts = [runs.load_checkpoint(p, "--checkpoint", "dbp-v1", CKPT_KEYS, HINT) for p in args.checkpoint]
    num_envs, pool, results = min(args.eval_envs or os.cpu_count() or 1, args.eval_episodes), {}, []
    print(f"start: eval-only of {len(ckpts)} checkpoint(s) | device {device} | eval envs {num_envs}", flush=True)
    stop.armed = True  # a signal abandons the evaluation: no result
    for path, c in zip(args.checkpoint, ckpts):
        key = (c["env_id"], c["obs_horizon"], c["action_horizon"], c.get("env_args"), c.get("max_episode_steps"))
        pool[key] = pool.get(key) or envs.make_eval_envs(
            key[0], num_envs, horizon=key[2], obs_horizon=key[1], env_args=key[3], max_episode_steps=key[4]
        )
        results.append(
            evaluate(
                load_policy(c).to(device), pool[key], args, stop, f"eval-only {path} ({key[0]} step {c.get('step')})"
            )
        )
        if results[-1] is None:
            runs.leave(stop.exit_code, *pool.values())
    key = "success" if all(envs.family(c["env_id"]) != "gym" for c in ckpts) else "return"
    v = np.array([r[key] for r in results])
    std = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    print(
        f"final eval-only over {len(v)} checkpoint(s): eval/{key} mean {v.mean():.4f} +- std {std:.4f} "
        f"(stderr {std / math.sqrt(len(v)):.4f}, {args.eval_episodes} episodes each)"
    )
    runs.leave(0, *pool.values())


# ---- the training run: main() and its helpers, which share the namespace `run`
def load_data(run) -> None:
    """The demonstrations (envs.load_dataset checks them), normalized, on the device; the samples (chunk_indices)."""
    a, To, Tp, Ta, dev = run.args, run.args.obs_horizon, run.args.pred_horizon, run.args.action_horizon, run.device
    env, data, ends, env_args = envs.load_dataset(run.env_id, a.dataset_path, obs_keys=ROBOMIMIC_OBS_KEYS)
    obs, actions = data["observations"].astype(np.float32), data["actions"].astype(np.float32)  # [N, O], [N, A]
    run.dims, run.low, run.high = (obs.shape[1], actions.shape[1]), env.action_space.low, env.action_space.high
    run.env_args = None if env_args is None else json.dumps(env_args)  # Robomimic: how to rebuild the env
    saved = (run.resume["obs_dim"], run.resume["action_dim"]) if run.resume else run.dims
    runs.check(saved == run.dims, f"--resume: the checkpoint has obs/action dims {saved}, the data {run.dims}")
    ep_first, ep_last = episode_bounds(ends)  # [N] each
    episode_of = np.searchsorted(np.unique(ep_first), ep_first)  # [N] episode index of every step
    val_episode = holdout_episodes(int(episode_of[-1]) + 1, a.val_ratio, a.seed)
    steps = sample_steps(
        ends, To, Tp, Ta, pad=envs.family(run.env_id) != "gym"
    )  # locomotion: no padding (authors' D4RL)
    train_t, val_t = steps[~val_episode[episode_of[steps]]], steps[val_episode[episode_of[steps]]]
    runs.check(
        len(train_t) > 0,
        f"no training samples: every training episode is shorter than Tp - To - Ta + 2 = {Tp - To - Ta + 2}",
    )
    run.steps_per_epoch = max(1, len(train_t) // a.batch_size)  # the authors drop the last partial batch
    run.total_steps = a.total_steps or a.num_epochs * run.steps_per_epoch
    run.num_epochs = math.ceil(run.total_steps / run.steps_per_epoch)  # the lr schedule's length
    run.summary = (
        f"{len(obs)} steps, {len(val_episode)} episodes ({int(val_episode.sum())} held out), {len(train_t)} train / "
        f"{len(val_t)} val samples | {run.total_steps} steps = {run.num_epochs} epochs of {run.steps_per_epoch}"
    )
    run.stats = compute_normalization(
        obs, actions, a.normalization == "authors" and envs.family(run.env_id) == "robomimic"
    )
    run.obs_n = ((torch.as_tensor(obs) - run.stats["obs_offset"]) / run.stats["obs_scale"]).to(dev)  # [N, O]
    run.act_n = ((torch.as_tensor(actions) - run.stats["action_offset"]) / run.stats["action_scale"]).to(dev)  # [N, A]
    run.ep_first, run.ep_last = torch.as_tensor(ep_first, device=dev), torch.as_tensor(ep_last, device=dev)
    run.train_t, run.val_t = (
        torch.as_tensor(train_t, device=dev),
        torch.as_tensor(val_t[:1024], device=dev),
    )  # val: fixed

    def batch(
        t: torch.Tensor,
    ):  # the samples at steps t: histories [B, To, O], chunks [B, Tp, A], padded in their episode
        obs_idx, act_idx = chunk_indices(t, run.ep_first[t], run.ep_last[t], To, Tp)
        return run.obs_n[obs_idx], run.act_n[act_idx]

    run.batch = batch


def build(run, num_envs: int) -> None:
    """The generator, its EMA copy (evaluated, saved), AdamW (resumed with the RNGs), eval envs and tensorboard."""
    a, ckpt = run.args, run.resume
    run.gen_kwargs = dict(
        obs_dim=run.dims[0],
        action_dim=run.dims[1],
        obs_horizon=a.obs_horizon,
        pred_horizon=a.pred_horizon,
        **(
            dict(hidden_dim=a.hidden_dim, depth=a.depth)
            if a.backbone == "mlp"
            else dict(down_dims=list(a.unet_dims), kernel_size=a.unet_kernel_size, n_groups=a.unet_groups)
        ),
    )
    run.gen, run.ema_gen = (
        make_generator(a.backbone, **run.gen_kwargs).to(run.device) for _ in range(2)
    )  # in this order
    run.ema_gen.requires_grad_(False).load_state_dict(run.gen.state_dict())  # the EMA starts as a copy
    run.optimizer = torch.optim.AdamW(
        run.gen.parameters(), lr=a.min_lr, betas=tuple(a.adam_betas), weight_decay=a.weight_decay
    )
    run.policy = Policy(run.ema_gen, run.stats, run.low, run.high).to(run.device).eval()
    run.loss_flags = (a.loss, a.num_hypotheses, a.drift_mode, a.drift_field, a.temperatures, a.bandwidth)
    run.start_step, run.wall_time, run.perm, run.decay = 0, 0.0, None, 0.0
    run.nonfinite = torch.zeros(2, dtype=torch.bool, device=run.device)  # [loss, grad norm] was non-finite at some step
    if ckpt is not None:
        runs.load_states({"train_model": run.gen, "model": run.ema_gen, "optimizer": run.optimizer}, ckpt, HINT)
        run.start_step, run.wall_time = ckpt["step"], ckpt["wall_time"]
        runs.set_rng_state(ckpt["rng"])
    run.eval_envs = envs.make_eval_envs(
        run.env_id,
        num_envs,
        horizon=a.action_horizon,
        obs_horizon=a.obs_horizon,
        render=a.capture_video,
        env_args=run.env_args,
        max_episode_steps=a.max_episode_steps,
    )
    run.writer = runs.tensorboard(
        run.run_dir,
        a,
        os.path.basename(run.run_dir),
        run.start_step + 1,
        a.track and a.wandb_project_name,
        a.wandb_entity,
    )


def train_step(run, step: int):
    """Gradient step `step` (0-based): its batch of the epoch's shuffle, the epoch's lr, update(), then the EMA."""
    a = run.args
    run.epoch, i = divmod(step, run.steps_per_epoch)
    if run.perm is None or i == 0:  # the epoch's shuffle is a function of (seed, epoch): a resume continues it
        order = torch.randperm(
            len(run.train_t), generator=torch.Generator().manual_seed(a.seed * 1_000_003 + run.epoch)
        )
        run.perm = run.train_t[order.to(run.device)]
    run.lr = lr_at(run.epoch, a.lr, a.min_lr, a.warmup_epochs, run.num_epochs)
    obs_hist, chunk = run.batch(run.perm[i * a.batch_size : (i + 1) * a.batch_size])  # [B, To, O], [B, Tp, A]
    loss, grad_norm, info = update(run.gen, run.optimizer, obs_hist, chunk, run.lr, run.loss_flags, a.max_grad_norm)
    run.nonfinite |= torch.stack([~torch.isfinite(loss), ~torch.isfinite(grad_norm)])  # no sync here
    k = ema_schedule(step, run.steps_per_epoch, a.ema_every, a.ema_start_epoch)
    if k is not None:  # k = -1 before --ema-start-epoch: decay 0, a plain copy
        run.decay = 0.0 if k == -1 else ema_decay(k, a.ema_power, a.ema_max_decay)
        ema_update(run.ema_gen, run.gen, run.decay)
    return loss, grad_norm, info


def check_finite(run, step: int) -> None:
    """Exit 1 on a non-finite loss, gradient norm or parameter, before anything is evaluated or saved over a good state."""
    names = [n for n, bad in zip(("the loss", "the gradient norm"), run.nonfinite.tolist()) if bad]
    runs.stop_nonfinite(
        names[0] if names else runs.nonfinite({"gen": run.gen.state_dict(), "ema": run.ema_gen.state_dict()}),
        step,
        run.ckpt_path,
    )


@torch.no_grad()
def log(run, step: int, loss, grad_norm, info: dict) -> None:
    """Tensorboard scalars (losses, the held-out loss, schedule, SPS) and one progress line; .item() syncs, only here."""
    check_finite(run, step)
    B, sps = run.args.batch_size, (step - run.start_step) / max(time.time() - run.t_start, 1e-9)
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if run.device.type == "cuda" else []):
        torch.manual_seed(
            run.args.seed
        )  # the held-out loss has its own latents; fork_rng: the training stream is untouched
        out = [
            compute_loss(run.gen, *run.batch(run.val_t[i : i + B]), *run.loss_flags)
            for i in range(0, len(run.val_t), B)
        ]
    val = (
        [float(np.mean([o[0].item() for o in out])), float(np.mean([o[1]["chunk_mse"].item() for o in out]))]
        if out
        else []
    )
    for name, value in [
        ("losses/loss", loss.item()),
        ("losses/grad_norm", grad_norm.item()),
        ("charts/learning_rate", run.lr),
        ("charts/ema_decay", run.decay),
        ("charts/epoch", run.epoch),
        ("charts/SPS", sps),
        *zip(("losses/val_loss", "losses/val_chunk_mse"), val),
        *((f"losses/{k}", float(v)) for k, v in info.items()),
    ]:
        run.writer.add_scalar(name, value, step)
    eta = (run.total_steps - step) / max(sps, 1e-9)
    print(
        f"step {step}/{run.total_steps} | epoch {run.epoch} | loss {loss.item():.4f} | chunk_mse {float(info['chunk_mse']):.4f} "
        + (f"| val_loss {val[0]:.4f} " if val else "")
        + f"| SPS {sps:.0f} | ETA {int(eta // 60)}m{int(eta % 60):02d}s",
        flush=True,
    )


def evaluation(run, step: int, video: bool = False) -> dict:
    """The EMA policy's evaluation at `step`, logged; a signal during it raises runs.Interrupted (nothing logged)."""
    check_finite(run, step)
    print(f"evaluating step {step} ({run.args.eval_episodes} episodes on {run.eval_envs.num_envs} envs)", flush=True)
    res = evaluate(
        run.policy,
        run.eval_envs,
        run.args,
        run.stop,
        f"eval step {step}",
        os.path.join(run.run_dir, "videos", f"eval_{step}.mp4") if video else None,
    )
    run.stop.check()  # None: a signal stopped the evaluation, which raises runs.Interrupted here (nothing is logged)
    for key, tag in EVAL_TAGS:
        if not math.isnan(res[key]):  # success is NaN in gymnasium locomotion, which has no success signal
            run.writer.add_scalar(tag, res[key], step)
    return res


def save(run, step: int) -> None:
    """dbp_bc.pt (for --resume) and the policy snapshot dbp_bc_<step>.pt, keeping the last --keep-checkpoints; atomic."""
    check_finite(run, step)
    a, cpu = run.args, lambda m: {k: v.cpu() for k, v in m.state_dict().items()}  # noqa: E731
    ckpt = {
        "format": "dbp-v1",
        "args": json.loads(json.dumps(asdict(a))),
        "env_id": run.env_id,
        "obs_dim": run.dims[0],
        "action_dim": run.dims[1],
        "generator_kwargs": run.gen_kwargs,
        "env_args": run.env_args,
        "model": cpu(run.ema_gen),
        **{
            k: getattr(a, k)
            for k in ("obs_horizon", "pred_horizon", "action_horizon", "backbone", "loss", "max_episode_steps")
        },
        **run.policy.stats(),
        "action_low": run.policy.action_low.cpu(),
        "action_high": run.policy.action_high.cpu(),
        "step": step,
        "train_model": cpu(run.gen),
        "optimizer": run.optimizer.state_dict(),  # + TRAIN_STATE: for --resume
        "rng": runs.rng_state(),
        "wall_time": run.wall_time + time.time() - run.t_start,
    }
    runs.save(ckpt, run.ckpt_path)
    if a.keep_checkpoints > 0:
        runs.save(
            {k: v for k, v in ckpt.items() if k not in TRAIN_STATE}, os.path.join(run.run_dir, f"dbp_bc_{step}.pt")
        )
        snaps = sorted(
            (int(m.group(1)), f) for f in os.listdir(run.run_dir) if (m := re.fullmatch(r"dbp_bc_(\d+)\.pt", f))
        )
        for _, f in snaps[: -a.keep_checkpoints]:
            os.remove(os.path.join(run.run_dir, f))


def main() -> None:
    args = runs.parse(Args, rules)
    stop = runs.Stop()  # before the banner: until armed, a signal exits at once (nothing to save yet)
    device = runs.seed(args.seed, args.torch_deterministic, args.num_threads, args.cuda)
    if args.eval_only:
        eval_only(args, device, stop)
    # the checks that need no data: the resumed checkpoint (its kind, the flags that must match), the run folder
    env_id = envs.resolve_env_id(args.env, args.task, gym_ids=None)
    ckpt = (
        runs.load_checkpoint(args.resume, "--resume", "dbp-v1", CKPT_KEYS + TRAIN_STATE, HINT) if args.resume else None
    )
    old, now = (ckpt or {}).get("args", {}), json.loads(json.dumps(asdict(args)))  # json: tuples -> lists, as saved
    diff = {k: (old.get(k), now[k]) for k in RESUME_KEYS if ckpt and old.get(k) != now[k]}
    runs.check(not diff, f"--resume: these flags differ from the checkpoint's run (checkpoint, now): {diff}")
    run_dir = runs.plan_run_dir(
        args.runs_dir, args.run_name or runs.run_name(env_id, args.exp_name, args.seed), "dbp_bc.pt", args.resume
    )
    run = SimpleNamespace(
        args=args,
        device=device,
        stop=stop,
        env_id=env_id,
        resume=ckpt,
        run_dir=run_dir,
        ckpt_path=os.path.join(run_dir, "dbp_bc.pt"),
    )
    load_data(run)
    build(run, min(args.eval_envs or os.cpu_count() or 1, args.eval_episodes))
    print(
        f"start: env {env_id} | data {args.dataset_path or 'default'}: {run.summary} | {args.backbone} generator of "
        f"{sum(p.numel() for p in run.gen.parameters())} parameters, To={args.obs_horizon} Tp={args.pred_horizon} Ta="
        f"{args.action_horizon} | device {device} | threads {torch.get_num_threads()} | eval envs {run.eval_envs.num_envs} | "
        f"run dir {run_dir}" + (f" | resuming {os.path.basename(run_dir)} at step {run.start_step}" if ckpt else ""),
        flush=True,
    )
    run.t_start, done = time.time(), run.start_step
    stop.armed = True  # from here a signal is honoured at the next gradient step (or chunk in evaluation), and saved
    try:
        for step in range(run.start_step, run.total_steps):  # per-epoch shuffled batches, drift G hypotheses, EMA
            stop.check()
            loss, grad_norm, info = train_step(run, step)
            done = step + 1
            if done % args.log_interval == 0 or done == run.total_steps:
                log(run, done, loss, grad_norm, info)
            if args.eval_interval > 0 and done % args.eval_interval == 0 and done != run.total_steps:
                evaluation(run, done)
            if (
                args.save_model
                and args.save_interval > 0
                and done % args.save_interval == 0
                and done != run.total_steps
            ):
                save(run, done)
        if args.save_model:
            save(run, done)
        res = evaluation(run, done, video=args.capture_video)
    except runs.Interrupted:  # save, print the command that resumes the run, exit with 128 + signum
        if args.save_model:
            save(run, done)
        runs.interrupted(
            done,
            run.ckpt_path if args.save_model else None,
            stop.exit_code,
            run.eval_envs,
            run.writer,
            track=args.track,
        )
    print(
        f"final: {run.total_steps} steps, wall time {(run.wall_time + time.time() - run.t_start) / 60:.1f} min, {res['line']}"
    )
    runs.leave(0, run.eval_envs, run.writer, track=args.track)


if __name__ == "__main__":
    main()
