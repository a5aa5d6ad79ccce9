"""scripts/generate_locomotion_dataset.py: the Minari dataset it writes, resume after a signal, refusals.

The script runs as a subprocess with tiny budgets (a few hundred SAC steps, a few hundred recorded steps); the
bad-input matrix runs in-process (tests/inprocess.py). Nothing touches ~/.minari: every root is under tmp_path.
"""

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys

import gymnasium as gym
import minari
import numpy as np
import pytest
import torch
from inprocess import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "generate_locomotion_dataset.py")
ENV = dict(os.environ, MUJOCO_GL="egl", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
ID = "mujoco/hopper/medium-v0"
# Tiny SAC: updates from step 50 on minibatches of 32; evaluations of 2 episodes.
TINY = ["--learning-starts", "50", "--batch-size", "32", "--buffer-size", "5000", "--eval-episodes", "2"]


def generate(root, *flags, check=True):
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--root", str(root), *flags], capture_output=True, text=True, env=ENV, timeout=300
    )
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@contextlib.contextmanager
def minari_root(root):
    """MINARI_DATASETS_PATH=root (minari reads it at each call), restored afterwards."""
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    try:
        yield
    finally:
        if old is None:
            del os.environ["MINARI_DATASETS_PATH"]
        else:
            os.environ["MINARI_DATASETS_PATH"] = old


def load(root, dataset_id=ID):
    with minari_root(root):
        return minari.load_dataset(dataset_id)


def checkpoint(root, dataset_id=ID, seed=0):
    name = f"{dataset_id.replace('/', '__')}__seed{seed}"
    return os.path.join(root, ".generate_locomotion", name, "checkpoint.pt")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """300 SAC steps (the target is out of reach: --max-train-steps ends the training), then 400 recorded steps."""
    root = tmp_path_factory.mktemp("minari")
    proc = generate(root, *TINY, "--max-train-steps", "300", "--eval-interval", "300", "--num-steps", "400")
    return root, proc


def test_dataset_loads_with_hopper_spaces_and_metadata(made):
    root, proc = made
    assert "target NOT reached at step 300" in proc.stdout and "wrote mujoco/hopper/medium-v0" in proc.stdout
    dataset = load(root)
    env = gym.make("Hopper-v5")
    assert dataset.observation_space == env.observation_space and dataset.action_space == env.action_space
    assert dataset.total_steps == 400
    steps = 0
    for ep in dataset.iterate_episodes():
        n = len(ep.actions)
        assert ep.observations.shape == (n + 1, 11) and ep.actions.shape == (n, 3) and ep.rewards.shape == (n,)
        assert ep.terminations.shape == ep.truncations.shape == (n,)
        assert ep.terminations[-1] or ep.truncations[-1]  # each episode ends once, at its last step
        assert not (ep.terminations[:-1] | ep.truncations[:-1]).any()
        assert np.all(np.abs(ep.actions) <= 1.0)
        steps += n
    assert steps == 400 and ep.truncations[-1]  # the last episode is cut by --num-steps: truncated, not terminated
    meta = dataset.storage.metadata
    assert meta["dataset_id"] == ID and meta["algorithm_name"] == "SAC" and meta["author"]
    assert meta["code_permalink"] and "not Minari's published data" in meta["description"]
    assert (meta["ref_min_score"], meta["ref_max_score"]) == (-20.272305, 3234.3)  # D4RL's Hopper references
    assert minari.get_normalized_score(dataset, np.array(3234.3)) == pytest.approx(1.0)
    for eval_env in (False, True):
        recovered = dataset.recover_environment(eval_env=eval_env)
        assert recovered.spec.id == "Hopper-v5"
        obs, _ = recovered.reset(seed=0)
        assert recovered.observation_space.contains(obs)
    # Only Minari's layout is visible; the training checkpoint sits in a hidden folder, the staging root is gone.
    assert sorted(os.listdir(root)) == [".generate_locomotion", "mujoco"]
    assert os.listdir(os.path.dirname(checkpoint(root))) == ["checkpoint.pt"]
    with minari_root(root):
        assert list(minari.list_local_datasets()) == [ID]


def test_existing_dataset_needs_overwrite_and_rerecords_without_retraining(made):
    root, _ = made
    proc = generate(root, *TINY, "--max-train-steps", "300", "--num-steps", "200", check=False)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert load(root).total_steps == 400  # untouched
    # With --overwrite and a target the trained policy meets, the checkpoint is reused: no training, a new recording.
    proc = generate(
        root, *TINY, "--max-train-steps", "300", "--num-steps", "200", "--overwrite", "--target-return", "-1e9"
    )
    assert "resumed from step 300" in proc.stdout and "target reached at step 300" in proc.stdout, proc.stdout
    assert load(root).total_steps == 200
    assert sorted(os.listdir(root)) == [".generate_locomotion", "mujoco"]


