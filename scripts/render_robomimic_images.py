"""Render a Robomimic low-dim file's image observations: image_v15.hdf5, robomimic's image layout, made locally.

robomimic publishes no v1.5 image files; its own dataset_states_to_obs.py makes them from a file's simulator states.
This script does the same without the robomimic package: every demo's `states` are replayed in the robosuite 1.5 env
of the file's env_args (the demo's `model_file` loaded first when it has one; then per step: set the sim state,
forward, render each camera, flipped upright as robomimic stores them) and written beside the copied low-dim data:

  data/demo_N/obs/<camera>_image       uint8 [T, H, W, 3]   frame t = the state states[t]
  data/demo_N/next_obs/<camera>_image  uint8 [T, H, W, 3]   next_obs[t] = obs[t + 1]; the last one rendered after
                                                             stepping the demo's last action from its last state
                                                             (robomimic's extract_trajectory does exactly that)
  actions, rewards, dones, states, obs/<low-dim key>, next_obs/<low-dim key>, attributes, mask: copied
  data.attrs['env_args']: env_kwargs gain camera_names, camera_heights, camera_widths, use_camera_obs = True,
                          has_offscreen_renderer = True (as robomimic writes them), and image_layout (robomimic_tasks)

Cameras (robomimic's): lift, can, square: agentview, robot0_eye_in_hand at 84x84; transport: shouldercamera0,
shouldercamera1, robot0_eye_in_hand, robot1_eye_in_hand at 84x84; tool_hang: sideview, robot0_eye_in_hand at 240x240.

  python scripts/render_robomimic_images.py --dataset ~/.robomimic/lift/mh/low_dim_v15.hdf5 --workers 2

Worker processes each own an env; rendered demos are kept in a hidden parts folder beside the output, so an
interrupted run continues where it stopped; the output is written under a temporary name and renamed when complete.
"""

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np

os.environ.setdefault("MUJOCO_GL", "egl")  # headless offscreen rendering (MuJoCo loads with the first env, below)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from robomimic_tasks import ROBOMIMIC_TASKS, RobomimicEnv, image_layout, open_robomimic  # noqa: E402  (root, above)
from runs import atomic, check, parse, require  # noqa: E402  (the same)


def num_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@dataclass
class Args:
    dataset: str
    """a Robomimic low-dim hdf5 with data/demo_N/states: ours (scripts/generate_robomimic_dataset.py) or the official
    low_dim_v15.hdf5"""
    out: str | None = None
    """output file; default image_v15.hdf5 beside --dataset (where the scripts look for an image id's file)"""
    cameras: tuple[str, ...] | None = None
    """cameras to render; default the task's (robomimic's)"""
    size: int | None = None
    """image height = width in pixels; default the task's (84; tool_hang 240)"""
    workers: int = num_cores()
    """worker processes, each with its own env; one per CPU core by default"""
    overwrite: bool = False
    """replace an existing output file"""
    resume: bool = True
    """reuse the demos already rendered in the hidden parts folder beside --out (an interrupted run)"""


def fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def image_env_args(env_args: dict, task: str, cameras: list, size: int) -> dict:
    """The image file's env_args: env_kwargs with the cameras as robomimic's dataset_states_to_obs.py writes them,
    and the flat observation's layout for the image ids (robomimic_tasks.image_layout of these kwargs)."""
    kwargs = {
        **env_args["env_kwargs"],
        "camera_names": list(cameras),
        "camera_heights": size,
        "camera_widths": size,
        "use_camera_obs": True,
        "has_offscreen_renderer": True,
        "camera_depths": False,
    }
    new = {k: v for k, v in env_args.items() if k not in ("image_layout", "obs_keys")}  # an image file rendered again
    new["env_kwargs"] = kwargs
    return {**new, "image_layout": image_layout(f"{task}-ph-image", new)}


