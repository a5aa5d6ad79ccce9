"""scripts/generate_ogbench_dataset.py. (The dataset resolution that prints its commands is envs.py's, tested in
tests/test_envs.py.)

The script runs as a subprocess with tiny budgets (a few episodes of 50-100 steps); whole file: well under
a minute of CPU. Nothing touches ~/.ogbench: outputs go to pytest's tmp_path.
"""

import glob
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "generate_ogbench_dataset.py")
ENV = dict(os.environ, MUJOCO_GL="egl", PYTHONWARNINGS="ignore")


def generate(out_dir, *flags, check=True):
    cmd = [sys.executable, SCRIPT, "--out-dir", str(out_dir), *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def load_npz(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def play_single(tmp_path_factory):
    """cube-single play data: 3 + 1 (val) episodes of 60 steps, one worker."""
    out = tmp_path_factory.mktemp("play1")
    generate(out, "--env", "cube-single-play", "--episodes", "3", "--episode-length", "60", "--workers", "1")
    return out


def test_play_files_have_official_keys_dtypes_and_episodes(play_single):
    train = load_npz(play_single / "cube-single-play-v0.npz")
    val = load_npz(play_single / "cube-single-play-v0-val.npz")
    assert sorted(os.listdir(play_single)) == ["cube-single-play-v0-val.npz", "cube-single-play-v0.npz"]  # no temp left
    for data, episodes in ((train, 3), (val, 1)):
        assert set(data) == {"observations", "actions", "terminals", "qpos", "qvel"}
        n = episodes * 60
        assert data["observations"].shape == (n, 28) and data["observations"].dtype == np.float32
        assert data["actions"].shape == (n, 5) and data["actions"].dtype == np.float32
        assert data["qpos"].shape == (n, 14 + 7) and data["qpos"].dtype == np.float32
        assert data["qvel"].shape[0] == n and data["qvel"].dtype == np.float32
        assert data["terminals"].dtype == bool
        assert np.flatnonzero(data["terminals"]).tolist() == list(range(59, n, 60))  # last step of each episode
        assert np.all(np.abs(data["actions"]) <= 1.0)
        # observations[t] and qpos[t] describe the same state: the cube position in the observation is
        # (cube xyz - (0.425, 0, 0)) * 10 (CubeEnv.compute_observation), cube xyz is qpos[14:17].
        np.testing.assert_allclose(
            data["observations"][:, 19:22], (data["qpos"][:, 14:17] - [0.425, 0, 0]) * 10, atol=1e-4
        )
    # the oracle moves the arm: actions are not constant, episodes differ from each other
    assert train["actions"].std(0).min() > 1e-3
    assert not np.allclose(train["observations"][:60], train["observations"][60:120])


def test_play_loads_through_ogbench_with_rewards_and_masks(play_single):
    import ogbench

    path = str(play_single / "cube-single-play-v0.npz")
    env, train, val = ogbench.make_env_and_datasets("cube-single-play-singletask-task1-v0", dataset_path=path)
    assert env.observation_space.shape == (28,)
    assert train["observations"].shape == (3 * 59, 28)  # the last state of each episode is only a next_observation
    assert val["observations"].shape == (59, 28)
    for data in (train, val):
        n = len(data["observations"])
        assert data["next_observations"].shape == (n, 28)
        assert data["rewards"].shape == (n,) and data["masks"].shape == (n,)
        assert set(np.unique(data["rewards"])) <= {-1.0, 0.0} and set(np.unique(data["masks"])) <= {0.0, 1.0}
        np.testing.assert_array_equal(data["masks"], -data["rewards"])  # one cube: mask 0 exactly when solved


def test_same_seed_same_files_for_any_worker_count(play_single, tmp_path):
    generate(tmp_path, "--env", "cube-single-play-v0", "--episodes", "3", "--episode-length", "60", "--workers", "2")
    for name in ("cube-single-play-v0.npz", "cube-single-play-v0-val.npz"):
        a, b = load_npz(play_single / name), load_npz(tmp_path / name)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_expert_demos_single_task1_succeed(tmp_path):
    proc = generate(
        tmp_path, "--env", "cube-single-play", "--kind", "expert", "--task", "1", "--episodes", "10", "--workers", "1"
    )
    assert "success rate" in proc.stdout
    train = load_npz(tmp_path / "cube-single-expert-task1-v0.npz")
    val = load_npz(tmp_path / "cube-single-expert-task1-v0-val.npz")
    success = np.concatenate([train["episode_success"], val["episode_success"]])
    assert len(success) == 11 and success.mean() >= 0.8, success
    # episodes start at task 1's initial state (cube at x=0.425, y=0.1, +-1 cm) and end early once solved
    starts = np.flatnonzero(np.concatenate([[True], train["terminals"][:-1]]))
    np.testing.assert_allclose(train["qpos"][starts, 14:17], np.tile([0.425, 0.1, 0.02], (10, 1)), atol=0.012)
    assert train["terminals"].sum() == 10 and len(train["terminals"]) < 10 * 200
    # ogbench relabels them for the singletask env; demonstrations reach reward 0 (the goal)
    import ogbench

    path = str(tmp_path / "cube-single-expert-task1-v0.npz")
    _, data, _ = ogbench.make_env_and_datasets("cube-single-play-singletask-task1-v0", dataset_path=path)
    assert (data["rewards"] == 0).any() and data["masks"].shape == data["rewards"].shape


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--env", "cube-octuple-play"], "unknown --env"),
        (["--env", "cube-single-play", "--kind", "expert", "--task", "6"], "--task in 1..5"),
        (["--env", "cube-single-play", "--kind", "expert"], "--task in 1..5"),
        (["--env", "cube-double-play-singletask-task7-v0", "--kind", "expert"], "--task in 1..5"),
        (["--env", "cube-single-play", "--task", "1"], "--task only applies to --kind expert"),
        (["--env", "cube-single-play", "--episodes", "0"], "--episodes must be positive"),
        (["--env", "cube-single-play", "--workers", "-1"], "--workers must be positive"),
        (["--env", "cube-single-play", "--episode-length", "0"], "--episode-length must be positive"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, flags, message):
    out = tmp_path / "out"  # does not exist: bad input must not even create it
    proc = generate(out, *flags, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not out.exists()


def test_unwritable_out_dir_exits_2(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    proc = generate(blocker / "data", "--env", "cube-single-play", check=False)
    assert proc.returncode == 2 and "cannot write to --out-dir" in proc.stderr
    assert os.listdir(tmp_path) == ["a_file"]


def test_existing_file_needs_overwrite(tmp_path):
    target = tmp_path / "cube-single-play-v0.npz"
    target.write_bytes(b"keep me")
    proc = generate(tmp_path, "--env", "cube-single-play", "--episodes", "1", "--episode-length", "10", check=False)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert target.read_bytes() == b"keep me" and os.listdir(tmp_path) == ["cube-single-play-v0.npz"]


def test_interrupted_run_leaves_no_file_and_resumes(play_single, tmp_path):
    flags = ["--env", "cube-single-play", "--episodes", "3", "--episode-length", "60", "--workers", "1"]
    proc = subprocess.Popen(
        [sys.executable, SCRIPT, "--out-dir", str(tmp_path), *flags],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ENV,
    )
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:  # interrupt once the first episode is saved
        if glob.glob(str(tmp_path / ".cube-single-play-v0-*.parts" / "*.npz")):
            proc.send_signal(signal.SIGTERM)  # a killed run; Ctrl-C (SIGINT) also cleans up its workers
            break
        time.sleep(0.05)
    if proc.wait(timeout=60) != 0:  # interrupted: hidden parts only, nothing that looks like a dataset
        assert [f for f in os.listdir(tmp_path) if not f.startswith(".")] == []
    proc = generate(tmp_path, *flags)  # the same command again finishes the job, with the same result
    assert sorted(os.listdir(tmp_path)) == ["cube-single-play-v0-val.npz", "cube-single-play-v0.npz"]
    for name in ("cube-single-play-v0.npz", "cube-single-play-v0-val.npz"):
        a, b = load_npz(play_single / name), load_npz(tmp_path / name)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
