"""Tests for dbp_bc.py: the authors' presets (against independent re-statements of their sampler, schedule and
EMA), indexing and receding horizon, normalization, multimodality, bad input, signals, the non-finite guard,
reproducible evaluation (whatever --eval-envs), tensorboard across a resume, and smoke runs (tiny MLP, tiny data,
CPU-sized flags)."""

import functools
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dbp_bc  # noqa: E402  (importable once the repository root is on sys.path)
import envs  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from inprocess import run_main  # noqa: E402  (tests/ on sys.path)

SCRIPT = os.path.join(ROOT, "dbp_bc.py")
ENV = dict(os.environ, MUJOCO_GL="egl", OMP_NUM_THREADS="1")
TINY = [
    "--backbone",
    "mlp",
    "--hidden-dim",
    "32",
    "--num-layers",
    "2",
    "--batch-size",
    "16",
    "--num-hypotheses",
    "4",
    "--obs-horizon",
    "2",
    "--pred-horizon",
    "8",
    "--action-horizon",
    "4",
    "--num-threads",
    "1",
    "--log-interval",
    "10",
    "--eval-interval",
    "0",
    "--eval-episodes",
    "2",
]
EVAL_RE = re.compile(r"(?:eval/success=(\S+) )?eval/episodic_return=(\S+) eval/episode_length=(\S+)")


def run(args, cwd, expect_ok=True):
    p = subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, capture_output=True, text=True, env=ENV, timeout=300)
    if expect_ok:
        assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def last_eval(stdout):
    m = EVAL_RE.findall(stdout)
    assert m, stdout[-2000:]
    return tuple(float(x) if x else None for x in m[-1])  # (success or None, return, length)


def tree(folder):
    """Every folder and file under `folder`."""
    return sorted(os.path.join(d, name) for d, dirs, files in os.walk(folder) for name in dirs + files)


def the_run_dir(runs):
    (name,) = [d for d in os.listdir(runs) if os.path.isdir(os.path.join(runs, d))]
    return os.path.join(runs, name)


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
            action = np.clip([2 * obs[1] + 0.3 * obs[3] + 0.2 * obs[0] + 0.05 * rng.standard_normal()], -3, 3).astype(
                np.float32
            )
            nxt, reward, term, trunc, _ = env.step(action)
            for k, v in zip(data, (obs, action, reward, term, t == length - 1 and not term), strict=True):
                data[k].append(v)
            obs = nxt
            if term:
                break
    arrays = {
        k: np.asarray(v, dtype=np.float32 if k in ("observations", "actions", "rewards") else bool)
        for k, v in data.items()
    }
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
# the authors' presets: defaults of the built config, and the schedule / EMA / sampler / split rules
# ---------------------------------------------------------------------------------------------
def test_preset_defaults_are_the_authors():
    a = dbp_bc.Args()
    assert (a.backbone, a.unet_dims, a.unet_kernel_size, a.unet_groups) == ("unet", (512, 1024, 2048), 5, 8)
    assert (a.num_epochs, a.total_steps, a.batch_size) == (500, None, 64)
    assert (a.lr, a.min_lr, a.warmup_epochs) == (1e-4, 1e-5, 100)
    assert (a.weight_decay, a.max_grad_norm) == (1e-6, 10.0)  # AdamW's betas: torch's defaults, as the authors'
    assert (a.ema_every, a.ema_start_epoch, a.ema_power, a.ema_max_decay) == (10, 20, 0.75, 0.9999)
    assert (a.val_ratio, a.num_hypotheses, a.temperatures, a.drift_mode) == (None, 4, (0.02, 0.05, 0.2), "chunk")
    for env, val_ratio in (
        ("cube-single-play", 0.02),
        ("lift-ph", 0.02),
        ("Hopper-v5", 0.0),
        ("mujoco/hopper/medium-v0", 0.0),
    ):
        a = dbp_bc.Args(env=env)  # filled in by env family: the authors' D4RL configs hold nothing out
        assert all(ok for ok, _ in dbp_bc.rules(a)), env
        assert a.val_ratio == val_ratio, env
    assert (a.save_model, a.keep_checkpoints, a.wandb_project_name) == (True, 10, "drift-policies")
    assert a.normalization == "authors"
    assert dbp_bc.ROBOMIMIC_OBS_KEYS[0] == "object"  # their task configs list `object` first
    # horizons (and Robomimic's time limit, their max_steps) by env family, filled in by the rules, overridable
    for env, expected, limit in [
        ("cube-single-play", (2, 16, 8), None),
        ("cube-double-play-singletask-task2-v0", (2, 16, 8), None),
        ("lift-mh", (1, 4, 4), 400),
        ("square-ph", (1, 4, 4), 400),
        ("Hopper-v5", (1, 4, 4), None),
    ]:
        a = dbp_bc.Args(env=env)
        assert all(ok for ok, _ in dbp_bc.rules(a))
        assert (a.obs_horizon, a.pred_horizon, a.action_horizon, a.max_episode_steps) == (*expected, limit)
    a = dbp_bc.Args(env="can-mh", max_episode_steps=300)
    assert all(ok for ok, _ in dbp_bc.rules(a))
    assert a.max_episode_steps == 300
    a = dbp_bc.Args(env="Hopper-v5", pred_horizon=8)
    assert all(ok for ok, _ in dbp_bc.rules(a))
    assert (a.obs_horizon, a.pred_horizon, a.action_horizon) == (1, 8, 4)
    a = dbp_bc.Args(eval_episodes=1)  # evaluation envs: CPU cores by default, never more than the episodes
    assert all(ok for ok, _ in dbp_bc.rules(a))
    assert a.eval_envs == 1


