"""DBP: Drift-Based Policy, one-step imitation of action chunks (arXiv 2604.03540; docs/algorithms.md §4).

    python dbp_bc.py --env cube-single-play --task 1 --dataset-path ~/.ogbench/data/cube-single-expert-task1-v0.npz

A generator mu = f(o_{t-To+1..t}, z), z ~ N(0, I), maps an observation history to a chunk of Tp actions in ONE pass.
Training drifts G hypotheses x_g = f(o, z_g) per observation toward the expert chunk y+ (they repel each other):
L = E || x - sg(x + V(x)) ||^2 (drift_field.drift_loss); --loss mse regresses the same network instead (z = 0).
The EMA weights are evaluated every --eval-interval steps and saved (resumable with --resume); deployment: one z,
one pass, execute the Ta actions from index To-1 ("now"), replan. --eval-only evaluates saved checkpoints.
Defaults: the authors' recipe by env family (docs/dbp.md). Benchmarks and evaluation: envs.py; plumbing: runs.py.
"""

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering (before mujoco is imported)

import functools
import itertools
import json
import math
import re
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn as nn

import drift_field
import envs
import runs
from robomimic_tasks import ROBOT_KEYS, is_image


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (training, the 2% hold-out, and the evaluation episodes and latents)"""
    run_name: str | None = None
    """the run folder's name under --runs-dir (None: <env_id>__<exp_name>__<seed>__<unix time>)"""
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
    """OGBench cube-single-play, ... (or a singletask id), Robomimic lift-mh, lift-mh-image (pixels) ..., a gym id"""
    task: int | None = None
    """OGBench singletask task 1..5 (None: the id's task, else 2)"""
    dataset_path: str | None = None
    """an OGBench .npz (e.g. cube-single-expert-task1-v0.npz, beside its -val twin), a Robomimic low_dim_v15.hdf5, or
    for a gymnasium id (Hopper-v5) a D4RL-layout .npz"""
    val_ratio: float | None = None
    """fraction of episodes held out for losses/val_loss (>= 1 if > 0); None: 2%, locomotion 0 (as the authors')"""
    eval_interval: int = 10_000
    """evaluate the EMA policy every this many gradient steps (0: only at the end)"""
    eval_episodes: int = 10
    """episodes per evaluation (episode i: env seed seed + 10000 + i and its own latent stream)"""
    eval_envs: int | None = None
    """envs stepped together in evaluation, in worker processes if > 1 (at most --eval-episodes; None: CPU cores)"""
    log_interval: int = 500
    """gradient steps between progress lines / tensorboard scalars (and the validation loss)"""
    resume: str | None = None
    """continue a run exactly from its checkpoint (runs/<run>/dbp_bc.pt); architecture and data flags must match"""
    eval_only: bool = False
    """only evaluate --checkpoint(s) and exit"""
    checkpoint: tuple[str, ...] = ()
    """checkpoint(s) for --eval-only; several (e.g. the last 10 of 3 seeds): each one's result, then mean +- std"""

    # Algorithm specific arguments
    loss: Literal["drift", "mse"] = "drift"
    """drift: the DBP drift loss over G hypotheses; mse: deterministic regression with the same network (z = 0)"""
    backbone: Literal["unet", "mlp"] = "unet"
    """generator: the paper's 1-D conditional U-Net with FiLM, or an MLP on concat(obs history, z) (CPU-sized runs)"""
    hidden_dim: int = 512
    """MLP width"""
    num_layers: int = 3
    """hidden layers of the MLP"""
    unet_dims: tuple[int, ...] = (512, 1024, 2048)
    """U-Net channel widths per level (authors' code); Tp must be divisible by 2^(levels-1)"""
    unet_kernel_size: int = 5
    """U-Net convolution kernel size (odd)"""
    unet_groups: int = 8
    """U-Net GroupNorm groups (must divide every width; the final block keeps the authors' 8)"""
    image_encoder: Literal["resnet18", "spatial-softmax"] = "resnet18"
    """image envs: the authors' ResNet-18 per camera (avgpool), or Diffusion Policy's (spatial softmax, random crops)"""
    obs_horizon: int | None = None
    """To: observations in the history (None: by env family, OGBench 2, Robomimic and locomotion 1)"""
    pred_horizon: int | None = None
    """Tp: actions per predicted chunk (None: OGBench 16, Robomimic and locomotion 4)"""
    action_horizon: int | None = None
    """Ta: actions executed per chunk from index To-1 (None: OGBench 8, Robomimic and locomotion 4)"""
    max_episode_steps: int | None = None
    """time limit of the evaluation episodes (None: Robomimic 400 as the authors' task configs, else the env's)"""
    normalization: Literal["authors", "minmax"] = "authors"
    """authors: Robomimic obs / one global max|obs|, actions unscaled, else per-dim min-max; minmax: min-max for all"""
    num_hypotheses: int = 4
    """G: hypotheses generated per observation in training (the paper uses 4; G=1 is much worse)"""
    drift_mode: Literal["chunk", "step"] = "chunk"
    """chunk: drift on the flattened Tp*da chunk (better); step: drift per time step, averaged"""
    drift_field: Literal["official", "gaussian"] = "official"
    """official: the published code's normalized multi-temperature loss (docs/algorithms.md §2); gaussian: §1"""
    temperatures: tuple[float, ...] = (0.02, 0.05, 0.2)
    """temperatures R of the official loss (the authors' code's; the paper's tuned value is 0.2 alone)"""
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


