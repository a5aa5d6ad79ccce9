"""Drifting Field Policy (DFP): offline-to-online RL with a one-step drifting policy over action chunks.
Paper: Koo et al. 2026, "Drifting Field Policy", arXiv 2605.07727; the math: docs/algorithms.md §3.

    python dfp_offline_to_online.py --env cube-triple-play --K 4 --N 16

Offline: drift the actor toward the data chunk (L_BC) while Q-chunking critics learn from the data. Online: drift
toward the top-K of N candidates of a slow EMA policy pi_old scored by the critic, L = lambda * L_topK + L_BC, with the
replay buffer (replay.py) seeded by the offline data. Benchmarks and evaluation: envs.py; run plumbing: runs.py.
"""

import copy
import itertools
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import drift_field
import envs
import runs
from replay import ReplayBuffer, to_tensors
from runs import check


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (networks, chunk sampling; online env: seed + 3000; evaluation: see --eval-episodes)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda will be used when available"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases (imported lazily)"""
    wandb_project_name: str = "drift-policies"
    """the wandb project of --track"""
    wandb_entity: str | None = None
    """the wandb entity (team) of --track"""
    capture_video: bool = False
    """if toggled, each evaluation's first episode is saved as <run folder>/videos/eval_<step>.mp4 (MUJOCO_GL=egl)"""
    save_model: bool = True
    """if toggled, checkpoints go to <run folder>/checkpoint.pt (every --save-interval, at the end, on Ctrl-C)"""
    num_threads: int = 0
    """torch CPU threads (0: torch's default)"""

    # Environment and data
    env: str = "cube-triple-play"
    """cube-{single,double,triple,quadruple}-play (task 2 unless --task), a singletask id, or lift/can/square-mh/ph"""
    task: int | None = None
    """singletask task 1..5 (overrides the task in --env)"""
    dataset_path: str | None = None
    """an OGBench .npz (with its -val twin) or a Robomimic low_dim_v15.hdf5 (None: in ~/.ogbench/data, ~/.robomimic)"""
    dataset_dir: str | None = None
    """a folder of dataset shards (*.npz with -val twins), one in memory at a time (cube-quadruple-play-100m)"""
    shard_interval: int = 1000
    """offline steps between shard rotations with --dataset-dir"""

    # Algorithm specific arguments
    offline_steps: int = 1_000_000
    """gradient steps of the offline phase"""
    online_steps: int = 1_000_000
    """environment steps of the online phase"""
    action_horizon: int = 5
    """h: actions per chunk, predicted and executed open-loop: for DFP both lengths are h (DBP: Tp and Ta)"""
    batch_size: int = 256
    """batch size B of every update"""
    lr: float = 3e-4
    """Adam learning rate of actor and critic"""
    gamma: float = 0.99
    """the discount factor gamma, per environment step"""
    tau: float = 0.005
    """Polyak rate of the target critic"""
    hidden_dim: int = 512
    """width of actor and critic MLPs"""
    num_layers: int = 4
    """hidden layers of actor and critic MLPs"""
    exact_gelu: bool = False
    """if toggled, the exact (erf) GELU in actor and critic (off: the tanh approximation, as the ref code)"""
    num_critics: int = 2
    """critic ensemble size (aggregated by mean)"""
    num_hypotheses: int = 8
    """G: samples of pi_theta generated per state for the drift losses (DBP's name: hypotheses)"""
    temperatures: tuple[float, ...] = (0.1,)
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
    """EMA rate of pi_old per update (offline too, as the ref code; pi_old is reset to the actor at the switch)"""
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
    """steps between evaluations (also at step 1, at the switch to online and at the end); steps as --save-interval's"""
    eval_episodes: int = 100
    """episodes per evaluation (episode i: env seed seed + 1000 + i offline, + 2000 + i online, its own policy noise)"""
    eval_envs: int | None = None
    """envs stepped together in evaluation, in worker processes when > 1 (None: min(CPU cores, --eval-episodes))"""
    log_interval: int = 5000
    """steps between loss logs and progress lines"""
    save_interval: int = 100_000
    """steps (offline gradient steps, then online env steps) between checkpoints"""
    resume: str | None = None
    """continue a run from this checkpoint"""
    eval_only: bool = False
    """only evaluate the policy of --checkpoint"""
    checkpoint: str | None = None
    """checkpoint for --eval-only"""
    runs_dir: str = "runs"
    """where run folders (tensorboard, checkpoint, videos) go"""
    run_name: str | None = None
    """the run folder's name under --runs-dir (None: <env_id>__<exp_name>__<seed>__<unix time>)"""


