"""runs.py: one-line refusals with exit code 2 (through the tyro wrapper too), the run folder, the resume command,
atomic saves, checkpoint checks, the non-finite search, and the signal design, with real signals sent to a child
process that waits in unbounded work after printing a marker (no timing races)."""

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import runs  # noqa: E402


def error_line(capsys, call, *args, **kwargs) -> str:
    """The one `error:` line (exit code 2) that call(*args) refuses with."""
    with pytest.raises(SystemExit) as e:
        call(*args, **kwargs)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_fail_and_check(capsys):
    assert (
        error_line(capsys, runs.fail, "--lr must be > 0; pass a positive --lr")
        == "error: --lr must be > 0; pass a positive --lr\n"
    )
    runs.check(True, "not printed")
    assert capsys.readouterr().err == ""
    assert "bad" in error_line(capsys, runs.check, False, "bad")


# ------------------------------------------------------------------------------------------------ the command line
@dataclass
class Args:
    lr: float = 3e-4
    """learning rate"""
    steps: int = 10
    """steps"""
    mode: Literal["hard", "soft"] = "hard"
    """mode"""
    K: int | None = None
    """top-K"""
    temperatures: tuple[float, ...] = (0.1,)
    """temperatures"""


def rules(a: Args):
    yield from runs.ranges(
        a, {"a finite number > 0": (lambda v: 0 < v < float("inf"), ("lr",)), ">= 1": (lambda v: v >= 1, ("steps",))}
    )
    yield a.K is None or a.steps >= a.K, f"--K must be in 1..steps = 1..{a.steps}, got {a.K}"


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--steps", "abc"],
            "error: --steps (INT): invalid literal for int() with base 10: 'abc'; see --help",
        ),  # a wrong type: the flag and its type, said once (tyro's title "Error parsing" is not repeated)
        (
            ["--mode", "cosine"],
            "invalid choice 'cosine' for argument '--mode'. Expected one of ('hard', 'soft')",
        ),  # an unknown choice
        (["--no-such-flag", "1"], "Unrecognized options: --no-such-flag"),
        (["--step", "3"], "Unrecognized options: --step, 3; did you mean --steps; see --help"),  # tyro's suggestion
        (["--steps"], "Missing value for argument '--steps'"),
        (["--K", "1.5"], "error: --K ("),  # an Optional[int] given a float: tyro's box wraps this one over rows
        (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),  # the rules: a NaN fails every comparison
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--K", "20"], "--K must be in 1..steps = 1..10, got 20"),
    ],
)
def test_parse_refuses_every_bad_command_line_in_one_line(capsys, argv, message):
    assert message in error_line(capsys, runs.parse, Args, rules, argv)


@dataclass
class VideoArgs:
    capture_video: bool = False
    """record videos"""
    track: bool = False
    """track with wandb"""


@pytest.mark.parametrize(
    "argv, missing, message",
    [
        (["--capture-video"], "moviepy", "error: --capture-video needs moviepy: pip install -r requirements/video.txt"),
        (["--track"], "wandb", "error: --track needs wandb: pip install wandb"),  # in no requirements file
    ],
)
def test_parse_refuses_a_flag_whose_optional_package_is_missing(capsys, monkeypatch, argv, missing, message):
    find_spec = runs.importlib.util.find_spec
    monkeypatch.setattr(runs.importlib.util, "find_spec", lambda m, *a: None if m == missing else find_spec(m, *a))
    assert error_line(capsys, runs.parse, VideoArgs, None, argv).strip() == message
    assert runs.parse(VideoArgs, None, []) == VideoArgs()  # off: the package is not needed


def test_parse_returns_the_args_and_help_still_works(capsys):
    a = runs.parse(Args, rules, ["--lr", "1e-3", "--mode", "soft", "--temperatures", "0.2", "0.5", "--K", "3"])
    assert (a.lr, a.mode, a.temperatures, a.K, a.steps) == (1e-3, "soft", (0.2, 0.5), 3, 10)
    with pytest.raises(SystemExit) as e:
        runs.parse(Args, rules, ["--help"])
    assert e.value.code == 0 and "--temperatures" in capsys.readouterr().out


