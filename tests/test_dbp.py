"""Tests for dbp_bc.py: indexing and receding horizon, padding, normalization round-trip, multimodality,
and smoke runs of the script (tiny networks, tiny data) including save / resume / eval-only and bad data."""

import os
import re
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dbp_bc  # noqa: E402

SCRIPT = os.path.join(ROOT, "dbp_bc.py")
TINY = ["--hidden-dim", "32", "--depth", "2", "--batch-size", "16", "--num-hypotheses", "4", "--pred-horizon", "8",
        "--action-horizon", "4", "--num-threads", "1", "--log-interval", "10", "--eval-interval", "0", "--eval-episodes", "2"]
EVAL_RE = re.compile(r"(?:eval/success=(\S+) )?eval/episodic_return=(\S+) eval/episode_length=(\S+)")


def run(args, cwd, expect_ok=True):
    env = dict(os.environ, MUJOCO_GL="egl", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
    if expect_ok:
        assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def last_eval(stdout):
    m = EVAL_RE.findall(stdout)
    assert m, stdout[-2000:]
    return tuple(float(x) if x else None for x in m[-1])  # (success or None, return, length)


# ---------------------------------------------------------------------------------------------
# tiny data
# ---------------------------------------------------------------------------------------------
def write_d4rl(path, episodes=5, length=40, seed=0, **overrides):
    """A D4RL-layout file for InvertedPendulum-v5 from a stabilizing linear controller (+ noise)."""
    env = gym.make("InvertedPendulum-v5")
    rng = np.random.default_rng(seed)
    data = {k: [] for k in ("observations", "actions", "rewards", "terminals", "timeouts")}
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        for t in range(length):
            action = np.clip([2 * obs[1] + 0.3 * obs[3] + 0.2 * obs[0] + 0.05 * rng.standard_normal()], -3, 3).astype(np.float32)
            nxt, reward, term, trunc, _ = env.step(action)
            for k, v in zip(data, (obs, action, reward, term, t == length - 1 and not term)):
                data[k].append(v)
            obs = nxt
            if term:
                break
    arrays = {k: np.asarray(v, dtype=np.float32 if k in ("observations", "actions", "rewards") else bool) for k, v in data.items()}
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return arrays


@pytest.fixture(scope="module")
def d4rl_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("d4rl") / "ip.npz")
    write_d4rl(path)
    return path


# ---------------------------------------------------------------------------------------------
# unit tests: indexing, padding, receding horizon
# ---------------------------------------------------------------------------------------------
def test_episode_bounds_and_chunk_padding():
    ends = np.array([0, 0, 0, 0, 1, 0, 0, 1], dtype=bool)  # episodes [0..4] and [5..7]
    first, last = dbp_bc.episode_bounds(ends)
    assert first.tolist() == [0] * 5 + [5] * 3 and last.tolist() == [4] * 5 + [7] * 3
    t = torch.arange(8)
    obs_idx, act_idx = dbp_bc.chunk_indices(t, torch.as_tensor(first), torch.as_tensor(last), obs_horizon=2, pred_horizon=4)
    # history o_{t-1}, o_t; the first obs repeats at an episode start
    assert obs_idx.tolist() == [[0, 0], [0, 1], [1, 2], [2, 3], [3, 4], [5, 5], [5, 6], [6, 7]]
    # chunk a_{t-1..t+2}: index To-1 = 1 is a_t; repeats the last action at the end, never crosses episodes
    assert act_idx.tolist() == [[0, 0, 1, 2], [0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 4], [3, 4, 4, 4],
                                [5, 5, 6, 7], [5, 6, 7, 7], [6, 7, 7, 7]]
    assert (act_idx[:, 1] == t).all()  # chunk index To-1 is the current step's action
    # an unterminated tail is its own episode
    first, last = dbp_bc.episode_bounds(np.array([0, 1, 0, 0], dtype=bool))
    assert first.tolist() == [0, 0, 2, 2] and last.tolist() == [1, 1, 3, 3]


def test_executed_slice_and_horizon_checks():
    chunk = torch.arange(16.0).view(1, 16, 1).expand(2, 16, 3)  # chunk[:, j] = j
    ex = dbp_bc.executed_slice(chunk, obs_horizon=2, action_horizon=8)
    assert ex.shape == (2, 8, 3) and ex[0, :, 0].tolist() == list(range(1, 9))
    ex = dbp_bc.executed_slice(chunk, obs_horizon=3, action_horizon=14)
    assert ex[0, :, 0].tolist() == list(range(2, 16))
    dbp_bc.check_horizons(2, 16, 8)
    dbp_bc.check_horizons(3, 16, 14)
    for bad in [(3, 16, 15), (17, 16, 1), (2, 16, 0)]:
        with pytest.raises(SystemExit):
            dbp_bc.check_horizons(*bad)