# ---- networks: the one-step generator and the critic ensemble (as the ref code's flax networks)
def mlp(in_dim: int, out_dim: int, hidden_dim: int, num_layers: int, gelu: str = "tanh") -> nn.Sequential:
    """Linear -> GELU per hidden layer, then Linear; the ref code's init: Xavier-uniform weights, zero biases."""
    layers, d = [], in_dim
    for _ in range(num_layers):
        layers += [nn.Linear(d, hidden_dim), nn.GELU(gelu)]
        d = hidden_dim
    net = nn.Sequential(*layers, nn.Linear(d, out_dim))
    for lin in [m for m in net if isinstance(m, nn.Linear)]:
        nn.init.xavier_uniform_(lin.weight), nn.init.zeros_(lin.bias)
    return net


class Actor(nn.Module):
    """One-step pushforward policy a = f_theta(s, eps), eps ~ N(0, I), dim(eps) = dim(a) = h * action_dim."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, num_layers: int, gelu: str = "tanh"):
        super().__init__()
        self.act_dim = act_dim
        self.net = mlp(obs_dim + act_dim, act_dim, hidden_dim, num_layers, gelu)  # no LayerNorm, as the ref code

    def forward(self, obs: torch.Tensor, n: int, generator=None) -> torch.Tensor:
        """n chunks per state: obs [B, O] -> actions [B, n, D], clipped to [-1, 1] (1 NFE each)."""
        obs = obs[:, None, :].expand(-1, n, -1)  # [B, n, O]
        return self.net(torch.cat([obs, self.noise(obs, generator)], -1)).clamp(-1.0, 1.0)

    def noise(self, obs: torch.Tensor, generator=None) -> torch.Tensor:
        """eps ~ N(0, I) [B, n, D]: the global RNG or one CPU generator per state (evaluation); tests replace it."""
        return (
            torch.randn(*obs.shape[:2], self.act_dim, device=obs.device)
            if generator is None
            else torch.stack([torch.randn(obs.shape[1], self.act_dim, generator=g) for g in generator]).to(obs.device)
        )


class Critic(nn.Module):
    """Ensemble of E Q(s, a_chunk) MLPs run as one batched network (one matmul per layer), returning [E, ...]: member e
    is Linear -> GELU -> LayerNorm per hidden layer, then Linear, with slice e of the stacked weights."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, num_layers: int, num_critics: int, gelu="tanh"):
        super().__init__()
        E, dims, self.gelu = num_critics, [obs_dim + act_dim] + [hidden_dim] * num_layers + [1], gelu
        self.weights = nn.ParameterList(  # W_e^T [E, in, out] (the ref code's kernels), mlp's init member by member
            torch.stack([nn.init.xavier_uniform_(torch.empty(i, o)) for _ in range(E)])
            for i, o in itertools.pairwise(dims)
        )
        self.biases = nn.ParameterList(torch.zeros(E, 1, o) for o in dims[1:])
        self.norm_weights = nn.ParameterList(torch.ones(E, 1, hidden_dim) for _ in range(num_layers))
        self.norm_biases = nn.ParameterList(torch.zeros(E, 1, hidden_dim) for _ in range(num_layers))

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        x = torch.cat([obs, actions], -1)  # [..., O + D]
        E, lead = len(self.weights[0]), x.shape[:-1]
        x = x.reshape(1, -1, x.shape[-1]).expand(E, -1, -1)  # the same inputs for every member, [E, N, O + D]
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            x = torch.bmm(x, w) + b  # x_e @ W_e^T + b_e for every member e at once, [E, N, out]
            if i < len(self.norm_weights):  # GELU, then LayerNorm with each member's own scale and shift
                x = F.layer_norm(F.gelu(x, approximate=self.gelu), x.shape[-1:], eps=1e-6)  # flax's eps (torch's: 1e-5)
                x = torch.addcmul(self.norm_biases[i], x, self.norm_weights[i])
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


# ---- chunked TD data, the losses and the update
def sample_chunks(data: dict, start: int, size: int, capacity: int, gen, batch_size: int, h: int, gamma: float) -> dict:
    """B chunks s_t, a_t..a_{t+h-1} of flat transitions (oldest entry at `start`, ring-wise: the offline data or the
    replay buffer), never past the newest entry. Device indexing with the device generator `gen`: no host sync."""
    dev = data["rewards"].device
    idx = (start + torch.randint(0, size - h + 1, (batch_size,), device=dev, generator=gen)) % capacity  # [B]
    j = (idx[:, None] + torch.arange(h, device=dev)) % capacity  # [B, h]
    discounts = gamma ** torch.arange(h, device=dev, dtype=torch.float32)  # [h]
    return {
        "observations": data["observations"][idx],  # s_t, [B, O]
        "actions": data["actions"][j].reshape(batch_size, -1),  # [B, h * A]
        "rewards": data["rewards"][j] @ discounts,  # r_chunk = sum_k gamma^k r_{t+k}, [B]
        "masks": data["masks"][j].amin(1),  # min_k mask_{t+k}, [B]
        "valid": (data["terminals"][j[:, :-1]].sum(1) == 0).float(),  # 0 if the episode ends inside the chunk, [B]
        "next_observations": data["next_observations"][j[:, -1]],  # s_{t+h}, [B, O]
    }


