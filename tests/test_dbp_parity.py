"""Parity of dbp_bc.py and dbpo_ppo.py with the authors' DBPO code (GitHub YuxuanGao0822/DBPO, 19413f2), against the
reference values it produced (tests/data/README.md: dbp_reference.npz, dbpo_loss_reference.npz). CPU, float32, seconds;
the authors' code is not needed. Their parameter names are mapped onto ours here (one table, `ours()`)."""

import itertools
import math
import os
import re

import numpy as np
import pytest
import torch

import dbp_bc
import dbpo_ppo

DATA = os.path.join(os.path.dirname(__file__), "data")

# ---- Tolerances: float32 round-off of the operands, propagated to each checked value (tests/data/README.md). Both
# sides compute in float32 with their own kernels (summation order, threads, SIMD width), so neither is exact.
U = 2.0**-24  # float32 unit round-off
LAM = 5.0  # confidence of the probabilistic bound below: exceeded with probability <= 2 exp(-LAM^2 / 2) = 7.5e-6


def rel_err(*lengths: int) -> float:
    """One side's relative round-off of a value computed through accumulations of these lengths (a dot product of
    n terms, a layer's fan-in): the m = sum(lengths) rounding factors (1 + d), |d| <= u, on its path multiply to
    within LAM sqrt(m) u of 1 (Higham & Mary 2019's probabilistic analysis; the worst case is m u)."""
    return LAM * math.sqrt(sum(lengths)) * U


def bound(scale: float, *lengths: int, cond: float = 1.0) -> float:
    """|ours - reference| of a value whose operands sit at magnitude `scale`: both sides round (x 2) and `cond`
    carries the operands' relative error to the value (d log value / d log operand, or an amplification)."""
    return 2 * cond * scale * rel_err(*lengths)


def amax(x) -> float:
    return float(np.abs(np.asarray(torch.as_tensor(x).detach(), np.float64)).max(initial=0.0))


def fan_ins(net: torch.nn.Module) -> list[int]:
    """The accumulation length of every weight layer of `net` (input channels x kernel, or in_features)."""
    return [w[0].numel() for w in net.parameters() if w.dim() > 1]


@pytest.fixture(scope="module")
def ref():
    with np.load(os.path.join(DATA, "dbp_reference.npz")) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def ppo_ref():
    with np.load(os.path.join(DATA, "dbpo_loss_reference.npz")) as f:
        return {k: f[k] for k in f.files}


