"""dbp_bc.py and dbpo_ppo.py on an image env (lift-mh-image): the pixels' normalization in training equals the deployed
policy's, the checkpoint rebuilds its encoder, --eval-only reproduces the run's final evaluation, --resume continues
as an uninterrupted run, DBPO fine-tunes the image checkpoint (its critic reads the low-dim part only, its mean is a
function of (s, z)), and the refusals are one line.

One tiny file serves every run: 2 scripted lift episodes of 20 steps rendered at 16x16
(scripts/render_robomimic_images.py), tiny MLP backbones, evaluation episodes of 8 steps. The two ResNet-18s make each
policy snapshot about 90 MB.
"""

import importlib.util
import json
import os
import sys
from types import SimpleNamespace

import gymnasium as gym
import h5py
import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from inprocess import run_main  # noqa: E402
from test_dbp import EVAL_RE, run  # noqa: E402  (dbp_bc.py in a subprocess; its evaluation line)

import dbp_bc  # noqa: E402
import dbpo_ppo  # noqa: E402
import envs  # noqa: E402
import runs  # noqa: E402

DBP, DBPO = (os.path.join(ROOT, f) for f in ("dbp_bc.py", "dbpo_ppo.py"))
SIZE = 16  # pixels per side: 9 low-dim values + 2 cameras x 16 x 16 x 3 = 1545 observation values
TINY = [
    "--env",
    "lift-mh-image",
    "--backbone",
    "mlp",
    "--hidden-dim",
    "32",
    "--num-layers",
    "2",
    "--batch-size",
    "4",
    "--warmup-epochs",
    "0",
    "--ema-start-epoch",
    "0",
    "--ema-every",
    "1",
    "--lr",
    "1e-3",
    "--eval-interval",
    "0",
    "--save-interval",
    "0",
    "--keep-checkpoints",
    "1",
    "--log-interval",
    "2",
    "--eval-episodes",
    "1",
    "--eval-envs",
    "1",
    "--max-episode-steps",
    "8",
    "--num-threads",
    "1",
    "--no-cuda",
]


def leave(code, *resources, track=False):
    """runs.leave without its os._exit, so that a run can finish inside the test process."""
    for r in resources:
        r.close()
    raise SystemExit(code)


def run_here(script, argv, cwd) -> str:
    """A run of `script` in this process (no second import of torch and robosuite): its stdout."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(runs, "leave", leave)
        code, out, err = run_main(script, argv, cwd)
    assert code == 0, out[-2000:] + err[-3000:]
    return out


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(low-dim file, its 16x16 rendering): 2 noise-free scripted lift episodes of 20 steps, made in this process. The
    rendering's env resets softly (hard_reset False, as Diffusion Policy's runner): no new MuJoCo context per reset."""
    folder = tmp_path_factory.mktemp("lift")
    low, image = str(folder / "low_dim.hdf5"), str(folder / "image.hdf5")
    gen = load_script("generate_robomimic_dataset")
    gen.init_worker(dict(task="lift", kind="mh", length=20, seed=0, noise=0.0))
    gen.write_hdf5(low, [gen.run_episode(i) for i in range(2)], gen.make_env_args("lift", 20))
    load_script("render_robomimic_images").render_file(low, image, size=SIZE)
    with h5py.File(image, "a") as f:
        env_args = json.loads(f["data"].attrs["env_args"])
        env_args["env_kwargs"]["hard_reset"] = False
        f["data"].attrs["env_args"] = json.dumps(env_args)
    return low, image


@pytest.fixture(scope="module")
def trained(files, tmp_path_factory):
    """A 4-step run in a real process (its final checkpoint and stdout), and in this process a 2-step run of the same
    flags, resumed to 4 steps."""
    cwd = tmp_path_factory.mktemp("runs")
    flags = [*TINY, "--dataset-path", files[1], "--runs-dir", str(cwd)]
    straight = run([*flags, "--total-steps", "4", "--run-name", "straight"], cwd)
    run_here(DBP, [*flags, "--total-steps", "2", "--run-name", "resumed"], cwd)
    resumed = run_here(DBP, [*flags, "--total-steps", "4", "--resume", str(cwd / "resumed" / "dbp_bc.pt")], cwd)
    return SimpleNamespace(cwd=cwd, stdout=straight.stdout, resumed_stdout=resumed)


