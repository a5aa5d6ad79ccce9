"""dbpo_ppo.py: DBPO (PPO fine-tuning of a one-step DBP generator).

Unit tests import the script as a module (its __main__ block does not run): the exactness properties of
SPEC 5 (stored-z ratio = 1, executed-prefix likelihood, anchor = 0 at the start), GAE with truncation,
the chunk env, and a learning test on a contextual bandit with a poorly initialized stand-in generator.
Smoke tests run the script as a subprocess from checkpoints that dbp_bc.py makes on tiny data, for one
OGBench env (cube-single task 1) and one locomotion env (Hopper-v5). Nothing touches ~/.ogbench.
"""

import glob
import importlib.util
import os
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "dbpo_ppo.py")
ENV = dict(os.environ, MUJOCO_GL="egl", PYTHONWARNINGS="ignore")
NET_BEGIN, NET_END = "# ---- DBP networks", "# ---- end of DBP networks"
TINY = ["--num-threads", "1", "--num-iterations", "2", "--num-envs", "2", "--num-steps", "4", "--critic-warmup-iters", "1",
        "--update-epochs", "2", "--num-eval-episodes", "2", "--num-eval-envs", "2", "--eval-interval", "2"]


@pytest.fixture(scope="module")
def D():
    """dbpo_ppo.py imported as a module."""
    spec = importlib.util.spec_from_file_location("dbpo_ppo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
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
    proc = subprocess.run([sys.executable, SCRIPT, *flags], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def contract_checkpoint(D, obs_dim, act_dim, To=2, Tp=4, Ta=2, env_id="Hopper-v5", hidden=64):
    """A checkpoint in dbp_bc.py's format (/work/notes/dbp_checkpoint_contract.md) with a fresh MLP generator."""
    kwargs = dict(obs_dim=obs_dim, action_dim=act_dim, obs_horizon=To, pred_horizon=Tp, hidden_dim=hidden, depth=2)
    generator = D.make_generator("mlp", **kwargs)
    return {"format": "dbp-v1", "args": {}, "env_id": env_id, "obs_dim": obs_dim, "action_dim": act_dim,
            "obs_horizon": To, "pred_horizon": Tp, "action_horizon": Ta, "backbone": "mlp", "generator_kwargs": kwargs,
            "loss": "drift", "model": generator.state_dict(), "step": 0,
            "obs_offset": torch.zeros(obs_dim), "obs_scale": torch.ones(obs_dim),
            "action_offset": torch.zeros(act_dim), "action_scale": torch.ones(act_dim),
            "action_low": -torch.ones(act_dim), "action_high": torch.ones(act_dim)}


def make_agent(D, ckpt, **kw):
    return D.DBPOAgent(ckpt, D.build_generator(ckpt, ckpt["model"]), D.build_generator(ckpt, ckpt["model"]), **kw)


# ---------------------------------------------------------------- checkpoints made by dbp_bc.py on tiny data
def train_dbp(tmp, *flags):
    runs = tmp / "runs"
    cmd = [sys.executable, os.path.join(ROOT, "dbp_bc.py"), *flags, "--total-steps", "20", "--batch-size", "8",
           "--hidden-dim", "32", "--depth", "2", "--obs-horizon", "2", "--pred-horizon", "8", "--action-horizon", "4",
           "--warmup-steps", "2", "--eval-interval", "0", "--eval-episodes", "1", "--log-interval", "10",
           "--num-threads", "1", "--save-model", "--runs-dir", str(runs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=tmp, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    paths = glob.glob(str(runs / "*" / "dbp_bc.pt"))
    assert len(paths) == 1, paths
    return paths[0]


@pytest.fixture(scope="module")
def cube_checkpoint(tmp_path_factory):
    """dbp_bc.py on 2 (+1 val) expert episodes of 40 steps for cube-single task 1."""
    tmp = tmp_path_factory.mktemp("cube")
    gen = [sys.executable, os.path.join(ROOT, "scripts", "generate_ogbench_dataset.py"), "--env", "cube-single-play",
           "--kind", "expert", "--task", "1", "--episodes", "2", "--episode-length", "40", "--workers", "1", "--out-dir", str(tmp)]
    proc = subprocess.run(gen, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return train_dbp(tmp, "--env", "cube-single-play", "--task", "1", "--dataset-path", str(tmp / "cube-single-expert-task1-v0.npz"))


@pytest.fixture(scope="module")
def hopper_checkpoint(tmp_path_factory):
    """dbp_bc.py on a tiny D4RL-layout npz for Hopper-v5 (2 episodes of 30 random steps)."""
    tmp = tmp_path_factory.mktemp("hopper")
    rng = np.random.default_rng(0)
    n = 60
    timeouts = np.zeros(n, bool)
    timeouts[[29, 59]] = True
    np.savez(tmp / "hopper.npz", observations=rng.normal(size=(n, 11)).astype(np.float32),
             actions=rng.uniform(-1, 1, (n, 3)).astype(np.float32), rewards=rng.normal(size=n).astype(np.float32),
             terminals=np.zeros(n, bool), timeouts=timeouts)
    return train_dbp(tmp, "--env", "Hopper-v5", "--dataset-path", str(tmp / "hopper.npz"))


# ---------------------------------------------------------------- unit tests
def test_network_block_is_identical_to_dbp_bc():
    def block(path):
        text = open(path).read()
        start = text.index(NET_BEGIN)
        return text[start : text.index(NET_END, start) + len(NET_END)]

    assert block(SCRIPT) == block(os.path.join(ROOT, "dbp_bc.py")), "re-paste the DBP networks block from dbp_bc.py"


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
    manual = (-0.5 * ((chunk[:, sl] - mu[:, sl]) / std[:, sl]) ** 2 - std[:, sl].log() - 0.5 * np.log(2 * np.pi)).sum((1, 2))
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
    """Roll out a real env (Hopper-v5 through ChunkEnv) as the training loop does, then evaluate the whole
    batch and a shuffled minibatch with the update's loss: every ratio is 1, the anchor is exactly 0."""
    ckpt = contract_checkpoint(D, 11, 3, To=2, Tp=8, Ta=4)
    agent = make_agent(D, ckpt)
    envs = gym.vector.SyncVectorEnv([D.make_env("Hopper-v5", i, 2, 4) for i in range(3)], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    obs, _ = envs.reset(seed=0)
    store = {k: [] for k in ("obs", "z", "chunk", "logp")}
    for _ in range(10):
        obs_n = agent.normalize_obs(torch.as_tensor(obs))
        z = agent.sample_latent(3)
        chunk, logp = agent.act(obs_n, z)
        for k, v in zip(store, (obs_n, z, chunk, logp)):
            store[k].append(v)
        obs, *_ = envs.step(agent.env_actions(chunk))
    envs.close()
    b = {k: torch.cat(v) for k, v in store.items()}
    n = len(b["logp"])
    args = D.Args()
    perm = torch.randperm(n)
    for idx in (torch.arange(n), perm[: n // 2]):
        _, info = D.dbpo_loss(agent, b["obs"][idx], b["z"][idx], b["chunk"][idx], b["logp"][idx],
                              torch.randn(len(idx)), torch.randn(len(idx)), torch.randn(len(idx)), args)
        torch.testing.assert_close(info["ratio"], torch.ones(len(idx)), rtol=0, atol=1e-5)
        assert info["anchor_loss"].item() == 0.0
        assert abs(info["approx_kl"].item()) < 1e-6
    # the stored z is what makes the ratio exact: a fresh latent gives a different likelihood
    _, info = D.dbpo_loss(agent, b["obs"], torch.randn_like(b["z"]), b["chunk"], b["logp"],
                          torch.randn(n), torch.randn(n), torch.randn(n), args)
    assert (info["ratio"] - 1).abs().max() > 0.1
    # after one actor step the anchor is positive and the ratio moves
    actor_opt = torch.optim.Adam(agent.actor_parameters(), lr=1e-3)
    critic_opt = torch.optim.Adam(agent.critic.parameters(), lr=1e-3)
    mb = (b["obs"], b["z"], b["chunk"], b["logp"], torch.randn(n), torch.randn(n), torch.randn(n))
    D.update(agent, actor_opt, critic_opt, mb, args, update_actor=True)
    _, info = D.dbpo_loss(agent, *mb, args)
    assert info["anchor_loss"].item() > 0
    assert (info["ratio"] - 1).abs().max() > 1e-4


def test_actions_are_clipped_to_the_env_bounds_in_normalized_units(D):
    ckpt = contract_checkpoint(D, 3, 2)
    ckpt["action_offset"], ckpt["action_scale"] = torch.tensor([0.5, 0.0]), torch.tensor([0.25, 2.0])
    agent = make_agent(D, ckpt)
    with torch.no_grad():
        agent.generator.net[-1].bias.copy_(torch.tensor([100.0, -100.0]).repeat(4))  # mean far outside the bounds
    chunk, logp = agent.act(torch.randn(4, 2, 3), torch.randn(4, 4, 2))
    actions = agent.env_actions(chunk)  # [B, Ta, act_dim] in env units
    assert actions.shape == (4, 2, 2)
    np.testing.assert_allclose(actions[..., 0], 1.0, atol=1e-6)
    np.testing.assert_allclose(actions[..., 1], -1.0, atol=1e-6)
    assert torch.isfinite(logp).all()


def test_gae_bootstraps_through_truncation_but_not_termination(D):
    gamma, lam = 0.9, 1.0  # lambda = 1: advantages + values = discounted returns
    rewards = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    values = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]])
    # env 0 terminates at t=1; env 1 is truncated at t=1 with V(final obs) = 2 folded into its reward
    dones = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    rewards[1, 1] += gamma * 2.0
    next_value = torch.tensor([4.0, 4.0])
    adv, ret = D.compute_gae(rewards, values, dones, next_value, gamma, lam)
    expected = torch.tensor([[1 + gamma * 1, 1 + gamma * (1 + gamma * 2.0)], [1.0, 1 + gamma * 2.0], [1 + gamma * 4, 1 + gamma * 4]])
    torch.testing.assert_close(ret, expected)
    torch.testing.assert_close(adv, expected - values)


def test_reward_scaler_divides_by_the_std_of_discounted_returns_from_the_first_rollout(D):
    gamma, T, N = 0.99, 25, 4
    rewards, dones = -np.ones((T, N)), np.zeros((T, N), bool)
    dones[9, 0] = True  # env 0's episode ends at decision 9
    scaler = D.RewardScaler(N, gamma)
    scaled = scaler(rewards, dones)
    returns = np.zeros((T, N))
    for i in range(N):
        g = 0.0
        for t in range(T):
            g = gamma * g + rewards[t, i]
            returns[t, i] = g
            g = 0.0 if dones[t, i] else g
    np.testing.assert_allclose(scaled, rewards / returns.std(), rtol=1e-6)  # identical per-step returns are no problem
    np.testing.assert_allclose(scaler.returns, returns[-1])  # carried into the next rollout
    second = scaler(rewards, np.zeros((T, N), bool))
    both = np.concatenate([returns.ravel(), (returns[-1] * gamma ** np.arange(1, T + 1)[:, None] - np.cumsum(gamma ** np.arange(T))[:, None]).ravel()])
    np.testing.assert_allclose(second, rewards / both.std(), rtol=1e-6)  # running statistics over both rollouts


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
    env = D.ChunkEnv(CountingEnv(length=5), obs_horizon=3, action_horizon=3)
    assert env.observation_space.shape == (3, 1) and env.action_space.shape == (3, 2)
    obs, _ = env.reset()
    np.testing.assert_array_equal(obs[:, 0], [0, 0, 0])  # the first observation repeated To times
    obs, reward, terminated, truncated, _ = env.step(np.zeros((3, 2), np.float32))
    np.testing.assert_array_equal(obs[:, 0], [1, 2, 3])
    assert reward == 1 + 2 + 3 and not terminated and env.executed_steps == 3
    obs, reward, terminated, truncated, _ = env.step(np.zeros((3, 2), np.float32))
    assert reward == 4 + 5 and terminated and env.executed_steps == 5  # stopped inside the chunk
    np.testing.assert_array_equal(obs[:, 0], [3, 4, 5])


def test_ppo_improves_a_contextual_bandit_and_the_anchor_limits_drift(D, one_thread):
    """A one-step task: reward = -||A_exec - target(s)||^2 with a generator initialized far from the target.
    PPO (the script's act / compute_gae / update) raises the return within seconds; with anchor_coef = 0
    the generator moves further from its initialization than with the default anchor_coef = 1."""
    To, Tp, Ta, do, da, B = 2, 4, 2, 2, 2, 256

    def train(anchor_coef, iterations=8):
        torch.manual_seed(0)
        ckpt = contract_checkpoint(D, do, da, To, Tp, Ta)
        generator = D.build_generator(ckpt, ckpt["model"])
        with torch.no_grad():
            generator.net[-1].bias.fill_(-0.6)  # poorly initialized: every action near -0.6
        ckpt["model"] = generator.state_dict()
        args = D.Args(anchor_coef=anchor_coef, actor_lr=1e-3, critic_lr=1e-3, init_std=0.1, min_std=0.05, max_std=0.3,
                      clip_coef=0.2, target_kl=None)
        agent = make_agent(D, ckpt, init_std=args.init_std, min_std=args.min_std, max_std=args.max_std)
        actor_opt = torch.optim.Adam(agent.actor_parameters(), lr=args.actor_lr)
        critic_opt = torch.optim.Adam(agent.critic.parameters(), lr=args.critic_lr)
        probe_obs, probe_z = (torch.rand(512, 1, do) * 2 - 1).repeat(1, To, 1), torch.randn(512, Tp, da)

        def reward(obs, chunk):
            target = torch.stack([0.5 * obs[:, -1, 0], -0.5 * obs[:, -1, 1]], -1)[:, None]  # [B, 1, da]
            return -((D.executed(chunk, To, Ta) - target) ** 2).mean((1, 2))

        def mean_path_return():
            return reward(probe_obs, agent.act(probe_obs, probe_z, deterministic=True)[0]).mean().item()

        with torch.no_grad():
            mu_init = agent.generator(probe_obs, probe_z)
        before = mean_path_return()
        for _ in range(iterations):
            obs = (torch.rand(B, 1, do) * 2 - 1).repeat(1, To, 1)
            z = agent.sample_latent(B)
            chunk, logp = agent.act(obs, z, noise_clip=args.noise_clip)
            with torch.no_grad():
                values = agent.get_value(obs)
            adv, ret = D.compute_gae(reward(obs, chunk)[None], values[None], torch.ones(1, B), torch.zeros(B), args.gamma, args.gae_lambda)
            for _ in range(args.update_epochs):
                perm = torch.randperm(B)
                for start in range(0, B, 64):
                    mb = perm[start : start + 64]
                    D.update(agent, actor_opt, critic_opt, (obs[mb], z[mb], chunk[mb], logp[mb], adv[0, mb], ret[0, mb], values[mb]), args, True)
        with torch.no_grad():
            drift = ((agent.generator(probe_obs, probe_z) - mu_init) ** 2).mean().item()
        return before, mean_path_return(), drift

    before, after, drift_anchor = train(anchor_coef=1.0)
    assert before < -0.3 and after > before + 0.2, (before, after)
    _, after_free, drift_free = train(anchor_coef=0.0)
    assert after_free > before + 0.2
    assert drift_free > 1.15 * drift_anchor, (drift_free, drift_anchor)


# ---------------------------------------------------------------- bad input
def test_bad_checkpoints_are_refused_with_one_line(D, tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    wrong_env = tmp_path / "wrong_env.pt"
    torch.save(contract_checkpoint(D, 11, 3, env_id="Pendulum-v1"), wrong_env)
    wrong_shape = tmp_path / "wrong_shape.pt"
    torch.save(contract_checkpoint(D, 12, 3, env_id="Hopper-v5"), wrong_shape)
    hopper = tmp_path / "hopper.pt"
    torch.save(contract_checkpoint(D, 11, 3, env_id="Hopper-v5"), hopper)
    cases = [(("--checkpoint", str(junk)), "cannot read"), (("--checkpoint", str(wrong_env)), "unsupported env"),
             (("--checkpoint", str(wrong_shape), "--eval-only"), "obs/action dims 12/3"),
             (("--checkpoint", str(hopper), "--env-id", "Walker2d-v5"), "trained on Hopper-v5")]
    for flags, message in cases:
        proc = run(*flags, cwd=tmp_path, check=False)
        assert proc.returncode != 0 and message in proc.stderr, (flags, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- smoke runs from dbp_bc.py checkpoints
def test_smoke_cube_single_train_resume_save_and_eval_only(cube_checkpoint, tmp_path):
    proc = run("--checkpoint", cube_checkpoint, *TINY, "--max-episode-steps", "24", "--save-interval", "1", "--save-model", cwd=tmp_path)
    out = proc.stdout
    assert "eval after iteration 0" in out and "eval after iteration 2" in out and "success" in out
    assert "iter 2/2" in out and "SPS" in out and "ETA" in out and "critic warm-up" in out and "actor+critic" in out
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "cube-single-play-singletask-task1-v0__dbpo_ppo__1__*"))
    assert glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))
    state = torch.load(os.path.join(run_dir, "state.pt"), weights_only=False)
    assert state["iteration"] == 2 and state["global_step"] > 0
    # resume continues the same run from iteration 3
    proc = run("--checkpoint", cube_checkpoint, *TINY[:2], "--num-iterations", "3", *TINY[4:], "--max-episode-steps", "24",
               "--resume", os.path.join(run_dir, "state.pt"), cwd=tmp_path)
    assert "resumed" in proc.stdout and "iter 3/3" in proc.stdout and "iter 1/" not in proc.stdout
    assert torch.load(os.path.join(run_dir, "state.pt"), weights_only=False)["global_step"] > state["global_step"]
    # the saved model is a dbp_bc-format checkpoint: it evaluates with --eval-only, anchored to the original
    model = torch.load(os.path.join(run_dir, "dbpo_ppo.pt"), weights_only=False)
    assert model["format"] == "dbp-v1" and "anchor_model" in model and "dbpo" in model
    proc = run("--checkpoint", os.path.join(run_dir, "dbpo_ppo.pt"), "--eval-only", "--num-eval-episodes", "2",
               "--num-eval-envs", "2", "--max-episode-steps", "24", "--num-threads", "1", cwd=tmp_path)
    assert "eval cube-single-play-singletask-task1-v0 (2 episodes" in proc.stdout and "success" in proc.stdout


def test_smoke_hopper(hopper_checkpoint, tmp_path):
    proc = run("--checkpoint", hopper_checkpoint, *TINY, "--no-normalize-logprob", "--anchor-coef", "0", cwd=tmp_path)
    assert "iter 2/2" in proc.stdout and "timing: rollout" in proc.stdout
    assert glob.glob(str(tmp_path / "runs" / "Hopper-v5__dbpo_ppo__1__*" / "events.out.tfevents.*"))
