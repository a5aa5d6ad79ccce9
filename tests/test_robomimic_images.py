"""Robomimic image ids (<task>-<kind>-image): scripts/render_robomimic_images.py's file, the image env's observation,
envs.load_dataset's images (in memory and lazy), the refusals; transport and tool_hang build.

One module fixture records two short lift demos live in the image env (its rendered frames kept), writes them as a
low-dim file and renders it: every robosuite test shares those two envs. Refusal tests use hand-written files.
"""

import importlib.util
import json
import os
import pickle
import sys

import h5py
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from inprocess import run_main  # noqa: E402

import envs  # noqa: E402
import robomimic_tasks  # noqa: E402

RENDER = os.path.join(ROOT, "scripts", "render_robomimic_images.py")
CAMS, SIZE, LOW = ["agentview", "robot0_eye_in_hand"], 84, 9  # lift's cameras, their size, robot keys' width


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """Two lift demos (5 and 3 steps, random actions) run live in lift-mh-image: its flat observations before each
    step and after the last, the states, a low-dim file of them (with model_file, as official files) and
    the renderer's image_v15.hdf5 beside it."""
    gen = load_script("generate_robomimic_dataset")
    live = robomimic_tasks.RobomimicEnv("lift-mh-image", gen.make_env_args("lift", 20))
    rng, folder = np.random.default_rng(0), tmp_path_factory.mktemp("images")
    low = str(folder / "low_dim_v15.hdf5")
    demos = []
    with h5py.File(low, "w") as f:
        f.create_group("data").attrs["env_args"] = json.dumps(gen.make_env_args("lift", 20))
        for d, n in enumerate((5, 3)):
            obs, _ = live.reset(seed=d)
            model = live.env.sim.model.get_xml()
            flat, states, actions = [obs], [], rng.uniform(-1, 1, (n, 7)).astype(np.float32)
            for a in actions:
                states.append(live.env.sim.get_state().flatten())
                flat.append(live.step(a)[0])
            flat = np.stack(flat)  # [T + 1, 9 + 2 * 84 * 84 * 3]
            g = f.create_group(f"data/demo_{d}")
            for k, v in dict(
                actions=actions, states=np.stack(states), rewards=np.zeros(n), dones=np.eye(n)[-1]
            ).items():
                g.create_dataset(k, data=v)
            for group, rows in (("obs", flat[:-1]), ("next_obs", flat[1:])):
                for k, cols in zip(
                    robomimic_tasks.default_obs_keys("lift-mh-image"), ((0, 3), (3, 7), (7, 9)), strict=True
                ):
                    g.create_dataset(f"{group}/{k}", data=rows[:, cols[0] : cols[1]])
                g.create_dataset(f"{group}/object", data=np.zeros((n, 10), np.float32))
            g.attrs["model_file"] = model  # robomimic's reset_to loads it first: lift's cube size is drawn per reset
            demos.append(flat)
    renderer = load_script("render_robomimic_images")
    replay = renderer.render_demo(live, Demo(states=np.stack(states), actions=actions))  # demo_1, in live's model
    out = renderer.render_file(low, workers=1)
    return dict(live=live, low=low, out=out, demos=demos, replay=replay)


class Demo(dict):
    """A demo group without attributes (no model_file: replayed in the env's current model)."""

    attrs = {}


def pixels(flat):
    """The camera part of flat observations [..., 9 + C * H * W * 3] -> uint8 [..., C, H, W, 3]."""
    return flat[..., LOW:].reshape(*flat.shape[:-1], len(CAMS), SIZE, SIZE, 3).astype(np.uint8)


