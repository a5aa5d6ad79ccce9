"""Robomimic's five tasks (lift, can, square, transport, tool_hang; imported by envs.py, which holds the other
benchmarks): the hdf5 files in ~/.robomimic/<task>/<mh|ph>/ (low_dim_v15.hdf5 found, downloaded with a timeout, or the
command that makes it; image_v15.hdf5 rendered from it by scripts/render_robomimic_images.py), their reader, and the
robosuite 1.5 env built from a file's env_args, as a gymnasium env.

Image ids (<task>-<kind>-image) observe one flat float32 vector: the low-dim keys, then each camera's image (HWC,
upright, values 0..255) flattened, in the order of env_args["image_layout"] = {"low_dim_keys", "low_dim", "cameras",
"height", "width"}; their datasets carry data["images"] uint8 [N, C, H, W, 3] (a LazyImages reader when the images
would take more than half the available memory).
"""

import json
import os
import re
import shutil
import urllib.request
from typing import NamedTuple

import gymnasium as gym
import numpy as np

from runs import atomic, bounded_download, check, fail, require


class Task(NamedTuple):
    env: str  # robosuite env
    length: int  # episode length of the low-dim ids: the DFP authors' (300, 300, 400, 800, 1000)
    image_length: int  # of the image ids: robomimic's rollout horizon, the DBPO authors' *_image.yaml max_steps
    cameras: tuple  # robomimic's image cameras, in the order of the flat observation
    size: int  # their height = width (robomimic's 84; tool_hang 240)
    arms: int = 1  # robots: robot0_*, robot1_* keys and 7 action dims each


EYE0, EYE1 = "robot0_eye_in_hand", "robot1_eye_in_hand"
ROBOMIMIC_DATA_DIR = "~/.robomimic"
ROBOMIMIC_TASKS = {
    "lift": Task("Lift", 300, 400, ("agentview", EYE0), 84),
    "can": Task("PickPlaceCan", 300, 400, ("agentview", EYE0), 84),
    "square": Task("NutAssemblySquare", 400, 400, ("agentview", EYE0), 84),
    "transport": Task("TwoArmTransport", 800, 700, ("shouldercamera0", "shouldercamera1", EYE0, EYE1), 84, arms=2),
    "tool_hang": Task("ToolHang", 1000, 700, ("sideview", EYE0), 240),
}
ROBOT_KEYS = {"eef_pos": 3, "eef_quat": 4, "gripper_qpos": 2}  # per arm: robot<i>_<key>, its size
ROBOMIMIC_OBS_KEYS = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object")  # one arm's concat order
ROBOMIMIC_URL = "https://huggingface.co/datasets/robomimic/robomimic_datasets/resolve/main/v1.5/{}/{}/low_dim_v15.hdf5"
RENDER = "python scripts/render_robomimic_images.py"


def is_image(env_id: str) -> bool:
    return env_id.endswith("-image")


def arms(task: str) -> str:
    """'1 arm' or '2 arms' (transport): a file of the other kind does not fit."""
    n = ROBOMIMIC_TASKS[task].arms
    return f"{n} arm{'s' * (n > 1)}"


def default_obs_keys(env_id: str) -> tuple:
    """robot0_eef_pos, robot0_eef_quat, robot0_gripper_qpos (then robot1's for transport), then `object` for a
    low-dim id (robomimic's order); an image id has no `object` (the DBPO authors' *_image.yaml shape_meta)."""
    arms = ROBOMIMIC_TASKS[env_id.split("-")[0]].arms
    robot = tuple(f"robot{i}_{k}" for i in range(arms) for k in ROBOT_KEYS)
    return robot if is_image(env_id) else (*robot, "object")