def test_parse_in_a_real_process(tmp_path):
    script = tmp_path / "cli.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        from dataclasses import dataclass
        import runs

        @dataclass
        class Args:
            steps: int = 1
            \"\"\"steps\"\"\"

        print(runs.parse(Args).steps)
    """)
    )
    bad = subprocess.run([sys.executable, str(script), "--steps", "x"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stdout == "" and bad.stderr.startswith("error: --steps (INT): ")
    assert bad.stderr.count("\n") == 1, bad.stderr
    good = subprocess.run([sys.executable, str(script), "--steps", "7"], capture_output=True, text=True, timeout=60)
    assert good.returncode == 0 and good.stdout == "7\n" and good.stderr == ""


# ------------------------------------------------------------------------------------------------ the run folder
def test_plan_run_dir_creates_nothing_and_refuses_an_existing_run(tmp_path, capsys):
    runs_dir = str(tmp_path / "runs")
    assert runs.plan_run_dir(runs_dir, "a", "checkpoint.pt") == os.path.join(runs_dir, "a")
    assert os.listdir(tmp_path) == []  # checked, not created
    os.makedirs(os.path.join(runs_dir, "a"))
    with open(os.path.join(runs_dir, "a", "checkpoint.pt"), "w") as f:
        f.write("a run")
    err = error_line(capsys, runs.plan_run_dir, runs_dir, "a", "checkpoint.pt")
    assert "already holds a run" in err and f"--resume {os.path.join(runs_dir, 'a', 'checkpoint.pt')}" in err
    ckpt = os.path.join(runs_dir, "a", "checkpoint.pt")
    assert runs.plan_run_dir(runs_dir, "other", "checkpoint.pt", resume=ckpt) == os.path.dirname(ckpt)  # stays there
    (tmp_path / "afile").write_text("x")
    assert "is a file, not a folder" in error_line(capsys, runs.plan_run_dir, str(tmp_path / "afile"), "a", "c.pt")
    err = error_line(capsys, runs.plan_run_dir, str(tmp_path / "afile" / "sub"), "a", "c.pt")
    assert f"cannot create the run folder {tmp_path / 'afile' / 'sub' / 'a'}: {tmp_path / 'afile'} is a file" in err
    assert runs.run_name("Hopper-v5", "dbp_bc", 3).startswith("Hopper-v5__dbp_bc__3__")


def test_resume_command_replaces_resume_and_drops_the_run_folder_flags(monkeypatch):
    argv = ["dfp.py", "--env", "cube-single-play", "--resume", "old.pt", "--run-name=x", "--runs-dir", "r", "--K", "4"]
    monkeypatch.setattr(sys, "argv", argv)
    assert runs.resume_command("runs/a/checkpoint.pt").split() == [
        "python",
        "dfp.py",
        "--env",
        "cube-single-play",
        "--K",
        "4",
        "--resume",
        os.path.abspath("runs/a/checkpoint.pt"),
    ]


# ------------------------------------------------------------------------------------------------ checkpoints
def test_atomic_write_replaces_in_one_step_or_not_at_all(tmp_path):
    path = tmp_path / "state.pt"
    path.write_text("the last good state")
    with pytest.raises(RuntimeError), runs.atomic(str(path)) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and tmp.endswith(".pt") and os.path.basename(tmp).startswith(".")
        with open(tmp, "w") as f:
            f.write("half writ")
        raise RuntimeError("a crash mid-write")
    assert path.read_text() == "the last good state" and os.listdir(tmp_path) == ["state.pt"]
    runs.save({"step": 3, "w": torch.ones(2)}, str(path))
    assert torch.load(path, weights_only=False)["step"] == 3 and os.listdir(tmp_path) == ["state.pt"]


@pytest.fixture
def checkpoints(tmp_path):
    files = {
        "good": tmp_path / "good.pt",
        "other": tmp_path / "other.pt",
        "untagged": tmp_path / "untagged.pt",
        "list": tmp_path / "list.pt",
        "damaged": tmp_path / "damaged.pt",
        "text": tmp_path / "text.pt",
        "truncated": tmp_path / "truncated.pt",
    }
    torch.save({"format": "dfp-v1", "step": 5, "actor": {"w": torch.zeros(500)}}, files["good"])
    torch.save({"format": "dbp-v1", "step": 5}, files["other"])
    torch.save({"step": 5}, files["untagged"])
    torch.save([1, 2], files["list"])
    torch.save({"format": "dfp-v1", "step": 5}, files["damaged"])
    files["text"].write_text("not a checkpoint")
    files["truncated"].write_bytes(files["good"].read_bytes()[:300])
    return {k: str(v) for k, v in files.items()}


@pytest.mark.parametrize(
    "name, message",
    [
        ("missing", "--resume {path} does not exist; pass a checkpoint.pt"),
        ("folder", "is a folder, not a file"),
        ("text", "cannot read --resume"),
        ("truncated", "it is not a complete checkpoint; pass a checkpoint.pt"),
        ("other", "is of another kind (format 'dbp-v1', expected 'dfp-v1')"),
        ("untagged", "(format None, expected 'dfp-v1')"),
        ("list", "(format None, expected 'dfp-v1')"),
        ("damaged", "lacks actor: it is damaged or from another version"),
    ],
)
def test_load_checkpoint_refuses_wrong_or_damaged_files(checkpoints, tmp_path, capsys, name, message):
    path = checkpoints.get(name) or str(tmp_path if name == "folder" else tmp_path / "missing.pt")
    err = error_line(
        capsys, runs.load_checkpoint, path, "--resume", "dfp-v1", ("step", "actor"), "pass a checkpoint.pt"
    )
    assert message.format(path=path) in err
    assert runs.load_checkpoint(checkpoints["good"], "--resume", "dfp-v1", ("step", "actor"), "")["step"] == 5


def test_nonfinite_names_the_first_bad_entry():
    tree = {
        "actor": {"w": torch.ones(3), "steps": torch.tensor([1, 2])},
        "rng": [np.zeros(2), 1.5, "x"],
        "last": float("nan"),
    }
    assert runs.nonfinite(tree) is None  # ints, strings and plain floats are skipped
    tree["rng"][0][1] = np.inf
    assert runs.nonfinite(tree) == "rng.0"
    tree["actor"]["w"][2] = float("nan")
    assert runs.nonfinite(tree) == "actor.w"
    assert runs.nonfinite(torch.tensor([float("inf")])) == "the value"


# ------------------------------------------------------------------------------------------------ signals
CHILD = textwrap.dedent(f"""
    import sys
    sys.path.insert(0, {ROOT!r})
    import runs

    mode, path = sys.argv[1], sys.argv[2]
    stop = runs.Stop()
    if mode == "unarmed":  # nothing worth saving yet
        print("ready", flush=True)
        while True:
            pass
    stop.armed = True
    steps = 1  # a first step, done before the test is told to signal: whatever the load, the state has one
    print("armed", flush=True)
    while not stop.requested():  # unbounded work, polled every step
        steps += 1
    if mode == "ignore":  # a loop that does not stop: a second signal must end it
        print("flag seen", flush=True)
        while True:
            pass
    runs.save({{"steps": steps, "signum": stop.signum}}, path)
    print("saved", flush=True)
    runs.leave(stop.exit_code)
