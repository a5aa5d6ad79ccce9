"""Tests of scripts/grid.py: the README's first grid as a user types it (a subprocess, a fresh HOME, no Ray
running), a grid of tiny DFP runs on a local Ray instance (finishes, is skipped when rerun, a failed run does not
stop the others, Ctrl-C stops the grid and a rerun resumes the interrupted runs from their checkpoints), the report
(CSV, table, figure), the dry run's totals, and bad input refused before any work. Ray's session folders go to
conftest.py's session folder (RAY_TMPDIR), not /tmp/ray."""

import _thread
import csv
import glob
import json
import os
import shlex
import signal
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import grid  # noqa: E402

ray = pytest.importorskip("ray")
TINY = [
    "--set",
    "hidden_dim=32",
    "--set",
    "num_layers=2",
    "--set",
    "batch_size=16",
    "--set",
    "num_hypotheses=4",
    "--set",
    "N=8",
    "--set",
    "K=2",
    "--set",
    "q_best_of=4",
    "--set",
    "act_best_of=4",
    "--set",
    "eval_episodes=1",
    "--set",
    "online_steps=0",
    "--set",
    "log_interval=10",
]


def write_dataset(path, episodes=6, length=60, seed=0):
    """A minimal official-format cube-single play file (random states; rewards come from qpos via ogbench)."""
    rng = np.random.default_rng(seed)
    n = episodes * length
    terminals = np.zeros(n, np.float32)
    terminals[length - 1 :: length] = 1.0
    qpos = rng.normal(0, 0.05, (n, 21)).astype(np.float32)
    qpos[:, 14:17] += [0.45, 0.0, 0.02]
    data = dict(
        observations=rng.normal(size=(n, 28)).astype(np.float32),
        actions=rng.uniform(-1, 1, (n, 5)).astype(np.float32),
        terminals=terminals,
        qpos=qpos,
        qvel=rng.normal(size=(n, 20)).astype(np.float32),
    )
    np.savez(path, **data)
    np.savez(path.replace(".npz", "-val.npz"), **data)


@pytest.fixture(scope="module")
def local_ray():
    os.environ.setdefault("MUJOCO_GL", "egl")
    # Ray's workers inherit SIGINT's disposition, and ray.cancel interrupts a running task with SIGINT: it must
    # not be ignored (pytest-xdist workers ignore it).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    # Its session folder in conftest's RAY_TMPDIR, its token conftest's RAY_AUTH_TOKEN: nothing in ~/.ray, /tmp/ray
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=100 * 2**20,
        _temp_dir=os.path.join(os.environ["RAY_TMPDIR"], "ray"),
    )
    yield
    ray.shutdown()
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("data") / "cube-single-play-v0.npz")
    write_dataset(path)
    return path


