"""dbpo_ppo.py: DBPO (PPO fine-tuning of a one-step DBP generator).

Unit tests import the script as a module (its __main__ block does not run): the exactness properties of
docs/algorithms.md §5 (stored-z ratio = 1, executed-prefix likelihood, anchor = 0 at the start), the Gaussian and its
clamp in the checkpoint's normalized action units, GAE with truncation, the chunk env (envs.ChunkEnv) and the rollout,
reward scaling, the log-prob clamp, the learning-rate schedules, the authors' defaults, the evaluation's policies, and
a learning test on a contextual bandit with a poorly initialized stand-in generator. The bad-input table runs the
script's __main__ in-process. Subprocess runs: smoke runs from checkpoints that dbp_bc.py makes on tiny data
(cube-single task 1, Hopper-v5), SIGTERM in a rollout and in an evaluation + resume, the non-finite guard,
--eval-only reproducing the logged evaluations, and tensorboard steps across resumes (tiny fresh-MLP Hopper
checkpoints). scripts/dbpo_report.py on tiny hand-made runs, and its refusals. Nothing touches ~/.ogbench.
"""

import contextlib
import functools
import glob
import importlib.util
import io
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import gymnasium as gym
import numpy as np
import pytest
import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "dbpo_ppo.py")
REPORT = os.path.join(ROOT, "scripts", "dbpo_report.py")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from inprocess import run_main  # noqa: E402

import envs  # noqa: E402

ENV = dict(os.environ, MUJOCO_GL="egl", PYTHONWARNINGS="ignore")
TINY = [
    "--num-threads",
    "1",
    "--num-iterations",
    "3",
    "--num-envs",
    "2",
    "--num-steps",
    "4",
    "--critic-warmup-iters",
    "2",
    "--update-epochs",
    "2",
    "--eval-episodes",
    "2",
    "--eval-envs",
    "2",
    "--eval-interval",
    "5",
]


@pytest.fixture(scope="module")
def D():
    """dbpo_ppo.py imported as a module."""
    spec = importlib.util.spec_from_file_location("dbpo_ppo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["dbpo_ppo"] = module  # tyro reads the Args docstrings from the module's source
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_thread():
    """Small tensors are much faster on one thread, especially on a shared CPU; restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def run(*flags, cwd, check=True, timeout=300):
    proc = subprocess.run(
        [sys.executable, SCRIPT, *flags], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=timeout
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def contract_checkpoint(D, obs_dim, act_dim, To=2, Tp=4, Ta=2, env_id="Hopper-v5", hidden=64):
    """A checkpoint in dbp_bc.py's format (keys: docs/dbpo.md, checkpoint contract) with a fresh MLP generator."""
    kwargs = dict(obs_dim=obs_dim, action_dim=act_dim, obs_horizon=To, pred_horizon=Tp, hidden_dim=hidden, num_layers=2)
    generator = D.make_generator("mlp", **kwargs)
    return {
        "format": "dbp-v1",
        "args": {},
        "env_id": env_id,
        "obs_dim": obs_dim,
        "action_dim": act_dim,
        "obs_horizon": To,
        "pred_horizon": Tp,
        "action_horizon": Ta,
        "backbone": "mlp",
        "generator_kwargs": kwargs,
        "loss": "drift",
        "model": generator.state_dict(),
        "step": 0,
        "obs_offset": torch.zeros(obs_dim),
        "obs_scale": torch.ones(obs_dim),
        "action_offset": torch.zeros(act_dim),
        "action_scale": torch.ones(act_dim),
        "action_low": -torch.ones(act_dim),
        "action_high": torch.ones(act_dim),
    }


def generator(D, ckpt):
    """dbp_bc.py's generator of a checkpoint (imported by dbpo_ppo.py), with its weights."""
    gen = D.make_generator(ckpt["backbone"], **ckpt["generator_kwargs"])
    gen.load_state_dict(ckpt["model"])
    return gen


def make_agent(D, ckpt, **kw):
    return D.DBPOAgent(ckpt, generator(D, ckpt), generator(D, ckpt), **kw)


# ---------------------------------------------------------------- checkpoints made by dbp_bc.py on tiny data
def train_dbp(tmp, *flags):
    runs = tmp / "runs"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "dbp_bc.py"),
        *flags,
        "--total-steps",
        "20",
        "--batch-size",
        "8",
        "--hidden-dim",
        "32",
        "--num-layers",
        "2",
        "--obs-horizon",
        "2",
        "--pred-horizon",
        "8",
        "--action-horizon",
        "4",
        "--backbone",
        "mlp",
        "--warmup-epochs",
        "0",
        "--eval-interval",
        "0",
        "--eval-episodes",
        "1",
        "--log-interval",
        "10",
        "--num-threads",
        "1",
        "--save-model",
        "--runs-dir",
        str(runs),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=tmp, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    paths = glob.glob(str(runs / "*" / "dbp_bc.pt"))
    assert len(paths) == 1, paths
    return paths[0]


