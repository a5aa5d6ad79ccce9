"""The stages of bench/gpu.sh: every script's default path end to end on tiny data, the CUDA tests, the speed
benchmarks; each one a subprocess bounded by a timeout (and by what is left of --budget), a failed one reported in the
table, never fatal. Run it through bench/gpu.sh, which picks the Python and installs carried wheels.

    bench/gpu.sh --out DIR        # CUDA, default network sizes: DIR/{gpu,dfp,dbp,dbpo}_cuda.json, DIR/gpu_cuda.log
    bench/gpu.sh --cpu            # the same stages, smallest sizes, on the CPU: into a new temporary folder

Stages (a group's stages run in order; --jobs groups run side by side, the benchmarks alone after them):
  dfp    dfp_eager (offline, then online, evaluations), dfp_resume, dfp_cudagraphs, dfp_cudagraphs_resume (CUDA)
  dbp    dbp_unet (train + save), dbp_unet_eval_only, dbp_unet_resume, dbpo (2 updates from dbp_unet's checkpoint),
         dbpo_resume
  mlp    dbp_mlp (Hopper-v5, D4RL layout), dbp_mlp_eval_only
  tests  pytest -k "cuda or compile or cudagraph" (on the CPU without the torch.compile tests: minutes of C++ builds)
  bench  bench_dbp (U-Net 512-1024-2048 training step at batch 64, latency at batch 1), bench_dbpo (ppo_update on
         20,000 decisions), bench_image (image_encoder.py's two kinds in a DBP pixel policy, 2 cameras at 84x84:
         training step at batch 64, acting at batch 1, peak memory), bench_dfp (4x512 and 4x256, offline and
         online: eager, compile, cudagraphs, compile+cudagraphs against the matrix products alone; acting at batch 1:
         1 NFE, best-of-16, 10- and 100-step samplers), the longest last
Writes <out>/gpu_<device>.json (machine, command, every stage's status, seconds, result and log tail), the benchmarks'
<out>/{dfp,dbp,dbpo,image}_<device>.json, all logs in <out>/gpu_<device>.log, and prints one markdown table.
"""

import argparse
import concurrent.futures
import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import machine  # noqa: E402
import tiny_data  # noqa: E402

TEST_KEYWORDS = "cuda or compile or cudagraph"


@dataclass
class Stage:
    name: str
    group: str
    argv: list  # after the Python executable, run in the repository root
    timeout: float
    needs: tuple = ()  # stages that must have passed first
    expect: str = ""  # a regex its output must hold (e.g. the final line): exit code 0 alone is not enough
    skip: str = ""  # why it does not run here (e.g. "no CUDA"), if it does not
    note: str = ""
    result: Callable | None = None  # (stage, output) -> [(label, text)]: its table rows
    record: dict = field(default_factory=dict)


def last_line(pattern: str) -> Callable:
    """result(): the last output line that matches `pattern`, shortened."""

    def result(stage, output):
        lines = [ln for ln in output.splitlines() if re.search(pattern, ln)]
        return [("", shorten(lines[-1]))] if lines else []

    return result


def shorten(text: str, n: int = 110) -> str:
    text = re.sub(r"/\S*/", "", text.strip())  # folders say nothing in a table
    return text if len(text) <= n else text[: n - 3] + "..."


def pytest_result(stage, output):
    m = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|deselected|error).*?)(?: in [\d.]+s.*)?=*$", output, re.M)
    return [("", m[-1].strip())] if m else []


def json_rows(path: str, rows: Callable) -> Callable:
    """result(): rows(json) of a benchmark's JSON file (what it wrote before a timeout, too)."""

    def result(stage, output):
        if not os.path.isfile(path):
            return []
        with open(path) as f:
            return rows(json.load(f))

    return result