class CounterEnv:
    """obs = number of steps taken; records the actions it receives; ends after `horizon` steps."""

    def __init__(self, horizon):
        self.horizon, self.actions = horizon, []

    def reset(self, seed=None):
        self.t, self.actions = 0, []
        return np.array([0.0]), {}

    def step(self, action):
        self.actions.append(float(action[0]))
        self.t += 1
        return np.array([float(self.t)]), 1.0, False, self.t >= self.horizon, {"success": 1.0}


def test_rollout_receding_horizon():
    To, Tp, Ta = 2, 16, 8
    env, histories = CounterEnv(horizon=20), []

    def chunk_fn(obs_hist):
        histories.append(obs_hist[:, 0].tolist())
        k = len(histories) - 1
        return (100.0 * k + np.arange(Tp, dtype=np.float64))[:, None]  # chunk[j] = 100 * replan + j

    res = dbp_bc.rollout(env, chunk_fn, To, Ta, seed=0)
    # replans at steps 0, 8, 16; history = the last To observations (first obs repeated at reset)
    assert histories == [[0.0, 0.0], [7.0, 8.0], [15.0, 16.0]]
    expected = [100 * k + j for k in range(3) for j in range(To - 1, To - 1 + Ta)][:20]
    assert env.actions == expected  # executed exactly chunk[To-1 : To-1+Ta] of each chunk, in order
    assert res == {"return": 20.0, "length": 20, "success": 1.0}


def test_push_obs_vectorized_history():
    hist = np.zeros((2, 2, 1))
    hist = dbp_bc.push_obs(hist, np.array([[1.0], [5.0]]), new_episode=np.array([False, True]))
    assert hist[:, :, 0].tolist() == [[0.0, 1.0], [5.0, 5.0]]  # env 1 reset: its first obs fills the history
    hist = dbp_bc.push_obs(hist, np.array([[2.0], [6.0]]))
    assert hist[:, :, 0].tolist() == [[1.0, 2.0], [5.0, 6.0]]