def drift(args, gen: torch.Tensor, pos: torch.Tensor, pos_weight: torch.Tensor | None = None):
    """Drift loss of gen [B, G, D] toward pos [B, P, D] (the generated samples are the negatives)."""
    if args.drift_field == "official":  # (docs/algorithms.md §2)
        loss, info = drift_field.drift_loss(gen, pos, temperatures=args.temperatures, pos_weight=pos_weight)
        return loss.mean(), info["scale"], sum(info[f"force_sq_{r}"] for r in args.temperatures)
    x = gen.detach()  # (docs/algorithms.md §1): V(x) = V_p+(x) - V_q-(x), L = || x - sg(x + V(x)) ||^2
    v = drift_field.mean_shift_field(x, pos, x, args.bandwidth, pos_weight=pos_weight)
    return (gen - (x + v)).pow(2).mean(), v.norm(dim=-1).mean(), v.pow(2).mean()


def critic_loss(args, actor, critic, target_critic, batch):
    """Chunked TD: y = r_chunk + gamma^h * mask * mean_e Qtarget_e(s_{t+h}, a'), a' = the best of q_best_of actor
    samples by the critic's mean; L = mean over e and B of valid * (Q_e - y)^2."""
    with torch.no_grad():
        next_a = best_of_n(actor, critic, batch["next_observations"], args.q_best_of)  # [B, D]
        next_q = target_critic(batch["next_observations"], next_a).mean(0)  # [B]
        y = batch["rewards"] + args.gamma**args.action_horizon * batch["masks"] * next_q  # [B]
    q = critic(batch["observations"], batch["actions"])  # [E, B]
    return ((q - y).pow(2) * batch["valid"]).mean(), q, y  # / (E * B), not / sum(valid): the ref code


def actor_loss(args, actor, ema_actor, critic, batch, online: bool):
    """Offline: L = alpha * drift(gen, pos = the data chunk), gen = G samples of pi_theta(.|s). Online:
    L = lambda * drift(gen, pos = top-K of N ~ pi_old by Q) + bc_weight * drift(gen, pos = the data chunk)."""
    obs = batch["observations"]
    gen = actor(obs, args.num_hypotheses)  # fresh samples of pi_theta, reused by both terms online, [B, G, D]
    loss_bc, scale, force = drift(args, gen, batch["actions"][:, None, :])
    if not online:
        return args.alpha * loss_bc, loss_bc, torch.zeros_like(loss_bc), scale, force
    with torch.no_grad():
        cand = ema_actor(obs, args.N)  # a^(1..N) ~ pi_old(.|s), [B, N, D]
        q = q_mean(critic, obs, cand)  # [B, N]
        pos, idx = drift_field.top_k(cand, q, args.K)  # P_K(s), [B, K, D]
        weight = None
        if args.online_mode == "soft":  # w = max(2 (Q - min) / max(max - min, 1e-8) - 1, 0), as the ref code
            q_min, q_max = q.min(1, keepdim=True).values, q.max(1, keepdim=True).values
            weight = (2.0 * (q - q_min) / (q_max - q_min).clamp(min=1e-8) - 1.0).gather(1, idx).clamp(min=0.0)  # [B, K]
    loss_topk, _, _ = drift(args, gen, pos, weight)
    return args.topk_weight * loss_topk + args.bc_weight * loss_bc, loss_bc, loss_topk, scale, force


def make_update(args, actor, critic, target_critic, ema_actor, optimizer):
    critic_params, target_params = list(critic.parameters()), list(target_critic.parameters())
    actor_params, ema_params = list(actor.parameters()), list(ema_actor.parameters())

    def update(batch: dict, online: bool) -> torch.Tensor:
        """One step on critic + actor (one loss, one Adam); Polyak target and EMA pi_old (offline too) move toward the
        PRE-step critic and actor, as the ref code. No host sync inside: --compile and --cudagraphs wrap it whole."""
        optimizer.zero_grad(set_to_none=True)
        lc, q, _ = critic_loss(args, actor, critic, target_critic, batch)
        la, lbc, ltop, scale, force = actor_loss(args, actor, ema_actor, critic, batch, online)
        (lc + la).backward()
        with torch.no_grad():  # before optimizer.step(): the parameters are still the pre-step ones
            torch._foreach_lerp_(target_params, critic_params, args.tau)  # theta' <- (1 - tau) theta' + tau theta
            torch._foreach_lerp_(ema_params, actor_params, args.ema_tau)  # pi_old <- (1 - tau_ema) pi_old + tau_ema pi
        optimizer.step()
        return torch.stack([lc, lbc, ltop, q.mean(), scale, force]).detach()  # stays on device: no sync in the hot loop

    return update