def image_layout(env_id: str, env_args: dict, obs_keys=None) -> dict | None:
    """The flat observation's layout of an image id (None for a low-dim id): env_args["image_layout"] if set, else
    the cameras and size its env_kwargs name when they render (use_camera_obs: a rendered file's), else the task's."""
    if not is_image(env_id):
        return None
    if "image_layout" in env_args:
        return env_args["image_layout"]
    task, kw = ROBOMIMIC_TASKS[env_id.split("-")[0]], env_args.get("env_kwargs", {})
    cams = kw.get("camera_names") if kw.get("use_camera_obs") else None
    sizes = [kw.get(k, task.size) for k in ("camera_heights", "camera_widths")] if cams else [task.size] * 2
    height, width = (v[0] if isinstance(v, list) else v for v in sizes)  # robosuite allows one size per camera
    keys = list(obs_keys or default_obs_keys(env_id))
    check(
        all(k.split("_", 1)[-1] in ROBOT_KEYS for k in keys),
        f"--env {env_id} observes robot keys and cameras only, got obs_keys {keys}; use the low-dim id for `object`",
    )
    return {
        "low_dim_keys": keys,
        "low_dim": sum(ROBOT_KEYS[k.split("_", 1)[1]] for k in keys),  # 9 per arm
        "cameras": [cams] if isinstance(cams, str) else list(cams or task.cameras),
        "height": int(height),
        "width": int(width),
    }


def robomimic_default_path(env_id: str) -> str:
    """Where the scripts look for env_id's file first (and the generator and renderer write it):
    ~/.robomimic/<task>/<kind>/low_dim_v15.hdf5, or image_v15.hdf5 for an image id (robomimic's names)."""
    task, kind = env_id.split("-")[:2]
    name = "image_v15.hdf5" if is_image(env_id) else "low_dim_v15.hdf5"
    return os.path.expanduser(f"{ROBOMIMIC_DATA_DIR}/{task}/{kind}/{name}")


SCRIPTED_EXPERTS = ("lift", "can")  # the tasks scripts/generate_robomimic_dataset.py records; others: robomimic's file


def robomimic_generate_command(env_id: str, path: str) -> str:
    """The command that writes `path` for env_id: the generator, or the official file's download (no scripted
    expert for the task); for an image id the renderer, after the low-dim file's command if that file is missing."""
    task, kind = env_id.split("-")[:2]
    default = os.path.abspath(os.path.expanduser(path)) == robomimic_default_path(env_id)
    if is_image(env_id):
        low = robomimic_default_path(f"{task}-{kind}")
        cmd = f"{RENDER} --dataset {low}" + ("" if default else f" --out {path}")
        return cmd if os.path.isfile(low) else f"{robomimic_generate_command(f'{task}-{kind}', low)} && {cmd}"
    if task not in SCRIPTED_EXPERTS:
        return f"curl -L --create-dirs -o {path} {ROBOMIMIC_URL.format(task, kind)}"
    cmd = f"python scripts/generate_robomimic_dataset.py --task {task} --kind {kind}"
    return cmd if default else f"{cmd} --out {path}"


def resolve_robomimic_file(env_id: str, dataset_path: str | None = None, timeout: float = 30.0) -> str:
    """The hdf5 for env_id: the given path, the default folder, or (low-dim ids) a bounded download; else one error
    with the command that makes it (robomimic publishes no v1.5 image files: they are rendered here)."""
    task, kind = env_id.split("-")[:2]
    if dataset_path is not None:
        path = os.path.abspath(os.path.expanduser(dataset_path))
        check(
            os.path.isfile(path),
            f"--dataset-path {path} does not exist; create it with: {robomimic_generate_command(env_id, path)}",
        )
        return path
    path = robomimic_default_path(env_id)
    if os.path.isfile(path):
        return path
    check(not is_image(env_id), f"{path} is missing; render it with: {robomimic_generate_command(env_id, path)}")
    url = ROBOMIMIC_URL.format(task, kind)
    with bounded_download(
        timeout,
        [path],
        f"{path} is missing and downloading {url}",
        f"generate it with: {robomimic_generate_command(env_id, path)}",
    ):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic(path) as tmp, urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f)
    return path


def open_robomimic(path: str, hint: str):
    """(open h5py file, env_args, task, demos in numeric order) of a robomimic-layout file; else one error + hint."""
    require("h5py", "a Robomimic dataset")
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        fail(f"{path} is not a readable HDF5 file ({e}); {hint}")
    check(
        "data" in f and "env_args" in f["data"].attrs,
        f"{path} has no 'data' group with an env_args attribute; it is not a robomimic dataset",
    )
    try:
        env_args = json.loads(f["data"].attrs["env_args"])
        env_name = env_args["env_name"]
    except (ValueError, KeyError, TypeError):
        fail(f"{path}: data.attrs['env_args'] is not JSON with env_name and env_kwargs")
    task = {v.env: k for k, v in ROBOMIMIC_TASKS.items()}.get(env_name)
    check(task, f"{path} holds robosuite env '{env_name}', not one of Robomimic's {', '.join(ROBOMIMIC_TASKS)}")
    demos = sorted((k for k in f["data"] if re.fullmatch(r"demo_\d+", k)), key=lambda k: int(k[5:]))  # 2 before 10
    check(demos, f"{path} has no data/demo_N groups")
    return f, env_args, task, demos


