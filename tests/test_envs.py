"""envs.py on tiny data made here: every benchmark's env id, dataset (OGBench .npz, Robomimic .hdf5, D4RL-layout .npz)
and env, the dataset checks, the chunk wrapper (open-loop execution, history, an episode's end inside a chunk), and the
evaluation (the same episodes with 1 and 3 envs; DFP's numbers exactly). Nothing is downloaded: HOME is redirected and
the downloaders are replaced; nothing is written outside pytest's tmp_path."""

import importlib.util
import json
import os
import socket
import sys
import urllib.error
import warnings

import gymnasium as gym
import h5py
import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_runs import error_line  # noqa: E402

import envs  # noqa: E402

CUBE1 = "cube-single-play-singletask-task1-v0"


def write_cube_single(path, episodes=2, length=30, seed=0, obs_dim=28):
    """A minimal official-format cube-single dataset and its -val twin (random states; ogbench computes rewards from
    qpos)."""
    rng = np.random.default_rng(seed)
    n = episodes * length
    terminals = np.zeros(n, np.float32)
    terminals[length - 1 :: length] = 1.0
    qpos = rng.normal(0, 0.05, (n, 21)).astype(np.float32)
    qpos[:, 14:17] += [0.45, 0.0, 0.02]
    data = dict(
        observations=rng.normal(size=(n, obs_dim)).astype(np.float32),
        actions=rng.uniform(-1, 1, (n, 5)).astype(np.float32),
        terminals=terminals,
        qpos=qpos,
        qvel=rng.normal(size=(n, 20)).astype(np.float32),
    )
    for p in (path, path.replace(".npz", "-val.npz")):
        np.savez(p, **data)
    return data


@pytest.fixture
def home(tmp_path, monkeypatch):
    """HOME in tmp_path (~/.ogbench, ~/.robomimic are empty) and no downloader that reaches the network."""
    import ogbench

    def offline(*a, **k):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(ogbench, "download_datasets", offline)
    return tmp_path


# ------------------------------------------------------------------------------------------------ env ids
def test_resolve_env_id_names_every_family(capsys):
    r = envs.resolve_env_id
    assert r("cube-triple-play") == "cube-triple-play-singletask-task2-v0"  # task 2, the paper's default
    assert r("cube-double-play", 4) == "cube-double-play-singletask-task4-v0"
    assert r("cube-double-play-singletask-task3-v0") == "cube-double-play-singletask-task3-v0"
    assert r("cube-double-play-singletask-task3-v0", 5) == "cube-double-play-singletask-task5-v0"
    assert r("cube-quadruple-play-v0") == "cube-quadruple-play-singletask-task2-v0"
    assert r("scene-play-singletask-task1-v0") == "scene-play-singletask-task1-v0"
    assert r("lift-mh") == r("lift-mh-low_dim") == "lift-mh"
    assert r("InvertedPendulum-v5", gym_ids=None) == "InvertedPendulum-v5"  # any registered gymnasium id
    assert r("Hopper-v5", gym_ids=envs.LOCOMOTION_ENVS) == "Hopper-v5"
    assert r("mujoco/hopper/medium-v0") == "mujoco/hopper/medium-v0" and r("mujoco/walker2d/expert-v0", gym_ids=None)
    assert envs.family("mujoco/hopper/medium-v0") == "gym"  # Minari ids, whatever gym_ids (tests/test_minari.py)
    assert [envs.family(i) for i in ("lift-mh", CUBE1, "Hopper-v5")] == ["robomimic", "ogbench", "gym"]
    assert "valid: cube-single-play, cube-double-play" in error_line(capsys, r, "antmaze-large-navigate")
    assert "unknown env 'Hopper-v5'" in error_line(capsys, r, "Hopper-v5")  # the default: no gymnasium ids
    assert "Hopper-v5, Walker2d-v5, Ant-v5" in error_line(capsys, r, "Pendulum-v1", gym_ids=envs.LOCOMOTION_ENVS)
    assert "--task must be in 1..5, got 0" in error_line(capsys, r, "cube-double-play", 0)
    assert "--task only applies to cube-* names" in error_line(capsys, r, "lift-mh", 1)
    assert "Minari mujoco/hopper/medium-v0" in error_line(capsys, r, "mujoco/hopper")  # not a dataset id
    no_minari = error_line(capsys, r, "mujoco/hopper/medium-v0", minari=False)  # DFP: OGBench and Robomimic only
    assert "unknown env 'mujoco/hopper/medium-v0'" in no_minari and "Minari" not in no_minari