LOSS_NAMES = (
    "losses/critic",
    "losses/drift_bc",
    "losses/drift_topk",
    "stats/q_mean",
    "stats/drift_scale",
    "stats/drift_bc_force_sq",
)  # of the BC drift (the loss is ~1 per temperature by design, not the force)


# ---- acting in evaluation: best-of-N by the critic, each episode with its own noise (envs.evaluate)
def make_act(actor: Actor, critic: Critic, n: int, device) -> Callable:
    """act(obs [B, O], generators) for envs.evaluate: the best of n chunks by the critic, and its value (q_chosen)."""

    @torch.no_grad()
    def act(obs: np.ndarray, generators: list):
        o = torch.as_tensor(obs, device=device)  # [B, O]
        cand = actor(o, n, generators)  # the episodes' own noise streams, [B, n, D]
        q = q_mean(critic, o, cand)  # [B, n]; q_chosen from here: rescoring B chunks alone rounds with B
        best, idx = drift_field.top_k(cand, q, 1)  # [B, 1, D]: the chunk the critic likes best
        return best[:, 0].cpu().numpy(), {"q_chosen": q.gather(1, idx)[:, 0].cpu().numpy()}  # [B, D], [B]

    return act


# ---- the command line: every refusal is one `error:` line, exit 2, before anything is written
RANGES = {  # requirement: (test, flags); a NaN fails every comparison, so it is refused too
    ">= 1": (
        lambda v: v is None or v >= 1,
        (
            "action_horizon",
            "batch_size",
            "hidden_dim",
            "num_layers",
            "num_critics",
            "num_hypotheses",
            "N",
            "q_best_of",
            "act_best_of",
            "utd_ratio",
            "buffer_size",
            "eval_interval",
            "eval_episodes",
            "log_interval",
            "save_interval",
            "shard_interval",
            "eval_envs",
        ),
    ),  # eval_envs: None is its default
    ">= 0": (lambda v: v >= 0, ("seed", "offline_steps", "online_steps", "start_training", "num_threads")),
    "a finite number > 0": (lambda v: 0 < v < math.inf, ("lr", "bandwidth")),
    "a finite number >= 0": (lambda v: 0 <= v < math.inf, ("alpha", "topk_weight", "bc_weight")),
    "in (0, 1]": (lambda v: 0 < v <= 1, ("gamma", "tau")),
    "in [0, 1]": (lambda v: 0 <= v <= 1, ("ema_tau",)),
}


def rules(a: Args) -> list:
    """(ok, message) pairs for runs.parse: the RANGES, then how the flags go together."""
    plain = lambda v: v is None or (v not in ("", ".", "..") and "/" not in v and os.sep not in v)  # noqa: E731
    return runs.ranges(a, RANGES) + [
        (
            a.temperatures and all(0 < t < math.inf for t in a.temperatures),
            f"--temperatures must be finite numbers > 0, got {a.temperatures}",
        ),
        (1 <= a.K <= a.N, f"--K must be in 1..N = 1..{a.N}, got {a.K}"),
        (a.offline_steps + a.online_steps >= 1, "--offline-steps + --online-steps must be >= 1"),
        (
            not a.cudagraphs or a.cuda and torch.cuda.is_available(),
            "--cudagraphs needs a CUDA device (and no --no-cuda); drop the flag on CPU",
        ),
        (not (a.eval_only and a.resume), "give --eval-only --checkpoint PATH or --resume PATH, not both"),
        (not a.eval_only or a.checkpoint is not None, "--eval-only needs --checkpoint PATH"),
        (a.checkpoint is None or a.eval_only, "--checkpoint is for --eval-only; to continue a run use --resume"),
        (a.dataset_path is None or a.dataset_dir is None, "give --dataset-path or --dataset-dir, not both"),
        (
            a.dataset_path is None or not os.path.isdir(os.path.expanduser(a.dataset_path)),
            f"--dataset-path {a.dataset_path} is a folder, not a dataset file",
        ),
        *(
            (plain(v), f"--{k} must be a plain folder name (no '/'), got {v!r}")
            for k, v in (("run-name", a.run_name), ("exp-name", a.exp_name))
        ),
    ]


