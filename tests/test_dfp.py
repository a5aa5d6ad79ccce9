"""Tests of dfp_offline_to_online.py: smoke runs as subprocesses on a tiny generated dataset, unit tests of the
pieces that can be silently wrong (chunk sampling, TD target, top-K positives, EMA reset), a learning test of the
improvement mechanism on a contextual bandit with a known critic, and resume after an interruption."""
import copy
import glob
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dfp_offline_to_online as dfp  # noqa: E402

SCRIPT = os.path.join(ROOT, "dfp_offline_to_online.py")
ENV = ["--env", "cube-single-play", "--task", "1"]
TINY = ["--hidden-dim", "32", "--num-layers", "2", "--batch-size", "16", "--num-gen", "4", "--N", "8", "--K", "2",
        "--q-best-of", "4", "--act-best-of", "4", "--eval-episodes", "1", "--eval-interval", "1000", "--log-interval", "5"]
SUBENV = dict(os.environ, MUJOCO_GL="egl", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def write_dataset(path, episodes, length, seed, obs_dim=28, drop=None):
    """A minimal official-format cube-single play file (random states; rewards come from qpos via ogbench)."""
    rng = np.random.default_rng(seed)
    n = episodes * length
    terminals = np.zeros(n, np.float32)
    terminals[length - 1 :: length] = 1.0  # 1 at the last step of each episode
    qpos = rng.normal(0, 0.05, (n, 21)).astype(np.float32)
    qpos[:, 14:17] += [0.45, 0.0, 0.02]  # the cube near the table centre
    data = dict(observations=rng.normal(size=(n, obs_dim)).astype(np.float32),
                actions=rng.uniform(-1, 1, (n, 5)).astype(np.float32), terminals=terminals, qpos=qpos,
                qvel=rng.normal(size=(n, 20)).astype(np.float32))
    if drop:
        del data[drop]
    np.savez(path, **data)
    np.savez(path.replace(".npz", "-val.npz"), **data)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("data") / "cube-single-play-v0.npz")
    write_dataset(path, episodes=8, length=60, seed=0)
    return path


def run(args, cwd, **kw):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, env=SUBENV, capture_output=True, text=True,
                          timeout=600, **kw)