def load_robomimic(env_id: str, path: str, obs_keys=None, lazy: bool | None = None):
    """(data, episode_ends, env_args) from data/demo_N/{actions, rewards, dones, obs/*, next_obs/*} (numeric order):
    observations (obs_keys, default default_obs_keys(env_id), recorded in env_args), actions, rewards - 1,
    masks = 1 - dones, terminals, next_observations; for an image id also images uint8 [N, C, H, W, 3] (in memory,
    or a LazyImages reader: lazy None decides by their size) and env_args["image_layout"]."""
    task, obs_keys = env_id.split("-")[0], tuple(obs_keys or default_obs_keys(env_id))
    f, env_args, owner, demos = open_robomimic(path, f"regenerate it with: {robomimic_generate_command(env_id, path)}")
    with f:
        check(
            owner == task,
            f"{path} holds robosuite env '{env_args['env_name']}' ({owner}, {arms(owner)}), but --env {env_id} needs "
            f"{ROBOMIMIC_TASKS[task].env} ({arms(task)}); pass the file for this task",
        )
        need = ["actions", "rewards", "dones"] + [f"{o}/{k}" for o in ("obs", "next_obs") for k in obs_keys]
        parts = {k: [] for k in ("observations", "actions", "rewards", "dones", "next_observations")}
        for demo in demos:
            g = f["data"][demo]
            missing = [k for k in need if k not in g]
            check(not missing, f"{path}: data/{demo} lacks {missing}; low-dim observations need {list(obs_keys)}")
            parts["observations"].append(np.concatenate([g["obs"][k][()] for k in obs_keys], -1))  # [T, O]
            parts["next_observations"].append(np.concatenate([g["next_obs"][k][()] for k in obs_keys], -1))
            for k in ("actions", "rewards", "dones"):
                parts[k].append(g[k][()])
        layout = image_layout(env_id, env_args, obs_keys)
        images = read_images(f, env_id, demos, layout, lazy) if layout else None
    ends = np.concatenate([np.arange(len(a)) == len(a) - 1 for a in parts["actions"]])  # [N] last step of each demo
    cat = {k: np.concatenate(v).astype(np.float32) for k, v in parts.items()}
    check(
        all(len(v) == len(ends) for v in cat.values()) and cat["actions"].ndim == 2,
        f"{path}: per-demo arrays of different lengths (actions, rewards, dones, obs, next_obs)",
    )
    data = {
        "observations": cat["observations"],
        "actions": cat["actions"],
        "rewards": cat["rewards"] - 1.0,  # sparse 0/1 -> -1/0 (offline and online)
        "masks": 1.0 - cat["dones"],  # no bootstrap after done (success, or a demo's end)
        "terminals": np.maximum(cat["dones"], ends).astype(np.float32),  # chunks never cross demos
        "next_observations": cat["next_observations"],
    }
    if layout:
        data["images"], env_args = images, {**env_args, "image_layout": layout}
    return data, ends, {**env_args, "obs_keys": list(obs_keys)}


