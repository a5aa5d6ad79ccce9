"""DBPO: Drift-Based Policy Optimization, PPO fine-tuning of a pretrained one-step DBP generator
(arXiv 2604.03540; docs/algorithms.md §5; user guide: docs/dbpo.md).

    python dbpo_ppo.py --checkpoint runs/<dbp run>/dbp_bc.pt   # the authors' recipe; --resume <run>/state.pt continues

dbp_bc.py's generator mu(s, z) is the mean of a Gaussian actor N(mu_theta(s, z), sigma(s)^2) in the checkpoint's
normalized action units; a rollout STORES each chunk's latent z ~ N(0, I), so the PPO ratio of A = mu + sigma * n is
exact (z's density cancels), over the executed prefix only; an anchor ||mu_theta(s, z) - mu_frozen(s, z)||^2 keeps mu
near the pretrained one. A transition = a chunk decision (reward: the sum over its executed steps). Deployment: the
mean path, 1 NFE.
"""

import copy
import functools
import itertools
import math
import os
import time
from dataclasses import dataclass, field
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
from gymnasium.wrappers.utils import RunningMeanStd
from torch.distributions import Normal

import envs
import runs
from dbp_bc import CKPT_KEYS, make_generator, parts  # the dbp-v1 format and its networks

STATE_FORMAT = "dbpo-state-v1"  # <run dir>/state.pt; the model, dbpo_ppo.pt, keeps dbp_bc.py's format dbp-v1
STATE_KEYS = (
    "env_id",
    "run_name",
    "iteration",
    "finished",
    "global_step",
    "num_envs",
    "agent",
    "actor_optimizer",
    "critic_optimizer",
    "rng",
)


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    num_threads: int = 0
    """torch CPU threads (0: torch's default; 1 is much faster on a busy shared CPU)"""
    cuda: bool = True
    """if toggled, cuda will be enabled when available"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    save_model: bool = True
    """write <run dir>/state.pt (resumable) every --save-interval iterations, on a signal and at the end; dbpo_ppo.pt"""
    save_interval: int = 10
    """write state.pt every this many iterations"""
    capture_video: bool = False
    """record episode 0 of every evaluation to <run dir>/videos/eval-iter<i>.mp4"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "drift-policies"
    """the wandb's project name"""
    wandb_entity: str | None = None
    """the entity (team) of wandb's project"""
    # Algorithm specific arguments
    checkpoint: str | None = None
    """(required) the DBP checkpoint to fine-tune: `dbp_bc.py --save-model` output, or a `dbpo_ppo.py` dbpo_ppo.pt"""
    env: str | None = None
    """the environment (None: the checkpoint's env; giving another one is refused)"""
    max_episode_steps: int | None = None
    """override the env's time limit (None: the checkpoint's, e.g. Robomimic 400, else the env's)"""
    num_iterations: int = 1500
    """PPO iterations (one: a rollout of --num-envs x --num-steps chunk decisions, then the update), evaluation
    iterations included (every --eval-interval-th from iteration 0: an evaluation, no rollout or update)"""
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
    lr_warmup_iters: int = 10
    """schedules: linear warm-up min -> peak over this many iterations, then cosine back to min over the cycle (the
    actor's starts after the critic warm-up; a --*-min-lr equal to the peak keeps that lr constant)"""
    lr_cycle_iters: int | None = None
    """length of one cosine cycle (it restarts after it); None: --num-iterations"""
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
    clip_vloss: float | None = None
    """if set, clip the value change to +-clip_vloss (off in the authors' code)"""
    ent_coef: float = 0.01
    """coefficient of the entropy bonus"""
    vf_coef: float = 0.5
    """coefficient of the value loss"""
    anchor_coef: float = 1.0
    """coefficient of the anchor loss ||mu_ft(s,z) - mu_frozen(s,z)||^2 (0 disables it)"""
    max_grad_norm: float = 0.5
    """the maximum norm for the gradient clipping (actor and critic separately)"""
    target_kl: float | None = 0.02
    """stop the update epochs early once the approximate KL exceeds this"""
    critic_warmup_iters: int = 5
    """iterations 0 .. critic_warmup_iters-1 update only the critic"""
    reward_scaling: Literal["rollout_std", "running", "none"] = "rollout_std"
    """rollout_std: r / (std(rewards of this rollout) + 1e-8) (authors' code); running: r / running std of the
    discounted return (CleanRL's NormalizeReward); none: the env's rewards"""
    bootstrap_timeouts: bool = False
    """bootstrap time-limit ends with gamma * V(final obs); off: terminal (authors' code: gym's TimeLimit `done`)"""
    freeze_normalizer: bool = False
    """keep the checkpoint's obs/action normalizer fixed; off: the actor's AdamW trains it (authors' code)"""
    logprob_min: float | None = -2.0
    """clamp the new and old (normalized) log-likelihoods below at this value before the ratio (authors' code)"""
    init_std: float = 0.03
    """initial exploration std (log-std head bias = log init_std, zero weights)"""
    min_std: float = 0.03
    """lower clamp of the std"""
    max_std: float = 0.10
    """upper clamp of the std"""
    noise_clip: float = 3.0
    """exploration noise n ~ N(0, I) is clipped to +-noise_clip before A = mu + std * n (normalized action units)"""
    normalize_logprob: bool = True
    """divide the executed-prefix log-likelihood (and entropy) by the prefix dimension Ta * act_dim"""
    eval_interval: int = 10
    """iteration i is an evaluation when i % eval_interval == 0; one more evaluation follows the last iteration"""
    eval_episodes: int = 100
    """episodes per evaluation; episode i has env seed --seed + 100000 + i and its own latent and noise stream"""
    eval_episodes_ends: int | None = None
    """episodes of the first and the final evaluation and of --eval-only (None: --eval-episodes); on Hopper 1000
    give a paired standard error of the start-to-end change of about 10"""
    eval_sampled: bool = False
    """also evaluate the sampled policy (the Gaussian PPO trains) on the same episodes, beside the mean path"""
    eval_envs: int = 10
    """parallel environments of the evaluation (worker processes when > 1; the result does not depend on it)"""
    resume: str | None = None
    """a <run dir>/state.pt to continue from (networks, optimizers, counters, RNG); envs restart episodes"""
    eval_only: bool = False
    """only evaluate --checkpoint (mean path; sampled too with --eval-sampled) and exit"""
    runs_dir: str = "runs"
    """where run folders (tensorboard, state, model, videos) go"""
    run_name: str | None = None
    """the run folder's name under --runs-dir (None: <env_id>__<exp_name>__<seed>__<unix time>)"""


