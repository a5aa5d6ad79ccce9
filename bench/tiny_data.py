"""Tiny synthetic datasets in the formats the training scripts read, for bench/gpu.sh's end-to-end stages.

    python bench/tiny_data.py DIR      # DIR/cube-single-play-v0.npz (+ its -val twin) and DIR/hopper-v5.npz

cube-single-play-v0.npz: OGBench's layout (observations [N, 28], actions [N, 5] in [-1, 1], terminals 1 at each
episode's last step, qpos [N, 21], qvel [N, 20], from which ogbench relabels the singletask rewards), random states with
the cube near the table centre: what dfp_offline_to_online.py and dbp_bc.py read for cube-single-play.
hopper-v5.npz: the D4RL layout envs.load_dataset reads for a gymnasium env (observations [N, 11], actions [N, 3],
rewards, terminals, timeouts). Random data: the stages check that the code runs, not what it learns.
"""

import os
import sys

import numpy as np


def write_cube_single(path: str, episodes: int = 8, length: int = 60, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    n = episodes * length
    terminals = np.zeros(n, np.float32)
    terminals[length - 1 :: length] = 1.0  # [N], 1 at the last step of each episode
    qpos = rng.normal(0, 0.05, (n, 21)).astype(np.float32)
    qpos[:, 14:17] += [0.45, 0.0, 0.02]  # the cube's position: near the table centre
    data = dict(
        observations=rng.normal(size=(n, 28)).astype(np.float32),
        actions=rng.uniform(-1, 1, (n, 5)).astype(np.float32),
        terminals=terminals,
        qpos=qpos,
        qvel=rng.normal(size=(n, 20)).astype(np.float32),
    )
    np.savez(path, **data)
    np.savez(path.replace(".npz", "-val.npz"), **data)  # ogbench reads the -val twin too


def write_hopper(path: str, episodes: int = 4, length: int = 40, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    n = episodes * length
    timeouts = np.zeros(n, bool)
    timeouts[length - 1 :: length] = True  # each episode ends by its time limit
    np.savez(
        path,
        observations=rng.normal(size=(n, 11)).astype(np.float32),
        actions=rng.uniform(-1, 1, (n, 3)).astype(np.float32),
        rewards=rng.normal(size=n).astype(np.float32),
        terminals=np.zeros(n, bool),
        timeouts=timeouts,
    )


def paths(folder: str) -> dict:
    """Where write_all puts the files: {"cube": path, "hopper": path}."""
    return {"cube": os.path.join(folder, "cube-single-play-v0.npz"), "hopper": os.path.join(folder, "hopper-v5.npz")}


def write_all(folder: str) -> dict:
    """Both files in `folder` (created): paths(folder)."""
    os.makedirs(folder, exist_ok=True)
    p = paths(folder)
    write_cube_single(p["cube"])
    write_hopper(p["hopper"])
    return p


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("error: usage: python bench/tiny_data.py DIR", file=sys.stderr)
        sys.exit(2)
    print(write_all(sys.argv[1]))
