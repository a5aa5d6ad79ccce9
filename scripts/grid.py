"""Run grids of the training scripts on Ray (scripts x envs x seeds x flag values), and report them.

  python scripts/grid.py run --preset dfp-table                       # the DFP paper's main table
  python scripts/grid.py run --script dfp_offline_to_online.py --envs cube-single-play cube-double-play \\
      --seeds 1 2 3 --set offline_steps=1000 --set hidden_dim=64 --out runs/my-grid
  python scripts/grid.py report runs/my-grid                          # CSV, markdown table, learning curves

Each run is one Ray task that starts the training script as a subprocess with the declared resources
(--cpus-per-run, --gpus-per-run; fractions allowed). Its folder is <out>/<run id>/ (the scripts' --runs-dir and
--run-name), holding the script's own tensorboard log and checkpoint plus three files of this tool:
grid.json (what the run is), grid.log (its stdout and stderr) and grid.done.json (written
atomically once the script exited 0). Rerunning the same command skips finished runs and continues
interrupted ones with the script's --resume from their checkpoint. Ctrl-C cancels the grid; running scripts
get SIGTERM, save their checkpoint and stop.

By default Ray starts on this machine; --address HOST:PORT joins a cluster made with `ray start` (all nodes
need this repository and the --out folder at the same paths, e.g. on a shared filesystem).
"""

import argparse
import csv
import glob
import itertools
import json
import math
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repository root: envs (dataset locations, for --dry-run), runs
from runs import check, fail, require, why  # noqa: E402

ALIASES = {"dfp": "dfp_offline_to_online.py", "dbp": "dbp_bc.py", "dbpo": "dbpo_ppo.py"}
SHORT = {v: k for k, v in ALIASES.items()}
CHECKPOINT = {"dfp_offline_to_online.py": "checkpoint.pt", "dbp_bc.py": "dbp_bc.pt", "dbpo_ppo.py": "state.pt"}
RUN_FILE, LOG_FILE, DONE_FILE = "grid.json", "grid.log", "grid.done.json"
GRID_FLAGS = {"seed", "env", "runs-dir", "run-name", "resume"}  # set by the grid, not by --set
# the flags renamed (old: new), for a --set with an old name
RENAMED = {
    "env_id": "env",
    "discount": "gamma",
    "depth": "num_layers",
    "horizon": "action_horizon",
    "num_gen": "num_hypotheses",
}

# Environment names the grid accepts (whether a script supports one, and has its data, is the script's check).
ENV_PATTERNS = [
    r"cube-(single|double|triple|quadruple)-play(-singletask)?(-task[1-5])?(-v0)?",  # OGBench cube
    r"(scene|puzzle-(3x3|4x4|4x5|4x6))-play(-singletask)?(-task[1-5])?(-v0)?",  # OGBench scene / puzzle
    r"(lift|can|square|transport|tool_hang)-(mh|ph)(-low_dim|-image)?",  # Robomimic
    r"[A-Z][A-Za-z0-9]*-v[0-9]+",  # gymnasium ids (Hopper-v5, ...)
    r"mujoco/[a-z0-9]+/[a-z-]+-v[0-9]+",  # Minari locomotion datasets (mujoco/hopper/medium-v0, ...)
]
ENV_HELP = (
    "cube-{single,double,triple,quadruple}-play[-taskN], scene-play[-taskN], puzzle-4x4-play[-taskN], "
    "Robomimic lift-mh / can-mh / square-mh (-image: from cameras), a gymnasium id such as Hopper-v5, or a Minari "
    "dataset id such as mujoco/hopper/medium-v0"
)

# ---- presets: the papers' tables ----
DFP_CUBE = [f"cube-{n}-play-task{t}" for n in ("double", "triple", "quadruple") for t in (2, 3, 4)]
DFP_TASKS = ["lift-mh", "can-mh", "square-mh", *DFP_CUBE]
DFP_SWITCH = 20000  # dfp-online-vs-control: offline steps before the switch (both pilots' curves flat by 20k)
DFP_ONLINE, DFP_START = 10000, 1000  # its online env steps, updates from env step 1000 on: 9000 updates
PRESETS = {
    "dfp-table": dict(
        about="DFP main table: 12 tasks x 5 seeds, the script's defaults (1M offline + 1M online steps)",
        script="dfp_offline_to_online.py",
        envs=DFP_TASKS,
        seeds=[1, 2, 3, 4, 5],
        variants={"dfp": {}},
    ),
    "dfp-kofn": dict(
        about="DFP top-K-of-N ablation: K in 1, 2, 4, 8 with N = 16, 12 tasks x 5 seeds",
        script="dfp_offline_to_online.py",
        envs=DFP_TASKS,
        seeds=[1, 2, 3, 4, 5],
        variants={f"dfp-K{k}": {"K": str(k), "N": "16"} for k in (1, 2, 4, 8)},
    ),
    "dbp-vs-mse": dict(
        about="DBP drift loss (temperature 0.2) vs MSE regression, same MLP, cube-single task 1 expert demos",
        script="dbp_bc.py",
        envs=["cube-single-play-task1"],
        seeds=[1, 2, 3, 4, 5],
        flags={
            "dataset_path": "~/.ogbench/data/cube-single-expert-task1-v0.npz",
            "backbone": "mlp",
            "hidden_dim": "256",
            "total_steps": "30000",
            "eval_interval": "15000",
            "eval_episodes": "50",
            "save_model": "true",
        },
        variants={"dbp-drift": {"temperatures": "0.2"}, "dbp-mse": {"loss": "mse"}},
    ),
    "dfp-online-vs-control": dict(
        about="DFP's online phase against its control, the same run continued offline for as many updates (9000): "
        "cube-single task 2, 100 play episodes, 3 x 128 networks, 5 seeds",
        script="dfp_offline_to_online.py",
        data="python scripts/generate_ogbench_dataset.py --env cube-single-play --episodes 100 --out-dir "
        "~/.ogbench/data-100",
        envs=["cube-single-play-task2"],
        seeds=[1, 2, 3, 4, 5],
        flags={
            "dataset_path": "~/.ogbench/data-100/cube-single-play-v0.npz",
            "hidden_dim": "128",
            "num_layers": "3",
            "batch_size": "128",
            "q_best_of": "8",
            "act_best_of": "8",
            "start_training": str(DFP_START),
            "eval_interval": "2000",
            "eval_episodes": "100",
            "eval_envs": "1",
            "log_interval": "1000",
            "save_interval": "2000",
        },
        variants={
            "dfp-online": {"offline_steps": str(DFP_SWITCH), "online_steps": str(DFP_ONLINE)},
            "dfp-control": {"offline_steps": str(DFP_SWITCH + DFP_ONLINE - DFP_START), "online_steps": "0"},
        },
    ),
    "dbpo-hopper": dict(
        about="DBPO on Hopper medium (Minari id, made here) with its anchor loss (coefficient 1, the authors') and "
        "without (0): 270 iterations, three critic settings changed for the budget (docs/dbpo.md), 1000 paired "
        "episodes at the start and the end, mean path and sampled policy, 2 seeds",
        script="dbpo_ppo.py",
        data="python scripts/generate_locomotion_dataset.py --dataset-id mujoco/hopper/medium-v0 && python dbp_bc.py "
        "--env mujoco/hopper/medium-v0 --backbone mlp --total-steps 30000 --warmup-epochs 0 --eval-interval 0 "
        "--save-interval 0 --keep-checkpoints 0 --run-name hopper_medium_dbp_bc_mlp",
        envs=["mujoco/hopper/medium-v0"],
        seeds=[1, 2],
        flags={
            "checkpoint": "runs/hopper_medium_dbp_bc_mlp/dbp_bc.pt",
            "num_iterations": "270",
            "eval_interval": "90",
            "eval_episodes": "100",
            "eval_episodes_ends": "1000",
            "eval_sampled": "true",
            "eval_envs": "1",
            "minibatch_size": "1000",
            "critic_lr": "1e-3",
            "critic_min_lr": "3e-4",
            "critic_warmup_iters": "10",
        },
        variants={"dbpo-anchor": {"anchor_coef": "1.0"}, "dbpo-no-anchor": {"anchor_coef": "0"}},
    ),
}