def test_renderer_writes_robomimics_image_layout(rendered):
    assert rendered["out"] == os.path.join(os.path.dirname(rendered["low"]), "image_v15.hdf5")  # beside the input
    with h5py.File(rendered["out"]) as f, h5py.File(rendered["low"]) as src:
        env_args = json.loads(f["data"].attrs["env_args"])
        kw = env_args["env_kwargs"]
        assert kw["camera_names"] == CAMS and kw["camera_heights"] == kw["camera_widths"] == SIZE
        assert kw["use_camera_obs"] is True and kw["has_offscreen_renderer"] is True
        assert env_args["image_layout"] == {
            "low_dim_keys": ["robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"],
            "low_dim": LOW,
            "cameras": CAMS,
            "height": SIZE,
            "width": SIZE,
        }
        assert f["data/demo_1"].attrs["model_file"] == src["data/demo_1"].attrs["model_file"]
        for d, n in enumerate((5, 3)):
            g = f[f"data/demo_{d}"]
            for k in ("actions", "states", "rewards", "dones", "obs/object", "next_obs/robot0_eef_pos"):
                np.testing.assert_array_equal(g[k][()], src[f"data/demo_{d}"][k][()])  # copied
            for c in CAMS:
                obs, nxt = g[f"obs/{c}_image"], g[f"next_obs/{c}_image"]
                assert obs.dtype == nxt.dtype == np.uint8 and obs.shape == nxt.shape == (n, SIZE, SIZE, 3)
                np.testing.assert_array_equal(nxt[:-1], obs[1:])  # next_obs[t] = obs[t + 1]
                assert obs[()].std() > 10  # a scene, not a blank frame


def test_rendered_frames_equal_the_frames_the_live_env_rendered(rendered):
    live_frames = pixels(rendered["demos"][1])  # [T + 1, C, H, W, 3], rendered live after the reset and each step
    np.testing.assert_array_equal(rendered["replay"][:-1], live_frames[:-1])  # the same state, the same pixels
    # The file: each demo replayed in its model_file, whose XML round trip moves poses by ~1e-6 (robomimic's own
    # replays alike): a few edge pixels of a frame may differ. The last next_obs frame is the last action stepped again
    # from the restored state (robomimic's rule), close to the live step's frame, not equal.
    with h5py.File(rendered["out"]) as f:
        for d, flat in enumerate(rendered["demos"]):
            frames = pixels(flat).astype(int)
            for c, cam in enumerate(CAMS):
                got = f[f"data/demo_{d}/obs/{cam}_image"][()].astype(int)
                assert ((got != frames[:-1, c]).any(-1).mean((1, 2)) < 0.01).all()  # under 1% of pixels per frame
                assert np.abs(got[0] - got[-1]).mean() > 0.5  # the arm moved: frames differ over time
                last = f[f"data/demo_{d}/next_obs/{cam}_image"][-1].astype(int)
                assert np.abs(last - frames[-1, c]).mean() < np.abs(got[-1] - frames[-1, c]).mean()


def test_image_env_observation_is_low_dim_keys_then_upright_cameras(rendered):
    live = rendered["live"]
    assert live.observation_space.shape == (LOW + len(CAMS) * SIZE * SIZE * 3,) and live.max_episode_steps == 20
    obs, _ = live.reset(seed=5)
    raw = live.env._get_observations(force_update=True)
    np.testing.assert_array_equal(
        obs[:LOW], np.concatenate([raw[k] for k in live.image_layout["low_dim_keys"]]).astype(np.float32)
    )
    assert obs.dtype == np.float32 and obs[LOW:].min() >= 0 and obs[LOW:].max() <= 255
    agentview = live.env.sim.render(width=SIZE, height=SIZE, camera_name="agentview")  # MuJoCo's bottom-up rows
    np.testing.assert_array_equal(pixels(obs)[0], agentview[::-1])
    assert not np.array_equal(agentview, agentview[::-1])
    assert robomimic_tasks.ROBOMIMIC_TASKS["lift"].image_length == 400  # without a horizon: robomimic's