CKPT_FORMAT, CKPT_HINT = "dfp-v1", "pass the checkpoint.pt of a DFP run"
CKPT_KEYS = (
    "args",
    "env_id",
    "run_name",
    "step",
    "phase",
    "obs_dim",
    "act_dim",
    "actor",
    "critic",
    "target_critic",
    "ema_actor",
    "optimizer",
    "rng",
    "buffer_online",
    "shard_idx",
    "last_success",
    "eval_pending",
)
EVAL_ONLY_ARGS = (
    "env",
    "task",
    "action_horizon",
    "hidden_dim",
    "num_layers",
    "num_critics",
    "exact_gelu",
    "act_best_of",
    "seed",
    "offline_steps",
)
# older checkpoints' args: old name -> new
RENAMED = {"horizon": "action_horizon", "discount": "gamma", "num_gen": "num_hypotheses"}


# ---- the run: its state, and the steps of the loop
@dataclass
class Run:
    """What the loop carries from step to step; save() writes it as a dfp-v1 checkpoint."""

    args: Args
    env_id: str
    dir: str
    env: gym.Env  # the online env (one action per step), with episode statistics
    env_args: dict | None  # Robomimic: how to rebuild the env (None for OGBench)
    data: dict | None  # the offline data (the current shard) on the training device
    shards: list  # --dataset-dir: one shard in memory at a time
    shard_idx: int
    modules: dict  # actor, critic, target_critic, ema_actor (pi_old) and their optimizer
    sampler: torch.Generator  # chunk sampling, on the training device
    eval_envs: "gym.vector.VectorEnv"  # envs.make_eval_envs
    stop: runs.Stop
    stats: torch.Tensor  # sums of the update's LOSS_NAMES values since the last log, on the device: no sync per step
    n_stats: int = 0
    writer: object = None  # tensorboard
    update: Callable = None  # update(batch, online) -> the LOSS_NAMES values [6], on the device
    buffer: ReplayBuffer | None = None  # from the switch on
    obs: np.ndarray | None = None  # the online env's observation
    queue: list = field(default_factory=list)  # the actions left of the chunk being executed
    last_success: float = math.nan
    t0: tuple[float, int] = (0.0, 1)  # (time, step) this process started training at: SPS


def build(args: Args, obs_dim: int, act_dim: int, device, ckpt: dict | None) -> dict:
    """actor, critic, target_critic, ema_actor and the one Adam of actor and critic, with a checkpoint's weights."""
    D, H, L, E = act_dim * args.action_horizon, args.hidden_dim, args.num_layers, args.num_critics  # D: a chunk
    g = "none" if args.exact_gelu else "tanh"
    actor, critic = Actor(obs_dim, D, H, L, g).to(device), Critic(obs_dim, D, H, L, E, g).to(device)
    target, ema = copy.deepcopy(critic), copy.deepcopy(actor)  # exact copies at the start, as the ref code; ema: pi_old
    # capturable: Adam's step counters live on the GPU, so a CUDA graph can replay the optimizer step too
    optimizer = torch.optim.Adam([*actor.parameters(), *critic.parameters()], lr=args.lr, capturable=args.cudagraphs)
    modules = {"actor": actor, "critic": critic, "target_critic": target, "ema_actor": ema, "optimizer": optimizer}
    if ckpt:
        runs.load_states(modules, ckpt, "pass its --action-horizon/--hidden-dim/--num-layers/--num-critics")
        runs.set_optimizer(optimizer, args.lr, args.cudagraphs)  # this run's --lr and --cudagraphs, not the saved ones
    return modules


def offline_tensors(data: dict, device) -> dict:
    """The offline data on the device, its actions clipped to +-(1 - 1e-5) as the ref code's `action_clip_eps` does."""
    data["actions"] = np.clip(data["actions"], -1 + 1e-5, 1 - 1e-5)
    return to_tensors(data, device)


def offline_step(r: Run, step: int) -> None:
    """One gradient step on a batch of data chunks (with shards: the next one every --shard-interval steps)."""
    a = r.args
    if len(r.shards) > 1 and step % a.shard_interval == 0:
        r.shard_idx, r.data = (r.shard_idx + 1) % len(r.shards), None  # free this shard before reading the next
        _, data, _, _ = envs.load_dataset(r.env_id, r.shards[r.shard_idx], r.env, min_len=a.action_horizon + 1)
        r.data = offline_tensors(data, r.stats.device)
        r.writer.add_scalar("charts/shard", r.shard_idx, step)
    n = len(r.data["observations"])
    batch = sample_chunks(r.data, 0, n, n, r.sampler, a.batch_size, a.action_horizon, a.gamma)
    r.stats, r.n_stats = r.stats + r.update(batch, online=False), r.n_stats + 1