# ---- the networks: a Gaussian actor around dbp_bc.py's generator, its frozen anchor copy, and the critic
def executed(chunk: torch.Tensor, obs_horizon: int, action_horizon: int) -> torch.Tensor:
    """The executed prefix A_exec = A[To-1 : To-1+Ta] of a chunk [B, Tp, act_dim] -> [B, Ta, act_dim]."""
    return chunk[:, obs_horizon - 1 : obs_horizon - 1 + action_horizon]


def prefix_log_prob(mu, std, chunk, obs_horizon, action_horizon, normalize=True):
    """log pi(A_exec | s, z) = sum_{k in prefix} sum_j log N(A_kj; mu_kj, std_kj^2) -> [B] (/ Ta * act_dim: normalize);
    unvalidated, so a NaN reaches the non-finite guard."""
    logp = executed(Normal(mu, std, validate_args=False).log_prob(chunk), obs_horizon, action_horizon).sum((1, 2))
    return logp / (action_horizon * mu.shape[-1]) if normalize else logp


def prefix_entropy(std, obs_horizon, action_horizon, normalize=True):
    """H = sum_{k in prefix} sum_j (0.5 + 0.5 log(2 pi) + log std_kj) -> [B], normalized like the log-prob."""
    ent = executed(Normal(0.0, std, validate_args=False).entropy(), obs_horizon, action_horizon).sum((1, 2))
    return ent / (action_horizon * std.shape[-1]) if normalize else ent