def close(ours, theirs, tol):
    """max |ours - theirs| <= tol (absolute; elementwise when tol is an array), tol from bound()."""
    ours, theirs = np.asarray(torch.as_tensor(ours).detach(), np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape
    err = np.abs(ours - theirs)
    assert (err <= tol).all(), f"max error {err.max(initial=0.0):.3g} against a bound of {np.min(tol):.3g}"


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
    unet = fan_ins(gen)  # the output's path: every conv / linear layer (GroupNorm keeps activations at O(1))
    close(out, ref["forward/output"], bound(amax(ref["forward/output"]), *unet))
    # predict_action: normalized first To obs -> unnormalized chunk; `action` = the executed steps from To-1
    stats = robomimic_stats(ref)
    obs_hist = normalize(ref["batch/obs"][:, :To], stats, "obs")
    cond_ref = ref["forward/global_cond"]
    close(obs_hist.flatten(1), cond_ref, bound(amax(cond_ref), 2))  # (x - offset) / scale vs x * (1/m): 2 roundings
    policy = dbp_bc.Policy(gen, stats, -np.ones(3), np.ones(3))
    chunk = policy(torch.as_tensor(ref["batch/obs"][:, :To]), torch.as_tensor(ref["forward/z"]))
    pred = np.clip(ref["forward/predict_action/action_pred"], -1, 1)  # ours clips to the env's bounds
    tol = bound(amax(pred), *unet, 2, 2)  # normalize obs, U-Net, unnormalize
    close(chunk, pred, tol)
    close(chunk[:, To - 1 : To - 1 + 4], np.clip(ref["forward/predict_action/action"], -1, 1), tol)


@pytest.mark.parametrize("mode", ["chunk", "step"])
def test_dbp_loss_and_gradient_parity_with_reference(ref, mode):
    """Our compute_loss on their batch with their noise: the loss, the hypotheses and d loss / d params."""
    gen, stats = reference_unet(ref), robomimic_stats(ref)
    To, G = int(ref["config/shapes"][2]), int(ref["config/gen_per_label"])
    obs_hist = normalize(ref["batch/obs"][:, :To], stats, "obs")  # their condition: the first To observations
    chunk = normalize(ref["batch/action"], stats, "action")
    noise = torch.as_tensor(ref[f"{mode}/noise"])
    x = gen(obs_hist.repeat_interleave(G, dim=0), noise).view(*ref[f"{mode}/pred"].shape)
    unet, x_max = [2, *fan_ins(gen)], amax(ref[f"{mode}/pred"])  # the normalized obs, then the U-Net
    close(x, ref[f"{mode}/pred"], bound(x_max, *unet))
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
    # The drift scale s: the mean distance over the Cg x Ctot pairs of a drifting space (x over D = Tp * da or da
    # numbers). Distances between distinct samples carry x's round-off; the Cg self pairs of each row, 1 / Ctot of
    # them, are sqrt(max(|x|^2 + |x|^2 - 2 x.x, 1e-8)) of a cancellation that leaves only round-off of |x|^2 terms,
    # |r| <= 4 |x|^2 rel_err(D), so each differs between the sides by up to 2 |x| sqrt(rel_err(D)).
    D = x[0, 0].numel() if mode == "chunk" else x.shape[-1]
    x_norm = float(torch.linalg.vector_norm(x.detach().flatten(2) if mode == "chunk" else x.detach(), dim=-1).max())
    s = float(ref[f"{mode}/metrics/global_scale"])
    ds = bound(s, *unet, D) + 2 * x_norm * math.sqrt(rel_err(D)) / (G + 1)  # Ctot = G generated + 1 positive
    # The loss is the mean squared normalized force; its sensitivity to x and to s, estimated in float64 on these
    # inputs by random relative perturbations, is d log L / d log x <= 0.2 and d log L / d log s <= 0.12: cond 1.
    loss_ref = float(ref[f"{mode}/loss"])
    close(loss, loss_ref, bound(loss_ref, *unet, D) + loss_ref * ds / s)
    if mode == "chunk":  # one drifting space: its scale is theirs (step mode: the mean over the Tp spaces)
        close(info["scale"], s, ds)
    loss.backward()
    grads = {ours(k[len(f"{mode}/grad/") :]): v for k, v in ref.items() if k.startswith(f"{mode}/grad/")}
    assert set(grads) == {n for n, _ in gen.named_parameters()}
    # d loss / d params: the forward path, the same layers backward, and the sum over the B G Tp positions of each
    # weight; operands at the scale of the largest gradient (biases before a GroupNorm have ~0 gradients, pure
    # round-off of that scale), plus the drift scale's relative error, which rescales the goal
    gmax, n_pos = max(amax(g) for g in grads.values()), int(np.prod(ref[f"{mode}/pred"].shape[:3]))
    tol = bound(gmax, *unet, *unet, n_pos, D) + gmax * ds / s
    for name, p in gen.named_parameters():
        close(p.grad, grads[name], tol)


def test_robomimic_normalizer_parity_with_reference(ref):
    """Their Robomimic low-dim normalizer: obs * (1 / max|obs|), ONE number for every dimension, actions unscaled."""
    stats = robomimic_stats(ref)
    p = "robomimic_normalizer/params_dict"
    # theirs: x_n = x * scale + offset; ours: (x - offset) / scale. A max is exact, 1 / max one rounding.
    close(1 / stats["obs_scale"], ref[f"{p}.obs.scale"], bound(amax(ref[f"{p}.obs.scale"]), 1))
    close(stats["obs_offset"], ref[f"{p}.obs.offset"], 0)  # zero on both sides
    assert len(set(stats["obs_scale"].tolist())) == 1
    close(stats["action_scale"], ref[f"{p}.action.scale"], 0)  # the identity, exactly
    close(stats["action_offset"], ref[f"{p}.action.offset"], 0)
    obs_n = ref["robomimic_normalizer/obs_normalized"]
    close(normalize(ref["data/obs"], stats, "obs"), obs_n, bound(amax(obs_n), 2))  # reciprocal, product
    close(normalize(ref["data/action"], stats, "action"), ref["robomimic_normalizer/action_normalized"], 0)


def test_pusht_limits_normalizer_parity_with_reference(ref):
    """Their LinearNormalizer "limits" (PushT, D4RL): per-dimension min-max to [-1, 1], and its inverse."""
    obs, action = ref["pusht_normalizer/obs"], ref["data/pusht_action"]
    stats = dbp_bc.compute_normalization(obs, action)
    p = "pusht_normalizer/params_dict"
    for name, x in (("obs", obs), ("action", action)):
        scale, offset = ref[f"{p}.{name}.scale"], ref[f"{p}.{name}.offset"]
        # scale = 2 / (max - min): 3 roundings; offset = -1 - min * scale: a difference of terms at 1 + |min| scale
        close(1 / stats[f"{name}_scale"], scale, bound(amax(scale), 3))
        operands = 1 + amax(x.min(0) * scale)
        close(-stats[f"{name}_offset"] / stats[f"{name}_scale"], offset, bound(operands, 5))
        # x * scale + offset: terms at |x| scale and |offset| (values near 0 cancel), 2 roundings after the above
        terms = amax(x * scale) + amax(offset)
        close(normalize(x, stats, name), ref[f"pusht_normalizer/{name}_normalized"], bound(terms, 5, 2))
    a_n = torch.as_tensor(ref["pusht_normalizer/action_normalized"])
    roundtrip = ref[
        "pusht_normalizer/action_unnormalized_roundtrip"
    ]  # (a_n - offset) / scale: terms at |a| + |offset'|
    terms = amax(roundtrip) + amax(stats["action_offset"])
    close(a_n * stats["action_scale"] + stats["action_offset"], roundtrip, bound(terms, 5, 2))


# ---------------------------------------------------------------- DBPO: the PPO loss terms and the rollout buffer
def state(ppo_ref, prefix, rename=ours):
    return {rename(k[len(prefix) :]): torch.as_tensor(v) for k, v in ppo_ref.items() if k.startswith(prefix)}


def env_action_map(ppo_ref):
    """(offset o, scale s) of our checkpoint's action normalizer u = (a - o) / s for the reference. Ours keeps the
    Gaussian, its clamp and the anchor in u, theirs in their dataset units (D4RL-style data already in [-1, 1], mapped
    to env units by their env wrapper): so u = their dataset units, and (o, s) is that env wrapper's map, which the
    reference (no env) leaves free. Taken non-identity, actor_old's action (offset, scale), so that a term using the
    wrong units shows."""
    p = "actor_old/normalizer.params_dict.action"
    return (torch.as_tensor(ppo_ref[f"{p}.{k}"]).double() for k in ("offset", "scale"))


def reference_agent(ppo_ref):
    """Our DBPOAgent holding their actor_old (anchor), actor_ft (generator, log-std head, normalizer), critic.

    Their mean and anchor are unnormalized by their (non-identity) action normalizers, x_ds = (G - offset) / scale,
    ours are in u (env_action_map): our anchor is their actor_old U-Net with its unnormalizer folded into the last
    1x1 conv (W / scale, (b - offset) / scale per action channel), and our trainable (gain, bias) compose with the
    fixed (o, s) to their fine-tuned normalizer: ((G - bias) / gain - o) / s = (G - offset_ft) / scale_ft, i.e.
    gain = scale_ft / s, bias = offset_ft - o gain."""
    obs_dim, act_dim, To, Tp, Ta = (int(v) for v in ppo_ref["config/shapes"][:5])
    p = "actor_old/normalizer.params_dict"  # theirs x * scale + offset = ours (x - offset') / scale'
    o, s = env_action_map(ppo_ref)
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
        "action_low": (o - s).numpy(),
        "action_high": (o + s).numpy(),  # their act_min, act_max = -1, 1 in u
        "obs_scale": 1 / ppo_ref[f"{p}.obs.scale"],
        "obs_offset": -ppo_ref[f"{p}.obs.offset"] / ppo_ref[f"{p}.obs.scale"],
        "action_scale": s.numpy(),
        "action_offset": o.numpy(),
    }
    gens = [dbp_bc.UNetGenerator(**kwargs) for _ in range(2)]
    gens[0].load_state_dict(state(ppo_ref, "actor_ft/policy.model."))
    old = state(ppo_ref, "actor_old/model.")
    scale0, offset0 = (torch.as_tensor(ppo_ref[f"{p}.action.{k}"]) for k in ("scale", "offset"))
    old["final.1.weight"] = old["final.1.weight"] / scale0[:, None, None]  # [act_dim, C, 1]
    old["final.1.bias"] = (old["final.1.bias"] - offset0) / scale0
    gens[1].load_state_dict(old)
    agent = dbpo_ppo.DBPOAgent(ckpt, gens[0], gens[1])
    hidden = [int(h) for h in ppo_ref["config/critic_hidden_dims"]]  # theirs is smaller than our 3 x 256 here
    dims = [To * obs_dim, *hidden]
    agent.critic = torch.nn.Sequential(
        *[m for i, o in itertools.pairwise(dims) for m in (torch.nn.Linear(i, o), torch.nn.Mish())],
        torch.nn.Linear(dims[-1], 1),
    )
    agent.critic.load_state_dict(state(ppo_ref, "critic/net.", str))
    agent.log_std_head.load_state_dict(state(ppo_ref, "actor_ft/logstd_head.proj.", str))
    ft = "actor_ft/policy.normalizer.params_dict"
    with torch.no_grad():
        agent.obs_gain.copy_(torch.as_tensor(ppo_ref[f"{ft}.obs.scale"]))
        agent.obs_bias.copy_(torch.as_tensor(ppo_ref[f"{ft}.obs.offset"]))
        gain = torch.as_tensor(ppo_ref[f"{ft}.action.scale"]).double() / s
        agent.action_gain.copy_(gain)
        agent.action_bias.copy_(torch.as_tensor(ppo_ref[f"{ft}.action.offset"]).double() - o * gain)
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