def online_step(r: Run, step: int) -> None:
    """One env step of a best-of-N chunk executed open-loop, stored; then --utd-ratio updates (after
    --start-training steps). The first one is the switch: the buffer starts as the offline data, pi_old = pi_theta."""
    a, actor = r.args, r.modules["actor"]
    if r.buffer is None:
        r.buffer = ReplayBuffer(r.data, min(a.buffer_size, len(r.data["observations"]) + a.online_steps))
        r.modules["ema_actor"].load_state_dict(actor.state_dict())
        r.obs, _ = r.env.reset(seed=a.seed + 3000)  # seeded once, as the ref code (+3000: apart from evaluation's)
    if not r.queue:  # one host-to-device and one device-to-host copy per chunk of h steps
        o = torch.as_tensor(r.obs, dtype=torch.float32, device=r.stats.device)[None]  # [1, O]
        chunk = best_of_n(actor, r.modules["critic"], o, a.act_best_of)[0]  # [D] = [h * A]
        r.queue = list(chunk.cpu().numpy().reshape(a.action_horizon, -1))  # h actions [A]
    action = r.queue.pop(0)  # [A]
    next_obs, reward, terminated, truncated, info = r.env.step(action)
    r.buffer.add(r.obs, action, reward, 1.0 - terminated, float(terminated or truncated), next_obs)  # in KEYS order
    r.obs = next_obs
    if terminated or truncated:
        for tag, v in (
            ("episodic_return", info["episode"]["r"]),
            ("episodic_length", info["episode"]["l"]),
            ("success", float(info.get("success", 0.0))),
        ):
            r.writer.add_scalar(f"charts/{tag}", v, step)
        (r.obs, _), r.queue = r.env.reset(), []
    for _ in range(a.utd_ratio if step - a.offline_steps >= a.start_training else 0):
        batch = sample_chunks(r.buffer.tensors, *r.buffer.window, r.sampler, a.batch_size, a.action_horizon, a.gamma)
        r.stats, r.n_stats = r.stats + r.update(batch, online=True), r.n_stats + 1


def check_finite(r: Run, step: int) -> None:
    """Stop (exit 1) on a non-finite loss sum since the last log or parameter, before it is evaluated or saved."""
    finite = torch.isfinite(r.stats[:3]).tolist()  # a device sync: at log, evaluation and save time only
    bad = (
        LOSS_NAMES[finite.index(False)]
        if False in finite
        else runs.nonfinite(  # else a parameter: critic.weights.0
            {k: v.state_dict() for k, v in r.modules.items() if k != "optimizer"}
        )
    )
    runs.stop_nonfinite(bad, step, os.path.join(r.dir, "checkpoint.pt"))


def log_step(r: Run, step: int, total: int) -> None:
    """The mean losses since the last log, SPS, and the line `step i/total [phase] ...`."""
    check_finite(r, step)
    vals = (r.stats / max(r.n_stats, 1)).tolist()  # a device sync, once per log interval
    for name, v in zip(LOSS_NAMES, vals, strict=True) if r.n_stats else ():
        r.writer.add_scalar(name, v, step)
    sps = (step - r.t0[1] + 1) / (time.time() - r.t0[0])
    r.writer.add_scalar("charts/SPS", sps, step)
    print(
        f"step {step}/{total} [{'offline' if step <= r.args.offline_steps else 'online'}] SPS {sps:.1f} ETA "
        f"{(total - step) / max(sps, 1e-9) / 60:.1f} min | critic {vals[0]:.4f} drift_bc {vals[1]:.4f} drift_topk "
        f"{vals[2]:.4f} q {vals[3]:.2f} | success {r.last_success:.2f}",
        flush=True,
    )
    r.stats, r.n_stats = torch.zeros_like(r.stats), 0


def evaluate_and_log(r: Run, step: int) -> dict | None:
    """{success, return, length, q_chosen} of the policy now (episode i: env seed seed + 1000 + i offline, seed + 2000 +
    i online, as the ref code), logged when there is a writer; None if a signal abandoned the evaluation (no result)."""
    a = r.args
    check_finite(r, step)
    print(f"evaluating step {step}: {a.eval_episodes} episodes on {r.eval_envs.num_envs} envs", flush=True)
    t, video = time.time(), os.path.join(r.dir, "videos", f"eval_{step}.mp4") if a.capture_video else None
    act = make_act(r.modules["actor"], r.modules["critic"], a.act_best_of, r.stats.device)
    seed = a.seed + (1000 if step <= a.offline_steps else 2000)
    res = envs.evaluate(r.eval_envs, act, a.eval_episodes, seed, r.stop.requested, video)
    if res is None:
        print(f"evaluation at step {step} interrupted: no result", flush=True)
        return None
    print(
        f"eval step {step}: success {res['success']:.3f} return {res['return']:.3f} length {res['length']:.1f} "
        f"q {res['q_chosen']:.6f} ({a.eval_episodes} episodes, {time.time() - t:.1f} s)",
        flush=True,
    )
    r.last_success = res["success"]
    tags = {"success": "success", "episodic_return": "return", "episodic_length": "length", "q_chosen": "q_chosen"}
    for tag, k in tags.items() if r.writer is not None else ():  # --eval-only logs nothing
        r.writer.add_scalar(f"eval/{tag}", res[k], step)
    return res