def test_load_dataset_images_in_memory_and_lazy(rendered):
    live = rendered["live"]
    env, data, ends, env_args = envs.load_dataset("lift-mh-image", rendered["out"], env=live)
    assert env is live and np.flatnonzero(ends).tolist() == [4, 7]
    assert data["images"].dtype == np.uint8 and data["images"].shape == (8, len(CAMS), SIZE, SIZE, 3)
    assert data["observations"].shape == (8, LOW) and env_args["image_layout"] == live.image_layout
    flat = np.concatenate([d[:-1] for d in rendered["demos"]])  # the live observations, step by step
    # the env's flat vector = the dataset's low-dim part, then its images flattened (up to the replay's edge pixels)
    joined = np.concatenate([data["observations"], data["images"].reshape(8, -1).astype(np.float32)], 1)
    np.testing.assert_array_equal(joined[:, :LOW], flat[:, :LOW])
    assert joined.shape == flat.shape and (joined != flat).mean() < 0.002
    lazy = robomimic_tasks.load_robomimic("lift-mh-image", rendered["out"], lazy=True)[0]["images"]
    assert isinstance(lazy, robomimic_tasks.LazyImages) and len(lazy) == 8 and lazy.shape == data["images"].shape
    idx = np.array([[7, 0, 5], [4, 4, -1]])  # any shape, repeats, across demos, negative
    np.testing.assert_array_equal(lazy[idx], data["images"][idx])
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(lazy))[2:6], data["images"][2:6])  # to workers


def write(path, env_name="Lift", cams=(), size=SIZE, env_kwargs=None, n=4):
    """A hand-written robomimic-layout file: robot keys (one arm, or two for TwoArmTransport), object, images."""
    arms = 2 if env_name == "TwoArmTransport" else 1
    kw = (
        env_kwargs if env_kwargs is not None else {"camera_names": CAMS, "camera_heights": SIZE, "use_camera_obs": True}
    )
    with h5py.File(path, "w") as f:
        f.create_group("data").attrs["env_args"] = json.dumps({"env_name": env_name, "type": 1, "env_kwargs": kw})
        g = f.create_group("data/demo_0")
        for k, v in dict(actions=np.zeros((n, 7 * arms)), rewards=np.zeros(n), dones=np.eye(n)[-1]).items():
            g.create_dataset(k, data=v.astype(np.float32))
        for group in ("obs", "next_obs"):
            for i in range(arms):
                for k, dim in robomimic_tasks.ROBOT_KEYS.items():
                    g.create_dataset(f"{group}/robot{i}_{k}", data=np.zeros((n, dim), np.float32))
            g.create_dataset(f"{group}/object", data=np.zeros((n, 10), np.float32))
            for c in cams:
                g.create_dataset(f"{group}/{c}_image", data=np.zeros((n, size, size, 3), np.uint8))


@pytest.mark.parametrize(
    "case, env_id, message",
    [
        ("low_dim", "lift-mh-image", "a low-dim file; render it with: python scripts/render_robomimic_images.py"),
        ("one_camera", "lift-mh-image", "has no images of camera(s) ['robot0_eye_in_hand'] (it has ['agentview'])"),
        ("small", "lift-mh-image", "holds uint8 images of shape (32, 32, 3), but the env renders 84x84x3 uint8"),
        ("transport", "lift-mh-image", "'TwoArmTransport' (transport, 2 arms), but --env lift-mh-image needs Lift"),
        ("lift", "transport-ph", "'Lift' (lift, 1 arm), but --env transport-ph needs TwoArmTransport (2 arms)"),
    ],
)
def test_image_refusals_one_line_exit_2(tmp_path, capsys, case, env_id, message):
    path = str(tmp_path / "f.hdf5")
    cams = {"low_dim": (), "one_camera": CAMS[:1]}.get(case, CAMS)
    write(path, {"transport": "TwoArmTransport"}.get(case, "Lift"), cams, 32 if case == "small" else SIZE)
    with pytest.raises(SystemExit) as e:
        robomimic_tasks.load_robomimic(env_id, path)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
    if case == "low_dim":
        assert f"--dataset {path}\n" in err  # the exact command: the file's images go beside it