# ---- the papers' numbers (DFP, arXiv 2605.07727: success %, offline-to-online, mean of 5 seeds) ----
PAPER_DFP = {
    "lift-mh": 100.0,
    "square-mh": 93.2,
    "can-mh": 90.6,
    "cube-double-play-task2": 100.0,
    "cube-double-play-task3": 99.6,
    "cube-double-play-task4": 99.6,
    "cube-triple-play-task2": 98.4,
    "cube-triple-play-task3": 91.6,
    "cube-triple-play-task4": 81.2,
    "cube-quadruple-play-task2": 99.6,
    "cube-quadruple-play-task3": 96.6,
    "cube-quadruple-play-task4": 99.0,
}
PAPER_DFP_KOFN = {1: 85.8, 2: 91.9, 4: 95.6, 8: 92.5}  # average over the 12 tasks, N = 16

# ---- the dry run's cost estimate ----
# Each script's budget: the flags whose values add up to its steps (DFP: offline gradient steps + online env steps).
BUDGET = {
    "dfp_offline_to_online.py": ("steps", ("offline_steps", "online_steps")),
    "dbp_bc.py": ("steps", ("total_steps",)),  # None: --num-epochs, whose steps depend on the dataset's size
    "dbpo_ppo.py": ("iterations", ("num_iterations",)),
}
# Seconds per step measured on the project's 2-core VM (idle, 1 thread, torch eager, CPU) at the script's default
# network, from bench/results/dfp_cpu.json (`python bench/bench_dfp.py --eval-episodes 10 --eval-envs 2`): an offline
# update 472 ms, an online update 772 ms plus 1-4 ms of acting and env step (bench/results/dfp_cpu_online_step.json).
# Evaluations are not counted. It holds for runs that keep the flags in `same` at their defaults; the other scripts
# have no measurement yet: their runs get a step count only.
SPEED = {
    "dfp_offline_to_online.py": dict(
        seconds={"offline_steps": 0.472, "online_steps": 0.775},
        same=("hidden_dim", "num_layers", "batch_size", "num_hypotheses", "N", "q_best_of", "act_best_of", "utd_ratio"),
        source="0.47 s per offline update, 0.77 s per online step at the default 4x512: bench/results/dfp_cpu.json",
    ),
}


def short_env(env: str) -> str:
    """A short, canonical task name: cube-double-play-singletask-task2-v0 -> cube-double-play-task2."""
    env = re.sub(r"-v0$", "", env).replace("-singletask", "").replace("-low_dim", "")
    env = re.sub(r"^mujoco/([a-z0-9]+)/", r"\1-", env)  # a Minari id: mujoco/hopper/medium -> hopper-medium
    if re.fullmatch(r"cube-(single|double|triple|quadruple)-play", env):
        env += "-task2"  # the scripts' default task
    return env


# ------------------------------------------------------------------------------------------ script flags
_FLAGS_CACHE: dict = {}
_DEFAULTS_CACHE: dict = {}