def scalars(run_dir, tag):
    """{step: value} of a tensorboard tag over all event files of a run (a resumed run adds a file)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for f in sorted(glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))):
        acc = EventAccumulator(f)
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            out.update({e.step: e.value for e in acc.Scalars(tag)})
    return out


# ------------------------------------------------------------------------------------------------ smoke runs
def test_smoke_chunked_both_phases_checkpoint_and_eval_only(dataset, tmp_path):
    r = run([*ENV, *TINY, "--dataset-path", dataset, "--horizon", "5", "--offline-steps", "20", "--online-steps",
             "30", "--start-training", "10", "--save-interval", "10"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[offline]" in r.stdout and "[online]" in r.stdout
    assert "final cube-single-play-singletask-task1-v0 step 50: success" in r.stdout
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    ckpt_path = os.path.join(run_dir, "checkpoint.pt")
    ckpt = torch.load(ckpt_path, weights_only=False)
    assert ckpt["step"] == 50 and ckpt["phase"] == "online" and len(ckpt["buffer_online"]["observations"]) == 30
    assert sorted(scalars(run_dir, "eval/success")) == [1, 20, 50]  # step 1, end of offline, end
    topk = scalars(run_dir, "losses/drift_topk")
    assert topk[20] == 0.0 and topk[45] > 0  # the top-K term exists only online, after --start-training
    for tag in ("losses/critic", "losses/drift_bc", "stats/q_mean", "stats/drift_scale", "charts/SPS",
                "eval/episodic_return"):
        assert scalars(run_dir, tag), tag

    r = run(["--eval-only", "--checkpoint", ckpt_path, "--eval-episodes", "1"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "eval-only cube-single-play-singletask-task1-v0 step 50: success" in r.stdout

    r = run([*ENV, *TINY, "--dataset-path", dataset, "--hidden-dim", "64", "--resume", ckpt_path], tmp_path)
    assert r.returncode != 0 and "checkpoint does not match these networks" in r.stderr, r.stderr[-2000:]
    r = run(["--env", "cube-single-play", "--task", "2", "--resume", ckpt_path], tmp_path)
    assert r.returncode != 0 and "checkpoint was made for cube-single-play-singletask-task1-v0" in r.stderr


def test_smoke_horizon1_gaussian_soft_single_sample_shards(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(2):
        write_dataset(str(shards / f"cube-single-play-v0-shard{i}.npz"), episodes=4, length=50, seed=10 + i)
    r = run([*ENV, *TINY, "--dataset-dir", str(shards), "--shard-interval", "5", "--horizon", "1", "--drift-field",
             "gaussian", "--online-mode", "soft", "--act-best-of", "1", "--offline-steps", "15", "--online-steps", "25",
             "--start-training", "5", "--no-save-model"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "final cube-single-play-singletask-task1-v0 step 40: success" in r.stdout
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    assert not os.path.exists(os.path.join(run_dir, "checkpoint.pt"))
    assert scalars(run_dir, "losses/drift_topk")[40] > 0
    assert scalars(run_dir, "charts/shard") == {5: 1, 10: 0, 15: 1}  # one shard in memory, rotated


def test_interrupt_and_resume_continue_the_run(dataset, tmp_path):
    """SIGINT in the online phase saves a checkpoint (with the online buffer and pi_old = the actor at the
    switch); --resume ends at the same final step with one continuous log."""
    args = [*ENV, *TINY, "--dataset-path", dataset, "--offline-steps", "20", "--online-steps", "40",
            "--start-training", "30", "--save-interval", "1000"]
    p = subprocess.Popen([sys.executable, SCRIPT, *args], cwd=tmp_path, env=SUBENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    for line in p.stdout:
        if line.startswith("step 30/"):
            p.send_signal(signal.SIGINT)
            break
    out, err = p.communicate(timeout=300)
    assert p.returncode == 128 + signal.SIGINT, err[-3000:]
    assert "interrupted at step" in out
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    ckpt_path = os.path.join(run_dir, "checkpoint.pt")
    ckpt = torch.load(ckpt_path, weights_only=False)
    stop = ckpt["step"]
    assert 30 <= stop < 60 and ckpt["phase"] == "online"
    assert len(ckpt["buffer_online"]["observations"]) == stop - 20
    if stop - 20 < 30:  # no online update yet: pi_old must be exactly the actor at the switch
        for k, v in ckpt["actor"].items():
            assert torch.equal(v, ckpt["ema_actor"][k]), k

    r = run([*args, "--resume", ckpt_path], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed {os.path.basename(run_dir)}" in r.stdout and f"at step {stop}" in r.stdout
    assert "final cube-single-play-singletask-task1-v0 step 60: success" in r.stdout
    assert glob.glob(str(tmp_path / "runs" / "*")) == [run_dir]  # same run directory
    assert sorted(scalars(run_dir, "charts/SPS")) == list(range(5, 61, 5))  # continuous: every log point once
    # losses exist offline and once online updates start (online step 30 = step 50), before and after the stop
    assert sorted(scalars(run_dir, "losses/critic")) == [5, 10, 15, 20, 50, 55, 60]
    assert torch.load(ckpt_path, weights_only=False)["step"] == 60


def test_bad_input_is_refused_with_a_clear_message(dataset, tmp_path):
    cases = [
        (["--env", "cube-seven-play"], "valid: cube-single-play"),
        ([*ENV, "--K", "20", "--N", "16"], "--K must be in 1..N"),
        ([*ENV, "--horizon", "0"], "--horizon must be >= 1"),
        (["--eval-only"], "--eval-only needs --checkpoint"),
    ]
    for args, msg in cases:
        r = run(args, tmp_path)
        assert r.returncode != 0 and msg in r.stderr, (args, r.stderr[-2000:])
    bad_obs = str(tmp_path / "obs" / "cube-single-play-v0.npz")
    os.makedirs(os.path.dirname(bad_obs))
    write_dataset(bad_obs, 2, 30, 0, obs_dim=10)
    r = run([*ENV, "--dataset-path", bad_obs], tmp_path)
    assert r.returncode != 0 and "'observations' must have shape [N, 28]" in r.stderr, r.stderr[-2000:]
    no_actions = str(tmp_path / "act" / "cube-single-play-v0.npz")
    os.makedirs(os.path.dirname(no_actions))
    write_dataset(no_actions, 2, 30, 0, drop="actions")
    r = run([*ENV, "--dataset-path", no_actions], tmp_path)
    assert r.returncode != 0 and "could not read dataset" in r.stderr, r.stderr[-2000:]
    r = run([*ENV, *TINY, "--dataset-path", dataset, "--offline-steps", "20", "--online-steps", "0", "--lr", "1e30"],
            tmp_path)
    assert r.returncode != 0 and "became non-finite by step" in r.stderr, r.stderr[-2000:]


# ------------------------------------------------------------------------------------------------ unit tests
def test_chunk_sampling_rewards_masks_valid_next_obs():
    n, length, h, gamma = 30, 10, 4, 0.9
    arr = {
        "observations": np.arange(n, dtype=np.float32)[:, None],  # observation = its index t
        "next_observations": np.arange(1, n + 1, dtype=np.float32)[:, None],
        "actions": np.stack([np.arange(n), -np.arange(n)], 1).astype(np.float32),
        "rewards": np.random.default_rng(0).normal(size=n).astype(np.float32),
        "masks": np.ones(n, np.float32),
        "terminals": (np.arange(n) % length == length - 1).astype(np.float32),
    }
    arr["masks"][[6, 17]] = 0.0  # success states
    b = dfp.sample_chunks(arr, 0, n, n, np.random.default_rng(1), 500, h, gamma)
    t = b["observations"][:, 0].astype(int)
    assert set(t) == set(range(n - h + 1))  # every start that fits is drawn, no chunk runs past the data
    for i, ti in enumerate(t):
        steps = np.arange(ti, ti + h)
        assert np.isclose(b["rewards"][i], sum(gamma**k * arr["rewards"][ti + k] for k in range(h)), atol=1e-5)
        assert b["masks"][i] == arr["masks"][steps].min()
        crosses = arr["terminals"][steps[:-1]].any()  # an episode ends before the chunk's last step
        assert b["valid"][i] == (0.0 if crosses else 1.0)
        assert b["next_observations"][i, 0] == ti + h  # s_{t+h}
        np.testing.assert_array_equal(b["actions"][i], np.stack([steps, -steps], 1).reshape(-1))


def test_ring_buffer_chunks_stay_in_insertion_order():
    data = {k: np.zeros((5, 1), np.float32) if "obs" in k else np.zeros(5, np.float32) for k in dfp.ReplayBuffer.KEYS}
    data["actions"] = np.zeros((5, 1), np.float32)
    buf = dfp.ReplayBuffer(data, capacity=8)
    for t in range(1, 12):  # wraps: the oldest entries are overwritten
        buf.add(observations=[t], actions=[t], rewards=0.0, masks=1.0, terminals=0.0, next_observations=[t + 1])
    assert buf.size == 8 and buf.num_added == 11
    np.testing.assert_array_equal(buf.online_part()["observations"][:, 0], np.arange(4, 12))
    b = buf.sample(np.random.default_rng(0), 200, 3, 0.99)
    t = b["observations"][:, 0]
    np.testing.assert_array_equal(b["actions"], np.stack([t, t + 1, t + 2], 1))  # consecutive, never across the head
    assert t.min() >= 4 and t.max() <= 9


def constant_critic(obs_dim, act_dim, value):
    c = dfp.Critic(obs_dim, act_dim, 8, 1, 2)
    for q in c.qs:
        torch.nn.init.zeros_(q[-1].weight)
        torch.nn.init.constant_(q[-1].bias, value)
    return c


def test_td_target_uses_gamma_h_mask_and_valid():
    args = dfp.Args(horizon=5, discount=0.9, q_best_of=3)
    actor = dfp.Actor(3, 10, 8, 1)
    critic, target = constant_critic(3, 10, 2.0), constant_critic(3, 10, 7.0)
    batch = {"observations": torch.randn(4, 3), "next_observations": torch.randn(4, 3),
             "actions": torch.rand(4, 10) * 2 - 1, "rewards": torch.tensor([-1.0, -2.0, 0.5, -3.0]),
             "masks": torch.tensor([1.0, 0.0, 1.0, 1.0]), "valid": torch.tensor([1.0, 1.0, 1.0, 0.0])}
    loss, q = dfp.critic_loss(args, actor, critic, target, batch)
    y = batch["rewards"] + 0.9**5 * batch["masks"] * 7.0
    expected = ((2.0 - y) ** 2 * batch["valid"]).mean()
    assert torch.isclose(loss, expected) and torch.isclose(q, torch.tensor(2.0))


def test_top_k_positives_are_the_highest_q_candidates(monkeypatch):
    args = dfp.Args(N=16, K=4, num_gen=3, online_mode="soft")
    actor, ema = dfp.Actor(3, 2, 16, 1), dfp.Actor(3, 2, 16, 1)
    seen = {}

    def q_fn(obs, cand):  # a known critic: Q = first coordinate
        seen["cand"], seen["q"] = cand, cand[..., 0]
        return cand[..., 0]

    calls = []

    def fake_drift(args, gen, pos, pos_weight=None):
        calls.append((pos, pos_weight))
        return gen.sum() * 0, gen.new_zeros(()), gen.new_zeros(())

    monkeypatch.setattr(dfp, "drift", fake_drift)
    batch = {"observations": torch.randn(5, 3), "actions": torch.rand(5, 2)}
    dfp.actor_loss_online(args, actor, ema, q_fn, batch)
    (pos, w), (bc_pos, bc_w) = calls
    assert pos.shape == (5, 4, 2) and w.shape == (5, 4)
    best = seen["q"].sort(1, descending=True).values[:, :4]
    torch.testing.assert_close(pos[..., 0], best)  # the K best, best first
    assert torch.all(w[:, 0] == 1.0) and torch.all(w >= 0) and torch.all(w[:, :-1] >= w[:, 1:])
    torch.testing.assert_close(bc_pos, batch["actions"][:, None]) and bc_w is None
    assert seen["cand"].shape == (5, 16, 2)


# ------------------------------------------------------------------------------------------------ learning
def test_online_drift_moves_the_policy_toward_the_critic_optimum():
    """Contextual bandit, Q(s, a) = -||a - a*(s)||^2: BC on uniform data, then DFP online updates (top-K of N
    from the EMA policy, plus the BC term) raise the policy's mean Q and move its samples toward a*(s)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster, and much faster on a busy machine
    obs_dim, D, B = 4, 2, 64
    W = torch.randn(obs_dim, D)
    a_star = lambda s: 0.7 * torch.tanh(s @ W)  # noqa: E731
    q_fn = lambda s, a: -(a - a_star(s)[:, None, :]).pow(2).sum(-1)  # noqa: E731  [B, n]
    args = dfp.Args(N=16, K=4, num_gen=8, ema_tau=0.05)
    actor = dfp.Actor(obs_dim, D, 64, 2)
    opt = torch.optim.Adam(actor.parameters(), lr=1e-3)
    batch = lambda: {"observations": torch.randn(B, obs_dim), "actions": torch.rand(B, D) * 2 - 1}  # noqa: E731

    def policy_stats():
        s = torch.randn(512, obs_dim)
        with torch.no_grad():
            a = actor(s, 8)
        return q_fn(s, a).mean().item(), (a - a_star(s)[:, None]).norm(dim=-1).mean().item()

    for _ in range(150):  # offline: BC drift toward the uniform behaviour data
        loss = dfp.actor_loss_offline(args, actor, batch())[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    q0, d0 = policy_stats()
    ema = copy.deepcopy(actor)  # the switch: pi_old = pi_theta
    for _ in range(250):
        loss = dfp.actor_loss_online(args, actor, ema, q_fn, batch())[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for p, ep in zip(actor.parameters(), ema.parameters()):
                ep.lerp_(p, args.ema_tau)
    q1, d1 = policy_stats()
    torch.set_num_threads(threads)
    assert q1 > q0 + 0.2 * abs(q0), (q0, q1)
    assert d1 < 0.9 * d0, (d0, d1)