""")


def child(mode, path):
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, mode, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for(p, marker):
    line = p.stdout.readline()
    assert line == marker + "\n", (line, p.stderr.read() if p.poll() is not None else "")


def test_a_signal_before_arming_exits_at_once(tmp_path):
    p = child("unarmed", tmp_path / "state.pt")
    wait_for(p, "ready")
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM and "SIGTERM: exiting at once" in err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_once_armed_a_signal_sets_the_flag_the_run_saves_and_exits_128_plus_signum(tmp_path, sig):
    p = child("armed", tmp_path / "state.pt")
    wait_for(p, "armed")
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 128 + sig, err
    assert out == "saved\n" and f"{signal.Signals(sig).name}: stopping after this step" in err
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    assert state["signum"] == sig and state["steps"] >= 1 and os.listdir(tmp_path) == ["state.pt"]


def test_a_second_signal_exits_at_once(tmp_path):
    p = child("ignore", tmp_path / "state.pt")
    wait_for(p, "armed")
    p.send_signal(signal.SIGINT)
    wait_for(p, "flag seen")
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGINT and "SIGINT: exiting at once" in err and os.listdir(tmp_path) == []


def report_handlers(queue):
    runs.worker_signals()
    queue.put((signal.getsignal(signal.SIGINT) == signal.SIG_IGN, signal.getsignal(signal.SIGTERM) == signal.SIG_DFL))


def test_evaluation_workers_ignore_sigint_and_the_main_process_keeps_its_handlers():
    before = signal.getsignal(signal.SIGINT)
    runs.worker_signals()  # the main process: nothing changes
    assert signal.getsignal(signal.SIGINT) is before
    ctx = multiprocessing.get_context("fork")  # as AsyncVectorEnv starts its workers
    queue = ctx.Queue()
    worker = ctx.Process(target=report_handlers, args=(queue,))
    worker.start()
    assert queue.get(timeout=60) == (True, True)
    worker.join(timeout=60)


def test_leave_closes_what_it_is_given_and_exits_with_the_code(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        import runs

        class Env:
            def __init__(self, name, fails):
                self.name, self.fails = name, fails
            def close(self):
                print("closed", self.name)
                if self.fails:
                    raise EOFError("its workers are gone")

        print("unflushed output", end="")
        runs.leave(3, Env("a", True), Env("b", False))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and r.stdout == "unflushed outputclosed a\nclosed b\n" and r.stderr == ""


# ------------------------------------------------------------------------------------------------ the start of a run
def test_seed_repeats_every_rng_and_picks_the_device():
    import random

    draws = []
    for _ in range(2):
        device = runs.seed(7, deterministic=True, cuda=False)
        draws.append((random.random(), float(np.random.rand()), float(torch.rand(()))))
    assert device == torch.device("cpu") and draws[0] == draws[1] and torch.backends.cudnn.deterministic


def test_tensorboard_log_starts_a_run_or_continues_it_without_repeating_steps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    @dataclass
    class A:
        lr: float = 0.1

    run_dir = tmp_path / "runs" / "r"
    w = runs.tensorboard(str(run_dir), A(), "r")  # the folder is made here
    for step in range(1, 6):
        w.add_scalar("x", step, step)
    w.close()
    w = runs.tensorboard(str(run_dir), A(), "r", start=4)  # resumed from a checkpoint of step 3
    for step in range(4, 8):
        w.add_scalar("x", 10 * step, step)
    w.close()
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("x")] == [(1, 1), (2, 2), (3, 3), (4, 40), (5, 50), (6, 60), (7, 70)]
    assert acc.Tags()["tensors"] == ["hyperparameters/text_summary"]  # the table once, from the fresh start


def test_rng_state_restores_every_stream():
    import random

    gen = torch.Generator().manual_seed(3)
    runs.seed(1, cuda=False)
    state = runs.rng_state(sampler=gen)

    def draw():  # one number from each stream
        return random.random(), float(np.random.rand()), float(torch.rand(())), float(torch.rand((), generator=gen))

    first = draw()
    runs.set_rng_state(state, sampler=gen)
    assert draw() == first and set(state) == {"python", "numpy", "torch", "cuda", "sampler", "devices"}


def test_a_sampler_state_of_another_device_type_is_refused_before_any_state_is_set(capsys):
    """A torch.Generator's state fits only its device type: a CPU checkpoint resumed on CUDA (or the reverse) is
    refused in one line. Simulated on the CPU: a recorded device type that differs, and a state of another size
    (a CUDA generator's is 16 bytes) in a checkpoint that did not record it."""
    gen = torch.Generator().manual_seed(3)
    state = runs.rng_state(sampler=gen)
    assert state["devices"] == {"sampler": "cpu"}
    runs.check_rng_devices(state, sampler=gen)  # fits: nothing happens
    runs.check_rng_devices({}, sampler=gen)  # a fresh run: nothing to check
    err = error_line(capsys, runs.check_rng_devices, {**state, "devices": {"sampler": "cuda"}}, sampler=gen)
    assert "sampler was made on cuda, this run is on cpu; resume on the same device type" in err
    torch_state = torch.get_rng_state()
    wrong = {k: v for k, v in state.items() if k != "devices"} | {
        "sampler": torch.zeros(16, dtype=torch.uint8),
        "torch": torch.zeros_like(state["torch"]),
    }
    err = error_line(capsys, runs.set_rng_state, wrong, sampler=gen)
    assert "made on another device type, this run is on cpu; resume on the same device type" in err
    assert torch.equal(torch.get_rng_state(), torch_state)  # refused before any state was set


def test_set_optimizer_applies_the_flags_over_the_checkpoint():
    """lr and capturable come from this run; the step counters move where capturable needs them (CPU when off)."""
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    sd = opt.state_dict()
    sd["param_groups"][0]["capturable"] = True  # a --cudagraphs run's checkpoint
    opt2 = torch.optim.Adam(net.parameters(), lr=1e-3)
    opt2.load_state_dict(sd)
    runs.set_optimizer(opt2, 5e-4, capturable=False)
    assert opt2.param_groups[0]["lr"] == 5e-4 and opt2.param_groups[0]["capturable"] is False
    net(torch.ones(1, 3)).sum().backward()
    opt2.step()  # eager Adam on the CPU: fails with capturable=True
    assert all(s["step"].device.type == "cpu" and s["step"] == 2 for s in opt2.state.values())


def test_load_states_refuses_a_checkpoint_of_other_networks(capsys):
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters())
    ckpt = {"net": torch.nn.Linear(3, 2).state_dict(), "optimizer": opt.state_dict()}
    runs.load_states({"net": net, "optimizer": opt}, ckpt, "")
    assert torch.equal(net.weight, ckpt["net"]["weight"])
    err = error_line(capsys, runs.load_states, {"net": torch.nn.Linear(4, 2)}, ckpt, "use the --hidden-dim it had")
    assert "checkpoint does not match these networks (RuntimeError" in err and err.endswith(
        "use the --hidden-dim it had\n"
    )
    err = error_line(capsys, runs.load_states, {"critic": net}, ckpt, "")
    assert "(KeyError: 'critic')" in err