def test_batches_normalize_pixels_as_the_deployed_policy(files, monkeypatch):
    """batch() builds [B, To, O] from the low-dim part and the uint8 images; Policy's (obs - offset) / scale on the
    env's flat observation (low-dim, then each camera HWC) gives the same numbers."""
    data, ends, env_args = envs.load_robomimic("lift-mh-image", files[1])
    layout = env_args["image_layout"]
    assert data["images"].dtype == np.uint8 and data["images"].shape[1:] == (2, SIZE, SIZE, 3)
    env = SimpleNamespace(action_space=gym.spaces.Box(-1, 1, (7,)))  # no robosuite env: only its action bounds
    monkeypatch.setattr(envs, "load_dataset", lambda *a, **k: (env, data, ends, env_args))
    args = dbp_bc.Args(env="lift-mh-image", dataset_path=files[1], obs_horizon=2, pred_horizon=4, action_horizon=2)
    assert all(ok for ok, _ in dbp_bc.rules(args))
    run_ = dbp_bc.Run(args, torch.device("cpu"), None, "lift-mh-image", None, "", "")
    dbp_bc.load_data(run_)
    assert run_.layout == layout and torch.is_tensor(run_.images) and run_.images.dtype == torch.uint8
    stats = run_.stats
    assert torch.equal(stats["obs_offset"][9:], torch.full((2 * SIZE * SIZE * 3,), 127.5))
    assert torch.equal(stats["obs_scale"][9:], torch.full((2 * SIZE * SIZE * 3,), 127.5))
    # the authors' image configs: quaternion dims and actions as they are, positions and gripper min-max
    quat = slice(3, 7)
    assert torch.equal(stats["obs_offset"][quat], torch.zeros(4)) and torch.equal(
        stats["obs_scale"][quat], torch.ones(4)
    )
    assert torch.equal(stats["action_scale"], torch.ones(7)) and torch.equal(stats["action_offset"], torch.zeros(7))
    pos = data["observations"][:, :3]  # the end effector moves: min-max to [-1, 1]
    assert np.allclose(stats["obs_offset"][:3], (pos.max(0) + pos.min(0)) / 2, atol=1e-6)
    assert np.allclose(stats["obs_scale"][:3], (pos.max(0) - pos.min(0)) / 2, atol=1e-6)
    rows = torch.arange(0, len(run_.train), 7)
    obs_hist, _ = dbp_bc.batch(run_, run_.train[rows])  # [B, To, O]
    obs_idx, _ = dbp_bc.chunk_indices(*run_.samples[:, run_.train[rows]], 2, 4)  # [B, To]
    flat = np.concatenate([data["observations"], data["images"].reshape(len(data["images"]), -1)], axis=1)  # [N, O]
    expected = (torch.as_tensor(flat[obs_idx.numpy()]) - stats["obs_offset"]) / stats["obs_scale"]
    torch.testing.assert_close(obs_hist, expected, rtol=0, atol=1e-6)
    assert obs_hist[..., 9:].min() >= -1 and obs_hist[..., 9:].max() <= 1


def test_train_eval_only_reproduces_and_resume_continues(trained):
    ckpt = torch.load(trained.cwd / "straight" / "dbp_bc.pt", weights_only=False)
    kwargs = ckpt["generator_kwargs"]
    assert ckpt["env_id"] == "lift-mh-image" and ckpt["obs_dim"] == kwargs["obs_dim"] == 9 + 2 * SIZE * SIZE * 3
    assert kwargs["image_encoder"] == "resnet18" and kwargs["image_layout"]["cameras"] == [
        "agentview",
        "robot0_eye_in_hand",
    ]
    assert json.loads(ckpt["env_args"])["image_layout"] == kwargs["image_layout"]
    assert ckpt["max_episode_steps"] == 8 and (ckpt["obs_horizon"], ckpt["pred_horizon"]) == (1, 4)  # the image preset
    policy = dbp_bc.load_policy(ckpt)  # the encoder is rebuilt from the checkpoint alone
    assert isinstance(policy.gen, dbp_bc.EncodedGenerator) and policy.gen.encoder.kind == "resnet18"
    # --eval-only on the final snapshot reproduces the run's final evaluation, line for line
    final = EVAL_RE.findall(trained.stdout)[-1]
    snapshot = str(trained.cwd / "straight" / "dbp_bc_4.pt")
    out = run_here(DBP, ["--eval-only", "--checkpoint", snapshot, "--eval-episodes", "1", "--no-cuda"], trained.cwd)
    assert EVAL_RE.findall(out)[-1] == final, out
    # 2 steps + 2 resumed steps == 4 straight steps, bit for bit (encoder and backbone, EMA and trained weights)
    assert "resuming resumed at step 2" in trained.resumed_stdout
    other = torch.load(trained.cwd / "resumed" / "dbp_bc.pt", weights_only=False)
    for key in ("model", "train_model"):
        assert ckpt[key].keys() == other[key].keys() and any(k.startswith("encoder.") for k in ckpt[key])
        assert all(torch.equal(ckpt[key][k], other[key][k]) for k in ckpt[key]), key
    assert EVAL_RE.findall(trained.resumed_stdout)[-1] == final