def read_images(f, env_id: str, demos: list, layout: dict, lazy: bool | None):
    """data["images"] of an image id: every demo's obs/<camera>_image [T, H, W, 3] uint8 for the layout's cameras,
    checked (a low-dim file, a missing camera, another size: one error that says how to render it), as uint8
    [N, C, H, W, 3] in memory, or a LazyImages reader when they exceed half the available memory (or lazy=True)."""
    path, (h, w), cams = f.filename, (layout["height"], layout["width"]), layout["cameras"]
    render = f"{RENDER} --dataset {path}"
    lengths = []
    for demo in demos:
        obs = f["data"][demo]["obs"]
        have = [k.removesuffix("_image") for k in obs if k.endswith("_image")]
        check(have, f"{path} holds no images (no obs/<camera>_image): a low-dim file; render it with: {render}")
        missing = [c for c in cams if c not in have]
        check(
            not missing,
            f"{path}: data/{demo} has no images of camera(s) {missing} (it has {have}); render them "
            f"with: {render} --overwrite --cameras {' '.join(cams)}",
        )
        for c in cams:
            got = obs[f"{c}_image"]
            check(
                got.dtype == np.uint8 and got.shape[1:] == (h, w, 3),
                f"{path}: data/{demo}/obs/{c}_image holds {got.dtype} images of shape {got.shape[1:]}, but the env "
                f"renders {h}x{w}x3 uint8 (env_args' size); render them again with: {render} --overwrite --size {h}",
            )
        lengths.append(len(obs[f"{cams[0]}_image"]))
    nbytes = sum(lengths) * len(cams) * h * w * 3  # N x C x H x W x 3 bytes
    if lazy if lazy is not None else nbytes > available_memory() / 2:
        return LazyImages(path, demos, cams, lengths, (h, w))
    images = np.empty((sum(lengths), len(cams), h, w, 3), np.uint8)  # [N, C, H, W, 3]
    starts = np.cumsum([0, *lengths])
    for d, demo in enumerate(demos):
        for c, cam in enumerate(cams):
            images[starts[d] : starts[d + 1], c] = f["data"][demo]["obs"][f"{cam}_image"][()]
    return images


def available_memory() -> int:
    """Bytes of memory available now (Linux's MemAvailable; elsewhere the free pages)."""
    try:
        with open("/proc/meminfo") as m:
            return int(next(line.split()[1] for line in m if line.startswith("MemAvailable:"))) * 1024
    except (OSError, StopIteration):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class LazyImages:
    """data["images"] of a file too large for memory: images[idx] (an int array of any shape, an int or a slice) ->
    uint8 [*idx.shape, C, H, W, 3], read from the file at each access (the file opened once per process)."""

    def __init__(self, path: str, demos: list, cameras: list, lengths: list, size: tuple):
        self.path, self.demos, self.cameras, self.starts = path, demos, cameras, np.cumsum([0, *lengths])
        self.shape, self.dtype, self.ndim, self._file = (
            (int(self.starts[-1]), len(cameras), *size, 3),
            np.uint8,
            5,
            None,
        )

    def __len__(self) -> int:
        return int(self.shape[0])

    def __getstate__(self):  # to worker processes without the open file
        return {**self.__dict__, "_file": None}

    def __getitem__(self, idx) -> np.ndarray:
        import h5py

        if self._file is None:
            self._file = h5py.File(self.path, "r")
        idx = np.arange(len(self))[idx] if isinstance(idx, slice) else np.asarray(idx)
        flat = np.where(idx < 0, idx + len(self), idx).reshape(-1)  # [B]
        out = np.empty((len(flat), *self.shape[1:]), np.uint8)  # [B, C, H, W, 3]
        demo = np.searchsorted(self.starts, flat, side="right") - 1
        for d in np.unique(demo):
            rows = np.flatnonzero(demo == d)
            steps, inverse = np.unique(flat[rows] - self.starts[d], return_inverse=True)  # h5py: increasing indices
            obs = self._file["data"][self.demos[d]]["obs"]
            for c, cam in enumerate(self.cameras):
                out[rows, c] = obs[f"{cam}_image"][steps][inverse]
        return out.reshape(*idx.shape, *self.shape[1:])