def plan(dataset: str, out: str | None, cameras, size: int | None, overwrite: bool) -> dict:
    """Check everything that needs no env (one error line, exit 2, nothing written) and return the settings."""
    src = os.path.abspath(os.path.expanduser(dataset))
    check(os.path.isfile(src), f"--dataset {src} does not exist; pass a Robomimic low-dim hdf5 (low_dim_v15.hdf5)")
    f, env_args, task, demos = open_robomimic(src, "pass a Robomimic low-dim hdf5 (data/demo_N with states)")
    with f:
        lacking = [d for d in demos if "states" not in f["data"][d] or "actions" not in f["data"][d]]
        check(
            not lacking, f"{src}: data/{lacking[0] if lacking else ''} lacks 'states' or 'actions': nothing to replay"
        )
        lengths = [len(f["data"][d]["actions"]) for d in demos]
    size = size if size is not None else ROBOMIMIC_TASKS[task].size
    check(8 <= size <= 1024, f"--size must be in 8..1024 pixels, got {size}")
    cameras = list(cameras or ROBOMIMIC_TASKS[task].cameras)
    check(cameras and len(set(cameras)) == len(cameras), f"--cameras must name distinct cameras, got {cameras}")
    out = os.path.abspath(os.path.expanduser(out or os.path.join(os.path.dirname(src), "image_v15.hdf5")))
    check(overwrite or not os.path.exists(out), f"{out} exists; pass --overwrite to replace it")
    check(os.access(os.path.dirname(out) or ".", os.W_OK), f"cannot write to {os.path.dirname(out)}; choose --out")
    env_args = image_env_args(env_args, task, cameras, size)
    return dict(src=src, out=out, task=task, demos=demos, lengths=lengths, env_args=env_args)


# ---- worker side: one env per process, one demo per job
_W = {}


def init_worker(src: str, task: str, env_args: dict) -> None:
    import h5py

    _W.update(env=RobomimicEnv(f"{task}-ph-image", env_args), file=h5py.File(src, "r"))


def render_demo(env: RobomimicEnv, g) -> np.ndarray:
    """A demo's frames: uint8 [T + 1, C, H, W, 3]; frame t < T at states[t], frame T after its last action."""
    u, states, actions = env.env, g["states"][()], g["actions"][()]
    if "model_file" in g.attrs:  # robomimic's reset_to: the demo's own MuJoCo model (sizes a state does not hold)
        u.reset_from_xml_string(u.edit_model_xml(g.attrs["model_file"]))
        u.sim.reset()
    frames = []
    for state in states:
        u.sim.set_state_from_flattened(state)
        frames.append(env.render_cameras())  # [C, H, W, 3]; it calls forward(): qpos -> the poses the cameras see
    u.step(np.asarray(actions[-1], np.float64))  # the last next_obs: the last action played from the last state
    frames.append(env.render_cameras())
    return np.stack(frames)


def render_job(job: tuple) -> int:
    """Render demo `name` into the part file `part` (atomically); returns its number of frames."""
    name, part = job
    frames = render_demo(_W["env"], _W["file"]["data"][name])
    with atomic(part) as tmp, open(tmp, "wb") as fh:
        np.save(fh, frames)
    return len(frames)


def write_file(run: dict, parts: list) -> None:
    """The output: the input's groups and attributes copied, each demo's images added, env_args replaced."""
    import h5py

    with h5py.File(run["src"], "r") as fi, atomic(run["out"]) as tmp, h5py.File(tmp, "w") as fo:
        fo.attrs.update(fi.attrs)
        for key in fi:  # e.g. mask (robomimic's filter keys)
            if key != "data":
                fi.copy(fi[key], fo, key)
        data = fo.create_group("data")
        data.attrs.update(fi["data"].attrs)
        data.attrs["env_args"] = json.dumps(run["env_args"])
        for name, part in zip(run["demos"], parts, strict=True):
            fi.copy(fi["data"][name], data, name)
            frames = np.load(part, mmap_mode="r")  # [T + 1, C, H, W, 3]
            groups = ("obs", "next_obs") if "next_obs" in data[name] else ("obs",)
            for c, cam in enumerate(run["env_args"]["image_layout"]["cameras"]):
                for group, rows in zip(groups, (slice(0, -1), slice(1, None)), strict=False):
                    key = f"{group}/{cam}_image"
                    if key in data[name]:  # an image file rendered again
                        del data[name][key]
                    data[name].create_dataset(key, data=frames[rows, c])  # [T, H, W, 3]