class DBPOAgent(nn.Module):
    """Gaussian actor around the pretrained generator, frozen anchor copy, critic, and the normalizers.

    The Gaussian, its clamp and the anchor act in the checkpoint's normalized action units u = (a - offset) / scale,
    where the authors' do: their D4RL actions are stored min-max normalized, their policy samples and clamps to
    [-1, 1] there, and their env wrapper maps [-1, 1] back to env units with the dataset's action min and max."""

    def __init__(self, ckpt, generator, anchor, init_std=0.03, min_std=0.03, max_std=0.10, train_normalizer=True):
        super().__init__()
        self.obs_horizon, self.pred_horizon = ckpt["obs_horizon"], ckpt["pred_horizon"]
        self.action_horizon, self.action_dim = ckpt["action_horizon"], ckpt["action_dim"]
        # mu_theta(s, z), trainable; mu_frozen(s, z): the pretrained weights, never updated. Both in eval mode: an
        # image encoder's crop is then fixed, so mu is a function of (s, z) and the PPO ratio exact
        self.generator, self.anchor = generator.eval(), anchor.requires_grad_(False).eval()
        # log sigma(s) = W f(s) + b with W = 0, b = log init_std: starts state-independent at init_std; f(s) the
        # generator's condition, as the authors': flatten(obs_n), or an image policy's flattened encoder features
        self.log_std_head = nn.Linear(generator.cond_dim, self.pred_horizon * self.action_dim)
        nn.init.zeros_(self.log_std_head.weight)
        nn.init.constant_(self.log_std_head.bias, math.log(init_std))
        self.log_std_min, self.log_std_max = math.log(min_std), math.log(max_std)
        # critic V(s): MLP 3x256 Mish on the low-dim observation history normalized by the checkpoint's fixed
        # normalizer, as the authors' env wrappers hand it to their critic (dataset min/max to [-1, 1]); an image
        # policy's critic reads the low-dim part only (the authors' critic reads low-dim state; no pixels)
        layout = ckpt.get("generator_kwargs", {}).get("image_layout")
        self.critic_dim = ckpt["obs_dim"] if layout is None else layout["low_dim"]  # the obs dims it reads
        dims = [self.obs_horizon * self.critic_dim, 256, 256, 256]
        layers = [m for d_in, d_out in itertools.pairwise(dims) for m in (nn.Linear(d_in, d_out), nn.Mish())]
        self.critic = nn.Sequential(*layers, nn.Linear(dims[-1], 1))
        # an mse-trained DBP ignores z (it was trained with z = 0): keep z = 0 so mu is what was trained
        self.zero_latent = ckpt.get("loss") == "mse"
        tensor = functools.partial(torch.as_tensor, dtype=torch.float32)
        fixed = {**ckpt, **ckpt.get("dbpo", {}).get("anchor_stats", {})}  # a dbpo_ppo.pt: the original normalizer
        for k in ("obs_offset", "obs_scale", "action_offset", "action_scale"):
            self.register_buffer(k, tensor(fixed[k]))  # fixed: x_n = (x - offset) / scale; u = a_n
        self.register_buffer("critic_obs_offset", self.obs_offset.clone())  # the critic's input: fixed, never trained
        self.register_buffer("critic_obs_scale", self.obs_scale.clone())
        # the clamp in u: the authors' act_min, act_max = -1, 1 (the data's min and max), within the env's bounds
        low, high = tensor(ckpt["action_low"]), tensor(ckpt["action_high"])
        self.register_buffer("u_low", ((low - self.action_offset) / self.action_scale).clamp(min=-1.0))
        self.register_buffer("u_high", ((high - self.action_offset) / self.action_scale).clamp(max=1.0))
        # the actor's normalizer, as the authors' LinearNormalizer in their deep-copied actor: x_n = x * gain + bias,
        # Parameters trained by the actor's AdamW (or frozen); a dbpo_ppo.pt starts from its trained one
        for k in ("obs", "action"):
            gain = 1 / tensor(ckpt[f"{k}_scale"])
            bias = -tensor(ckpt[f"{k}_offset"]) * gain
            setattr(self, f"{k}_gain", nn.Parameter(gain, requires_grad=train_normalizer))
            setattr(self, f"{k}_bias", nn.Parameter(bias, requires_grad=train_normalizer))

    def actor_parameters(self) -> list:
        normalizer = [p for p in (self.obs_gain, self.obs_bias, self.action_gain, self.action_bias) if p.requires_grad]
        return [*self.generator.parameters(), *self.log_std_head.parameters(), *normalizer]

    def normalize_obs(self, obs: torch.Tensor) -> torch.Tensor:
        return obs * self.obs_gain + self.obs_bias  # [B, To, obs_dim]

    def sample_latent(self, batch: int) -> torch.Tensor:
        shape = (batch, self.pred_horizon, self.action_dim)  # dim(z) = dim(chunk)
        return (torch.zeros if self.zero_latent else torch.randn)(shape, device=self.obs_offset.device)

    def get_value(self, obs: torch.Tensor) -> torch.Tensor:
        low_dim = (obs - self.critic_obs_offset) / self.critic_obs_scale  # [B, To, obs_dim]
        return self.critic(low_dim[..., : self.critic_dim].flatten(1)).squeeze(-1)  # [B]

    def dist_params(self, obs: torch.Tensor, z: torch.Tensor):
        """mu(s, z) [B, Tp, act_dim] in u from one generator pass; std(s) = exp(clamp(log-std head(f(s)))), f(s) the
        generator's condition (an image policy's encoder features, computed once). obs: raw [B, To, obs_dim]."""
        obs_n = self.normalize_obs(obs)
        encoder, backbone = parts(self.generator)  # generator(obs_n, z) = backbone(encoder(obs_n), z)
        features = encoder(obs_n)  # [B, To, F]: an image policy's encoder features, else obs_n
        a = (backbone(features, z) - self.action_bias) / self.action_gain  # env units: the actor's a_n -> a
        mu = (a - self.action_offset) / self.action_scale  # u = (a - offset) / scale: the fixed normalizer's
        log_std = self.log_std_head(features.flatten(1)).view_as(mu)
        return mu, log_std.clamp(self.log_std_min, self.log_std_max).exp()

    def anchor_mean(self, obs: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """mu_frozen(s, z) in u: the pretrained generator on the fixed normalizer's obs_n [B, Tp, act_dim]."""
        return self.anchor((obs - self.obs_offset) / self.obs_scale, z)

    @torch.no_grad()
    def act(self, obs: torch.Tensor, z: torch.Tensor, noise=None, noise_clip=3.0, normalize_logprob=True):
        """A = clip(mu + std * clip(noise, +-noise_clip)), or without noise the mean path clip(mu), in u: (chunk [B, Tp,
        act_dim], log pi [B])."""
        mu, std = self.dist_params(obs, z)
        chunk = mu if noise is None else mu + std * noise.clamp(-noise_clip, noise_clip)
        chunk = chunk.clamp(self.u_low, self.u_high)
        return chunk, prefix_log_prob(mu, std, chunk, self.obs_horizon, self.action_horizon, normalize_logprob)

    def env_actions(self, chunk: torch.Tensor) -> np.ndarray:
        """A chunk in u -> its executed prefix in env units a = u * scale + offset [B, Ta, act_dim] (numpy)."""
        u = executed(chunk, self.obs_horizon, self.action_horizon)  # [B, Ta, act_dim]
        return (u * self.action_scale + self.action_offset).numpy(force=True)


# ---- the losses and the update
def dbpo_loss(agent: DBPOAgent, obs, z, chunk, old_logprob, advantages, returns, old_values, args: Args):
    """L = L_clip + vf_coef * L_V - ent_coef * H + anchor_coef * L_anchor on one minibatch; returns (loss, info)."""
    To, Ta = agent.obs_horizon, agent.action_horizon
    mu, std = agent.dist_params(obs, z)  # raw obs, stored z: pi_theta(A|s,z) / pi_old(A|s,z) is the exact PPO ratio
    new_logprob = prefix_log_prob(mu, std, chunk, To, Ta, args.normalize_logprob)
    entropy = prefix_entropy(std, To, Ta, args.normalize_logprob)
    if args.logprob_min is not None:  # authors' code: both sides clamped below; where both bind, ratio = 1, no gradient
        new_logprob, old_logprob = new_logprob.clamp(min=args.logprob_min), old_logprob.clamp(min=args.logprob_min)
    logratio = new_logprob - old_logprob
    ratio = logratio.exp()  # pi_theta / pi_old
    with torch.no_grad():
        old_approx_kl = (-logratio).mean()
        approx_kl = ((ratio - 1) - logratio).mean()  # http://joschu.net/blog/kl-approx.html
        clipfrac = ((ratio - 1.0).abs() > args.clip_coef).float().mean()
    if args.norm_adv:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    # clipped surrogate: max(-A r, -A clip(r, 1-eps, 1+eps))
    pg_loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)).mean()
    new_values = agent.get_value(obs)
    v_err = (new_values - returns) ** 2  # L_V = 0.5 mean (V - R)^2, or with the clipped value's error where larger
    if args.clip_vloss is not None:
        v_err = torch.max(
            v_err, (old_values + (new_values - old_values).clamp(-args.clip_vloss, args.clip_vloss) - returns) ** 2
        )
    v_loss = 0.5 * v_err.mean()
    # anchor: ||mu_theta(s,z) - mu_frozen(s,z)||^2, same stored z, mean over the whole chunk (authors' code: mse)
    with torch.no_grad():
        mu_frozen = agent.anchor_mean(obs, z)
    anchor_loss = ((mu - mu_frozen) ** 2).mean()
    loss = pg_loss - args.ent_coef * entropy.mean() + args.vf_coef * v_loss + args.anchor_coef * anchor_loss
    info = {
        "policy_loss": pg_loss.detach(),
        "value_loss": v_loss.detach(),
        "entropy": entropy.mean().detach(),
        "anchor_loss": anchor_loss.detach(),
        "approx_kl": approx_kl,
        "old_approx_kl": old_approx_kl,
        "clipfrac": clipfrac,
        "std": executed(std, To, Ta).mean().detach(),
        "ratio": ratio.detach(),
        "loss": loss.detach(),
    }
    return loss, info