@pytest.fixture(scope="module")
def cube_checkpoint(tmp_path_factory):
    """dbp_bc.py on 2 (+1 val) expert episodes of 40 steps for cube-single task 1."""
    tmp = tmp_path_factory.mktemp("cube")
    gen = [
        sys.executable,
        os.path.join(ROOT, "scripts", "generate_ogbench_dataset.py"),
        "--env",
        "cube-single-play",
        "--kind",
        "expert",
        "--task",
        "1",
        "--episodes",
        "2",
        "--episode-length",
        "40",
        "--workers",
        "1",
        "--out-dir",
        str(tmp),
    ]
    proc = subprocess.run(gen, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return train_dbp(
        tmp, "--env", "cube-single-play", "--task", "1", "--dataset-path", str(tmp / "cube-single-expert-task1-v0.npz")
    )


@pytest.fixture(scope="module")
def hopper_checkpoint(tmp_path_factory):
    """dbp_bc.py on a tiny D4RL-layout npz for Hopper-v5 (2 episodes of 30 random steps)."""
    tmp = tmp_path_factory.mktemp("hopper")
    rng = np.random.default_rng(0)
    n = 60
    timeouts = np.zeros(n, bool)
    timeouts[[29, 59]] = True
    np.savez(
        tmp / "hopper.npz",
        observations=rng.normal(size=(n, 11)).astype(np.float32),
        actions=rng.uniform(-1, 1, (n, 3)).astype(np.float32),
        rewards=rng.normal(size=n).astype(np.float32),
        terminals=np.zeros(n, bool),
        timeouts=timeouts,
    )
    return train_dbp(tmp, "--env", "Hopper-v5", "--dataset-path", str(tmp / "hopper.npz"))


# ---------------------------------------------------------------- unit tests
def test_a_dbp_checkpoint_from_before_the_depth_rename_is_fine_tuned(D):
    """Older dbp_bc.py checkpoints store --num-layers as generator_kwargs['depth']; build_agent reads it (its 2
    layers; missed, the default 3 would not fit the weights and the load would stop with an error)."""
    ckpt = contract_checkpoint(D, 3, 2)
    reference = generator(D, ckpt)  # built under the new name
    ckpt["generator_kwargs"]["depth"] = ckpt["generator_kwargs"].pop("num_layers")
    agent, _, _ = D.build_agent(ckpt, None, D.Args(checkpoint="old.pt"))
    obs, z = torch.randn(4, 2, 3), torch.randn(4, 4, 2)
    torch.testing.assert_close(agent.dist_params(obs, z)[0], reference(obs, z))


def test_log_std_head_starts_at_init_std_and_is_clamped(D):
    ckpt = contract_checkpoint(D, 3, 2)
    agent = make_agent(D, ckpt)
    obs, z = torch.randn(16, 2, 3), torch.randn(16, 4, 2)
    mu, std = agent.dist_params(obs, z)
    assert mu.shape == std.shape == (16, 4, 2)
    torch.testing.assert_close(std, torch.full_like(std, 0.03))  # zero weights, bias log 0.03
    torch.testing.assert_close(mu, agent.anchor(obs, z))  # mean = the pretrained generator's output
    with torch.no_grad():
        agent.log_std_head.bias.fill_(5.0)
    assert torch.allclose(agent.dist_params(obs, z)[1], torch.tensor(0.10))  # clamped to [0.03, 0.10]
    with torch.no_grad():
        agent.log_std_head.bias.fill_(-9.0)
    assert torch.allclose(agent.dist_params(obs, z)[1], torch.tensor(0.03))


def test_prefix_log_likelihood_ignores_the_unexecuted_suffix(D):
    To, Tp, Ta, da = 3, 8, 4, 2  # executed coordinates: chunk indices 2..5
    mu, std = torch.randn(5, Tp, da), torch.rand(5, Tp, da) + 0.1
    chunk = mu + std * torch.randn(5, Tp, da)
    logp = D.prefix_log_prob(mu, std, chunk, To, Ta, normalize=False)
    # against the Gaussian density written out over indices To-1 .. To-2+Ta
    sl = slice(To - 1, To - 1 + Ta)
    manual = (-0.5 * ((chunk[:, sl] - mu[:, sl]) / std[:, sl]) ** 2 - std[:, sl].log() - 0.5 * np.log(2 * np.pi)).sum(
        (1, 2)
    )
    torch.testing.assert_close(logp, manual)
    torch.testing.assert_close(D.prefix_log_prob(mu, std, chunk, To, Ta, normalize=True), manual / (Ta * da))
    changed = chunk.clone()
    changed[:, : To - 1] += 3.0  # history part of the chunk
    changed[:, To - 1 + Ta :] -= 5.0  # unexecuted suffix
    torch.testing.assert_close(D.prefix_log_prob(mu, std, changed, To, Ta, False), logp, rtol=0, atol=0)
    mu2 = mu.clone()
    mu2[:, To - 1 + Ta :] += 1.0  # the suffix of the mean does not matter either
    torch.testing.assert_close(D.prefix_log_prob(mu2, std, chunk, To, Ta, False), logp, rtol=0, atol=0)
    for k in (To - 1, To - 2 + Ta):  # but the first and the last executed step do
        changed = chunk.clone()
        changed[:, k] += 0.5
        assert not torch.allclose(D.prefix_log_prob(mu, std, changed, To, Ta, False), logp)


def test_stored_latent_gives_ratio_one_and_anchor_zero_before_the_first_update(D, one_thread):
    """Roll out a real env (Hopper-v5 through envs.ChunkEnv) with the training loop's rollout(), then evaluate the
    whole batch and a shuffled minibatch with the update's loss: every ratio is 1, the anchor is exactly 0."""
    ckpt = contract_checkpoint(D, 11, 3, To=2, Tp=8, Ta=4)
    agent = make_agent(D, ckpt)
    train_envs = gym.vector.SyncVectorEnv(
        [functools.partial(envs.make_chunk_env, "Hopper-v5", 4, 2)] * 3,
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    obs, _ = train_envs.reset(seed=0)
    args = D.Args(num_steps=10, num_envs=3)
    obs, buf, (steps, _, _) = D.rollout(
        agent, train_envs, obs, args, stop=type("NoStop", (), {"check": lambda self: None})()
    )
    train_envs.close()
    assert buf["obs"].shape == (10, 3, 2, 11) and buf["z"].shape == buf["chunk"].shape == (10, 3, 8, 3)
    assert 10 * 3 <= steps <= 10 * 3 * 4  # Ta = 4 env steps per decision, fewer where an episode ended
    b = {k: buf[k].flatten(0, 1) for k in ("obs", "z", "chunk")} | {"logp": buf["logprob"].flatten()}
    n = len(b["logp"])
    perm = torch.randperm(n)
    for idx in (torch.arange(n), perm[: n // 2]):
        _, info = D.dbpo_loss(
            agent,
            b["obs"][idx],
            b["z"][idx],
            b["chunk"][idx],
            b["logp"][idx],
            torch.randn(len(idx)),
            torch.randn(len(idx)),
            torch.randn(len(idx)),
            args,
        )
        torch.testing.assert_close(info["ratio"], torch.ones(len(idx)), rtol=0, atol=1e-5)
        assert info["anchor_loss"].item() == 0.0
        assert abs(info["approx_kl"].item()) < 1e-6
    # the stored z is what makes the ratio exact: a fresh latent gives a different likelihood
    _, info = D.dbpo_loss(
        agent,
        b["obs"],
        torch.randn_like(b["z"]),
        b["chunk"],
        b["logp"],
        torch.randn(n),
        torch.randn(n),
        torch.randn(n),
        args,
    )
    assert (info["ratio"] - 1).abs().max() > 0.1
    # after one actor step the anchor is positive and the ratio moves
    actor_opt = torch.optim.Adam(agent.actor_parameters(), lr=1e-3)
    critic_opt = torch.optim.Adam(agent.critic.parameters(), lr=1e-3)
    mb = (b["obs"], b["z"], b["chunk"], b["logp"], torch.randn(n), torch.randn(n), torch.randn(n))
    D.update(agent, actor_opt, critic_opt, mb, args, update_actor=True)
    _, info = D.dbpo_loss(agent, *mb, args)
    assert info["anchor_loss"].item() > 0
    assert (info["ratio"] - 1).abs().max() > 1e-4


def test_actions_are_clipped_to_the_data_range_within_the_env_bounds(D):
    """The authors' clamp to [-1, 1] acts in normalized units u = (a - offset) / scale, i.e. at the data's min and max
    (dim 0: offset 0.5, scale 0.25 -> a in [0.25, 0.75]), and never beyond the env's bounds (dim 1: u = +-1 would be
    a = +-2, outside [-1, 1])."""
    ckpt = contract_checkpoint(D, 3, 2)
    ckpt["action_offset"], ckpt["action_scale"] = torch.tensor([0.5, 0.0]), torch.tensor([0.25, 2.0])
    agent = make_agent(D, ckpt)
    obs, z = torch.randn(4, 2, 3), torch.randn(4, 4, 2)
    for sign, expected in ((1, [0.75, -1.0]), (-1, [0.25, 1.0])):
        with torch.no_grad():  # the mean far outside the bounds: +-100 in dim 0, -+100 in dim 1
            agent.generator.net[-1].bias.copy_(sign * torch.tensor([100.0, -100.0]).repeat(4))
        for noise in (None, torch.randn(4, 4, 2)):  # the mean path and a sample
            chunk, logp = agent.act(obs, z, noise)
            actions = agent.env_actions(chunk)  # [B, Ta, act_dim] in env units
            assert actions.shape == (4, 2, 2)
            np.testing.assert_allclose(actions, np.broadcast_to(expected, (4, 2, 2)), atol=1e-6)
            assert torch.isfinite(logp).all()


def test_a_non_identity_action_normalizer_puts_the_noise_in_normalized_units(D):
    """std 0.05 is 0.05 normalized units, as in the authors' code: in env units it is 0.05 * action_scale per dim; the
    mean and the log-likelihood are those of the normalized chunk, and the anchor is the generator's own output."""
    ckpt = contract_checkpoint(D, 3, 2)
    ckpt["action_offset"], ckpt["action_scale"] = torch.tensor([0.2, -0.1]), torch.tensor([0.25, 0.5])
    ckpt["action_low"], ckpt["action_high"] = -10 * torch.ones(2), 10 * torch.ones(2)
    agent = make_agent(D, ckpt, init_std=0.05, min_std=0.05, max_std=0.05)
    obs, z = torch.randn(1, 2, 3).expand(20_000, 2, 3), torch.randn(1, 4, 2).expand(20_000, 4, 2)
    torch.testing.assert_close(agent.dist_params(obs, z)[0], agent.anchor(obs, z))  # u: the generator's output
    torch.testing.assert_close(agent.anchor_mean(obs, z), agent.anchor(obs, z))
    with torch.no_grad():  # mu(s, z) = 0 in u: a = offset, far inside the clamp
        agent.generator.net[-1].weight.zero_()
        agent.generator.net[-1].bias.zero_()
    mu, std = agent.dist_params(obs, z)
    torch.manual_seed(0)
    noise = torch.randn(20_000, 4, 2)
    chunk, logp = agent.act(obs, z, noise)
    torch.testing.assert_close(chunk, mu + 0.05 * noise.clamp(-3, 3))  # the noise added in u, before unnormalizing
    torch.testing.assert_close(logp, D.prefix_log_prob(mu, std, chunk, 2, 2))
    actions = agent.env_actions(chunk)  # [B, Ta, act_dim] env units
    np.testing.assert_allclose(actions.std(axis=(0, 1)), 0.05 * np.array([0.25, 0.5]), rtol=0.03)
    mean_path = agent.env_actions(agent.act(obs, z)[0])
    np.testing.assert_allclose(mean_path, np.broadcast_to(ckpt["action_offset"].numpy(), mean_path.shape), atol=1e-3)


def test_gae_bootstraps_through_truncation_but_not_termination(D):
    gamma, lam = 0.9, 1.0  # lambda = 1: advantages + values = discounted returns
    rewards = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    values = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]])
    # env 0 terminates at t=1; env 1 is truncated at t=1 with V(final obs) = 2 folded into its reward
    dones = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    rewards[1, 1] += gamma * 2.0
    next_value = torch.tensor([4.0, 4.0])
    adv, ret = D.compute_gae(rewards, values, dones, next_value, gamma, lam)
    expected = torch.tensor(
        [[1 + gamma * 1, 1 + gamma * (1 + gamma * 2.0)], [1.0, 1 + gamma * 2.0], [1 + gamma * 4, 1 + gamma * 4]]
    )
    torch.testing.assert_close(ret, expected)
    torch.testing.assert_close(adv, expected - values)


class CountingEnv(gym.Env):
    """obs = [t], reward = t + 1 at step t, terminates after `length` steps."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float32)
    action_space = gym.spaces.Box(-1, 1, (2,), np.float32)

    def __init__(self, length):
        self.length = length

    def reset(self, seed=None, options=None):
        self.t = 0
        return np.array([0.0], np.float32), {}

    def step(self, action):
        self.t += 1
        return np.array([self.t], np.float32), float(self.t), self.t >= self.length, False, {}


def test_chunk_env_executes_the_prefix_sums_rewards_and_stops_at_the_episode_end(D):
    env = envs.ChunkEnv(CountingEnv(length=5), 3, obs_horizon=3)  # the chunk env dbpo_ppo.py steps: To = Ta = 3
    assert env.observation_space.shape == (3, 1) and env.action_space.shape == (3, 2)
    obs, _ = env.reset()
    np.testing.assert_array_equal(obs[:, 0], [0, 0, 0])  # the first observation repeated To times
    obs, reward, terminated, truncated, _ = env.step(np.zeros((3, 2), np.float32))
    np.testing.assert_array_equal(obs[:, 0], [1, 2, 3])
    assert reward == 1 + 2 + 3 and not terminated and env.executed_steps == 3
    obs, reward, terminated, truncated, _ = env.step(np.zeros((3, 2), np.float32))
    assert reward == 4 + 5 and terminated and env.executed_steps == 5  # stopped inside the chunk
    np.testing.assert_array_equal(obs[:, 0], [3, 4, 5])


def test_time_limits_are_terminal_by_default_and_bootstrapped_with_the_flag(D):
    """Authors' code: gym's TimeLimit gives `done`, so a time-limit end is terminal (no bootstrap);
    --bootstrap-timeouts adds gamma * V(final obs) to the truncated decision's reward instead. Time limit 4 env steps
    = 2 chunks of Ta = 2."""
    ckpt = contract_checkpoint(D, 1, 2, To=2, Tp=4, Ta=2)
    agent = make_agent(D, ckpt)
    stop = type("Stop", (), {"check": lambda self: None})()

    def make():
        return envs.ChunkEnv(gym.wrappers.RecordEpisodeStatistics(gym.wrappers.TimeLimit(CountingEnv(100), 4)), 2, 2)

    for bootstrap in (False, True):
        train_envs = gym.vector.SyncVectorEnv([make] * 2, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
        next_obs, _ = train_envs.reset(seed=0)
        args = D.Args(num_steps=3, num_envs=2, bootstrap_timeouts=bootstrap)
        _, buf, (steps, returns, _) = D.rollout(agent, train_envs, next_obs, args, stop)
        assert (
            buf["done"].tolist() == [[False, False], [True, True], [False, False]]
            and returns == [10.0, 10.0]
            and steps == 12
        )
        final = torch.tensor([[[3.0], [4.0]]] * 2)  # the last To observations of the ended episodes
        expected = (
            torch.zeros(3, 2)
            if not bootstrap
            else torch.stack([torch.zeros(2), args.gamma * agent.get_value(final).detach(), torch.zeros(2)])
        )
        torch.testing.assert_close(buf["bootstrap"], expected)


def test_normalizer_is_trained_by_the_actor_optimizer_unless_frozen(D):
    """Authors' code: the fine-tuned actor is a deep copy with requires_grad=True everywhere, so its normalizer (x_n =
    x * scale + offset, here gain and bias) is in the actor's AdamW; --freeze-normalizer keeps it. The anchor's never
    moves."""
    ckpt = contract_checkpoint(D, 3, 2)
    ckpt["obs_offset"], ckpt["obs_scale"] = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([2.0, 4.0, 0.5])
    ckpt["action_offset"], ckpt["action_scale"] = torch.tensor([0.1, 0.0]), torch.tensor([0.5, 2.0])
    obs, z = torch.randn(8, 2, 3), torch.randn(8, 4, 2)
    for train in (True, False):
        agent = make_agent(D, ckpt, train_normalizer=train)
        ids = {id(p) for p in agent.actor_parameters()}
        assert all(
            (id(getattr(agent, f"{k}_{n}")) in ids) == train for k in ("obs", "action") for n in ("gain", "bias")
        )
        torch.testing.assert_close(agent.normalize_obs(obs), (obs - ckpt["obs_offset"]) / ckpt["obs_scale"])
        torch.testing.assert_close(
            agent.dist_params(obs, z)[0], agent.anchor_mean(obs, z)
        )  # the same policy at the start
        anchor_before = agent.anchor_mean(obs, z)
        opt = torch.optim.AdamW(agent.actor_parameters(), lr=1e-2)
        agent.dist_params(obs, z)[0].square().sum().backward()
        opt.step()
        assert torch.equal(agent.obs_gain.detach(), 1 / ckpt["obs_scale"]) != train  # moved only when trained
        torch.testing.assert_close(agent.anchor_mean(obs, z), anchor_before, rtol=0, atol=0)
        # the critic reads the observation through the checkpoint's normalizer, fixed (the authors' env wrapper's)
        expected = agent.critic(((obs - ckpt["obs_offset"]) / ckpt["obs_scale"]).flatten(1)).squeeze(-1)
        torch.testing.assert_close(agent.get_value(obs), expected, rtol=0, atol=0)


def test_ppo_improves_a_contextual_bandit_and_the_anchor_limits_drift(D, one_thread):
    """A one-step task: reward = -||A_exec - target(s)||^2 with a generator initialized far from the target.
    PPO (the script's act / compute_gae / update) raises the return within seconds; with anchor_coef = 0
    the generator moves further from its initialization than with the default anchor_coef = 1."""
    To, Tp, Ta, do, da, B = 2, 4, 2, 2, 2, 256

    def train(anchor_coef, iterations=8):
        torch.manual_seed(0)
        ckpt = contract_checkpoint(D, do, da, To, Tp, Ta)
        gen = generator(D, ckpt)
        with torch.no_grad():
            gen.net[-1].bias.fill_(-0.6)  # poorly initialized: every action near -0.6
        ckpt["model"] = gen.state_dict()
        args = D.Args(
            anchor_coef=anchor_coef,
            actor_lr=1e-3,
            critic_lr=1e-3,
            init_std=0.1,
            min_std=0.05,
            max_std=0.3,
            clip_coef=0.2,
            target_kl=None,
        )
        agent = make_agent(D, ckpt, init_std=args.init_std, min_std=args.min_std, max_std=args.max_std)
        actor_opt = torch.optim.Adam(agent.actor_parameters(), lr=args.actor_lr)
        critic_opt = torch.optim.Adam(agent.critic.parameters(), lr=args.critic_lr)
        probe_obs, probe_z = (torch.rand(512, 1, do) * 2 - 1).repeat(1, To, 1), torch.randn(512, Tp, da)

        def reward(obs, chunk):
            target = torch.stack([0.5 * obs[:, -1, 0], -0.5 * obs[:, -1, 1]], -1)[:, None]  # [B, 1, da]
            return -((D.executed(chunk, To, Ta) - target) ** 2).mean((1, 2))

        def mean_path_return():
            return reward(probe_obs, agent.act(probe_obs, probe_z)[0]).mean().item()

        with torch.no_grad():
            mu_init = agent.generator(probe_obs, probe_z)
        before = mean_path_return()
        for _ in range(iterations):
            obs = (torch.rand(B, 1, do) * 2 - 1).repeat(1, To, 1)
            z = agent.sample_latent(B)
            chunk, logp = agent.act(obs, z, torch.randn_like(z), args.noise_clip)
            with torch.no_grad():
                values = agent.get_value(obs)
            adv, ret = D.compute_gae(
                reward(obs, chunk)[None], values[None], torch.ones(1, B), torch.zeros(B), args.gamma, args.gae_lambda
            )
            for _ in range(args.update_epochs):
                perm = torch.randperm(B)
                for start in range(0, B, 64):
                    mb = perm[start : start + 64]
                    D.update(
                        agent,
                        actor_opt,
                        critic_opt,
                        (obs[mb], z[mb], chunk[mb], logp[mb], adv[0, mb], ret[0, mb], values[mb]),
                        args,
                        True,
                    )
        with torch.no_grad():
            drift = ((agent.generator(probe_obs, probe_z) - mu_init) ** 2).mean().item()
        return before, mean_path_return(), drift

    before, after, drift_anchor = train(anchor_coef=1.0)
    assert before < -0.3 and after > before + 0.2, (before, after)
    _, after_free, drift_free = train(anchor_coef=0.0)
    assert after_free > before + 0.2
    assert drift_free > 1.15 * drift_anchor, (drift_free, drift_anchor)


def test_presets_follow_the_authors_code(D):
    """The defaults of the built config and of --help (authors' configs/finetune.yaml and ppo_adapter.py)."""
    args = tyro.cli(D.Args, args=[])
    expected = dict(
        num_iterations=1500,
        num_envs=40,
        num_steps=500,
        minibatch_size=50000,
        update_epochs=5,
        gamma=0.99,
        gae_lambda=0.95,
        clip_coef=0.02,
        ent_coef=0.01,
        vf_coef=0.5,
        anchor_coef=1.0,
        max_grad_norm=0.5,
        target_kl=0.02,
        critic_warmup_iters=5,
        actor_lr=1e-5,
        actor_min_lr=3e-6,
        critic_lr=1e-4,
        critic_min_lr=3e-5,
        lr_warmup_iters=10,
        lr_cycle_iters=None,
        weight_decay=1e-6,
        reward_scaling="rollout_std",
        logprob_min=-2.0,
        init_std=0.03,
        min_std=0.03,
        max_std=0.10,
        noise_clip=3.0,
        normalize_logprob=True,
        eval_interval=10,
        eval_episodes=100,
        eval_envs=10,
        eval_episodes_ends=None,
        eval_sampled=False,
        bootstrap_timeouts=False,
        freeze_normalizer=False,
        save_model=True,
        num_threads=0,
        clip_vloss=None,
    )
    assert {k: getattr(args, k) for k in expected} == expected
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        tyro.cli(D.Args, args=["--help"])
    text = " ".join(out.getvalue().split())
    for flag, default in (
        ("--reward-scaling", "rollout_std"),
        ("--logprob-min", "-2.0"),
        ("--actor-lr", "1e-05"),
        ("--critic-min-lr", "3e-05"),
        ("--lr-warmup-iters", "10"),
        ("--eval-interval", "10"),
        ("--eval-episodes", "100"),
        ("--eval-envs", "10"),
        ("--save-model", "True"),
    ):
        assert flag in text and f"(default: {default})" in text, flag


def test_reward_scaling_modes_on_a_hand_computed_rollout(D):
    """rollout_std (authors' code): r / (std over the whole rollout + 1e-8); here std = sqrt(4.6875). running: r / std
    of the discounted returns G seen so far (G reset after an episode's end), carried across rollouts."""
    rewards = np.array([[-8.0, -8.0], [-8.0, -3.0]])  # mean -6.75; deviations -1.25 (x3), 3.75
    np.testing.assert_allclose(D.rollout_std_scaling(rewards), rewards / (np.sqrt((3 * 1.25**2 + 3.75**2) / 4) + 1e-8))
    np.testing.assert_allclose(D.rollout_std_scaling(rewards), rewards / 2.1650635094610966, rtol=1e-7)
    scaler = D.RunningRewardScaler(gamma=0.5, num_envs=2)
    dones = np.array([[True, False], [False, False]])  # env 0's episode ends at t = 0
    g = np.array([[-8.0, -8.0], [-8.0, -3.0 - 0.5 * 8.0]])  # G_t = r_t + 0.5 G_{t-1}, env 0 restarted at t = 1
    # gymnasium's RunningMeanStd starts at count 1e-4 (mean 0, var 1): within 1% of the plain variance here
    np.testing.assert_allclose(scaler(rewards, dones), rewards / np.sqrt(g.var()), rtol=1e-2)
    np.testing.assert_allclose(scaler.returns, [-8.0, -7.0])  # carried into the next rollout
    second = np.array([[1.0, 1.0]])
    g2 = np.array([-8.0 * 0.5 + 1.0, -7.0 * 0.5 + 1.0])
    both = np.concatenate([g.ravel(), g2])  # the running variance covers every G so far
    np.testing.assert_allclose(scaler(second, np.zeros((1, 2), bool)), second / np.sqrt(both.var()), rtol=1e-2)


def test_log_prob_clamp_binds_below_minus_two(D):
    """Where the stored and the new normalized log-likelihoods are both below -2, the clamp makes the ratio exactly 1
    and the policy term gives no gradient; without the clamp the same samples move the ratio."""
    ckpt = contract_checkpoint(D, 3, 2)
    agent = make_agent(D, ckpt)
    obs, z = torch.randn(32, 2, 3), torch.randn(32, 4, 2)
    mu, std = agent.dist_params(obs, z)
    chunk = (mu + 0.3).detach()  # 10 std away: normalized log-likelihood 2.59 - 50 << -2
    old = D.prefix_log_prob(mu, std, chunk, 2, 2).detach()
    assert (old < -2).all()
    with torch.no_grad():
        agent.generator.net[-1].bias.add_(0.01)  # a small policy change
    adv, zeros = torch.randn(32), torch.zeros(32)
    args = D.Args(ent_coef=0.0, vf_coef=0.0, anchor_coef=0.0)
    loss, info = D.dbpo_loss(agent, obs, z, chunk, old, adv, zeros, zeros, args)
    assert (info["ratio"] == 1).all()
    loss.backward()
    assert all(p.grad is None or (p.grad == 0).all() for p in agent.generator.parameters())
    _, info = D.dbpo_loss(agent, obs, z, chunk, old, adv, zeros, zeros, D.Args(logprob_min=None))
    assert (info["ratio"] - 1).abs().min() > 1e-3


def test_learning_rate_schedules_at_key_iterations(D):
    """Authors' CosineAnnealingWarmupRestarts(first_cycle_steps=1500, warmup_steps=10): min at 0, linear to the
    peak at 10, cosine half-way back at 10 + 745, min at the end of the cycle, restart after it."""
    for peak, low in ((1e-5, 3e-6), (1e-4, 3e-5)):
        expected = {0: low, 5: (low + peak) / 2, 10: peak, 755: (low + peak) / 2, 1500: low, 1510: peak}
        for k, lr in expected.items():
            assert D.scheduled_lr(k, peak, low, 10, 1500) == pytest.approx(lr), k
        assert D.scheduled_lr(1499, peak, low, 10, 1500) == pytest.approx(low, rel=1e-4)
        assert D.scheduled_lr(123, peak, peak, 10, 1500) == pytest.approx(peak)  # min = peak: a constant lr


def test_evaluation_policies_draw_each_episodes_latent_and_noise_from_its_own_generator(D):
    """envs.evaluate's act: the mean path, and the sampled policy, with z (and the noise) from each episode's
    generator, so an episode's actions do not depend on which other episodes share the batch; an mse checkpoint keeps
    z = 0. The sampled policy differs from the mean path by at most noise_clip stds."""
    ckpt = contract_checkpoint(D, 3, 2, To=2, Tp=4, Ta=2)
    obs = np.random.default_rng(0).normal(size=(2, 2, 3)).astype(np.float32)
    gens = lambda: [envs.episode_generator(7, 0), envs.episode_generator(7, 1)]  # noqa: E731  (fresh streams per call)
    for loss in ("drift", "mse"):
        agent = make_agent(D, {**ckpt, "loss": loss})
        both = {s: D.eval_act(agent, s, 3.0, obs, gens()) for s in (False, True)}
        for sampled in (False, True):
            alone = [D.eval_act(agent, sampled, 3.0, obs[i : i + 1], [gens()[i]]) for i in range(2)]
            assert both[sampled].shape == (2, 2, 2)  # [B, Ta, act_dim] in env units
            np.testing.assert_allclose(both[sampled], np.concatenate(alone), atol=1e-6)  # up to float rounding
        zero = agent.env_actions(agent.act(torch.as_tensor(obs), torch.zeros(2, 4, 2))[0])  # the mean path at z = 0
        assert np.allclose(both[False], zero, atol=1e-6) == (loss == "mse")
        gap = np.abs(both[True] - both[False])
        assert 0 < gap.max() <= 3.0 * 0.03 + 1e-6  # std 0.03 (normalized units = env units here), noise clip 3


def test_evaluation_lines_scalars_and_csvs_of_both_policies_and_an_interrupted_one_logs_nothing(
    D, monkeypatch, tmp_path
):
    """Each policy's line with the binomial standard error, its eval/* or eval_sampled/* scalars and its CSV rows
    (the same seeds); the video only of the mean path."""
    logged, calls = [], []
    writer = type("Writer", (), {"add_scalar": lambda self, *a: logged.append(a), "log_dir": str(tmp_path)})()
    stop = type("Stop", (), {"requested": False, "check": lambda self: None})()

    def evaluate(eval_envs, act, episodes, seed, stop, video):
        sampled = act.args[1]  # functools.partial(eval_act, agent, sampled, noise_clip)
        calls.append((sampled, episodes, seed, video))
        rows = np.array([[np.nan, -3.5, 38.0], [np.nan, -2.5, 42.0]]) + [0, 10 * sampled, 0]
        return {"success": 0.25, "return": -3.0 + 10 * sampled, "length": 40.0, "episodes": rows}

    monkeypatch.setattr(D.envs, "evaluate", evaluate)
    args = D.Args(eval_sampled=True, noise_clip=2.0)
    line = D.evaluate_and_log(None, None, args, stop, 48, writer, iteration=7, global_step=99, video="v.mp4")
    se = (0.25 * 0.75 / 48) ** 0.5  # sqrt(p (1 - p) / n)
    assert line == (
        f"return -3.0000 | length 40.00 | success 0.2500 +- {se:.4f} (48 episodes, mean path) || "
        f"return 7.0000 | length 40.00 | success 0.2500 +- {se:.4f} (48 episodes, sampled)"
    )
    assert calls == [(False, 48, 100_001, "v.mp4"), (True, 48, 100_001, None)]
    for prefix, ret in (("eval", -3.0), ("eval_sampled", 7.0)):
        assert {k: (v, s) for k, v, s in logged if k.startswith(prefix + "/")} == {
            f"{prefix}/episodic_return": (ret, 7),
            f"{prefix}/episodic_length": (40.0, 7),
            f"{prefix}/success_rate": (0.25, 7),
            f"{prefix}/success_stderr": (se, 7),
            f"{prefix}/env_steps": (99, 7),
        }
    for name, ret in (("eval_episodes.csv", -3.5), ("eval_episodes_sampled.csv", 6.5)):
        rows = np.loadtxt(tmp_path / name, delimiter=",", skiprows=1)  # step, env steps, episode, env seed, ...
        np.testing.assert_equal(
            rows, [[7, 99, 0, 100_001, np.nan, ret, 38.0], [7, 99, 1, 100_002, np.nan, ret + 1, 42]]
        )
    logged.clear()
    monkeypatch.setattr(D.envs, "evaluate", lambda *a, **k: None)  # stopped by a signal
    stop.check = lambda: (_ for _ in ()).throw(D.runs.Interrupted())
    with pytest.raises(D.runs.Interrupted):
        D.evaluate_and_log(None, None, D.Args(), stop, 2, writer)
    assert logged == []


# ---------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def bad_files(D, tmp_path_factory):
    """{name: path} of the files the refusal table passes as @name: a good Hopper checkpoint and bad ones."""
    inp = tmp_path_factory.mktemp("bad_input")
    paths = {"good": str(inp / "hopper.pt"), "missing": str(inp / "missing.pt"), "notes": str(inp / "notes.txt")}
    paths["under_a_file"] = str(inp / "notes.txt" / "runs")
    (inp / "notes.txt").write_text("hello")

    def save(name, obj):
        paths[name] = str(inp / f"{name}.pt")
        torch.save(obj, paths[name])

    save("good", contract_checkpoint(D, 11, 3))
    with open(paths["good"], "rb") as f:
        (inp / "truncated.pt").write_bytes(f.read()[:500])
    paths["truncated"] = str(inp / "truncated.pt")
    save("dfp", {"format": "dfp-v1", "actor": {}})
    save("state_as_ckpt", {"format": "dbpo-state-v1"})
    save("pendulum", contract_checkpoint(D, 11, 3, env_id="Pendulum-v1"))
    save("dims", contract_checkpoint(D, 12, 3))
    nan = contract_checkpoint(D, 11, 3)
    nan["model"]["net.0.weight"][0, 0] = float("nan")
    save("nan", nan)
    misfit = contract_checkpoint(D, 11, 3)
    misfit["generator_kwargs"]["hidden_dim"] = 48
    save("misfit", misfit)
    horizons = contract_checkpoint(D, 11, 3)
    horizons["action_horizon"] = 4  # To - 1 + Ta = 5 > Tp = 4
    save("horizons", horizons)
    state = {
        "format": "dbpo-state-v1",
        "env_id": "Hopper-v5",
        "num_envs": 2,
        "iteration": 1,
        "finished": False,
        "run_name": "r",
        "agent": make_agent(D, contract_checkpoint(D, 11, 3, hidden=32)).state_dict(),  # other network sizes
        "global_step": 0,
        "actor_optimizer": {},
        "critic_optimizer": {},
        "rng": {},
    }
    save("walker_state", {**state, "env_id": "Walker2d-v5"})
    save("envs3_state", {**state, "num_envs": 3})
    save("sizes_state", state)
    save("partial_state", {k: v for k, v in state.items() if k != "rng"})
    return paths


RANGES = [  # (flags, the error line's text): runs.parse's ranges and tyro's parsing, each flag on its own
    (["--gamma", "2"], "--gamma must be in (0, 1], got 2.0"),
    (["--clip-coef", "-0.1"], "--clip-coef must be a finite number > 0, got -0.1"),
    (["--num-steps", "abc"], "--num-steps (INT): invalid literal"),  # a value of the wrong type
    (["--reward-scaling", "sometimes"], "invalid choice 'sometimes' for argument '--reward-scaling'"),
    (["--no-such-flag"], "Unrecognized options: --no-such-flag"),
    (["--eval-envs", "0"], "--eval-envs must be > 0, got 0"),
    (["--target-kl", "inf"], "--target-kl must be a finite number > 0, got inf"),
    (["--actor-lr", "nan"], "--actor-lr must be a finite number > 0, got nan"),
    (["--eval-interval", "0"], "--eval-interval must be > 0, got 0"),
    (["--save-interval", "0"], "--save-interval must be > 0, got 0"),
    (["--eval-episodes", "0"], "--eval-episodes must be > 0, got 0"),
    (["--eval-episodes-ends", "0"], "--eval-episodes-ends must be > 0, got 0"),
    (["--gae-lambda", "1.5"], "--gae-lambda must be in [0, 1], got 1.5"),
    (["--num-threads", "-1"], "--num-threads must be >= 0, got -1"),
    (["--ent-coef", "-1"], "--ent-coef must be a finite number >= 0, got -1.0"),
]
COMBINATIONS = [  # (flags, the error line's text): combinations of flags, and the files; @name: a file of bad_files
    (["--min-std", "0.2"], "need 0 < --min-std <= --init-std <= --max-std"),
    (["--actor-min-lr", "1e-3"], "must not exceed the peak"),
    (["--eval-episodes", "3", "--eval-episodes-ends", "2"], "--eval-episodes-ends must be at least --eval-episodes"),
    (["--eval-only", "--resume", "@sizes_state"], "drop --resume"),
    (["--checkpoint", "@missing"], "does not exist"),
    (["--checkpoint", "@notes"], "cannot read --checkpoint"),
    (["--checkpoint", "@truncated"], "cannot read --checkpoint"),
    (["--checkpoint", "@dfp"], "is of another kind (format 'dfp-v1', expected 'dbp-v1')"),
    (["--checkpoint", "@state_as_ckpt"], "continue it with --resume"),
    (["--checkpoint", "@pendulum"], "unknown env 'Pendulum-v1'"),
    (["--checkpoint", "@horizons"], "inconsistent horizons To=2, Tp=4, Ta=4"),
    (["--checkpoint", "@dims"], "obs/action dims 12/3"),
    (["--checkpoint", "@nan"], "NaN or infinite"),
    (["--checkpoint", "@misfit"], "does not match these networks"),
    (["--env", "Walker2d-v5"], "trained on Hopper-v5"),
    (["--resume", "@notes"], "cannot read --resume"),
    (["--resume", "@good"], "is of another kind (format 'dbp-v1', expected 'dbpo-state-v1')"),
    (["--resume", "@partial_state"], "lacks rng"),
    (["--resume", "@walker_state"], "fine-tunes Walker2d-v5"),
    (["--resume", "@envs3_state"], "--num-envs 3"),
    (["--resume", "@sizes_state"], "does not match these networks"),
    (["--runs-dir", "@under_a_file"], "cannot create the run folder"),
]


@pytest.mark.parametrize(
    "flags, message", RANGES + COMBINATIONS, ids=lambda v: " ".join(v) if isinstance(v, list) else ""
)
def test_bad_input_exits_2_with_one_line_before_writing_anything(bad_files, tmp_path, one_thread, flags, message):
    """One `error: ...` line that says what to do, exit code 2, nothing written and nothing on stdout; the good
    checkpoint is passed unless the case gives its own."""
    flags = [bad_files[f[1:]] if f.startswith("@") else f for f in flags]
    base = ["--num-envs", "2", "--num-steps", "2", "--num-iterations", "1", "--eval-episodes", "1", "--eval-envs", "1"]
    argv = base + flags + ([] if "--checkpoint" in flags else ["--checkpoint", bad_files["good"]])
    code, out, err = run_main(SCRIPT, argv, tmp_path)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err[-2000:])
    assert message in lines[0], lines
    assert os.listdir(tmp_path) == [] and out == "", (os.listdir(tmp_path), out)


def test_a_missing_checkpoint_is_refused_in_one_line(tmp_path):
    """Without --checkpoint (a real process: the table runs in-process)."""
    proc = run("--num-iterations", "1", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr[-2000:]
    assert proc.stderr.startswith("error: --checkpoint is required") and proc.stderr.count("\n") == 1
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- runs (subprocesses)
@pytest.fixture(scope="module")
def hopper_ckpt_file(tmp_path_factory):
    """A tiny fresh-MLP checkpoint for Hopper-v5 (the fastest env here) in dbp_bc.py's format."""
    spec = importlib.util.spec_from_file_location("dbpo_ppo_fixture", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = tmp_path_factory.mktemp("hopper_ckpt") / "hopper.pt"
    torch.save(contract_checkpoint(module, 11, 3, hidden=32), path)
    return str(path)


FAST = [
    "--num-threads",
    "1",
    "--num-envs",
    "2",
    "--eval-envs",
    "2",
    "--eval-episodes",
    "2",
    "--update-epochs",
    "2",
    "--minibatch-size",
    "4",
    "--critic-warmup-iters",
    "0",
    "--lr-cycle-iters",
    "1500",
]


def start(*flags, cwd):
    return subprocess.Popen(
        [sys.executable, SCRIPT, *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=cwd
    )


def wait_for_line(proc, text, timeout=120):
    t0, lines = time.time(), []
    while time.time() - t0 < timeout:
        line = proc.stdout.readline()
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"no '{text}' in {lines[-20:]}")


def interrupt(proc, delay):
    time.sleep(delay)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    return time.time() - t0, out, err


def test_sigterm_in_a_rollout_saves_and_the_printed_command_resumes(hopper_ckpt_file, tmp_path):
    flags = [
        "--checkpoint",
        hopper_ckpt_file,
        *FAST,
        "--num-steps",
        "100000",
        "--num-iterations",
        "3",
        "--run-name",
        "r",
    ]
    proc = start(*flags, cwd=tmp_path)
    wait_for_line(proc, "eval at iteration 0")  # iteration 1 is now rolling out 100000 decisions per env
    elapsed, out, err = interrupt(proc, 1.0)
    assert proc.returncode == 128 + signal.SIGTERM and elapsed < 5, (proc.returncode, elapsed, err[-2000:])
    state_path = os.path.realpath(tmp_path / "runs" / "r" / "state.pt")
    assert torch.load(state_path, weights_only=False)["iteration"] == 1  # iteration 0 (an evaluation) was done
    command = out.strip().splitlines()[-1].strip()
    kept = flags[: flags.index("--run-name")]  # the printed command drops --run-name: a resumed run stays in its folder
    assert command == shlex.join(["python", SCRIPT, *kept, "--resume", state_path])
    argv = shlex.split(command)[2:]
    argv[argv.index("--num-steps") + 1] = "3"  # a short rollout this time
    proc = run(*argv, cwd=tmp_path)
    assert "resumed r at iteration 1" in proc.stdout and "iter 1/3" in proc.stdout and "iter 2/3" in proc.stdout
    assert "eval at iteration 0" not in proc.stdout and proc.stdout.strip().splitlines()[-1].startswith(
        "final: 3 iterations"
    )
    state = torch.load(state_path, weights_only=False)
    assert state["iteration"] == 3 and state["finished"] and state["format"] == "dbpo-state-v1"


def test_sigterm_in_an_evaluation_saves_and_resumes(hopper_ckpt_file, tmp_path):
    flags = ["--checkpoint", hopper_ckpt_file, *FAST, "--num-steps", "3", "--num-iterations", "2", "--run-name", "r"]
    proc = start(*flags, "--eval-episodes", "100000", cwd=tmp_path)
    wait_for_line(proc, "dbpo_ppo: Hopper-v5")
    elapsed, out, err = interrupt(proc, 1.5)
    assert proc.returncode == 128 + signal.SIGTERM and elapsed < 5 and "Traceback" not in err, (elapsed, err[-2000:])
    state_path = str(tmp_path / "runs" / "r" / "state.pt")
    assert torch.load(state_path, weights_only=False)["iteration"] == 0 and "--resume" in out
    proc = run(*flags, "--resume", state_path, cwd=tmp_path)
    assert "eval at iteration 0" in proc.stdout and "iter 1/2" in proc.stdout
    assert torch.load(state_path, weights_only=False)["iteration"] == 2


def test_non_finite_update_stops_and_keeps_the_last_good_state(hopper_ckpt_file, tmp_path):
    flags = ["--checkpoint", hopper_ckpt_file, *FAST, "--num-steps", "4", "--save-interval", "1", "--run-name", "r"]
    run(*flags, "--num-iterations", "2", cwd=tmp_path)
    run_dir = tmp_path / "runs" / "r"
    before = {name: (run_dir / name).read_bytes() for name in ("state.pt", "dbpo_ppo.pt")}
    proc = run(
        *flags,
        "--num-iterations",
        "3",
        "--actor-lr",
        "1e30",
        "--actor-min-lr",
        "1e30",
        "--resume",
        str(run_dir / "state.pt"),
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 1 and "error: " in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert (
        "became non-finite by step 2" in proc.stderr
        and f"the last good checkpoint is {run_dir / 'state.pt'}" in proc.stderr
    )
    assert {name: (run_dir / name).read_bytes() for name in before} == before


def tensorboard_scalars(run_dir):
    """{tag: [(step, value)]} as TensorBoard shows them: a SessionLog START at step s (SummaryWriter's purge_step)
    drops the earlier events of steps >= s. Files are read in the order they were started."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    files = [list(EventFileLoader(str(p)).Load()) for p in glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))]
    scalars, starts = {}, 0
    for events in sorted(files, key=lambda ev: ev[0].wall_time):
        for event in events:
            if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                starts += 1
                scalars = {tag: [(s, v) for s, v in points if s < event.step] for tag, points in scalars.items()}
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
                elif value.metadata.plugin_data.plugin_name == "scalars":
                    scalars.setdefault(value.tag, []).append(
                        (event.step, float(tensor_util.make_ndarray(value.tensor)))
                    )
    return scalars, starts


def test_eval_only_reproduces_the_logged_evaluations_and_resumes_never_repeat_a_tensorboard_step(
    D, hopper_ckpt_file, tmp_path
):
    """Both policies at 3 episodes at the ends and 2 between; --eval-only on dbpo_ppo.pt plays the final evaluation
    again. Resumes (the running reward scaler in state.pt) keep one value per tensorboard step and one evaluation per
    iteration in the CSVs, which scripts/dbpo_report.py pairs."""
    ends = ["--eval-sampled", "--eval-episodes-ends", "3", "--reward-scaling", "running"]
    flags = [
        "--checkpoint",
        hopper_ckpt_file,
        *FAST,
        *ends,
        "--num-steps",
        "3",
        "--run-name",
        "r",
        "--eval-interval",
        "3",
    ]
    proc = run(*flags, "--num-iterations", "2", cwd=tmp_path)
    run_dir = tmp_path / "runs" / "r"
    logged = proc.stdout.strip().splitlines()[-1].split(" | eval ")[1].split(" | model ")[0]
    assert "(3 episodes, mean path) || " in logged and logged.endswith("(3 episodes, sampled)")
    proc = run("--checkpoint", str(run_dir / "dbpo_ppo.pt"), "--eval-only", *FAST, *ends, cwd=tmp_path)
    assert proc.stdout.strip().splitlines()[-1] == f"final eval Hopper-v5: {logged}"
    assert not (tmp_path / "runs" / "Hopper-v5").exists() and sorted(os.listdir(tmp_path / "runs")) == ["r"]
    scaler = torch.load(run_dir / "state.pt", weights_only=False)["reward_scaler"]
    assert scaler["count"] == pytest.approx(1e-4 + 2 * 3 * 1)  # 2 envs x 3 decisions of the one training iteration
    shutil.copy(run_dir / "state.pt", run_dir / "state_after_2.pt")
    run(*flags, "--num-iterations", "5", "--resume", str(run_dir / "state.pt"), cwd=tmp_path)
    run(*flags, "--num-iterations", "5", "--resume", str(run_dir / "state_after_2.pt"), cwd=tmp_path)  # again from 2
    scalars, starts = tensorboard_scalars(run_dir)
    assert starts == 3  # the fresh run's writer and one per resume (purge_step: a resume drops the steps it repeats)
    for tag, points in scalars.items():
        steps = [s for s, _ in points]
        assert steps == sorted(set(steps)), (tag, steps)
    assert [s for s, _ in scalars["charts/actor_lr"]] == [1, 2, 4]
    assert [s for s, _ in scalars["eval/episodic_return"]] == [s for s, _ in scalars["eval_sampled/episodic_return"]]
    assert [s for s, _ in scalars["eval/episodic_return"]] == [0, 3, 5]
    for step, value in scalars["charts/actor_lr"]:  # no critic warm-up here: the actor's schedule starts at iteration 0
        assert value == pytest.approx(D.scheduled_lr(step, 1e-5, 3e-6, 10, 1500), rel=1e-5)
    for name in ("eval_episodes.csv", "eval_episodes_sampled.csv"):  # step, env steps, episode, env seed, ...
        rows = np.loadtxt(run_dir / name, delimiter=",", skiprows=1)
        # the ends: 3 episodes, between: 2; the first run's final evaluation (step 2) stays: its policy is the one the
        # resumed runs start from
        assert rows[:, 0].tolist() == [0] * 3 + [2] * 3 + [3] * 2 + [5] * 3, name
        assert rows[:, 3].tolist() == [100_001, 100_002, 100_003] * 2 + [100_001, 100_002, 100_001, 100_002, 100_003]
    code, out, err = run_main(REPORT, [str(run_dir)], tmp_path)
    assert code == 0, err
    assert "| 3 | mean path |" in out and "| 5 | sampled |" in out and "Sampled policy - mean path" in out


def test_more_evaluation_envs_than_episodes_and_a_cpu_policy_file(hopper_ckpt_file, tmp_path):
    """--eval-envs above --eval-episodes evaluates with as many envs as episodes (no env is stepped unreset), and every
    tensor of dbpo_ppo.pt is on the CPU (it loads without map_location on a machine without CUDA)."""
    flags = ["--checkpoint", hopper_ckpt_file, *FAST, "--num-steps", "3", "--num-iterations", "1", "--run-name", "r"]
    proc = run(*flags, "--eval-episodes", "1", "--eval-envs", "2", cwd=tmp_path)
    assert proc.stdout.strip().splitlines()[-1].startswith("final: 1 iterations"), proc.stdout[-2000:]
    policy = torch.load(tmp_path / "runs" / "r" / "dbpo_ppo.pt", weights_only=False)
    tensors = [v for part in ("log_std_head", "critic") for v in policy["dbpo"][part].values()]
    assert tensors and all(v.device.type == "cpu" for v in tensors)


def test_smoke_cube_single_train_video_save_and_eval_only(cube_checkpoint, tmp_path):
    proc = run(
        "--checkpoint",
        cube_checkpoint,
        *TINY,
        "--max-episode-steps",
        "24",
        "--capture-video",
        "--run-name",
        "c",
        cwd=tmp_path,
    )
    out = proc.stdout
    assert "eval at iteration 0" in out and "iter 1/3" in out and "iter 2/3" in out and "ETA" in out
    assert "critic warm-up" in out and "actor+critic" in out
    assert out.strip().splitlines()[-1].startswith("final: 3 iterations") and "success" in out.strip().splitlines()[-1]
    run_dir = tmp_path / "runs" / "c"
    assert glob.glob(str(run_dir / "events.out.tfevents.*"))
    import imageio.v2 as imageio

    videos = sorted(os.listdir(run_dir / "videos"))
    assert videos == ["eval-iter0.mp4", "eval-iter3.mp4"], videos  # one per evaluation, nothing else
    for name in videos:
        assert imageio.get_reader(str(run_dir / "videos" / name)).count_frames() > 1
    model = torch.load(run_dir / "dbpo_ppo.pt", weights_only=False)
    assert model["format"] == "dbp-v1" and "anchor_model" in model and "dbpo" in model
    proc = run(
        "--checkpoint",
        str(run_dir / "dbpo_ppo.pt"),
        "--eval-only",
        "--eval-episodes",
        "2",
        "--eval-envs",
        "2",
        "--max-episode-steps",
        "24",
        "--num-threads",
        "1",
        cwd=tmp_path,
    )
    assert proc.stdout.strip().splitlines()[-1].startswith("final eval cube-single-play-singletask-task1-v0: return")


def test_smoke_hopper_other_modes(hopper_checkpoint, tmp_path):
    """The non-default modes: unscaled rewards, bootstrapped time limits, a frozen normalizer, no anchor, raw
    log-probs, a constant learning rate (min = peak)."""
    proc = run(
        "--checkpoint",
        hopper_checkpoint,
        *TINY,
        "--no-normalize-logprob",
        "--anchor-coef",
        "0",
        "--reward-scaling",
        "none",
        "--bootstrap-timeouts",
        "--freeze-normalizer",
        "--max-episode-steps",
        "6",
        "--actor-min-lr",
        "1e-5",
        "--critic-min-lr",
        "1e-4",
        "--no-save-model",
        cwd=tmp_path,
    )
    assert (
        "iter 2/3" in proc.stdout
        and "timing: rollout" in proc.stdout
        and proc.stdout.strip().splitlines()[-1].startswith("final:")
    )
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "Hopper-v5__dbpo_ppo__1__*"))
    assert not os.path.exists(os.path.join(run_dir, "state.pt")) and not os.path.exists(
        os.path.join(run_dir, "dbpo_ppo.pt")
    )


# ---------------------------------------------------------------- scripts/dbpo_report.py on tiny hand-made runs
def episodes_csv(path, evaluations: dict) -> None:
    """An eval_episodes CSV as envs.write_episodes writes it: {step: returns}, episode i with env seed 100 + i."""
    rows = [
        f"{step},{10 * step},{i},{100 + i},nan,{ret},5\n"
        for step, returns in evaluations.items()
        for i, ret in enumerate(returns)
    ]
    path.write_text(",".join(envs.EPISODE_COLUMNS) + "\n" + "".join(rows))


def test_report_pairs_each_policy_with_its_first_evaluation_and_the_sampled_policy_with_the_mean_path(tmp_path):
    """4 episodes at the ends, 2 between (--eval-episodes-ends): every row's paired change is over the episodes it
    shares with the first evaluation; sampled - mean path is paired at each iteration."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    episodes_csv(run_dir / "eval_episodes.csv", {0: [1.0, 2.0, 3.0, 6.0], 5: [2.0, 2.0], 9: [2.0, 4.0, 3.0, 9.0]})
    episodes_csv(run_dir / "eval_episodes_sampled.csv", {0: [0.0, 1.0, 3.0, 5.0], 5: [1.0, 2.0], 9: [4.0] * 4})
    code, out, err = run_main(REPORT, [str(run_dir), "--out", str(tmp_path / "r")], tmp_path)
    assert code == 0, err
    lines = out.splitlines()
    se = lambda x: np.std(x, ddof=1) / np.sqrt(len(x))  # noqa: E731  (the standard error of a mean)
    d5 = np.array([1.0, 0.0])  # iteration 5 minus iteration 0, episode by episode
    d9 = np.array([1.0, 2.0, 0.0, 3.0])  # iteration 9 minus iteration 0
    assert lines[2] == f"| 0 | mean path | 0 | 4 | 3.0 +- {se([1, 2, 3, 6]):.1f} | 5.0 | | | | |"
    assert lines[3] == f"| 5 | mean path | 50 | 2 | 2.0 +- 0.0 | 5.0 | +0.5 | {se(d5):.1f} | +1.00 | 1 / 0 |"
    assert lines[4] == (
        f"| 9 | mean path | 90 | 4 | 4.5 +- {se([2, 4, 3, 9]):.1f} | 5.0 | +1.5 | {se(d9):.1f} | "
        f"{1.5 / se(d9):+.2f} | 3 / 0 |"
    )
    d9 = np.array([4.0, 3.0, 1.0, -1.0])  # the sampled policy's iteration 9 minus its iteration 0
    assert lines[7].startswith(f"| 9 | sampled | 90 | 4 | 4.0 +- 0.0 | 5.0 | +1.8 | {se(d9):.1f} |")
    table = out.split("Sampled policy - mean path")[1].splitlines()
    d0 = np.array([-1.0, -1.0, 0.0, -1.0])  # sampled - mean path at iteration 0
    assert table[4] == f"| 0 | 4 | -0.8 | {se(d0):.1f} | {-0.75 / se(d0):+.2f} | 0 / 3 |"
    assert table[5] == "| 5 | 2 | -0.5 | 0.5 | -1.00 | 0 / 1 |"
    with open(tmp_path / "r.csv") as f:
        header, *rows = f.read().splitlines()
    assert header.split(",") == [
        "iteration",
        "env_steps",
        "eval_return",
        "eval_return_se",
        "paired_change",
        "paired_se",
        "sampled_return",
        "sampled_return_se",
        "sampled_paired_change",
        "sampled_paired_se",
        "train_episode_return",
    ]
    assert (
        rows[2]
        == f"9,90,4.5000,{se([2, 4, 3, 9]):.4f},1.5000,{se([1, 2, 0, 3]):.4f},4.0000,0.0000,1.7500,{se(d9):.4f},"
    )
    assert (tmp_path / "r.png").stat().st_size > 0
    os.remove(run_dir / "eval_episodes_sampled.csv")  # a run without --eval-sampled: the mean path alone
    code, out, err = run_main(REPORT, [str(run_dir)], tmp_path)
    assert code == 0 and "sampled" not in out and out.splitlines()[4].startswith("| 9 | mean path |"), err


REPORT_REFUSALS = {  # case: (what the run folder holds, the error line's text)
    "no folder": (None, "is not a folder"),
    "no csv": ({}, "eval_episodes.csv does not exist"),
    "damaged csv": ({"eval_episodes.csv": "HEAD0,0,0,100,nan,oops\n"}, "is not an eval_episodes.csv"),
    "other columns": ({"eval_episodes.csv": "step,return\n0,1\n"}, "expected the columns"),
    "later episodes the first lacks": ({"eval_episodes.csv": {0: [1, 2], 10: [1, 2, 3]}}, "cannot pair them"),
    "a seed twice": ({"eval_episodes.csv": "HEAD0,0,0,100,nan,1,5\n0,0,1,100,nan,2,5\n"}, "plays an env seed twice"),
    "damaged sampled csv": (
        {"eval_episodes.csv": {0: [1, 2]}, "eval_episodes_sampled.csv": "HEAD0,0,0,x\n"},
        "eval_episodes_sampled.csv is not an eval_episodes.csv",
    ),
    "sampled on other episodes": (
        {"eval_episodes.csv": {0: [1, 2]}, "eval_episodes_sampled.csv": {0: [1]}},
        "played other episodes than the mean path",
    ),
}


@pytest.mark.parametrize("case", [*REPORT_REFUSALS, "--blocks 0", "--out in a missing folder"])
def test_report_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path, case):
    run_dir, out = tmp_path / "run", str(tmp_path / "r")
    files, message = REPORT_REFUSALS.get(case, ({"eval_episodes.csv": {0: [1, 2]}}, case.split()[0]))
    if files is not None:
        run_dir.mkdir()
    for name, content in (files or {}).items():
        if isinstance(content, dict):
            episodes_csv(run_dir / name, content)
        else:
            (run_dir / name).write_text(content.replace("HEAD", ",".join(envs.EPISODE_COLUMNS) + "\n"))
    argv = [str(run_dir), "--out", out]
    if case == "--blocks 0":
        argv += ["--blocks", "0"]
    if case == "--out in a missing folder":
        argv[-1], message = str(tmp_path / "missing" / "r"), "its folder does not exist"
    code, stdout, err = run_main(REPORT, argv, tmp_path)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and stdout == "", err
    assert message in err, err
    assert not glob.glob(str(tmp_path / "**" / "r.*"), recursive=True)
