"""Parity of dbp_bc.py and dbpo_ppo.py with the authors' DBPO code (GitHub YuxuanGao0822/DBPO, 19413f2), against the
reference values it produced (tests/data/README.md: dbp_reference.npz, dbpo_loss_reference.npz). CPU, float32, seconds;
the authors' code is not needed. Their parameter names are mapped onto ours here (one table, `ours()`)."""

import os
import re

import numpy as np
import pytest
import torch

import dbp_bc
import dbpo_ppo

DATA = os.path.join(os.path.dirname(__file__), "data")
RTOL = 1e-5  # relative, float32 (tests/data/README.md)


@pytest.fixture(autouse=True)
def one_thread():
    """The tolerances hold for one thread (as tests/data/README.md states): with more, torch sums the batch in
    another order, and the largest DBPO gradient moved by 5e-5 of its size in a 2-thread run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ref():
    with np.load(os.path.join(DATA, "dbp_reference.npz")) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def ppo_ref():
    with np.load(os.path.join(DATA, "dbpo_loss_reference.npz")) as f:
        return {k: f[k] for k in f.files}


def close(ours, theirs, rtol=RTOL, atol=0.0):
    """|ours - theirs| <= atol + rtol * max|theirs| (relative to the array's scale, float32 round-off)."""
    ours, theirs = np.asarray(torch.as_tensor(ours).detach(), np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape
    err, scale = np.abs(ours - theirs).max(initial=0.0), np.abs(theirs).max(initial=0.0)
    assert err <= atol + rtol * scale, f"max error {err:.3g} at scale {scale:.3g}"


# their DBPUNet1D names -> our UNetGenerator names
NAME_MAP = [
    (r"^down_modules\.", "down."),
    (r"^up_modules\.", "up."),
    (r"^mid_modules\.", "mid."),
    (r"^final_conv\.", "final."),
    (r"\.blocks\.0\.", ".conv1."),
    (r"\.blocks\.1\.", ".conv2."),
    (r"\.cond_encoder\.", ".film."),
    (r"\.residual_conv\.", ".skip."),
    (r"\.2\.conv\.", ".2."),
]


def ours(name: str) -> str:
    for pattern, repl in NAME_MAP:
        name = re.sub(pattern, repl, name)
    return name


def reference_unet(ref) -> dbp_bc.UNetGenerator:
    obs_dim, act_dim, To, Tp = (int(v) for v in ref["config/shapes"][:4])
    gen = dbp_bc.UNetGenerator(obs_dim, act_dim, To, Tp, down_dims=(8, 16), kernel_size=5, n_groups=8)
    theirs = {ours(k[len("unet/") :]): torch.as_tensor(v) for k, v in ref.items() if k.startswith("unet/")}
    gen.load_state_dict(theirs)  # strict: every parameter has its counterpart, and the shapes agree
    return gen


def robomimic_stats(ref):
    return dbp_bc.compute_normalization(ref["data/obs"], ref["data/action"], robomimic=True)


def normalize(x, stats, name):
    return (torch.as_tensor(x) - stats[f"{name}_offset"]) / stats[f"{name}_scale"]


def test_unet_forward_parity_with_reference(ref):
    """Their state dict loads into our U-Net (names mapped, shapes equal) and gives their output on their z and cond."""
    gen = reference_unet(ref)
    To, obs_dim = int(ref["config/shapes"][2]), int(ref["config/shapes"][0])
    cond = torch.as_tensor(ref["forward/global_cond"]).view(-1, To, obs_dim)  # flatten(obs_hist) = their global_cond
    out = gen(cond, torch.as_tensor(ref["forward/z"]))
    close(out, ref["forward/output"])
    # predict_action: normalized first To obs -> unnormalized chunk; `action` = the executed steps from To-1
    stats = robomimic_stats(ref)
    obs_hist = normalize(ref["batch/obs"][:, :To], stats, "obs")
    close(obs_hist.flatten(1), ref["forward/global_cond"])
    policy = dbp_bc.Policy(gen, stats, -np.ones(3), np.ones(3))
    chunk = policy(torch.as_tensor(ref["batch/obs"][:, :To]), torch.as_tensor(ref["forward/z"]))
    close(chunk, np.clip(ref["forward/predict_action/action_pred"], -1, 1))  # ours clips to the env's bounds
    close(chunk[:, To - 1 : To - 1 + 4], np.clip(ref["forward/predict_action/action"], -1, 1))


@pytest.mark.parametrize("mode", ["chunk", "step"])
def test_dbp_loss_and_gradient_parity_with_reference(ref, mode):
    """Our compute_loss on their batch with their noise: the loss, the hypotheses and d loss / d params."""
    gen, stats = reference_unet(ref), robomimic_stats(ref)
    To, G = int(ref["config/shapes"][2]), int(ref["config/gen_per_label"])
    obs_hist = normalize(ref["batch/obs"][:, :To], stats, "obs")  # their condition: the first To observations
    chunk = normalize(ref["batch/action"], stats, "action")
    noise = torch.as_tensor(ref[f"{mode}/noise"])
    x = gen(obs_hist.repeat_interleave(G, dim=0), noise).view(*ref[f"{mode}/pred"].shape)
    close(x, ref[f"{mode}/pred"])
    loss, info = dbp_bc.compute_loss(
        gen,
        obs_hist,
        chunk,
        "drift",
        G,
        mode,
        "official",
        tuple(float(t) for t in ref["config/temperatures"]),
        noise=noise,
    )
    close(loss, ref[f"{mode}/loss"])
    if mode == "chunk":  # one drifting space: its scale is theirs (step mode: the mean over the Tp spaces). 1e-4: the
        # self distances sqrt(max(|x|^2 + |x|^2 - 2 x.x, 1e-8)) are float32 cancellation noise (einsum vs matmul order)
        close(info["scale"], ref["chunk/metrics/global_scale"], rtol=1e-4)
    loss.backward()
    grads = {ours(k[len(f"{mode}/grad/") :]): v for k, v in ref.items() if k.startswith(f"{mode}/grad/")}
    assert set(grads) == {n for n, _ in gen.named_parameters()}
    gmax = max(
        np.abs(g).max() for g in grads.values()
    )  # (biases before a GroupNorm have ~0 gradients: an absolute scale)
    for name, p in gen.named_parameters():  # measured: 2e-5 (chunk, through the scale above), 3e-6 (step) of gmax
        close(p.grad, grads[name], rtol=0, atol=1e-4 * gmax)


def test_robomimic_normalizer_parity_with_reference(ref):
    """Their Robomimic low-dim normalizer: obs * (1 / max|obs|) with ONE number for every dimension, actions unscaled."""
    stats = robomimic_stats(ref)
    p = "robomimic_normalizer/params_dict"
    close(1 / stats["obs_scale"], ref[f"{p}.obs.scale"])  # theirs: x_n = x * scale + offset; ours: (x - offset) / scale
    close(stats["obs_offset"], ref[f"{p}.obs.offset"], atol=0)
    assert len(set(stats["obs_scale"].tolist())) == 1
    close(stats["action_scale"], ref[f"{p}.action.scale"], rtol=0)
    close(stats["action_offset"], ref[f"{p}.action.offset"], rtol=0)
    close(normalize(ref["data/obs"], stats, "obs"), ref["robomimic_normalizer/obs_normalized"])
    close(normalize(ref["data/action"], stats, "action"), ref["robomimic_normalizer/action_normalized"], rtol=0)


def test_pusht_limits_normalizer_parity_with_reference(ref):
    """Their LinearNormalizer "limits" (PushT, D4RL): per-dimension min-max to [-1, 1], and its inverse."""
    obs, action = ref["pusht_normalizer/obs"], ref["data/pusht_action"]
    stats = dbp_bc.compute_normalization(obs, action)
    p = "pusht_normalizer/params_dict"
    for name, x in (("obs", obs), ("action", action)):
        close(1 / stats[f"{name}_scale"], ref[f"{p}.{name}.scale"])
        close(-stats[f"{name}_offset"] / stats[f"{name}_scale"], ref[f"{p}.{name}.offset"])
        close(normalize(x, stats, name), ref[f"pusht_normalizer/{name}_normalized"], atol=1e-6)
    a_n = torch.as_tensor(ref["pusht_normalizer/action_normalized"])
    close(a_n * stats["action_scale"] + stats["action_offset"], ref["pusht_normalizer/action_unnormalized_roundtrip"])


# ---------------------------------------------------------------- DBPO: the PPO loss terms and the rollout buffer
def state(ppo_ref, prefix, rename=ours):
    return {rename(k[len(prefix) :]): torch.as_tensor(v) for k, v in ppo_ref.items() if k.startswith(prefix)}


def reference_agent(ppo_ref):
    """Our DBPOAgent holding their actor_old (anchor), actor_ft (generator, log-std head, trained normalizer), critic."""
    obs_dim, act_dim, To, Tp, Ta = (int(v) for v in ppo_ref["config/shapes"][:5])
    p = "actor_old/normalizer.params_dict"  # theirs x * scale + offset = ours (x - offset') / scale'
    kwargs = dict(
        obs_dim=obs_dim,
        action_dim=act_dim,
        obs_horizon=To,
        pred_horizon=Tp,
        down_dims=(8, 16),
        kernel_size=5,
        n_groups=8,
    )
    ckpt = {
        "obs_horizon": To,
        "pred_horizon": Tp,
        "action_horizon": Ta,
        "obs_dim": obs_dim,
        "action_dim": act_dim,
        "loss": "drift",
        "action_low": -np.ones(act_dim),
        "action_high": np.ones(act_dim),  # their act_min, act_max
        **{
            f"{k}_{n}": v
            for k in ("obs", "action")
            for n, v in (
                ("scale", 1 / ppo_ref[f"{p}.{k}.scale"]),
                ("offset", -ppo_ref[f"{p}.{k}.offset"] / ppo_ref[f"{p}.{k}.scale"]),
            )
        },
    }
    gens = [dbp_bc.UNetGenerator(**kwargs) for _ in range(2)]
    gens[0].load_state_dict(state(ppo_ref, "actor_ft/policy.model."))
    gens[1].load_state_dict(state(ppo_ref, "actor_old/model."))
    agent = dbpo_ppo.DBPOAgent(ckpt, gens[0], gens[1])
    hidden = [int(h) for h in ppo_ref["config/critic_hidden_dims"]]  # theirs is smaller than our 3 x 256 here
    dims = [To * obs_dim, *hidden]
    agent.critic = torch.nn.Sequential(
        *[m for i, o in zip(dims[:-1], dims[1:]) for m in (torch.nn.Linear(i, o), torch.nn.Mish())],
        torch.nn.Linear(dims[-1], 1),
    )
    agent.critic.load_state_dict(state(ppo_ref, "critic/net.", str))
    agent.log_std_head.load_state_dict(state(ppo_ref, "actor_ft/logstd_head.proj.", str))
    ft = "actor_ft/policy.normalizer.params_dict"
    with torch.no_grad():
        for k in ("obs", "action"):
            getattr(agent, f"{k}_gain").copy_(torch.as_tensor(ppo_ref[f"{ft}.{k}.scale"]))
            getattr(agent, f"{k}_bias").copy_(torch.as_tensor(ppo_ref[f"{ft}.{k}.offset"]))
    # their `state` is what their env wrapper hands over, already normalized to [-1, 1]; ours normalizes the raw
    # observation for the critic itself, so here the critic's normalizer is the identity
    agent.critic_obs_offset.zero_(), agent.critic_obs_scale.fill_(1.0)
    agent.obs_horizon = 1  # their log-prob prefix is A[:Ta] (= ours A[To-1 : To-1+Ta] at To = 1, their task configs)
    return agent


def reference_loss(ppo_ref):
    agent = reference_agent(ppo_ref)
    b = {
        k: torch.as_tensor(ppo_ref[f"batch/{k}"])
        for k in ("state", "chains", "returns", "oldvalues", "advantages", "oldlogprobs")
    }
    obs, z, chunk = b["state"], b["chains"][:, 0], b["chains"][:, 1]  # raw obs, the stored latent and action chunk
    loss, info = dbpo_ppo.dbpo_loss(
        agent, obs, z, chunk, b["oldlogprobs"], b["advantages"], b["returns"], b["oldvalues"], dbpo_ppo.Args()
    )  # the defaults: clip 0.02, ent 0.01, vf 0.5, anchor 1, logprob_min -2
    return agent, obs, z, chunk, loss, info


def test_dbpo_distribution_and_log_prob_parity_with_reference(ppo_ref):
    """mu and std of the fine-tuned actor on the stored latent, the normalized prefix log-prob, entropy, anchor means."""
    agent, obs, z, chunk, _, _ = reference_loss(ppo_ref)
    mu, std = agent.dist_params(obs, z)
    close(mu, ppo_ref["loss/mean"])
    close(mu, ppo_ref["loss/new_actions"])
    close(std, ppo_ref["loss/std"])
    close(agent.anchor_mean(obs, z), ppo_ref["loss/old_actions"])
    close(
        dbpo_ppo.prefix_log_prob(mu, std, chunk, 1, 4), ppo_ref["loss/newlogprobs_raw"]
    )  # sum over Ta x Da / (Ta * Da)
    close(dbpo_ppo.prefix_entropy(std, 1, 4), ppo_ref["loss/entropy"])
    close(agent.get_value(obs), ppo_ref["loss/newvalues"])


def test_dbpo_loss_terms_and_gradients_parity_with_reference(ppo_ref):
    """The clamped ratio, the clipped surrogate, value loss, entropy, anchor, their sum and d total / d params."""
    agent, _, _, _, loss, info = reference_loss(ppo_ref)
    close(info["ratio"], ppo_ref["loss/ratio"])  # both log-probs clamped at -2 first (chunks 0 and 1 bind)
    for ours_key, theirs, sign in (
        ("policy_loss", "pg_loss", 1),
        ("value_loss", "v_loss", 1),
        ("entropy", "entropy_loss", -1),
        ("approx_kl", "approx_kl", 1),
        ("clipfrac", "clipfrac", 1),
        ("loss", "total", 1),
    ):
        close(sign * info[ours_key], ppo_ref[f"loss/{theirs}"])
    close(info["anchor_loss"], ppo_ref["loss/anchor_loss"], rtol=1e-4)  # 2.4e-5: the mean square of a small difference
    close(info["std"], ppo_ref["loss/noise_std"])
    loss.backward()
    theirs = {
        **{f"generator.{ours(k)}": v for k, v in state(ppo_ref, "grad/actor_ft/policy.model.", str).items()},
        **{f"log_std_head.{k}": v for k, v in state(ppo_ref, "grad/actor_ft/logstd_head.proj.", str).items()},
        **{f"critic.{k}": v for k, v in state(ppo_ref, "grad/critic/net.", str).items()},
        **{
            f"{k}_{n}": torch.as_tensor(ppo_ref[f"grad/actor_ft/policy.normalizer.params_dict.{k}.{t}"])
            for k in ("obs", "action")
            for n, t in (("gain", "scale"), ("bias", "offset"))
        },
    }
    trained = {n: p for n, p in agent.named_parameters() if p.requires_grad}  # the anchor is frozen
    assert set(trained) == set(theirs)  # the normalizer is trained, as theirs (no --freeze-normalizer)
    gmax = max(g.abs().max().item() for g in theirs.values())
    for name, p in trained.items():
        close(p.grad, theirs[name], rtol=0, atol=1e-5 * gmax)


def test_rollout_buffer_reward_scaling_and_gae_parity_with_reference(ppo_ref):
    """rewards / (population std + 1e-8), no mean subtraction; GAE masks with 1 - terminated only (their buffer);
    the last next value is the critic on the final observation."""
    b = {k: ppo_ref[f"buffer/{k}"].astype(np.float64) for k in ("rewards", "terminated", "values", "last_values")}
    scaled = dbpo_ppo.rollout_std_scaling(b["rewards"])
    close(scaled, ppo_ref["buffer/rewards_scaled"])
    agent = reference_agent(ppo_ref)
    close(agent.get_value(torch.as_tensor(ppo_ref["buffer/last_state"])), b["last_values"])
    gamma, lam = (float(v) for v in ppo_ref["buffer/gamma_lambda_scale"][:2])
    # a truncation without termination (env 2 at step 3) bootstraps from the next slot's value, as their buffer does
    adv, ret = dbpo_ppo.compute_gae(
        torch.as_tensor(scaled), *(torch.as_tensor(b[k]) for k in ("values", "terminated", "last_values")), gamma, lam
    )
    close(adv, ppo_ref["buffer/advantages"])
    close(ret, ppo_ref["buffer/returns"])
