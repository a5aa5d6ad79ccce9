"""Tests of dfp_offline_to_online.py: smoke runs as subprocesses on a tiny generated dataset, unit tests of the
pieces that can be silently wrong (chunk sampling, TD target, top-K positives, EMA reset), a learning test of the
improvement mechanism on a contextual bandit with a known critic, and resume after an interruption."""

import copy
import glob
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dfp_offline_to_online as dfp  # noqa: E402
import replay  # noqa: E402
import runs  # noqa: E402

SCRIPT = os.path.join(ROOT, "dfp_offline_to_online.py")
ENV = ["--env", "cube-single-play", "--task", "1"]
TINY = [
    "--hidden-dim",
    "32",
    "--num-layers",
    "2",
    "--batch-size",
    "16",
    "--num-hypotheses",
    "4",
    "--N",
    "8",
    "--K",
    "2",
    "--q-best-of",
    "4",
    "--act-best-of",
    "4",
    "--eval-episodes",
    "1",
    "--eval-interval",
    "1000",
    "--log-interval",
    "5",
]
SUBENV = dict(os.environ, MUJOCO_GL="egl", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def write_dataset(path, episodes, length, seed, obs_dim=28, drop=None):
    """A minimal official-format cube-single play file (random states; rewards come from qpos via ogbench)."""
    rng = np.random.default_rng(seed)
    n = episodes * length
    terminals = np.zeros(n, np.float32)
    terminals[length - 1 :: length] = 1.0  # 1 at the last step of each episode
    qpos = rng.normal(0, 0.05, (n, 21)).astype(np.float32)
    qpos[:, 14:17] += [0.45, 0.0, 0.02]  # the cube near the table centre
    data = dict(
        observations=rng.normal(size=(n, obs_dim)).astype(np.float32),
        actions=rng.uniform(-1, 1, (n, 5)).astype(np.float32),
        terminals=terminals,
        qpos=qpos,
        qvel=rng.normal(size=(n, 20)).astype(np.float32),
    )
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
    return subprocess.run(
        [sys.executable, SCRIPT, *args], cwd=cwd, env=SUBENV, capture_output=True, text=True, timeout=600, **kw
    )


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
    r = run(
        [
            *ENV,
            *TINY,
            "--dataset-path",
            dataset,
            "--action-horizon",
            "3",
            "--offline-steps",
            "20",
            "--online-steps",
            "30",
            "--start-training",
            "10",
            "--save-interval",
            "10",
        ],
        tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[offline]" in r.stdout and "[online]" in r.stdout
    assert "final cube-single-play-singletask-task1-v0 step 50: success" in r.stdout
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    ckpt_path = os.path.join(run_dir, "checkpoint.pt")
    ckpt = torch.load(ckpt_path, weights_only=False)
    assert ckpt["step"] == 50 and ckpt["phase"] == "online" and len(ckpt["buffer_online"]["observations"]) == 30
    assert sorted(scalars(run_dir, "eval/success")) == [1, 20, 50]  # step 1, end of offline, end
    # Where the top-K term is computed (its value, ~1 by construction of the normalized loss, is no test: its
    # properties are, in test_top_k_drift_loss_pulls_the_samples_toward_the_positives): losses are logged where
    # updates ran, offline (0) and online from step 30 = 20 + --start-training 10 (computed: not 0).
    topk = scalars(run_dir, "losses/drift_topk")
    assert {step: loss != 0.0 for step, loss in topk.items()} == {
        5: 0,
        10: 0,
        15: 0,
        20: 0,
        30: 1,
        35: 1,
        40: 1,
        45: 1,
        50: 1,
    }
    for tag in (
        "losses/critic",
        "losses/drift_bc",
        "stats/q_mean",
        "stats/drift_scale",
        "charts/SPS",
        "eval/episodic_return",
    ):
        assert scalars(run_dir, tag), tag

    r = run(["--eval-only", "--checkpoint", ckpt_path, "--eval-episodes", "1"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "eval-only cube-single-play-singletask-task1-v0 step 50: success" in r.stdout

    # a checkpoint from before the renames (--horizon, --discount) still evaluates: its h = 3 is read under the
    # old name (unmapped, the default would rebuild h = True = 1 chunks and its weights would not fit)
    ckpt["args"] = {{"action_horizon": "horizon", "gamma": "discount"}.get(k, k): v for k, v in ckpt["args"].items()}
    assert ckpt["args"]["horizon"] == 3 and "action_horizon" not in ckpt["args"]
    torch.save(ckpt, old_path := str(tmp_path / "old.pt"))
    r = run(["--eval-only", "--checkpoint", old_path, "--eval-episodes", "1"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "eval-only cube-single-play-singletask-task1-v0 step 50: success" in r.stdout

    # (--resume with other networks or another task: refused, in test_dfp_reliability.py's BAD_INPUT table)


def test_smoke_horizon1_gaussian_soft_single_sample_shards(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(2):
        write_dataset(str(shards / f"cube-single-play-v0-shard{i}.npz"), episodes=4, length=50, seed=10 + i)
    r = run(
        [
            *ENV,
            *TINY,
            "--dataset-dir",
            str(shards),
            "--shard-interval",
            "5",
            "--action-horizon",
            "1",
            "--drift-field",
            "gaussian",
            "--online-mode",
            "soft",
            "--act-best-of",
            "1",
            "--offline-steps",
            "15",
            "--online-steps",
            "25",
            "--start-training",
            "5",
            "--no-save-model",
        ],
        tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "final cube-single-play-singletask-task1-v0 step 40: success" in r.stdout
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    assert not os.path.exists(os.path.join(run_dir, "checkpoint.pt"))
    # the top-K term is computed online only, from step 20 = 15 + --start-training 5 (its value is no test: see above)
    topk = scalars(run_dir, "losses/drift_topk")
    assert {step: loss != 0.0 for step, loss in topk.items()} == {5: 0, 10: 0, 15: 0, 20: 1, 25: 1, 30: 1, 35: 1, 40: 1}
    assert scalars(run_dir, "charts/shard") == {5: 1, 10: 0, 15: 1}  # one shard in memory, rotated


def test_interrupt_and_resume_continue_the_run(dataset, tmp_path):
    """SIGINT in the online phase saves a checkpoint (with the online buffer and pi_old = the actor at the
    switch); --resume ends at the same final step with one continuous log."""
    args = [
        *ENV,
        *TINY,
        "--dataset-path",
        dataset,
        "--offline-steps",
        "20",
        "--online-steps",
        "40",
        "--start-training",
        "30",
        "--save-interval",
        "1000",
    ]
    p = subprocess.Popen(
        [sys.executable, SCRIPT, *args],
        cwd=tmp_path,
        env=SUBENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
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


def test_offline_resume_continues_with_identical_losses(dataset, tmp_path):
    """Offline resume is exact: a run of 10 offline steps continued with --resume to 20 logs the losses of one
    uninterrupted 20-step run, bit for bit (weights, Adam, RNG states and the chunk sampler are restored; the
    evaluation at the first run's end draws from its own generators, not the training RNG)."""
    base = [*ENV, *TINY, "--dataset-path", dataset, "--online-steps", "0", "--save-interval", "10"]
    for argv in (
        ["--offline-steps", "20", "--run-name", "whole"],
        ["--offline-steps", "10", "--run-name", "part"],
        ["--offline-steps", "20", "--resume", str(tmp_path / "runs" / "part" / "checkpoint.pt")],
    ):
        r = run([*base, *argv], tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed part" in r.stdout and "final cube-single-play-singletask-task1-v0 step 20: success" in r.stdout
    for tag in ("losses/critic", "losses/drift_bc", "stats/q_mean", "stats/drift_scale", "stats/drift_bc_force_sq"):
        whole, part = (scalars(str(tmp_path / "runs" / name), tag) for name in ("whole", "part"))
        assert sorted(whole) == [5, 10, 15, 20] and part == whole, (tag, whole, part)


def test_an_offline_run_resumed_with_online_steps_is_the_offline_to_online_run(dataset, tmp_path):
    """Branching at the switch is exact: an offline run of 10 steps, resumed with --online-steps 10, logs the online
    losses of one uninterrupted 10 + 10 run, and a control branch continues offline (docs/dfp.md's experiment makes
    both arms this way)."""
    base = [*ENV, *TINY, "--dataset-path", dataset, "--save-interval", "10", "--start-training", "2"]
    whole = run([*base, "--offline-steps", "10", "--online-steps", "10", "--run-name", "whole"], tmp_path)
    branch = run([*base, "--offline-steps", "10", "--online-steps", "0", "--run-name", "branch"], tmp_path)
    assert whole.returncode == branch.returncode == 0, whole.stderr[-3000:] + branch.stderr[-3000:]
    ckpt = str(tmp_path / "runs" / "branch" / "checkpoint.pt")
    shutil.copytree(tmp_path / "runs" / "branch", tmp_path / "runs" / "control")
    online = run([*base, "--offline-steps", "10", "--online-steps", "10", "--resume", ckpt], tmp_path)
    assert online.returncode == 0 and "step 20/20 [online]" in online.stdout, online.stderr[-3000:]
    for tag in ("losses/critic", "losses/drift_topk", "stats/q_mean"):
        a, b = (scalars(str(tmp_path / "runs" / name), tag) for name in ("whole", "branch"))
        assert sorted(a) == [5, 10, 15, 20] and a == b, (tag, a, b)
    control = str(tmp_path / "runs" / "control" / "checkpoint.pt")
    more = run([*base, "--offline-steps", "15", "--online-steps", "0", "--resume", control], tmp_path)
    assert more.returncode == 0 and "step 15/15 [offline]" in more.stdout, more.stderr[-3000:]


def test_resume_takes_adam_capturable_from_the_flags_not_the_checkpoint(dataset, tmp_path):
    """A checkpoint of a --cudagraphs run (Adam capturable, its step counters on the device) resumes on the CPU
    eager: capturable follows this run's --cudagraphs, the step counters go to the CPU (else Adam's first step
    fails)."""
    base = [*ENV, *TINY, "--dataset-path", dataset, "--online-steps", "0", "--save-interval", "10"]
    r = run([*base, "--offline-steps", "10", "--run-name", "graphs"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    path = str(tmp_path / "runs" / "graphs" / "checkpoint.pt")
    ckpt = torch.load(path, weights_only=False)
    for group in ckpt["optimizer"]["param_groups"]:
        group["capturable"] = True  # as a --cudagraphs run saves it
    runs.save(ckpt, path)
    r = run([*base, "--offline-steps", "20", "--resume", path], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "final cube-single-play-singletask-task1-v0 step 20: success" in r.stdout
    ckpt = torch.load(path, weights_only=False)
    assert [g["capturable"] for g in ckpt["optimizer"]["param_groups"]] == [False]
    assert all(s["step"].device.type == "cpu" and s["step"] == 20 for s in ckpt["optimizer"]["state"].values())


def test_a_diverging_fresh_run_stops_with_one_error_line(dataset, tmp_path):
    """--lr 1e30 from scratch: the losses blow up before any checkpoint; exit 1 and one line naming the quantity.
    (Bad input, exit 2, is tested case by case in test_dfp_reliability.py; the guard on a resumed run there too.)"""
    args = [*ENV, *TINY, "--dataset-path", dataset, "--offline-steps", "20", "--online-steps", "0", "--lr", "1e30"]
    r = run(args, tmp_path)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 1 and len(errors) == 1 and "became non-finite by step" in errors[0], r.stderr[-2000:]
    assert "no checkpoint was written" in errors[0] and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------------------ unit tests
def test_chunk_sampling_rewards_masks_valid_next_obs():
    n, length, h, gamma = 30, 10, 4, 0.9
    arr = {
        "observations": torch.arange(n, dtype=torch.float32)[:, None],  # observation = its index t
        "next_observations": torch.arange(1, n + 1, dtype=torch.float32)[:, None],
        "actions": torch.stack([torch.arange(n), -torch.arange(n)], 1).float(),
        "rewards": torch.randn(n, generator=torch.Generator().manual_seed(0)),
        "masks": torch.ones(n),
        "terminals": (torch.arange(n) % length == length - 1).float(),
    }
    arr["masks"][[6, 17]] = 0.0  # success states
    b = dfp.sample_chunks(arr, 0, n, n, torch.Generator().manual_seed(1), 500, h, gamma)
    t = b["observations"][:, 0].long().tolist()
    assert set(t) == set(range(n - h + 1))  # every start that fits is drawn, no chunk runs past the data
    for i, ti in enumerate(t):
        steps = torch.arange(ti, ti + h)
        assert np.isclose(b["rewards"][i], sum(gamma**k * arr["rewards"][ti + k] for k in range(h)), atol=1e-5)
        assert b["masks"][i] == arr["masks"][steps].min()
        crosses = arr["terminals"][steps[:-1]].any()  # an episode ends before the chunk's last step
        assert b["valid"][i] == (0.0 if crosses else 1.0)
        assert b["next_observations"][i, 0] == ti + h  # s_{t+h}
        torch.testing.assert_close(b["actions"][i], torch.stack([steps, -steps], 1).reshape(-1).float())
    one = dfp.sample_chunks(arr, 0, n, n, torch.Generator().manual_seed(1), 50, 1, gamma)  # h = 1: always valid
    t1 = one["observations"][:, 0].long()
    assert torch.all(one["valid"] == 1.0) and torch.equal(one["rewards"], arr["rewards"][t1])
    assert torch.equal(one["masks"], arr["masks"][t1]) and torch.equal(one["next_observations"][:, 0], t1 + 1.0)


def tiny_buffer(capacity=8):
    data = {
        k: torch.zeros(5, 1) if k in ("observations", "actions", "next_observations") else torch.zeros(5)
        for k in replay.KEYS
    }
    return dfp.ReplayBuffer(data, capacity=capacity)


def test_ring_buffer_chunks_stay_in_insertion_order():
    buf = tiny_buffer()
    for t in range(1, 12):  # wraps: the oldest entries are overwritten
        buf.add([t], [t], 0.0, 1.0, 0.0, [t + 1])
    assert buf.size == 8 and buf.num_added == 11
    np.testing.assert_array_equal(buf.online_part()["observations"][:, 0], np.arange(4, 12))
    b = dfp.sample_chunks(buf.tensors, *buf.window, torch.Generator().manual_seed(0), 200, 3, 0.99)
    t = b["observations"][:, 0]
    torch.testing.assert_close(b["actions"], torch.stack([t, t + 1, t + 2], 1))  # consecutive, never across the head
    assert t.min() >= 4 and t.max() <= 9


def test_buffer_and_sampler_restored_from_a_checkpoint_give_the_same_batches():
    """What --resume restores (the online part + the sampler state) reproduces the next batches exactly."""
    buf, gen = tiny_buffer(capacity=12), torch.Generator().manual_seed(3)
    for t in range(1, 10):
        buf.add([t], [-t], 0.1 * t, 1.0, float(t % 4 == 0), [t + 1])  # s, a, r, mask, terminal, s'
    dfp.sample_chunks(buf.tensors, *buf.window, gen, 4, 2, 0.9)
    saved = {"online": buf.online_part(), "sampler": gen.get_state()}  # what checkpoint_state() keeps
    restored, gen2 = tiny_buffer(capacity=12), torch.Generator()
    restored.extend(saved["online"])
    gen2.set_state(saved["sampler"])
    assert (restored.ptr, restored.size, restored.num_added) == (buf.ptr, buf.size, buf.num_added)
    for _ in range(3):
        a = dfp.sample_chunks(buf.tensors, *buf.window, gen, 16, 3, 0.9)
        b = dfp.sample_chunks(restored.tensors, *restored.window, gen2, 16, 3, 0.9)
        for k in a:
            assert torch.equal(a[k], b[k]), k


def constant_critic(obs_dim, act_dim, value):
    c = dfp.Critic(obs_dim, act_dim, 8, 1, 2)
    torch.nn.init.zeros_(c.weights[-1])
    torch.nn.init.constant_(c.biases[-1], value)
    return c


def plain_critic(in_dim, H, L, gelu="tanh"):
    """One critic as an ordinary nn.Sequential: Linear -> GELU -> LayerNorm(eps 1e-6) per hidden layer, Linear."""
    layers = []
    for i in range(L):
        layers += [torch.nn.Linear(H if i else in_dim, H), torch.nn.GELU(gelu), torch.nn.LayerNorm(H, eps=1e-6)]
    return torch.nn.Sequential(*layers, torch.nn.Linear(H, 1))


@pytest.mark.parametrize("gelu", ["tanh", "none"])
def test_batched_critic_ensemble_equals_a_loop_of_ordinary_mlps(gelu):
    """The stacked ensemble (one batched matmul per layer) computes what E separate nn.Linear/GELU/LayerNorm MLPs
    with the same weights compute: forward values and every parameter's gradient (tanh GELU, and --exact-gelu's);
    its init is Xavier-uniform member by member with zero biases."""
    torch.manual_seed(0)
    obs_dim, D, H, L, E = 5, 6, 16, 3, 3
    mlps = [plain_critic(obs_dim + D, H, L, gelu) for _ in range(E)]
    linears = [[m for m in q if isinstance(m, torch.nn.Linear)] for q in mlps]  # [E][layer]
    norms = [[m for m in q if isinstance(m, torch.nn.LayerNorm)] for q in mlps]
    critic = dfp.Critic(obs_dim, D, H, L, E, gelu)
    stacked = [(critic.weights, critic.biases, linears), (critic.norm_weights, critic.norm_biases, norms)]
    with torch.no_grad():
        for q in norms:  # non-trivial LayerNorm scales and shifts
            for m in q:
                m.weight.normal_(1.0, 0.3), m.bias.normal_(0.0, 0.3)
        for weights, biases, layers in stacked:  # load the E MLPs' weights into the stacked parameters
            for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
                w_e = torch.stack([q[i].weight for q in layers])  # [E, out, in] or [E, d]
                w.copy_(w_e.transpose(1, 2) if w_e.dim() == 3 else w_e[:, None])
                b.copy_(torch.stack([q[i].bias for q in layers])[:, None])
    obs, act = torch.randn(7, 4, obs_dim), torch.randn(7, 4, D)  # any leading shape
    q = critic(obs, act)  # [E, 7, 4]
    ref = torch.stack([m(torch.cat([obs, act], -1)).squeeze(-1) for m in mlps])
    torch.testing.assert_close(q, ref, rtol=1e-5, atol=1e-5)
    w = torch.randn_like(q)
    (q * w).sum().backward()
    (ref * w).sum().backward()
    for weights, biases, layers in stacked:
        for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
            g = torch.stack([q[i].weight.grad for q in layers])
            torch.testing.assert_close(w.grad, g.transpose(1, 2) if g.dim() == 3 else g[:, None], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(
                b.grad[:, 0], torch.stack([q[i].bias.grad for q in layers]), rtol=1e-4, atol=1e-5
            )
    # initialization: U(+-sqrt(6 / (d_in + d_out))) weights (Xavier), zero biases, members independent
    big = dfp.Critic(40, 24, 256, 2, 2)
    bound = (6 / (256 + 256)) ** 0.5
    assert big.weights[1].abs().max() <= bound and abs(big.weights[1].std().item() - bound / 3**0.5) < 0.05 * bound
    assert not big.biases[1].any() and not torch.equal(big.weights[1][0], big.weights[1][1])


def test_exact_gelu_flag_selects_the_exact_gelu_in_every_network():
    """Default: GELU's tanh approximation (the ref code's); --exact-gelu: the exact (erf) one, in all four networks,
    which then compute different values."""
    obs, eps = torch.randn(3, 4), torch.randn(3, 2, 6)
    outs = []
    for exact in (False, True):
        torch.manual_seed(0)
        m = dfp.build(
            dfp.Args(exact_gelu=exact, hidden_dim=8, num_layers=2, action_horizon=2, cuda=False), 4, 3, "cpu", None
        )
        want = "none" if exact else "tanh"
        for k in ("actor", "ema_actor"):
            assert [g.approximate for g in m[k].net if isinstance(g, torch.nn.GELU)] == [want, want], k
        assert m["critic"].gelu == m["target_critic"].gelu == want
        m["actor"].noise = lambda o, generator=None: eps
        outs.append((m["actor"](obs, 2), m["critic"](obs[:, None].expand(-1, 2, -1), eps)))
    assert not torch.equal(outs[0][0], outs[1][0]) and not torch.equal(outs[0][1], outs[1][1])


def tiny_update_setup(seed=0, device="cpu", capturable=False):
    """Tiny nets, optimizer and batches for comparing update paths; identical for equal seeds."""
    torch.manual_seed(seed)
    args = dfp.Args(
        action_horizon=2, hidden_dim=16, num_layers=2, batch_size=8, num_hypotheses=4, N=6, K=2, q_best_of=3
    )
    obs_dim, D = 5, 2 * 3
    actor, ema = dfp.Actor(obs_dim, D, 16, 2).to(device), dfp.Actor(obs_dim, D, 16, 2).to(device)
    critic, target = dfp.Critic(obs_dim, D, 16, 2, 2).to(device), dfp.Critic(obs_dim, D, 16, 2, 2).to(device)
    ema.load_state_dict(actor.state_dict())
    target.load_state_dict(critic.state_dict())
    opt = torch.optim.Adam([*actor.parameters(), *critic.parameters()], lr=1e-3, capturable=capturable)
    g = torch.Generator().manual_seed(seed)
    batches = [
        {
            "observations": torch.randn(8, obs_dim, generator=g),
            "next_observations": torch.randn(8, obs_dim, generator=g),
            "actions": torch.rand(8, D, generator=g) * 2 - 1,
            "rewards": -torch.rand(8, generator=g),
            "masks": torch.ones(8),
            "valid": (torch.rand(8, generator=g) > 0.2).float(),
        }
        for _ in range(3)
    ]
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    nets = (actor, critic, target, ema)
    return dfp.make_update(args, actor, critic, target, ema, opt), nets, batches


def run_updates(update, batches, n_offline, seed=123):
    """Offline updates, then online ones (both paths); the RNG is seeded before each, so both runs draw alike."""
    outs = []
    for i, b in enumerate(batches):
        torch.manual_seed(seed + i)
        outs.append(update(b, online=i >= n_offline))
    return outs


def assert_same_training(outs, nets, ref_outs, ref_nets, rtol, atol):
    for o, r in zip(outs, ref_outs, strict=True):
        torch.testing.assert_close(o.cpu(), r.cpu(), rtol=rtol, atol=atol)
    for net, ref in zip(nets, ref_nets, strict=True):
        for (name, p), rp in zip(net.named_parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p.detach().cpu(), rp.detach().cpu(), rtol=rtol, atol=atol, msg=name)


def test_compiled_update_matches_eager(monkeypatch):
    """--compile: torch.compile(update) gives the losses and parameters of the eager update (same random draws)."""
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)  # compiled randn draws eager's numbers
    update, nets, batches = tiny_update_setup()
    ref_outs = run_updates(update, batches, n_offline=2)
    update_c, nets_c, batches_c = tiny_update_setup()
    outs = run_updates(torch.compile(update_c), batches_c, n_offline=2)
    assert_same_training(outs, nets_c, ref_outs, nets, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_update_matches_eager():
    """--cudagraphs: 3 eager warm-up calls, then capture + replays; the same results as the eager update on CUDA."""
    update, nets, batches = tiny_update_setup(device="cuda", capturable=True)
    batches = batches * 3  # per phase: 2 warm-up calls, then capture + replay, then replays
    ref_outs = run_updates(update, batches, n_offline=4)
    update_g, nets_g, batches_g = tiny_update_setup(device="cuda", capturable=True)
    outs = run_updates(runs.CudaGraphUpdate(update_g, warmup=2), batches_g * 3, n_offline=4)
    assert_same_training(outs, nets_g, ref_outs, nets, rtol=1e-4, atol=1e-5)


def test_cudagraphs_without_cuda_is_refused(tmp_path):
    r = run([*ENV, "--cudagraphs", "--no-cuda"], tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: --cudagraphs needs a CUDA device"), r.stderr[-2000:]
    assert not os.path.exists(tmp_path / "runs")


def test_td_target_uses_gamma_h_mask_and_valid():
    args = dfp.Args(action_horizon=5, gamma=0.9, q_best_of=3)
    actor = dfp.Actor(3, 10, 8, 1)
    critic, target = constant_critic(3, 10, 2.0), constant_critic(3, 10, 7.0)
    batch = {
        "observations": torch.randn(4, 3),
        "next_observations": torch.randn(4, 3),
        "actions": torch.rand(4, 10) * 2 - 1,
        "rewards": torch.tensor([-1.0, -2.0, 0.5, -3.0]),
        "masks": torch.tensor([1.0, 0.0, 1.0, 1.0]),
        "valid": torch.tensor([1.0, 1.0, 1.0, 0.0]),
    }
    loss, q, y = dfp.critic_loss(args, actor, critic, target, batch)
    expected_y = batch["rewards"] + 0.9**5 * batch["masks"] * 7.0
    expected = ((2.0 - expected_y) ** 2 * batch["valid"]).mean()  # over E * B, not sum(valid)
    torch.testing.assert_close(y, expected_y)
    assert torch.isclose(loss, expected) and q.shape == (2, 4) and torch.allclose(q, torch.tensor(2.0))


def test_offline_actions_are_clipped_inside_the_bounds_as_the_ref_code():
    """Dataset actions go to +-(1 - 1e-5) (the ref code's action_clip_eps); those inside are left as they are."""
    actions = np.array([[1.0, -1.0, 0.5, 1.5, -0.99999]], np.float32)
    data = {k: np.zeros((1, 3), np.float32) for k in replay.KEYS} | {"actions": actions}
    out = dfp.offline_tensors(data, "cpu")["actions"]
    lim = np.float32(1 - 1e-5)
    assert out.tolist() == [[lim, -lim, 0.5, lim, np.float32(-0.99999)]]


def test_top_k_positives_are_the_highest_q_candidates(monkeypatch):
    args = dfp.Args(N=16, K=4, num_hypotheses=3, online_mode="soft")
    actor, ema = dfp.Actor(3, 2, 16, 1), dfp.Actor(3, 2, 16, 1)
    seen = {}

    def critic(obs, cand):  # a known critic ensemble of one: Q = first coordinate, [1, B, N]
        seen["cand"], seen["q"] = cand, cand[..., 0]
        return cand[..., 0][None]

    calls = []

    def fake_drift(args, gen, pos, pos_weight=None):
        calls.append((pos, pos_weight))
        return gen.sum() * 0, gen.new_zeros(()), gen.new_zeros(())

    monkeypatch.setattr(dfp, "drift", fake_drift)
    batch = {"observations": torch.randn(5, 3), "actions": torch.rand(5, 2)}
    dfp.actor_loss(args, actor, ema, critic, batch, online=True)
    (bc_pos, bc_w), (pos, w) = calls
    assert pos.shape == (5, 4, 2) and w.shape == (5, 4)
    best = seen["q"].sort(1, descending=True).values[:, :4]
    torch.testing.assert_close(pos[..., 0], best)  # the K best, best first
    assert torch.all(w[:, 0] == 1.0) and torch.all(w >= 0) and torch.all(w[:, :-1] >= w[:, 1:])
    torch.testing.assert_close(bc_pos, batch["actions"][:, None])  # the BC term's positive: the data chunk
    assert bc_w is None
    assert seen["cand"].shape == (5, 16, 2)


def drift_grad(args, gen, pos, weight=None):
    """(loss, d loss / d gen) of dfp.drift, the loss of actor_loss's top-K term, with gen as the leaf."""
    gen = gen.detach().clone().requires_grad_(True)
    loss = dfp.drift(args, gen, pos, weight)[0]
    (grad,) = torch.autograd.grad(loss, gen)
    return loss.detach(), grad


@pytest.mark.parametrize("field", ["official", "gaussian"])
def test_top_k_drift_loss_pulls_the_samples_toward_the_positives(field):
    """The top-K term drift(gen, pos = the K best of N, soft weights or none). Its value says little (the official
    field's loss is ~1 by construction: a normalized force), so what it does is tested: descending its gradient moves
    every generated sample toward the positives; it ignores the order of the positives and follows the order of the
    samples; it is unchanged when everything moves together (and, official field, when everything is scaled); with
    one sample and one positive the pull is along p - x, and the Gaussian field's loss is ||x - p||^2 / D."""
    args = dfp.Args(drift_field=field, bandwidth=2.0)
    g = torch.Generator().manual_seed(0)
    B, G, K, D = 4, 8, 4, 6
    gen = torch.randn(B, G, D, generator=g, dtype=torch.float64)  # [B, G, D]
    pos = 3.0 + 0.3 * torch.randn(B, K, D, generator=g, dtype=torch.float64)  # the top-K chunks, a cluster apart
    soft = torch.rand(B, K, generator=g, dtype=torch.float64) + 0.1  # [B, K]
    for weight in (None, soft):
        loss, grad = drift_grad(args, gen, pos, weight)
        center = pos.mean(1, keepdim=True)  # [B, 1, D]
        assert ((-grad * (center - gen)).sum(-1) > 0).all()  # every sample is pulled toward the positives
        x = gen.clone()
        for _ in range(10):  # normalized gradient descent: the direction is what is tested, not the step size
            step = drift_grad(args, x, pos, weight)[1]
            x = x - 0.1 * step / step.norm(dim=-1).mean()
        assert (x - center).norm(dim=-1).mean() < 0.9 * (gen - center).norm(dim=-1).mean()
        # permutations: of the positives (weights alike) nothing changes; of the samples the gradient follows
        perm_k, perm_g = torch.randperm(K, generator=g), torch.randperm(G, generator=g)
        w_perm = None if weight is None else weight[:, perm_k]
        loss_k, grad_k = drift_grad(args, gen, pos[:, perm_k], w_perm)
        loss_g, grad_g = drift_grad(args, gen[:, perm_g], pos, weight)
        torch.testing.assert_close(loss_k, loss)
        torch.testing.assert_close(grad_k, grad)
        torch.testing.assert_close(loss_g, loss)
        torch.testing.assert_close(grad_g, grad[:, perm_g])
        # a common translation changes nothing; a common scaling leaves the official (normalized) loss unchanged
        shift = torch.randn(B, 1, D, generator=g, dtype=torch.float64)
        loss_t, grad_t = drift_grad(args, gen + shift, pos + shift, weight)
        torch.testing.assert_close(loss_t, loss)
        torch.testing.assert_close(grad_t, grad)
        if field == "official":  # rtol: the self-distance floor sqrt(1e-8) does not scale (test_drift_field.py)
            torch.testing.assert_close(drift_grad(args, 5.0 * gen, 5.0 * pos, weight)[0], loss, rtol=1e-5, atol=0)
    # one sample, one positive: pulled straight at it (the sample's own repulsion is masked / zero)
    x1, p1 = gen[:, :1], pos[:, :1]  # [B, 1, D]
    loss1, grad1 = drift_grad(args, x1, p1)
    cos = torch.nn.functional.cosine_similarity(-grad1, p1 - x1, dim=-1)
    torch.testing.assert_close(cos, torch.ones_like(cos))
    if field == "gaussian":  # V(x) = (p - x) - (x - x): L = mean ||x - sg(x + V)||^2 = mean (x - p)^2
        torch.testing.assert_close(loss1, (x1 - p1).pow(2).mean())


# ------------------------------------------------------------------------------------------------ learning
def test_online_drift_moves_the_policy_toward_the_critic_optimum():
    """Contextual bandit, Q(s, a) = -||a - a*(s)||^2: BC on uniform data, then DFP online updates (top-K of N
    from the EMA policy, plus the BC term) raise the policy's mean Q and move its samples toward a*(s)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster, and much faster on a busy machine
    obs_dim, D, B = 4, 2, 64
    W = torch.randn(obs_dim, D)

    def a_star(s):  # the optimal action a*(s), [B, D]
        return 0.7 * torch.tanh(s @ W)

    def q_fn(s, a):  # Q(s, a) = -||a - a*(s)||^2: s [B, O], a [B, n, D] -> [B, n]
        return -(a - a_star(s)[:, None, :]).pow(2).sum(-1)

    args = dfp.Args(N=16, K=4, num_hypotheses=8, ema_tau=0.05)
    actor = dfp.Actor(obs_dim, D, 64, 2)
    opt = torch.optim.Adam(actor.parameters(), lr=1e-3)

    def batch():  # uniform behaviour data
        return {"observations": torch.randn(B, obs_dim), "actions": torch.rand(B, D) * 2 - 1}

    def policy_stats():
        s = torch.randn(512, obs_dim)
        with torch.no_grad():
            a = actor(s, 8)
        return q_fn(s, a).mean().item(), (a - a_star(s)[:, None]).norm(dim=-1).mean().item()

    def critic(s, a):  # the known Q as an ensemble of one: s [B, n, O], a [B, n, D] -> [1, B, n]
        return q_fn(s[:, 0], a)[None]

    for _ in range(150):  # offline: BC drift toward the uniform behaviour data
        loss = dfp.actor_loss(args, actor, None, critic, batch(), online=False)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    q0, d0 = policy_stats()
    ema = copy.deepcopy(actor)  # the switch: pi_old = pi_theta
    for _ in range(250):
        loss = dfp.actor_loss(args, actor, ema, critic, batch(), online=True)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for p, ep in zip(actor.parameters(), ema.parameters(), strict=True):
                ep.lerp_(p, args.ema_tau)
    q1, d1 = policy_stats()
    torch.set_num_threads(threads)
    assert q1 > q0 + 0.2 * abs(q0), (q0, q1)
    assert d1 < 0.9 * d0, (d0, d1)


# ------------------------------------------------------------------------------------------------ benchmark
def test_bench_runs_without_the_environment_stack(tmp_path):
    """bench/bench_dfp.py (tiniest settings) runs with gymnasium, ogbench and mujoco unimportable and writes its
    table as JSON: every row present, every limit and ratio positive."""
    out = tmp_path / "dfp.json"
    argv = [
        "bench_dfp.py",
        "--no-compile",
        "--hidden-dims",
        "16",
        "--num-layers",
        "1",
        "--batch-size",
        "4",
        "--updates",
        "1",
        "--repeats",
        "1",
        "--actions",
        "1",
        "--out",
        str(out),
    ]
    code = (
        "import runpy, sys\n"
        "for m in ('gymnasium', 'ogbench', 'mujoco'):\n    sys.modules[m] = None  # import m -> ImportError\n"
        f"sys.argv = {argv!r}\n"
        f"runpy.run_path({os.path.join(ROOT, 'bench', 'bench_dfp.py')!r}, run_name='__main__')\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=SUBENV, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    res = json.loads(out.read_text())
    assert [(t["phase"], t["mode"]) for t in res["training"]] == [("offline", "eager"), ("online", "eager")]
    assert all(t["limit_ms"] > 0 and t["ratio"] > 0 and t["updates_per_s"] > 0 for t in res["training"])
    assert len(res["acting"]) == 4 and res["evaluation"] is not None
    assert res["online_step"] and all(t["ratio"] > 0 and t["ratio_before"] > 0 for t in res["online_step"])