def save(r: Run, step: int, eval_pending: bool = False) -> str:
    """The dfp-v1 checkpoint: all a resume needs to continue exactly (eval_pending: the evaluation of `step` is due)."""
    check_finite(r, step)  # never overwrite a good checkpoint with non-finite weights
    path, a = os.path.join(r.dir, "checkpoint.pt"), r.args
    runs.save(
        {
            "format": CKPT_FORMAT,
            "args": asdict(a),
            "env_id": r.env_id,
            "run_name": os.path.basename(r.dir),
            "step": step,
            "phase": "offline" if step <= a.offline_steps else "online",
            "shard_idx": r.shard_idx,
            "obs_dim": r.env.observation_space.shape[0],
            "act_dim": r.env.action_space.shape[0],
            "env_args": r.env_args,
            "last_success": r.last_success,
            "eval_pending": eval_pending,
            **{k: v.state_dict() for k, v in r.modules.items()},
            "rng": runs.rng_state(sampler=r.sampler),
            "buffer_online": r.buffer.online_part() if r.buffer is not None else None,
        },
        path,
    )
    return path


def interrupted(r: Run, step: int, eval_pending: bool):
    """After a signal: save (the evaluation of `step` still due if eval_pending), print the resume command, exit."""
    r.writer.close()
    saved = save(r, step, eval_pending) if r.args.save_model else None
    runs.interrupted(step, saved, r.stop.exit_code, r.eval_envs, track=r.args.track)


