"""Overhead of scripts/grid.py's Ray grid per run: a grid of trivial runs against the same commands
started directly (subprocesses, same parallelism), and Ray's start-up.

  python bench/bench_grid.py --runs 16 --parallel 2

The trivial run is a tiny Python script with the grid's flags (--env --seed --runs-dir --run-name) that
writes one file and exits; its own cost is the interpreter's start-up, the same in both paths.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import grid  # noqa: E402

TRIVIAL = """import argparse, os, time
p = argparse.ArgumentParser()
for f in ("--env", "--runs-dir", "--run-name"):
    p.add_argument(f)
p.add_argument("--seed", type=int)
p.add_argument("--sleep", type=float, default=0.0)
a = p.parse_args()
time.sleep(a.sleep)
os.makedirs(os.path.join(a.runs_dir, a.run_name), exist_ok=True)
open(os.path.join(a.runs_dir, a.run_name, "out.txt"), "w").write("ok")
print("final ok")
"""


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=16, help="runs in the grid (seeds)")
    p.add_argument("--parallel", type=int, default=2, help="runs at a time (Ray CPUs; threads for the direct path)")
    p.add_argument("--sleep", type=float, default=0.0, help="seconds each trivial run sleeps")
    a = p.parse_args()
    grid.local_ray_env()  # Ray's token in this process's environment, before ray is imported (as grid.py run does)
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "trivial.py")
        with open(script, "w") as f:
            f.write(TRIVIAL)
        seeds = [str(s) for s in range(1, a.runs + 1)]
        common = ["--script", script, "--envs", "cube-single-play", "--seeds", *seeds, "--set", f"sleep={a.sleep}"]

        # direct: the grid's own commands, a thread pool of subprocesses
        runs = grid.build_grid(grid.parser().parse_args(["run", *common]))
        direct_dir = os.path.join(tmp, "direct")
        cmds = [grid.command(r, direct_dir, 1) for r in runs]
        t = time.perf_counter()
        with ThreadPoolExecutor(a.parallel) as pool:
            rcs = list(pool.map(lambda c: subprocess.run(c, capture_output=True).returncode, cmds))
        t_direct = time.perf_counter() - t
        assert rcs == [0] * a.runs, rcs

        t = time.perf_counter()
        ray.init(num_cpus=a.parallel, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 2**20)
        t_init = time.perf_counter() - t
        t = time.perf_counter()
        rc = grid.main(["run", *common, "--out", os.path.join(tmp, "grid"), "--progress-interval", "1000"])
        t_grid = time.perf_counter() - t
        assert rc == 0
        t = time.perf_counter()
        ray.shutdown()
        t_shutdown = time.perf_counter() - t

    per_direct = t_direct / a.runs * a.parallel
    print(f"\n{a.runs} trivial runs (sleep {a.sleep:g} s), {a.parallel} at a time")
    print("| path | wall s | per run (wall x parallel / runs) |")
    print("|---|---|---|")
    print(f"| direct subprocesses | {t_direct:.2f} | {per_direct:.3f} s |")
    print(f"| grid.py on Ray (without ray.init) | {t_grid:.2f} | {t_grid / a.runs * a.parallel:.3f} s |")
    print(f"| ray.init (local, once per grid) | {t_init:.2f} | |")
    print(f"| ray.shutdown | {t_shutdown:.2f} | |")
    print(
        f"grid overhead per run: {(t_grid - t_direct) / a.runs * a.parallel:.3f} s "
        f"(includes parsing the script's --help once and writing the run's files)"
    )


if __name__ == "__main__":
    main()