def render_file(dataset, out=None, cameras=None, size=None, workers=1, overwrite=False, resume=True) -> str:
    """Render `dataset`'s images into `out` (default image_v15.hdf5 beside it); returns the output path."""
    run = plan(dataset, out, cameras, size, overwrite)
    env = RobomimicEnv(f"{run['task']}-ph-image", run["env_args"])  # refuses an unknown camera before any work
    stat = os.stat(run["src"])
    key = hashlib.sha1(json.dumps([run["src"], stat.st_size, stat.st_mtime_ns, run["env_args"]]).encode()).hexdigest()
    parts_dir = os.path.join(os.path.dirname(run["out"]), f".{os.path.basename(run['out'])}-{key[:10]}.parts")
    if not resume:
        shutil.rmtree(parts_dir, ignore_errors=True)
    os.makedirs(parts_dir, exist_ok=True)
    parts = [os.path.join(parts_dir, f"{i:06d}.npy") for i in range(len(run["demos"]))]
    todo = [i for i, p in enumerate(parts) if not os.path.exists(p)]
    layout, total = run["env_args"]["image_layout"], sum(run["lengths"]) + len(run["demos"])  # T + 1 frames per demo
    print(
        f"rendering {run['out']}: {len(run['demos'])} demos, {total} states x {len(layout['cameras'])} cameras "
        f"({', '.join(layout['cameras'])}) at {layout['height']}x{layout['width']}, {min(workers, len(todo) or 1)} "
        f"worker(s)"
        + (f"; {len(parts) - len(todo)} demos already rendered in {parts_dir}" if len(todo) < len(parts) else ""),
        flush=True,
    )
    jobs = [(run["demos"][i], parts[i]) for i in todo]
    pool, start, last, frames, done = None, time.time(), time.time(), 0, len(parts) - len(todo)
    if min(workers, len(todo)) <= 1:
        import h5py

        _W.update(env=env, file=h5py.File(run["src"], "r"))
        results = map(render_job, jobs)
    else:  # spawn: fresh interpreters (no MuJoCo or EGL state inherited)
        env.env.close()
        pool = mp.get_context("spawn").Pool(
            min(workers, len(todo)), init_worker, (run["src"], run["task"], run["env_args"])
        )
        results = pool.imap_unordered(render_job, jobs, chunksize=1)
    try:
        left = sum(run["lengths"][i] + 1 for i in todo)
        for n in results:
            frames, done, now = frames + n, done + 1, time.time()
            if now - last >= 10 or done == len(parts):
                last, rate = now, frames / (now - start)
                print(
                    f"demos {done}/{len(parts)} | {rate * len(layout['cameras']):.1f} frames/s | elapsed "
                    f"{fmt_time(now - start)} | ETA {fmt_time((left - frames) / rate)}",
                    flush=True,
                )
    finally:
        if pool is not None:
            pool.terminate()  # also on Ctrl-C: no orphaned workers
            pool.join()
        if "file" in _W:
            _W.pop("file").close()
    write_file(run, parts)
    shutil.rmtree(parts_dir)
    seconds = time.time() - start
    print(f"wrote {run['out']}: {frames} new states rendered in {fmt_time(seconds)}", flush=True)
    return run["out"]


if __name__ == "__main__":
    args = parse(Args)
    for module in ("robosuite", "h5py"):
        require(module, "scripts/render_robomimic_images.py")
    check(args.workers >= 1, f"--workers must be >= 1, got {args.workers}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill` unwinds like Ctrl-C: workers are stopped too
    render_file(args.dataset, args.out, args.cameras, args.size, args.workers, args.overwrite, args.resume)