def critic_scale(critic: torch.nn.Sequential, x: torch.Tensor) -> float:
    """The magnitude of the terms the critic's layers sum, |W| |h| + |b| (what its round-off is relative to)."""
    scale = 0.0
    with torch.no_grad():
        for layer in critic:
            if isinstance(layer, torch.nn.Linear):
                scale = max(scale, amax(x.abs() @ layer.weight.abs().T + layer.bias.abs()))
            x = layer(x)
    return scale


def dbpo_bounds(ppo_ref, agent: dbpo_ppo.DBPOAgent) -> dict:
    """Round-off bounds of the DBPO loss terms, from the operands' scales in the reference (the stored batch, theirs
    mu, std, mu_frozen, values, ratios). Ta x Da = 12 executed numbers per log-prob; B = 10 rows."""
    r = {k: ppo_ref[f"loss/{k}"].astype(np.float64) for k in ("mean", "std", "old_actions", "ratio", "newvalues")}
    a, raw = ppo_ref["batch/chains"][:, 1].astype(np.float64), ppo_ref["loss/newlogprobs_raw"].astype(np.float64)
    adv, n_exec, B = ppo_ref["loss/advantages_normalized"].astype(np.float64), 4 * r["mean"].shape[-1], len(raw)
    unet = fan_ins(agent.generator)
    # mu = ((G(obs_n, z) - bias) / gain - o) / s: normalize (2), the U-Net, their unnormalize (G - offset) / scale
    # (2) at terms (|G| + |offset|) / scale per action dimension, |G| <= |mu| scale + |offset|: |mu| + 2 |offset| /
    # scale; our two more roundings at |mu| + |o / s|. mu_frozen: their unnormalize folded into the last conv, at the
    # same terms with actor_old's (offset, scale)
    ft, old = "actor_ft/policy.normalizer.params_dict", "actor_old/normalizer.params_dict"
    o, s = env_action_map(ppo_ref)

    def unnormalized_terms(x, prefix):  # max over the action dimensions of |x| + 2 |offset| / scale
        offset, scale = (ppo_ref[f"{prefix}.action.{k}"].astype(np.float64) for k in ("offset", "scale"))
        return float((np.abs(x).max(axis=(0, 1)) + 2 * np.abs(offset / scale)).max())

    d_mu = bound(unnormalized_terms(r["mean"], ft), 2, *unet, 2) + bound(amax(r["mean"]) + amax(o / s), 2)
    d_mu0 = bound(unnormalized_terms(r["old_actions"], old), 2, *unet, 2)
    # log std = head(flatten(obs_n)) (To * obs_dim terms, then clamped): an absolute error of log std is std's relative
    d_logstd = bound(amax(np.log(r["std"])), 2, *fan_ins(agent.log_std_head))
    # log pi = sum over the executed 12 of -0.5 ((a - mu) / std)^2 - log std - const, / 12: d/dmu = (a - mu) / std^2
    # (the 1 / std^2 amplification of mu's error), d/dlog std = ((a - mu) / std)^2 - 1
    pre = lambda x: x[:, :4].reshape(B, -1)  # noqa: E731  the executed prefix A[:Ta] (To = 1)
    e = (pre(a) - pre(r["mean"])) / pre(r["std"])
    terms = 0.5 * e**2 + np.abs(np.log(pre(r["std"]))) + 1
    d_logp = (np.abs(e) / pre(r["std"]) * d_mu + np.abs(e**2 - 1) * d_logstd).sum(1) / n_exec
    d_logp += bound(terms.sum(1) / n_exec, n_exec, 3)
    free = raw >= -2  # clamped at logprob_min = -2: then a constant, no error (none lies within its bound of -2)
    assert np.all(np.abs(raw + 2) > d_logp)
    d_ratio = r["ratio"] * (np.where(free, d_logp, 0.0) + rel_err(2))  # exp(new - old): exp's relative error
    d_values = bound(
        critic_scale(agent.critic, torch.as_tensor(ppo_ref["batch/state"]).flatten(1)), *fan_ins(agent.critic)
    )
    d_adv = bound(amax(adv) + 1, 2 * B, 3)  # (A - mean) / (std + 1e-8) over B rows
    out = {
        "mu": d_mu,
        "mu0": d_mu0,
        "std": amax(r["std"]) * d_logstd,
        "logp": d_logp,
        "entropy": d_logstd + bound(2.0, n_exec, 2),  # 0.5 + 0.5 log(2 pi) + mean log std: terms ~ 1 + |log std|
        "values": d_values,
        "ratio": d_ratio,
        # max(-A r, -A clip(r)), averaged: A's and r's errors, and the mean of B terms
        "pg_loss": np.mean(np.abs(adv) * d_ratio + r["ratio"] * d_adv) + bound(np.mean(np.abs(adv * r["ratio"])), B),
        # 0.5 mean (V - R)^2: d/dV = V - R
        "v_loss": np.mean(np.abs(r["newvalues"] - ppo_ref["batch/returns"])) * d_values
        + bound(float(ppo_ref["loss/v_loss"]), B, 2),
        # mean((r - 1) - log r): d/dlog r = r - 1
        "approx_kl": np.mean(np.abs(r["ratio"] - 1) * d_ratio / r["ratio"])
        + bound(np.mean(r["ratio"] + np.abs(np.log(r["ratio"])) + 1), B, 2),
        # mean((mu - mu0)^2) over B Tp Da numbers: a small difference of mu's, so its error is relative to mu, not
        # to the loss: d/dmu = 2 (mu - mu0), |mean(2 (mu - mu0) e)| <= 2 rms(mu - mu0) (d_mu + d_mu0) by Cauchy-Schwarz
        "anchor_loss": 2 * math.sqrt(float(ppo_ref["loss/anchor_loss"])) * (d_mu + d_mu0)
        + bound(float(ppo_ref["loss/anchor_loss"]), r["mean"].size, 2),
    }
    out["entropy_loss"] = out["entropy"] + bound(amax(ppo_ref["loss/entropy"]), B)
    out["noise_std"] = out["std"] + bound(amax(r["std"]), B * n_exec)
    # d total / d params: the upstream gradient d L / d mu ~ A r (a - mu) / std^2 errs by r's relative error and by
    # d_mu / std relative to |a - mu| ~ std (the sampled chunks); then the U-Net backward, the sum over B Tp positions
    std_min = float(r["std"].min())
    out["grad_rel"] = (
        2 * rel_err(*unet, *unet, B * r["mean"].shape[1]) + float(np.max(np.where(free, d_logp, 0.0))) + d_mu / std_min
    )
    return out


