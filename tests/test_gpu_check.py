"""bench/gpu.sh --cpu: the GPU machine's one command, run here with the smallest sizes. Every stage must have run
(status ok, its expected output seen) or have been skipped for a stated reason (no CUDA); the printed markdown table
and gpu_cpu.json must agree; the benchmarks' JSONs must hold their rows and the machine; committed results stay as
they are. Then the stage runner itself: a failing, a silent and a hanging stage are reported (the hanging one's whole
process group ended), the stages after them go on or are skipped with the reason, and bad flags are refused."""

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import gpu_check  # noqa: E402

STAGES = [
    "dfp_eager",
    "dfp_resume",
    "dfp_cudagraphs",
    "dfp_cudagraphs_resume",
    "dbp_unet",
    "dbp_unet_eval_only",
    "dbp_unet_resume",
    "dbpo",
    "dbpo_resume",
    "dbp_mlp",
    "dbp_mlp_eval_only",
    "pytest",
    "bench_dbp",
    "bench_dbpo",
    "bench_image",
    "bench_dfp",
]
CUDA_ONLY = {"dfp_cudagraphs", "dfp_cudagraphs_resume"}
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable)


def digest(folder):
    return {
        f: hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest() for f in sorted(os.listdir(folder))
    }


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    committed = digest(os.path.join(ROOT, "bench", "results"))
    p = subprocess.run(
        ["bash", os.path.join(ROOT, "bench", "gpu.sh"), "--cpu", "--out", str(out)],
        cwd=out,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert digest(os.path.join(ROOT, "bench", "results")) == committed  # --cpu never writes bench/results
    with open(out / "gpu_cpu.json") as f:
        return out, p.stdout, json.load(f)


def test_every_stage_ran_or_was_skipped_for_a_stated_reason(cpu_run):
    out, stdout, summary = cpu_run
    recs = {r["name"]: r for r in summary["stages"]}
    assert [r["name"] for r in summary["stages"]] == STAGES
    for name, r in recs.items():
        if name in CUDA_ONLY and not torch.cuda.is_available():
            assert (r["status"], r["reason"]) == ("skipped", "no CUDA"), r
        else:
            assert r["status"] == "ok", (name, r["reason"], r["log_tail"])
            assert r["seconds"] > 0 and r["command"].startswith("python ")
    assert recs["pytest"]["rows"][0][1].startswith("1 passed")  # the refusal of --cudagraphs without CUDA
    assert "final cube-single-play-singletask-task1-v0 step 25" in recs["dfp_resume"]["rows"][0][1]  # 20 + 5 steps
    assert recs["dbpo_resume"]["rows"][0][1].startswith("final: 4 iterations")
    assert summary["device"] == "cpu" and summary["command"].startswith("bench/gpu.sh --cpu")
    assert summary["machine"]["torch"] == torch.__version__ and summary["machine"]["ogbench"] != "missing"
    log = (out / "gpu_cpu.log").read_text()
    assert all(f"===== {name}: " in log for name in STAGES)


def test_the_printed_table_is_the_json_one(cpu_run):
    _, stdout, summary = cpu_run
    assert summary["table"] in stdout
    rows = [line.split("|")[1:-1] for line in summary["table"].splitlines()[2:]]
    stage_rows = {cells[0].strip(): cells[1].strip() for cells in rows if ":" not in cells[0]}
    for r in summary["stages"]:
        assert stage_rows[r["name"]] == r["status"] + (f" ({r['reason']})" if r["reason"] else "")
    labels = [cells[0].strip() for cells in rows]
    assert "bench_dfp: 1x16 offline eager" in labels and "bench_dfp: 1x16 act batch 1: diffusion, 100 NFE" in labels


def test_the_benchmarks_wrote_their_rows_and_the_machine(cpu_run):
    out, _, _ = cpu_run
    dfp, dbp, dbpo = (json.loads((out / f"{k}_cpu.json").read_text()) for k in ("dfp", "dbp", "dbpo"))
    assert [(t["phase"], t["mode"]) for t in dfp["training"]] == [("offline", "eager"), ("online", "eager")]
    assert all(t["ratio"] > 0 for t in dfp["training"]) and len(dfp["acting"]) == 4
    assert [r["backbone"] for r in dbp["rows"]] == ["mlp", "unet 8-16"]
    assert all(r["train_ms_per_step"] > 0 for r in dbp["rows"])
    assert [(r["backbone"], r["decisions"], r["epochs"]) for r in dbpo["rows"]] == [("mlp", 64, 2), ("unet", 64, 2)]
    image = json.loads((out / "image_cpu.json").read_text())
    assert [(r["kind"], r["phase"]) for r in image["rows"]] == [
        (kind, phase) for kind in ("resnet18", "spatial-softmax") for phase in ("act", "train")
    ]
    assert all(r["ms"] > 0 and r["peak_mib"] > 0 for r in image["rows"])
    for res in (dfp, dbp, dbpo, image):
        assert res["machine"]["python"] and res["machine"]["numpy"] != "missing" and "bench/bench_" in res["command"]


# ---- the stage runner, on stand-in stages (no torch in them: fast)
def alive(pid: int) -> bool:
    """pid runs (a zombie, ended but not yet reaped by its new parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def stage(name, code, timeout=30, **kw):
    return gpu_check.Stage(name, "g", ["-c", code], timeout, **kw)


def test_a_failing_silent_or_hanging_stage_is_reported_and_the_rest_goes_on(tmp_path):
    pid_file = tmp_path / "child.pid"
    hang = (
        "import subprocess, sys, time\n"  # a stage whose own child would outlive it: the group is ended
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\nprint('started', flush=True)\ntime.sleep(60)"
    )
    todo = [
        stage("fails", "print('partial'); raise SystemExit(3)"),
        stage("after", "print('done')", needs=("fails",)),
        stage("silent", "print('nothing to see')", expect=r"^final: "),
        stage("hangs", hang, timeout=3),
        stage("ok", "print('final: fine')", expect=r"^final: ", result=gpu_check.last_line(r"^final")),
        stage("nocuda", "print(1)", skip="no CUDA"),
    ]
    done, t0 = {}, time.time()
    recs = {
        s.name: gpu_check.run_stage(s, sys.executable, time.time() + 120, done, str(tmp_path), os.environ.copy())
        for s in todo
    }
    assert time.time() - t0 < 30  # the hanging stage stopped at its timeout, not after its 60 s
    assert (recs["fails"]["status"], recs["fails"]["reason"]) == ("failed", "exit code 3")
    assert "partial" in recs["fails"]["log_tail"]
    assert (recs["after"]["status"], recs["after"]["reason"]) == ("skipped", "needs fails")
    assert recs["silent"]["status"] == "failed" and "output lacks" in recs["silent"]["reason"]
    assert (recs["hangs"]["status"], recs["hangs"]["reason"]) == ("timeout", "stopped after 3 s")
    time.sleep(0.5)
    assert not alive(int(pid_file.read_text()))  # the stage's child went with it
    assert recs["ok"]["status"] == "ok" and recs["ok"]["rows"] == [("", "final: fine")]
    assert (recs["nocuda"]["status"], recs["nocuda"]["reason"]) == ("skipped", "no CUDA")
    table = gpu_check.table(list(recs.values())).splitlines()
    assert table[0] == "| stage | status | s | result |" and len(table) == 2 + len(todo)
    assert table[2].startswith("| fails | failed (exit code 3) |") and table[6].endswith("| final: fine |")


def test_a_spent_budget_skips_the_stages_left(tmp_path):
    rec = gpu_check.run_stage(stage("late", "print(1)"), sys.executable, time.time() + 5, {}, str(tmp_path), {})
    assert (rec["status"], rec["reason"]) == ("skipped", "the --budget is spent")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--device", "cpu", "--budget", "0"], "error: --budget must be > 0"),
        (["--device", "cpu", "--jobs", "0"], "error: --jobs must be >= 1"),
        (["--device", "cpu", "--only", "nope"], "error: --only: unknown stages ['nope']"),
        pytest.param(
            ["--device", "cuda"],
            "error: no CUDA device here; for the CPU check run bench/gpu.sh --cpu",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here"),
        ),
    ],
)
def test_bad_flags_are_refused_in_one_line_before_any_work(flags, message, tmp_path):
    p = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), *flags, "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    assert p.returncode == 2 and p.stderr.startswith(message) and len(p.stderr.splitlines()) == 1, p.stderr
    assert not (tmp_path / "o").exists()