# ------------------------------------------------------------------------------------------------ OGBench
def test_ogbench_dataset_path_then_default_folder_without_download(home, tmp_path):
    path = str(tmp_path / "given" / "cube-single-play-v0.npz")
    os.makedirs(os.path.dirname(path))
    raw = write_cube_single(path, episodes=2, length=30)
    env, train, val = envs.load_ogbench(CUBE1, path)
    assert env.observation_space.shape == (28,) and env.action_space.shape == (5,)
    assert train["observations"].shape == (2 * 29, 28)  # ogbench drops each episode's last state (no next state)
    assert set(np.unique(train["rewards"])) <= {-1.0, 0.0} and val["masks"].shape == (58,)
    data_dir = home / ".ogbench" / "data"  # the default folder: found there, no download
    data_dir.mkdir(parents=True)
    for name in ("cube-single-play-v0.npz", "cube-single-play-v0-val.npz"):
        os.symlink(os.path.join(os.path.dirname(path), name), data_dir / name)
    _, train2, _ = envs.load_ogbench(CUBE1)
    np.testing.assert_array_equal(train["observations"], train2["observations"])
    # load_dataset: the same data, episode ends from ogbench's terminals, checked against the env
    env3, data, ends, env_args = envs.load_dataset(CUBE1, path, env=env)
    assert env3 is env and env_args is None and np.flatnonzero(ends).tolist() == [28, 57]
    np.testing.assert_array_equal(data["actions"], raw["actions"][np.arange(60) % 30 != 29])


def test_ogbench_without_file_or_network_names_the_generate_command(home, tmp_path, monkeypatch, capsys):
    import ogbench

    data_dir, seen = home / ".ogbench" / "data", {}

    def dead_network(names, dataset_dir):  # what ogbench does offline: a partial .tmp, then an error
        seen["timeout"] = socket.getdefaulttimeout()
        os.makedirs(dataset_dir, exist_ok=True)
        (data_dir / "cube-double-play-v0.npz.tmp").write_bytes(b"partial")
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(ogbench, "download_datasets", dead_network)
    err = error_line(capsys, envs.load_ogbench, "cube-double-play-singletask-task2-v0", timeout=7.0)
    assert seen["timeout"] == 7.0 and socket.getdefaulttimeout() is None  # bounded, then restored
    assert "python scripts/generate_ogbench_dataset.py --env cube-double-play  (1.1M oracle steps" in err
    assert "URLError" in err and not (home / ".ogbench").exists()  # what the attempt made (folders, a .tmp) is gone
    data_dir.mkdir(parents=True)  # an existing folder stays, without the half-written file
    assert "URLError" in error_line(capsys, envs.load_ogbench, "cube-double-play-singletask-task2-v0")
    assert os.listdir(data_dir) == []

    def timed_out(names, dataset_dir):
        raise TimeoutError("timed out")

    monkeypatch.setattr(ogbench, "download_datasets", timed_out)
    assert "--env cube-triple-play" in error_line(capsys, envs.load_ogbench, "cube-triple-play-singletask-task3-v0")
    missing = tmp_path / "elsewhere" / "cube-single-expert-task1-v0.npz"
    err = error_line(capsys, envs.load_ogbench, CUBE1, str(missing))
    assert f"--env cube-single-play --kind expert --task 1 --out-dir {missing.parent}" in err


