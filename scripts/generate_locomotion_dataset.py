"""Make D4RL-style locomotion datasets locally, as Minari datasets (`mujoco/hopper/medium-v0`, ...).

Minari's `mujoco/<env>/<level>-v0` datasets (recorded on gymnasium's v5 MuJoCo envs) download on first use; without
network access this script makes one of the same id and layout: it trains a behaviour policy with SAC (CleanRL-style,
CPU, one thread) until its evaluation return reaches the level's target (TARGETS), then records --num-steps steps of
it (1M, as the published datasets), with sampled actions as D4RL's SAC and Minari's SB3 `predict` record them, and
writes them with `minari.create_dataset_from_buffers` (minari's DataCollector would need jax: minari[create]).
`minari.load_dataset(id)` then reads it and `recover_environment()` gives the v5 env.

"Medium": D4RL (Fu et al. 2020, arXiv:2004.07219; its wiki's Tasks page) records a SAC policy stopped early, "trained
to approximately 1/3 the performance of the expert" (SAC trained to convergence): the target here is 1/3 of D4RL's
expert score. Minari's own medium-v0 policies (minari-dataset-generation-scripts) were trained with SB3's SAC for a
fixed 4M (Hopper) / 6M (Walker2d) steps, not to a return, and are far stronger ("hops fast, in a natural looking
motion"); their cards give no reference scores. So this is D4RL's medium level under Minari's id, not Minari's data.

Training checkpoints (atomic, every --checkpoint-interval steps and on Ctrl-C / SIGTERM) live in a hidden folder of
the root: rerunning the same command continues. The dataset appears in one rename, whole or not at all.

Example: python scripts/generate_locomotion_dataset.py --dataset-id mujoco/hopper/medium-v0
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one thread: set before numpy and torch load
os.environ.setdefault("MUJOCO_GL", "egl")  # headless; nothing is rendered

import math
import random
import shlex
import shutil
import sys
import time
import warnings
from collections import deque
from dataclasses import dataclass
from typing import Literal

import gymnasium as gym
import mujoco
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: runs
from runs import Interrupted, Stop, check, check_creatable, leave, load_checkpoint, parse, ranges, require, save

require("minari", "scripts/generate_locomotion_dataset.py")  # the locomotion extra: one line, exit 2, if missing
import minari
from minari.data_collector.callbacks import EpisodeMetadataCallback
from minari.data_collector.episode_buffer import EpisodeBuffer

# D4RL's reference returns (d4rl/infos.py REF_MIN_SCORE, REF_MAX_SCORE): a random policy, and the expert (SAC trained
# to convergence). Stored as the dataset's ref_min_score / ref_max_score, so minari.get_normalized_score gives D4RL's
# normalized score (x100); Minari's own cards for these ids give none.
D4RL_REF = {"Hopper-v5": (-20.272305, 3234.3), "Walker2d-v5": (1.629008, 4592.3)}
# The target return of the behaviour policy per dataset (D4RL, above): medium = 1/3 of the expert, expert = the expert.
TARGETS = {
    "mujoco/hopper/medium-v0": ("Hopper-v5", 1078.1),  # 3234.3 / 3
    "mujoco/walker2d/medium-v0": ("Walker2d-v5", 1530.8),  # 4592.3 / 3
    "mujoco/hopper/expert-v0": ("Hopper-v5", 3234.3),
    "mujoco/walker2d/expert-v0": ("Walker2d-v5", 4592.3),
}
SCRIPT = "scripts/generate_locomotion_dataset.py"
CODE_PERMALINK = f"drift-policies: {SCRIPT}"  # the project's repository
AUTHOR = "The drift-policies contributors"
FORMAT = "locomotion-sac-v1"  # the checkpoint's tag
SAC_KEYS = (
    "buffer_size",
    "gamma",
    "tau",
    "batch_size",
    "learning_starts",
    "policy_lr",
    "q_lr",
    "policy_frequency",
    "alpha",
    "autotune",
)  # the flags a checkpoint was trained with: a rerun must pass the same ones


@dataclass
class Args:
    """Make a D4RL-style locomotion dataset locally, as a Minari dataset: train SAC on the gymnasium v5 env until its
    evaluation return reaches the level's target, then record --num-steps steps of it. Levels follow D4RL (Fu et al.
    in 2020): medium is SAC stopped early at about 1/3 of the expert's return, here 1/3 of D4RL's expert score: for
    Hopper 3234.3 / 3 = 1078.1, for Walker2d 4592.3 / 3 = 1530.8; expert is the expert score. (Minari's own medium-v0
    policies were trained for a fixed 4M/6M steps instead, and are stronger.) Rerun the same command to continue."""

    dataset_id: Literal[tuple(TARGETS)] = "mujoco/hopper/medium-v0"
    """the Minari dataset to make; medium targets: Hopper 1078.1, Walker2d 1530.8 (1/3 of D4RL's expert);
    expert: 3234.3, 4592.3"""
    num_steps: int = 1_000_000
    """environment steps to record (the published datasets hold 1M)"""
    seed: int = 0
    """seed of the training, the evaluations and the recording"""
    root: str | None = None
    """the Minari root; default $MINARI_DATASETS_PATH, else ~/.minari/datasets (where minari.load_dataset looks)"""
    overwrite: bool = False
    """replace an existing dataset of that id"""
    resume: bool = True
    """continue from this dataset's training checkpoint if there is one; --no-resume trains from scratch"""
    target_return: float | None = None
    """stop training once the mean evaluation return reaches this; default: the level's target (above)"""
    max_train_steps: int = 1_000_000
    """training budget in environment steps: record the policy as it is if the target is not reached by then"""
    eval_interval: int = 5000
    """evaluate the policy every this many training steps (and at step 0)"""
    eval_episodes: int = 10
    """episodes per evaluation, with sampled actions as in the recording"""
    checkpoint_interval: int = 10_000
    """save the training checkpoint every this many steps"""

    # Algorithm specific arguments (SAC; the defaults of CleanRL's sac_continuous_action.py)
    buffer_size: int = 1_000_000
    """replay buffer size"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """target network smoothing coefficient"""
    batch_size: int = 256
    """minibatch size of each update"""
    learning_starts: int = 5000
    """random actions and no updates for this many steps"""
    policy_lr: float = 3e-4
    """actor (and entropy coefficient) learning rate"""
    q_lr: float = 1e-3
    """critic learning rate"""
    policy_frequency: int = 2
    """actor updates are delayed: this many of them every this many steps (TD3-style)"""
    alpha: float = 0.2
    """entropy coefficient (the initial one with --autotune)"""
    autotune: bool = True
    """tune the entropy coefficient toward the target entropy -|A|"""


def rules(a: Args):
    yield from ranges(
        a,
        {
            "positive": (
                lambda v: v > 0,
                (
                    "num_steps",
                    "max_train_steps",
                    "eval_interval",
                    "eval_episodes",
                    "checkpoint_interval",
                    "buffer_size",
                    "batch_size",
                    "policy_frequency",
                    "policy_lr",
                    "q_lr",
                    "alpha",
                ),
            ),
            "non-negative": (lambda v: v >= 0, ("learning_starts",)),
            "in (0, 1]": (lambda v: 0 < v <= 1, ("gamma", "tau")),
        },
    )
    finite = a.target_return is None or math.isfinite(a.target_return)
    yield finite, f"--target-return must be finite, got {a.target_return}"


# ---- networks
def mlp(n_in: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, n_out))


class Critic(nn.Module):
    """Twin Q networks: the Bellman target takes their minimum, against overestimation."""

    def __init__(self, obs_dim: int, act_dim: int):
        super().__init__()
        self.q1, self.q2 = mlp(obs_dim + act_dim, 1), mlp(obs_dim + act_dim, 1)

    def forward(self, obs, act):  # [B, O], [B, A] -> Q1, Q2 [B]
        x = torch.cat([obs, act], -1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)


class Actor(nn.Module):
    """A tanh-squashed Gaussian policy: a = tanh(u) * scale + bias, u ~ N(mean(s), std(s))."""

    def __init__(self, obs_dim: int, act_dim: int, low: np.ndarray, high: np.ndarray):
        super().__init__()
        self.net = mlp(obs_dim, 2 * act_dim)
        self.register_buffer("scale", torch.tensor((high - low) / 2, dtype=torch.float32))
        self.register_buffer("bias", torch.tensor((high + low) / 2, dtype=torch.float32))

    def forward(self, obs):  # [B, O] -> sampled action [B, A], log pi(a|s) [B]
        mean, log_std = self.net(obs).chunk(2, -1)
        log_std = log_std.clamp(-5.0, 2.0)
        noise = torch.randn_like(mean)
        u = mean + log_std.exp() * noise
        # log pi(a|s) = log N(u) - sum log |da/du|, with log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)) (stable)
        log_prob = (-0.5 * noise.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_prob = log_prob - (2 * (math.log(2) - u - F.softplus(-2 * u)) + self.scale.log()).sum(-1)
        return torch.tanh(u) * self.scale + self.bias, log_prob


class ReplayBuffer:
    """The last `size` transitions in numpy arrays (so a checkpoint holds them as they are)."""

    def __init__(self, size: int, obs_dim: int, act_dim: int):
        self.size, self.pos, self.full = size, 0, False
        self.data = {
            k: np.zeros((size, d), np.float32)
            for k, d in (("obs", obs_dim), ("act", act_dim), ("rew", 1), ("next_obs", obs_dim), ("term", 1))
        }

    def add(self, **transition):
        for k, v in transition.items():
            self.data[k][self.pos] = v
        self.pos = (self.pos + 1) % self.size
        self.full = self.full or self.pos == 0

    def sample(self, rng: np.random.Generator, n: int):  # -> obs [n, O], act [n, A], rew [n], next_obs [n, O], term [n]
        idx = rng.integers(0, self.size if self.full else self.pos, n)
        b = {k: torch.from_numpy(v[idx]) for k, v in self.data.items()}
        return b["obs"], b["act"], b["rew"][:, 0], b["next_obs"], b["term"][:, 0]

    def state(self) -> dict:
        n = self.size if self.full else self.pos
        return {"pos": self.pos, "full": self.full, **{k: torch.from_numpy(v[:n]) for k, v in self.data.items()}}

    def load(self, state: dict) -> None:
        self.pos, self.full = state["pos"], state["full"]
        for k, v in self.data.items():
            v[: len(state[k])] = state[k].numpy()


# ---- acting
@torch.inference_mode()
def act(actor: Actor, obs: np.ndarray) -> np.ndarray:
    """One sampled action for one observation (the behaviour the dataset records)."""
    return actor(torch.as_tensor(obs, dtype=torch.float32)[None])[0][0].numpy()


def evaluate(actor: Actor, env, episodes: int, seed: int, stop: Stop) -> tuple[float, float]:
    """Mean and std of the return over `episodes` episodes with sampled actions; the same start states every time
    (seeds seed, seed + 1, ...), so successive evaluations differ by the policy, not the starts."""
    returns = []
    for k in range(episodes):
        obs, _ = env.reset(seed=seed + k)
        ret, done = 0.0, False
        while not done:
            stop.check()  # a signal abandons the evaluation
            obs, reward, terminated, truncated, _ = env.step(act(actor, obs))
            ret, done = ret + float(reward), terminated or truncated
        returns.append(ret)
    return float(np.mean(returns)), float(np.std(returns))


# ---- recording
def record(actor: Actor, env: gym.Env, num_steps: int, seed: int, stop: Stop):
    """Step the policy num_steps steps on env, episode i from seed + i, and keep each episode as one minari
    EpisodeBuffer (its seed stored with it): observations [T + 1, O] (s_0 .. s_T), actions [T, A], rewards,
    terminations, truncations [T]; no infos. The last episode, cut by num_steps, is stored as truncated (as minari's
    DataCollector stores it). Returns the episodes, the returns of the complete ones and the seconds it took. All is
    in memory: a signal exits and leaves nothing."""
    episodes, returns, t = [], [], 0
    print(f"recording {num_steps} steps", flush=True)
    start = last_print = time.time()
    while t < num_steps:
        ep_seed = seed + len(episodes)
        obs, _ = env.reset(seed=ep_seed)
        obs_list, actions, rewards, terms, truncs = [obs], [], [], [], []
        done = False
        while not done and t < num_steps:
            action = act(actor, obs)
            obs, reward, terminated, truncated, _ = env.step(action)
            obs_list.append(obs)
            actions.append(action)
            rewards.append(float(reward))
            terms.append(bool(terminated))
            truncs.append(bool(truncated))
            done, t = terminated or truncated, t + 1
            if stop.requested():
                print(
                    f"stopped while recording (step {t}): no dataset written; the training is done, rerun the same "
                    f"command to record",
                    flush=True,
                )
                leave(stop.exit_code)
            if time.time() - last_print >= 10:
                last_print, rate = time.time(), t / (time.time() - start)
                print(
                    f"recorded {t}/{num_steps} steps | {len(returns)} episodes | {rate:.0f} steps/s | elapsed "
                    f"{fmt_time(time.time() - start)} | ETA {fmt_time((num_steps - t) / rate)}",
                    flush=True,
                )
        if done:
            returns.append(sum(rewards))
        else:
            truncs[-1] = True  # cut by num_steps: the episode does not go on in the dataset
        episodes.append(
            EpisodeBuffer(
                id=len(episodes),
                seed=ep_seed,
                observations=np.stack(obs_list),  # [T + 1, O]
                actions=np.stack(actions),  # [T, A]
                rewards=np.array(rewards),  # [T]
                terminations=np.array(terms),
                truncations=np.array(truncs),
                infos={},
            )
        )
    return episodes, returns, time.time() - start


def write(staging: str, episodes: list, env: gym.Env, **metadata) -> None:
    """The Minari dataset of the episodes under the staging root, with the same files and metadata as minari's
    DataCollector.create_dataset writes (its per-episode reward statistics included), without jax."""
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed run
    os.makedirs(staging)
    os.environ["MINARI_DATASETS_PATH"] = staging  # where create_dataset_from_buffers writes
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*author_email.*")  # none to give
        dataset = minari.create_dataset_from_buffers(buffer=episodes, env=env, **metadata)
    dataset.storage.update_episode_metadata(dataset.storage.apply(EpisodeMetadataCallback()))


def publish(staging: str, root: str, dataset_id: str, work_dir: str) -> None:
    """Move the dataset made under the staging root into the root in one rename (same filesystem); an existing one
    (--overwrite) is moved aside first. The namespaces' metadata files are copied where missing."""
    final_dir = os.path.join(root, dataset_id)
    os.makedirs(os.path.dirname(final_dir), exist_ok=True)
    for ns in ("mujoco", os.path.dirname(dataset_id)):
        src, dst = (os.path.join(r, ns, "namespace_metadata.json") for r in (staging, root))
        if os.path.exists(src) and not os.path.exists(dst):
            shutil.copyfile(src, dst)
    replaced = os.path.join(work_dir, "replaced")
    shutil.rmtree(replaced, ignore_errors=True)
    if os.path.exists(final_dir):
        os.rename(final_dir, replaced)
    os.rename(os.path.join(staging, dataset_id), final_dir)
    shutil.rmtree(replaced, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)


def fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def sub_seed(seed: int, stream: int) -> int:
    """An independent seed for one use (1 evaluation, 2 recording) of the run's seed."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


if __name__ == "__main__":
    args = parse(Args, rules)
    stop = Stop()  # until armed, a signal exits at once (nothing to save yet)
    env_id, target = TARGETS[args.dataset_id]
    target = args.target_return if args.target_return is not None else target
    root = os.path.abspath(
        os.path.expanduser(
            args.root or os.environ.get("MINARI_DATASETS_PATH") or os.path.join("~", ".minari", "datasets")
        )
    )
    check(not os.path.isfile(root), f"the Minari root {root} is a file, not a folder; pass another --root")
    check_creatable(root, "the Minari root")
    final_dir = os.path.join(root, args.dataset_id)
    check(
        args.overwrite or not os.path.exists(final_dir),
        f"{final_dir} exists: the dataset {args.dataset_id} is already made; pass --overwrite to replace it",
    )
    # All of this run but the dataset: a hidden folder of the root (Minari skips hidden folders), same filesystem.
    work_dir = os.path.join(root, ".generate_locomotion", f"{args.dataset_id.replace('/', '__')}__seed{args.seed}")
    ckpt_path = os.path.join(work_dir, "checkpoint.pt")
    ckpt = None
    if args.resume and os.path.exists(ckpt_path):
        hint = "pass --no-resume to train from scratch"
        ckpt = load_checkpoint(ckpt_path, "the training checkpoint", FORMAT, ("args", "step", "actor", "buffer"), hint)
        changed = [f"--{k.replace('_', '-')} {v}" for k, v in ckpt["args"].items() if v != getattr(args, k)]
        check(
            not changed,
            f"the training checkpoint {ckpt_path} was trained with {', '.join(changed)}; rerun with "
            f"those flags to continue it, or {hint}",
        )

    # ---- set-up (everything above refused bad input without writing anything)
    torch.set_num_threads(1)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)  # minibatch indices
    env, eval_env = gym.make(env_id), gym.make(env_id)
    env.action_space.seed(args.seed)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    actor = Actor(obs_dim, act_dim, env.action_space.low, env.action_space.high)
    critic = Critic(obs_dim, act_dim)
    critic_target = Critic(obs_dim, act_dim)
    critic_target.load_state_dict(critic.state_dict())
    q_opt = torch.optim.Adam(critic.parameters(), lr=args.q_lr)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.policy_lr)
    log_alpha = torch.tensor(math.log(args.alpha), requires_grad=True)
    alpha_opt = torch.optim.Adam([log_alpha], lr=args.policy_lr)
    target_entropy = -float(act_dim)
    buffer = ReplayBuffer(args.buffer_size, obs_dim, act_dim)
    state = dict(
        actor=actor, critic=critic, critic_target=critic_target, q_opt=q_opt, actor_opt=actor_opt, alpha_opt=alpha_opt
    )  # what a checkpoint holds as state dicts
    step, last_eval, train_time = 0, -math.inf, 0.0
    if ckpt is not None:  # continue exactly where it stopped: networks, optimizers, buffer, RNGs (a new episode)
        for name, obj in state.items():
            obj.load_state_dict(ckpt[name])
        with torch.no_grad():
            log_alpha.copy_(ckpt["log_alpha"])
        buffer.load(ckpt["buffer"])
        rng.bit_generator.state = ckpt["rng"]["numpy"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        random.setstate(ckpt["rng"]["python"])
        step, last_eval, train_time = ckpt["step"], ckpt["eval_return"], ckpt["train_time"]
        print(f"resumed from step {step} of {ckpt_path} (last evaluation {last_eval:.1f})", flush=True)
    elif os.path.exists(ckpt_path):
        print(f"--no-resume: training from scratch (replacing {ckpt_path})", flush=True)

    def update(batch, actor_step: bool) -> dict:
        """One SAC gradient step on a minibatch; the actor and alpha only if actor_step."""
        obs, action, reward, next_obs, term = batch
        alpha = log_alpha.exp().detach() if args.autotune else args.alpha
        with torch.no_grad():  # soft Bellman target y = r + gamma (1 - term) (min_i Q'_i(s', a') - alpha log pi(a'|s'))
            next_action, next_log_prob = actor(next_obs)
            next_q = torch.min(*critic_target(next_obs, next_action)) - alpha * next_log_prob
            y = reward + args.gamma * (1 - term) * next_q  # [B]
        q1, q2 = critic(obs, action)
        q_loss = F.mse_loss(q1, y) + F.mse_loss(q2, y)
        q_opt.zero_grad()
        q_loss.backward()
        q_opt.step()
        info = {"losses/qf_loss": q_loss.detach()}
        if actor_step:  # delayed: policy_frequency actor steps every policy_frequency steps, as many as the critic's
            for _ in range(args.policy_frequency):
                action_pi, log_prob = actor(obs)
                actor_loss = (alpha * log_prob - torch.min(*critic(obs, action_pi))).mean()  # maximize Q + alpha H
                actor_opt.zero_grad()
                actor_loss.backward()
                actor_opt.step()
                if args.autotune:  # alpha grows while the entropy -log pi is below the target -|A|, shrinks above
                    alpha_loss = -(log_alpha.exp() * (log_prob.detach() + target_entropy)).mean()
                    alpha_opt.zero_grad()
                    alpha_loss.backward()
                    alpha_opt.step()
                    alpha = log_alpha.exp().detach()
            info.update({"losses/actor_loss": actor_loss.detach(), "losses/alpha": torch.as_tensor(alpha)})
        with torch.no_grad():  # Polyak averaging of the target critic: theta' <- (1 - tau) theta' + tau theta
            for p, p_target in zip(critic.parameters(), critic_target.parameters(), strict=True):
                p_target.lerp_(p, args.tau)
        return info

    def save_checkpoint():
        os.makedirs(work_dir, exist_ok=True)
        save(
            {
                "format": FORMAT,
                "args": {k: getattr(args, k) for k in SAC_KEYS},
                "dataset_id": args.dataset_id,
                "step": step,
                "eval_return": last_eval,
                "train_time": train_time,
                "log_alpha": log_alpha.detach(),
                **{name: obj.state_dict() for name, obj in state.items()},
                "buffer": buffer.state(),
                "rng": {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state(), "python": random.getstate()},
            },
            ckpt_path,
        )

    def interrupted():
        """A signal: save the checkpoint, say how to continue, exit with 128 + signum."""
        save_checkpoint()
        print(
            f"stopped at step {step}; checkpoint {ckpt_path}; rerun the same command to continue:\n  "
            f"{shlex.join(['python', *sys.argv])}",
            flush=True,
        )
        leave(stop.exit_code, env, eval_env)

    # ---- training: SAC until the evaluation return reaches the target, or --max-train-steps
    stop.armed = True  # from here a signal stops the run at the next step, with a checkpoint
    print(
        f"training SAC on {env_id} from step {step} until the evaluation return reaches {target:.1f} "
        f"(at most {args.max_train_steps} steps); checkpoint {ckpt_path}",
        flush=True,
    )
    eval_seed = sub_seed(args.seed, 1)
    start = time.time()
    try:
        if step == 0:
            last_eval, eval_std = evaluate(actor, eval_env, args.eval_episodes, eval_seed, stop)
            print(f"eval at step 0: {last_eval:.1f} +- {eval_std:.1f} (target {target:.1f})", flush=True)
        obs, _ = env.reset(seed=args.seed + step)  # a resumed run starts a new episode
        ep_return, returns = 0.0, deque(maxlen=10)
        last_step, last_print, info = step, time.time(), {}
        while last_eval < target and step < args.max_train_steps:
            action = env.action_space.sample() if step < args.learning_starts else act(actor, obs)
            next_obs, reward, terminated, truncated, _ = env.step(action)
            # a time-limit truncation is not a termination: the target still bootstraps from next_obs
            buffer.add(obs=obs, act=action, rew=reward, next_obs=next_obs, term=terminated)
            ep_return += float(reward)
            obs = next_obs
            if terminated or truncated:
                returns.append(ep_return)
                obs, ep_return = env.reset()[0], 0.0
            step += 1
            if step > args.learning_starts:
                info.update(update(buffer.sample(rng, args.batch_size), step % args.policy_frequency == 0))
            if step % args.eval_interval == 0:
                last_eval, eval_std = evaluate(actor, eval_env, args.eval_episodes, eval_seed, stop)
                print(f"eval at step {step}: {last_eval:.1f} +- {eval_std:.1f} (target {target:.1f})", flush=True)
            if step % args.checkpoint_interval == 0:
                train_time, start = train_time + time.time() - start, time.time()
                save_checkpoint()
                print(f"saved checkpoint at step {step}", flush=True)
            if time.time() - last_print >= 10:
                sps = (step - last_step) / (time.time() - last_print)  # env steps/s, updates and evaluations included
                last_step, last_print = step, time.time()
                losses = " | ".join(f"{k.split('/')[1]} {float(v):.3g}" for k, v in info.items())  # a sync, every 10 s
                print(
                    f"step {step} | return {np.mean(returns) if returns else float('nan'):.1f} (last "
                    f"{len(returns)} episodes) | eval {last_eval:.1f} | {losses} | {sps:.0f} SPS | ETA at most "
                    f"{fmt_time((args.max_train_steps - step) / sps)} (to --max-train-steps)",
                    flush=True,
                )
            if stop.requested():
                raise Interrupted
    except Interrupted:  # a signal, at a step or in an evaluation
        train_time += time.time() - start
        interrupted()
    train_time += time.time() - start
    reached = last_eval >= target
    save_checkpoint()
    print(
        f"{'target reached' if reached else 'target NOT reached'} at step {step}: evaluation return {last_eval:.1f} "
        f"{'>=' if reached else '<'} {target:.1f}; {step} training steps in {fmt_time(train_time)}"
        f"{'' if reached else ' (recording the policy as it is)'}",
        flush=True,
    )

    # ---- recording: --num-steps steps of the policy, written under a staging root, then one rename into place
    record_env = gym.make(env_id)
    episodes, returns, record_time = record(actor, record_env, args.num_steps, sub_seed(args.seed, 2), stop)
    mean_return = float(np.mean(returns)) if returns else float("nan")
    ref_min, ref_max = D4RL_REF[env_id]
    description = (
        f"Made locally by {SCRIPT}, not Minari's published data: {args.num_steps} steps of a SAC policy (sampled "
        f"actions) trained for {step} steps on {env_id}, seed {args.seed}. Its evaluation return {last_eval:.1f} "
        f"({args.eval_episodes} episodes) {'reached' if reached else 'did not reach'} the target {target:.1f} (D4RL's "
        f"levels: medium 1/3 of D4RL's expert return {ref_max}, expert all of it). The {len(returns)} complete "
        f"episodes return {mean_return:.1f} on average. Reference scores: D4RL's random and expert returns."
    )
    stop.armed = False  # from here a signal exits at once: the dataset appears whole (one rename) or not at all
    staging = os.path.join(work_dir, "staging")
    write(
        staging,
        episodes,
        record_env,
        dataset_id=args.dataset_id,
        eval_env=env_id,
        algorithm_name="SAC",
        author=AUTHOR,
        code_permalink=CODE_PERMALINK,
        ref_min_score=ref_min,
        ref_max_score=ref_max,
        description=description,
        requirements=[f"gymnasium=={gym.__version__}", f"mujoco=={mujoco.__version__}"],
    )
    publish(staging, root, args.dataset_id, work_dir)

    os.environ["MINARI_DATASETS_PATH"] = root
    dataset = minari.load_dataset(args.dataset_id)
    print(
        f"wrote {args.dataset_id} to {root}: {dataset.total_episodes} episodes, {dataset.total_steps} steps; the "
        f"{len(returns)} complete ones return {mean_return:.1f} on average (target {target:.1f}; D4RL-normalized "
        f"{100 * (mean_return - ref_min) / (ref_max - ref_min):.1f})",
        flush=True,
    )
    print(
        f"training {fmt_time(train_time)} ({step} steps); recording {fmt_time(record_time)} "
        f"({args.num_steps / max(record_time, 1e-9):.0f} steps/s)",
        flush=True,
    )
    leave(0, env, eval_env, record_env)