# ---- the networks (imported by dbpo_ppo.py): mu = gen(obs_hist [B, To, obs_dim], z [B, Tp, act_dim]) [B, Tp, act_dim],
# all normalized (Policy); one forward pass = one chunk (1 NFE), no time input anywhere.
class MLPGenerator(nn.Module):
    """mu = MLP(concat(flatten(obs_hist), flatten(z))): the CPU-sized backbone for low-dimensional states."""

    def __init__(
        self, obs_dim: int, action_dim: int, obs_horizon: int, pred_horizon: int, hidden_dim=512, num_layers=3
    ):
        super().__init__()
        self.action_dim = action_dim
        self.obs_horizon = obs_horizon
        self.pred_horizon = pred_horizon
        self.cond_dim = obs_horizon * obs_dim  # the condition flatten(obs_hist), as DBPO's log-std head's
        dims = [self.cond_dim + pred_horizon * action_dim] + [hidden_dim] * num_layers
        layers = [m for d_in, d_out in itertools.pairwise(dims) for m in (nn.Linear(d_in, d_out), nn.Mish())]
        self.net = nn.Sequential(*layers, nn.Linear(dims[-1], pred_horizon * action_dim))

    def forward(self, obs_hist: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        x = torch.cat([obs_hist.flatten(1), z.flatten(1)], dim=-1)  # [B, To*obs_dim + Tp*act_dim]
        return self.net(x).view(-1, self.pred_horizon, self.action_dim)  # [B, Tp, act_dim]


def Conv1dBlock(c_in: int, c_out: int, kernel_size: int, n_groups: int) -> nn.Sequential:  # (the authors' name)
    """Conv1d -> GroupNorm -> Mish, length preserving; inside `block`, as theirs: the same state-dict names."""
    conv = nn.Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2)
    return nn.Sequential(OrderedDict(block=nn.Sequential(conv, nn.GroupNorm(n_groups, c_out), nn.Mish())))


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
    """mu = UNet1d(z; FiLM(flatten(obs_hist))): the paper's conditional 1-D U-Net over the chunk's time axis."""

    def __init__(
        self, obs_dim: int, action_dim: int, obs_horizon: int, pred_horizon: int, down_dims, kernel_size=5, n_groups=8
    ):
        super().__init__()
        halvings = len(down_dims) - 1  # each level but the last halves the chunk's length
        assert pred_horizon % 2**halvings == 0, f"pred_horizon {pred_horizon} must be divisible by 2^{halvings}"
        self.action_dim = action_dim
        self.obs_horizon = obs_horizon
        self.pred_horizon = pred_horizon
        self.cond_dim = obs_horizon * obs_dim

        def res(c_in: int, c_out: int) -> FiLMResBlock1d:  # a FiLM residual block of this U-Net
            return FiLMResBlock1d(c_in, c_out, self.cond_dim, kernel_size, n_groups)

        dims = [action_dim, *down_dims]
        self.down = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(itertools.pairwise(dims)):
            down = nn.Identity() if i == halvings else nn.Conv1d(c_out, c_out, 3, stride=2, padding=1)  # T -> T/2
            self.down.append(nn.ModuleList([res(c_in, c_out), res(c_out, c_out), down]))
        self.mid = nn.ModuleList([res(dims[-1], dims[-1]) for _ in range(2)])
        self.up = nn.ModuleList()
        for c_skip, c_out in reversed(list(itertools.pairwise(down_dims))):  # skip widths, deepest first
            up = nn.ConvTranspose1d(c_skip, c_skip, 4, stride=2, padding=1)  # T/2 -> T
            self.up.append(nn.ModuleList([res(2 * c_out, c_skip), res(c_skip, c_skip), up]))
        # the final block has 8 groups whatever n_groups, as the authors' final_conv (Conv1dBlock's default)
        self.final = nn.Sequential(Conv1dBlock(dims[1], dims[1], kernel_size, 8), nn.Conv1d(dims[1], action_dim, 1))

    def forward(self, obs_hist: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        cond = obs_hist.flatten(1)  # [B, To*obs_dim]
        x = z.transpose(1, 2)  # [B, act_dim, Tp]: the channels are the action dims
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


class EncodedGenerator(nn.Module):
    """mu = backbone(encoder(obs_hist), z): an image env's observation (low-dim, then pixels, normalized) becomes
    features per step, [B, To, O] -> [B, To, F], which condition the backbone as a low-dim observation would."""

    def __init__(self, encoder: nn.Module, backbone: nn.Module):
        super().__init__()
        self.encoder, self.backbone = encoder, backbone
        self.action_dim, self.pred_horizon = backbone.action_dim, backbone.pred_horizon
        self.obs_horizon, self.cond_dim = backbone.obs_horizon, backbone.cond_dim  # cond_dim = To * F

    def forward(self, obs_hist: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.encoder(obs_hist), z)  # [B, Tp, act_dim]


def parts(gen: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(encoder, backbone) with gen(obs_hist, z) = backbone(encoder(obs_hist), z); a low-dim one's encoder: identity."""
    return (gen.encoder, gen.backbone) if isinstance(gen, EncodedGenerator) else (nn.Identity(), gen)


def make_generator(backbone: str, image_layout: dict | None = None, image_encoder="resnet18", **kwargs) -> nn.Module:
    """Rebuild a generator from a checkpoint: make_generator(ckpt["backbone"], **ckpt["generator_kwargs"]); with an
    image_layout (envs' image ids) the backbone reads the features of an image_encoder.ObsEncoder of that kind."""
    kwargs = {RENAMED.get(k, k): v for k, v in kwargs.items()}  # a checkpoint from before the rename: --depth
    net = {"mlp": MLPGenerator, "unet": UNetGenerator}[backbone]
    if image_layout is None:
        return net(**kwargs)
    from image_encoder import ObsEncoder  # (imported where needed: low-dim runs never load it)

    encoder = ObsEncoder(image_layout, kind=image_encoder)
    return EncodedGenerator(encoder, net(**{**kwargs, "obs_dim": encoder.out_dim}))


# ---- the deployed policy
STATS = ("obs_offset", "obs_scale", "action_offset", "action_scale")  # the normalization a Policy and a checkpoint hold
ROBOMIMIC_OBS_KEYS = ("object", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")  # the authors' order
PIXEL = 127.5  # an image env's pixels 0..255: x_n = (x - PIXEL) / PIXEL in [-1, 1] (obs_offset = obs_scale = PIXEL)


class Policy(nn.Module):
    """Generator + normalization: raw obs history -> raw action chunk, clipped to the env's bounds (1 NFE)."""

    def __init__(self, gen: nn.Module, stats: dict, action_low, action_high):
        super().__init__()
        self.gen = gen
        for k, v in {**stats, "action_low": action_low, "action_high": action_high}.items():
            self.register_buffer(k, torch.as_tensor(v, dtype=torch.float32).clone())

    @torch.no_grad()
    def forward(self, obs_hist: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        chunk_n = self.gen((obs_hist - self.obs_offset) / self.obs_scale, z)  # obs_n = (obs - offset) / scale
        chunk = chunk_n * self.action_scale + self.action_offset  # a = a_n * scale + offset; [B, Tp, da]
        return torch.clamp(chunk, self.action_low, self.action_high)

    def stats(self) -> dict:
        return {k: getattr(self, k).detach().cpu().clone() for k in STATS}


def load_policy(ckpt: dict) -> Policy:
    """Rebuild the EMA policy stored in a checkpoint dict (format dbp-v1, docs/dbp.md)."""
    gen = make_generator(ckpt["backbone"], **ckpt["generator_kwargs"])
    gen.load_state_dict(ckpt["model"])
    return Policy(gen, {k: ckpt[k] for k in STATS}, ckpt["action_low"], ckpt["action_high"]).eval()


# ---- data: scaling, episodes, the 2% hold-out, the samples and their padded chunks
def compute_normalization(
    observations: np.ndarray, actions: np.ndarray, robomimic: bool = False, range_eps=1e-4, image_keys=None
) -> dict:
    """x_n = (x - offset) / scale: per-dim min-max to [-1, 1] (the authors' "limits": offset (max + min) / 2, scale
    (max - min) / 2; range < range_eps: 1, min); robomimic (their loader): obs / ONE global max|obs|, actions as is;
    image_keys (an image env's low-dim keys; their image configs, Diffusion Policy's): quaternions, actions as is."""
    stats = {}
    for name, x in (("obs", observations), ("action", actions)):
        lo, hi = x.min(0).astype(np.float64), x.max(0).astype(np.float64)
        const = hi - lo < range_eps
        offset = np.where(const, lo, (hi + lo) / 2)
        scale = np.where(const, 1.0, (hi - lo) / 2)
        if robomimic:  # obs: x_n = x / max|obs| (one number for every dimension); actions: x_n = x
            offset = np.zeros_like(lo)
            scale = np.full_like(lo, (np.abs(x).max() or 1.0) if name == "obs" else 1.0)
        if image_keys is not None:  # x_n = x on the quaternions' dims (ROBOT_KEYS: each key's size) and the actions'
            quaternions = np.repeat([k.endswith("quat") for k in image_keys], [ROBOT_KEYS[k[7:]] for k in image_keys])
            as_is = quaternions if name == "obs" else np.ones_like(const)
            offset, scale = np.where(as_is, 0.0, offset), np.where(as_is, 1.0, scale)
        stats[f"{name}_offset"] = torch.as_tensor(offset, dtype=torch.float32)
        stats[f"{name}_scale"] = torch.as_tensor(scale, dtype=torch.float32)
    return stats


def episode_bounds(episode_ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first and the last step of each episode, [E] each; episode_ends[i] = True at an episode's last step, and a
    trailing unfinished episode ends with the data."""
    last = np.flatnonzero(np.append(episode_ends[:-1].astype(bool), True))
    first = np.concatenate([[0], last[:-1] + 1])
    return first, last


def holdout_episodes(num_episodes: int, val_ratio: float, seed: int) -> np.ndarray:
    """Validation mask over episodes (the authors' split): round(ratio * n) in 1..n-1 (none for ratio 0), seeded."""
    val = np.zeros(num_episodes, dtype=bool)
    if val_ratio > 0 and num_episodes > 1:
        k = min(max(1, round(num_episodes * val_ratio)), num_episodes - 1)
        val[np.random.default_rng(seed).choice(num_episodes, size=k, replace=False)] = True
    return val


# (pad_before, pad_after) by env family, as the authors' samplers: their low-dim task configs (Robomimic, and PushT,
# whose horizons OGBench uses) pad 1 step before an episode and 7 after; their D4RL loader takes whole chunks only
PADDING = {"ogbench": (1, 7), "robomimic": (1, 7), "gym": (0, 0)}


def sample_chunks(first: np.ndarray, last: np.ndarray, pred_horizon: int, pad_before: int, pad_after: int):
    """The samples, as the authors' create_indices: an episode of length L starts a chunk at each of its relative steps
    -pad_before .. L - Tp + pad_after, each pad clamped to [0, Tp - 1]. Returns the data index of every sample's chunk
    start (before its episode's first step when padded) and the sample's episode, [S] each."""
    pad_before, pad_after = (min(max(pad, 0), pred_horizon - 1) for pad in (pad_before, pad_after))
    counts = np.maximum(last - first + 1 - pred_horizon + pad_before + pad_after + 1, 0)  # samples per episode [E]
    episode = np.repeat(np.arange(len(first)), counts)  # [S]
    rank = np.arange(len(episode)) - np.repeat(np.cumsum(counts) - counts, counts)  # 0, 1, ... within each episode
    return first[episode] - pad_before + rank, episode


def chunk_indices(start: torch.Tensor, first: torch.Tensor, last: torch.Tensor, obs_horizon: int, pred_horizon: int):
    """Data indices of the samples whose chunks start at `start` [B], in episodes first..last [B]: the history
    o_{s..s+To-1} (its last, index To-1, is "now") and the chunk a_{s..s+Tp-1}, whose index To-1 is the action at
    "now"; clamped to the episode, so both repeat its first entry before its start and its LAST after its end."""
    window = start[:, None] + torch.arange(pred_horizon, device=start.device)  # [B, Tp]
    act_idx = torch.clamp(window, first[:, None], last[:, None])  # [B, Tp]
    return act_idx[:, :obs_horizon], act_idx  # [B, To] (To <= Tp), [B, Tp]


# ---- the loss, the update, and the authors' per-epoch schedule and EMA
def compute_loss(
    gen: nn.Module,
    obs_hist: torch.Tensor,
    chunk: torch.Tensor,
    loss: str = "drift",
    num_hypotheses: int = 4,
    drift_mode: str = "chunk",
    field_kind: str = "official",
    temperatures=(0.02, 0.05, 0.2),
    bandwidth: float = 1.0,
    noise: torch.Tensor | None = None,
):
    """(loss, info of detached tensors) on normalized obs histories [B, To, obs_dim] and expert chunks [B, Tp, da];
    noise: the latents z [B*G, Tp, da] (default: drawn here)."""
    B, Tp, da = chunk.shape
    if loss == "mse":  # deterministic regression: one output per observation, z fixed to 0
        mse = (gen(obs_hist, torch.zeros_like(chunk)) - chunk).pow(2).mean()  # pred [B, Tp, da]
        return mse, {"chunk_mse": mse.detach()}
    G = num_hypotheses
    z = torch.randn(B * G, Tp, da, device=chunk.device) if noise is None else noise  # z ~ N(0, I), one per hypothesis
    encoder, backbone = parts(gen)  # an image observation is encoded once for its G hypotheses, as the authors'
    x = backbone(encoder(obs_hist).repeat_interleave(G, dim=0), z).view(B, G, Tp, da)  # G hypotheses per observation
    info = {"chunk_mse": (x[:, 0] - chunk).pow(2).mean().detach(), "hypothesis_std": x.std(dim=1).mean().detach()}
    if drift_mode == "chunk":  # one drift on the flattened chunk (S = Tp * da)
        gens, poss = [x.reshape(B, G, Tp * da)], [chunk.reshape(B, 1, Tp * da)]
    else:  # the same on each step (S = da), averaged
        gens, poss = [x[:, :, t] for t in range(Tp)], [chunk[:, None, t] for t in range(Tp)]
    if field_kind == "gaussian":
        # V = V_p+ - V_q-, Gaussian kernel h, negatives = the hypotheses (docs/algorithms.md §1); no global scale, so
        # one call for all the drifting spaces
        g = torch.cat(gens, dim=0)  # [B or B*Tp, G, S]
        V = drift_field.mean_shift_field(g, torch.cat(poss, dim=0), g.detach(), bandwidth)
        total = (g - (g + V).detach()).pow(2).mean()  # L = || x - sg(x + V(x)) ||^2
        info["drift_sq"] = V.pow(2).mean().detach()
        return total, info
    total = 0.0
    for g, p in zip(gens, poss, strict=True):  # normalized loss (docs/algorithms.md §2): one call per drifting space
        value, terms = drift_field.drift_loss(g, p, temperatures=temperatures)  # [B]; each space has its own scale
        total = total + value.mean() / len(gens)
        for k, v in terms.items():
            info[k] = info.get(k, 0.0) + v.detach() / len(gens)
    return total, info


def loss_flags(args: Args) -> tuple:
    """compute_loss's arguments after the batch, from the flags."""
    return args.loss, args.num_hypotheses, args.drift_mode, args.drift_field, args.temperatures, args.bandwidth


def update(gen: nn.Module, optimizer, obs_hist: torch.Tensor, chunk: torch.Tensor, lr: float, args: Args):
    """One AdamW step at learning rate lr: (loss, gradient norm before clipping, info), left on the device (no sync)."""
    optimizer.param_groups[0]["lr"] = lr  # one group
    loss, info = compute_loss(gen, obs_hist, chunk, *loss_flags(args))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(gen.parameters(), args.max_grad_norm)
    optimizer.step()
    return loss.detach(), grad_norm, info


def lr_at(epoch: int, lr: float, min_lr: float, warmup_epochs: int, num_epochs: int) -> float:
    """The authors' per-epoch schedule: linear min_lr -> lr over warmup_epochs, then cosine to min_lr at num_epochs."""
    if epoch < warmup_epochs:
        return min_lr + (lr - min_lr) * epoch / warmup_epochs
    progress = min(1.0, (epoch - warmup_epochs) / max(1, num_epochs - warmup_epochs))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def ema_decay(k: int, power: float, max_decay: float) -> float:
    """Decay of the k-th EMA update (k = 0, 1, ...), as Diffusion Policy's EMAModel: 0, 0, then 1 - k^-power, capped."""
    return 0.0 if k <= 1 else min(max_decay, 1.0 - k**-power)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for pe, p in zip(ema.parameters(), model.parameters(), strict=True):  # (the generators hold no buffers)
        pe.lerp_(p.detach(), 1.0 - decay)  # theta_ema <- d theta_ema + (1 - d) theta


def ema_schedule(step: int, steps_per_epoch: int, every: int, start_epoch: int) -> int | None:
    """After gradient step `step`: None (no EMA update), -1 (a plain copy, before start_epoch) or k (for ema_decay)."""
    if step % every:
        return None
    start = start_epoch * steps_per_epoch
    return -1 if step < start else step // every - (start + every - 1) // every


# ---- acting and evaluation: receding-horizon control, one network pass per chunk
@torch.no_grad()
def act(policy: Policy, action_horizon: int, obs: np.ndarray, gens) -> np.ndarray:
    """The executed slice chunk[To-1 : To-1+Ta] [B, Ta, A] for histories obs [B, To, O], z of episode b from gens[b].
    One pass per row: a row's actions do not depend on the rest of the batch (bit for bit), nor evaluations on
    --eval-envs."""
    gen, device = policy.gen, policy.obs_offset.device
    z = torch.stack([torch.randn(gen.pred_horizon, gen.action_dim, generator=g) for g in gens]).to(device)  # [B, Tp, A]
    rows = zip(torch.as_tensor(obs, device=device), z, strict=True)
    chunk = torch.cat([policy(o[None], zb[None]) for o, zb in rows])  # [B, Tp, A]
    return chunk[:, gen.obs_horizon - 1 : gen.obs_horizon - 1 + action_horizon].cpu().numpy()  # [B, Ta, A]


EVAL_TAGS = (("success", "eval/success"), ("return", "eval/episodic_return"), ("length", "eval/episode_length"))


def evaluate(policy: Policy, eval_envs, args, stop: runs.Stop, label: str, video=None) -> dict | None:
    """envs.evaluate (episode i: env seed seed + 10000 + i), printed as `label: tag=mean ...` (res["line"]); None if
    a signal stopped it."""
    t0, Ta = time.time(), eval_envs.single_action_space.shape[0]
    res = envs.evaluate(
        eval_envs, functools.partial(act, policy, Ta), args.eval_episodes, args.seed + 10_000, stop.requested, video
    )
    if res is None:
        print(f"{label}: interrupted", flush=True)
        return None
    res["line"] = " ".join(f"{tag}={res[k]:.4f}" for k, tag in EVAL_TAGS if not math.isnan(res[k]))
    print(f"{label}: {res['line']} ({args.eval_episodes} episodes, {time.time() - t0:.1f}s)", flush=True)
    return res


# ---- every check before any work (runs.parse: one `error:` line, exit 2): a table of ranges, then the rules
HORIZONS = ("obs_horizon", "pred_horizon", "action_horizon")  # To, Tp, Ta
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
            "num_layers",
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
    "positive finite numbers": (lambda v: len(v) > 0 and all(0 < r < math.inf for r in v), ("temperatures",)),
    "odd": (lambda v: v >= 1 and v % 2 == 1, ("unet_kernel_size",)),
}


def rules(args: Args):
    """The (ok, message) rules runs.parse checks in order; fills in the defaults that depend on the env family."""
    yield from runs.ranges(args, RANGES)
    yield not args.eval_only or args.checkpoint, "--eval-only needs --checkpoint PATH [PATH ...] of dbp_bc*.pt files"
    yield args.min_lr <= args.lr, f"--min-lr {args.min_lr} must not exceed --lr {args.lr}"
    plain = args.run_name not in ("", ".", "..") and "/" not in (args.run_name or "")
    yield plain, f"--run-name must be a plain folder name, got {args.run_name!r}"
    args.eval_envs = min(args.eval_envs or os.cpu_count() or 1, args.eval_episodes)
    # the authors' Robomimic (low-dim and image) and D4RL configs: (To, Tp, Ta) 1/4/4, Robomimic max_steps 400 (700:
    # transport, tool_hang); OGBench is not in their code: their PushT-style 2/16/8
    fam = envs.family(envs.resolve_env_id(args.env, args.task, gym_ids=None))  # an unknown env is refused here
    for name, default in zip(HORIZONS, (2, 16, 8) if fam == "ogbench" else (1, 4, 4), strict=True):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.max_episode_steps is None and fam == "robomimic":
        args.max_episode_steps = 700 if args.env.split("-")[0] in ("transport", "tool_hang") else 400
    if args.val_ratio is None:  # the authors' D4RL loader holds nothing out
        args.val_ratio = 0.0 if fam == "gym" else 0.02
    To, Tp, Ta = args.obs_horizon, args.pred_horizon, args.action_horizon
    yield (
        min(To, Tp, Ta) >= 1 and To - 1 + Ta <= Tp,
        f"the executed slice must lie in the chunk: need To - 1 + Ta <= Tp, all >= 1 (--obs-horizon, --pred-horizon, "
        f"--action-horizon); got To={To}, Tp={Tp}, Ta={Ta}",
    )
    if args.backbone == "unet":
        dims = args.unet_dims
        n = len(dims) - 1  # the U-Net halves the chunk n times
        yield (
            n >= 0 and min(dims) >= 1 and Tp % 2**n == 0,
            f"--backbone unet halves the chunk {n} times: it needs positive --unet-dims and --pred-horizon {Tp} "
            f"divisible by 2^{n} (or fewer --unet-dims); got {dims}",
        )
        yield (
            all(d % args.unet_groups == 0 for d in dims) and dims[0] % 8 == 0,
            f"--unet-groups {args.unet_groups} must divide every --unet-dims width {dims}, and 8 (the final block's "
            "groups, as the authors') the first",
        )


# ---- checkpoints (format dbp-v1, read by dbpo_ppo.py; docs/dbp.md)
NETWORK = ("backbone", "generator_kwargs", "model", "obs_dim", "action_dim", *HORIZONS)  # the generator, its shapes
CKPT_KEYS = ("env_id", *NETWORK, *STATS, "action_low", "action_high")  # what a policy snapshot holds
TRAIN_STATE = ("train_model", "optimizer", "rng", "wall_time")  # what dbp_bc.pt has beyond the policy snapshots
# the flags a --resume must share with its checkpoint's run (the budget and the intervals may change): the network,
# the loss and the data
NETWORK_FLAGS = ("backbone", "hidden_dim", "num_layers", "unet_dims", "unet_kernel_size", "unet_groups", *HORIZONS)
DATA_FLAGS = ("env", "task", "dataset_path", "seed", "val_ratio", "batch_size", "normalization")
RENAMED = {"depth": "num_layers"}  # old name -> new, in the args and generator_kwargs of older checkpoints
RESUME_KEYS = (*NETWORK_FLAGS, "image_encoder", "loss", "num_hypotheses", "drift_mode", "drift_field", *DATA_FLAGS)
HINT = "pass a run's dbp_bc.pt (a dbp_bc_<step>.pt snapshot holds only a policy: it can be evaluated, not resumed)"


def eval_only(args: Args, device: torch.device, stop: runs.Stop) -> None:
    """--eval-only: evaluate each --checkpoint (everything needed is in it), then mean +- std and stderr over them."""
    ckpts = [runs.load_checkpoint(p, "--checkpoint", "dbp-v1", CKPT_KEYS, HINT) for p in args.checkpoint]
    print(f"start: eval-only of {len(ckpts)} checkpoint(s) | device {device} | eval envs {args.eval_envs}", flush=True)
    stop.armed = True  # a signal abandons the evaluation: no result
    pool, results = {}, []  # checkpoints of the same env, horizons and time limit share their eval envs
    for path, c in zip(args.checkpoint, ckpts, strict=True):
        key = (c["env_id"], c["obs_horizon"], c["action_horizon"], c.get("env_args"), c.get("max_episode_steps"))
        if key not in pool:
            pool[key] = envs.make_eval_envs(
                key[0], args.eval_envs, horizon=key[2], obs_horizon=key[1], env_args=key[3], max_episode_steps=key[4]
            )
        label = f"eval-only {path} ({key[0]} step {c.get('step')})"
        results.append(evaluate(load_policy(c).to(device), pool[key], args, stop, label))
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


# ---- the training run: main() and its helpers, which share one Run
@dataclass
class Run:
    """What main() and its helpers share: the set-up, the data (load_data), the networks (build), the loop's state."""

    args: Args
    device: torch.device
    stop: runs.Stop
    env_id: str
    ckpt: dict | None  # the checkpoint a --resume continues
    run_dir: str
    ckpt_path: str  # <run dir>/dbp_bc.pt
    env_args: str | None = field(init=False)  # Robomimic: how to rebuild the env (json), saved in the checkpoint
    action_space: object = field(init=False)  # the env's action bounds, which the policy clips to
    stats: dict = field(init=False)  # the normalization (STATS)
    obs_n: torch.Tensor = field(init=False)  # [N, D] normalized observations (an image env's low-dim part)
    layout: dict | None = field(init=False)  # an image env's observation layout (env_args["image_layout"])
    images: object = field(init=False)  # an image env's pixels, uint8 [N, C, H, W, 3] (a tensor, or a lazy reader)
    act_n: torch.Tensor = field(init=False)  # [N, A] normalized actions
    samples: torch.Tensor = field(init=False)  # [3, S]: each sample's chunk start, its episode's first and last step
    train: torch.Tensor = field(init=False)  # [S_train] the training samples (columns of `samples`)
    val: torch.Tensor = field(init=False)  # [<= 1024] held-out samples, fixed, for losses/val_loss
    steps_per_epoch: int = field(init=False)
    total_steps: int = field(init=False)
    num_epochs: int = field(init=False)  # the lr schedule's length
    gen_kwargs: dict = field(init=False)  # make_generator's, saved in the checkpoint
    gen: nn.Module = field(init=False)  # the trained generator
    ema_gen: nn.Module = field(init=False)  # its EMA, evaluated and saved
    optimizer: torch.optim.Optimizer = field(init=False)
    policy: Policy = field(init=False)  # ema_gen with the normalization
    eval_envs: object = field(init=False)
    writer: object = field(init=False)  # tensorboard
    nonfinite: torch.Tensor = field(init=False)  # [2] bool: the loss, the gradient norm was non-finite at some step
    start_step: int = 0  # > 0 on --resume
    wall_time: float = 0.0  # training time before this process (--resume)
    t_start: float = 0.0  # this process's start of training
    epoch: int = 0
    lr: float = 0.0
    decay: float = 0.0  # the last EMA decay
    perm: torch.Tensor | None = None  # this epoch's shuffle of `train`


def load_data(run: Run) -> str:
    """The demonstrations (envs.load_dataset checks them), normalized, on the device, and the samples (sample_chunks,
    by the authors' padding); returns a summary for the start line."""
    a, dev = run.args, run.device
    obs_keys = None if is_image(run.env_id) else ROBOMIMIC_OBS_KEYS  # image ids: their robot keys
    env, data, ends, env_args = envs.load_dataset(run.env_id, a.dataset_path, obs_keys=obs_keys)
    obs = data["observations"].astype(np.float32)  # [N, D]: an image env's low-dim part (O = D without images)
    actions = data["actions"].astype(np.float32)  # [N, A]
    run.layout = (env_args or {}).get("image_layout")  # an image env's: low-dim keys, cameras, height, width
    pixels = 0 if run.layout is None else data["images"][0].size  # C * H * W * 3 values per step
    dims = (obs.shape[1] + pixels, actions.shape[1])
    saved = (run.ckpt["obs_dim"], run.ckpt["action_dim"]) if run.ckpt else dims
    runs.check(saved == dims, f"--resume: the checkpoint has obs/action dims {saved}, the data {dims}")
    run.action_space = env.action_space
    run.env_args = None if env_args is None else json.dumps(env_args)
    first, last = episode_bounds(ends)  # [E] each
    start, episode = sample_chunks(first, last, a.pred_horizon, *PADDING[envs.family(run.env_id)])  # [S] each
    val_episode = holdout_episodes(len(first), a.val_ratio, a.seed)  # [E]
    train = np.flatnonzero(~val_episode[episode])
    val = np.flatnonzero(val_episode[episode])
    runs.check(len(train) > 0, f"no training samples: the episodes are too short for --pred-horizon {a.pred_horizon}")
    run.steps_per_epoch = max(1, len(train) // a.batch_size)  # the authors drop the last partial batch
    run.total_steps = a.total_steps or a.num_epochs * run.steps_per_epoch
    run.num_epochs = math.ceil(run.total_steps / run.steps_per_epoch)
    authors = a.normalization == "authors" and envs.family(run.env_id) == "robomimic"
    image_keys = run.layout["low_dim_keys"] if run.layout is not None and authors else None  # their image recipe
    run.stats = compute_normalization(obs, actions, authors and run.layout is None, image_keys=image_keys)
    run.obs_n = ((torch.as_tensor(obs) - run.stats["obs_offset"]) / run.stats["obs_scale"]).to(dev)  # [N, D]
    run.images = data.get("images")  # uint8 [N, C, H, W, 3] or a lazy reader: normalized per batch (batch())
    if run.layout is not None:  # the pixels' part of the stats: x_n = (x - 127.5) / 127.5 in [-1, 1]
        for k in ("obs_offset", "obs_scale"):
            run.stats[k] = torch.cat([run.stats[k], torch.full((pixels,), PIXEL)])
        free = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else math.inf  # bytes
        if isinstance(run.images, np.ndarray) and run.images.nbytes < free / 2:  # on the device when it fits
            run.images = torch.from_numpy(run.images).to(dev)  # (else read on the CPU, batch by batch)
    run.act_n = ((torch.as_tensor(actions) - run.stats["action_offset"]) / run.stats["action_scale"]).to(dev)
    run.samples = torch.as_tensor(np.stack([start, first[episode], last[episode]]), device=dev)
    run.train = torch.as_tensor(train, device=dev)
    run.val = torch.as_tensor(val[:1024], device=dev)
    return (
        f"{len(obs)} steps, {len(first)} episodes ({int(val_episode.sum())} held out), {len(train)} train / "
        f"{len(val)} val samples | {run.total_steps} steps = {run.num_epochs} epochs of {run.steps_per_epoch}"
    )


def batch(run: Run, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples `rows` [B]: normalized histories [B, To, O] and chunks [B, Tp, A], padded in their episodes."""
    obs_idx, act_idx = chunk_indices(*run.samples[:, rows], run.args.obs_horizon, run.args.pred_horizon)
    obs_hist = run.obs_n[obs_idx]  # [B, To, D]
    if run.images is not None:  # the batch's pixels, normalized here: the data stays uint8
        idx = obs_idx.flatten()  # [B * To]
        px = run.images[idx] if torch.is_tensor(run.images) else torch.from_numpy(run.images[idx.cpu().numpy()])
        px = (px.to(run.device).float() - PIXEL) / PIXEL  # x_n = (x - 127.5) / 127.5; [B * To, C, H, W, 3]
        obs_hist = torch.cat([obs_hist, px.view(*obs_idx.shape, -1)], dim=-1)  # [B, To, D + C*H*W*3] = [B, To, O]
    return obs_hist, run.act_n[act_idx]


def build(run: Run) -> None:
    """The generator, its EMA copy (evaluated, saved), AdamW (resumed with the RNGs), eval envs and tensorboard."""
    a, ckpt = run.args, run.ckpt
    if a.backbone == "mlp":
        arch = dict(hidden_dim=a.hidden_dim, num_layers=a.num_layers)
    else:
        arch = dict(down_dims=list(a.unet_dims), kernel_size=a.unet_kernel_size, n_groups=a.unet_groups)
    if run.layout is not None:  # the encoder, rebuilt from the checkpoint by make_generator
        arch |= dict(image_layout=run.layout, image_encoder=a.image_encoder)
    shapes = dict(obs_dim=len(run.stats["obs_offset"]), action_dim=run.act_n.shape[1], obs_horizon=a.obs_horizon)
    run.gen_kwargs = dict(**shapes, pred_horizon=a.pred_horizon, **arch)
    run.gen, run.ema_gen = (make_generator(a.backbone, **run.gen_kwargs).to(run.device) for _ in range(2))
    run.ema_gen.requires_grad_(False).load_state_dict(run.gen.state_dict())  # the EMA starts as a copy
    # AdamW with torch's default betas, as the authors'; update() sets the epoch's lr before every step
    run.optimizer = torch.optim.AdamW(run.gen.parameters(), weight_decay=a.weight_decay)
    run.policy = Policy(run.ema_gen, run.stats, run.action_space.low, run.action_space.high).to(run.device).eval()
    run.nonfinite = torch.zeros(2, dtype=torch.bool, device=run.device)
    if ckpt is not None:
        runs.load_states({"train_model": run.gen, "model": run.ema_gen, "optimizer": run.optimizer}, ckpt, HINT)
        run.start_step = ckpt["step"]
        run.wall_time = ckpt["wall_time"]
        runs.set_rng_state(ckpt["rng"])
    run.eval_envs = envs.make_eval_envs(
        run.env_id,
        a.eval_envs,
        horizon=a.action_horizon,
        obs_horizon=a.obs_horizon,
        render=a.capture_video,
        env_args=run.env_args,
        max_episode_steps=a.max_episode_steps,
    )
    name = os.path.basename(run.run_dir)
    wandb = a.track and a.wandb_project_name  # the wandb project, if tracked
    run.writer = runs.tensorboard(run.run_dir, a, name, run.start_step + 1, wandb, a.wandb_entity)


def train_step(run: Run, step: int):
    """Gradient step `step` (0-based): its batch of the epoch's shuffle, the epoch's lr, update(), then the EMA."""
    a = run.args
    run.epoch, i = divmod(step, run.steps_per_epoch)
    if run.perm is None or i == 0:  # the epoch's shuffle is a function of (seed, epoch): a resume continues it
        rng = torch.Generator().manual_seed(a.seed * 1_000_003 + run.epoch)
        run.perm = run.train[torch.randperm(len(run.train), generator=rng).to(run.device)]
    run.lr = lr_at(run.epoch, a.lr, a.min_lr, a.warmup_epochs, run.num_epochs)
    obs_hist, chunk = batch(run, run.perm[i * a.batch_size : (i + 1) * a.batch_size])  # [B, To, O], [B, Tp, A]
    loss, grad_norm, info = update(run.gen, run.optimizer, obs_hist, chunk, run.lr, a)
    run.nonfinite |= torch.stack([~torch.isfinite(loss), ~torch.isfinite(grad_norm)])  # no sync here
    k = ema_schedule(step, run.steps_per_epoch, a.ema_every, a.ema_start_epoch)
    if k is not None:  # k = -1 before --ema-start-epoch: decay 0, a plain copy
        run.decay = 0.0 if k == -1 else ema_decay(k, a.ema_power, a.ema_max_decay)
        ema_update(run.ema_gen, run.gen, run.decay)
    return loss, grad_norm, info


def check_finite(run: Run, step: int) -> None:
    """Exit 1 on a non-finite loss, gradient norm or parameter, before a good state is evaluated or saved over."""
    names = [n for n, bad in zip(("the loss", "the gradient norm"), run.nonfinite.tolist(), strict=True) if bad]
    params = {"gen": run.gen.state_dict(), "ema": run.ema_gen.state_dict()}
    runs.stop_nonfinite(names[0] if names else runs.nonfinite(params), step, run.ckpt_path)


@torch.no_grad()
def log(run: Run, step: int, loss, grad_norm, info: dict) -> None:
    """Tensorboard scalars (losses, the held-out loss, schedule, SPS) and a progress line; .item() syncs, only here."""
    check_finite(run, step)
    B = run.args.batch_size
    sps = (step - run.start_step) / max(time.time() - run.t_start, 1e-9)
    scalars = {
        "losses/loss": loss.item(),
        "losses/grad_norm": grad_norm.item(),
        "charts/learning_rate": run.lr,
        "charts/ema_decay": run.decay,
        "charts/epoch": run.epoch,
        "charts/SPS": sps,
    }
    if len(run.val):  # the held-out loss draws its own latents; fork_rng leaves the training stream untouched
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if run.device.type == "cuda" else []):
            torch.manual_seed(run.args.seed)
            out = [compute_loss(run.gen, *batch(run, rows), *loss_flags(run.args)) for rows in run.val.split(B)]
        scalars["losses/val_loss"] = float(np.mean([loss_b.item() for loss_b, _ in out]))
        scalars["losses/val_chunk_mse"] = float(np.mean([info_b["chunk_mse"].item() for _, info_b in out]))
    scalars.update({f"losses/{k}": float(v) for k, v in info.items()})
    for name, value in scalars.items():
        run.writer.add_scalar(name, value, step)
    eta = (run.total_steps - step) / max(sps, 1e-9)
    val = f"| val_loss {scalars['losses/val_loss']:.4f} " if len(run.val) else ""
    print(
        f"step {step}/{run.total_steps} | epoch {run.epoch} | loss {loss.item():.4f} | chunk_mse "
        f"{float(info['chunk_mse']):.4f} {val}| SPS {sps:.0f} | ETA {int(eta // 60)}m{int(eta % 60):02d}s",
        flush=True,
    )


def evaluation(run: Run, step: int, video: bool = False) -> dict:
    """The EMA policy's evaluation at `step`, logged; a signal during it raises runs.Interrupted (nothing logged)."""
    check_finite(run, step)
    print(f"evaluating step {step} ({run.args.eval_episodes} episodes on {run.eval_envs.num_envs} envs)", flush=True)
    video_path = os.path.join(run.run_dir, "videos", f"eval_{step}.mp4") if video else None
    res = evaluate(run.policy, run.eval_envs, run.args, run.stop, f"eval step {step}", video_path)
    run.stop.check()  # None: a signal stopped the evaluation, which raises runs.Interrupted here (nothing is logged)
    for key, tag in EVAL_TAGS:
        if not math.isnan(res[key]):  # success is NaN in gymnasium locomotion, which has no success signal
            run.writer.add_scalar(tag, res[key], step)
    return res


def save(run: Run, step: int) -> None:
    """dbp_bc.pt (for --resume) and the policy snapshot dbp_bc_<step>.pt (the last --keep-checkpoints kept); atomic."""
    check_finite(run, step)
    a = run.args
    ckpt = {
        "format": "dbp-v1",
        "args": json.loads(json.dumps(asdict(a))),
        "env_id": run.env_id,
        **{k: run.gen_kwargs[k] for k in ("obs_dim", "action_dim")},
        "generator_kwargs": run.gen_kwargs,
        "env_args": run.env_args,
        "model": {k: v.cpu() for k, v in run.ema_gen.state_dict().items()},
        **{k: getattr(a, k) for k in (*HORIZONS, "backbone", "loss", "max_episode_steps")},
        **run.policy.stats(),
        "action_low": run.policy.action_low.cpu(),
        "action_high": run.policy.action_high.cpu(),
        "step": step,
        "train_model": {k: v.cpu() for k, v in run.gen.state_dict().items()},  # + TRAIN_STATE: for --resume
        "optimizer": run.optimizer.state_dict(),
        "rng": runs.rng_state(),
        "wall_time": run.wall_time + time.time() - run.t_start,
    }
    runs.save(ckpt, run.ckpt_path)
    if a.keep_checkpoints > 0:
        snapshot = {k: v for k, v in ckpt.items() if k not in TRAIN_STATE}
        runs.save(snapshot, os.path.join(run.run_dir, f"dbp_bc_{step}.pt"))
        steps = sorted(int(m[1]) for f in os.listdir(run.run_dir) if (m := re.fullmatch(r"dbp_bc_(\d+)\.pt", f)))
        for old in steps[: -a.keep_checkpoints]:
            os.remove(os.path.join(run.run_dir, f"dbp_bc_{old}.pt"))


def main() -> None:
    args = runs.parse(Args, rules)
    stop = runs.Stop()  # before the banner: until armed, a signal exits at once (nothing to save yet)
    device = runs.seed(args.seed, args.torch_deterministic, args.num_threads, args.cuda)
    if args.eval_only:
        eval_only(args, device, stop)
    # the checks that need no data: the resumed checkpoint (its kind, the flags that must match), the run folder
    env_id = envs.resolve_env_id(args.env, args.task, gym_ids=None)
    ckpt = None
    if args.resume:
        ckpt = runs.load_checkpoint(args.resume, "--resume", "dbp-v1", CKPT_KEYS + TRAIN_STATE, HINT)
        old = {RENAMED.get(k, k): v for k, v in ckpt.get("args", {}).items()}
        now = json.loads(json.dumps(asdict(args)))  # json: tuples -> lists, as saved
        diff = {k: (old.get(k), now[k]) for k in RESUME_KEYS if old.get(k, now[k]) != now[k]}  # a newer flag: as now
        runs.check(not diff, f"--resume: these flags differ from the checkpoint's run (checkpoint, now): {diff}")
    name = args.run_name or runs.run_name(env_id, args.exp_name, args.seed)
    run_dir = runs.plan_run_dir(args.runs_dir, name, "dbp_bc.pt", args.resume)
    run = Run(args, device, stop, env_id, ckpt, run_dir, os.path.join(run_dir, "dbp_bc.pt"))
    summary = load_data(run)
    build(run)
    resuming = f" | resuming {os.path.basename(run_dir)} at step {run.start_step}" if ckpt else ""
    print(
        f"start: env {env_id} | data {args.dataset_path or 'default'}: {summary} | {args.backbone} generator of "
        f"{sum(p.numel() for p in run.gen.parameters())} parameters, To={args.obs_horizon} Tp={args.pred_horizon} "
        f"Ta={args.action_horizon} | device {device} | threads {torch.get_num_threads()} | eval envs "
        f"{run.eval_envs.num_envs} | run dir {run_dir}{resuming}",
        flush=True,
    )
    run.t_start = time.time()
    done = run.start_step
    stop.armed = True  # from here a signal is honoured at the next gradient step (or chunk in evaluation), and saved
    try:
        for step in range(run.start_step, run.total_steps):  # per-epoch shuffled batches, drift G hypotheses, EMA
            stop.check()
            loss, grad_norm, info = train_step(run, step)
            done = step + 1
            if done % args.log_interval == 0 or done == run.total_steps:
                log(run, done, loss, grad_norm, info)
            periodic = done != run.total_steps  # the last step is evaluated and saved after the loop
            if periodic and args.eval_interval > 0 and done % args.eval_interval == 0:
                evaluation(run, done)
            if periodic and args.save_model and args.save_interval > 0 and done % args.save_interval == 0:
                save(run, done)
        if args.save_model:
            save(run, done)
            print(f"saved {run.ckpt_path}", flush=True)
        res = evaluation(run, done, video=args.capture_video)
    except runs.Interrupted:  # save, print the command that resumes the run, exit with 128 + signum
        if args.save_model:
            save(run, done)
        saved = run.ckpt_path if args.save_model else None
        runs.interrupted(done, saved, stop.exit_code, run.eval_envs, run.writer, track=args.track)
    minutes = (run.wall_time + time.time() - run.t_start) / 60
    print(f"final: {run.total_steps} steps, wall time {minutes:.1f} min, {res['line']}")
    runs.leave(0, run.eval_envs, run.writer, track=args.track)


if __name__ == "__main__":
    main()