def update(agent: DBPOAgent, actor_optimizer, critic_optimizer, minibatch, args: Args, update_actor: bool):
    """One gradient step on one minibatch (the critic only, in its warm-up); a NaN/inf loss changes nothing."""
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
    """GAE: rewards, values, dones [T, N] (rewards hold truncations' gamma V(final obs)), next_value [N] -> (A, R)."""
    advantages, lastgaelam = torch.zeros_like(rewards), 0.0
    for t in reversed(range(rewards.shape[0])):
        nextvalues = next_value if t == rewards.shape[0] - 1 else values[t + 1]
        nextnonterminal = 1.0 - dones[t]
        delta = rewards[t] + gamma * nextvalues * nextnonterminal - values[t]  # delta_t = r_t + gamma V(s') - V(s)
        advantages[t] = lastgaelam = delta + gamma * gae_lambda * nextnonterminal * lastgaelam
    return advantages, advantages + values


def rollout_std_scaling(rewards: np.ndarray) -> np.ndarray:
    """Authors' code: r / (std(r over the whole rollout [T, N]) + 1e-8)."""
    return rewards / (rewards.std() + 1e-8)


class RunningRewardScaler(RunningMeanStd):
    """--reward-scaling running (CleanRL's NormalizeReward): r / std(G), G_t = gamma G_{t-1} + r_t per env (0 after an
    episode's end), std(G) running over the run, updated with a whole rollout [T, N] first (per step, the first returns
    would have std ~ 0). Its state (vars) is saved in state.pt."""

    def __init__(self, gamma: float, num_envs: int):
        super().__init__()
        self.gamma, self.returns = gamma, np.zeros(num_envs)  # G per env [N]

    def __call__(self, rewards: np.ndarray, dones: np.ndarray) -> np.ndarray:
        returns = np.zeros_like(rewards)  # [T, N]
        for t in range(len(rewards)):
            returns[t] = self.returns = self.returns * self.gamma + rewards[t]
            self.returns[dones[t]] = 0.0
        self.update(returns.ravel())
        return rewards / np.sqrt(self.var + 1e-8)


def scheduled_lr(k: int, peak: float, low: float, warmup: int, cycle: int) -> float:
    """The lr after k steps (authors' CosineAnnealingWarmupRestarts): per cycle, linear low -> peak, then cosine to low
    (low = peak: constant)."""
    k %= cycle
    if k < warmup:
        return low + (peak - low) * k / warmup
    return low + (peak - low) * (1 + math.cos(math.pi * (k - warmup) / (cycle - warmup))) / 2  # (1 + cos) / 2: 1 -> 0


# ---- acting: the evaluations' policies (envs.evaluate's act)
def eval_act(agent: DBPOAgent, sampled: bool, noise_clip: float, obs: np.ndarray, gens: list) -> np.ndarray:
    """The mean path A = clip(mu(s, z)), or sampled A = clip(mu + std * clip(n, +-noise_clip)), 1 NFE; z (and n) drawn
    from each episode's generator (its batch does not matter): obs [B, To, O] -> executed [B, Ta, A] env units."""
    shape, device = (agent.pred_horizon, agent.action_dim), agent.obs_offset.device
    z = torch.stack([torch.zeros(shape) if agent.zero_latent else torch.randn(shape, generator=g) for g in gens])
    noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device) if sampled else None  # [B, Tp, A]
    chunk, _ = agent.act(torch.as_tensor(obs, device=device), z.to(device), noise, noise_clip)
    return agent.env_actions(chunk)


# ---- the training loop: main() and its steps, in the order it runs them
def rules(args: Args):
    """Every flag's range for runs.parse (a NaN fails every comparison), then the flags' combinations."""
    unset_or = lambda test: lambda v: v is None or test(v)  # noqa: E731  (an Optional flag may stay unset)
    sizes = ("num_iterations", "num_envs", "num_steps", "update_epochs", "minibatch_size", "max_episode_steps")
    intervals = ("eval_interval", "save_interval", "lr_cycle_iters", "eval_episodes", "eval_episodes_ends", "eval_envs")
    rates = ("actor_lr", "actor_min_lr", "critic_lr", "critic_min_lr", "max_grad_norm", "target_kl")
    ppo = ("clip_coef", "clip_vloss", "noise_clip", "min_std", "max_std")
    coefs = ("weight_decay", "ent_coef", "vf_coef", "anchor_coef")
    yield from runs.ranges(
        args,
        {
            "> 0": (unset_or(lambda v: v > 0), sizes + intervals),
            "a finite number > 0": (unset_or(lambda v: 0 < v < math.inf), rates + ppo),
            ">= 0": (lambda v: v >= 0, ("seed", "num_threads", "critic_warmup_iters", "lr_warmup_iters")),
            "a finite number >= 0": (lambda v: 0 <= v < math.inf, coefs),
            "a finite number": (unset_or(math.isfinite), ("logprob_min", "init_std")),
            "in (0, 1]": (lambda v: 0 < v <= 1, ("gamma",)),
            "in [0, 1]": (lambda v: 0 <= v <= 1, ("gae_lambda",)),
        },
    )
    yield (
        args.actor_min_lr <= args.actor_lr and args.critic_min_lr <= args.critic_lr,
        "the --*-min-lr must not exceed the peak",
    )
    yield (
        args.min_std <= args.init_std <= args.max_std,
        f"need 0 < --min-std <= --init-std <= --max-std, got {args.min_std}, {args.init_std}, {args.max_std}",
    )
    yield (
        (args.eval_episodes_ends or args.eval_episodes) >= args.eval_episodes,
        "--eval-episodes-ends must be at least --eval-episodes (every evaluation is paired with the first one)",
    )
    yield args.checkpoint is not None, "--checkpoint is required: the DBP model to fine-tune (dbp_bc.py --save-model)"
    yield not (args.eval_only and args.resume), "--eval-only evaluates --checkpoint; drop --resume"