def test_sigterm_saves_a_checkpoint_and_the_same_command_continues(tmp_path):
    # Unbounded training (a target out of reach, no step budget): the signal cannot come after the work is done.
    flags = [
        *TINY,
        "--target-return",
        "1e9",
        "--max-train-steps",
        "1000000000",
        "--eval-interval",
        "1000000000",
        "--checkpoint-interval",
        "100",
        "--num-steps",
        "200",
    ]
    proc = subprocess.Popen(
        [sys.executable, SCRIPT, "--root", str(tmp_path), *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
    )
    out = []
    for line in proc.stdout:  # wait for the first periodic checkpoint: SAC is updating by then
        out.append(line)
        if line.startswith("saved checkpoint at step 100"):
            proc.send_signal(signal.SIGTERM)
            break
    out += proc.stdout.readlines()
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM, "".join(out)
    text = "".join(out)
    assert "rerun the same command to continue" in text
    saved = torch.load(checkpoint(tmp_path), weights_only=False)
    assert saved["step"] >= 100 and saved["buffer"]["pos"] == saved["step"]  # every step's transition is kept
    assert not os.path.exists(tmp_path / "mujoco")  # no dataset (nor its namespace) before the recording
    # A refusal names the flags a checkpoint was trained with (before any work, nothing changes).
    code, _, err = run_main(SCRIPT, ["--root", str(tmp_path), *flags, "--batch-size", "64"], tmp_path)
    assert code == 2 and "--batch-size 32" in err and len(err.strip().splitlines()) == 1, err
    # The same command, with a step budget now, continues from the saved step and finishes.
    budget = saved["step"] + 50
    proc = generate(tmp_path, *flags, "--max-train-steps", str(budget))
    assert f"resumed from step {saved['step']}" in proc.stdout, proc.stdout
    assert f"target NOT reached at step {budget}" in proc.stdout
    assert torch.load(checkpoint(tmp_path), weights_only=False)["step"] == budget
    assert load(tmp_path).total_steps == 200


def test_interrupted_recording_leaves_no_dataset(tmp_path):
    # The target is met at once (step 0); the recording is unbounded, so the signal comes in the middle of it.
    flags = [*TINY, "--target-return", "-1e9", "--num-steps", "1000000000"]
    proc = subprocess.Popen(
        [sys.executable, SCRIPT, "--root", str(tmp_path), *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
    )
    out = []
    for line in proc.stdout:
        out.append(line)
        if line.startswith("recording"):
            proc.send_signal(signal.SIGINT)
            break
    out += proc.stdout.readlines()
    assert proc.wait(timeout=60) == 128 + signal.SIGINT, "".join(out)
    assert "no dataset written" in "".join(out)
    assert os.listdir(tmp_path) == [".generate_locomotion"]  # neither the dataset nor its staging root
    assert os.listdir(os.path.dirname(checkpoint(tmp_path))) == ["checkpoint.pt"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dataset-id", "mujoco/ant/medium-v0"], "--dataset-id"),
        (["--dataset-id", "hopper-medium-v2"], "--dataset-id"),
        (["--num-steps", "0"], "--num-steps must be positive, got 0"),
        (["--num-steps", "-5"], "--num-steps must be positive, got -5"),
        (["--num-steps", "1e6"], "--num-steps"),  # not an int
        (["--max-train-steps", "0"], "--max-train-steps must be positive"),
        (["--eval-episodes", "0"], "--eval-episodes must be positive"),
        (["--gamma", "1.5"], "--gamma must be in (0, 1]"),
        (["--target-return", "nan"], "--target-return must be finite"),
        (["--seed", "zero"], "--seed"),
        (["--no-such-flag", "1"], "no-such-flag"),
    ],
)
def test_bad_input_is_refused_in_one_line_before_any_work(tmp_path, flags, message):
    root = tmp_path / "minari"  # does not exist: a refusal must not even create it
    code, out, err = run_main(SCRIPT, ["--root", str(root), *flags], tmp_path)
    assert code == 2, out + err
    assert err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1, err
    assert not root.exists() and out == ""


def test_bad_input_in_a_real_process_and_a_root_that_is_a_file(tmp_path):
    proc = generate(tmp_path / "minari", "--num-steps", "0", check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --num-steps must be positive, got 0"
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    proc = generate(blocker, check=False)
    assert proc.returncode == 2 and "is a file" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = generate(blocker / "sub", check=False)
    assert proc.returncode == 2 and "cannot create the Minari root" in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["a_file"]


def test_without_minari_the_generator_names_the_extra_in_one_line(tmp_path, monkeypatch):
    real = importlib.util.find_spec  # minari is installed here: find_spec answers "not found" for it alone

    def find_spec(name, *args, **kwargs):
        return None if name == "minari" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    # --num-steps 0: a script that went past the missing module would refuse that instead (or, worse, train)
    code, out, err = run_main(SCRIPT, ["--root", str(tmp_path / "minari"), "--num-steps", "0"], tmp_path)
    assert code == 2 and out == "", out + err
    assert err == (
        "error: scripts/generate_locomotion_dataset.py needs minari: pip install -r requirements/locomotion.txt\n"
    )
    assert os.listdir(tmp_path) == []