def script_flags(script: str) -> dict:
    """{flag: metavar} of a script, parsed once from its --help (tyro or argparse). A boolean flag `--x` with its
    `--no-x` twin gets metavar 'BOOL'. `script` may carry a subcommand: 'scripts/grid.py run'."""
    if script not in _FLAGS_CACHE:
        path, *sub = script.split()
        env = dict(os.environ, COLUMNS="300", MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"))
        r = subprocess.run(
            [sys.executable, os.path.join(ROOT, path), *sub, "--help"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        check(r.returncode == 0, f"{script} --help failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
        flags, defaults, names = {}, {}, []
        for line in r.stdout.splitlines():
            head = re.split(r"\s{2,}", line.strip(" │|\t"))[0]  # the option part, before the description
            if head.startswith("-") and re.findall(r"--[A-Za-z0-9][\w-]*", head):
                names = re.findall(r"--[A-Za-z0-9][\w-]*", head)
                meta = head[head.index(names[0]) + len(names[0]) :].split(", -")[0].strip()
                if len(names) == 2 and names[1] == "--no-" + names[0][2:]:
                    flags[names[0]] = flags[names[1]] = "BOOL"
                else:
                    for n in names:
                        flags[n] = meta
            default = re.search(r"\(default: ([\w.+-]+)\)", line)  # on the flag's line or a description line below
            if default and names:
                defaults.setdefault(names[0], default.group(1))
        _FLAGS_CACHE[script] = flags
        _DEFAULTS_CACHE[script] = defaults
    return _FLAGS_CACHE[script]


def script_defaults(script: str) -> dict:
    """{flag: default} of a script's --help, where it prints a plain one: {'--offline-steps': '1000000', ...}."""
    script_flags(script)
    return _DEFAULTS_CACHE[script]


def flag_args(script: str, key: str, value: str) -> list:
    """--set key=value -> the script's command-line words, checked against its flags."""
    flags = script_flags(script)
    name = "--" + key.replace("_", "-")
    check(name[2:] not in GRID_FLAGS, f"--set {key}: the grid sets this itself (use --envs / --seeds)")
    if name not in flags and RENAMED.get(key, "").replace("_", "-") in (n[2:] for n in flags):
        fail(f"--set {key}: this flag of {script} is now --{RENAMED[key].replace('_', '-')}")
    if name not in flags:
        near = [f for f in flags if key.lower().replace("_", "-") in f.lower()]
        fail(
            f"unknown flag {name} for {script}"
            + (f" (did you mean {', '.join(near[:4])}?)" if near else f"; see python {script} --help")
        )
    meta = flags[name]
    if meta == "BOOL":
        low = value.lower()
        check(low in ("true", "false", "1", "0", "yes", "no"), f"--set {key}={value}: give true or false")
        return [name if low in ("true", "1", "yes") else "--no-" + name[2:]]
    words = [os.path.expanduser(w) for w in value.split()]
    check(len(words) > 0, f"--set {key}= has no value")
    m = re.fullmatch(r"\{([^}]*)\}", meta)
    if m and "None" not in m.group(1):
        choices = m.group(1).split(",")
        check(all(w in choices for w in words), f"--set {key}={value}: choose from {', '.join(choices)}")
    return [name, *words]


# ------------------------------------------------------------------------------------------ the grid
def resolve_script(name: str) -> str:
    name = ALIASES.get(name, name)
    check(
        os.path.isfile(os.path.join(ROOT, name)),
        f"unknown script '{name}'; valid: {', '.join(ALIASES.values())} "
        f"(or dfp, dbp, dbpo), or a path relative to the repository",
    )
    return name


def parse_pairs(items: list, what: str) -> dict:
    """{key: value} of KEY=VALUE words; a key may be spelled as in --help (offline-steps, --offline-steps) or as the
    field (offline_steps): it is kept as the field, the presets' spelling, so that a --set overrides a preset's."""
    out = {}
    for item in items or []:
        k, _, v = item.partition("=")
        k = k.strip().replace("-", "_")
        check(_ and k, f"{what} {item}: write KEY=VALUE (e.g. offline-steps=1000)")
        out[k] = v.strip()
    return out


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text)


def build_grid(a) -> list:
    """The list of runs (dicts) of the `run` command's arguments; every check happens here, before any work."""
    if a.preset is not None:
        check(a.preset in PRESETS, f"unknown preset '{a.preset}'; valid: {', '.join(PRESETS)}")
        check(not a.script, "--script and --preset exclude each other (a preset names its script)")
        p = PRESETS[a.preset]
        scripts, variants = (
            [p["script"]],
            [(p["script"], n, {**p.get("flags", {}), **f}) for n, f in p["variants"].items()],
        )
        envs, seeds, data = a.envs or p["envs"], a.seeds or p["seeds"], p.get("data")
    else:
        check(a.script, "give --preset NAME or --script SCRIPT [SCRIPT ...]")
        scripts = [resolve_script(s) for s in a.script]
        check(a.envs, "give --envs ENV [ENV ...]")
        envs, seeds = a.envs, a.seeds or [1]
        variants = [(s, SHORT.get(s, os.path.splitext(os.path.basename(s))[0]), {}) for s in scripts]
        data = None
    fixed, sweep = parse_pairs(a.set, "--set"), parse_pairs(a.sweep, "--sweep")
    for env in envs:
        check(any(re.fullmatch(p, env) for p in ENV_PATTERNS), f"unknown env '{env}'; valid: {ENV_HELP}")
    check(len(set(seeds)) == len(seeds), "--seeds has duplicates")
    combos = [
        dict(zip(sweep, vals, strict=True)) for vals in itertools.product(*(v.split(",") for v in sweep.values()))
    ]
    runs = []
    for (script, vname, vflags), combo, env, seed in itertools.product(variants, combos, envs, seeds):
        flags = {**vflags, **fixed, **combo}
        args = [w for k, v in flags.items() for w in flag_args(script, k, v)]
        known = script_flags(script)
        for need in ("--seed", "--runs-dir", "--run-name"):
            check(need in known, f"{script} has no {need} flag; the grid needs --seed, --runs-dir and --run-name")
        check("--env" in known, f"{script} has no --env flag")
        variant = "-".join([vname] + [slug(f"{k}{v}") for k, v in combo.items()])
        run_id = f"{variant}__{short_env(env)}__s{seed}"
        runs.append(
            dict(
                id=run_id,
                script=script,
                variant=variant,
                env=env,
                seed=seed,
                args=["--env", env, "--seed", str(seed), *args],
                flags=flags,
                threads="--num-threads" in known and "num_threads" not in flags,
                checkpoint=CHECKPOINT.get(os.path.basename(script)),
                data=data,  # a preset's own command for its data (else the standard dataset's)
            )
        )
    check(runs, "the grid has no runs")
    ids = [r["id"] for r in runs]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    check(not dup, f"two runs would share a folder ({', '.join(dup)}): give distinct envs/seeds/--sweep values")
    return runs


def command(run: dict, out_dir: str, cpus: float) -> list:
    cmd = [
        sys.executable,
        os.path.join(ROOT, run["script"]),
        *run["args"],
        "--runs-dir",
        out_dir,
        "--run-name",
        run["id"],
    ]
    if run["threads"]:
        cmd += ["--num-threads", str(max(1, int(cpus)))]
    return cmd


def missing_dataset(run: dict) -> tuple | None:
    """(path, the command that makes it) when the dataset the run reads by default, or its --dataset-path, is
    missing; None when it exists or the run names no dataset (DBPO reads a checkpoint; --dataset-dir: a folder)."""
    import envs
    import robomimic_tasks

    flags, env = run["flags"], run["args"][1]
    if "dbpo" in run["script"]:  # DBPO reads a DBP checkpoint, which the preset's data command makes
        path = os.path.expanduser(flags.get("checkpoint", ""))
        return None if not path or os.path.isfile(path) else (path, run.get("data") or "python dbp_bc.py ...")
    if "dataset_dir" in flags:
        return None
    given = os.path.expanduser(flags["dataset_path"]) if "dataset_path" in flags else None
    env_id = envs.resolve_env_id(env, gym_ids=None)
    if envs.family(env_id) == "robomimic":
        path = given or robomimic_tasks.robomimic_default_path(env_id)
        return None if os.path.isfile(path) else (path, robomimic_tasks.robomimic_generate_command(env_id, path))
    if envs.family(env_id) == "ogbench":
        path = given or envs.ogbench_default_path(env_id)
        ok = os.path.isfile(path) and os.path.isfile(path.replace(".npz", "-val.npz"))
        return None if ok else (path, run.get("data") or envs.generate_command(path).split("  (")[0])
    return None if given is None or os.path.isfile(given) else (given, "a D4RL-layout .npz (see docs/dbp.md)")


def duration(seconds: float) -> str:
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days" if seconds < 2 * 365 * 86400 else f"{seconds / (365 * 86400):.1f} years"


def cost_lines(runs: list, a) -> list:
    """The dry run's closing lines, per script: the steps its runs still take (a resumed run counted whole) and, where
    SPEED has a measurement that fits (the measured network, on CPU), the time: CPU time summed over the runs, and wall
    time on this machine at its number of runs at a time. An estimate: evaluations, start-up and load add to it."""
    if not runs:
        return ["[grid] every run is finished: nothing to run"]
    lines = []
    for script in dict.fromkeys(r["script"] for r in runs):
        mine = [r for r in runs if r["script"] == script]
        defaults = script_defaults(script)
        unit, budget = BUDGET.get(os.path.basename(script), ("steps", ()))
        speed = SPEED.get(os.path.basename(script))
        same_keys = speed["same"] if speed else ()
        total, timed, uncounted, untimed = 0, [], 0, 0
        for r in mine:
            default = {k: defaults.get("--" + k.replace("_", "-")) for k in (*budget, *same_keys)}
            value = {k: r["flags"].get(k, d) for k, d in default.items()}
            counts = {k: int(value[k]) for k in budget if str(value[k]).isdigit()}
            if not budget or len(counts) < len(budget):
                uncounted += 1
                continue
            total += sum(counts.values())
            same = speed is not None and all(value[k] == default[k] for k in same_keys)
            if same and a.gpus_per_run == 0:
                timed.append(sum(n * speed["seconds"][k] for k, n in counts.items()))  # sum over budget flags
            else:
                untimed += 1
        line = f"[grid] {script}: {len(mine) - uncounted} runs, {total:,} {unit} in all ({' + '.join(budget) or '?'})"
        if uncounted:
            line += f"; {uncounted} runs not counted (" + (
                "--total-steps unset: their --num-epochs depend on the dataset's size)" if budget else "no budget flag)"
            )
        lines.append(line)
        if timed:
            at_once = max(1, int((a.num_cpus or os.cpu_count() or 1) // a.cpus_per_run))
            slots = [0.0] * at_once  # the runs queued as Ray takes them: each to the first free slot, longest first
            for t in sorted(timed, reverse=True):
                slots[slots.index(min(slots))] += t
            wall = max(slots)
            where = "" if a.address else f", about {duration(wall)} on this machine at {at_once} at a time"
            lines.append(
                f"[grid]   estimated time: {duration(sum(timed))} of CPU time at 1 thread per run{where} "
                f"(measured on the project's 2-core VM, {speed['source']}; evaluations and start-up not counted)"
                + (f"; {untimed} runs not timed (other network or a GPU: no measurement)" if untimed else "")
            )
        else:
            lines.append(f"[grid]   no time estimate: no speed measured for {script} with these flags on CPU")
    return lines


def run_state(run_dir: str, ckpt: str | None) -> str:
    if os.path.isfile(os.path.join(run_dir, DONE_FILE)):
        return "done"
    if ckpt and os.path.isfile(os.path.join(run_dir, ckpt)):
        return "resume"
    return "new"


def write_json(path: str, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def tail(path: str, n: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return "(no log)"


# ------------------------------------------------------------------------------------------ one run (a Ray task)
def die_with_parent():
    """A preexec_fn that makes the child get SIGTERM (and save) if the Ray worker that started it dies.
    libc is loaded here, in the parent: the function run in the forked child only makes the system call."""
    try:
        import ctypes

        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except OSError:  # not Linux
        return None
    return lambda: prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def execute(spec: dict, term_timeout: float) -> dict:
    """Run one training script to its end (or until cancelled). Runs inside a Ray worker."""
    run_dir, cmd = spec["dir"], list(spec["command"])
    ckpt = os.path.join(run_dir, spec["checkpoint"]) if spec["checkpoint"] else None
    resumed = ckpt is not None and os.path.isfile(ckpt)
    if resumed:
        cmd += ["--resume", ckpt]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(spec["threads"]))
    env.setdefault("MUJOCO_GL", "egl")
    t0 = time.time()
    with open(os.path.join(run_dir, LOG_FILE), "a") as log:
        log.write(
            f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {'resume' if resumed else 'start'} on "
            f"{socket.gethostname()}: {shlex.join(cmd)}\n"
        )
        log.flush()
        proc = subprocess.Popen(
            cmd,
            cwd=spec["cwd"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
        cancelled = False
        try:
            while proc.poll() is None:
                time.sleep(0.2)  # a polling wait, so that ray.cancel's KeyboardInterrupt arrives promptly
        except KeyboardInterrupt:  # the grid was cancelled: let the script save its checkpoint and stop
            cancelled = True
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=term_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    seconds = time.time() - t0
    result = dict(
        id=spec["id"],
        rc=proc.returncode,
        seconds=seconds,
        resumed=resumed,
        host=socket.gethostname(),
        status="cancelled" if cancelled else "done" if proc.returncode == 0 else "failed",
    )
    if result["status"] == "done":
        write_json(os.path.join(run_dir, DONE_FILE), {**result, "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
    else:
        result["log_tail"] = tail(os.path.join(run_dir, LOG_FILE))
    return result


# ------------------------------------------------------------------------------------------ the `run` command
def local_ray_env() -> None:
    """Token authentication for the Ray instance the grid starts on this machine, chosen before `import ray`: Ray
    reads RAY_AUTH_MODE once, when imported, and the processes it spawns read it from the environment, so a mode set
    later leaves the driver and its GCS disagreeing (and ray.init times out). The token is a fresh random one in this
    process's environment, which Ray's processes inherit: nothing is written to ~/.ray, and the instance ends with the
    grid. A mode or token the user set (RAY_AUTH_MODE, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH) is kept as it is."""
    if any(k in os.environ for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")):
        return
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    os.environ["RAY_AUTH_MODE"] = "token"
    if "ray" in sys.modules:  # imported earlier (a test, a notebook): refresh its config, as ray.init itself does
        sys.modules["ray"]._raylet.Config.initialize("")


def connect(a):
    """Join the cluster at --address (checked with a bounded timeout), or start Ray on this machine."""
    if a.address is None:
        local_ray_env()
    import ray

    if a.address not in (None, "auto") and not a.address.startswith("ray://"):
        m = re.fullmatch(r"(.+):(\d+)", a.address)
        check(m is not None, f"--address {a.address}: write HOST:PORT (the address `ray start --head` printed)")
        try:
            socket.create_connection((m.group(1), int(m.group(2))), timeout=a.connect_timeout).close()
        except OSError as e:
            fail(
                f"cannot reach a Ray cluster at {a.address} within {a.connect_timeout:.0f} s ({e}); "
                "start one with `ray start --head` or check the address"
            )
    if ray.is_initialized():  # e.g. the tests' shared instance
        return ray
    if a.address is None:  # (cmd_run made SIGINT raise KeyboardInterrupt: Ray's processes inherit it, and
        # ray.cancel interrupts a running task with SIGINT, which must not be ignored there)
        try:
            ray.init(num_cpus=a.num_cpus, include_dashboard=False, log_to_driver=False, object_store_memory=256 * 2**20)
        except Exception as e:  # any failure to start (ports, sockets, memory, auth): one line, not Ray's traceback
            ray.shutdown()  # the processes it did start
            logs = os.path.join(os.environ.get("RAY_TMPDIR", tempfile.gettempdir()), "ray", "session_latest", "logs")
            fail(
                f"Ray could not start on this machine ({why(e)}); see {logs} (gcs_server.err, raylet.err), or start "
                "Ray yourself with `ray start --head` and pass --address auto"
            )
    else:
        try:
            ray.init(address=a.address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            fail(f"cannot join the Ray cluster at {a.address} ({str(e).splitlines()[0]})")
    return ray


def cmd_run(a) -> int:
    check(a.cpus_per_run > 0 and a.gpus_per_run >= 0, "--cpus-per-run must be > 0 and --gpus-per-run >= 0")
    runs = build_grid(a)
    out_dir = os.path.abspath(a.out or os.path.join("runs", a.preset or "grid"))
    cwd = os.getcwd()
    for run in runs:  # a folder made with other flags is never mixed into this grid
        old = os.path.join(out_dir, run["id"], RUN_FILE)
        if os.path.isfile(old):
            with open(old) as f:
                prev = json.load(f)
            check(
                prev.get("args") == run["args"] and prev.get("script") == run["script"],
                f"{os.path.dirname(old)} was made with other flags ({shlex.join(prev.get('args', []))}); "
                "use another --out, or delete that folder",
            )
    states = {r["id"]: run_state(os.path.join(out_dir, r["id"]), r["checkpoint"]) for r in runs}
    count = {state: sum(states[r["id"]] == state for r in runs) for state in ("done", "resume", "new")}
    if a.dry_run:
        missing = {}
        for r in runs:
            need = missing_dataset(r)
            print(
                f"{states[r['id']]:6s} {r['id']}: {shlex.join(command(r, out_dir, a.cpus_per_run))}"
                + (f"\n       dataset missing: {need[0]}" if need else "")
            )
            if need:
                missing[need[0]] = need[1]
        if missing:
            print(f"[grid] {len(missing)} dataset(s) missing; make them first (or the runs fail at start):")
            print("\n".join(f"  {cmd}" for cmd in missing.values()))
        todo = [r for r in runs if states[r["id"]] != "done"]
        print(
            f"[grid] {len(runs)} runs in {out_dir}: {count['done']} finished, {count['resume']} to resume, "
            f"{count['new']} new; nothing was run (--dry-run)"
        )
        print("\n".join(cost_lines(todo, a)))
        return 0
    require("ray", "scripts/grid.py run")
    main_thread = threading.current_thread() is threading.main_thread()
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler) if main_thread else None
    ray = connect(a)  # Ctrl-C works even where a parent ignores SIGINT (and Ray's processes inherit that)
    total = ray.cluster_resources()
    check(
        total.get("CPU", 0) >= a.cpus_per_run,
        f"the cluster has {total.get('CPU', 0):g} CPUs, fewer than --cpus-per-run",
    )
    check(
        total.get("GPU", 0) >= a.gpus_per_run,
        f"the cluster has {total.get('GPU', 0):g} GPUs, fewer than --gpus-per-run {a.gpus_per_run:g}",
    )
    capacity = int(total["CPU"] // a.cpus_per_run)
    if a.gpus_per_run > 0:
        capacity = min(capacity, int(total["GPU"] // a.gpus_per_run))

    if __name__ != "__main__":  # imported (tests): ship the task's code by value, workers cannot import this file
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    task = ray.remote(execute).options(num_cpus=a.cpus_per_run, num_gpus=a.gpus_per_run, max_retries=0)
    skipped = [r for r in runs if states[r["id"]] == "done"]
    todo = [r for r in runs if states[r["id"]] != "done"]
    print(
        f"[grid] {len(runs)} runs in {out_dir}: {count['done']} finished (skipped), {count['resume']} to resume, "
        f"{count['new']} new; {capacity} at a time ({a.cpus_per_run:g} CPU, {a.gpus_per_run:g} GPU each)",
        flush=True,
    )
    pending = {}
    for r in todo:
        run_dir = os.path.join(out_dir, r["id"])
        os.makedirs(run_dir, exist_ok=True)
        write_json(
            os.path.join(run_dir, RUN_FILE),
            {k: r[k] for k in ("id", "script", "variant", "env", "seed", "args", "flags")},
        )
        spec = dict(
            id=r["id"],
            dir=run_dir,
            cwd=cwd,
            checkpoint=r["checkpoint"],
            command=command(r, out_dir, a.cpus_per_run),
            threads=max(1, int(a.cpus_per_run)),
        )
        pending[task.remote(spec, a.term_timeout)] = r

    t0, done, failed, durations = time.time(), [], [], []

    def progress():
        avail = ray.available_resources().get("CPU", 0.0)
        running = min(len(pending), capacity, max(0, round((total["CPU"] - avail) / a.cpus_per_run)))
        left = len(pending)
        eta = (
            f"{sum(durations) / len(durations) * left / min(capacity, max(left, 1)) / 60:.1f} min" if durations else "?"
        )
        print(
            f"[grid] {len(done) + len(skipped)}/{len(runs)} done, {running} running, {len(failed)} failed, "
            f"{left - running} queued | {(time.time() - t0) / 60:.1f} min, ETA {eta}",
            flush=True,
        )

    def collect(ref) -> None:
        r = pending.pop(ref)
        try:
            res = ray.get(ref)
        except Exception as e:  # the worker died (e.g. out of memory): the run failed, the grid goes on
            res = dict(id=r["id"], rc=None, seconds=0.0, status="failed", log_tail=f"{type(e).__name__}: {e}")
        if res["status"] == "done":
            done.append(res)
            durations.append(res["seconds"])
            print(
                f"[grid] finished {res['id']} in {res['seconds'] / 60:.1f} min"
                + (" (resumed)" if res.get("resumed") else ""),
                flush=True,
            )
        elif res["status"] == "failed":
            failed.append(res)
            log = os.path.join(out_dir, r["id"], LOG_FILE)
            print(
                f"[grid] FAILED {res['id']} (exit code {res['rc']}); log {log}, last lines:\n"
                + "".join("    " + line + "\n" for line in res["log_tail"].rstrip().splitlines()),
                flush=True,
            )

    previous_term = signal.signal(signal.SIGTERM, signal.default_int_handler) if main_thread else None
    try:
        last = time.time()
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in ready:
                collect(ref)
            if ready or time.time() - last >= a.progress_interval:
                progress()
                last = time.time()
    except KeyboardInterrupt:
        print(
            f"[grid] stopping: cancelling {len(pending)} runs; running ones save their checkpoint "
            f"(Ctrl-C again to quit at once)",
            flush=True,
        )
        try:
            for ref in pending:
                ray.cancel(ref)  # a running task gets KeyboardInterrupt: execute() sends SIGTERM and waits
            ray.wait(list(pending), num_returns=len(pending), timeout=a.term_timeout + 10)
            print(
                f"[grid] stopped: {len(done) + len(skipped)}/{len(runs)} done. Rerun the same command to continue.",
                flush=True,
            )
        except KeyboardInterrupt:
            print("[grid] quit at once (runs still saving get a second signal and stop without saving)", flush=True)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous_term)
            signal.signal(signal.SIGINT, previous_int)
    print(
        f"[grid] all {len(runs)} runs ended in {(time.time() - t0) / 60:.1f} min: {len(done) + len(skipped)} done "
        f"({len(skipped)} skipped), {len(failed)} failed"
        + (f": {', '.join(f['id'] for f in failed)}" if failed else ""),
        flush=True,
    )
    shown = os.path.relpath(out_dir) if not os.path.relpath(out_dir).startswith("..") else out_dir
    print(f"[grid] results: python scripts/grid.py report {shown}", flush=True)
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------ the `report` command
SUCCESS_TAGS = ("eval/success", "eval/success_rate")  # DFP/DBP, DBPO
REPORT_TAGS = (*SUCCESS_TAGS, "eval/episodic_return")


def run_info(run_dir: str) -> dict:
    """script, variant, env, seed of a run folder: from grid.json, else from the scripts' default run name
    <env_id>__<exp_name>__<seed>__<unix time>."""
    spec = os.path.join(run_dir, RUN_FILE)
    if os.path.isfile(spec):
        with open(spec) as f:
            s = json.load(f)
        return dict(script=s["script"], variant=s["variant"], env=short_env(s["env"]), seed=s["seed"], flags=s["flags"])
    parts = os.path.basename(run_dir).split("__")
    if len(parts) == 4 and parts[2].isdigit():
        return dict(script=parts[1], variant=parts[1], env=short_env(parts[0]), seed=int(parts[2]), flags={})
    return dict(script="?", variant="?", env="?", seed=None, flags={})


def read_scalars(run_dir: str, tags: tuple = REPORT_TAGS) -> dict:
    """{tag: {step: value}} over the run's event files; a later file (a resumed run) wins a shared step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for f in sorted(glob.glob(os.path.join(run_dir, "events.out.tfevents.*")), key=os.path.getmtime):
        acc = EventAccumulator(f, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in tags:
            if tag in acc.Tags()["scalars"]:
                out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def mean_se(values: list) -> tuple:
    n = len(values)
    m = sum(values) / n
    se = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n) if n > 1 else float("nan")
    return m, se


def last_step(curve: dict) -> int:
    """The step of a run's last evaluation in a report curve {step: success, "_info": ...}."""
    return max(k for k in curve if k != "_info")


def paired_lines(curves: dict, last: int = 1) -> list:
    """Where an env has exactly two variants A, B (in a preset's order), their final successes paired by seed:
    d_s = A_s - B_s, mean(d) +- s.e. (std(d) / sqrt(n)) and mean / s.e. (a gain 'beyond 3 s.e.': a ratio above 3).
    last > 1: a second line pairs each run's mean over its last `last` evaluations (steadier than one evaluation)."""
    lines = []
    for env in sorted({e for _, e in curves}):
        pair = sorted(v for v, e in curves if e == env)
        if len(pair) != 2:
            continue
        order = next((list(p["variants"]) for p in PRESETS.values() if set(pair) <= set(p["variants"])), list(pair))
        pair.sort(key=order.index)  # a preset's order: dfp-online - dfp-control, dbp-drift - dbp-mse
        for n in sorted({1, last}):
            means = [{}, {}]  # per variant: seed -> the mean of its last n evaluations
            for by_seed, v in zip(means, pair, strict=True):
                for r in curves[v, env]:
                    steps = sorted(k for k in r if k != "_info")
                    if len(steps) >= n:
                        by_seed[r["_info"]["seed"]] = sum(r[k] for k in steps[-n:]) / n
            seeds = sorted(set(means[0]) & set(means[1]))
            if len(seeds) < 2:
                continue
            m, se = mean_se([100 * (means[0][s] - means[1][s]) for s in seeds])
            if not lines:
                lines = ["", "| env | paired difference (by seed) | of | seeds | mean ± s.e. (points) | mean / s.e. |"]
                lines.append("|---|---|---|---|---|---|")
            of = "final" if n == 1 else f"mean of last {n}"
            lines.append(
                f"| {env} | {pair[0]} - {pair[1]} | {of} | {len(seeds)} | {m:+.1f} ± {se:.1f} | {m / se:+.1f} |"
            )
    return lines


def cmd_report(a) -> int:
    require("matplotlib", "scripts/grid.py report")
    check(os.path.isdir(a.runs_dir), f"{a.runs_dir} is not a folder")
    check(a.last >= 1, f"--last {a.last}: give the number of evaluations to average, at least 1")
    check(a.tags or not a.after, "--after sets the steps of the --tags table; give --tags TAG [TAG ...] with it")
    run_dirs = sorted(
        {os.path.dirname(p) for p in glob.glob(os.path.join(a.runs_dir, "**", "events.out.tfevents.*"), recursive=True)}
    )
    check(run_dirs, f"no tensorboard logs (events.out.tfevents.*) under {a.runs_dir}")
    out_dir = a.out or a.runs_dir
    os.makedirs(out_dir, exist_ok=True)
    rows, curves, logged = [], {}, {}  # curves: (variant, env) -> [{step: success}] one per seed; logged: [scalars]
    for d in run_dirs:
        info, scalars = run_info(d), read_scalars(d, (*REPORT_TAGS, *a.tags))
        logged.setdefault((info["variant"], info["env"]), []).append(scalars)
        name = os.path.relpath(d, a.runs_dir)
        for tag, series in scalars.items():
            rows += [
                (name, info["script"], info["env"], info["seed"], s, tag, f"{v:.6g}") for s, v in sorted(series.items())
            ]
        success = next((scalars[t] for t in SUCCESS_TAGS if t in scalars), None)
        if success:
            curves.setdefault((info["variant"], info["env"]), []).append(dict(success, _info=info))
    csv_path = os.path.join(out_dir, f"{a.name}.csv")
    with open(csv_path + ".tmp", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "script", "env", "seed", "step", "tag", "value"])
        w.writerows(rows)
    os.replace(csv_path + ".tmp", csv_path)

    # ---- table: final success (the last evaluation of each run), mean +- standard error over seeds ----
    def paper_number(variant, env, info):
        return PAPER_DFP.get(env) if "dfp" in info["script"] or variant.startswith("dfp") else None

    with_paper = any(paper_number(v, e, runs[0]["_info"]) is not None for (v, e), runs in curves.items())
    lines = [
        "| variant | env | seeds | final step | success % (mean ± s.e.) |" + (" DFP paper % |" if with_paper else ""),
        "|---|---|---|---|---|" + ("---|" if with_paper else ""),
    ]
    kofn = {}
    for (variant, env), runs in sorted(curves.items()):
        finals = [100 * r[last_step(r)] for r in runs]
        steps = sorted({last_step(r) for r in runs})
        m, se = mean_se(finals)
        info = runs[0]["_info"]
        paper = paper_number(variant, env, info)
        pm = f"{m:.1f} ± {se:.1f}" if len(finals) > 1 else f"{m:.1f}"
        lines.append(
            f"| {variant} | {env} | {len(finals)} | {'/'.join(map(str, steps))} | {pm} |"
            + (f" {'' if paper is None else f'{paper:.1f}'} |" if with_paper else "")
        )
        flags = info["flags"]
        if paper is not None and flags.get("K") and flags.get("N", "16") == "16":
            kofn.setdefault(int(flags["K"]), []).append(m)
    if kofn:
        lines += [
            "",
            "| K (of N = 16) | tasks | average success % | DFP paper average % (12 tasks) |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {k} | {len(v)} | {sum(v) / len(v):.1f} | {PAPER_DFP_KOFN.get(k, '')} |" for k, v in sorted(kofn.items())
        ]
    lines += paired_lines(curves, a.last)
    if a.tags:  # each run's mean of a logged tag over its steps after --after, then mean +- s.e. over the seeds
        lines += ["", f"| variant | env | tag | seeds | mean over steps > {a.after} (mean ± s.e. over seeds) |"]
        lines.append("|---|---|---|---|---|")
        for (variant, env), runs in sorted(logged.items()):
            for tag in a.tags:
                late = ([v for s, v in r.get(tag, {}).items() if s > a.after] for r in runs)
                means = [sum(v) / len(v) for v in late if v]  # one per run that logged the tag after --after
                m, se = mean_se(means or [math.nan])
                value = f"{m:.4g} ± {se:.2g}" if len(means) > 1 else f"{m:.4g}"
                lines.append(f"| {variant} | {env} | {tag} | {len(means)} | {value} |")
    md_path = os.path.join(out_dir, f"{a.name}.md")
    with open(md_path + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(md_path + ".tmp", md_path)

    print("\n".join(lines))
    if not curves:
        print(
            f"wrote {csv_path} ({len(rows)} rows) and {md_path} from {len(run_dirs)} runs; no figure: no run logged "
            f"{' or '.join(SUCCESS_TAGS)}"
        )
        return 0

    # ---- learning curves: one panel per env, one line per variant (mean over seeds, band = +- s.e.) ----
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = sorted({env for _, env in curves})
    cols = min(len(envs), 4)
    rows_n = math.ceil(len(envs) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 3 * rows_n), squeeze=False)
    for ax, env in zip(axes.flat, envs, strict=False):  # the grid may have spare cells
        for (variant, e), runs in sorted(curves.items()):
            if e != env:
                continue
            steps = sorted({k for r in runs for k in r if k != "_info"})
            stats = [mean_se([r[s] for r in runs if s in r]) for s in steps]
            mean = [m for m, _ in stats]
            se = [0.0 if math.isnan(s) else s for _, s in stats]
            ax.plot(steps, mean, marker=".", label=f"{variant} ({len(runs)} seeds)")
            ax.fill_between(
                steps,
                [m - s for m, s in zip(mean, se, strict=True)],
                [m + s for m, s in zip(mean, se, strict=True)],
                alpha=0.25,
            )
        ax.set_title(env, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("eval success")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(envs) :]:
        ax.axis("off")
    fig.tight_layout()
    png_path = os.path.join(out_dir, f"{a.name}.png")
    fig.savefig(png_path + ".tmp.png", dpi=100)
    os.replace(png_path + ".tmp.png", png_path)
    write_json(
        os.path.join(out_dir, f"{a.name}.json"),
        dict(
            panels=envs,
            size_px=[int(v) for v in fig.get_size_inches() * 100],
            runs=len(run_dirs),
            lines={env: sorted(v for v, e in curves if e == env) for env in envs},
        ),
    )
    print(f"wrote {csv_path} ({len(rows)} rows), {md_path}, {png_path} ({len(envs)} panels) from {len(run_dirs)} runs")
    return 0


# ------------------------------------------------------------------------------------------ command line
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser(
        "run",
        help="run a grid (skips finished runs, resumes interrupted ones)",
        epilog="presets:\n" + "\n".join(f"  {k}: {v['about']}" for k, v in PRESETS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("--preset", help=f"a named grid: {', '.join(PRESETS)}")
    r.add_argument("--script", nargs="+", help="training scripts (dfp, dbp, dbpo or file names), without --preset")
    r.add_argument("--envs", nargs="+", help="environments (replaces the preset's)")
    r.add_argument("--seeds", nargs="+", type=int, help="seeds (replaces the preset's; default 1)")
    r.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="a flag of the script for every run, spelled as in its --help or with underscores: offline-steps=1000 "
        "(booleans: save-model=false; lists: temperatures='0.1 0.2'); repeatable",
    )
    r.add_argument(
        "--sweep",
        action="append",
        metavar="KEY=V1,V2",
        help="a flag swept over values (one run per value, crossed with the rest), e.g. K=1,2,4,8; repeatable",
    )
    r.add_argument("--out", help="grid folder (default runs/<preset> or runs/grid)")
    r.add_argument("--cpus-per-run", type=float, default=1.0, help="CPUs reserved per run; also its torch threads")
    r.add_argument("--gpus-per-run", type=float, default=0.0, help="GPUs per run (fractions share a GPU, e.g. 0.25)")
    r.add_argument(
        "--address",
        help="join a Ray cluster (HOST:PORT from `ray start --head`, or auto); default: start Ray on this machine",
    )
    r.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to wait for --address")
    r.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    r.add_argument("--term-timeout", type=float, default=60.0, help="seconds a cancelled run gets to save")
    r.add_argument("--progress-interval", type=float, default=30.0, help="seconds between progress lines")
    r.add_argument("--dry-run", action="store_true", help="print each run's state and command, run nothing")
    q = sub.add_parser("report", help="CSV, markdown table and learning curves of a folder of runs")
    q.add_argument("runs_dir", metavar="RUNS_DIR", help="a grid folder (or any folder of runs)")
    q.add_argument("--out", help="where to write (default RUNS_DIR)")
    q.add_argument("--name", default="results", help="file name stem: NAME.csv, NAME.md, NAME.png, NAME.json")
    q.add_argument(
        "--last", type=int, default=1, help="also pair two variants by their mean over the last N evaluations"
    )
    q.add_argument(
        "--tags",
        nargs="+",
        default=[],
        metavar="TAG",
        help="tensorboard tags (e.g. losses/critic charts/success) added to the CSV, with a table of each run's mean",
    )
    q.add_argument("--after", type=int, default=0, help="the --tags table averages the steps after this one")
    return p


def main(argv=None) -> int:
    p = parser()
    p.error = lambda msg: fail(msg)  # one-line error, exit 2 (argparse prints usage otherwise)
    for action in p._subparsers._group_actions:
        for sp in action.choices.values():
            sp.error = lambda msg: fail(msg)
    a = p.parse_args(argv)
    return cmd_run(a) if a.command == "run" else cmd_report(a)


if __name__ == "__main__":
    sys.exit(main())