def test_lr_schedule_per_epoch():

    def lr(epoch):
        return dbp_bc.lr_at(epoch, 1e-4, 1e-5, 100, 500)

    assert lr(0) == pytest.approx(1e-5) and lr(50) == pytest.approx(5.5e-5) and lr(100) == pytest.approx(1e-4)
    assert (
        lr(300) == pytest.approx(5.5e-5) and lr(500) == pytest.approx(1e-5) and lr(499) == pytest.approx(1e-5, rel=1e-3)
    )
    # the authors' CosineAnnealingWarmupRestarts(first_cycle_steps=500, warmup 100), stepped once per epoch
    ref = [
        1e-5 + 9e-5 * e / 100 if e < 100 else 1e-5 + 9e-5 * (1 + math.cos(math.pi * (e - 100) / 400)) / 2
        for e in range(500)
    ]
    assert np.allclose([lr(e) for e in range(500)], ref, rtol=1e-12)


def test_ema_copy_until_epoch_20_then_every_10_steps():
    spe = 7  # steps per epoch
    # the authors' loop: at global step s, if s % 10 == 0: copy before epoch 20, else EMAModel.step (own counter)
    ref, counter = [], 0
    for s in range(40 * spe):
        if s % 10:
            ref.append(None)
        elif s // spe < 20:
            ref.append("copy")
        else:
            opt_step = max(0, counter - 1)  # EMAModel.get_decay(optimization_step) with update_after_step 0
            ref.append(0.0 if opt_step <= 0 else min(0.9999, 1 - (1 + opt_step) ** -0.75))
            counter += 1
    ours = []
    for s in range(40 * spe):
        k = dbp_bc.ema_schedule(s, spe, 10, 20)
        ours.append(None if k is None else "copy" if k == -1 else dbp_bc.ema_decay(k, 0.75, 0.9999))
    assert ours == ref
    assert dbp_bc.ema_decay(10**9, 0.75, 0.9999) == 0.9999
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = a.weight.detach().clone()
    dbp_bc.ema_update(a, b, 0.9)
    assert torch.allclose(a.weight, 0.9 * before + 0.1 * b.weight)


def authors_windows(episode_ends, sequence_length, pad_before, pad_after):
    """A re-statement of the authors' create_indices and sample_sequence (dbpo/dataset/sampler.py): in an episode of
    length L the windows start at -pad_before .. L - sequence_length + pad_after (each pad clamped to
    [0, sequence_length - 1]); a window lists the data indices it holds, repeating its first read entry before the
    episode and its last after it. episode_ends: cumulative and exclusive, as their ReplayBuffer's."""
    pad_before = min(max(pad_before, 0), sequence_length - 1)
    pad_after = min(max(pad_after, 0), sequence_length - 1)
    windows, start_idx = [], 0
    for end_idx in episode_ends:
        episode_length = end_idx - start_idx
        for idx in range(-pad_before, episode_length - sequence_length + pad_after + 1):
            buffer_start = max(idx, 0) + start_idx
            buffer_end = min(idx + sequence_length, episode_length) + start_idx
            sample_start = buffer_start - (idx + start_idx)
            sample_end = sequence_length - ((idx + sequence_length + start_idx) - buffer_end)
            read = list(range(buffer_start, buffer_end))
            windows.append([read[0]] * sample_start + read + [read[-1]] * (sequence_length - sample_end))
        start_idx = end_idx
    return windows


@pytest.mark.parametrize(
    "family, horizons, their_pads",
    [
        ("robomimic", (1, 4, 4), (1, 7)),  # {lift,can,square}_lowdim.yaml: pad_before 1, pad_after 7 (clamped to 3)
        ("ogbench", (2, 16, 8), (1, 7)),  # pusht_lowdim.yaml, whose horizons OGBench uses
        ("ogbench", (3, 8, 2), (1, 7)),  # other horizons: the same fixed pads, clamped to Tp - 1
        ("gym", (1, 4, 4), (0, 0)),  # their D4RL loader: whole chunks only (starts 0 .. L - Tp)
    ],
)
def test_samples_match_the_authors_sampler(family, horizons, their_pads):
    """Every sample and its padded history and chunk, against the authors' sampler with their configs' pads; their
    policy conditions on the window's first To observations."""
    To, Tp, _ = horizons
    lengths = [1, 3, 10, 25, 16]
    ends = np.zeros(sum(lengths), dtype=bool)
    ends[np.cumsum(lengths) - 1] = True
    first, last = dbp_bc.episode_bounds(ends)
    start, episode = dbp_bc.sample_chunks(first, last, Tp, *dbp_bc.PADDING[family])
    bounds = [torch.as_tensor(x) for x in (start, first[episode], last[episode])]
    obs_idx, act_idx = dbp_bc.chunk_indices(*bounds, To, Tp)
    ref = authors_windows(np.cumsum(lengths), Tp, *their_pads)
    assert len(ref) > len(lengths)
    assert act_idx.tolist() == ref
    assert obs_idx.tolist() == [w[:To] for w in ref]
    if family == "robomimic":  # each episode's first observation is trained on, with the chunk [a0, a0, a1, a2]
        for e in np.flatnonzero(np.array(lengths) >= 3):
            (row,) = np.flatnonzero((episode == e) & (start == first[e] - 1))
            f = int(first[e])
            assert (obs_idx[row].tolist(), act_idx[row].tolist()) == ([f], [f, f, f + 1, f + 2])


def test_holdout_two_percent_of_episodes():
    assert dbp_bc.holdout_episodes(100, 0.02, 0).sum() == 2 and dbp_bc.holdout_episodes(200, 0.02, 0).sum() == 4
    assert dbp_bc.holdout_episodes(10, 0.02, 0).sum() == 1  # at least one
    assert dbp_bc.holdout_episodes(1, 0.02, 0).sum() == 0 and dbp_bc.holdout_episodes(50, 0.0, 0).sum() == 0
    assert (dbp_bc.holdout_episodes(100, 0.02, 3) == dbp_bc.holdout_episodes(100, 0.02, 3)).all()  # seeded


