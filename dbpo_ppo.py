"""DBPO: Drift-Based Policy Optimization, PPO fine-tuning of a pretrained one-step DBP generator
(arXiv 2604.03540; docs/algorithms.md §5; user guide: docs/dbpo.md).

    python dbpo_ppo.py --checkpoint runs/<dbp run>/dbp_bc.pt      # the authors' recipe; --resume <run>/state.pt continues

dbp_bc.py's generator mu(s, z) is the mean of a Gaussian actor N(mu_theta(s, z), sigma(s)^2); a rollout STORES each chunk's
latent z ~ N(0, I), so the PPO ratio of A = mu + sigma * n is exact (z's density cancels), over the executed prefix only; an
anchor ||mu_theta(s, z) - mu_frozen(s, z)||^2 keeps mu near the pretrained one. A transition = a chunk decision (reward: the
sum over its executed steps). Deployment: the mean path, 1 NFE.
"""

import copy
import functools
import math
import os
import time
from dataclasses import dataclass
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn

import envs
import runs
from dbp_bc import CKPT_KEYS, make_generator  # the dbp-v1 format and its networks

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
    """write <run dir>/state.pt (resumable) every --save-interval iterations, on a signal and at the end, and dbpo_ppo.pt"""
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
    env_id: str | None = None
    """the environment; default: the checkpoint's env (giving another one is refused)"""
    max_episode_steps: int | None = None
    """override the env's time limit (default: the checkpoint's, e.g. Robomimic 400, else the env's)"""
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
    lr_cycle_iters: int | None = None
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
    reward_scaling: Literal["rollout_std", "none"] = "rollout_std"
    """rollout_std: r / (std(rewards of this rollout) + 1e-8) (authors' code); none: the env's rewards"""
    bootstrap_timeouts: bool = False
    """bootstrap time-limit ends with gamma * V(final obs); default: terminal (authors' code: gym's TimeLimit `done`)"""
    freeze_normalizer: bool = False
    """keep the checkpoint's obs/action normalizer fixed; default: the actor's AdamW trains it (authors' code)"""
    logprob_min: float | None = -2.0
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
    eval_episodes: int = 100
    """episodes per evaluation (mean path); episode i has env seed --seed + 100000 + i and its own latent stream"""
    eval_envs: int = 10
    """parallel environments of the evaluation (worker processes when > 1; the result does not depend on it)"""
    eval_latent: Literal["sample", "zero"] = "sample"
    """latent of the evaluation's mean path: sample (z ~ N(0,I) from each episode's generator, as DBP deploys) or zero"""
    resume: str | None = None
    """a <run dir>/state.pt to continue from (networks, optimizers, counters, RNG); envs restart episodes"""
    eval_only: bool = False
    """only evaluate --checkpoint's mean path for --eval-episodes episodes and exit"""
    runs_dir: str = "runs"
    """where run folders (tensorboard, state, model, videos) go"""
    run_name: str | None = None
    """the run folder's name under --runs-dir (default: <env_id>__<exp_name>__<seed>__<unix time>)"""


# ---- the networks: a Gaussian actor around dbp_bc.py's generator, its frozen anchor copy, and the critic
def executed(chunk: torch.Tensor, obs_horizon: int, action_horizon: int) -> torch.Tensor:
    """The executed prefix A_exec = A[To-1 : To-1+Ta] of a chunk [B, Tp, act_dim] -> [B, Ta, act_dim]."""
    return chunk[:, obs_horizon - 1 : obs_horizon - 1 + action_horizon]


def prefix_log_prob(mu, std, chunk, obs_horizon, action_horizon, normalize=True):
    """log pi(A_exec | s, z) = sum_{k in prefix} sum_j log N(A_kj; mu_kj, std_kj^2) -> [B] (/ Ta * act_dim: normalize)."""
    mu, std, chunk = (executed(x, obs_horizon, action_horizon) for x in (mu, std, chunk))  # [B, Ta, act_dim]
    logp = (-0.5 * ((chunk - mu) / std) ** 2 - std.log() - 0.5 * math.log(2 * math.pi)).sum((1, 2))
    return logp / chunk[0].numel() if normalize else logp