def load_inputs(args: Args) -> tuple:
    """(ckpt, env_id, state): --checkpoint (dbp-v1, or a dbpo_ppo.pt) and --resume's dbpo-state-v1 state, checked."""
    path = args.checkpoint
    ckpt = runs.read(path, "--checkpoint", hint := "pass the dbp_bc.pt written by dbp_bc.py --save-model")
    runs.check(
        not isinstance(ckpt, dict) or ckpt.get("format") != STATE_FORMAT,
        f"{path} is a dbpo_ppo.py training state: continue it with --resume {path}",
    )
    runs.check_format(ckpt, f"--checkpoint {path}", "dbp-v1", CKPT_KEYS, hint)
    To, Tp, Ta = ckpt["obs_horizon"], ckpt["pred_horizon"], ckpt["action_horizon"]
    runs.check(
        1 <= To <= Tp and Ta >= 1 and To - 1 + Ta <= Tp, f"{path} has inconsistent horizons To={To}, Tp={Tp}, Ta={Ta}"
    )
    runs.check((bad := runs.nonfinite(ckpt)) is None, f"{path} contains NaN or infinite values ({bad}); retrain it")
    env_id = envs.resolve_env_id(ckpt["env_id"], gym_ids=envs.LOCOMOTION_ENVS)
    runs.check(args.env in (None, env_id), f"the checkpoint was trained on {env_id}, not {args.env}; drop --env")
    if args.resume is None:
        return ckpt, env_id, None
    state = runs.load_checkpoint(
        args.resume, "--resume", STATE_FORMAT, STATE_KEYS, "pass the <run dir>/state.pt of an earlier dbpo_ppo.py run"
    )
    for ok, msg in (
        (state["env_id"] == env_id, f"fine-tunes {state['env_id']}, but --checkpoint is for {env_id}"),
        (state["num_envs"] == args.num_envs, f"ran with --num-envs {state['num_envs']}; resume with the same value"),
        (
            state["iteration"] < args.num_iterations or not state["finished"],
            f"already finished {state['iteration']} iterations; raise --num-iterations to continue",
        ),
        (runs.nonfinite(state["agent"]) is None, "contains NaN or infinite weights"),
        (args.run_name in (None, state["run_name"]), f"belongs to run {state['run_name']}; drop --run-name"),
    ):
        runs.check(ok, f"{args.resume} {msg}")
    return ckpt, env_id, state


def build_agent(ckpt: dict, state: dict | None, args: Args, device="cpu"):
    """(agent, (actor, critic) optimizers, reward scaler) of --checkpoint, or of --resume's state (RNG streams too)."""
    try:
        generator, anchor = (make_generator(ckpt["backbone"], **ckpt["generator_kwargs"]) for _ in range(2))
    except (TypeError, ValueError) as e:
        runs.fail(f"--checkpoint {args.checkpoint}: its backbone/generator_kwargs make no generator ({runs.why(e)})")
    hint = f"--checkpoint {args.checkpoint} is damaged; retrain it"  # a dbpo_ppo.pt anchors to the original DBP:
    runs.load_states({"model": generator, "anchor_model": anchor}, {"anchor_model": ckpt["model"], **ckpt}, hint)
    agent = DBPOAgent(ckpt, generator, anchor, args.init_std, args.min_std, args.max_std, not args.freeze_normalizer)
    agent = agent.to(device)
    optimizers = (
        torch.optim.AdamW(agent.actor_parameters(), lr=args.actor_lr, weight_decay=args.weight_decay),
        torch.optim.AdamW(agent.critic.parameters(), lr=args.critic_lr, weight_decay=args.weight_decay),
    )
    scaler = RunningRewardScaler(args.gamma, args.num_envs)
    if "dbpo" in ckpt:  # a dbpo_ppo.pt: continue with its log-std head and critic
        runs.load_states({"log_std_head": agent.log_std_head, "critic": agent.critic}, ckpt["dbpo"], hint)
    if state is not None:
        runs.load_states(
            {"agent": agent, "actor_optimizer": optimizers[0], "critic_optimizer": optimizers[1]},
            state,
            f"{args.resume} is not a run of --checkpoint {args.checkpoint}",
        )
        runs.set_rng_state(state["rng"])
        vars(scaler).update(state.get("reward_scaler", {}))  # states from before --reward-scaling running: none
    return agent, optimizers, scaler


def evaluate_and_log(agent, eval_envs, args, stop, episodes, writer=None, iteration=0, global_step=0, video=None):
    """The mean path, and with --eval-sampled the sampled policy, on `episodes` seeded episodes (envs.evaluate): logged
    as eval/* and eval_sampled/* at step `iteration`, each episode to eval_episodes.csv and eval_episodes_sampled.csv
    (envs.write_episodes; scripts/dbpo_report.py pairs them). Returns the line."""
    lines = []
    for policy in ("mean path", "sampled") if args.eval_sampled else ("mean path",):
        sampled = policy == "sampled"
        act = functools.partial(eval_act, agent, sampled, args.noise_clip)
        res = envs.evaluate(eval_envs, act, episodes, args.seed + 100_000, stop.requested, None if sampled else video)
        stop.check()  # an interrupted evaluation (None) is no result: raises before anything is logged
        p = res["success"]  # NaN without info['success'] (locomotion)
        se = math.sqrt(p * (1 - p) / episodes)  # the standard error of a success rate
        if writer:  # each episode's row: evaluations on the same seeds are paired
            stats = dict(
                episodic_return=res["return"], episodic_length=res["length"], success_rate=p, success_stderr=se
            )
            for key, value in {**stats, "env_steps": global_step}.items():
                writer.add_scalar(f"{'eval_sampled' if sampled else 'eval'}/{key}", value, iteration)
            csv = os.path.join(writer.log_dir, f"eval_episodes{'_sampled' if sampled else ''}.csv")
            envs.write_episodes(csv, res, iteration, global_step, args.seed + 100_000)
        lines.append(
            f"return {res['return']:.4f} | length {res['length']:.2f} | success {p:.4f} +- {se:.4f} "
            f"({episodes} episodes, {policy})"
        )
    return " || ".join(lines)