def dfp_rows(res):
    out = [
        (
            f"{t['net']} {t['phase']} {t['mode']}",
            f"error: {t['error']}"
            if "error" in t
            else f"{t['ms_per_update']:.2f} ms/update ({t['updates_per_s']:.0f}/s), GEMMs alone "
            f"{t['limit_ms']:.2f} ms, ratio {t['ratio']:.2f}"
            + (f", compiled in {t['warmup_s']:.0f} s" if "warmup_s" in t else ""),
        )
        for t in res["training"]
    ]
    out += [(f"{a['net']} act batch 1: {a['sampler']}", f"{a['ms_per_chunk']:.3f} ms/chunk") for a in res["acting"]]
    if isinstance(res.get("evaluation"), dict):
        out.append(("evaluation, 1 env vs many", ", ".join(f"{k} {v}" for k, v in res["evaluation"].items())))
    return out


def dbp_rows(res):
    return [
        (
            r["backbone"],
            f"train step {r['train_ms_per_step']:.2f} ms at batch {res['batch_size']}, act batch 1 "
            f"{r['act_ms_median']:.3f} ms (p90 {r['act_ms_p90']:.3f})",
        )
        for r in res["rows"]
    ]


def dbpo_rows(res):
    return [
        (r["checkpoint"], f"error: {r['error']}")
        if "error" in r
        else (
            f"{r['backbone']} ppo_update, {r['decisions']} decisions",
            f"{r['ms_per_update']:.1f} ms ({r['epochs']} "
            f"epochs), {r['decisions_per_s']:.0f} decisions/s, {r['env_steps_per_s']:.0f} env steps/s",
        )
        for r in res["rows"]
    ]


def image_rows(res):
    return [
        (
            f"{r['kind']} {r['phase']}",
            f"{r['ms']:.2f} ms"
            + (" (batch 1)" if r["phase"] == "act" else f" per step at batch {res['config']['batch_size']}")
            + f", peak {r['peak_mib']:.0f} MiB, encoder {r['encoder_params'] / 1e6:.1f}M params",
        )
        for r in res["rows"]
    ]


def test_files() -> list:
    """The test files that hold a test whose name matches TEST_KEYWORDS (only these are imported: the others need
    packages a GPU image may lack)."""
    pattern = re.compile(r"def test_\w*(" + TEST_KEYWORDS.replace(" or ", "|") + r")", re.I)
    folder = os.path.join(ROOT, "tests")
    names = sorted(f for f in os.listdir(folder) if f.startswith("test_") and f.endswith(".py"))
    return [os.path.join("tests", f) for f in names if pattern.search(pathlib.Path(folder, f).read_text())]