def test_ogbench_unreadable_or_misfit_files_are_one_line_errors(home, tmp_path, capsys):
    trunc = str(tmp_path / "cube-single-play-v0.npz")
    write_cube_single(trunc)
    with open(trunc, "rb") as f:
        head = f.read()
    with open(trunc, "wb") as f:
        f.write(head[: len(head) // 2])
    assert "could not read dataset" in error_line(capsys, envs.load_dataset, CUBE1, trunc)
    other = str(tmp_path / "other" / "cube-single-play-v0.npz")  # cube-double's 37-dim observations for cube-single
    os.makedirs(os.path.dirname(other))
    write_cube_single(other, obs_dim=37)
    assert "'observations' must have shape [N, 28] for this env" in error_line(capsys, envs.load_dataset, CUBE1, other)
    single = str(tmp_path / "single" / "cube-double-play-v0.npz")  # a cube-single file given for cube-double
    os.makedirs(os.path.dirname(single))
    write_cube_single(single)
    msg = error_line(capsys, envs.load_dataset, "cube-double-play-singletask-task2-v0", single)
    assert "was made for cube-single-play (observations of size 28), not for cube-double-play" in msg
    assert "(size 37); pass --env cube-single-play" in msg
    shards = tmp_path / "shards"
    shards.mkdir()
    assert "holds no *.npz shards" in error_line(capsys, envs.shard_paths, str(shards))
    write_cube_single(str(shards / "b.npz"))
    write_cube_single(str(shards / "a.npz"))
    assert envs.shard_paths(str(shards)) == [str(shards / "a.npz"), str(shards / "b.npz")]  # sorted, twins left out
    os.remove(shards / "a-val.npz")
    assert "has no -val twin" in error_line(capsys, envs.shard_paths, str(shards))


# ------------------------------------------------------------------------------------------------ dataset checks
class BoxEnv(gym.Env):
    """Only spaces: observations of 3 dims, actions of 2 dims in [-1, 1]."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)


def transitions(n=10):
    return {
        "observations": np.zeros((n, 3), np.float32),
        "actions": np.zeros((n, 2), np.float32),
        "terminals": np.zeros(n, bool),
        "next_observations": np.zeros((n, 3), np.float32),
    }


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(observations=np.zeros((10, 4), np.float32)), "'observations' must have shape [N, 3]"),
        (lambda d: d.pop("actions"), "'actions' must have shape [N, 2] for this env, got missing"),
        (lambda d: d.update(next_observations=np.zeros((10, 2), np.float32)), "'next_observations' must have shape"),
        (lambda d: d.update(terminals=np.zeros(9, bool)), "arrays have different lengths"),
        (lambda d: d["observations"].__setitem__((4, 1), np.nan), "non-finite values in 'observations'"),
        (
            lambda d: d["actions"].__setitem__((6, 0), 1.5),
            "1 actions lie outside the env's action bounds [-1, 1] (the first at index [6])",
        ),
    ],
)
def test_check_dataset_refuses_what_does_not_fit_the_env(capsys, change, message):
    envs.check_dataset(transitions(), BoxEnv(), "tiny")  # the good one passes
    data = transitions()
    change(data)
    assert message in error_line(capsys, envs.check_dataset, data, BoxEnv(), "tiny")
    assert "fewer than one chunk (11)" in error_line(capsys, envs.check_dataset, transitions(), BoxEnv(), "tiny", 11)


# ---------------------------------------------------------------------------------------------- gymnasium (D4RL layout)
def write_d4rl(path, episodes=3, length=20, seed=0, **overrides):
    """A D4RL-layout file for InvertedPendulum-v5 (obs 4, action 1 in [-3, 3]): random in-bounds values."""
    rng, n = np.random.default_rng(seed), episodes * length
    data = {
        "observations": rng.normal(size=(n, 4)).astype(np.float32),
        "actions": rng.uniform(-3, 3, (n, 1)).astype(np.float32),
        "rewards": np.ones(n, np.float32),
        "terminals": np.zeros(n, bool),
        "timeouts": np.zeros(n, bool),
    }
    data["terminals"][length - 1] = True  # the first episode fails, the others end by time limit
    data["timeouts"][2 * length - 1 :: length] = True
    data.update(overrides)
    np.savez(path, **{k: v for k, v in data.items() if v is not None})


def test_d4rl_dataset_for_a_gymnasium_env(tmp_path, capsys):
    path = str(tmp_path / "ip.npz")
    write_d4rl(path)
    env, data, ends, env_args = envs.load_dataset("InvertedPendulum-v5", path)
    assert env.observation_space.shape == (4,) and data["observations"].shape == (60, 4) and env_args is None
    assert np.flatnonzero(ends).tolist() == [19, 39, 59]  # terminals or timeouts
    assert "needs --dataset-path" in error_line(capsys, envs.load_dataset, "InvertedPendulum-v5")
    assert "does not exist" in error_line(capsys, envs.load_dataset, "InvertedPendulum-v5", str(tmp_path / "no.npz"))
    write_d4rl(path, timeouts=None)
    assert "lacks the keys ['timeouts']" in error_line(capsys, envs.load_dataset, "InvertedPendulum-v5", path)
    (tmp_path / "text.npz").write_text("observations,actions\n1,2\n")
    err = error_line(capsys, envs.load_dataset, "InvertedPendulum-v5", str(tmp_path / "text.npz"))
    assert "cannot read --dataset-path" in err and "as a NumPy .npz" in err


# ------------------------------------------------------------------------------------------------ Robomimic
def lift_env_args():
    spec = importlib.util.spec_from_file_location(
        "generate_robomimic_dataset", os.path.join(ROOT, "scripts", "generate_robomimic_dataset.py")
    )
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    return gen.make_env_args("lift", 20)  # the official files' format (robosuite <= 1.4 controller), horizon 20


def test_robomimic_dataset_env_and_history_wrapper(tmp_path):
    """A hand-written lift file with real env_args: the loader's arrays, the robosuite env rebuilt from the file, and
    that env stepped through the chunk wrapper with an observation history (To = 2)."""
    path, dims = (
        str(tmp_path / "low_dim_v15.hdf5"),
        {"robot0_eef_pos": 3, "robot0_eef_quat": 4, "robot0_gripper_qpos": 2, "object": 10},
    )
    with h5py.File(path, "w") as f:
        f.create_group("data").attrs["env_args"] = json.dumps(lift_env_args())
        for d, n in enumerate((6, 4)):
            g = f["data"].create_group(f"demo_{d}")
            g["actions"], g["rewards"], g["dones"] = np.full((n, 7), 0.1 * d, np.float32), np.zeros(n), np.zeros(n)
            for group in ("obs", "next_obs"):
                for k, dim in dims.items():
                    g[f"{group}/{k}"] = np.full((n, dim), d, np.float32)
    env, data, ends, env_args = envs.load_dataset("lift-mh", path, reward_shift=-1.0)
    assert env_args["env_name"] == "Lift" and np.flatnonzero(ends).tolist() == [5, 9]
    assert data["observations"].shape == (10, 19) and data["actions"].shape == (10, 7)
    assert env.observation_space.shape == (19,) and env.action_space.shape == (7,) and env.max_episode_steps == 20
    np.testing.assert_array_equal(data["rewards"], -np.ones(10))  # 0/1 success shifted by -1
    chunk_env = envs.ChunkEnv(env, horizon=3, obs_horizon=2)
    obs, _ = chunk_env.reset(seed=3)
    assert obs.shape == (2, 19) and np.array_equal(obs[0], obs[1])  # the first observation repeated
    up = np.tile([0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0], (3, 1))  # [Ta, A]: three steps up
    obs2, reward, terminated, truncated, info = chunk_env.step(up)
    assert info["steps"] == 3 and reward == -3.0 and not terminated and info["success"] == 0.0
    assert obs2[1, 2] > obs2[0, 2] > obs[1, 2]  # the end effector rose, the history holds its last two heights


# ------------------------------------------------------------------------------------------------ quiet start-up
def test_no_family_env_warns_of_float32_precision(tmp_path):
    """OGBench's action_space property built a float64-bounded Box at every read (gymnasium warned at make and reset):
    no env we build (each family, bare and chunked) warns, and OGBench's action space is one float32 Box."""
    made = [
        lambda: envs.make_chunk_env(CUBE1, 5),
        lambda: envs.make_chunk_env(CUBE1, 5, 2),
        lambda: envs.make_chunk_env("Hopper-v5", 4, 1),
        lambda: envs.make_chunk_env("Hopper-v5", 4),
        lambda: envs.make_chunk_env("lift-mh", 3, 2, env_args=lift_env_args()),
    ]
    for make in made:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            env = make()
            env.reset(seed=0)
            env.step(env.action_space.sample() * 0)
            env.reset(seed=1)
        assert not [str(w.message) for w in caught if "precision lowered" in str(w.message)], make
        assert env.action_space.dtype == env.unwrapped.action_space.dtype == np.float32
    ogb = envs.make_env(CUBE1).unwrapped
    assert ogb.action_space is ogb.action_space and type(ogb).__name__ == "CubeEnv"  # read once, kept (one RNG)


# ------------------------------------------------------------------------------------------------ the chunk wrapper
class CountingEnv(gym.Env):
    """obs = [t], reward = t after step t, terminated after `length` steps; renders [t] as a frame."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float32)
    action_space = gym.spaces.Box(-1, 1, (2,), np.float32)

    def __init__(self, length):
        self.length, self.actions = length, []

    def reset(self, seed=None, options=None):
        self.t = 0
        return np.array([0.0], np.float32), {}

    def step(self, action):
        self.t += 1
        self.actions.append(np.asarray(action).tolist())
        return np.array([self.t], np.float32), float(self.t), self.t >= self.length, False, {"success": 0.0}

    def render(self):
        return np.full((2, 2, 3), self.t, np.uint8)


def test_chunk_env_dfp_layout_runs_the_flat_chunk_open_loop():
    base = CountingEnv(length=7)
    env = envs.ChunkEnv(base, horizon=3)
    assert env.action_space.shape == (6,) and env.observation_space.shape == (1,)  # [h * A], obs [O]
    obs, _ = env.reset()
    assert obs.shape == (1,)
    chunk = np.arange(6, dtype=np.float32) / 10  # a_0 = (0, .1), a_1 = (.2, .3), a_2 = (.4, .5)
    obs, reward, terminated, truncated, info = env.step(chunk)
    assert base.actions == chunk.reshape(3, 2).tolist()  # in order, without a look at the observations
    assert obs.tolist() == [3.0] and reward == 1 + 2 + 3 and info["steps"] == 3 and not terminated
    env.step(chunk)
    obs, reward, terminated, _, info = env.step(chunk)  # the episode ends after step 7, inside the chunk
    assert terminated and info["steps"] == 1 and reward == 7 and obs.tolist() == [7.0] and env.executed_steps == 7
    env.record = True
    env.reset()
    _, _, _, _, info = env.step(chunk)
    assert [f[0, 0, 0] for f in info["frames"]] == [1, 2, 3]  # one frame per env step


def test_chunk_env_history_layout_stacks_the_last_observations():
    env = envs.ChunkEnv(CountingEnv(length=5), horizon=3, obs_horizon=3)
    assert env.observation_space.shape == (3, 1) and env.action_space.shape == (3, 2)  # [To, O], [Ta, A]
    obs, _ = env.reset()
    assert obs[:, 0].tolist() == [0, 0, 0]  # the first observation repeated To times
    obs, reward, terminated, _, info = env.step(np.zeros((3, 2), np.float32))
    assert obs[:, 0].tolist() == [1, 2, 3] and reward == 6 and not terminated
    obs, reward, terminated, _, info = env.step(np.zeros((3, 2), np.float32))
    assert obs[:, 0].tolist() == [3, 4, 5] and reward == 9 and terminated and info["steps"] == 2


# ------------------------------------------------------------------------------------------------ evaluation
class Recorder:
    """A vector env that records the chunks of each episode, named by its reset seed, until it ends."""

    def __init__(self, vec):
        self.vec, self.current, self.actions, self.first_obs = vec, [None] * vec.num_envs, {}, {}

    def __getattr__(self, name):
        return getattr(self.vec, name)

    def reset(self, seed, options):
        mask = options["reset_mask"]  # before the vector env takes it out of options
        obs, info = self.vec.reset(seed=seed, options=options)
        for j in np.flatnonzero(mask):
            self.current[j], self.actions[seed[j]], self.first_obs[seed[j]] = seed[j], [], obs[j].copy()
        return obs, info

    def step(self, actions):
        out = self.vec.step(actions)
        for j, ep in enumerate(self.current):
            if ep is not None:
                self.actions[ep].append(actions[j].copy())
                if out[2][j] or out[3][j]:
                    self.current[j] = None
        return out


def noisy_act(obs, generators):
    """A stand-in policy: a chunk of 2 actions from the observation and each episode's own noise."""
    noise = torch.stack([torch.randn(2, generator=g) for g in generators]).numpy()  # [B, 2]
    chunks = np.clip(np.stack([obs[:, 1], obs[:, 3]], 1) + noise, -3, 3)  # [B, h * A]
    return chunks, {"noise": noise[:, 0]}


def test_evaluation_is_the_same_with_1_and_3_envs():
    runs = []
    for m in (1, 3):
        vec = Recorder(envs.make_eval_envs("InvertedPendulum-v5", m, horizon=2, max_episode_steps=30))
        torch.manual_seed(m)  # another global RNG state: must not matter
        runs.append((envs.evaluate(vec, noisy_act, episodes=5, seed=100), vec.actions, vec.first_obs))
        vec.close()
    (res1, acts1, first1), (res3, acts3, first3) = runs
    np.testing.assert_equal(res1, res3)  # exactly (NaN == NaN here)
    assert set(res1) == {"success", "return", "length", "noise", "episodes"} and np.isnan(
        res1["success"]
    )  # no success signal
    assert res1["episodes"].shape == (5, 3)  # per episode: success, return, length; their means are the result
    np.testing.assert_allclose(res1["episodes"][:, 1:].mean(0), [res1["return"], res1["length"]], rtol=1e-12)
    assert sorted(acts1) == sorted(acts3) == [100, 101, 102, 103, 104]  # episode i: env seed 100 + i
    for ep in acts1:
        np.testing.assert_array_equal(np.stack(acts1[ep]), np.stack(acts3[ep]))
        np.testing.assert_array_equal(first1[ep], gym.make("InvertedPendulum-v5").reset(seed=ep)[0])
    assert not np.array_equal(np.stack(acts1[100])[:2], np.stack(acts1[101])[:2])  # episodes differ
    assert 1 <= res1["length"] <= 30 and 0 < res1["return"] <= res1["length"]  # InvertedPendulum: reward <= 1 per step


def test_stop_abandons_the_evaluation_and_video_records_episode_0(tmp_path):
    vec = envs.make_eval_envs("InvertedPendulum-v5", 1, horizon=2, max_episode_steps=6, render=True)
    polls = []

    def stop():  # polled once per chunk: true at the third
        polls.append(1)
        return len(polls) > 2

    assert envs.evaluate(vec, noisy_act, episodes=3, seed=0, stop=stop) is None and len(polls) == 3
    video = tmp_path / "videos" / "eval_1.mp4"
    res = envs.evaluate(vec, noisy_act, episodes=2, seed=0, video_path=str(video))
    vec.close()
    import imageio.v3 as iio

    assert res["length"] <= 6 and os.listdir(video.parent) == ["eval_1.mp4"]  # no temporary file left
    assert len(list(iio.imiter(video))) > 1


def test_evaluate_reproduces_dfp_evaluate_exactly():
    """DFP's acting function for evaluate (dfp.make_act) is the best-of-N by the critic of the evaluation DFP had
    before it adopted envs.evaluate, written out below (this test checked it against that code, bit for bit): the
    same chunks and q_chosen, so the same numbers."""
    import dfp_offline_to_online as dfp

    torch.manual_seed(0)
    actor, critic = dfp.Actor(28, 25, 16, 2), dfp.Critic(28, 25, 16, 2, 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def act(obs, generators):  # best-of-4 by the critic, as DFP's own evaluate did
        o = torch.as_tensor(obs)
        cand = actor(o, 4, generators)  # [B, N, D]
        q = dfp.q_mean(critic, o, cand)  # [B, N]
        best, idx = dfp.drift_field.top_k(cand, q, 1)
        return best[:, 0].numpy(), {"q_chosen": q.gather(1, idx)[:, 0].numpy()}

    with torch.no_grad():
        old_envs, new_envs = envs.make_eval_envs(CUBE1, 1, 5), envs.make_eval_envs(CUBE1, 1, 5, reward_shift=-1.0)
        old = envs.evaluate(old_envs, act, 2, 1001)
        new = envs.evaluate(new_envs, dfp.make_act(actor, critic, 4, "cpu"), 2, 1001)
    torch.set_num_threads(threads)
    old_envs.close()
    new_envs.close()
    np.testing.assert_equal(new, old)
    assert set(new) == {"success", "return", "length", "q_chosen", "episodes"}


def test_write_episodes_adds_rows_and_a_resumed_run_replaces_the_redone_evaluations(tmp_path):
    path = str(tmp_path / "eval_episodes.csv")

    def res(r):  # an evaluation's result: two episodes (success, return, length), returns r and r + 1
        return {"episodes": np.array([[np.nan, r, 10.0], [np.nan, r + 1, 12.0]])}

    envs.write_episodes(path, res(1.0), step=0, env_steps=0, seed=100)
    envs.write_episodes(path, res(5.0), step=10, env_steps=800, seed=100)
    envs.write_episodes(path, res(7.0), step=20, env_steps=1600, seed=100)
    envs.write_episodes(path, res(6.0), step=10, env_steps=800, seed=100)  # resumed before step 10: 10 and 20 redone
    with open(path) as f:
        assert f.readline().strip() == "step,env_steps,episode,env_seed,success,return,length"
    rows = np.loadtxt(path, delimiter=",", skiprows=1)
    np.testing.assert_equal(rows[:, :4], [[0, 0, 0, 100], [0, 0, 1, 101], [10, 800, 0, 100], [10, 800, 1, 101]])
    np.testing.assert_equal(rows[:, 5], [1.0, 2.0, 6.0, 7.0])  # returns: step 0's, then the redone step 10's
    assert np.isnan(rows[:, 4]).all()  # no success signal on this env: written as nan
    assert os.listdir(tmp_path) == ["eval_episodes.csv"]  # no temporary file left