def prefix_entropy(std, obs_horizon, action_horizon, normalize=True):
    """H = sum_{k in prefix} sum_j (0.5 + 0.5 log(2 pi) + log std_kj)  -> [B], normalized like the log-prob."""
    ent = (0.5 + 0.5 * math.log(2 * math.pi) + executed(std, obs_horizon, action_horizon).log()).sum((1, 2))
    return ent / (action_horizon * std.shape[-1]) if normalize else ent


class DBPOAgent(nn.Module):
    """Gaussian actor around the pretrained generator (env units), frozen anchor copy, critic, and the normalizers."""

    def __init__(
        self,
        ckpt: dict,
        generator: nn.Module,
        anchor: nn.Module,
        init_std=0.03,
        min_std=0.03,
        max_std=0.10,
        train_normalizer: bool = True,
    ):
        super().__init__()
        self.obs_horizon, self.pred_horizon, self.action_horizon = (
            ckpt["obs_horizon"],
            ckpt["pred_horizon"],
            ckpt["action_horizon"],
        )
        self.action_dim, cond_dim = ckpt["action_dim"], ckpt["obs_horizon"] * ckpt["obs_dim"]  # f(s) = flatten(obs_n)
        self.generator = generator  # mu_theta(s, z), trainable
        self.anchor = anchor.requires_grad_(False)  # mu_frozen(s, z): the pretrained weights, never updated
        # log sigma(s) = W f(s) + b with W = 0, b = log init_std: starts state-independent at init_std
        self.log_std_head = nn.Linear(cond_dim, self.pred_horizon * self.action_dim)
        nn.init.zeros_(self.log_std_head.weight)
        nn.init.constant_(self.log_std_head.bias, float(np.log(init_std)))
        self.log_std_min, self.log_std_max = float(np.log(min_std)), float(np.log(max_std))
        # critic V(s): MLP 3x256 Mish on the observation history normalized by the checkpoint's fixed normalizer,
        # as the authors' env wrappers hand it to their critic (dataset min/max to [-1, 1])
        self.critic = nn.Sequential(
            nn.Linear(cond_dim, 256),
            nn.Mish(),
            nn.Linear(256, 256),
            nn.Mish(),
            nn.Linear(256, 256),
            nn.Mish(),
            nn.Linear(256, 1),
        )
        # an mse-trained DBP ignores z (it was trained with z = 0): keep z = 0 so mu is what was trained
        self.zero_latent = ckpt.get("loss") == "mse"
        f32 = lambda d, k: torch.as_tensor(d[k], dtype=torch.float32)  # noqa: E731
        anchor = {**ckpt, **ckpt.get("dbpo", {}).get("anchor_stats", {})}  # a dbpo_ppo.pt: its anchor's own normalizer
        for k in ("obs_offset", "obs_scale", "action_offset", "action_scale", "action_low", "action_high"):
            self.register_buffer(k, f32(anchor, k))  # the anchor's x_n = (x - offset) / scale; the env's bounds
        self.register_buffer("critic_obs_offset", self.obs_offset.clone())  # the critic's input: fixed, never trained
        self.register_buffer("critic_obs_scale", self.obs_scale.clone())
        for k in (
            "obs",
            "action",
        ):  # the actor's, as the authors' LinearNormalizer in their deep-copied actor: x_n = x *
            gain = 1 / f32(ckpt, f"{k}_scale")  # gain + bias, Parameters trained by the actor's AdamW (or frozen)
            self.register_parameter(f"{k}_gain", nn.Parameter(gain, requires_grad=train_normalizer))
            self.register_parameter(
                f"{k}_bias", nn.Parameter(-f32(ckpt, f"{k}_offset") * gain, requires_grad=train_normalizer)
            )

    def actor_parameters(self):
        normalizer = [p for p in (self.obs_gain, self.obs_bias, self.action_gain, self.action_bias) if p.requires_grad]
        return list(self.generator.parameters()) + list(self.log_std_head.parameters()) + normalizer

    def normalize_obs(self, obs: torch.Tensor) -> torch.Tensor:
        return obs * self.obs_gain + self.obs_bias  # [B, To, obs_dim]

    def sample_latent(self, batch: int) -> torch.Tensor:
        shape, device = (batch, self.pred_horizon, self.action_dim), self.obs_offset.device  # dim(z) = dim(chunk)
        return torch.zeros(shape, device=device) if self.zero_latent else torch.randn(shape, device=device)

    def get_value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(((obs - self.critic_obs_offset) / self.critic_obs_scale).flatten(1)).squeeze(-1)  # [B]

    def dist_params(self, obs: torch.Tensor, z: torch.Tensor):
        """mu(s, z) [B, Tp, act_dim] in env units from one generator pass (a = (a_n - bias) / gain); std(s) =
        exp(clamp(log-std head(f(s)))), f(s) = flatten(obs_n). obs: raw [B, To, obs_dim]."""
        obs_n = self.normalize_obs(obs)
        mu = (self.generator(obs_n, z) - self.action_bias) / self.action_gain
        log_std = self.log_std_head(obs_n.flatten(1)).view_as(mu)
        return mu, log_std.clamp(self.log_std_min, self.log_std_max).exp()

    def anchor_mean(self, obs: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """mu_frozen(s, z) in env units: the pretrained generator with the checkpoint's normalizer [B, Tp, act_dim]."""
        return self.anchor((obs - self.obs_offset) / self.obs_scale, z) * self.action_scale + self.action_offset

    @torch.no_grad()
    def act(self, obs: torch.Tensor, z: torch.Tensor, deterministic=False, noise_clip=3.0, normalize_logprob=True):
        """A = clip(mu + std * clip(n, +-noise_clip)), or clip(mu) (the mean path): (chunk [B, Tp, A], log pi [B])."""
        mu, std = self.dist_params(obs, z)
        chunk = mu if deterministic else mu + std * torch.randn_like(mu).clamp(-noise_clip, noise_clip)
        chunk = torch.maximum(torch.minimum(chunk, self.action_high), self.action_low)
        return chunk, prefix_log_prob(mu, std, chunk, self.obs_horizon, self.action_horizon, normalize_logprob)

    def env_actions(self, chunk: torch.Tensor) -> np.ndarray:
        """A chunk -> its executed prefix [B, Ta, act_dim] (numpy, for envs.step)."""
        return executed(chunk, self.obs_horizon, self.action_horizon).cpu().numpy()


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
    """GAE: rewards, values, dones [T, N] (rewards hold the truncations' gamma V(final obs)), next_value [N] -> (A, R)."""
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


def scheduled_lr(k: int, peak: float, low: float, warmup: int, cycle: int, schedule: str = "cosine") -> float:
    """The lr after k steps (authors' CosineAnnealingWarmupRestarts): per cycle, linear low -> peak, then cosine to low."""
    if schedule == "constant":
        return peak
    k %= cycle
    if k < warmup:
        return low + (peak - low) * k / warmup
    return (
        low + (peak - low) * (1 + math.cos(math.pi * (k - warmup) / (cycle - warmup))) / 2
    )  # low + (peak-low)(1+cos)/2


# ---- acting: the evaluations' mean path (envs.evaluate's act)
def mean_path(agent: DBPOAgent, zero_latent: bool, obs: np.ndarray, gens: list) -> np.ndarray:
    """A = clip(mu(s, z)), 1 NFE, z = 0 or drawn from each episode's generator: obs [B, To, O] -> executed [B, Ta, A]."""
    shape, zero = (agent.pred_horizon, agent.action_dim), zero_latent or agent.zero_latent
    z = torch.stack([torch.zeros(shape) if zero else torch.randn(shape, generator=g) for g in gens])  # [B, Tp, A]
    device = agent.obs_offset.device
    return agent.env_actions(agent.act(torch.as_tensor(obs, device=device), z.to(device), deterministic=True)[0])


# ---- the training loop: main() and its steps, in the order it runs them
def rules(args: Args):
    """Every flag's range for runs.parse (a NaN fails every comparison), then the flags' combinations."""
    unset_or = lambda test: lambda v: v is None or test(v)  # noqa: E731  (an Optional flag may stay unset)
    yield from runs.ranges(
        args,
        {
            "> 0": (
                unset_or(lambda v: v > 0),
                (
                    "num_iterations",
                    "num_envs",
                    "num_steps",
                    "update_epochs",
                    "eval_episodes",
                    "eval_envs",
                    "minibatch_size",
                    "eval_interval",
                    "save_interval",
                    "lr_cycle_iters",
                    "max_episode_steps",
                ),
            ),
            "a finite number > 0": (
                unset_or(lambda v: 0 < v < math.inf),
                (
                    "actor_lr",
                    "actor_min_lr",
                    "critic_lr",
                    "critic_min_lr",
                    "clip_coef",
                    "max_grad_norm",
                    "noise_clip",
                    "target_kl",
                    "clip_vloss",
                    "min_std",
                    "max_std",
                ),
            ),
            ">= 0": (lambda v: v >= 0, ("seed", "num_threads", "critic_warmup_iters", "lr_warmup_iters")),
            "a finite number >= 0": (
                lambda v: 0 <= v < math.inf,
                ("weight_decay", "ent_coef", "vf_coef", "anchor_coef"),
            ),
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
        (f"need 0 < --min-std <= --init-std <= --max-std, got {args.min_std}, {args.init_std}, {args.max_std}"),
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
    runs.check(
        runs.nonfinite(ckpt) is None, f"{path} contains NaN or infinite values ({runs.nonfinite(ckpt)}); retrain it"
    )
    env_id = envs.resolve_env_id(ckpt["env_id"], gym_ids=envs.LOCOMOTION_ENVS)
    runs.check(
        args.env_id in (None, env_id), f"the checkpoint was trained on {env_id}, not {args.env_id}; drop --env-id"
    )
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
    """(agent, (actor, critic) optimizers) of --checkpoint, or of --resume's state (RNG streams too)."""
    try:
        generator, anchor = (make_generator(ckpt["backbone"], **ckpt["generator_kwargs"]) for _ in range(2))
    except (TypeError, ValueError) as e:
        runs.fail(f"--checkpoint {args.checkpoint}: its backbone/generator_kwargs make no generator ({runs.why(e)})")
    hint = f"--checkpoint {args.checkpoint} is damaged; retrain it"  # a dbpo_ppo.pt anchors to the original DBP:
    runs.load_states({"model": generator, "anchor_model": anchor}, {"anchor_model": ckpt["model"], **ckpt}, hint)
    agent = DBPOAgent(
        ckpt, generator, anchor, args.init_std, args.min_std, args.max_std, not args.freeze_normalizer
    ).to(device)
    optimizers = (
        torch.optim.AdamW(agent.actor_parameters(), lr=args.actor_lr, weight_decay=args.weight_decay),
        torch.optim.AdamW(agent.critic.parameters(), lr=args.critic_lr, weight_decay=args.weight_decay),
    )
    if "dbpo" in ckpt:  # a dbpo_ppo.pt: continue with its log-std head and critic
        runs.load_states({"log_std_head": agent.log_std_head, "critic": agent.critic}, ckpt["dbpo"], hint)
    if state is not None:
        runs.load_states(
            {"agent": agent, "actor_optimizer": optimizers[0], "critic_optimizer": optimizers[1]},
            state,
            f"{args.resume} is not a run of --checkpoint {args.checkpoint}",
        )
        runs.set_rng_state(state["rng"])
    return agent, optimizers


def evaluate_and_log(agent, eval_envs, args: Args, stop, writer=None, iteration=0, global_step=0, video=None):
    """The mean path on --eval-episodes seeded episodes (envs.evaluate), logged as eval/* at step `iteration`: its line."""
    res = envs.evaluate(
        eval_envs,
        functools.partial(mean_path, agent, args.eval_latent == "zero"),
        args.eval_episodes,
        args.seed + 100_000,
        stop.requested,
        video,
    )
    stop.check()  # an interrupted evaluation (None) is no result: raises before anything is logged
    p, n = res["success"], args.eval_episodes  # success: NaN without info['success'] (locomotion)
    se = math.sqrt(p * (1 - p) / n)  # the standard error of a success rate
    for key, value in (
        dict(
            episodic_return=res["return"],
            episodic_length=res["length"],
            success_rate=p,
            success_stderr=se,
            env_steps=global_step,
        ).items()
        if writer
        else ()
    ):
        writer.add_scalar(f"eval/{key}", value, iteration)
    if writer:  # each episode's return, for paired comparisons of evaluations (the same seeds every time)
        envs.write_episodes(
            os.path.join(writer.log_dir, "eval_episodes.csv"), res, iteration, global_step, args.seed + 100_000
        )
    return f"return {res['return']:.4f} | length {res['length']:.2f} | success {p:.4f} +- {se:.4f} ({n} episodes, mean path)"


def rollout(agent: DBPOAgent, train_envs, next_obs, args: Args, stop):
    """--num-steps decisions per env: (next obs, the rollout [T, N, ...], (env steps, episode returns, successes))."""
    T, N, device, chunk_shape = (
        args.num_steps,
        args.num_envs,
        agent.obs_offset.device,
        (agent.pred_horizon, agent.action_dim),
    )
    shapes = {
        "obs": (agent.obs_horizon, next_obs.shape[-1]),
        "z": chunk_shape,
        "chunk": chunk_shape,
        "logprob": (),  # z:
        "value": (),
        "bootstrap": (),
    }  # stored, so the ratio is exact; bootstrap: gamma V(final obs) of truncations
    buf = {
        **{k: torch.zeros((T, N, *shape), device=device) for k, shape in shapes.items()},
        "raw_reward": np.zeros((T, N)),
        "done": np.zeros((T, N), bool),
    }  # env rewards, summed over each chunk
    steps_before, returns, successes = sum(train_envs.get_attr("executed_steps")), [], []
    for step in range(T):
        stop.check()
        obs = torch.as_tensor(
            next_obs, device=device
        )  # [N, To, obs_dim] raw: normalized in the loss by the current gain
        with torch.no_grad():
            z = agent.sample_latent(N)  # [N, Tp, act_dim]
            chunk, logprob = agent.act(obs, z, noise_clip=args.noise_clip, normalize_logprob=args.normalize_logprob)
            buf["value"][step] = agent.get_value(obs)
        buf["obs"][step], buf["z"][step], buf["chunk"][step], buf["logprob"][step] = obs, z, chunk, logprob
        # TRY NOT TO MODIFY: execute the game and log data (SAME_STEP autoreset: ended episodes' infos["final_obs"])
        next_obs, reward, terminations, truncations, infos = train_envs.step(agent.env_actions(chunk))
        buf["raw_reward"][step], buf["done"][step] = reward, terminations | truncations
        if "final_obs" in infos:
            # --bootstrap-timeouts: on truncation, not on termination, r_t += gamma * V(final obs); the episode ends here
            truncated_only = np.flatnonzero(infos["_final_obs"] & truncations & ~terminations)
            if truncated_only.size and args.bootstrap_timeouts:
                final_obs = torch.as_tensor(np.stack(infos["final_obs"][truncated_only]), device=device)
                with torch.no_grad():
                    buf["bootstrap"][step, truncated_only] = args.gamma * agent.get_value(final_obs)
            final = infos["final_info"]
            returns += [float(final["episode"]["r"][i]) for i in np.flatnonzero(final["_episode"])]
            successes += [float(final["success"][i]) for i in np.flatnonzero(final.get("_success", []))]
    return next_obs, buf, (sum(train_envs.get_attr("executed_steps")) - steps_before, returns, successes)


def compute_advantages(agent: DBPOAgent, buf: dict, next_obs, args: Args):
    """Scaled rewards (--reward-scaling) + the truncation bootstraps (V is in scaled units), then GAE: (adv, returns)."""
    if not np.isfinite(buf["raw_reward"]).all():
        raise FloatingPointError("env reward")
    raw = buf["raw_reward"]  # float64 [T, N]
    rewards = torch.as_tensor(
        rollout_std_scaling(raw) if args.reward_scaling == "rollout_std" else raw,
        dtype=torch.float32,
        device=buf["value"].device,
    )
    with torch.no_grad():  # bootstrap value if not done
        next_value = agent.get_value(torch.as_tensor(next_obs, device=rewards.device))  # [N]
        dones = torch.as_tensor(buf["done"], dtype=torch.float32, device=rewards.device)  # [T, N]
        return compute_gae(rewards + buf["bootstrap"], buf["value"], dones, next_value, args.gamma, args.gae_lambda)


def ppo_update(agent: DBPOAgent, optimizers, batch: list, iteration: int, args: Args, stop):
    """This iteration's learning rates, then --update-epochs epochs of minibatches (stopped once approx KL > --target-kl):
    the means of the minibatches' infos. A NaN/inf loss term or parameter raises FloatingPointError."""
    cycle = args.lr_cycle_iters or args.num_iterations  # the authors' schedulers step once per iteration, the actor's
    for opt, peak, low, k in (
        (optimizers[1], args.critic_lr, args.critic_min_lr, iteration),  # after the critic warm-up
        (optimizers[0], args.actor_lr, args.actor_min_lr, max(iteration - args.critic_warmup_iters, 0)),
    ):
        opt.param_groups[0]["lr"] = scheduled_lr(
            k, peak, low, args.lr_warmup_iters, cycle, args.lr_schedule
        )  # one group
    batch_size, infos = len(batch[0]), []
    minibatch_size = min(args.minibatch_size, batch_size)
    minibatches = (
        (epoch, b_inds[start : start + minibatch_size])
        for epoch in range(args.update_epochs)  # a permutation
        for b_inds in [torch.randperm(batch_size, device=batch[0].device)]  # per epoch, then its minibatches
        for start in range(0, batch_size, minibatch_size)
    )
    for epoch, mb in minibatches:
        stop.check()
        info = update(
            agent, *optimizers, [x[mb] for x in batch], args, update_actor=iteration >= args.critic_warmup_iters
        )
        if not torch.isfinite(info["loss"]):
            raise FloatingPointError(next(k for k in info if not torch.isfinite(info[k]).all()))  # the first bad term
        infos.append(info)
        if args.target_kl is not None and info["approx_kl"] > args.target_kl:  # too far from pi_old: stop the epochs
            break
    if (bad := runs.nonfinite(dict(agent.named_parameters()))) is not None:
        raise FloatingPointError(f"parameter {bad}")
    means = {k: torch.stack([i[k] for i in infos]).float().mean().item() for k in infos[0] if k != "ratio"}
    return {
        **means,
        "update_epochs_done": epoch + 1,
        "minibatches_done": len(infos),
        "approx_kl_last": infos[-1]["approx_kl"].item(),
    }


def log_iteration(writer, iteration: int, args: Args, optimizers, stats, batch, buf, episodes, global_step, clock):
    """The iteration's tensorboard scalars (step = iteration) and its `iter i/n ...` line."""
    (steps, returns, successes), y_true, y_pred = episodes, batch[5].cpu().numpy(), batch[6].cpu().numpy()
    explained_var = np.nan if np.var(y_true) == 0 else 1 - np.var(y_true - y_pred) / np.var(y_true)
    sps = int((global_step - clock["first_step"]) / (time.time() - clock["start"]))
    scalars = {
        "charts/env_steps": global_step,
        "charts/actor_lr": optimizers[0].param_groups[0]["lr"],
        "charts/critic_lr": optimizers[1].param_groups[0]["lr"],
        "charts/std": stats["std"],
        "charts/advantage_std": batch[4].std().item(),
        "charts/reward_mean": buf["raw_reward"].mean(),
        "losses/explained_variance": explained_var,
        "charts/SPS": sps,
        "charts/rollout_SPS": steps / clock["rollout_seconds"],
        **{f"losses/{k}": v for k, v in stats.items() if k not in ("std", "loss")},
        **({"charts/episodic_return": np.mean(returns)} if returns else {}),
        **({"charts/success_rate": np.mean(successes)} if successes else {}),
    }
    for key, value in scalars.items():
        writer.add_scalar(key, value, iteration)
    eta = (
        (time.time() - clock["start"])
        / (iteration - clock["first_iteration"] + 1)
        * (args.num_iterations - iteration - 1)
    )
    ret, succ = (
        f"{np.mean(returns):.2f}" if returns else "n/a",
        f" | success {np.mean(successes):.3f}" if successes else "",
    )
    print(
        f"iter {iteration}/{args.num_iterations} | env steps {global_step} | SPS {sps} | return {ret}{succ} | kl "
        f"{scalars['losses/approx_kl']:.4f} | anchor {scalars['losses/anchor_loss']:.2e} | std {scalars['charts/std']:.3f} | "
        f"ev {explained_var:.2f} | {'actor+critic' if iteration >= args.critic_warmup_iters else 'critic warm-up'} | "
        f"ETA {eta / 60:.1f} min",
        flush=True,
    )


def save_model(ckpt: dict, agent: DBPOAgent, args: Args, global_step: int, path: str) -> None:
    """dbpo_ppo.pt: dbp-v1 with the fine-tuned generator and normalizer, the original ones (anchor_model, anchor_stats),
    the log-std head and critic."""
    model = {
        k: v for k, v in ckpt.items() if k not in ("train_model", "optimizer", "ema_decay_step", "rng", "global_time")
    }
    cpu = lambda net: {k: v.cpu() for k, v in net.state_dict().items()}  # noqa: E731
    anchor_stats = {k: getattr(agent, k).cpu() for k in ("obs_offset", "obs_scale", "action_offset", "action_scale")}
    trained = {
        f"{k}_{n}": v.detach().cpu()
        for k in ("obs", "action")
        for n, v in (  # the actor's x * gain + bias as dbp-v1's
            ("scale", 1 / getattr(agent, f"{k}_gain")),
            ("offset", -getattr(agent, f"{k}_bias") / getattr(agent, f"{k}_gain")),
        )
    }
    runs.save(
        {
            **model,
            "model": cpu(agent.generator),
            **trained,
            "anchor_model": cpu(agent.anchor),
            "dbpo": {
                "args": vars(args),
                "log_std_head": cpu(agent.log_std_head),
                "critic": cpu(agent.critic),
                "global_step": global_step,
                "anchor_stats": anchor_stats,
            },
        },
        path,
    )


def main():
    args = runs.parse(Args, rules)
    ckpt, env_id, state = load_inputs(args)
    run_name = state["run_name"] if state else args.run_name or runs.run_name(env_id, args.exp_name, args.seed)
    writes = not args.eval_only or args.capture_video  # --eval-only writes nothing but its video
    run_dir = runs.plan_run_dir(args.runs_dir, run_name, "state.pt", args.resume) if writes else None

    device = runs.seed(args.seed, args.torch_deterministic, args.num_threads, args.cuda)  # TRY NOT TO MODIFY: seeding
    # env setup: ChunkEnvs (obs [To, O], action: the executed [Ta, A]); a Robomimic env from the checkpoint's env_args
    To, Tp, Ta = ckpt["obs_horizon"], ckpt["pred_horizon"], ckpt["action_horizon"]
    env_kwargs = dict(
        env_args=ckpt.get("env_args"), max_episode_steps=args.max_episode_steps or ckpt.get("max_episode_steps")
    )
    eval_envs = envs.make_eval_envs(
        env_id, min(args.eval_envs, args.eval_episodes), Ta, To, render=args.capture_video, **env_kwargs
    )
    obs_dim, act_dim = eval_envs.single_observation_space.shape[-1], eval_envs.single_action_space.shape[-1]
    runs.check(
        (obs_dim, act_dim) == (ckpt["obs_dim"], ckpt["action_dim"]),
        f"the checkpoint expects obs/action dims "
        f"{ckpt['obs_dim']}/{ckpt['action_dim']} but {env_id} has {obs_dim}/{act_dim}",
    )
    agent, optimizers = build_agent(ckpt, state, args, device)
    start_iteration, global_step = (state["iteration"], state["global_step"]) if state else (0, 0)
    stop = runs.Stop()
    stop.armed = (
        not args.eval_only
    )  # from here a signal stops the run within a step, saved (--eval-only: exits at once)
    print(
        f"dbpo_ppo: {env_id} | checkpoint {args.checkpoint} ({ckpt['backbone']}, To={To} Tp={Tp} Ta={Ta}) | device "
        f"{device} | threads {torch.get_num_threads()} | run folder {run_dir or '- (eval only)'}",
        flush=True,
    )
    video = lambda name: os.path.join(run_dir, "videos", f"{name}.mp4") if args.capture_video else None  # noqa: E731
    if args.eval_only:
        print(f"final eval {env_id}: {evaluate_and_log(agent, eval_envs, args, stop, video=video('eval-only'))}")
        runs.leave(0, eval_envs)

    writer = runs.tensorboard(
        run_dir,
        args,
        run_name,
        start=start_iteration if state else 1,  # step = iteration: a resume
        wandb_project=args.track and args.wandb_project_name,
        wandb_entity=args.wandb_entity,
    )  # purges
    if state is not None:
        print(f"resumed {run_name} at iteration {start_iteration} ({global_step} env steps)")
    train_envs = gym.vector.SyncVectorEnv(
        [functools.partial(envs.make_chunk_env, env_id, Ta, To, **env_kwargs)] * args.num_envs,
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    state_path, model_path = os.path.join(run_dir, "state.pt"), os.path.join(run_dir, "dbpo_ppo.pt")

    def snapshot(iteration: int, global_step: int, finished=False) -> dict:  # all a --resume needs, detached (state.pt)
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
            **copy.deepcopy(
                {
                    "agent": agent.state_dict(),
                    "actor_optimizer": optimizers[0].state_dict(),
                    "critic_optimizer": optimizers[1].state_dict(),
                }
            ),
        }

    clock = {
        "start": time.time(),
        "first_step": global_step,
        "first_iteration": start_iteration,
        "rollout": 0.0,
        "update": 0.0,
    }
    next_obs, _ = train_envs.reset(seed=args.seed + start_iteration)
    last_good, iteration, result = None, start_iteration, None
    try:
        for iteration in range(start_iteration, args.num_iterations):
            last_good = snapshot(iteration, global_step)  # what an interruption inside this iteration saves
            if iteration % args.eval_interval == 0:  # an evaluation iteration: mean path, no update
                result = evaluate_and_log(
                    agent, eval_envs, args, stop, writer, iteration, global_step, video(f"eval-iter{iteration}")
                )
                print(f"eval at iteration {iteration}: {result}", flush=True)
            else:
                t0 = time.time()
                next_obs, buf, episodes = rollout(agent, train_envs, next_obs, args, stop)
                advantages, returns = compute_advantages(agent, buf, next_obs, args)
                global_step, t1 = global_step + episodes[0], time.time()
                batch = [
                    *(buf[k].flatten(0, 1) for k in ("obs", "z", "chunk", "logprob")),
                    advantages.flatten(),
                    returns.flatten(),
                    buf["value"].flatten(),
                ]
                stats = ppo_update(agent, optimizers, batch, iteration, args, stop)
                clock.update(
                    rollout_seconds=t1 - t0,
                    rollout=clock["rollout"] + t1 - t0,
                    update=clock["update"] + time.time() - t1,
                )
                log_iteration(writer, iteration, args, optimizers, stats, batch, buf, episodes, global_step, clock)
            if (iteration + 1) % args.save_interval == 0 and args.save_model:
                runs.save(snapshot(iteration + 1, global_step), state_path)
        iteration, last_good = args.num_iterations, snapshot(args.num_iterations, global_step)
        if (
            args.num_iterations - 1
        ) % args.eval_interval != 0 or result is None:  # the last iteration trained: evaluate it
            result = evaluate_and_log(
                agent, eval_envs, args, stop, writer, iteration, global_step, video(f"eval-iter{iteration}")
            )
    except runs.Interrupted:  # saved: the state as of the start of the interrupted iteration, which a resume repeats
        if args.save_model:
            runs.save(last_good, state_path)
        runs.interrupted(
            iteration, args.save_model and state_path, stop.exit_code, train_envs, eval_envs, writer, track=args.track
        )
    except FloatingPointError as e:  # a non-finite reward, loss term or parameter: the last good state stays
        runs.stop_nonfinite(str(e), iteration, state_path, "Try a lower --actor-lr / --critic-lr")

    steps, rollout_time, update_time = global_step - clock["first_step"], clock["rollout"], clock["update"]
    print(
        f"timing: rollout {steps / max(rollout_time, 1e-9):.1f} env steps/s, update {steps / max(update_time, 1e-9):.1f} "
        f"env steps/s ({steps} env steps, {rollout_time:.1f}s rollout, {update_time:.1f}s update; busy CPUs slow both)"
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