def stages(device: str, out: str, work: str, data: dict, cuda: bool) -> list:
    """The stages with their flags: default network sizes on CUDA, the smallest ones on the CPU."""
    big = device == "cuda"
    runs = os.path.join(work, "runs")
    envs_n = ["--eval-episodes", "8", "--eval-envs", "8"] if big else ["--eval-episodes", "1", "--eval-envs", "1"]
    no_cuda = "" if cuda else "no CUDA"
    dfp = [
        "dfp_offline_to_online.py",
        "--env",
        "cube-single-play",
        "--task",
        "1",
        "--dataset-path",
        data["cube"],
        "--runs-dir",
        runs,
        "--log-interval",
        "10",
        *envs_n,
        *(
            [
                "--offline-steps",
                "20",
                "--online-steps",
                "30",
                "--start-training",
                "10",
                "--eval-interval",
                "25",
                "--save-interval",
                "25",
            ]
            if big
            else [
                "--hidden-dim",
                "16",
                "--num-layers",
                "1",
                "--batch-size",
                "8",
                "--num-hypotheses",
                "4",
                "--N",
                "4",
                "--K",
                "2",
                "--q-best-of",
                "4",
                "--act-best-of",
                "4",
                "--offline-steps",
                "10",
                "--online-steps",
                "10",
                "--start-training",
                "5",
                "--eval-interval",
                "1000",
                "--save-interval",
                "10",
            ]
        ),
    ]
    total, more = (50, "40") if big else (20, "15")  # more online steps for the resume
    dfp_ckpt = os.path.join(runs, "dfp_eager", "checkpoint.pt")
    dbp = [
        "dbp_bc.py",
        "--runs-dir",
        runs,
        *envs_n,
        "--log-interval",
        "10",
        "--eval-interval",
        "10",
        "--save-interval",
        "10",
        *([] if big else ["--batch-size", "16", "--num-threads", "1"]),
    ]
    unet = [
        *dbp,
        "--env",
        "cube-single-play",
        "--task",
        "1",
        "--dataset-path",
        data["cube"],
        *([] if big else ["--unet-dims", "8", "16"]),
    ]
    mlp = [
        *dbp,
        "--env",
        "Hopper-v5",
        "--dataset-path",
        data["hopper"],
        "--backbone",
        "mlp",
        *([] if big else ["--hidden-dim", "16", "--num-layers", "1"]),
    ]
    unet_ckpt, mlp_ckpt = os.path.join(runs, "dbp_unet", "dbp_bc.pt"), os.path.join(runs, "dbp_mlp", "dbp_bc.pt")
    dbpo = [
        "dbpo_ppo.py",
        "--checkpoint",
        unet_ckpt,
        "--runs-dir",
        runs,
        "--critic-warmup-iters",
        "1",
        "--update-epochs",
        "2",
        "--eval-interval",
        "10",
        "--save-interval",
        "1",
        *envs_n,
        *(
            ["--num-envs", "8", "--num-steps", "8"]
            if big
            else ["--num-envs", "2", "--num-steps", "2", "--num-threads", "1"]
        ),
    ]
    state = os.path.join(runs, "dbpo", "state.pt")
    keywords = TEST_KEYWORDS if big else f"({TEST_KEYWORDS}) and not compile"
    bench_dfp = (
        ["--device", "cuda", "--hidden-dims", "512", "256", "--eval-episodes", "16", "--eval-envs", "16"]
        if big
        else [
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
            "--no-compile",
            "--eval-episodes",
            "0",
        ]
    )
    bench_dbp = (
        ["--device", "cuda"]
        if big
        else [
            "--hidden-dim",
            "16",
            "--num-layers",
            "1",
            "--unet-dims",
            "8",
            "16",
            "--extra-unet-dims",
            "--warmup",
            "1",
            "--iters",
            "3",
            "--train-iters",
            "2",
            "--batch-size",
            "4",
        ]
    )
    bench_dbpo = (
        ["--cuda", "--backbones", "mlp", "unet"]
        if big
        else [
            "--backbones",
            "mlp",
            "unet",
            "--unet-dims",
            "8",
            "16",
            "--hidden-dim",
            "16",
            "--num-layers",
            "1",
            "--decisions",
            "64",
            "--update-epochs",
            "2",
            "--repeats",
            "1",
        ]
    )
    bench_image = (
        ["--device", "cuda", "--warmup", "10", "--iters", "100", "--train-iters", "10", "--blocks", "3"]
        if big
        else [
            "--image-size",
            "32",
            "--batch-size",
            "2",
            "--phases",
            "act",
            "train",
            "--warmup",
            "1",
            "--iters",
            "2",
            "--train-iters",
            "1",
            "--blocks",
            "1",
        ]
    )
    t = 1.0 if big else 0.5  # timeouts (s), scaled
    final = r"^final\b"
    res = {k: os.path.join(out, f"{k}_{device}.json") for k in ("dfp", "dbp", "dbpo", "image")}
    return [
        Stage(
            "dfp_eager",
            "dfp",
            [*dfp, "--run-name", "dfp_eager"],
            120 * t,
            expect=rf"final .* step {total}: success",
            result=last_line(final),
        ),
        Stage(
            "dfp_resume",
            "dfp",
            [*dfp, "--online-steps", more, "--resume", dfp_ckpt],
            120 * t,
            ("dfp_eager",),
            expect=rf"resumed dfp_eager .* at step {total}",
            result=last_line(final),
        ),
        Stage(
            "dfp_cudagraphs",
            "dfp",
            [*dfp, "--cudagraphs", "--run-name", "dfp_cudagraphs"],
            120 * t,
            expect=rf"final .* step {total}: success",
            skip=no_cuda,
            result=last_line(final),
        ),
        Stage(
            "dfp_cudagraphs_resume",
            "dfp",
            [
                *dfp,
                "--cudagraphs",
                "--online-steps",
                more,
                "--resume",
                os.path.join(runs, "dfp_cudagraphs", "checkpoint.pt"),
            ],
            120 * t,
            ("dfp_cudagraphs",),
            expect=rf"resumed dfp_cudagraphs .* at step {total}",
            skip=no_cuda,
            result=last_line(final),
        ),
        Stage(
            "dbp_unet",
            "dbp",
            [*unet, "--total-steps", "20", "--run-name", "dbp_unet"],
            120 * t,
            expect=r"^final: 20 steps",
            result=last_line(final),
        ),
        Stage(
            "dbp_unet_eval_only",
            "dbp",
            ["dbp_bc.py", "--eval-only", "--checkpoint", unet_ckpt, *envs_n],
            90 * t,
            ("dbp_unet",),
            expect=r"^final eval-only over 1 checkpoint",
            result=last_line(r"^final eval-only"),
        ),
        Stage(
            "dbp_unet_resume",
            "dbp",
            [*unet, "--total-steps", "30", "--resume", unet_ckpt],
            120 * t,
            ("dbp_unet",),
            expect=r"resuming dbp_unet at step 20",
            result=last_line(final),
        ),
        Stage(
            "dbpo",
            "dbp",
            [*dbpo, "--num-iterations", "3", "--run-name", "dbpo"],
            150 * t,
            ("dbp_unet",),
            expect=r"^final: 3 iterations",
            result=last_line(final),
        ),
        Stage(
            "dbpo_resume",
            "dbp",
            [*dbpo, "--num-iterations", "4", "--resume", state],
            150 * t,
            ("dbpo",),
            expect=r"resumed dbpo at iteration 3",
            result=last_line(final),
        ),
        Stage(
            "dbp_mlp",
            "mlp",
            [*mlp, "--total-steps", "20", "--run-name", "dbp_mlp"],
            120 * t,
            expect=r"^final: 20 steps",
            result=last_line(final),
        ),
        Stage(
            "dbp_mlp_eval_only",
            "mlp",
            ["dbp_bc.py", "--eval-only", "--checkpoint", mlp_ckpt, *envs_n],
            90 * t,
            ("dbp_mlp",),
            expect=r"^final eval-only over 1 checkpoint",
            result=last_line(r"^final eval-only"),
        ),
        Stage(
            "pytest",
            "tests",
            ["-m", "pytest", "-q", "-p", "no:cacheprovider", *test_files(), "-k", keywords],
            300 * t,
            expect=r"\d+ passed",
            result=pytest_result,
            note="" if big else "torch.compile tests deselected on the CPU (minutes of C++ compilation)",
        ),
        Stage(
            "bench_dbp",
            "bench",
            ["bench/bench_dbp.py", *bench_dbp, "--out", res["dbp"]],
            120 * t,
            result=json_rows(res["dbp"], dbp_rows),
        ),
        Stage(
            "bench_dbpo",
            "bench",
            ["bench/bench_dbpo.py", "--update-only", *bench_dbpo, "--out", res["dbpo"]],
            120 * t,
            result=json_rows(res["dbpo"], dbpo_rows),
        ),
        Stage(
            "bench_image",
            "bench",
            ["bench/bench_image.py", *bench_image, "--out", res["image"]],
            240 * t,  # on the CPU a fresh process per row (4 torch imports)
            result=json_rows(res["image"], image_rows),
        ),
        Stage(
            "bench_dfp",
            "bench",
            ["bench/bench_dfp.py", *bench_dfp, "--label", f"bench/gpu.sh ({device})", "--out", res["dfp"]],
            300 * t,
            result=json_rows(res["dfp"], dfp_rows),
            note=""
            if big
            else "no compile rows on the CPU (minutes), no cudagraphs rows (CUDA), no evaluation row "
            "(a 4x512 policy's full episodes)",
        ),
    ]


