"""Minari datasets (mujoco/<env>/<level>-v0) through envs.py, on tiny datasets recorded here (written with
minari.create_dataset_from_buffers, as the generator writes them; no jax) under a temporary MINARI_DATASETS_PATH
(~/.minari is never read or written): the D4RL layout of the episodes, the env rebuilt from the dataset's own spec,
dbp_bc.py trained, saved and evaluated on one, dbpo_ppo.py fine-tuning that checkpoint, and the refusals (no dataset
and no network, a dataset of another env, damaged files): one line, exit 2, nothing written."""

import os
import subprocess
import sys
import warnings
from unittest import mock

import gymnasium as gym
import h5py
import minari
import numpy as np
import pytest
import torch
from minari.data_collector.episode_buffer import EpisodeBuffer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from inprocess import run_main  # noqa: E402
from test_runs import error_line  # noqa: E402

import envs  # noqa: E402

ID = "mujoco/hopper/medium-v0"
LIMIT = 50  # the recorded env's time limit: not the registry's 1000, so an env with it came from the dataset's spec
DBP, DBPO = os.path.join(ROOT, "dbp_bc.py"), os.path.join(ROOT, "dbpo_ppo.py")
REPORT = os.path.join(ROOT, "scripts", "dbpo_report.py")
TINY_DBP = [
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
    "--num-threads",
    "1",
    "--log-interval",
    "5",
    "--eval-interval",
    "0",
    "--eval-episodes",
    "2",
    "--eval-envs",
    "1",
]
FAST_DBPO = [
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
    "--num-steps",
    "4",
]


