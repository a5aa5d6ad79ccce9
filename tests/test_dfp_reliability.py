"""Reliability of dfp_offline_to_online.py (docs/dfp.md, Guarantees): bad input is refused before any work, SIGTERM
in training and in evaluation saves a checkpoint that resumes, the non-finite guard keeps the last good checkpoint,
evaluation is reproducible (--eval-only, any --eval-envs), tensorboard steps never repeat across a resume."""

import glob
import itertools
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

os.environ.setdefault("MUJOCO_GL", "egl")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from inprocess import run_main  # noqa: E402
from test_dfp import ENV, SCRIPT, SUBENV, dfp, write_dataset  # noqa: E402

import envs  # noqa: E402  (on the path through test_dfp)

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
    "--log-interval",
    "5",
    "--num-threads",
    "1",
]
ENV_ID = "cube-single-play-singletask-task1-v0"


def popen(args, cwd):
    return subprocess.Popen(
        [sys.executable, SCRIPT, *args], cwd=cwd, env=SUBENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def run(args, cwd):
    return subprocess.run(
        [sys.executable, SCRIPT, *args], cwd=cwd, env=SUBENV, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The tiny cube-single play file of test_dfp.py (8 episodes of 60 steps)."""
    path = str(tmp_path_factory.mktemp("data") / "cube-single-play-v0.npz")
    write_dataset(path, episodes=8, length=60, seed=0)
    return path


def tree(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, ds, fs in os.walk(folder) for f in ds + fs)


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    """A finished tiny run (10 offline + 10 online steps, evaluations on 2 envs): (its args, its run folder)."""
    cwd = tmp_path_factory.mktemp("trained")
    args = [
        *ENV,
        *TINY,
        "--dataset-path",
        dataset,
        "--offline-steps",
        "10",
        "--online-steps",
        "10",
        "--start-training",
        "5",
        "--eval-episodes",
        "2",
        "--eval-envs",
        "2",
        "--eval-interval",
        "1000",
    ]
    r = run(args, cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    (run_dir,) = glob.glob(str(cwd / "runs" / "*"))
    return args, run_dir, r.stdout


# ------------------------------------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def bad(trained, tmp_path_factory):
    """Broken datasets and checkpoints, outside the working folder of the runs."""
    d = tmp_path_factory.mktemp("bad")
    files = {"ckpt": os.path.join(trained[1], "checkpoint.pt")}
    for name in ("trunc", "text", "nan", "obs", "noact", "folder"):
        os.makedirs(d / name)
        files[name] = str(d / name / "cube-single-play-v0.npz")
    write_dataset(files["trunc"], 2, 30, 0)
    with open(files["trunc"], "rb") as f:
        head = f.read()
    with open(files["trunc"], "wb") as f:
        f.write(head[: len(head) // 2])
    for p in (files["text"], files["text"].replace(".npz", "-val.npz")):
        with open(p, "w") as f:
            f.write("not a dataset\n")
    write_dataset(files["nan"], 2, 30, 0)
    data = dict(np.load(files["nan"]))
    data["observations"][7, 3] = np.nan
    np.savez(files["nan"], **data)
    write_dataset(files["obs"], 2, 30, 0, obs_dim=10)
    write_dataset(files["noact"], 2, 30, 0, drop="actions")
    os.makedirs(files["folder"])
    ckpt = torch.load(files["ckpt"], weights_only=False)
    variants = {
        "untagged": {k: v for k, v in ckpt.items() if k != "format"},
        "dbp": {**ckpt, "format": "dbp-v1"},
        "obsdim": {**ckpt, "obs_dim": 99},
    }  # an older or another script's checkpoint; another env's sizes
    for name, c in variants.items():
        files[name] = str(d / f"{name}.pt")
        torch.save(c, files[name])
    files["trunc_ckpt"] = str(d / "trunc.pt")
    with open(files["ckpt"], "rb") as f, open(files["trunc_ckpt"], "wb") as g:
        g.write(f.read()[:5000])
    files["dir"] = str(d / "shards_none")
    os.makedirs(files["dir"])
    return files


DATA = [*ENV, "--dataset-path"]
BAD_INPUT = [  # (id, argv with {placeholders} from the `bad` fixture, what the error line says)
    ("type", ["--eval-interval", "abc"], "--eval-interval (INT): invalid literal"),
    ("unknown-flag", ["--no-such-flag", "1"], "Unrecognized options"),
    ("bool-value", ["--exact-gelu", "yes"], "Unrecognized options: yes"),  # a switch takes no value
    ("literal", ["--drift-field", "cosine"], "--drift-field"),
    ("lr-nan", ["--lr", "nan"], "--lr must be a finite number > 0"),
    ("lr-negative", ["--lr", "-1"], "--lr must be a finite number > 0"),
    ("gamma", ["--gamma", "1.5"], "--gamma must be in (0, 1]"),
    ("tau", ["--tau", "0"], "--tau must be in (0, 1]"),
    ("ema-tau", ["--ema-tau", "-0.1"], "--ema-tau must be in [0, 1]"),
    ("interval", ["--eval-interval", "0"], "--eval-interval must be >= 1"),
    ("episodes", ["--eval-episodes", "0"], "--eval-episodes must be >= 1"),
    ("eval-envs", ["--eval-envs", "0"], "--eval-envs must be >= 1"),
    ("buffer", ["--buffer-size", "0"], "--buffer-size must be >= 1"),
    ("K>N", ["--K", "20", "--N", "16"], "--K must be in 1..N"),
    ("action-horizon", ["--action-horizon", "0"], "--action-horizon must be >= 1"),
    ("temperatures", ["--temperatures", "0.1", "-1"], "--temperatures must be finite numbers > 0"),
    ("threads", ["--num-threads", "-1"], "--num-threads must be >= 0"),
    ("no-steps", ["--offline-steps", "0", "--online-steps", "0"], "--offline-steps + --online-steps must be >= 1"),
    ("env", ["--env", "cube-seven-play"], "valid: cube-single-play"),
    ("task", ["--env", "cube-single-play", "--task", "7"], "--task must be in 1..5"),
    ("eval-only-alone", ["--eval-only"], "--eval-only needs --checkpoint"),
    ("checkpoint-alone", ["--checkpoint", "{ckpt}"], "--checkpoint is for --eval-only"),
    ("run-name", ["--run-name", "a/b"], "--run-name must be a plain folder name"),
    ("data-missing", [*DATA, "nowhere/cube-single-play-v0.npz"], "does not exist"),
    ("data-truncated", [*DATA, "{trunc}"], "could not read dataset"),
    ("data-text", [*DATA, "{text}"], "could not read dataset"),
    ("data-folder", [*DATA, "{folder}"], "is a folder, not a dataset file"),
    ("data-nan", [*DATA, "{nan}"], "the dataset contains non-finite values in 'observations'"),
    ("data-shape", [*DATA, "{obs}"], "'observations' must have shape [N, 28]"),
    ("data-key", [*DATA, "{noact}"], "could not read dataset"),
    ("data-both", [*DATA, "{trunc}", "--dataset-dir", "{dir}"], "give --dataset-path or --dataset-dir, not both"),
    ("shards-none", [*ENV, "--dataset-dir", "{dir}"], "holds no *.npz shards"),
    ("ckpt-missing", ["--eval-only", "--checkpoint", "nowhere.pt"], "--checkpoint nowhere.pt does not exist"),
    ("ckpt-truncated", ["--eval-only", "--checkpoint", "{trunc_ckpt}"], "it is not a complete checkpoint"),
    ("ckpt-untagged", ["--eval-only", "--checkpoint", "{untagged}"], "format None, expected 'dfp-v1'"),
    ("ckpt-dbp", ["--resume", "{dbp}"], "format 'dbp-v1', expected 'dfp-v1'"),
    ("ckpt-env", [*ENV[:2], "--task", "2", "--resume", "{ckpt}"], "checkpoint was made for " + ENV_ID),
    ("ckpt-sizes", ["--eval-only", "--checkpoint", "{obsdim}", "--eval-episodes", "1"], "observation/action sizes"),
    (
        "ckpt-networks",
        [*DATA, "{nan_free}", *TINY, "--hidden-dim", "64", "--resume", "{ckpt}"],
        "checkpoint does not match these networks",
    ),
    ("runs-dir-file", ["--runs-dir", "taken"], "--runs-dir taken is a file"),
    ("run-exists", [*DATA, "{nan_free}", "--run-name", "old"], "already holds a run"),
]


@pytest.mark.parametrize("argv,expected", [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_refused_before_any_work(argv, expected, bad, dataset, tmp_path):
    """In-process (the script run as __main__) for speed: exit code 2, one `error:` line, nothing written."""
    if "--runs-dir" in argv:
        (tmp_path / "taken").write_text("a file where the runs folder should go")
    if "old" in argv:
        os.makedirs(tmp_path / "runs" / "old")
        (tmp_path / "runs" / "old" / "checkpoint.pt").write_text("an earlier run")
    before = tree(tmp_path)
    argv = [a.format(nan_free=dataset, **bad) for a in argv]
    start = time.time()
    code, _, err = run_main(SCRIPT, argv, tmp_path)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err
    assert tree(tmp_path) == before  # no run folder, no checkpoint, no event file
    assert time.time() - start < 30


@pytest.mark.parametrize("argv", [["--lr", "nan"], [*DATA, "{trunc}"]], ids=["lr-nan", "data-truncated"])
def test_bad_input_in_a_real_process(argv, bad, tmp_path):
    r = run([a.format(**bad) for a in argv], tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert len([line for line in r.stderr.splitlines() if line.startswith("error:")]) == 1, r.stderr
    assert "Traceback" not in r.stderr and os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------ signals
def stop_at(p, pattern, delay=0.0):
    """SIGTERM `p` once a stdout line matches `pattern`; (stdout, stderr, seconds from the signal to the exit)."""
    out = []
    for line in p.stdout:
        out.append(line)
        if re.match(pattern, line):
            time.sleep(delay)
            break
    t = time.time()
    p.send_signal(signal.SIGTERM)
    rest, err = p.communicate(timeout=60)
    return "".join(out) + rest, err, time.time() - t


def resume_line(out):
    lines = out.splitlines()
    return shlex.split(lines[lines.index(next(line for line in lines if "continue with:" in line)) + 1])


def tensorboard_steps(run_dir):
    """{tag: [steps in the order written]} over the run's event files in the order they were made."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = {}
    for f in sorted(glob.glob(os.path.join(run_dir, "events.out.tfevents.*")), key=os.path.getmtime):
        acc = EventAccumulator(f, purge_orphaned_data=False)
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            steps.setdefault(tag, []).extend(e.step for e in acc.Scalars(tag))
    return steps


def eval_numbers(line):
    return re.search(r"success (\S+) return (\S+) length (\S+) q (\S+)", line).groups()


def test_sigterm_in_training_resume_tensorboard_and_eval_only(dataset, tmp_path):
    args = [
        *ENV,
        *TINY,
        "--dataset-path",
        dataset,
        "--offline-steps",
        "30",
        "--online-steps",
        "10",
        "--start-training",
        "5",
        "--eval-episodes",
        "2",
        "--eval-envs",
        "2",
        "--eval-interval",
        "1000",
        "--save-interval",
        "1000",
    ]
    out, err, took = stop_at(popen(args, tmp_path), r"step 10/40")
    assert took < 5 and "Traceback" not in err, err[-2000:]
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)
    assert ckpt["format"] == "dfp-v1" and 10 <= ckpt["step"] < 40  # most likely in the offline steps 11..29
    assert f"interrupted at step {ckpt['step']}; checkpoint saved" in out
    cmd = resume_line(out)
    assert cmd[-2:] == ["--resume", os.path.join(run_dir, "checkpoint.pt")]

    r = run(cmd[2:], tmp_path)  # the printed command, without its "python dfp_offline_to_online.py"
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines()[-1].startswith(f"final {ENV_ID} step 40: success")
    assert torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)["step"] == 40
    steps = tensorboard_steps(run_dir)
    for tag, s in steps.items():
        assert all(a < b for a, b in itertools.pairwise(s)), (tag, s)  # strictly increasing: no step written twice
    assert steps["charts/SPS"] == list(range(5, 41, 5)) and steps["eval/success"] == [1, 30, 40]

    # --eval-only of the final checkpoint, on 1 env, reproduces the in-training evaluation at step 40 (2 envs)
    (train_line,) = [line for line in r.stdout.splitlines() if line.startswith("eval step 40:")]
    e = run(
        [
            "--eval-only",
            "--checkpoint",
            os.path.join(run_dir, "checkpoint.pt"),
            "--eval-episodes",
            "2",
            "--eval-envs",
            "1",
            "--num-threads",
            "1",
        ],
        tmp_path,
    )
    assert e.returncode == 0, e.stderr[-3000:]
    (only_line,) = [line for line in e.stdout.splitlines() if line.startswith(f"eval-only {ENV_ID} step 40:")]
    assert eval_numbers(only_line) == eval_numbers(train_line)