def run_stage(s: Stage, python: str, deadline: float, done: dict, logs: str, env: dict) -> dict:
    """Run one stage (unless skipped), bounded by its timeout and the deadline: its record."""
    rec = {
        "name": s.name,
        "group": s.group,
        "command": shlex.join(["python", *s.argv]),
        "status": "skipped",
        "reason": s.skip,
        "seconds": 0.0,
        "note": s.note,
        "rows": [],
        "log_tail": "",
    }
    failed, left = [n for n in s.needs if done.get(n) != "ok"], deadline - time.time()
    timeout = min(s.timeout, left)
    if not s.skip and failed:
        rec["reason"] = f"needs {', '.join(failed)}"
    elif not s.skip and left < 10:
        rec["reason"] = "the --budget is spent"
    if rec["reason"]:
        done[s.name] = "skipped"
        return rec
    log = os.path.join(logs, f"{s.name}.log")
    t0 = time.time()
    with open(log, "w") as f:  # its own session: a timeout ends the stage's whole process group (env workers too)
        p = subprocess.Popen(
            [python, *s.argv], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
            for sig in (signal.SIGTERM, signal.SIGKILL):  # SIGTERM first: the scripts save and exit
                try:
                    os.killpg(p.pid, sig)
                    p.wait(timeout=10)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
    rec["seconds"] = round(time.time() - t0, 1)
    with open(log, errors="replace") as f:
        output = f.read()
    if rc is None:
        rec["status"], rec["reason"] = "timeout", f"stopped after {timeout:.0f} s"
    elif rc != 0:
        rec["status"], rec["reason"] = "failed", f"exit code {rc}"
    elif s.expect and not re.search(s.expect, output, re.M):
        rec["status"], rec["reason"] = "failed", f"output lacks /{s.expect}/"
    else:
        rec["status"] = "ok"
    rec["rows"] = s.result(s, output) if s.result else []
    rec["log_tail"] = "\n".join(output.splitlines()[-(5 if rec["status"] == "ok" else 40) :])
    done[s.name] = rec["status"]
    print(f"[{time.strftime('%H:%M:%S')}] {s.name}: {rec['status']} {rec['reason']} ({rec['seconds']} s)", flush=True)
    return rec


def table(records: list) -> str:
    """One markdown table: a row per stage, then its result rows (benchmarks: one per measurement)."""

    def cell(x) -> str:  # one markdown table cell: no column separator, no line break
        return str(x).replace("|", "/").replace("\n", " ")

    lines = ["| stage | status | s | result |", "|---|---|---:|---|"]
    for r in records:
        status = r["status"] + (f" ({r['reason']})" if r["reason"] else "")
        first = r["rows"][0][1] if len(r["rows"]) == 1 and not r["rows"][0][0] else r["note"]
        lines.append(f"| {r['name']} | {cell(status)} | {r['seconds']:.0f} | {cell(first)} |")
        for label, text in r["rows"] if not (len(r["rows"]) == 1 and not r["rows"][0][0]) else ():
            lines.append(f"| {r['name']}: {cell(label)} | | | {cell(text)} |")
    return "\n".join(lines)


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument(
        "--out",
        default=None,
        help="results folder (default: bench/results on CUDA, a new temporary "
        "folder on the CPU, so that committed results stay as they are)",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for all stages (default: 450 on CUDA, 600 on "
        "the CPU); a stage that would start past it is skipped",
    )
    p.add_argument(
        "--jobs", type=int, default=None, help="stage groups run side by side (default 4 on CUDA, 2 on the CPU)"
    )
    p.add_argument("--only", nargs="+", default=None, help="run only these stages (and report the rest skipped)")
    p.add_argument("--python", default=sys.executable, help="the Python the stages run with")
    return p.parse_args()


def main():
    a = parse()
    for ok, msg in (
        (a.budget is None or a.budget > 0, f"--budget must be > 0, got {a.budget}"),
        (a.jobs is None or a.jobs >= 1, f"--jobs must be >= 1, got {a.jobs}"),
    ):
        if not ok:
            print(f"error: {msg}", file=sys.stderr)
            sys.exit(2)
    import torch

    cuda = a.device == "cuda" and torch.cuda.is_available()
    if a.device == "cuda" and not cuda:
        print("error: no CUDA device here; for the CPU check run bench/gpu.sh --cpu", file=sys.stderr)
        sys.exit(2)
    budget, jobs = a.budget or (450 if a.device == "cuda" else 600), a.jobs or (4 if a.device == "cuda" else 2)
    out = os.path.abspath(
        a.out or (os.path.join(HERE, "results") if a.device == "cuda" else tempfile.mkdtemp(prefix="gpu_check_"))
    )
    names = [s.name for s in stages(a.device, out, "", tiny_data.paths(""), cuda)]
    unknown = sorted(set(a.only or ()) - set(names))
    if unknown:
        print(f"error: --only: unknown stages {unknown}; known: {names}", file=sys.stderr)
        sys.exit(2)
    work = tempfile.mkdtemp(prefix="gpu_check_work_")  # run folders, data, per-stage logs: not results
    logs, data = os.path.join(work, "logs"), tiny_data.paths(os.path.join(work, "data"))
    todo = stages(a.device, out, work, data, cuda)
    os.makedirs(logs)
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    tiny_data.write_all(os.path.join(work, "data"))
    for s in todo:
        if a.only and s.name not in a.only and not s.skip:
            s.skip = "not in --only"
    env = dict(
        os.environ, PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore", **({} if cuda else {"CUDA_VISIBLE_DEVICES": ""})
    )  # CPU mode: the stages too
    command = shlex.join(["bench/gpu.sh", *(["--cpu"] if a.device == "cpu" else []), *sys.argv[1:]])
    print(f"gpu_check: {a.device} | out {out} | work {work} | budget {budget:.0f} s | jobs {jobs}", flush=True)

    deadline, done, records = t0 + budget, {}, {}
    groups = {}
    for s in todo:
        groups.setdefault(s.group, []).append(s)

    def run_group(name):
        for s in groups[name]:
            records[s.name] = run_stage(s, a.python, deadline, done, logs, env)

    side = [g for g in groups if g != "bench"]  # correctness first, side by side; the timings alone, after them
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(run_group, side))
    run_group("bench")
    ordered = [records[s.name] for s in todo]

    summary = {
        "command": command,
        "device": a.device,
        "machine": machine.info(a.device),
        "out": out,
        "budget_s": budget,
        "jobs": jobs,
        "wall_s": round(time.time() - t0, 1),
        "stages": ordered,
    }
    summary["table"] = table(ordered)
    machine.save_json(summary, os.path.join(out, f"gpu_{a.device}.json"))
    with open(os.path.join(out, f"gpu_{a.device}.log"), "w") as f:  # every stage's whole log, in one file
        for s in todo:
            path = os.path.join(logs, f"{s.name}.log")
            body = ""
            if os.path.exists(path):
                with open(path, errors="replace") as log:
                    body = log.read()
            f.write(
                f"===== {s.name}: {records[s.name]['status']} {records[s.name]['reason']}\n$ "
                f"{records[s.name]['command']}\n{body}\n"
            )
    shutil.rmtree(work, ignore_errors=True)  # run folders and data; the logs are in gpu_<device>.log
    m = summary["machine"]
    print(
        f"\n## bench/gpu.sh on {m.get('gpu', 'CPU')} ({m['cpus']} CPUs), torch {m['torch']}"
        + (f", CUDA {m['cuda']}" if "cuda" in m else "")
        + f", {summary['wall_s']:.0f} s\n"
    )
    print(summary["table"])
    print(f"\nwrote {out}/gpu_{a.device}.json (+ .log) and the benchmarks' *_{a.device}.json")


if __name__ == "__main__":
    main()
