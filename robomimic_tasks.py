"""Robomimic's lift, can and square low-dim tasks (imported by envs.py, which holds the other benchmarks): the hdf5
files in ~/.robomimic/<task>/<mh|ph>/low_dim_v15.hdf5 (found, downloaded with a timeout, or the command that makes
them), their reader, and the robosuite 1.5 env built from a file's env_args, as a gymnasium env.
"""

import json
import os
import re
import shutil
import urllib.request

import gymnasium as gym
import numpy as np

from runs import atomic, bounded_download, check, fail, require

ROBOMIMIC_DATA_DIR = "~/.robomimic"
ROBOMIMIC_TASKS = {
    "lift": ("Lift", 300),
    "can": ("PickPlaceCan", 300),
    "square": ("NutAssemblySquare", 400),
}  # env, length
ROBOMIMIC_OBS_KEYS = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object")  # default concat order
ROBOMIMIC_URL = "https://huggingface.co/datasets/robomimic/robomimic_datasets/resolve/main/v1.5/{}/{}/low_dim_v15.hdf5"


def robomimic_default_path(env_id: str) -> str:
    """Where the scripts look for env_id's file first (and the generator writes it): ~/.robomimic/<task>/<kind>/..."""
    task, kind = env_id.split("-")[:2]
    return os.path.expanduser(f"{ROBOMIMIC_DATA_DIR}/{task}/{kind}/low_dim_v15.hdf5")


SCRIPTED_EXPERTS = ("lift", "can")  # the tasks scripts/generate_robomimic_dataset.py records; others: robomimic's file


def robomimic_generate_command(env_id: str, path: str) -> str:
    """The command that writes `path` for env_id: the generator, or the official file's download (no scripted
    expert for the task)."""
    task, kind = env_id.split("-")[:2]
    if task not in SCRIPTED_EXPERTS:
        return f"curl -L --create-dirs -o {path} {ROBOMIMIC_URL.format(task, kind)}"
    cmd = f"python scripts/generate_robomimic_dataset.py --task {task} --kind {kind}"
    return cmd if os.path.abspath(os.path.expanduser(path)) == robomimic_default_path(env_id) else f"{cmd} --out {path}"


def resolve_robomimic_file(env_id: str, dataset_path: str | None = None, timeout: float = 30.0) -> str:
    """The low-dim hdf5 for env_id: the given path, the default folder, or a bounded download (else one error)."""
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


def load_robomimic(env_id: str, path: str, obs_keys=ROBOMIMIC_OBS_KEYS):
    """(data, episode_ends, env_args) from data/demo_N/{actions, rewards, dones, obs/*, next_obs/*} (numeric order):
    observations (obs_keys, recorded in env_args), actions, rewards - 1, masks = 1 - dones, terminals,
    next_observations."""
    require("h5py", "a Robomimic dataset")
    import h5py

    task = env_id.split("-")[0]
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        fail(
            f"{path} is not a readable HDF5 file ({e}); regenerate it with: {robomimic_generate_command(env_id, path)}"
        )
    with f:
        check(
            "data" in f and "env_args" in f["data"].attrs,
            f"{path} has no 'data' group with an env_args attribute; it is not a robomimic dataset",
        )
        try:
            env_args = json.loads(f["data"].attrs["env_args"])
            env_name = env_args["env_name"]
        except (ValueError, KeyError, TypeError):
            fail(f"{path}: data.attrs['env_args'] is not JSON with env_name and env_kwargs")
        owner = {v[0]: k for k, v in ROBOMIMIC_TASKS.items()}.get(env_name)
        check(
            owner == task,
            f"{path} holds robosuite env '{env_name}' ({owner or 'not lift, can or square'}), but --env "
            f"{env_id} needs {ROBOMIMIC_TASKS[task][0]}; pass the file for this task",
        )
        demos = sorted(
            (k for k in f["data"] if re.fullmatch(r"demo_\d+", k)), key=lambda k: int(k[5:])
        )  # demo_10 after demo_9
        check(demos, f"{path} has no data/demo_N groups")
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
    ends = np.concatenate([np.arange(len(a)) == len(a) - 1 for a in parts["actions"]])  # [N] last step of each demo
    cat = {k: np.concatenate(v).astype(np.float32) for k, v in parts.items()}
    check(
        all(len(v) == len(ends) for v in cat.values()) and cat["actions"].ndim == 2,
        f"{path}: per-demo arrays of different lengths (actions, rewards, dones, obs, next_obs)",
    )
    return (
        {
            "observations": cat["observations"],
            "actions": cat["actions"],
            "rewards": cat["rewards"] - 1.0,  # sparse 0/1 -> -1/0 (offline and online)
            "masks": 1.0 - cat["dones"],  # no bootstrap after done (success, or a demo's end)
            "terminals": np.maximum(cat["dones"], ends).astype(np.float32),  # chunks never cross demos
            "next_observations": cat["next_observations"],
        },
        ends,
        {**env_args, "obs_keys": list(obs_keys)},
    )


class RobomimicEnv(gym.Env):
    """A robosuite 1.5 env built from a file's env_args, as a gymnasium env: obs = concat of env_args["obs_keys"],
    reward = success (0/1) + reward_shift, terminated at success, truncated after the task's episode length
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
        kwargs = dict(self.env_args["env_kwargs"])
        if "controller_configs" in kwargs:  # robosuite <= 1.4 format (an OSC_POSE dict) -> 1.5 composite; 1.5 passes
            kwargs["controller_configs"] = refactor_composite_controller_config(
                kwargs["controller_configs"], "Panda", ["right"]
            )
        kwargs.update(
            has_renderer=False,
            has_offscreen_renderer=render_mode == "rgb_array",
            use_camera_obs=False,
            ignore_done=True,
        )  # episodes end here, not in robosuite
        self.env = robosuite.make(self.env_args["env_name"], **kwargs)
        length = ROBOMIMIC_TASKS[env_id.split("-")[0]][1]
        self.max_episode_steps = max_episode_steps or min(length, kwargs.get("horizon", length))
        self.reward_shift, self.render_mode, self.t = reward_shift, render_mode, 0
        self.action_space = gym.spaces.Box(-1.0, 1.0, (self.env.action_dim,), np.float32)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, self._obs(self.env.reset()).shape, np.float32)

    def _obs(self, raw: dict) -> np.ndarray:
        raw = {**raw, "object": raw["object-state"]}  # robomimic's name for robosuite's object-state
        return np.concatenate([raw[k] for k in self.env_args.get("obs_keys", ROBOMIMIC_OBS_KEYS)]).astype(np.float32)

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