def test_sigterm_during_evaluation_abandons_it_and_resume_redoes_it(dataset, tmp_path):
    args = [
        *ENV,
        *TINY,
        "--dataset-path",
        dataset,
        "--offline-steps",
        "10",
        "--online-steps",
        "0",
        "--eval-envs",
        "1",
        "--eval-interval",
        "1000",
    ]
    # an evaluation that cannot end before the signal, however fast the machine (the resume asks for 3 episodes)
    out, err, took = stop_at(popen([*args, "--eval-episodes", "1000000"], tmp_path), r"evaluating step 1:", delay=0.2)
    assert took < 5 and "Traceback" not in err, err[-2000:]
    assert "evaluation at step 1 interrupted: no result" in out and "eval step 1:" not in out
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)
    assert ckpt["step"] == 1 and ckpt["eval_pending"]
    assert "eval/success" not in tensorboard_steps(run_dir)  # an interrupted evaluation is no result

    r = run([*args, "--eval-episodes", "3", "--resume", os.path.join(run_dir, "checkpoint.pt")], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "eval step 1:" in r.stdout and f"final {ENV_ID} step 10: success" in r.stdout
    assert tensorboard_steps(run_dir)["eval/success"] == [1, 10]
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)
    assert ckpt["step"] == 10 and not ckpt["eval_pending"]