def test_image_env_with_another_layout_and_missing_files_refused(tmp_path, monkeypatch, capsys):
    path = str(tmp_path / "f.hdf5")
    write(path, cams=CAMS)
    other = type("Env", (), {"image_layout": {"cameras": ["agentview"], "height": 64}})()  # as RobomimicEnv's
    with pytest.raises(SystemExit):
        envs.load_dataset("lift-mh-image", path, env=other)
    assert "the env observes {'cameras': ['agentview'], 'height': 64} but the dataset holds" in capsys.readouterr().err
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(SystemExit):
        envs.resolve_robomimic_file("square-ph-image")  # no low-dim file either: get it, then render
    low, image = (tmp_path / ".robomimic/square/ph" / f for f in ("low_dim_v15.hdf5", "image_v15.hdf5"))
    err = capsys.readouterr().err
    assert f"{image} is missing; render it with: curl -L --create-dirs -o {low} " in err
    assert f" && python scripts/render_robomimic_images.py --dataset {low}\n" in err
    assert not os.path.exists(tmp_path / ".robomimic")  # no download tried for images
    assert (
        envs.resolve_env_id("tool_hang-ph-image") == "tool_hang-ph-image" and envs.family("transport-mh") == "robomimic"
    )
    with pytest.raises(SystemExit):
        envs.resolve_env_id("tool_hang-mh")  # robomimic has no multi-human tool_hang


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dataset", "none.hdf5"], "none.hdf5 does not exist; pass a Robomimic low-dim hdf5"),
        (["--dataset", "stuff.hdf5"], "has no 'data' group with an env_args attribute; it is not a robomimic dataset"),
        (["--dataset", "nostates.hdf5"], "data/demo_0 lacks 'states' or 'actions': nothing to replay"),
        (["--dataset", "LOW", "--out", "new.hdf5", "--size", "4"], "--size must be in 8..1024 pixels, got 4"),
        (
            ["--dataset", "LOW", "--out", "new.hdf5", "--cameras", "agentview", "nosuchcam"],
            "robosuite's Lift has no camera ['nosuchcam']",
        ),
        (["--dataset", "LOW", "--out", "OUT"], "exists; pass --overwrite to replace it"),
    ],
)
def test_renderer_refuses_bad_input_before_any_work(rendered, tmp_path, flags, message):
    with h5py.File(tmp_path / "stuff.hdf5", "w") as f:
        f.create_group("stuff")
    write(str(tmp_path / "nostates.hdf5"))
    flags = [{"LOW": rendered["low"], "OUT": rendered["out"]}.get(x, x) for x in flags]
    code, stdout, err = run_main(RENDER, flags, tmp_path)
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert sorted(os.listdir(tmp_path)) == ["nostates.hdf5", "stuff.hdf5"]  # nothing written


def test_transport_and_tool_hang_build_from_robomimic_env_args():
    gen = load_script("generate_robomimic_dataset")
    args = gen.make_env_args("lift", 400)
    args["env_kwargs"].pop("horizon")
    transport = {
        **args,
        "env_name": "TwoArmTransport",
        "env_kwargs": {**args["env_kwargs"], "robots": ["Panda", "Panda"], "env_configuration": "single-arm-opposed"},
    }
    env = robomimic_tasks.RobomimicEnv("transport-ph", transport)  # the 1.4 controller dict, refactored per arm
    assert env.action_space.shape == (14,) and env.max_episode_steps == 800
    assert env.observation_space.shape == (2 * LOW + 41,)  # robot0, robot1, object
    obs, *_ = env.step(np.full(14, 0.5))
    assert np.isfinite(obs).all()
    tool_hang = robomimic_tasks.RobomimicEnv("tool_hang-ph-image", {**args, "env_name": "ToolHang"})
    assert tool_hang.image_layout["cameras"] == ["sideview", "robot0_eye_in_hand"]
    assert tool_hang.observation_space.shape == (LOW + 2 * 240 * 240 * 3,) and tool_hang.max_episode_steps == 700