def readme_grid_commands():
    """The commands of the README's "Run grids" block, as word lists (continuation lines joined, comments dropped)."""
    with open(os.path.join(ROOT, "README.md")) as f:
        section = f.read().split("\n## Run grids\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    return [words for line in block.splitlines() if (words := shlex.split(line, comments=True))]


def user_env(home):
    """A new user's environment: this one without Ray's settings (conftest's token, an address), with `home` as
    HOME. RAY_TMPDIR stays: the session folder goes to conftest's folder instead of the user's /tmp/ray."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") or k == "RAY_TMPDIR"}
    return dict(env, HOME=str(home), MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"))


def run_as_typed(words, cwd, env):
    """A README command as typed from the repository root (`python scripts/grid.py ...`), here from `cwd`."""
    assert words[:2] == ["python", "scripts/grid.py"], words
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "grid.py"), *words[2:]]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_readme_first_grid_runs_as_typed_in_a_fresh_home(tmp_path):
    """The README's first grid and its report, run as a user types them, from a fresh HOME with no Ray running:
    Ray starts without a warning and leaves no token in HOME; the run finishes; the report goes into the grid's
    folder. Its dataset is a tiny one, put where the script looks (~/.ogbench/data)."""
    commands = [w for w in readme_grid_commands() if "runs/first-grid" in w]
    assert [w[2] for w in commands] == ["run", "report"], commands
    home = tmp_path / "home"
    (home / ".ogbench" / "data").mkdir(parents=True)
    write_dataset(str(home / ".ogbench" / "data" / "cube-single-play-v0.npz"))
    env = user_env(home)
    run, report = (run_as_typed(words, tmp_path, env) for words in commands)
    assert run.returncode == 0, run.stdout + run.stderr
    printed = run.stdout + run.stderr
    for bad in ("WARNING", "Warning", "Traceback", "Token authentication"):
        assert bad not in printed, printed
    assert os.listdir(home) == [".ogbench"]  # no ~/.ray/auth_token
    grid_dir = tmp_path / "runs" / "first-grid"
    (run_dir,) = (p for p in grid_dir.iterdir() if p.is_dir())
    assert json.loads((run_dir / grid.DONE_FILE).read_text())["status"] == "done"
    assert report.returncode == 0, report.stdout + report.stderr
    assert sorted(p.name for p in grid_dir.iterdir() if p.is_file()) == [
        "results.csv",
        "results.json",
        "results.md",
        "results.png",
    ]
    assert "| dfp | cube-single-play-task2 | 1 | 50 |" in (grid_dir / "results.md").read_text()


def test_a_ray_that_cannot_start_is_one_error_line(tmp_path):
    """Ray's unix sockets cannot live under a path this long: the grid says so in one line, and what to do."""
    long_dir = tmp_path / ("x" * 100)
    long_dir.mkdir()
    env = dict(user_env(tmp_path), RAY_TMPDIR=str(long_dir))
    words = ["python", "scripts/grid.py", "run", "--script", "dfp", "--envs", "cube-single-play", "--out", "g"]
    r = run_as_typed(words, tmp_path, env)
    assert r.returncode == 2 and r.stdout == "", r.stdout + r.stderr
    assert r.stderr.startswith("error: Ray could not start") and r.stderr.count("\n") == 1, r.stderr
    assert "ray start --head" in r.stderr and not (tmp_path / "g").exists()


def test_a_grid_without_ray_installed_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # = not installed, for importlib.util.find_spec
    with pytest.raises(SystemExit) as e:
        grid.main(["run", "--script", "dfp", "--envs", "cube-single-play", "--out", str(tmp_path / "g")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == "error: scripts/grid.py run needs ray: pip install -r requirements/grid.txt\n"
    assert not (tmp_path / "g").exists()


def grid_args(out, dataset, *extra):
    return [
        "run",
        "--script",
        "dfp",
        "--out",
        str(out),
        "--set",
        f"dataset_path={dataset}",
        *TINY,
        "--progress-interval",
        "5",
        *extra,
    ]


def scalars(run_dir, tag):
    return grid.read_scalars(run_dir).get(tag, {})


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", head[16:24])


def test_grid_finishes_skips_when_rerun_and_reports(local_ray, dataset, tmp_path, capsys):
    out = tmp_path / "grid"
    args = grid_args(
        out,
        dataset,
        "--envs",
        "cube-single-play-task1",
        "cube-single-play-task2",
        "--seeds",
        "1",
        "2",
        "--set",
        "offline_steps=20",
    )
    assert grid.main(args) == 0
    runs = sorted(os.listdir(out))
    assert runs == [
        "dfp__cube-single-play-task1__s1",
        "dfp__cube-single-play-task1__s2",
        "dfp__cube-single-play-task2__s1",
        "dfp__cube-single-play-task2__s2",
    ]
    for r in runs:
        d = out / r
        done = json.loads((d / grid.DONE_FILE).read_text())
        assert done["rc"] == 0 and done["status"] == "done"
        assert torch.load(d / "checkpoint.pt", weights_only=False)["step"] == 20
        assert sorted(scalars(str(d), "eval/success")) == [1, 20]
        assert "final cube-single-play-singletask-task" in (d / grid.LOG_FILE).read_text()
    logs = {r: (out / r / grid.LOG_FILE).read_text() for r in runs}

    capsys.readouterr()
    assert grid.main(args) == 0  # rerun: everything is finished, nothing runs again
    assert "4 runs in" in capsys.readouterr().out and logs == {r: (out / r / grid.LOG_FILE).read_text() for r in runs}

    assert grid.main(["report", str(out)]) == 0
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["env"], r["seed"]) for r in rows} == {
        (e, s) for e in ("cube-single-play-task1", "cube-single-play-task2") for s in ("1", "2")
    }
    assert {r["tag"] for r in rows} == {"eval/success", "eval/episodic_return"}
    assert len(rows) == 4 * 2 * 2  # 4 runs x 2 tags x 2 evaluations (steps 1 and 20)
    table = (out / "results.md").read_text()
    for env in ("cube-single-play-task1", "cube-single-play-task2"):
        assert f"| dfp | {env} | 2 | 20 |" in table
    meta = json.loads((out / "results.json").read_text())
    assert meta["panels"] == ["cube-single-play-task1", "cube-single-play-task2"] and meta["runs"] == 4
    assert png_size(out / "results.png") == tuple(meta["size_px"]) == (800, 300)


def test_a_failed_run_is_reported_and_the_others_finish(local_ray, dataset, tmp_path, capsys):
    missing = str(tmp_path / "nowhere" / "cube-single-play-v0.npz")
    out = tmp_path / "grid"
    args = [
        "run",
        "--script",
        "dfp",
        "--out",
        str(out),
        "--envs",
        "cube-single-play-task1",
        *TINY,
        "--set",
        "offline_steps=10",
        "--sweep",
        f"dataset_path={dataset},{missing}",
    ]
    assert grid.main(args) == 1
    printed = capsys.readouterr().out
    assert "FAILED" in printed and "does not exist" in printed  # the script's own error, from the log tail
    finished = glob.glob(str(out / "*" / grid.DONE_FILE))
    assert len(finished) == 1 and len(os.listdir(out)) == 2


def run_pid(out, run_id):
    """The pid of the training script the grid in `out` started for run `run_id` (not a forked child of it)."""
    pids = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
            with open(f"/proc/{p}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:  # the process ended meanwhile
            continue
        if all(
            flag in argv and argv[argv.index(flag) + 1] == value
            for flag, value in (("--runs-dir", str(out)), ("--run-name", run_id))
        ):
            pids[int(p)] = ppid
    top = [p for p, ppid in pids.items() if ppid not in pids]
    return top[0] if len(top) == 1 else None


def signal_pending(pid, signum) -> bool:
    """Whether `signum` waits, undelivered, for the (stopped) process `pid`; True if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            mask = next(int(line.split()[1], 16) for line in f if line.startswith("ShdPnd:"))
    except OSError:
        return True
    return bool(mask >> (signum - 1) & 1)


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds and pauses the grid's runs through /proc")
def test_ctrl_c_stops_the_grid_and_a_rerun_resumes_from_the_checkpoints(local_ray, dataset, tmp_path, capsys):
    """No race with the machine's load: each run is paused (SIGSTOP) as soon as its first checkpoint exists, so no
    run can finish while the other one starts late; Ctrl-C comes once both are paused, and they continue only once
    the grid's SIGTERM waits for them, so each stops at the step where it was paused."""
    out = tmp_path / "grid"
    args = grid_args(
        out,
        dataset,
        "--envs",
        "cube-single-play-task1",
        "--seeds",
        "1",
        "2",
        "--set",
        "offline_steps=400",
        "--set",
        "save_interval=10",
        "--set",
        "eval_interval=100000",
    )
    ids = [f"dfp__cube-single-play-task1__s{s}" for s in (1, 2)]
    ckpts = [out / run_id / "checkpoint.pt" for run_id in ids]
    paused = {}

    def pause_both_then_interrupt():
        t0 = time.time()
        while len(paused) < 2 and time.time() - t0 < 300:
            for run_id, c in zip(ids, ckpts, strict=True):
                if run_id not in paused and c.exists() and (pid := run_pid(out, run_id)) is not None:
                    os.kill(pid, signal.SIGSTOP)
                    paused[run_id] = pid
            time.sleep(0.01)
        _thread.interrupt_main()  # = Ctrl-C in the grid's terminal
        t0 = time.time()
        while not all(signal_pending(p, signal.SIGTERM) for p in paused.values()) and time.time() - t0 < 120:
            time.sleep(0.01)
        for pid in paused.values():
            os.kill(pid, signal.SIGCONT)

    threading.Thread(target=pause_both_then_interrupt, daemon=True).start()
    assert grid.main(args) == 130
    assert "stopping: cancelling" in capsys.readouterr().out
    stops = [torch.load(c, weights_only=False)["step"] for c in ckpts]
    assert all(10 <= s < 400 for s in stops), stops  # saved on SIGTERM, before the end
    assert not glob.glob(str(out / "*" / grid.DONE_FILE))

    assert grid.main(args) == 0
    assert "2 to resume" in capsys.readouterr().out
    for c, stop in zip(ckpts, stops, strict=True):
        assert torch.load(c, weights_only=False)["step"] == 400
        log = (c.parent / grid.LOG_FILE).read_text()
        assert "--resume" in log and f"at step {stop}" in log and "final cube-single-play" in log
        assert sorted(scalars(str(c.parent), "eval/success")) == [1, 400]


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--preset", "dfp-tabel"], "unknown preset 'dfp-tabel'"),
        (["--script", "dfp", "--envs", "cube-seven-play"], "unknown env 'cube-seven-play'"),
        (["--script", "dfp", "--envs", "cube-single-play", "--set", "hiden_dim=8"], "unknown flag --hiden-dim"),
        (["--script", "dfp", "--envs", "cube-single-play", "--set", "online_mode=medium"], "choose from hard, soft"),
        (["--script", "dfp", "--envs", "cube-single-play", "--set", "seed=3"], "the grid sets this itself"),
        (
            ["--script", "dfp", "--envs", "cube-single-play", "--set", "discount=0.9"],
            "dfp_offline_to_online.py is now --gamma",
        ),
        (["--script", "dbp", "--envs", "Hopper-v5", "--set", "depth=2"], "dbp_bc.py is now --num-layers"),
        (["--script", "dfp", "--envs"], "expected at least one argument"),  # a grid with no runs
        (["--script", "dfp", "--envs", "cube-single-play", "cube-single-play"], "would share a folder"),
        (["--script", "nope.py", "--envs", "cube-single-play"], "unknown script 'nope.py'"),
        (
            ["--script", "dfp", "--envs", "cube-single-play", "--address", "127.0.0.1:1", "--connect-timeout", "3"],
            "cannot reach a Ray cluster at 127.0.0.1:1",
        ),
    ],
)
def test_bad_input_is_refused_before_any_work(args, msg, tmp_path, capsys):
    out = tmp_path / "grid"
    with pytest.raises(SystemExit) as e:
        grid.main(["run", *args, "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and msg in err and err.count("\n") == 1, err
    assert not out.exists()


def test_report_refuses_a_folder_without_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        grid.main(["report", str(tmp_path)])
    assert e.value.code == 2 and "no tensorboard logs" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        grid.main(["report", str(tmp_path), "--last", "0"])
    assert e.value.code == 2 and "--last 0: give the number of evaluations" in capsys.readouterr().err


def test_flags_are_parsed_from_the_scripts_help():
    flags = grid.script_flags("dfp_offline_to_online.py")
    assert flags["--K"] == "INT" and flags["--save-model"] == flags["--no-save-model"] == "BOOL"
    assert flags["--online-mode"] == "{hard,soft}" and flags["--temperatures"].startswith("[FLOAT")
    assert grid.flag_args("dfp_offline_to_online.py", "save_model", "false") == ["--no-save-model"]
    assert grid.flag_args("dfp_offline_to_online.py", "temperatures", "0.1 0.2") == ["--temperatures", "0.1", "0.2"]
    assert "--sweep" in grid.script_flags("scripts/grid.py run")
    for script in grid.ALIASES.values():  # the one --env the grid passes, and no spelling of a renamed flag
        flags = grid.script_flags(script)
        assert "--env" in flags and not {f"--{old.replace('_', '-')}" for old in grid.RENAMED} & set(flags), script


def test_report_puts_the_papers_numbers_beside_ours(tmp_path):
    """Fake DFP K-of-N runs (tensorboard logs written here): the table has mean +- standard error over seeds, the
    paper's per-task number and the K-of-N average beside the paper's."""
    from torch.utils.tensorboard import SummaryWriter

    finals = {("dfp-K4", 1): 1.0, ("dfp-K4", 2): 0.5, ("dfp-K1", 1): 0.25}
    for (variant, seed), final in finals.items():
        run_id = f"{variant}__cube-double-play-task2__s{seed}"
        d = tmp_path / run_id
        d.mkdir()
        grid.write_json(
            str(d / grid.RUN_FILE),
            dict(
                id=run_id,
                script="dfp_offline_to_online.py",
                variant=variant,
                env="cube-double-play-task2",
                seed=seed,
                args=[],
                flags={"K": variant[-1], "N": "16"},
            ),
        )
        w = SummaryWriter(str(d))
        for step, v in ((1, 0.0), (100, final)):
            w.add_scalar("eval/success", v, step)
        w.close()
    assert grid.main(["report", str(tmp_path), "--out", str(tmp_path / "out"), "--name", "kofn"]) == 0
    table = (tmp_path / "out" / "kofn.md").read_text()
    assert "| dfp-K4 | cube-double-play-task2 | 2 | 100 | 75.0 ± 25.0 | 100.0 |" in table  # s.e. = std / sqrt(2)
    assert "| dfp-K1 | cube-double-play-task2 | 1 | 100 | 25.0 | 100.0 |" in table
    assert "| 4 | 1 | 75.0 | 95.6 |" in table and "| 1 | 1 | 25.0 | 85.8 |" in table
    assert json.loads((tmp_path / "out" / "kofn.json").read_text())["lines"] == {
        "cube-double-play-task2": ["dfp-K1", "dfp-K4"]
    }


def test_report_of_runs_without_a_paper_number_has_no_paper_column(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    d = tmp_path / "dbp-drift__cube-single-play-task1__s1"
    d.mkdir()
    grid.write_json(
        str(d / grid.RUN_FILE),
        dict(
            id=d.name, script="dbp_bc.py", variant="dbp-drift", env="cube-single-play-task1", seed=1, args=[], flags={}
        ),
    )
    w = SummaryWriter(str(d))
    w.add_scalar("eval/success", 0.5, 10)
    w.close()
    assert grid.main(["report", str(tmp_path)]) == 0
    table = (tmp_path / "results.md").read_text().splitlines()
    assert table[0] == "| variant | env | seeds | final step | success % (mean ± s.e.) |"
    assert table[2] == "| dbp-drift | cube-single-play-task1 | 1 | 10 | 50.0 |"


def test_report_pairs_two_variants_by_seed(tmp_path):
    """Two variants of one env: the final successes are paired by seed, d = A - B, mean(d) +- std(d) / sqrt(n); a
    third seed that only one variant ran is left out of the pair."""
    from torch.utils.tensorboard import SummaryWriter

    finals = {"dfp-online": {1: 0.5, 2: 0.6, 3: 0.7, 4: 0.9}, "dfp-control": {1: 0.4, 2: 0.4, 3: 0.5}}
    for variant, by_seed in finals.items():
        for seed, success in by_seed.items():
            d = tmp_path / f"{variant}__cube-single-play-task2__s{seed}"
            d.mkdir()
            spec = dict(id=d.name, script="dfp_offline_to_online.py", variant=variant, seed=seed, args=[], flags={})
            grid.write_json(str(d / grid.RUN_FILE), dict(spec, env="cube-single-play-task2"))
            w = SummaryWriter(str(d))
            w.add_scalar("eval/success", 0.0, 1)
            w.add_scalar("eval/success", success, 100 + seed)  # the final evaluation: the last step of each run
            w.close()
    assert grid.main(["report", str(tmp_path)]) == 0
    table = (tmp_path / "results.md").read_text().splitlines()
    # d = 10, 20, 20 points: mean 16.7, std 5.77, s.e. 3.33, ratio 5.0
    assert "| cube-single-play-task2 | dfp-online - dfp-control | final | 3 | +16.7 ± 3.3 | +5.0 |" in table
    assert not any("mean of last" in line for line in table)
    # two variants of no preset: paired in name order (sorting a list by its own index would empty it first)
    controls = [tmp_path / f"dfp-control__cube-single-play-task2__s{seed}" / grid.RUN_FILE for seed in (1, 2, 3)]
    specs = [json.loads(f.read_text()) for f in controls]
    for f, spec in zip(controls, specs, strict=True):
        grid.write_json(str(f), dict(spec, variant="dfp-online-K1"))
    assert grid.main(["report", str(tmp_path), "--out", str(tmp_path / "k")]) == 0
    table = (tmp_path / "k" / "results.md").read_text().splitlines()
    assert "| cube-single-play-task2 | dfp-online - dfp-online-K1 | final | 3 | +16.7 ± 3.3 | +5.0 |" in table
    for f, spec in zip(controls, specs, strict=True):
        grid.write_json(str(f), spec)
    # --last 2: each run's mean of its two evaluations (0 and the final): d = 5, 10, 10, mean 8.3, s.e. 1.7
    assert grid.main(["report", str(tmp_path), "--last", "2"]) == 0
    table = (tmp_path / "results.md").read_text().splitlines()
    assert "| cube-single-play-task2 | dfp-online - dfp-control | mean of last 2 | 3 | +8.3 ± 1.7 | +5.0 |" in table


def test_report_averages_extra_tags_after_a_step(tmp_path, capsys):
    """--tags: each run's mean of the tag over the steps after --after, then mean +- s.e. over seeds, and the tag's
    values in the CSV; a tag that no run logged gets nan, and --after without --tags is refused."""
    from torch.utils.tensorboard import SummaryWriter

    for seed, (before, late) in {1: (9.0, (1.0, 3.0)), 2: (9.0, (3.0, 5.0))}.items():
        d = tmp_path / f"dfp-online__cube-single-play-task2__s{seed}"
        d.mkdir()
        spec = dict(id=d.name, script="dfp_offline_to_online.py", variant="dfp-online", seed=seed, args=[], flags={})
        grid.write_json(str(d / grid.RUN_FILE), dict(spec, env="cube-single-play-task2"))
        w = SummaryWriter(str(d))
        w.add_scalar("eval/success", 0.5, 30)
        for step, v in zip((10, 20, 30), (before, *late), strict=True):
            w.add_scalar("losses/critic", v, step)
        w.close()
    assert grid.main(["report", str(tmp_path), "--tags", "losses/critic", "stats/none", "--after", "10"]) == 0
    table = (tmp_path / "results.md").read_text().splitlines()
    # run means over steps 20, 30: 2 and 4 -> mean 3, s.e. 1
    assert "| dfp-online | cube-single-play-task2 | losses/critic | 2 | 3 ± 1 |" in table
    assert "| dfp-online | cube-single-play-task2 | stats/none | 0 | nan |" in table
    assert (tmp_path / "results.csv").read_text().count("losses/critic") == 6
    with pytest.raises(SystemExit) as e:
        grid.main(["report", str(tmp_path), "--after", "10"])
    assert e.value.code == 2 and "--after" in capsys.readouterr().err


def test_presets_expand_to_the_papers_grids(tmp_path, capsys, monkeypatch):
    """--dry-run lists every run with its command and writes nothing."""
    monkeypatch.setenv("HOME", str(tmp_path))  # no datasets here: each run is marked (tested below)
    out = tmp_path / "grid"
    assert grid.main(["run", "--preset", "dfp-kofn", "--out", str(out), "--dry-run"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith(("  ", "[grid]"))]
    assert len(lines) == 4 * 12 * 5 and not out.exists()  # K in 1,2,4,8 x 12 tasks x 5 seeds
    assert all(line.startswith("new") for line in lines)
    k4 = [line for line in lines if "dfp-K4__cube-triple-play-task3__s5:" in line]
    assert len(k4) == 1 and "--env cube-triple-play-task3 --seed 5 --K 4 --N 16" in k4[0]
    assert f"--runs-dir {out} --run-name dfp-K4__cube-triple-play-task3__s5" in k4[0]
    assert grid.main(["run", "--preset", "dfp-table", "--envs", "lift-mh", "--seeds", "1", "2", "--dry-run"]) == 0
    assert [line.split(":")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("new")] == [
        "new    dfp__lift-mh__s1",
        "new    dfp__lift-mh__s2",
    ]


def test_dry_run_ends_with_the_number_of_runs_and_their_cost(tmp_path, capsys, monkeypatch):
    """The count, the steps from the scripts' defaults and --set values, and a time only where the measured speed
    applies: 240 DFP runs x (1M offline updates x 0.472 s + 1M online steps x 0.775 s) = 2.99e8 s = 9.5 years of CPU
    time, half of it on 2 CPUs; none for another network, none for DBP (no measurement)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert grid.main(["run", "--preset", "dfp-kofn", "--out", str(tmp_path / "g"), "--dry-run"]) == 0
    tail = capsys.readouterr().out.splitlines()[-3:]
    assert (
        tail[0] == f"[grid] 240 runs in {tmp_path / 'g'}: 0 finished, 0 to resume, 240 new; nothing was run (--dry-run)"
    )
    assert (
        tail[1] == "[grid] dfp_offline_to_online.py: 240 runs, 480,000,000 steps in all (offline_steps + online_steps)"
    )
    assert tail[2].startswith("[grid]   estimated time: 9.5 years of CPU time at 1 thread per run, about 4.7 years")
    assert "bench/results/dfp_cpu.json" in tail[2]

    base = ["run", "--script", "dfp", "--envs", "cube-single-play", "--out", str(tmp_path / "g"), "--dry-run"]
    assert grid.main([*base, "--set", "offline-steps=1000", "--set", "online_steps=0"]) == 0
    assert "1,000 steps in all" in capsys.readouterr().out  # 1000 x 0.472 s = 8 min
    assert grid.main([*base, "--set", "offline-steps=1000", "--set", "online_steps=0", "--seeds", "1", "2", "3"]) == 0
    assert "estimated time: 24 min of CPU time at 1 thread per run, about 16 min on this machine at 2" in (
        capsys.readouterr().out  # 3 runs of 8 min, 2 at a time: two rounds
    )
    assert grid.main([*base, "--set", "hidden-dim=64"]) == 0
    assert "no time estimate" in capsys.readouterr().out
    assert grid.main(["run", "--preset", "dbp-vs-mse", "--out", str(tmp_path / "g"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dbp_bc.py: 10 runs, 300,000 steps in all (total_steps)" in out and "no time estimate" in out


def test_set_takes_the_flag_as_spelled_in_help_or_with_underscores(tmp_path, capsys):
    """--set hidden-dim=64 and --set hidden_dim=64 name the same flag, and both override the preset's value."""
    for spelling in ("hidden-dim=64", "hidden_dim=64"):
        args = ["run", "--preset", "dbp-vs-mse", "--seeds", "1", "--set", spelling, "--out", str(tmp_path), "--dry-run"]
        assert grid.main(args) == 0
        commands = [line for line in capsys.readouterr().out.splitlines() if line.startswith("new")]
        assert len(commands) == 2 and all(c.count("--hidden-dim") == 1 and "--hidden-dim 64 " in c for c in commands)


def test_dry_run_marks_runs_whose_dataset_is_missing(tmp_path, capsys, monkeypatch):
    """Each run whose dataset is not there gets a mark, and the commands that make the datasets close the list;
    once the files exist, no mark."""
    monkeypatch.setenv("HOME", str(tmp_path))
    args = [
        "run",
        "--preset",
        "dfp-table",
        "--envs",
        "lift-mh",
        "square-mh",
        "cube-double-play-task2",
        "cube-double-play-task3",
        "--seeds",
        "1",
        "--out",
        str(tmp_path / "grid"),
        "--dry-run",
    ]
    assert grid.main(args) == 0
    out = capsys.readouterr().out
    assert out.count("dataset missing:") == 4 and "[grid] 3 dataset(s) missing" in out
    assert "python scripts/generate_robomimic_dataset.py --task lift --kind mh" in out
    square = str(
        tmp_path / ".robomimic" / "square" / "mh" / "low_dim_v15.hdf5"
    )  # no generator for square: the download
    assert f"curl -L --create-dirs -o {square} https://huggingface.co/" in out and "--task square" not in out
    assert "python scripts/generate_ogbench_dataset.py --env cube-double-play\n" in out
    os.makedirs(tmp_path / ".ogbench" / "data")
    write_dataset(str(tmp_path / ".ogbench" / "data" / "cube-double-play-v0.npz"))
    assert grid.main(args) == 0
    out = capsys.readouterr().out
    assert out.count("dataset missing:") == 2 and "lift" in out.split("dataset missing:")[1].splitlines()[0]


def test_a_preset_with_its_own_data_names_the_command_that_makes_it(tmp_path, capsys, monkeypatch):
    """dfp-online-vs-control reads a 100-episode play dataset: the missing-data line gives its --episodes 100 command
    (the standard dataset's command would make 1000 episodes at that path)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    assert grid.main(["run", "--preset", "dfp-online-vs-control", "--out", str(tmp_path / "g"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("dataset missing:") == 10 and "[grid] 1 dataset(s) missing" in out
    assert "  python scripts/generate_ogbench_dataset.py --env cube-single-play --episodes 100 --out-dir " in out


def test_dbpo_hopper_pairs_the_anchor_against_none_from_one_pretrained_checkpoint(tmp_path, capsys, monkeypatch):
    """dbpo-hopper: 2 seeds x anchor 1 / 0, short run names, and until the DBP checkpoint exists a mark per run with
    the commands that make its data and the checkpoint."""
    monkeypatch.chdir(tmp_path)  # the preset's checkpoint path is relative: runs/hopper_medium_dbp_bc_mlp/dbp_bc.pt
    assert grid.main(["run", "--preset", "dbpo-hopper", "--out", str(tmp_path / "g"), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    runs = [line.split(":")[0].split()[-1] for line in lines if line.startswith("new")]
    assert runs == [f"dbpo-{v}__hopper-medium__s{s}" for v in ("anchor", "no-anchor") for s in (1, 2)]
    assert sum("--anchor-coef 0 " in line for line in lines) == 2
    assert sum("dataset missing: runs/hopper_medium_dbp_bc_mlp/dbp_bc.pt" in line for line in lines) == 4
    assert any(line.startswith("  python scripts/generate_locomotion_dataset.py") for line in lines)
    (tmp_path / "runs" / "hopper_medium_dbp_bc_mlp").mkdir(parents=True)
    (tmp_path / "runs" / "hopper_medium_dbp_bc_mlp" / "dbp_bc.pt").write_bytes(b"")
    assert grid.main(["run", "--preset", "dbpo-hopper", "--out", str(tmp_path / "g"), "--dry-run"]) == 0
    assert "dataset missing" not in capsys.readouterr().out