# ------------------------------------------------------------------------------------------------ non-finite guard
def test_nonfinite_guard_keeps_the_last_good_checkpoint(trained, tmp_path):
    """Continue the finished run with --lr 1e30: the weights blow up, the run stops naming the quantity, and the
    checkpoint of step 20 is left byte for byte."""
    args, run_dir, _ = trained
    copy = str(tmp_path / "runs" / os.path.basename(run_dir))
    shutil.copytree(run_dir, copy)
    path = os.path.join(copy, "checkpoint.pt")
    with open(path, "rb") as f:
        good = f.read()
    more = [a if a != "10" or args[i - 1] != "--online-steps" else "40" for i, a in enumerate(args)]
    r = run([*more, "--lr", "1e30", "--save-interval", "5", "--eval-interval", "1000", "--resume", path], tmp_path)
    assert r.returncode == 1, r.stderr[-2000:]
    assert re.search(r"error: \S+ became non-finite by step \d+; stopping \(the last good checkpoint is", r.stderr)
    assert "Traceback" not in r.stderr
    with open(path, "rb") as f:
        assert f.read() == good


# ------------------------------------------------------------------------------------------------ evaluation
class Recorder:
    """A vector env that records the chunks of each episode, named by its reset seed, until it ends."""

    def __init__(self, envs):
        self.envs, self.current, self.actions = envs, [None] * envs.num_envs, {}

    def __getattr__(self, name):
        return getattr(self.envs, name)

    def reset(self, seed, options):
        for j in np.flatnonzero(options["reset_mask"]):
            self.current[j], self.actions[seed[j]] = seed[j], []
        return self.envs.reset(seed=seed, options=options)

    def step(self, actions):
        out = self.envs.step(actions)
        for j, ep in enumerate(self.current):
            if ep is not None:
                self.actions[ep].append(actions[j].copy())
                if out[2][j] or out[3][j]:
                    self.current[j] = None
        return out


