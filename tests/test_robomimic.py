"""Robomimic (lift, can, square low-dim files): the Robomimic loader and env (envs.py, robomimic_tasks.py),
scripts/generate_robomimic_dataset.py, and smoke runs of dfp_offline_to_online.py, dbp_bc.py and dbpo_ppo.py on a
tiny generated lift file.

Robosuite env construction costs seconds, so one generated file (module fixture) serves every smoke run;
loader and bad-input tests use hand-written hdf5 files and need no robosuite. Nothing touches ~/.robomimic.
"""

import glob
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from inprocess import run_main  # noqa: E402

import dfp_offline_to_online as dfp  # noqa: E402
import envs  # noqa: E402
import robomimic_tasks  # noqa: E402

GEN = os.path.join(ROOT, "scripts", "generate_robomimic_dataset.py")
DFP, DBP, DBPO = (os.path.join(ROOT, f) for f in ("dfp_offline_to_online.py", "dbp_bc.py", "dbpo_ppo.py"))
SUBENV = dict(os.environ, MUJOCO_GL="egl", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
KEYS = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object")
DIMS = (3, 4, 2, 10)  # lift: 19 in all


def run(script, args, cwd, timeout=300):
    return subprocess.run(
        [sys.executable, script, *args], cwd=cwd, env=SUBENV, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("generate_robomimic_dataset", GEN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_file(path, demo_lengths, env_name="Lift", drop_key=None, env_args=None):
    """A hand-written robomimic-layout file: demo d has value d in every obs entry and action, so order is visible."""
    env_args = env_args if env_args is not None else {"env_name": env_name, "type": 1, "env_kwargs": {}}
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = json.dumps(env_args)
        for d, n in demo_lengths.items():
            g = data.create_group(f"demo_{d}")
            g.create_dataset("actions", data=np.full((n, 7), d / 100, np.float32))
            rewards = np.zeros(n, np.float32)
            rewards[-2:] = 1.0  # success at the last two steps (robomimic's done_mode 2: dones there too)
            g.create_dataset("rewards", data=rewards)
            g.create_dataset("dones", data=rewards.copy())
            for group in ("obs", "next_obs"):
                for k, dim in zip(KEYS, DIMS, strict=True):
                    if k != drop_key:
                        g.create_dataset(
                            f"{group}/{k}", data=np.full((n, dim), d + (group == "next_obs") * 0.5, np.float32)
                        )


@pytest.fixture(scope="module")
def lift_file(tmp_path_factory):
    """5 noise-free lift episodes of at most 80 steps, from the generator's command line."""
    out = str(tmp_path_factory.mktemp("robomimic") / "lift.hdf5")
    r = run(
        GEN,
        ["--task", "lift", "--noise", "0", "--episodes", "5", "--episode-length", "80", "--workers", "1", "--out", out],
        ROOT,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return out


@pytest.fixture(scope="module")
def short_lift_file(lift_file):
    """The same data with env_kwargs['horizon'] = 15: evaluation episodes of the smoke runs stop after 15 steps."""
    out = lift_file.replace(".hdf5", "-short.hdf5")
    with open(lift_file, "rb") as src, open(out, "wb") as dst:
        dst.write(src.read())
    with h5py.File(out, "a") as f:
        env_args = json.loads(f["data"].attrs["env_args"])
        env_args["env_kwargs"]["horizon"] = 15
        f["data"].attrs["env_args"] = json.dumps(env_args)
    return out


# ---- loader (no robosuite) ----


def test_loader_shapes_numeric_order_reward_shift_and_masks(tmp_path):
    path = str(tmp_path / "f.hdf5")
    write_file(path, {10: 4, 2: 5, 1: 3})  # written out of order; demo_10 must come after demo_2
    data, ends, env_args = envs.load_robomimic("lift-mh", path)
    assert env_args["env_name"] == "Lift"
    assert set(data) == {"observations", "actions", "rewards", "masks", "terminals", "next_observations"}
    assert data["observations"].shape == (12, 19) and data["next_observations"].shape == (12, 19)
    assert data["actions"].shape == (12, 7) and all(v.dtype == np.float32 for v in data.values())
    np.testing.assert_array_equal(data["observations"][:, 0], [1] * 3 + [2] * 5 + [10] * 4)  # demo_1, demo_2, demo_10
    np.testing.assert_array_equal(data["next_observations"][:, 0], data["observations"][:, 0] + 0.5)
    rewards = np.concatenate([[0, 1, 1], [0, 0, 0, 1, 1], [0, 0, 1, 1]])
    np.testing.assert_array_equal(data["rewards"], rewards - 1.0)  # shifted by -1
    np.testing.assert_array_equal(data["masks"], 1.0 - rewards)  # 1 - dones
    np.testing.assert_array_equal(np.flatnonzero(ends), [2, 7, 11])
    assert (data["terminals"][ends] == 1).all()
    # the observation is eef_pos, eef_quat, gripper_qpos, object in that order: check via distinct per-key values
    with h5py.File(path, "a") as f:
        for i, k in enumerate(KEYS):
            del f[f"data/demo_1/obs/{k}"]
            f[f"data/demo_1/obs/{k}"] = np.full((3, DIMS[i]), 100 + i, np.float32)
    data, _, _ = envs.load_robomimic("lift-mh-low_dim", path)
    np.testing.assert_array_equal(data["observations"][0], np.repeat(100 + np.arange(4), DIMS))


def test_chunks_never_cross_demos(tmp_path):
    path = str(tmp_path / "f.hdf5")
    write_file(path, {0: 7, 1: 3, 2: 9, 3: 6}, env_name="Lift")
    with h5py.File(path, "a") as f:  # no success inside the demos: only demo ends are terminals
        for d in range(4):
            f[f"data/demo_{d}/dones"][...] = 0
    data, ends, _ = envs.load_robomimic("lift-mh", path)
    demo = data["actions"][:, 0] * 100  # [N] demo index of each step
    batch = dfp.sample_chunks(
        dfp.to_tensors(data, "cpu"), 0, len(demo), len(demo), torch.Generator().manual_seed(0), 2000, 5, 0.99
    )
    chunk_demos = batch["actions"].numpy().reshape(2000, 5, 7)[:, :, 0] * 100  # [B, h]
    inside = (chunk_demos == chunk_demos[:, :1]).all(1)
    np.testing.assert_array_equal(
        batch["valid"].numpy(), inside.astype(np.float32)
    )  # valid <=> the chunk stays in one demo
    assert inside.any() and not inside.all()


# ---- bad input: one line, exit 2 ----


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_data", "no 'data' group"),
        ("missing_key", "lacks ['obs/object', 'next_obs/object']"),
        ("unknown_env", "robosuite env 'Spaceship', not one of Robomimic's lift, can, square, transport, tool_hang"),
        ("can_for_lift", "robosuite env 'PickPlaceCan' (can, 1 arm), but --env lift-mh needs Lift (1 arm)"),
        ("corrupt", "not a readable HDF5 file"),
    ],
)
def test_bad_files_fail_with_one_line_and_exit_2(tmp_path, capsys, case, message):
    path = str(tmp_path / "f.hdf5")
    if case == "no_data":
        with h5py.File(path, "w") as f:
            f.create_group("stuff")
    elif case == "corrupt":
        with open(path, "wb") as f:
            f.write(b"\x89HDF\r\n\x1a\n" + os.urandom(300))
    else:
        write_file(
            path,
            {0: 4},
            env_name={"unknown_env": "Spaceship", "can_for_lift": "PickPlaceCan"}.get(case, "Lift"),
            drop_key="object" if case == "missing_key" else None,
        )
    with pytest.raises(SystemExit) as e:
        envs.load_robomimic("lift-mh", path)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_missing_file_names_the_generator_command(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        envs.resolve_robomimic_file("can-ph", str(tmp_path / "none.hdf5"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"generate_robomimic_dataset.py --task can --kind ph --out {tmp_path}" in err, err


def test_default_folder_then_bounded_download_then_one_error(tmp_path, monkeypatch, capsys):
    import io
    import urllib.error
    import urllib.request

    monkeypatch.setenv("HOME", str(tmp_path))
    calls = []

    def offline(url, timeout):
        calls.append((url, timeout))
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(SystemExit) as e:
        envs.resolve_robomimic_file("square-mh")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    path = tmp_path / ".robomimic" / "square" / "mh" / "low_dim_v15.hdf5"  # no scripted expert: the official file's URL
    assert (
        f"generate it with: curl -L --create-dirs -o {path} {robomimic_tasks.ROBOMIMIC_URL.format('square', 'mh')}\n"
        in err
    )
    assert calls == [(robomimic_tasks.ROBOMIMIC_URL.format("square", "mh"), 30.0)]  # one bounded attempt
    assert os.listdir(tmp_path) == []  # the folders made for the download are gone again
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"hdf5 bytes"))
    path = envs.resolve_robomimic_file("square-mh")
    assert path == str(tmp_path / ".robomimic" / "square" / "mh" / "low_dim_v15.hdf5")
    assert pathlib.Path(path).read_bytes() == b"hdf5 bytes" and os.listdir(os.path.dirname(path)) == [
        "low_dim_v15.hdf5"
    ]
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    assert envs.resolve_robomimic_file("square-mh") == path and len(calls) == 1  # found: no download


@pytest.mark.parametrize("script", [DFP, DBP])
def test_scripts_refuse_a_can_file_for_lift_before_any_work(tmp_path, script):
    path = str(tmp_path / "can.hdf5")
    write_file(path, {0: 4}, env_name="PickPlaceCan")
    r = run(script, ["--env", "lift-mh", "--dataset-path", path, "--runs-dir", str(tmp_path / "runs")], tmp_path)
    assert r.returncode == 2 and "needs Lift" in r.stderr, r.stderr[-2000:]
    assert not os.path.exists(tmp_path / "runs")


@pytest.mark.parametrize("module", ["robosuite", "h5py"])
def test_generator_without_the_robomimic_extra_names_it_in_one_line(tmp_path, monkeypatch, module):
    real = importlib.util.find_spec  # both are installed here: find_spec answers "not found" for `module` alone

    def find_spec(name, *args, **kwargs):
        return None if name == module else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    out = tmp_path / "sub" / "lift.hdf5"
    # --episodes 0: a script that went past the missing module would refuse that instead
    code, stdout, err = run_main(GEN, ["--out", str(out), "--episodes", "0", "--workers", "1"], tmp_path)
    assert code == 2 and stdout == "", stdout + err
    assert (
        err
        == f"error: scripts/generate_robomimic_dataset.py needs {module}: pip install -r requirements/robomimic.txt\n"
    )
    assert os.listdir(tmp_path) == []  # refused before check_args makes the output folder


# ---- robosuite env and generator ----


def test_both_controller_formats_build_the_same_env(gen):
    from robosuite.controllers.composite.composite_controller_factory import refactor_composite_controller_config

    old = gen.make_env_args("lift", 300)  # robosuite <= 1.4 OSC_POSE dict, as the official files
    new = json.loads(json.dumps(old))
    new["env_kwargs"]["controller_configs"] = refactor_composite_controller_config(gen.OSC_POSE_1_4, "Panda", ["right"])
    assert "body_parts" in new["env_kwargs"]["controller_configs"]
    pair = [envs.RobomimicEnv("lift-mh", json.dumps(old)), envs.RobomimicEnv("lift-mh", new)]
    obs = [e.reset(seed=3)[0] for e in pair]
    assert obs[0].shape == (19,)
    np.testing.assert_array_equal(obs[0], obs[1])
    action = np.array([0.3, -0.2, 0.1, 0.0, 0.0, 0.0, 1.0])
    steps = [e.step(action) for e in pair]
    np.testing.assert_array_equal(steps[0][0], steps[1][0])
    assert steps[0][1:4] == steps[1][1:4] and not np.array_equal(steps[0][0], obs[0])
    assert not np.array_equal(pair[0].reset(seed=4)[0], obs[0])  # another seed, another cube placement


def test_generated_file_and_noise_free_lift_expert(lift_file):
    with h5py.File(lift_file, "r") as f:
        env_args = json.loads(f["data"].attrs["env_args"])
        assert env_args["env_kwargs"]["controller_configs"]["type"] == "OSC_POSE"  # the <= 1.4 format
        demos = [f["data"][f"demo_{i}"] for i in range(5)]
        success = [bool(d.attrs["success"]) for d in demos]
        for d, s in zip(demos, success, strict=True):
            assert d["obs/object"].shape == (len(d["actions"]), 10) and d["dones"][-1] == 1
            assert (d["rewards"][-1] == 1) == s  # the success attribute is what the env reported
    assert np.mean(success) >= 0.8, success  # the scripted lift expert without noise


# ---- smoke runs of the training scripts on the generated lift file ----


def test_dfp_both_phases_eval_checkpoint_and_resume(short_lift_file, tmp_path):
    tiny = [
        "--env",
        "lift-mh",
        "--dataset-path",
        short_lift_file,
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
        "2",
        "--act-best-of",
        "2",
        "--eval-episodes",
        "1",
        "--eval-interval",
        "1000",
        "--log-interval",
        "10",
        "--offline-steps",
        "20",
        "--start-training",
        "5",
        "--no-cuda",
    ]
    r = run(DFP, [*tiny, "--online-steps", "20", "--run-name", "lift"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[offline]" in r.stdout and "[online]" in r.stdout and "final lift-mh step 40: success" in r.stdout
    ckpt_path = str(tmp_path / "runs" / "lift" / "checkpoint.pt")
    ckpt = torch.load(ckpt_path, weights_only=False)
    assert ckpt["env_id"] == "lift-mh" and ckpt["step"] == 40 and ckpt["phase"] == "online"
    assert (ckpt["buffer_online"]["rewards"] <= 0).all()  # online rewards are shifted by -1 too
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(tmp_path, "runs", "lift")).Reload()
    assert sorted(e.step for e in acc.Scalars("eval/success")) == [1, 20, 40]
    r = run(DFP, [*tiny, "--online-steps", "30", "--resume", ckpt_path], tmp_path)
    assert r.returncode == 0 and "resumed lift" in r.stdout and "final lift-mh step 50" in r.stdout, r.stderr[-3000:]


def test_dbp_train_eval_resume_and_dbpo_finetune(short_lift_file, tmp_path):
    tiny = [
        "--env",
        "lift-mh",
        "--dataset-path",
        short_lift_file,
        "--backbone",
        "mlp",
        "--hidden-dim",
        "32",
        "--batch-size",
        "16",
        "--eval-episodes",
        "1",
        "--log-interval",
        "10",
        "--num-threads",
        "1",
        "--no-cuda",
        "--save-model",
        "--run-name",
        "dbp",
    ]
    r = run(DBP, [*tiny, "--total-steps", "20", "--save-interval", "10"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "env lift-mh" in r.stdout and "eval/success=" in r.stdout
    ckpt_path = str(tmp_path / "runs" / "dbp" / "dbp_bc.pt")
    ckpt = torch.load(ckpt_path, weights_only=False)
    assert ckpt["format"] == "dbp-v1" and ckpt["env_id"] == "lift-mh" and ckpt["obs_dim"] == 19
    assert json.loads(ckpt["env_args"])["env_name"] == "Lift"
    r = run(DBP, [*tiny, "--total-steps", "30", "--resume", ckpt_path], tmp_path)
    assert r.returncode == 0 and "resuming dbp at step 20" in r.stdout, r.stderr[-3000:]
    assert torch.load(ckpt_path, weights_only=False)["step"] == 30
    # DBPO fine-tunes it in the same robosuite env, rebuilt from the checkpoint's env_args (not from any file)
    os.rename(short_lift_file, short_lift_file + ".away")
    try:
        r = run(
            DBPO,
            [
                "--checkpoint",
                ckpt_path,
                "--num-iterations",
                "1",
                "--num-envs",
                "2",
                "--num-steps",
                "4",
                "--minibatch-size",
                "8",
                "--eval-episodes",
                "1",
                "--eval-envs",
                "1",
                "--no-cuda",
                "--save-model",
                "--run-name",
                "dbpo",
            ],
            tmp_path,
        )
    finally:
        os.rename(short_lift_file + ".away", short_lift_file)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "success" in r.stdout and os.path.isfile(tmp_path / "runs" / "dbpo" / "dbpo_ppo.pt")
    assert glob.glob(str(tmp_path / "runs" / "dbpo" / "events.*"))