def record(root, dataset_id=ID, env_id="Hopper-v5", steps=300, seed=0):
    """A random-action dataset of `steps` steps on env_id (time limit LIMIT) under the Minari root `root`, episode i
    from seed + i, the last one cut by `steps` (truncated). Written as the generator writes its datasets, with
    minari.create_dataset_from_buffers (no jax)."""
    env = gym.make(env_id, max_episode_steps=LIMIT)
    env.action_space.seed(seed)
    episodes, t = [], 0
    while t < steps:
        obs, _ = env.reset(seed=seed + len(episodes))
        ep = {"observations": [obs], "actions": [], "rewards": [], "terminations": [], "truncations": []}
        done = False
        while not done and t < steps:
            action = env.action_space.sample()
            obs, reward, terminated, truncated, _ = env.step(action)
            for key, value in zip(ep, (obs, action, reward, terminated, truncated), strict=True):
                ep[key].append(value)
            done, t = terminated or truncated, t + 1
        ep["truncations"][-1] |= not done  # cut by `steps`
        arrays = {k: np.array(v) for k, v in ep.items()}  # observations [T + 1, O], actions [T, A], the rest [T]
        episodes.append(EpisodeBuffer(id=len(episodes), seed=seed + len(episodes), infos={}, **arrays))
    # MINARI_DATASETS_PATH: where create_dataset_from_buffers writes (restored afterwards)
    with mock.patch.dict(os.environ, MINARI_DATASETS_PATH=str(root)), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no author email, ...
        minari.create_dataset_from_buffers(dataset_id, episodes, env=env, algorithm_name="random", author="tests")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A Minari root with a 300-step random Hopper-v5 dataset under ID."""
    root = tmp_path_factory.mktemp("minari")
    record(root)
    return root


@pytest.fixture
def root(made, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(made))
    return made


def subprocess_env(root):
    return dict(
        os.environ,
        MINARI_DATASETS_PATH=str(root),
        MUJOCO_GL="egl",
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
        HF_HUB_OFFLINE="1",
    )


# ------------------------------------------------------------------------------------------------ loading
def test_episodes_in_d4rl_layout_and_the_env_of_the_dataset_spec(root):
    assert envs.resolve_env_id(ID, gym_ids=None) == envs.resolve_env_id(ID, gym_ids=envs.LOCOMOTION_ENVS) == ID
    assert envs.family(ID) == "gym"  # DBP's locomotion defaults and return-based reports
    env, data, ends, env_args = envs.load_dataset(ID)
    episodes = list(minari.load_dataset(ID).iterate_episodes())
    assert env_args is None and sorted(data) == sorted(envs.D4RL_KEYS) and len(data["observations"]) == 300
    np.testing.assert_array_equal(
        data["observations"], np.concatenate([ep.observations[:-1] for ep in episodes])
    )  # s_t
    np.testing.assert_array_equal(data["actions"], np.concatenate([ep.actions for ep in episodes]))
    np.testing.assert_array_equal(data["rewards"], np.concatenate([ep.rewards for ep in episodes]))
    assert data["observations"].shape == (300, 11) and data["actions"].shape == (300, 3)
    lengths = [len(ep.actions) for ep in episodes]
    assert np.flatnonzero(ends).tolist() == (np.cumsum(lengths) - 1).tolist()  # exactly each episode's last step
    np.testing.assert_array_equal(data["terminals"], np.concatenate([ep.terminations for ep in episodes]))
    assert data["terminals"].any() and data["timeouts"].any()  # Hopper falls; the time limit cuts the others
    np.testing.assert_array_equal(data["timeouts"], np.concatenate([ep.truncations for ep in episodes]))  # truncations
    # the env: the dataset's own spec (its time limit), the same from make_env, make_chunk_env and make_eval_envs
    assert env.spec.id == "Hopper-v5" and env.spec.max_episode_steps == LIMIT
    assert env.observation_space.shape == (11,) and env.action_space.shape == (3,)
    assert (
        envs.make_env(ID).spec.max_episode_steps == minari.load_dataset(ID).recover_environment().spec.max_episode_steps
    )
    chunk_env = envs.make_chunk_env(ID, 4, 1)
    assert chunk_env.observation_space.shape == (1, 11) and chunk_env.action_space.shape == (4, 3)
    obs, _ = chunk_env.reset(seed=5)
    np.testing.assert_array_equal(obs[0], np.float32(gym.make("Hopper-v5").reset(seed=5)[0]))
    vec = envs.make_eval_envs(ID, 1, horizon=4, obs_horizon=1)
    res = envs.evaluate(vec, lambda o, g: np.zeros((len(o), 4, 3), np.float32), episodes=1, seed=0)
    vec.close()
    assert 0 < res["length"] <= LIMIT  # the dataset's time limit, not Hopper-v5's registered 1000 steps


def test_making_the_env_raises_no_float32_precision_warning(root):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        env = envs.make_chunk_env(ID, 4, 1)
        env.reset(seed=0)
        env.step(np.zeros((4, 3), np.float32))
    assert not [w for w in caught if "precision lowered" in str(w.message)]


def test_d4rl_npz_path_still_takes_a_gymnasium_id(root, tmp_path, capsys):
    env, data, ends, _ = envs.load_dataset(ID)
    path = str(tmp_path / "hopper.npz")
    np.savez(path, **data)  # the Minari episodes written as a D4RL-layout file: read back the same
    env2, data2, ends2, _ = envs.load_dataset("Hopper-v5", path)
    assert env2.spec.max_episode_steps == 1000 and np.array_equal(ends2, ends)  # the registry's env, the same episodes
    np.testing.assert_array_equal(data2["observations"], data["observations"])
    assert "drop --dataset-path" in error_line(capsys, envs.load_dataset, ID, path)


# ------------------------------------------------------------------------------------------------ DBP and DBPO
def test_dbp_trains_saves_and_evaluates_then_dbpo_fine_tunes_its_checkpoint(made, tmp_path):
    env = subprocess_env(made)

    def run(script, *flags):
        p = subprocess.run(
            [sys.executable, script, *flags], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
        return p.stdout

    out = run(DBP, "--env", ID, *TINY_DBP, "--total-steps", "10", "--runs-dir", "runs", "--run-name", "dbp")
    assert out.startswith(f"start: env {ID} | data") and "300 steps" in out and "To=1 Tp=4 Ta=4" in out
    ckpt_path = tmp_path / "runs" / "dbp" / "dbp_bc.pt"
    ckpt = torch.load(ckpt_path, weights_only=False)
    assert ckpt["env_id"] == ID and (ckpt["obs_dim"], ckpt["action_dim"]) == (11, 3) and ckpt["step"] == 10
    final = out.strip().splitlines()[-1]
    assert final.startswith("final: 10 steps") and "eval/episodic_return=" in final
    out = run(
        DBP,
        "--eval-only",
        "--checkpoint",
        str(ckpt_path),
        "--eval-episodes",
        "2",
        "--eval-envs",
        "1",
        "--num-threads",
        "1",
    )
    assert "final eval-only over 1 checkpoint(s): eval/return mean" in out
    assert final.split("eval/episodic_return=")[1].split()[0] in out  # the same 2 seeded episodes, the same return
    out = run(
        DBPO,
        "--checkpoint",
        str(ckpt_path),
        *FAST_DBPO,
        "--num-iterations",
        "2",
        "--runs-dir",
        "runs",
        "--run-name",
        "dbpo",
    )
    assert f"dbpo_ppo: {ID}" in out and out.strip().splitlines()[-1].startswith("final: 2 iterations")
    state = torch.load(tmp_path / "runs" / "dbpo" / "state.pt", weights_only=False)
    assert state["env_id"] == ID and state["iteration"] == 2 and state["finished"]
    # each episode of iteration 0 (the DBP policy) and of the final evaluation, on the same seeds: the paired report
    rows = np.loadtxt(tmp_path / "runs" / "dbpo" / "eval_episodes.csv", delimiter=",", skiprows=1, ndmin=2)
    assert rows[:, 0].tolist() == [0, 0, 2, 2] and rows[:, 3].tolist() == [100_001, 100_002] * 2
    out = run(REPORT, os.path.join("runs", "dbpo"), "--out", "report")
    d = rows[2:, 5] - rows[:2, 5]  # the per-episode changes: their mean and std(d) / sqrt(2) are the paired row
    assert f"| {d.mean():+.1f} | {d.std(ddof=1) / np.sqrt(2):.1f} |" in out.splitlines()[3]
    assert (
        "clip fraction" in out and (tmp_path / "report.png").stat().st_size > 0 and (tmp_path / "report.csv").exists()
    )


# ------------------------------------------------------------------------------------------------ refusals
def test_missing_dataset_names_the_generator_command_without_a_download(tmp_path, monkeypatch, capsys):
    root = tmp_path / "nothing" / "here"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    monkeypatch.setattr(minari, "download_dataset", lambda *a: pytest.fail("no download is attempted"))
    err = error_line(capsys, envs.load_dataset, "mujoco/walker2d/medium-v0")
    assert f"is not in {root} (Minari datasets are not downloaded)" in err
    assert err.rstrip().endswith("python scripts/generate_locomotion_dataset.py --dataset-id mujoco/walker2d/medium-v0")
    assert not (tmp_path / "nothing").exists()
    monkeypatch.undo()
    code, out, err = run_main(
        DBP, ["--env", "mujoco/walker2d/medium-v0", "--runs-dir", str(tmp_path / "runs")], tmp_path
    )
    assert code == 2 and err.count("\n") == 1 and "--dataset-id mujoco/walker2d/medium-v0" in err, err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "nothing").exists()


def damage_observations(root, dataset_id):
    """One more observation dimension in every episode (as if recorded on another env)."""
    with h5py.File(os.path.join(root, dataset_id, "data", "main_data.hdf5"), "a") as f:
        for name in list(f):
            obs = f[name]["observations"][()]
            del f[name]["observations"]
            f[name]["observations"] = np.concatenate([obs, obs[:, :1]], 1)


def truncate(root, dataset_id):
    path = os.path.join(root, dataset_id, "data", "main_data.hdf5")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize(
    "case, message",
    [
        ("walker2d under a hopper id", "was recorded on Walker2d-v5, not on the hopper env its id names"),
        ("an observation dimension more", "'observations' must have shape [N, 11] for this env, got (300, 12)"),
        ("a truncated data file", "could not read the Minari dataset"),
        ("damaged metadata", "could not read the Minari dataset"),
    ],
)
def test_misfit_or_damaged_datasets_are_refused_in_one_line_before_any_work(tmp_path, monkeypatch, case, message):
    root, dataset_id = tmp_path / "minari", "mujoco/hopper/expert-v0"
    record(root, dataset_id, "Walker2d-v5" if case.startswith("walker2d") else "Hopper-v5")
    if case == "an observation dimension more":
        damage_observations(root, dataset_id)
    elif case == "a truncated data file":
        truncate(root, dataset_id)
    elif case == "damaged metadata":
        (root / dataset_id / "data" / "metadata.json").write_text('{"total_episodes": ')
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    monkeypatch.setattr(minari, "download_dataset", lambda *a: pytest.fail("no download for a dataset that is there"))
    before = sorted(str(p) for p in root.rglob("*"))
    code, out, err = run_main(DBP, ["--env", dataset_id, "--runs-dir", str(tmp_path / "runs")], tmp_path)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert "generate_locomotion_dataset.py --dataset-id mujoco/hopper/expert-v0" in err or "observations" in err
    assert not (tmp_path / "runs").exists() and sorted(str(p) for p in root.rglob("*")) == before  # nothing written


@pytest.mark.parametrize("case", ["no folder", "no csv", "damaged csv", "other seeds"])
def test_report_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path, case):
    run_dir = tmp_path / "run"
    if case != "no folder":
        run_dir.mkdir()
    head = "step,env_steps,episode,env_seed,success,return,length\n"
    if case == "damaged csv":
        (run_dir / "eval_episodes.csv").write_text(head + "0,0,0,1,nan,oops\n")
    if case == "other seeds":  # iteration 10 played 3 episodes, iteration 0 two: no pairs
        (run_dir / "eval_episodes.csv").write_text(
            head + "".join(f"{s},0,{i},{100 + i},nan,1.0,5\n" for s, n in ((0, 2), (10, 3)) for i in range(n))
        )
    p = subprocess.run(
        [sys.executable, REPORT, str(run_dir), "--out", str(tmp_path / "r")], capture_output=True, text=True
    )
    assert p.returncode == 2 and p.stderr.startswith("error: ") and p.stderr.count("\n") == 1 and p.stdout == "", (
        p.stderr
    )
    assert not (tmp_path / "r.png").exists() and not (tmp_path / "r.csv").exists()