def test_stop_nonfinite_exits_1_naming_the_quantity_and_the_kept_checkpoint(tmp_path, capsys):
    runs.stop_nonfinite(None, 5, str(tmp_path / "checkpoint.pt"))  # nothing non-finite: nothing happens
    (tmp_path / "checkpoint.pt").write_text("the last good one")
    with pytest.raises(SystemExit) as e:
        runs.stop_nonfinite("losses/critic", 7, str(tmp_path / "checkpoint.pt"))
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith(
        "error: losses/critic became non-finite by step 7; stopping (the last "
        f"good checkpoint is {tmp_path / 'checkpoint.pt'}). Try a lower --lr"
    )


def test_interrupted_prints_the_resume_command_and_leaves_with_the_code(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        import runs

        sys.argv = ["train.py", "--seed", "3"]
        runs.interrupted(12, {str(tmp_path / "checkpoint.pt")!r}, 143)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    path = tmp_path / "checkpoint.pt"
    assert r.returncode == 143 and r.stdout == (
        f"interrupted at step 12; checkpoint saved to {path}; continue with:\n"
        f"  python train.py --seed 3 --resume {path}\n"
    ), r.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_update_replays_the_eager_steps():
    """A graphed in-place step (w <- w - lr * grad of a loss) per keyword set: the same numbers as eager calls."""

    def make():
        w = torch.ones(4, device="cuda", requires_grad=True)
        opt = torch.optim.SGD([w], lr=0.1)

        def update(batch, scale):
            opt.zero_grad(set_to_none=False)
            loss = (w * batch["x"] * scale).pow(2).sum()
            loss.backward()
            opt.step()
            return loss.detach()

        return w, update

    (w1, eager), (w2, step) = make(), make()
    graphed = runs.CudaGraphUpdate(step, warmup=1)
    batches = [{"x": torch.full((4,), float(i), device="cuda")} for i in range(1, 5)]
    for b in batches:
        for scale in (1.0, 0.5):
            torch.testing.assert_close(graphed(b, scale=scale), eager(b, scale=scale))
    torch.testing.assert_close(w1, w2)
    assert len(graphed.graphs) == 2