def test_dbpo_distribution_and_log_prob_parity_with_reference(ppo_ref):
    """mu and std of the fine-tuned actor on the stored latent, the normalized prefix log-prob, entropy, anchor mean."""
    agent, obs, z, chunk, _, _ = reference_loss(ppo_ref)
    tol = dbpo_bounds(ppo_ref, agent)
    mu, std = agent.dist_params(obs, z)
    close(mu, ppo_ref["loss/mean"], tol["mu"])
    close(mu, ppo_ref["loss/new_actions"], tol["mu"])
    close(std, ppo_ref["loss/std"], tol["std"])
    close(agent.anchor_mean(obs, z), ppo_ref["loss/old_actions"], tol["mu0"])
    # sum over Ta x Da / (Ta * Da), elementwise bounds
    close(dbpo_ppo.prefix_log_prob(mu, std, chunk, 1, 4), ppo_ref["loss/newlogprobs_raw"], tol["logp"])
    close(dbpo_ppo.prefix_entropy(std, 1, 4), ppo_ref["loss/entropy"], tol["entropy"])
    close(agent.get_value(obs), ppo_ref["loss/newvalues"], tol["values"])


def test_dbpo_loss_terms_and_gradients_parity_with_reference(ppo_ref):
    """The clamped ratio, the clipped surrogate, value loss, entropy, anchor, their sum and d total / d params."""
    agent, _, _, _, loss, info = reference_loss(ppo_ref)
    tol = dbpo_bounds(ppo_ref, agent)
    close(
        info["ratio"], ppo_ref["loss/ratio"], tol["ratio"]
    )  # both log-probs clamped at -2 first (chunks 0 and 1 bind)
    for ours_key, theirs, sign in (
        ("policy_loss", "pg_loss", 1),
        ("value_loss", "v_loss", 1),
        ("entropy", "entropy_loss", -1),
        ("approx_kl", "approx_kl", 1),
        ("anchor_loss", "anchor_loss", 1),
    ):
        close(sign * info[ours_key], ppo_ref[f"loss/{theirs}"], tol[theirs])
    close(info["clipfrac"], ppo_ref["loss/clipfrac"], 0)  # a count: exact (no ratio within its bound of 1 +- clip)
    assert np.all(np.abs(np.abs(ppo_ref["loss/ratio"] - 1) - 0.02) > tol["ratio"])
    close(info["std"], ppo_ref["loss/noise_std"], tol["noise_std"])
    # the total is their combination of the terms (coefficients of their finetune.yaml): checked on our own terms,
    # 4 roundings of terms at their magnitudes, so a wrong coefficient shows however small the term
    coef = {"entropy": -0.01, "value_loss": 0.5, "anchor_loss": 1.0}
    terms = [info["policy_loss"]] + [c * info[k] for k, c in coef.items()]
    close(info["loss"], sum(terms), bound(sum(abs(float(t)) for t in terms), 4))
    close(
        info["loss"],
        ppo_ref["loss/total"],
        tol["pg_loss"]
        + 0.01 * tol["entropy_loss"]
        + 0.5 * tol["v_loss"]
        + tol["anchor_loss"]
        + bound(float(sum(abs(float(t)) for t in terms)), 4),
    )
    loss.backward()
    theirs = {
        **{f"generator.{ours(k)}": v for k, v in state(ppo_ref, "grad/actor_ft/policy.model.", str).items()},
        **{f"log_std_head.{k}": v for k, v in state(ppo_ref, "grad/actor_ft/logstd_head.proj.", str).items()},
        **{f"critic.{k}": v for k, v in state(ppo_ref, "grad/critic/net.", str).items()},
        **{
            f"obs_{n}": torch.as_tensor(ppo_ref[f"grad/actor_ft/policy.normalizer.params_dict.obs.{t}"])
            for n, t in (("gain", "scale"), ("bias", "offset"))
        },
    }
    # the action normalizer's, by the chain rule through scale_ft = gain s, offset_ft = bias + o gain
    # (reference_agent): d/dgain = s d/dscale_ft + o d/doffset_ft, d/dbias = d/doffset_ft
    o, s = env_action_map(ppo_ref)
    g_scale, g_offset = (
        torch.as_tensor(ppo_ref[f"grad/actor_ft/policy.normalizer.params_dict.action.{t}"]).double()
        for t in ("scale", "offset")
    )
    theirs["action_gain"], theirs["action_bias"] = s * g_scale + o * g_offset, g_offset
    trained = {n: p for n, p in agent.named_parameters() if p.requires_grad}  # the anchor is frozen
    assert set(trained) == set(theirs)  # the normalizer is trained, as theirs (no --freeze-normalizer)
    gmax = max(amax(g) for g in theirs.values())
    for name, p in trained.items():
        scale = amax(s) + amax(o) if name == "action_gain" else 1.0  # the combination's operands
        close(p.grad, theirs[name], tol["grad_rel"] * gmax * scale)