def rollout(agent: DBPOAgent, train_envs, next_obs, args: Args, stop):
    """--num-steps decisions per env: (next obs, the rollout [T, N, ...], (env steps, episode returns, successes))."""
    T, N, device = args.num_steps, args.num_envs, agent.obs_offset.device
    chunk = (agent.pred_horizon, agent.action_dim)
    obs = (agent.obs_horizon, next_obs.shape[-1])
    # z is stored, so the ratio is exact; bootstrap: gamma V(final obs) of truncations
    shapes = dict(obs=obs, z=chunk, chunk=chunk, logprob=(), value=(), bootstrap=())
    buf = {k: torch.zeros((T, N, *shape), device=device) for k, shape in shapes.items()}
    buf |= {"raw_reward": np.zeros((T, N)), "done": np.zeros((T, N), bool)}  # env rewards, summed over each chunk
    steps_before, returns, successes = sum(train_envs.get_attr("executed_steps")), [], []
    for step in range(T):
        stop.check()
        obs = torch.as_tensor(next_obs, device=device)  # [N, To, obs_dim] raw: the loss normalizes it (current gain)
        with torch.no_grad():
            z = agent.sample_latent(N)  # [N, Tp, act_dim]
            chunk, logprob = agent.act(obs, z, torch.randn_like(z), args.noise_clip, args.normalize_logprob)
            buf["value"][step] = agent.get_value(obs)
        buf["obs"][step], buf["z"][step], buf["chunk"][step], buf["logprob"][step] = obs, z, chunk, logprob
        # TRY NOT TO MODIFY: execute the game and log data (SAME_STEP autoreset: ended episodes' infos["final_obs"])
        next_obs, reward, terminations, truncations, infos = train_envs.step(agent.env_actions(chunk))
        buf["raw_reward"][step], buf["done"][step] = reward, terminations | truncations
        if "final_obs" in infos:
            # --bootstrap-timeouts: on truncation, not termination, r_t += gamma * V(final obs); the episode ends here
            truncated_only = np.flatnonzero(infos["_final_obs"] & truncations & ~terminations)
            if truncated_only.size and args.bootstrap_timeouts:
                final_obs = torch.as_tensor(np.stack(infos["final_obs"][truncated_only]), device=device)
                with torch.no_grad():
                    buf["bootstrap"][step, truncated_only] = args.gamma * agent.get_value(final_obs)
            final = infos["final_info"]
            returns += [float(final["episode"]["r"][i]) for i in np.flatnonzero(final["_episode"])]
            successes += [float(final["success"][i]) for i in np.flatnonzero(final.get("_success", []))]
    return next_obs, buf, (sum(train_envs.get_attr("executed_steps")) - steps_before, returns, successes)


def compute_advantages(agent: DBPOAgent, buf: dict, next_obs, scaler: RunningRewardScaler, args: Args):
    """Scaled rewards (--reward-scaling) + the truncation bootstraps (V in scaled units), then GAE: (adv, returns)."""
    raw = buf["raw_reward"]  # float64 [T, N]
    if not np.isfinite(raw).all():
        raise FloatingPointError("env reward")
    scale = {"rollout_std": rollout_std_scaling, "running": lambda r: scaler(r, buf["done"]), "none": lambda r: r}
    rewards = torch.as_tensor(scale[args.reward_scaling](raw), dtype=torch.float32, device=buf["value"].device)
    with torch.no_grad():  # bootstrap value if not done
        next_value = agent.get_value(torch.as_tensor(next_obs, device=rewards.device))  # [N]
        dones = torch.as_tensor(buf["done"], dtype=torch.float32, device=rewards.device)  # [T, N]
        return compute_gae(rewards + buf["bootstrap"], buf["value"], dones, next_value, args.gamma, args.gae_lambda)


def ppo_update(agent: DBPOAgent, optimizers, batch: list, iteration: int, args: Args, stop):
    """This iteration's learning rates, then --update-epochs epochs of minibatches (stopped once approx KL >
    --target-kl): the means of the minibatches' infos. A NaN/inf loss term or parameter raises FloatingPointError."""
    cycle = args.lr_cycle_iters or args.num_iterations  # the authors' schedulers step once per iteration
    actor_k = max(iteration - args.critic_warmup_iters, 0)  # the actor's schedule starts after the critic warm-up
    for opt, k, peak, low in (
        (optimizers[0], actor_k, args.actor_lr, args.actor_min_lr),
        (optimizers[1], iteration, args.critic_lr, args.critic_min_lr),
    ):
        opt.param_groups[0]["lr"] = scheduled_lr(k, peak, low, args.lr_warmup_iters, cycle)  # one group each
    batch_size, infos = len(batch[0]), []
    minibatch_size = min(args.minibatch_size, batch_size)
    starts = range(0, batch_size, minibatch_size)  # the minibatches of one epoch
    minibatches = (  # lazily: an early stop draws no further permutation
        order[start : start + minibatch_size]
        for _ in range(args.update_epochs)
        for order in [torch.randperm(batch_size, device=batch[0].device)]  # one permutation per epoch
        for start in starts
    )
    for mb in minibatches:
        stop.check()
        info = update(agent, *optimizers, [x[mb] for x in batch], args, iteration >= args.critic_warmup_iters)
        if not torch.isfinite(info["loss"]):
            raise FloatingPointError(next(k for k in info if not torch.isfinite(info[k]).all()))  # the first bad term
        infos.append(info)
        if args.target_kl is not None and info["approx_kl"] > args.target_kl:  # too far from pi_old: stop the epochs
            break
    if (bad := runs.nonfinite(dict(agent.named_parameters()))) is not None:
        raise FloatingPointError(f"parameter {bad}")
    means = {k: torch.stack([i[k] for i in infos]).float().mean().item() for k in infos[0] if k != "ratio"}
    epochs = math.ceil(len(infos) / len(starts))
    return {
        **means,
        "update_epochs_done": epochs,
        "minibatches_done": len(infos),
        "approx_kl_last": infos[-1]["approx_kl"].item(),
    }