def test_evaluation_does_not_depend_on_the_number_of_envs_nor_the_global_rng(trained):
    ckpt = torch.load(os.path.join(trained[1], "checkpoint.pt"), weights_only=False)
    actor, critic = dfp.Actor(28, 25, 32, 2), dfp.Critic(28, 25, 32, 2, 2)
    actor.load_state_dict(ckpt["actor"])
    critic.load_state_dict(ckpt["critic"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    runs = []
    for m in (1, 2):  # DFP's best-of-4 acting (make_act) in the shared evaluation
        vec = Recorder(envs.make_eval_envs(ENV_ID, m, 5))
        torch.manual_seed(m)  # a different global RNG state: must not matter
        runs.append((envs.evaluate(vec, dfp.make_act(actor, critic, 4, "cpu"), 3, 1001), vec.actions))
        vec.close()
    torch.set_num_threads(threads)
    (res1, acts1), (res2, acts2) = runs
    np.testing.assert_equal(res1, res2)
    assert sorted(acts1) == sorted(acts2) == [1001, 1002, 1003]
    for ep in acts1:
        np.testing.assert_array_equal(np.stack(acts1[ep]), np.stack(acts2[ep]))
    assert not np.array_equal(np.stack(acts1[1001]), np.stack(acts1[1002]))  # episodes differ from each other