def test_rollout_buffer_reward_scaling_and_gae_parity_with_reference(ppo_ref):
    """rewards / (population std + 1e-8), no mean subtraction; GAE masks with 1 - terminated only (their buffer);
    the last next value is the critic on the final observation."""
    b = {k: ppo_ref[f"buffer/{k}"].astype(np.float64) for k in ("rewards", "terminated", "values", "last_values")}
    scaled = dbpo_ppo.rollout_std_scaling(b["rewards"])
    T, N = b["rewards"].shape
    # r / (std + 1e-8): the std sums T N squares of terms at |r| (mean, squares, sum, sqrt), then one division
    close(scaled, ppo_ref["buffer/rewards_scaled"], bound(amax(ppo_ref["buffer/rewards_scaled"]), 2 * T * N, 3))
    agent = reference_agent(ppo_ref)
    last = torch.as_tensor(ppo_ref["buffer/last_state"])
    d_values = bound(critic_scale(agent.critic, last.flatten(1)), *fan_ins(agent.critic))
    close(agent.get_value(last), b["last_values"], d_values)
    gamma, lam = (float(v) for v in ppo_ref["buffer/gamma_lambda_scale"][:2])
    # a truncation without termination (env 2 at step 3) bootstraps from the next slot's value, as their buffer does
    adv, ret = dbpo_ppo.compute_gae(
        torch.as_tensor(scaled), *(torch.as_tensor(b[k]) for k in ("values", "terminated", "last_values")), gamma, lam
    )
    # the recursion A_t = delta_t + gamma lam A_{t+1}: 5 roundings a step over T steps, its terms at |r| + |V| + |A|
    terms = amax(scaled) + amax(b["values"]) + amax(b["last_values"]) + amax(ppo_ref["buffer/advantages"])
    close(adv, ppo_ref["buffer/advantages"], bound(terms, 5 * T))
    close(ret, ppo_ref["buffer/returns"], bound(terms + amax(ppo_ref["buffer/returns"]), 5 * T, 1))  # A + V