def test_minmax_normalization_and_checkpoint_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    obs = (rng.normal(size=(500, 4)) * [1, 10, 0.1, 100] + [5, -3, 0, 50]).astype(np.float32)
    obs[:, 2] = 7.0  # a constant dimension
    act = rng.uniform([-1, 0], [3, 0.5], size=(500, 2)).astype(np.float32)
    stats = dbp_bc.compute_normalization(obs, act)
    obs_n = (torch.as_tensor(obs) - stats["obs_offset"]) / stats["obs_scale"]
    act_n = (torch.as_tensor(act) - stats["action_offset"]) / stats["action_scale"]
    for x, dims in ((obs_n, [0, 1, 3]), (act_n, [0, 1])):
        assert torch.allclose(x[:, dims].min(0).values, -torch.ones(len(dims)), atol=1e-5)
        assert torch.allclose(x[:, dims].max(0).values, torch.ones(len(dims)), atol=1e-5)
    assert torch.all(obs_n[:, 2] == 0) and stats["obs_scale"][2] == 1  # constant dim -> 0, scale 1
    torch.manual_seed(0)
    kw = dict(obs_dim=4, action_dim=2, obs_horizon=2, pred_horizon=4, hidden_dim=16, num_layers=2)
    gen = dbp_bc.make_generator("mlp", **kw)
    policy = dbp_bc.Policy(gen, stats, [-1, 0], [3, 0.5])
    ckpt = {
        "backbone": "mlp",
        "generator_kwargs": kw,
        "model": gen.state_dict(),
        "action_low": torch.tensor([-1.0, 0.0]),
        "action_high": torch.tensor([3.0, 0.5]),
        **policy.stats(),
    }
    torch.save(ckpt, tmp_path / "c.pt")
    reloaded = dbp_bc.load_policy(torch.load(tmp_path / "c.pt", weights_only=False))
    raw_hist, z = torch.as_tensor(obs[:20]).view(10, 2, 4), torch.randn(10, 4, 2)
    a1, a2 = policy(raw_hist, z), reloaded(raw_hist, z)
    assert torch.equal(a1, a2)
    assert (a1 >= torch.tensor([-1.0, 0.0])).all() and (a1 <= torch.tensor([3.0, 0.5])).all()
    ident = dbp_bc.Policy(
        gen,
        {
            "obs_offset": torch.zeros(4),
            "obs_scale": torch.ones(4),
            "action_offset": torch.zeros(2),
            "action_scale": torch.ones(2),
        },
        [-1, 0],
        [3, 0.5],
    )
    assert not torch.allclose(ident(raw_hist, z), a1)  # the stats are really used


# ---------------------------------------------------------------------------------------------
# indexing, receding horizon, networks
# ---------------------------------------------------------------------------------------------
def test_episode_bounds_and_chunk_padding():
    ends = np.array([0, 0, 0, 0, 1, 0, 0, 1], dtype=bool)  # episodes [0..4] and [5..7]
    first, last = dbp_bc.episode_bounds(ends)
    assert first.tolist() == [0, 5] and last.tolist() == [4, 7]
    start, episode = dbp_bc.sample_chunks(first, last, pred_horizon=4, pad_before=1, pad_after=2)
    assert start.tolist() == [-1, 0, 1, 2, 3, 4, 5, 6]  # 4: episode 1's padded start, episode 0's last step
    assert episode.tolist() == [0] * 5 + [1] * 3
    bounds = [torch.as_tensor(x) for x in (start, first[episode], last[episode])]
    obs_idx, act_idx = dbp_bc.chunk_indices(*bounds, obs_horizon=2, pred_horizon=4)
    assert obs_idx.tolist() == [[0, 0], [0, 1], [1, 2], [2, 3], [3, 4], [5, 5], [5, 6], [6, 7]]
    assert act_idx.tolist() == [
        [0, 0, 1, 2],
        [0, 1, 2, 3],
        [1, 2, 3, 4],
        [2, 3, 4, 4],
        [3, 4, 4, 4],
        [5, 5, 6, 7],
        [5, 6, 7, 7],
        [6, 7, 7, 7],
    ]
    first, last = dbp_bc.episode_bounds(np.array([0, 1, 0, 0], dtype=bool))  # an unterminated tail is an episode
    assert first.tolist() == [0, 2] and last.tolist() == [1, 3]


def test_horizon_rule_accepts_its_boundary():
    """The paper's validity condition To - 1 + Ta <= Tp holds with equality here (BAD_CASES: the refusals)."""
    for To, Tp, Ta in [(2, 16, 8), (3, 16, 14), (1, 1, 1)]:
        args = dbp_bc.Args(obs_horizon=To, pred_horizon=Tp, action_horizon=Ta, backbone="mlp")
        assert [msg for ok, msg in dbp_bc.rules(args) if not ok] == [], (To, Tp, Ta)