@dataclass
class Clock:
    """Wall-clock times of this process's iterations: the SPS, the ETA and the final timing line."""

    first_iteration: int
    first_step: int
    start: float = field(default_factory=time.time)
    rollout: float = 0.0  # seconds in rollouts, summed
    update: float = 0.0  # seconds in updates, summed
    last_rollout: float = 0.0  # seconds of the latest rollout


def log_iteration(writer, iteration: int, args: Args, optimizers, stats, batch, buf, episodes, global_step, clock):
    """The iteration's tensorboard scalars (step = iteration) and its `iter i/n ...` line."""
    steps, returns, successes = episodes
    y_true, y_pred = batch[5].numpy(force=True), batch[6].numpy(force=True)  # returns, values
    explained_var = np.nan if np.var(y_true) == 0 else 1 - np.var(y_true - y_pred) / np.var(y_true)
    elapsed = time.time() - clock.start
    sps = int((global_step - clock.first_step) / elapsed)
    scalars = {
        "charts/env_steps": global_step,
        "charts/actor_lr": optimizers[0].param_groups[0]["lr"],
        "charts/critic_lr": optimizers[1].param_groups[0]["lr"],
        "charts/std": stats["std"],
        "charts/advantage_std": batch[4].std().item(),
        "charts/reward_mean": buf["raw_reward"].mean(),
        "losses/explained_variance": explained_var,
        "charts/SPS": sps,
        "charts/rollout_SPS": steps / clock.last_rollout,
        **{f"losses/{k}": v for k, v in stats.items() if k not in ("std", "loss")},
        **({"charts/episodic_return": np.mean(returns)} if returns else {}),
        **({"charts/success_rate": np.mean(successes)} if successes else {}),
    }
    for key, value in scalars.items():
        writer.add_scalar(key, value, iteration)
    eta = elapsed / (iteration - clock.first_iteration + 1) * (args.num_iterations - iteration - 1)
    ret = f"{np.mean(returns):.2f}" if returns else "n/a"
    success = f" | success {np.mean(successes):.3f}" if successes else ""
    phase = "actor+critic" if iteration >= args.critic_warmup_iters else "critic warm-up"
    print(
        f"iter {iteration}/{args.num_iterations} | env steps {global_step} | SPS {sps} | return {ret}{success} | kl "
        f"{stats['approx_kl']:.4f} | anchor {stats['anchor_loss']:.2e} | std {stats['std']:.3f} | "
        f"ev {explained_var:.2f} | {phase} | ETA {eta / 60:.1f} min",
        flush=True,
    )


def save_model(ckpt: dict, agent: DBPOAgent, args: Args, global_step: int, path: str) -> None:
    """dbpo_ppo.pt: dbp-v1 with the fine-tuned generator and normalizer, the original ones (anchor_model, anchor_stats),
    the log-std head and critic."""
    dropped = ("train_model", "optimizer", "ema_decay_step", "rng", "global_time")  # dbp_bc.py's training state
    model = {k: v for k, v in ckpt.items() if k not in dropped}
    for k in ("obs", "action"):  # the actor's x_n = x * gain + bias as dbp-v1's x_n = (x - offset) / scale
        gain, bias = (getattr(agent, f"{k}_{n}").detach().cpu() for n in ("gain", "bias"))
        model |= {f"{k}_scale": 1 / gain, f"{k}_offset": -bias / gain}
    stats = {k: getattr(agent, k).cpu() for k in ("obs_offset", "obs_scale", "action_offset", "action_scale")}
    nets = ("generator", "anchor", "log_std_head", "critic")
    cpu = {n: {k: v.cpu() for k, v in getattr(agent, n).state_dict().items()} for n in nets}
    dbpo = {"args": vars(args), "global_step": global_step, "anchor_stats": stats}
    dbpo |= {n: cpu[n] for n in ("log_std_head", "critic")}
    runs.save({**model, "model": cpu["generator"], "anchor_model": cpu["anchor"], "dbpo": dbpo}, path)