def test_dbpo_fine_tunes_the_image_checkpoint(trained):
    ckpt_path = str(trained.cwd / "straight" / "dbp_bc.pt")
    flags = ["--checkpoint", ckpt_path, "--num-iterations", "2", "--num-envs", "1", "--num-steps", "2"]
    flags += ["--minibatch-size", "4", "--update-epochs", "1", "--critic-warmup-iters", "0", "--eval-episodes", "1"]
    flags += ["--eval-envs", "1", "--num-threads", "1", "--no-cuda", "--run-name", "dbpo", "--runs-dir", "runs"]
    out = run_here(DBPO, flags, trained.cwd)
    assert "iter 1/2" in out and "actor+critic" in out and out.splitlines()[-1].startswith("final: 2")
    model = torch.load(trained.cwd / "runs" / "dbpo" / "dbpo_ppo.pt", weights_only=False)
    original = torch.load(ckpt_path, weights_only=False)["model"]
    changed = [k for k in original if not torch.equal(model["model"][k], original[k])]
    assert any(k.startswith("encoder.") for k in changed)  # the actor fine-tunes its encoder too
    assert all(torch.equal(model["anchor_model"][k], original[k]) for k in original)  # the anchor stays
    # the fine-tuned model is a dbp-v1 checkpoint again: dbp_bc.py evaluates it
    policy = dbp_bc.load_policy(model)
    assert isinstance(policy.gen, dbp_bc.EncodedGenerator)


def test_dbpo_critic_reads_low_dim_state_and_the_mean_is_a_function_of_s_and_z():
    """The critic sees the 9 low-dim values (the authors' critic reads low-dim state), the log-std head the encoder's
    features (their cond embedding), and with Diffusion Policy's random crops the actor's mean is still a function of
    (s, z): its generator is in eval mode (a fixed center crop), so the PPO ratio is exact."""
    # 64 x 64 images: the trunk's feature map (2 x 2) moves with the crop
    layout = {"low_dim_keys": ["robot0_eef_pos"], "low_dim": 3, "cameras": ["agentview"], "height": 64, "width": 64}
    obs_dim, To = 3 + 64 * 64 * 3, 2
    kwargs = dict(obs_dim=obs_dim, action_dim=2, obs_horizon=To, pred_horizon=4, hidden_dim=16, num_layers=1)
    gens = [dbp_bc.make_generator("mlp", image_layout=layout, image_encoder="spatial-softmax", **kwargs) for _ in "ab"]
    ckpt = {
        "obs_horizon": To,
        "pred_horizon": 4,
        "action_horizon": 2,
        "obs_dim": obs_dim,
        "action_dim": 2,
        "generator_kwargs": {**kwargs, "image_layout": layout},
        "obs_offset": np.r_[np.zeros(3), np.full(obs_dim - 3, 127.5)],
        "obs_scale": np.r_[np.ones(3), np.full(obs_dim - 3, 127.5)],
        "action_offset": np.zeros(2),
        "action_scale": np.ones(2),
        "action_low": -np.ones(2),
        "action_high": np.ones(2),
    }
    agent = dbpo_ppo.DBPOAgent(ckpt, *gens)
    assert agent.critic[0].in_features == To * 3
    assert agent.log_std_head.in_features == To * (3 + 128) == gens[0].cond_dim
    torch.manual_seed(0)
    obs = torch.cat([torch.randn(5, To, 3), torch.randint(0, 256, (5, To, obs_dim - 3)).float()], dim=-1)  # raw
    repainted = obs.clone()
    repainted[..., 3:] = 255 - repainted[..., 3:]
    torch.testing.assert_close(agent.get_value(obs), agent.get_value(repainted), rtol=0, atol=0)
    z = torch.randn(5, 4, 2)
    mu, std = agent.dist_params(obs, z)
    assert torch.equal(mu, agent.dist_params(obs, z)[0]) and torch.equal(std, agent.dist_params(obs, z)[1])
    gens[0].train()  # in training mode the same encoder crops at random: the mean would move between calls
    torch.manual_seed(1)
    assert not torch.equal(gens[0](obs, z), gens[0](obs, z))


def test_refusals_one_line(files, trained, tmp_path):
    """A low-dim file for an image id, --resume with another encoder, an image checkpoint whose encoder cannot be
    built: one `error:` line each, exit 2."""
    cases = [
        (DBP, [*TINY, "--dataset-path", files[0], "--total-steps", "2"], "holds no images"),
        (
            DBP,
            [*TINY, "--dataset-path", files[1], "--total-steps", "4", "--image-encoder", "spatial-softmax", "--resume"]
            + [str(trained.cwd / "resumed" / "dbp_bc.pt")],
            "image_encoder",
        ),
    ]
    bad = torch.load(trained.cwd / "straight" / "dbp_bc_4.pt", weights_only=False)
    bad["generator_kwargs"]["image_encoder"] = "vit"
    torch.save(bad, tmp_path / "bad.pt")
    dbpo = ["--checkpoint", str(tmp_path / "bad.pt"), "--eval-episodes", "1", "--eval-envs", "1", "--no-cuda"]
    cases.append((DBPO, dbpo, "make no generator"))
    for script, argv, needle in cases:
        code, out, err = run_main(script, argv, tmp_path)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], (argv, err)
    assert sorted(os.listdir(tmp_path)) == ["bad.pt"]  # nothing written