class CounterEnv(gym.Env):
    """obs = number of steps taken; records the actions it receives; truncated after `horizon` steps."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float32)
    action_space = gym.spaces.Box(-1e6, 1e6, (1,), np.float32)

    def __init__(self, horizon):
        self.horizon, self.actions = horizon, []

    def reset(self, seed=None, options=None):
        self.t, self.actions = 0, []
        return np.array([0.0], np.float32), {}

    def step(self, action):
        self.actions.append(float(action[0]))
        self.t += 1
        return np.array([float(self.t)], np.float32), 1.0, False, self.t >= self.horizon, {"success": 1.0}


class ReplanCounter(torch.nn.Module):
    """A generator stand-in: chunk[j] = 100 * (replans so far) + j; records the history of every call."""

    obs_horizon, pred_horizon, action_dim = 2, 16, 1

    def __init__(self):
        super().__init__()
        self.histories = []

    def forward(self, obs_hist, z):
        self.histories.append(obs_hist[0, :, 0].tolist())
        return (100.0 * (len(self.histories) - 1) + torch.arange(16.0)).view(1, 16, 1)


IDENTITY = {
    "obs_offset": torch.zeros(1),
    "obs_scale": torch.ones(1),
    "action_offset": torch.zeros(1),
    "action_scale": torch.ones(1),
}


def test_receding_horizon_executes_chunk_from_now_then_replans():
    """act + envs.ChunkEnv(obs_horizon=To) + envs.evaluate: histories repeat the first obs after a reset, each
    replan executes chunk[To-1 : To-1+Ta], and an episode's end cuts the last chunk short."""
    To, Ta = 2, 8  # Tp = 16: ReplanCounter's
    gen, counter = ReplanCounter(), CounterEnv(horizon=20)
    policy = dbp_bc.Policy(gen, IDENTITY, [-1e6], [1e6])
    vec = gym.vector.SyncVectorEnv(
        [lambda: envs.ChunkEnv(counter, Ta, obs_horizon=To)], autoreset_mode=gym.vector.AutoresetMode.DISABLED
    )
    res = envs.evaluate(vec, functools.partial(dbp_bc.act, policy, Ta), episodes=1, seed=0)
    assert gen.histories == [[0.0, 0.0], [7.0, 8.0], [15.0, 16.0]]  # replans at 0, 8, 16; first obs repeated at reset
    # each replan k executes chunk[To-1 : To-1+Ta]
    assert counter.actions == [100 * k + j for k in range(3) for j in range(To - 1, To - 1 + Ta)][:20]
    assert (res["return"], res["length"], res["success"]) == (20.0, 20.0, 1.0)


def test_act_draws_each_rows_latent_from_its_own_generator_bit_for_bit():
    torch.manual_seed(0)
    gen = dbp_bc.make_generator(
        "mlp", obs_dim=3, action_dim=2, obs_horizon=2, pred_horizon=8, hidden_dim=16, num_layers=2
    )
    stats = {
        "obs_offset": torch.zeros(3),
        "obs_scale": torch.ones(3),
        "action_offset": torch.zeros(2),
        "action_scale": torch.ones(2),
    }
    policy = dbp_bc.Policy(gen, stats, [-10, -10], [10, 10])
    obs = np.random.default_rng(0).normal(size=(4, 2, 3)).astype(np.float32)  # [B, To, O]
    obs[1] = obs[0]

    def gens():  # each episode's latent stream, fresh
        return [envs.episode_generator(5, i) for i in range(4)]

    batch = dbp_bc.act(policy, 4, obs, gens())
    rows = np.concatenate([dbp_bc.act(policy, 4, obs[i : i + 1], [g]) for i, g in enumerate(gens())])
    assert batch.shape == (4, 4, 2) and np.array_equal(batch, rows)  # a row does not depend on the rest of the batch
    assert not np.allclose(batch[0], batch[1])  # the same history in another episode: another latent
    z = torch.randn(8, 2, generator=envs.episode_generator(5, 0))  # [Tp, A]
    assert np.array_equal(batch[0], policy(torch.as_tensor(obs[:1]), z[None])[0, 1:5].numpy())  # chunk[To-1 : To-1+Ta]


@pytest.mark.parametrize("backbone", ["mlp", "unet"])
def test_generator_shapes_and_z_dependence(backbone):
    kw = dict(hidden_dim=32, num_layers=2) if backbone == "mlp" else dict(down_dims=(8, 16))
    gen = dbp_bc.make_generator(backbone, obs_dim=7, action_dim=3, obs_horizon=2, pred_horizon=8, **kw)
    obs = torch.randn(5, 2, 7)
    out1, out2 = gen(obs, torch.randn(5, 8, 3)), gen(obs, torch.randn(5, 8, 3))
    assert out1.shape == (5, 8, 3) and not torch.allclose(out1, out2)  # the latent matters
    z = torch.randn(5, 8, 3)
    older = obs.clone()
    older[:, 0] += 1.0  # the older observation of the history
    assert not torch.allclose(gen(obs, z), gen(older, z))  # the whole history conditions the chunk