class RobomimicEnv(gym.Env):
    """A robosuite 1.5 env built from a file's env_args, as a gymnasium env: obs = concat of env_args["obs_keys"]
    (an image id: image_layout's low-dim keys, then its cameras rendered at H x W each step, upright, HWC, flattened,
    0..255), reward = success (0/1) + reward_shift, terminated at success, truncated after the task's episode length
    (or a shorter env_kwargs['horizon'] / max_episode_steps); info['success']."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(
        self,
        env_id: str,
        env_args,
        reward_shift: float = 0.0,
        max_episode_steps: int | None = None,
        render_mode: str | None = None,
    ):
        require("robosuite", "a Robomimic env")
        import robosuite
        from robosuite.controllers.composite.composite_controller_factory import refactor_composite_controller_config

        self.env_args = json.loads(env_args) if isinstance(env_args, str) else env_args
        self.image_layout = image_layout(env_id, self.env_args, self.env_args.get("obs_keys"))
        self.keys = default_obs_keys(env_id)  # without env_args["obs_keys"]: robot0 (robot1), object
        kwargs = dict(self.env_args["env_kwargs"])
        if "controller_configs" in kwargs:  # robosuite <= 1.4 format (an OSC_POSE dict) -> 1.5 composite; 1.5 passes
            robots = kwargs.get("robots", ["Panda"])
            configs = [
                refactor_composite_controller_config(kwargs["controller_configs"], robot, ["right"])
                for robot in ([robots] if isinstance(robots, str) else robots)
            ]  # one per arm: transport's two Pandas
            kwargs["controller_configs"] = configs if len(configs) > 1 else configs[0]
        kwargs.update(
            has_renderer=False,
            has_offscreen_renderer=render_mode == "rgb_array" or self.image_layout is not None,
            use_camera_obs=False,  # the layout's cameras are rendered by render_cameras, the same call robosuite makes
            ignore_done=True,
        )  # episodes end here, not in robosuite
        self.env = robosuite.make(self.env_args["env_name"], **kwargs)
        task = ROBOMIMIC_TASKS[env_id.split("-")[0]]
        if self.image_layout:
            missing = [c for c in self.image_layout["cameras"] if c not in self.env.sim.model.camera_names]
            check(
                not missing,
                f"robosuite's {task.env} has no camera {missing}; its cameras: "
                f"{', '.join(self.env.sim.model.camera_names)}",
            )
        length = task.image_length if self.image_layout else task.length
        self.max_episode_steps = max_episode_steps or min(length, kwargs.get("horizon", length))
        self.reward_shift, self.render_mode, self.t = reward_shift, render_mode, 0
        self.action_space = gym.spaces.Box(-1.0, 1.0, (self.env.action_dim,), np.float32)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, self._obs(self.env.reset()).shape, np.float32)

    def _obs(self, raw: dict) -> np.ndarray:
        layout = getattr(self, "image_layout", None)
        keys = layout["low_dim_keys"] if layout else self.env_args.get("obs_keys", getattr(self, "keys", None))
        keys = keys or ROBOMIMIC_OBS_KEYS  # env_args of an older checkpoint (one arm)
        raw = {**raw, "object": raw["object-state"]}  # robomimic's name for robosuite's object-state
        low = np.concatenate([raw[k] for k in keys]).astype(np.float32)  # [D]
        if layout is None:
            return low
        return np.concatenate([low, self.render_cameras().reshape(-1).astype(np.float32)])  # [D + C * H * W * 3]

    def render_cameras(self) -> np.ndarray:
        """The layout's cameras at the current sim state: uint8 [C, H, W, 3], upright as robomimic stores them."""
        layout = self.image_layout
        # After a step MuJoCo's body poses lag qpos by one substep; robomimic renders its files after forward(), so
        # forward here too: the env sees what a file holds for the same state (physics unchanged, checked bit-exact).
        self.env.sim.forward()
        return np.stack(
            [
                self.env.sim.render(width=layout["width"], height=layout["height"], camera_name=c)[::-1]
                for c in layout["cameras"]
            ]
        )  # MuJoCo's rows run bottom-up

    def reset(self, *, seed: int | None = None, options=None):
        super().reset(seed=seed)
        if seed is not None:  # robosuite draws placements and arm noise from env.rng (shared with its samplers)
            self.env.rng.bit_generator.state = np.random.default_rng(seed).bit_generator.state
        self.t = 0
        return self._obs(self.env.reset()), {}

    def step(self, action):
        raw, _, _, _ = self.env.step(np.clip(np.asarray(action, np.float64), -1.0, 1.0))
        self.t += 1
        success = float(self.env._check_success())
        return (
            self._obs(raw),
            success + self.reward_shift,
            bool(success),
            self.t >= self.max_episode_steps,
            {"success": success},
        )

    def render(self):
        return self.env.sim.render(width=256, height=256, camera_name="agentview")[
            ::-1
        ]  # mujoco images are upside down