# ---- main: the set-up, then one loop over the offline gradient steps and the online env steps
def main():
    args = runs.parse(Args, rules)
    stop = runs.Stop()  # until armed, a signal exits at once: nothing is worth saving yet
    path = args.resume or args.checkpoint  # --resume, or --eval-only --checkpoint
    ckpt = path and runs.load_checkpoint(
        path, "--checkpoint" if args.eval_only else "--resume", CKPT_FORMAT, CKPT_KEYS, CKPT_HINT
    )
    saved = {RENAMED.get(k, k): v for k, v in ckpt["args"].items()} if args.eval_only else {}
    for k in EVAL_ONLY_ARGS if args.eval_only else ():  # the policy, env and evaluation seeds of the checkpoint
        setattr(args, k, saved.get(k, True))  # only exact_gelu can be missing: older runs had the exact GELU
    env_id = envs.resolve_env_id(args.env, args.task, minari=False)  # OGBench and Robomimic
    check(
        not ckpt or ckpt["env_id"] == env_id,
        f"checkpoint was made for {ckpt and ckpt['env_id']}, not {env_id}; pass the same --env/--task",
    )
    check(
        args.dataset_dir is None or envs.family(env_id) == "ogbench",
        "--dataset-dir is for OGBench shards; give a Robomimic file with --dataset-path",
    )
    name = ckpt["run_name"] if ckpt else args.run_name or runs.run_name(env_id, args.exp_name, args.seed)
    run_dir = runs.plan_run_dir(args.runs_dir, name, "checkpoint.pt", path, not args.eval_only or args.capture_video)
    device = runs.seed(args.seed, args.torch_deterministic, args.num_threads, args.cuda)
    sampler = torch.Generator(device=device).manual_seed(args.seed)  # chunk sampling, on the training device
    runs.check_rng_devices(ckpt["rng"] if args.resume else {}, sampler=sampler)  # a CPU run continues on the CPU only
    shards, shard_idx = envs.shard_paths(args.dataset_dir) if args.dataset_dir else [], ckpt["shard_idx"] if ckpt else 0
    check(
        not shards or shard_idx < len(shards),
        f"the checkpoint reads shard {shard_idx} but --dataset-dir holds "
        f"{len(shards)}; pass the --dataset-dir it was trained on",
    )
    data_path = shards[shard_idx] if shards else args.dataset_path
    if args.eval_only:  # no data: the env (for its sizes) is rebuilt from the checkpoint
        env, data, env_args = envs.make_env(env_id, ckpt.get("env_args"), reward_shift=-1.0), None, ckpt.get("env_args")
    else:  # Robomimic rewards are shifted by -1, offline and online
        print(f"loading {data_path or f'the {env_id} dataset'} ...", flush=True)
        env, data, _, env_args = envs.load_dataset(
            env_id, data_path, reward_shift=-1.0, min_len=args.action_horizon + 1
        )
        data = offline_tensors(data, device)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    check(
        not ckpt or (ckpt["obs_dim"], ckpt["act_dim"]) == (obs_dim, act_dim),
        f"the checkpoint's observation/action sizes {ckpt and (ckpt['obs_dim'], ckpt['act_dim'])} differ from "
        f"{env_id}'s {(obs_dim, act_dim)}; pass the env it was made for",
    )
    modules = build(args, obs_dim, act_dim, device, ckpt)
    num_eval_envs = min(args.eval_envs or os.cpu_count() or 1, args.eval_episodes)
    eval_envs = envs.make_eval_envs(
        env_id, num_eval_envs, args.action_horizon, env_args=env_args, render=args.capture_video, reward_shift=-1.0
    )  # after every check: workers start
    r = Run(
        args,
        env_id,
        run_dir,
        gym.wrappers.RecordEpisodeStatistics(env),
        env_args,
        data,
        shards,
        shard_idx,
        modules,
        sampler,
        eval_envs,
        stop,
        torch.zeros(len(LOSS_NAMES), device=device),
    )
    threads, total = torch.get_num_threads(), args.offline_steps + args.online_steps

    if args.eval_only:
        print(
            f"dfp eval-only: {env_id} | checkpoint {args.checkpoint} (step {ckpt['step']}) | device {device} | "
            f"threads {threads} | eval envs {num_eval_envs}",
            flush=True,
        )
        stop.armed = True  # a signal abandons the evaluation: no result
        res = evaluate_and_log(r, ckpt["step"])
        if res is None:
            runs.leave(stop.exit_code, eval_envs)
        print(
            f"eval-only {env_id} step {ckpt['step']}: success {res['success']:.3f} return {res['return']:.3f} "
            f"length {res['length']:.1f} q {res['q_chosen']:.6f} over {args.eval_episodes} episodes"
        )
        return eval_envs.close()

    data_name = f"{args.dataset_dir} ({len(shards)} shards)" if shards else data_path or f"the {env_id} dataset"
    print(
        f"dfp: {env_id} | data {data_name}: {len(data['observations'])} transitions | device {device} | threads "
        f"{threads} | eval envs {num_eval_envs} | run folder {run_dir} | steps {total}",
        flush=True,
    )
    start = ckpt["step"] + 1 if ckpt else 1
    r.writer = runs.tensorboard(run_dir, args, name, start, args.track and args.wandb_project_name, args.wandb_entity)
    r.update = make_update(args, *modules.values())  # (actor, critic, target_critic, ema_actor, optimizer)
    r.update = torch.compile(r.update) if args.compile else r.update  # the speed paths wrap the same update
    r.update = runs.CudaGraphUpdate(r.update) if args.cudagraphs else r.update
    r.t0 = (time.time(), start)
    if ckpt:  # continue exactly: RNG states, the replay buffer (the online env restarts its episode)
        r.last_success = ckpt["last_success"]
        runs.set_rng_state(ckpt["rng"], sampler=sampler)
        if ckpt["phase"] == "online":
            r.buffer = ReplayBuffer(data, min(args.buffer_size, len(data["observations"]) + args.online_steps))
            r.buffer.extend(ckpt["buffer_online"])
            r.obs, _ = r.env.reset(seed=args.seed + 3000 + ckpt["step"])
        print(f"resumed {name} from {args.resume} at step {ckpt['step']} ({ckpt['phase']})")

    stop.armed = True  # from here on a signal stops the run at the next step, with a checkpoint
    if ckpt and ckpt["eval_pending"]:  # the evaluation of the saved step, interrupted before
        if not evaluate_and_log(r, ckpt["step"]):
            interrupted(r, ckpt["step"], eval_pending=True)
        if args.save_model:  # done: a later resume from this checkpoint must not log it again
            save(r, ckpt["step"])
    for step in range(start, total + 1):
        if step <= args.offline_steps:
            offline_step(r, step)
        else:
            online_step(r, step)
        if step % args.log_interval == 0 or step == total:
            log_step(r, step, total)
        eval_due = step == 1 or step % args.eval_interval == 0 or step in (args.offline_steps, total)
        if eval_due and not evaluate_and_log(r, step):
            interrupted(r, step, eval_pending=True)
        if stop.requested():
            interrupted(r, step, eval_pending=False)
        if args.save_model and (step % args.save_interval == 0 or step == total):
            save(r, step)
    r.writer.close()
    eval_envs.close()
    print(f"final {env_id} step {total}: success {r.last_success:.3f} over {args.eval_episodes} episodes ({run_dir})")


if __name__ == "__main__":
    main()