def test_drift_covers_both_modes_mse_averages():
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    states = torch.rand(2048, 1, 1, generator=g) * 2 - 1  # [N, To=1, obs_dim=1]
    actions = torch.where(torch.rand(2048, 1, 1, generator=g) < 0.5, -1.0, 1.0)  # [N, Tp=1, da=1]: +-1 with equal odds
    probe = torch.linspace(-0.9, 0.9, 5).repeat_interleave(200).view(-1, 1, 1)
    out = {}
    for loss in ("drift", "mse"):
        torch.manual_seed(0)
        gen = dbp_bc.MLPGenerator(1, 1, 1, 1, hidden_dim=64, num_layers=2)
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
# bad input: exit 2, one error line, no traceback, nothing written
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, d4rl_file):
    d = tmp_path_factory.mktemp("bad")
    good = dict(np.load(d4rl_file))
    files = {"good": d4rl_file}
    for name, override in {
        "missing_key": {"timeouts": None},
        "lengths": {"rewards": good["rewards"][:-3]},
        "bounds": {"actions": good["actions"] * 0 + 5.0},
        "nan": {"observations": good["observations"] * np.nan},
        "hopper": {"observations": np.zeros((len(good["actions"]), 11), np.float32)},
    }.items():
        files[name] = str(d / f"{name}.npz")
        np.savez(files[name], **{k: v for k, v in {**good, **override}.items() if v is not None})
    raw = Path(d4rl_file).read_bytes()
    (d / "truncated.npz").write_bytes(raw[: len(raw) // 2])
    files["truncated"] = str(d / "truncated.npz")
    (d / "text.npz").write_text("observations,actions\n1,2\n")
    files["text"] = str(d / "text.npz")
    (d / "afile").write_text("not a folder")
    files["afile"] = str(d / "afile")
    torch.save({"format": "dfp-v1", "model": {}}, d / "dfp.pt")
    files["dfp_ckpt"] = str(d / "dfp.pt")
    files["trunc_ckpt"] = str(d / "trunc.pt")
    torch.save({"format": "dbp-v1", "model": {"w": torch.zeros(1000)}}, d / "full.pt")
    (d / "trunc.pt").write_bytes((d / "full.pt").read_bytes()[:300])
    # an OGBench-format dataset of cube-double's observation size (37) given for cube-single (28)
    n = 60
    terminals = np.zeros(n, np.float32)
    terminals[[29, 59]] = 1
    for suffix in ("", "-val"):
        np.savez(
            d / f"cube-double-expert-task1-v0{suffix}.npz",
            observations=np.zeros((n, 37), np.float32),
            actions=np.zeros((n, 5), np.float32),
            terminals=terminals,
            qpos=np.zeros((n, 18)),
            qvel=np.zeros((n, 18)),
        )
    files["cube_double"] = str(d / "cube-double-expert-task1-v0.npz")
    files["snapshot"] = str(d / "dbp_bc_10.pt")  # a policy snapshot: every dbp-v1 key, no training state
    torch.save({"format": "dbp-v1", **{k: None for k in dbp_bc.CKPT_KEYS}}, files["snapshot"])
    os.makedirs(d / "runs" / "taken")
    (d / "runs" / "taken" / "dbp_bc.pt").write_text("x")
    files["runs"] = str(d / "runs")
    return files


MLP = ["--backbone", "mlp"]
IP = ["--env", "InvertedPendulum-v5", *MLP]
IP_TASK = ["--env", "InvertedPendulum-v5"]
BAD_CASES = {  # name: (argv with {file} placeholders, message fragment)
    "negative steps": (["--total-steps", "-5"], "--total-steps must be at least 1"),
    "zero epochs": (["--num-epochs", "0"], "--num-epochs must be at least 1"),
    "eval episodes 0": (["--eval-episodes", "0"], "--eval-episodes must be at least 1"),
    "lr nan": (["--lr", "nan"], "--lr must be a positive finite number, got nan"),
    "eval envs 0": (["--eval-envs", "0"], "--eval-envs must be at least 1"),
    "wrong type": (["--batch-size", "many"], "--batch-size"),
    "unknown choice": (["--backbone", "transformer"], "transformer"),
    "unknown flag": (["--learning-rate", "1e-3"], "--learning-rate"),
    "log interval 0": (["--log-interval", "0"], "--log-interval must be at least 1"),
    "batch 0": (["--batch-size", "0"], "--batch-size must be at least 1"),
    "keep -1": (["--keep-checkpoints", "-1"], "--keep-checkpoints must be at least 0"),
    "temperature 0": (["--temperatures", "0"], "--temperatures must be positive"),
    "horizons": (["--pred-horizon", "4", "--action-horizon", "8"], "the executed slice must lie in the chunk"),
    "Ta one past the chunk": (["--obs-horizon", "3", "--action-horizon", "15", *MLP], "executed slice must lie in"),
    "To past the chunk": (["--obs-horizon", "17", "--action-horizon", "1", *MLP], "executed slice must lie in"),
    "Ta 0": (["--action-horizon", "0", *MLP], "the executed slice must lie in the chunk"),
    "unet groups": (["--unet-dims", "12", "24"], "must divide every --unet-dims width"),
    "final block's 8 groups": (["--unet-dims", "4", "8", "--unet-groups", "4"], "8 (the final block's groups"),
    "time limit 0": (["--max-episode-steps", "0"], "--max-episode-steps must be at least 1"),
    "unknown normalization": (["--normalization", "zscore"], "zscore"),
    "val ratio": (["--val-ratio", "1.5"], "--val-ratio must be in [0, 0.5)"),
    "min lr > lr": (["--min-lr", "1e-3"], "--min-lr 0.001 must not exceed --lr 0.0001"),
    "task 9": (["--task", "9"], "--task must be in 1..5"),
    "unknown env": (["--env", "cube-foo-play"], "unknown env 'cube-foo-play'"),
    "task for a gym env": ([*IP_TASK, "--task", "1"], "--task only applies to cube-* names"),
    "no dataset": (IP, "needs --dataset-path"),
    "missing dataset": ([*IP, "--dataset-path", "nope.npz"], "does not exist"),
    "truncated npz": ([*IP, "--dataset-path", "{truncated}"], "cannot read --dataset-path"),
    "text as npz": ([*IP, "--dataset-path", "{text}"], "cannot read --dataset-path"),
    "missing key": ([*IP, "--dataset-path", "{missing_key}"], "lacks the keys ['timeouts']"),
    "lengths": ([*IP, "--dataset-path", "{lengths}"], "different lengths"),
    "action bounds": ([*IP, "--dataset-path", "{bounds}"], "actions lie outside the env's action bounds"),
    "nan data": ([*IP, "--dataset-path", "{nan}"], "non-finite values in 'observations'"),
    "other env (d4rl)": ([*IP, "--dataset-path", "{hopper}"], "'observations' must have shape [N, 4] for this env"),
    "other env (ogbench 37 vs 28)": (
        ["--env", "cube-single-play", "--task", "1", "--dataset-path", "{cube_double}", "--backbone", "mlp"],
        "'observations' must have shape [N, 28] for this env, got (58, 37)",
    ),
    "runs dir is a file": ([*IP, "--dataset-path", "{good}", "--runs-dir", "{afile}"], "is a file, not a folder"),
    "run exists": (
        [*IP, "--dataset-path", "{good}", "--runs-dir", "{runs}", "--run-name", "taken"],
        "already holds a run",
    ),
    "resume missing": ([*IP, "--dataset-path", "{good}", "--resume", "nope.pt"], "--resume nope.pt does not exist"),
    "resume other script": (
        [*IP, "--dataset-path", "{good}", "--resume", "{dfp_ckpt}"],
        "is of another kind (format 'dfp-v1', expected 'dbp-v1')",
    ),
    "resume a snapshot": ([*IP, "--dataset-path", "{good}", "--resume", "{snapshot}"], "holds only a policy"),
    "eval-only no checkpoint": (["--eval-only"], "--eval-only needs --checkpoint"),
    "eval-only truncated": (["--eval-only", "--checkpoint", "{trunc_ckpt}"], "cannot read --checkpoint"),
    "eval-only text": (["--eval-only", "--checkpoint", "{text}"], "cannot read --checkpoint"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_exit_2_one_line_nothing_written(case, bad_files, tmp_path):
    """In-process (tests/inprocess.py) to keep it fast; test_bad_input_subprocess checks the real process."""
    argv, message = BAD_CASES[case]
    argv = [a.format(**bad_files) for a in argv]
    inputs = os.path.dirname(bad_files["afile"])  # the files and run folders the cases name
    before = tree(inputs)
    code, _, err = run_main(SCRIPT, argv, tmp_path)
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err
    assert os.listdir(tmp_path) == []  # nothing created (no run folder) in the working folder ...
    assert tree(inputs) == before  # ... nor beside the inputs (--runs-dir)


def test_bad_input_subprocess(tmp_path, bad_files):
    for argv in (["--eval-episodes", "0"], [*IP, "--dataset-path", bad_files["truncated"]]):
        p = run(argv, tmp_path, expect_ok=False)
        assert p.returncode == 2 and p.stderr.startswith("error: ") and "Traceback" not in p.stderr, p.stderr
        assert len([x for x in p.stderr.splitlines() if x.startswith("error:")]) == 1
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# smoke runs, reproducible evaluation, resume
# ---------------------------------------------------------------------------------------------
def test_smoke_eval_only_reproduces_training_evaluations(d4rl_file, tmp_path):
    p = run(
        [
            "--env",
            "InvertedPendulum-v5",
            "--dataset-path",
            d4rl_file,
            *TINY,
            "--total-steps",
            "30",
            "--eval-interval",
            "10",
            "--save-interval",
            "10",
            "--keep-checkpoints",
            "2",
            "--warmup-epochs",
            "0",
            "--lr",
            "3e-3",
            "--ema-start-epoch",
            "0",
            "--ema-every",
            "1",
            "--capture-video",
            "--runs-dir",
            str(tmp_path / "runs"),
            "--seed",
            "3",
            "--eval-envs",
            "1",
            "--val-ratio",
            "0.2",
        ],
        tmp_path,
    )  # locomotion holds nothing out by default
    lines = p.stdout.splitlines()
    assert all(word in p.stdout for word in ("SPS", "ETA", "val_loss"))
    assert lines[0].startswith("start: env InvertedPendulum-v5") and lines[-1].startswith("final")
    run_dir = the_run_dir(tmp_path / "runs")
    assert f"saved {os.path.join(run_dir, 'dbp_bc.pt')}" in lines  # where the final checkpoint went
    files = os.listdir(run_dir)
    # the resumable checkpoint and the last 2 policy snapshots
    assert sorted(f for f in files if f.startswith("dbp_bc")) == ["dbp_bc.pt", "dbp_bc_20.pt", "dbp_bc_30.pt"]
    ckpt = torch.load(os.path.join(run_dir, "dbp_bc.pt"), weights_only=False)
    for k in dbp_bc.CKPT_KEYS + ("format", "args", "step", "train_model", "optimizer"):
        assert k in ckpt, k
    assert ckpt["step"] == 30 and ckpt["format"] == "dbp-v1" and (ckpt["obs_dim"], ckpt["action_dim"]) == (4, 1)
    assert "train_model" not in torch.load(os.path.join(run_dir, "dbp_bc_20.pt"), weights_only=False)  # policy only
    assert any(f.startswith("events.out.tfevents") for f in files)
    videos = [
        os.path.join(run_dir, "videos", f) for f in os.listdir(os.path.join(run_dir, "videos")) if f.endswith(".mp4")
    ]
    import imageio.v3 as iio

    assert len(videos) == 1  # the first final-eval episode ...
    assert len(list(iio.imiter(videos[0]))) > 1  # ... never a 1-frame file
    logged = {int(s): EVAL_RE.search(line).groups() for s, line in re.findall(r"eval step (\d+): (.*)", p.stdout)}
    assert sorted(logged) == [10, 20, 30]
    # --eval-only on the step-20 and step-30 snapshots reproduces the evaluations logged at those steps (30: the final
    # one), with episodes spread over 2 worker envs instead of 1
    q = run(
        [
            "--eval-only",
            "--checkpoint",
            os.path.join(run_dir, "dbp_bc_20.pt"),
            os.path.join(run_dir, "dbp_bc_30.pt"),
            "--eval-episodes",
            "2",
            "--seed",
            "3",
            "--num-threads",
            "1",
            "--eval-envs",
            "2",
        ],
        tmp_path,
    )
    assert "eval envs 1" in p.stdout.splitlines()[0] and "eval envs 2" in q.stdout.splitlines()[0]
    lines = [line for line in q.stdout.splitlines() if line.startswith("eval-only")]
    assert [EVAL_RE.search(line).groups() for line in lines] == [logged[20], logged[30]]
    returns = np.array([float(logged[20][1]), float(logged[30][1])])
    final = q.stdout.splitlines()[-1]
    assert final.startswith("final eval-only over 2")
    assert f"mean {returns.mean():.4f} +- std {returns.std(ddof=1):.4f}" in final
    assert "eval/success" not in p.stdout  # locomotion: no success signal


def test_smoke_unet_step_gaussian_and_exact_resume(d4rl_file, tmp_path):
    base = [
        "--env",
        "InvertedPendulum-v5",
        "--dataset-path",
        d4rl_file,
        *TINY,
        "--backbone",
        "unet",
        "--unet-dims",
        "8",
        "16",
        "--drift-mode",
        "step",
        "--ema-start-epoch",
        "1",
        "--ema-every",
        "3",
    ]
    run([*base, "--total-steps", "20", "--runs-dir", str(tmp_path / "a")], tmp_path)
    run([*base, "--total-steps", "10", "--runs-dir", str(tmp_path / "b")], tmp_path)
    b_dir = the_run_dir(tmp_path / "b")
    run([*base, "--total-steps", "20", "--resume", os.path.join(b_dir, "dbp_bc.pt")], tmp_path)
    ca = torch.load(os.path.join(the_run_dir(tmp_path / "a"), "dbp_bc.pt"), weights_only=False)
    cb = torch.load(os.path.join(b_dir, "dbp_bc.pt"), weights_only=False)
    assert ca["step"] == cb["step"] == 20
    for key in ("model", "train_model"):  # 10 + 10 resumed steps == 20 straight steps, bit for bit
        assert all(torch.equal(ca[key][k], cb[key][k]) for k in ca[key]), key
    # the Gaussian mean-shift field and the MSE baseline run too
    run([*base, "--total-steps", "5", "--drift-field", "gaussian", "--runs-dir", str(tmp_path / "c")], tmp_path)
    run(
        [
            "--env",
            "InvertedPendulum-v5",
            "--dataset-path",
            d4rl_file,
            *TINY,
            "--total-steps",
            "5",
            "--loss",
            "mse",
            "--runs-dir",
            str(tmp_path / "d"),
        ],
        tmp_path,
    )


def test_smoke_ogbench_expert_data(tmp_path):
    gen = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "scripts", "generate_ogbench_dataset.py"),
            "--env",
            "cube-single-play",
            "--kind",
            "expert",
            "--task",
            "1",
            "--episodes",
            "3",
            "--episode-length",
            "40",
            "--workers",
            "1",
            "--out-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert gen.returncode == 0, gen.stderr[-2000:]
    path = str(tmp_path / "cube-single-expert-task1-v0.npz")
    p = run(
        [
            "--env",
            "cube-single-play",
            "--task",
            "1",
            "--dataset-path",
            path,
            *TINY,
            "--backbone",
            "unet",
            "--unet-dims",
            "8",
            "16",
            "--total-steps",
            "10",
            "--eval-episodes",
            "1",
            "--runs-dir",
            str(tmp_path / "runs"),
        ],
        tmp_path,
    )
    assert "cube-single-play-singletask-task1-v0" in p.stdout
    assert last_eval(p.stdout)[0] in (0.0, 1.0)  # OGBench singletask reports eval/success


# ---------------------------------------------------------------------------------------------
# signals, non-finite guard, tensorboard across a resume
# ---------------------------------------------------------------------------------------------
def start_and_signal(args, cwd, marker):
    """Start the script, send SIGTERM once `marker` appears on stdout; return (exit code, seconds to exit, stdout)."""
    p = subprocess.Popen(
        [sys.executable, SCRIPT, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
    )
    out = []
    for line in p.stdout:
        out.append(line)
        if marker in line:
            break
    t0 = time.time()
    p.send_signal(signal.SIGTERM)
    rest, err = p.communicate(timeout=30)
    return p.returncode, time.time() - t0, "".join(out) + rest + err


@pytest.mark.parametrize("phase", ["training", "evaluation"])
def test_sigterm_saves_and_resumes(phase, d4rl_file, tmp_path):
    runs = str(tmp_path / "runs")
    if phase == "training":
        args = [
            "--env",
            "InvertedPendulum-v5",
            "--dataset-path",
            d4rl_file,
            *TINY,
            "--total-steps",
            "1000000",
            "--runs-dir",
            runs,
        ]
        rc, dt, out = start_and_signal(args, tmp_path, "step 20/")
    else:
        args = [
            "--env",
            "InvertedPendulum-v5",
            "--dataset-path",
            d4rl_file,
            *TINY,
            "--total-steps",
            "20",
            "--eval-interval",
            "10",
            "--eval-episodes",
            "1000000",
            "--runs-dir",
            runs,
        ]
        rc, dt, out = start_and_signal(args, tmp_path, "evaluating step 10")
    assert rc == 128 + signal.SIGTERM and dt < 5, (rc, dt, out[-2000:])
    done = int(re.search(r"interrupted at step (\d+); checkpoint saved to", out).group(1))
    assert (done >= 20) if phase == "training" else (done == 10)
    ckpt_path = os.path.join(the_run_dir(runs), "dbp_bc.pt")
    assert torch.load(ckpt_path, weights_only=False)["step"] == done
    cmd = shlex.split(out.split("continue with:\n")[1].splitlines()[0])  # the printed command resumes the run
    assert cmd[:2] == ["python", SCRIPT] and cmd[-2:] == ["--resume", ckpt_path]
    p = run([*cmd[2:], "--total-steps", str(done + 10), "--eval-interval", "0", "--eval-episodes", "1"], tmp_path)
    assert "resuming" in p.stdout and p.stdout.splitlines()[-1].startswith(f"final: {done + 10} steps")
    assert torch.load(ckpt_path, weights_only=False)["step"] == done + 10


def test_nonfinite_stops_and_keeps_the_good_checkpoint(d4rl_file, tmp_path):
    base = [
        "--env",
        "InvertedPendulum-v5",
        "--dataset-path",
        d4rl_file,
        *TINY,
        "--save-interval",
        "5",
        "--log-interval",
        "5",
    ]
    run([*base, "--total-steps", "10", "--runs-dir", str(tmp_path / "runs")], tmp_path)
    run_dir = the_run_dir(tmp_path / "runs")
    before = {f.name: f.read_bytes() for f in Path(run_dir).glob("*.pt")}
    p = run(
        [
            *base,
            "--total-steps",
            "30",
            "--lr",
            "1e30",
            "--min-lr",
            "1e30",
            "--resume",
            os.path.join(run_dir, "dbp_bc.pt"),
        ],
        tmp_path,
        expect_ok=False,
    )
    assert p.returncode == 1, p.stderr[-2000:]
    assert re.search(r"error: the (loss|gradient norm) became non-finite", p.stderr), p.stderr[-2000:]
    assert "the last good checkpoint is " + os.path.join(run_dir, "dbp_bc.pt") in p.stderr
    after = {f.name: f.read_bytes() for f in Path(run_dir).glob("*.pt")}
    assert after == before  # byte-identical, and no new snapshot


def test_tensorboard_steps_strictly_increase_across_resume(d4rl_file, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    base = [
        "--env",
        "InvertedPendulum-v5",
        "--dataset-path",
        d4rl_file,
        *TINY,
        "--log-interval",
        "5",
        "--keep-checkpoints",
        "0",
    ]
    run([*base, "--total-steps", "20", "--runs-dir", str(tmp_path / "runs")], tmp_path)
    run_dir = the_run_dir(tmp_path / "runs")
    old = os.path.join(run_dir, "at20.pt")
    os.replace(os.path.join(run_dir, "dbp_bc.pt"), old)
    shutil.copyfile(old, os.path.join(run_dir, "dbp_bc.pt"))
    run([*base, "--total-steps", "40", "--resume", os.path.join(run_dir, "dbp_bc.pt")], tmp_path)
    time.sleep(1.1)  # a new event file name (its timestamp) for the second resume
    run([*base, "--total-steps", "40", "--resume", old], tmp_path)  # from step 20 again: steps 25..40 are logged twice
    acc = EventAccumulator(run_dir)
    acc.Reload()
    for tag in ("losses/loss", "eval/episodic_return"):
        steps = [e.step for e in acc.Scalars(tag)]
        assert steps == sorted(set(steps)), (tag, steps)
    assert [e.step for e in acc.Scalars("losses/loss")] == list(range(5, 45, 5))


def test_a_checkpoint_from_before_the_depth_rename_resumes_and_evaluates(d4rl_file, tmp_path):
    """Older checkpoints store --num-layers as `depth` (args and generator_kwargs): TINY's 2 must be read back, not
    missed (the resume check would call the flag changed; the default 3 layers would not fit the weights)."""
    base = ["--env", "InvertedPendulum-v5", "--dataset-path", d4rl_file, *TINY, "--keep-checkpoints", "0"]
    run([*base, "--total-steps", "10", "--eval-interval", "0", "--runs-dir", str(tmp_path / "runs")], tmp_path)
    path = os.path.join(the_run_dir(tmp_path / "runs"), "dbp_bc.pt")
    ckpt = torch.load(path, weights_only=False)
    for d in (ckpt["args"], ckpt["generator_kwargs"]):
        d["depth"] = d.pop("num_layers")
    assert ckpt["args"]["depth"] == 2 and ckpt["generator_kwargs"]["depth"] == 2
    torch.save(ckpt, path)
    run(["--eval-only", "--checkpoint", path, "--eval-episodes", "1"], tmp_path)
    run([*base, "--total-steps", "15", "--eval-interval", "0", "--resume", path], tmp_path)
    assert torch.load(path, weights_only=False)["step"] == 15


def test_robomimic_observations_put_object_first_and_the_env_follows_the_checkpoint(tmp_path):
    """The authors' obs_keys order (object, eef_pos, eef_quat, gripper_qpos), recorded in env_args so that the env
    rebuilt from a checkpoint concatenates the same order; env_args without obs_keys keep the robot keys first."""
    import h5py

    dims = {"object": 10, "robot0_eef_pos": 3, "robot0_eef_quat": 4, "robot0_gripper_qpos": 2}
    path = tmp_path / "lift.hdf5"
    with h5py.File(path, "w") as f:
        f.create_group("data").attrs["env_args"] = json.dumps({"env_name": "Lift", "type": 1, "env_kwargs": {}})
        g = f["data"].create_group("demo_0")
        for k in ("actions", "rewards", "dones"):
            g.create_dataset(k, data=np.zeros((3, 7) if k == "actions" else 3, np.float32))
        for group in ("obs", "next_obs"):
            for i, (k, d) in enumerate(dims.items()):
                g.create_dataset(f"{group}/{k}", data=np.full((3, d), i, np.float32))
    data, _, env_args = envs.load_robomimic("lift-mh", str(path), dbp_bc.ROBOMIMIC_OBS_KEYS)
    expected = np.repeat([0, 1, 2, 3], [10, 3, 4, 2]).astype(np.float32)
    np.testing.assert_array_equal(data["observations"][0], expected)
    assert env_args["obs_keys"] == list(dbp_bc.ROBOMIMIC_OBS_KEYS) and env_args["env_name"] == "Lift"
    raw = {
        "object-state": np.zeros(10),
        "robot0_eef_pos": np.ones(3),
        "robot0_eef_quat": np.full(4, 2.0),
        "robot0_gripper_qpos": np.full(2, 3.0),
    }
    obs = envs.RobomimicEnv._obs(SimpleNamespace(env_args=env_args), raw)  # the env's concatenation, without robosuite
    np.testing.assert_array_equal(obs, expected)
    old = envs.RobomimicEnv._obs(SimpleNamespace(env_args={"env_name": "Lift"}), raw)  # an older checkpoint's env_args
    np.testing.assert_array_equal(old, np.repeat([1, 2, 3, 0], [3, 4, 2, 10]))