def main():
    args = runs.parse(Args, rules)
    ckpt, env_id, state = load_inputs(args)
    run_name = state["run_name"] if state else args.run_name or runs.run_name(env_id, args.exp_name, args.seed)
    writes = not args.eval_only or args.capture_video  # --eval-only writes nothing but its video
    run_dir = runs.plan_run_dir(args.runs_dir, run_name, "state.pt", args.resume) if writes else None

    device = runs.seed(args.seed, args.torch_deterministic, args.num_threads, args.cuda)  # TRY NOT TO MODIFY: seeding
    # env setup: ChunkEnvs (obs [To, O], action: the executed [Ta, A]); a Robomimic env from the checkpoint's env_args
    To, Tp, Ta = ckpt["obs_horizon"], ckpt["pred_horizon"], ckpt["action_horizon"]
    max_steps = args.max_episode_steps or ckpt.get("max_episode_steps")
    env_kwargs = dict(env_args=ckpt.get("env_args"), max_episode_steps=max_steps)
    ends = args.eval_episodes_ends or args.eval_episodes  # episodes of the first and the final evaluation
    eval_envs = envs.make_eval_envs(env_id, min(args.eval_envs, ends), Ta, To, render=args.capture_video, **env_kwargs)
    eval_envs.reset(seed=args.seed)  # every env once: an env idle in a smaller evaluation is stepped after a reset
    obs_dim, act_dim = eval_envs.single_observation_space.shape[-1], eval_envs.single_action_space.shape[-1]
    runs.check(
        (obs_dim, act_dim) == (ckpt["obs_dim"], ckpt["action_dim"]),
        f"the checkpoint expects obs/action dims {ckpt['obs_dim']}/{ckpt['action_dim']} but {env_id} has "
        f"{obs_dim}/{act_dim}",
    )
    agent, optimizers, scaler = build_agent(ckpt, state, args, device)
    start_iteration, global_step = (state["iteration"], state["global_step"]) if state else (0, 0)
    stop = runs.Stop()
    stop.armed = not args.eval_only  # from here a signal stops the run within a step, saved (--eval-only: at once)
    print(
        f"dbpo_ppo: {env_id} | checkpoint {args.checkpoint} ({ckpt['backbone']}, To={To} Tp={Tp} Ta={Ta}) | device "
        f"{device} | threads {torch.get_num_threads()} | run folder {run_dir or '- (eval only)'}",
        flush=True,
    )

    def video(name: str) -> str | None:  # <run dir>/videos/<name>.mp4 with --capture-video
        return os.path.join(run_dir, "videos", f"{name}.mp4") if args.capture_video else None

    if args.eval_only:
        print(f"final eval {env_id}: {evaluate_and_log(agent, eval_envs, args, stop, ends, video=video('eval-only'))}")
        runs.leave(0, eval_envs)

    writer = runs.tensorboard(
        run_dir,
        args,
        run_name,
        start=start_iteration if state else 1,  # step = iteration: a resume purges the steps it repeats
        wandb_project=args.track and args.wandb_project_name,
        wandb_entity=args.wandb_entity,
    )
    if state is not None:
        print(f"resumed {run_name} at iteration {start_iteration} ({global_step} env steps)")
    train_envs = gym.vector.SyncVectorEnv(
        [functools.partial(envs.make_chunk_env, env_id, Ta, To, **env_kwargs)] * args.num_envs,
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    state_path, model_path = os.path.join(run_dir, "state.pt"), os.path.join(run_dir, "dbpo_ppo.pt")

    def snapshot(iteration: int, global_step: int, finished=False) -> dict:  # all a --resume needs, detached (state.pt)
        nets = {"agent": agent, "actor_optimizer": optimizers[0], "critic_optimizer": optimizers[1]}
        return {
            "format": STATE_FORMAT,
            "env_id": env_id,
            "run_name": run_name,
            "num_envs": args.num_envs,
            "args": vars(args),
            "iteration": iteration,
            "finished": finished,
            "global_step": global_step,
            "rng": runs.rng_state(),
            "reward_scaler": copy.deepcopy(vars(scaler)),
            **copy.deepcopy({k: v.state_dict() for k, v in nets.items()}),
        }

    def evaluation(iteration: int, episodes: int) -> str:
        video_path = video(f"eval-iter{iteration}")
        return evaluate_and_log(agent, eval_envs, args, stop, episodes, writer, iteration, global_step, video_path)

    clock = Clock(start_iteration, global_step)
    next_obs, _ = train_envs.reset(seed=args.seed + start_iteration)
    last_good, iteration, result = None, start_iteration, None
    try:
        for iteration in range(start_iteration, args.num_iterations):
            last_good = snapshot(iteration, global_step)  # what an interruption inside this iteration saves
            if iteration % args.eval_interval == 0:  # an evaluation iteration: no update
                result = evaluation(
                    iteration, ends if iteration in (0, args.num_iterations - 1) else args.eval_episodes
                )
                print(f"eval at iteration {iteration}: {result}", flush=True)
            else:
                t0 = time.time()
                next_obs, buf, episodes = rollout(agent, train_envs, next_obs, args, stop)
                buf["advantage"], buf["return"] = compute_advantages(agent, buf, next_obs, scaler, args)
                global_step, t1 = global_step + episodes[0], time.time()
                # [T * N, ...] each, in the order of dbpo_loss's arguments
                batch = [buf[k].flatten(0, 1) for k in ("obs", "z", "chunk", "logprob", "advantage", "return", "value")]
                stats = ppo_update(agent, optimizers, batch, iteration, args, stop)
                clock.last_rollout = t1 - t0
                clock.rollout += t1 - t0
                clock.update += time.time() - t1
                log_iteration(writer, iteration, args, optimizers, stats, batch, buf, episodes, global_step, clock)
            if (iteration + 1) % args.save_interval == 0 and args.save_model:
                runs.save(snapshot(iteration + 1, global_step), state_path)
        iteration, last_good = args.num_iterations, snapshot(args.num_iterations, global_step)
        if (iteration - 1) % args.eval_interval != 0 or result is None:  # the last iteration trained: evaluate it
            result = evaluation(iteration, ends)
    except runs.Interrupted:  # saved: the state as of the start of the interrupted iteration, which a resume repeats
        if args.save_model:
            runs.save(last_good, state_path)
        runs.interrupted(
            iteration, args.save_model and state_path, stop.exit_code, train_envs, eval_envs, writer, track=args.track
        )
    except FloatingPointError as e:  # a non-finite reward, loss term or parameter: the last good state stays
        runs.stop_nonfinite(str(e), iteration, state_path, "Try a lower --actor-lr / --critic-lr")

    steps = global_step - clock.first_step
    print(
        f"timing: rollout {steps / max(clock.rollout, 1e-9):.1f} env steps/s, update "
        f"{steps / max(clock.update, 1e-9):.1f} env steps/s ({steps} env steps, {clock.rollout:.1f}s rollout, "
        f"{clock.update:.1f}s update; busy CPUs slow both)"
    )
    if args.save_model:
        runs.save(snapshot(args.num_iterations, global_step, finished=True), state_path)
        save_model(ckpt, agent, args, global_step, model_path)
    print(
        f"final: {args.num_iterations} iterations | {global_step} env steps | eval {result}"
        + (f" | model {model_path}" if args.save_model else "")
    )
    runs.leave(0, train_envs, eval_envs, writer, track=args.track)


if __name__ == "__main__":
    main()