def test_ema_and_lr_schedule():
    assert dbp_bc.ema_decay(0, 0.75, 0.9999) == 0.0 and dbp_bc.ema_decay(1, 0.75, 0.9999) == 0.0
    assert dbp_bc.ema_decay(2, 0.75, 0.9999) == pytest.approx(1 - 2 ** -0.75)
    assert dbp_bc.ema_decay(10**9, 0.75, 0.9999) == 0.9999
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = a.weight.detach().clone()
    dbp_bc.ema_update(a, b, 0.9)
    assert torch.allclose(a.weight, 0.9 * before + 0.1 * b.weight)
    assert dbp_bc.lr_factor(0, 500, 1000, "cosine") == pytest.approx(1 / 500)
    assert dbp_bc.lr_factor(500, 500, 1000, "cosine") == pytest.approx(1.0)
    assert dbp_bc.lr_factor(1000, 500, 1000, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert dbp_bc.lr_factor(999, 500, 1000, "constant") == 1.0


@pytest.mark.parametrize("backbone", ["mlp", "unet"])
def test_generator_shapes_and_z_dependence(backbone):
    kw = dict(hidden_dim=32, depth=2) if backbone == "mlp" else dict(down_dims=(8, 16))
    gen = dbp_bc.make_generator(backbone, obs_dim=7, action_dim=3, obs_horizon=2, pred_horizon=8, **kw)
    obs = torch.randn(5, 2, 7)
    out1, out2 = gen(obs, torch.randn(5, 8, 3)), gen(obs, torch.randn(5, 8, 3))
    assert out1.shape == (5, 8, 3) and not torch.allclose(out1, out2)  # the latent matters
    assert gen.features(obs).shape == (5, gen.cond_dim) == (5, 14)


# ---------------------------------------------------------------------------------------------
# normalization round-trip through a checkpoint
# ---------------------------------------------------------------------------------------------
def test_normalization_roundtrip_through_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    obs = (rng.normal(size=(500, 4)) * [1, 10, 0.1, 100] + [5, -3, 0, 50]).astype(np.float32)
    act = rng.uniform([-1, 0], [3, 0.5], size=(500, 2)).astype(np.float32)
    stats = dbp_bc.compute_normalization(obs, act)
    obs_n = (torch.as_tensor(obs) - stats["obs_offset"]) / stats["obs_scale"]
    act_n = (torch.as_tensor(act) - stats["action_offset"]) / stats["action_scale"]
    assert torch.allclose(obs_n.mean(0), torch.zeros(4), atol=1e-4) and torch.allclose(obs_n.std(0), torch.ones(4), atol=1e-2)
    assert act_n.min() >= -1 - 1e-5 and act_n.max() <= 1 + 1e-5 and torch.allclose(act_n.min(0).values, -torch.ones(2))
    torch.manual_seed(0)
    gen = dbp_bc.make_generator("mlp", obs_dim=4, action_dim=2, obs_horizon=2, pred_horizon=4, hidden_dim=16, depth=2)
    policy = dbp_bc.Policy(gen, stats, [-1, 0], [3, 0.5])
    assert torch.allclose(policy.normalize_action(torch.as_tensor(act)) * stats["action_scale"] + stats["action_offset"], torch.as_tensor(act), atol=1e-5)
    ckpt = {"backbone": "mlp", "generator_kwargs": dict(obs_dim=4, action_dim=2, obs_horizon=2, pred_horizon=4, hidden_dim=16, depth=2),
            "model": gen.state_dict(), "action_low": torch.tensor([-1.0, 0.0]), "action_high": torch.tensor([3.0, 0.5]), **policy.stats()}
    torch.save(ckpt, tmp_path / "c.pt")
    reloaded = dbp_bc.load_policy(torch.load(tmp_path / "c.pt", weights_only=False))
    raw_hist, z = torch.as_tensor(obs[:20]).view(10, 2, 4), torch.randn(10, 4, 2)
    a1, a2 = policy(raw_hist, z), reloaded(raw_hist, z)
    assert torch.equal(a1, a2)
    assert (a1 >= torch.tensor([-1.0, 0.0])).all() and (a1 <= torch.tensor([3.0, 0.5])).all()
    # the stats are really used: identity statistics give different actions
    ident = dbp_bc.Policy(gen, {"obs_offset": torch.zeros(4), "obs_scale": torch.ones(4), "action_offset": torch.zeros(2), "action_scale": torch.ones(2)}, [-1, 0], [3, 0.5])
    assert not torch.allclose(ident(raw_hist, z), a1)


# ---------------------------------------------------------------------------------------------
# multimodality: action | state is +1 or -1 with equal odds
# ---------------------------------------------------------------------------------------------
def test_drift_covers_both_modes_mse_averages():
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    states = torch.rand(2048, 1, 1, generator=g) * 2 - 1  # [N, To=1, obs_dim=1]
    actions = torch.where(torch.rand(2048, 1, 1, generator=g) < 0.5, -1.0, 1.0)  # [N, Tp=1, da=1]
    probe = torch.linspace(-0.9, 0.9, 5).repeat_interleave(200).view(-1, 1, 1)
    out = {}
    for loss in ("drift", "mse"):
        torch.manual_seed(0)
        gen = dbp_bc.MLPGenerator(1, 1, 1, 1, hidden_dim=64, depth=2)
        opt = torch.optim.Adam(gen.parameters(), lr=3e-3)
        for _ in range(600):
            idx = torch.randint(0, 2048, (64,))
            value, _ = dbp_bc.compute_loss(gen, states[idx], actions[idx], loss=loss, num_hypotheses=4)
            opt.zero_grad()
            value.backward()
            opt.step()
        with torch.no_grad():
            z = torch.randn(len(probe), 1, 1) if loss == "drift" else torch.zeros(len(probe), 1, 1)
            out[loss] = gen(probe, z).flatten()
    y = out["drift"]
    assert (y > 0.5).float().mean() > 0.3 and (y < -0.5).float().mean() > 0.3, y  # both modes covered
    assert (y.abs() < 0.5).float().mean() < 0.2  # little mass between the modes
    assert (out["mse"].abs() < 0.3).float().mean() > 0.95  # regression averages the modes to ~0


# ---------------------------------------------------------------------------------------------
# smoke runs of the script
# ---------------------------------------------------------------------------------------------
def test_smoke_mlp_save_and_eval_only_acts_identically(d4rl_file, tmp_path):
    p = run(["--env", "InvertedPendulum-v5", "--dataset-path", d4rl_file, *TINY, "--total-steps", "30", "--save-model",
             "--capture-video", "--runs-dir", str(tmp_path), "--seed", "3"], tmp_path)
    assert "SPS" in p.stdout and "ETA" in p.stdout
    run_dir = next(d for d in (tmp_path / x for x in os.listdir(tmp_path)) if d.is_dir() and d.name.startswith("InvertedPendulum"))
    ckpt = torch.load(run_dir / "dbp_bc.pt", weights_only=False)
    for k in ("args", "env_id", "obs_dim", "action_dim", "obs_horizon", "pred_horizon", "action_horizon", "backbone",
              "generator_kwargs", "model", "obs_offset", "obs_scale", "action_offset", "action_scale", "action_low", "action_high", "step"):
        assert k in ckpt, k
    assert ckpt["step"] == 30 and ckpt["env_id"] == "InvertedPendulum-v5" and (ckpt["obs_dim"], ckpt["action_dim"]) == (4, 1)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run_dir))
    assert any(f.endswith(".mp4") for f in os.listdir(run_dir / "videos"))  # --capture-video
    # the reloaded checkpoint acts identically: same evaluation numbers as the training run's final eval
    q = run(["--eval-only", "--checkpoint", str(run_dir / "dbp_bc.pt"), "--eval-episodes", "2", "--seed", "3", "--num-threads", "1"], tmp_path)
    assert last_eval(q.stdout) == last_eval(p.stdout)
    assert last_eval(p.stdout)[0] is None and "eval/success" not in p.stdout  # locomotion: no success signal


def test_smoke_unet_step_gaussian_and_exact_resume(d4rl_file, tmp_path):
    base = ["--env", "InvertedPendulum-v5", "--dataset-path", d4rl_file, *TINY, "--backbone", "unet", "--unet-dims", "8", "16",
            "--drift-mode", "step", "--lr-schedule", "constant", "--warmup-steps", "5", "--save-model"]
    run([*base, "--total-steps", "20", "--runs-dir", str(tmp_path / "a")], tmp_path)
    run([*base, "--total-steps", "10", "--runs-dir", str(tmp_path / "b")], tmp_path)
    (b_dir,) = os.listdir(tmp_path / "b")
    run([*base, "--total-steps", "20", "--resume", str(tmp_path / "b" / b_dir / "dbp_bc.pt")], tmp_path)
    (a_dir,) = os.listdir(tmp_path / "a")
    ca = torch.load(tmp_path / "a" / a_dir / "dbp_bc.pt", weights_only=False)
    cb = torch.load(tmp_path / "b" / b_dir / "dbp_bc.pt", weights_only=False)
    assert ca["step"] == cb["step"] == 20
    for key in ("model", "train_model"):  # 10 + 10 resumed steps == 20 straight steps, bit for bit
        assert all(torch.equal(ca[key][k], cb[key][k]) for k in ca[key]), key
    # the Gaussian mean-shift field and the MSE baseline run too
    run([*base, "--total-steps", "5", "--drift-field", "gaussian", "--runs-dir", str(tmp_path / "c")], tmp_path)
    run(["--env", "InvertedPendulum-v5", "--dataset-path", d4rl_file, *TINY, "--total-steps", "5", "--loss", "mse", "--runs-dir", str(tmp_path / "d")], tmp_path)


def test_smoke_ogbench_expert_data(tmp_path):
    gen = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "generate_ogbench_dataset.py"), "--env", "cube-single-play",
                          "--kind", "expert", "--task", "1", "--episodes", "3", "--episode-length", "40", "--workers", "1",
                          "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr[-2000:]
    path = str(tmp_path / "cube-single-expert-task1-v0.npz")
    p = run(["--env", "cube-single-play", "--task", "1", "--dataset-path", path, *TINY, "--backbone", "unet", "--unet-dims", "8", "16",
             "--total-steps", "10", "--eval-episodes", "1", "--runs-dir", str(tmp_path / "runs")], tmp_path)
    assert "cube-single-play-singletask-task1-v0" in p.stdout
    success = last_eval(p.stdout)[0]
    assert success in (0.0, 1.0)  # OGBench singletask reports eval/success


def test_bad_data_clear_errors(tmp_path, d4rl_file):
    good = dict(np.load(d4rl_file))
    cases = {
        "missing": ({"timeouts": None}, "lacks the keys ['timeouts']"),
        "length": ({"rewards": good["rewards"][:-3]}, "different lengths"),
        "bounds": ({"actions": good["actions"] * 0 + 5.0}, "outside InvertedPendulum-v5's action bounds"),
    }
    for name, (override, message) in cases.items():
        path = str(tmp_path / f"{name}.npz")
        np.savez(path, **{k: v for k, v in {**good, **override}.items() if v is not None})
        args = dbp_bc.Args(env="InvertedPendulum-v5", dataset_path=path)
        with pytest.raises(SystemExit, match=re.escape(message)):
            dbp_bc.load_demonstrations(args)
    with pytest.raises(SystemExit, match="needs --dataset-path"):
        dbp_bc.load_demonstrations(dbp_bc.Args(env="Hopper-v5"))
    p = run(["--env", "InvertedPendulum-v5", "--dataset-path", d4rl_file, "--pred-horizon", "4", "--action-horizon", "8"], tmp_path, expect_ok=False)
    assert p.returncode != 0 and "executed slice must lie in the chunk" in p.stderr
