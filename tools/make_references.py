"""Make the parity reference files in tests/data/ by running the AUTHORS' code, unchanged.

This file contains none of the authors' code: it imports it from a checkout given on the command
line, builds small inputs, calls the authors' functions, and saves inputs, random draws and outputs.
tests/data/README.md records the repositories, commits, package versions and what every key holds.

    python tools/make_references.py --dfp /path/to/DFP            # tests/data/dfp_update_reference.npz
    python tools/make_references.py --dbpo /path/to/DBPO          # dbp_reference.npz, dbpo_loss_reference.npz

Run it in an environment that has what the authors' code needs (not the project's venv): for DFP
jax/jaxlib 0.6.0 (CPU), flax 0.10.5, optax 0.2.4, distrax 0.1.5, chex, ml_collections, PyYAML; for
DBPO torch, einops, zarr, numba (only what the imported modules import). Everything runs on CPU in
float32; set OMP_NUM_THREADS=1.
"""

import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(os.path.dirname(HERE), "tests", "data")

# Small sizes with the structure of the real runs (cube: h = 5 chunks, N = 16 candidates, K = 4).
DFP_OBS_DIM = 10
DFP_ACT_DIM = 5
DFP_HIDDEN = (32, 32, 32)
DFP_BATCH = 8
DFP_SEED = 0  # agent seed (jax.random.PRNGKey(seed) as their main.py)
DFP_DATA_SEED = 2026  # numpy seed for the synthetic dataset and the batches
# Non-degenerate starting states (their code starts both copies equal to the originals, and pi_old := actor at the
# switch, under which a wrong Polyak rate, pi_old's rate or the TD target's scoring network would not show): the
# target critic and pi_old are moved off the critic and the actor by a seeded relative perturbation, as after a
# while of training. The soft update takes K = 8 of N = 16 positives, so some lie below their row's Q midrange and
# their weights clamp at 0 (with K = 4 all were positive).
DFP_PERTURB = 0.1  # p + DFP_PERTURB * randn * (mean|p| + 1e-3), per tensor
DFP_PERTURB_SEED = 2027
DFP_SOFT_POS_SAMPLES = 8


def _flat(tree, prefix):
    """Flatten a nested dict of arrays into {prefix/path: np.ndarray}."""
    out = {}

    def rec(node, path):
        if isinstance(node, dict) or hasattr(node, "items"):
            for k in node:
                rec(node[k], path + [str(k)])
        else:
            out["/".join([prefix] + path)] = np.asarray(node)

    rec(tree, [])
    return out


def _check(name, a, b, rtol=1e-5, atol=1e-6):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or not np.allclose(a, b, rtol=rtol, atol=atol):
        err = np.abs(a - b).max() if a.shape == b.shape else f"shapes {a.shape} vs {b.shape}"
        raise SystemExit(f"self-check failed: {name}: max abs diff {err}")


# ---------------------------------------------------------------------------------------------- DFP


def _dfp_config(root, get_config):
    """Their effective config for `python main.py --agent_config=drift` on a cube task: get_config(),
    then config/agent/drift.yaml, then the top level and the `agent:` section of config/main.yaml,
    typed like the existing value (lists become tuples where the default is a tuple), as main.py does.
    Then the small sizes of this reference."""
    import yaml

    def coerce(value, ref):
        if ref is None or isinstance(value, type(ref)):
            return value
        if isinstance(ref, bool):
            return bool(value)
        if isinstance(ref, (int, float, str)):
            return type(ref)(value)
        if isinstance(ref, tuple) and isinstance(value, list):
            return tuple(value)
        return value

    config = get_config()
    with open(os.path.join(root, "config", "agent", "drift.yaml")) as f:
        for k, v in yaml.safe_load(f).items():
            config[k] = coerce(v, config[k]) if k in config else v
    with open(os.path.join(root, "config", "main.yaml")) as f:
        main_cfg = yaml.safe_load(f)
    config["horizon_length"] = int(main_cfg["horizon_length"])
    config["action_chunking"] = bool(main_cfg["action_chunking"])
    for k, v in main_cfg["agent"].items():
        if v is not None:
            config[k] = coerce(v, config[k]) if k in config else v
    config["actor_hidden_dims"] = DFP_HIDDEN
    config["value_hidden_dims"] = DFP_HIDDEN
    config["batch_size"] = DFP_BATCH
    return config


def _dfp_dataset(Dataset, rng):
    """A synthetic offline dataset in their layout: episodes of 12 steps, rewards in [-3, 0] (cube's
    dense reward is minus the number of unsolved cubes), some episodes ending in a terminal success."""
    n_ep, ep_len = 6, 12
    n = n_ep * ep_len
    obs = rng.normal(size=(n + n_ep, DFP_OBS_DIM)).astype(np.float32)
    idx = np.concatenate([np.arange(e * (ep_len + 1), e * (ep_len + 1) + ep_len) for e in range(n_ep)])
    observations, next_observations = obs[idx], obs[idx + 1]
    actions = rng.uniform(-1, 1, size=(n, DFP_ACT_DIM)).astype(np.float32)
    rewards = -rng.integers(0, 4, size=n).astype(np.float32)
    terminals = np.zeros(n, np.float32)
    terminals[ep_len - 1 :: ep_len] = 1.0  # episode ends
    masks = np.ones(n, np.float32)
    for e in (1, 3, 4):  # these episodes end in success: no bootstrap after their last step
        masks[e * ep_len + ep_len - 1] = 0.0
        rewards[e * ep_len + ep_len - 1] = 0.0
    return Dataset.create(
        observations=observations,
        actions=actions,
        rewards=rewards,
        terminals=terminals,
        masks=masks,
        next_observations=next_observations,
    )


def make_dfp(root, out_path):
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, root)
    import flax
    import jax
    import jax.numpy as jnp
    import optax
    from agents.drift import DriftAgent, get_config
    from utils.datasets import Dataset
    from utils.drift_loss import drift_loss

    config = _dfp_config(root, get_config)
    cfg_plain = dict(config)
    np.random.seed(DFP_DATA_SEED)
    data = _dfp_dataset(Dataset, np.random.default_rng(DFP_DATA_SEED))
    example = data.sample(())
    agent = DriftAgent.create(DFP_SEED, example["observations"], example["actions"], config)
    cfg = agent.config
    h, A = cfg["horizon_length"], cfg["action_dim"]
    D = h * A
    B = DFP_BATCH
    rec = {}

    def batch_f32(batch):
        return {k: np.asarray(v, np.float32) for k, v in batch.items()}

    def params_of(a):
        return jax.tree_util.tree_map(np.asarray, a.network.params)

    perturb_rng = np.random.default_rng(DFP_PERTURB_SEED)

    def with_perturbed_copy(a, name, source):
        """The agent with module `name` replaced by a perturbed copy of module `source` (as their switch replaces
        the EMA actor: a new params dict in the network)."""

        def move(p):
            p = np.asarray(p)
            step = perturb_rng.standard_normal(p.shape).astype(np.float32) * (np.abs(p).mean() + 1e-3)
            return jnp.asarray(p + DFP_PERTURB * step)

        params = dict(a.network.params)
        params[name] = jax.tree_util.tree_map(move, params[source])
        return a.replace(network=a.network.replace(params=params))

    for k, v in _flat(params_of(agent), "params/init").items():  # target and EMA start as copies in their create()
        if "/modules_target_critic/" in k or "/modules_actor_drift_ema/" in k:
            base = k.replace("modules_target_critic", "modules_critic").replace(
                "modules_actor_drift_ema", "modules_actor_drift"
            )
            _check(f"init copy {k}", v, _flat(params_of(agent), "params/init")[base], rtol=0, atol=0)
        else:
            rec[k] = v
    # the offline update starts from a target critic apart from the critic (stored; the EMA actor stays a copy)
    agent = with_perturbed_copy(agent, "modules_target_critic", "modules_critic")
    rec.update(_flat(params_of(agent)["modules_target_critic"], "params/init/modules_target_critic"))

    def one_update(agent, batch, tag, scan):
        """One update of their agent (`update` offline as main.py, `batch_update` with utd 1 online),
        the gradients through their total_loss with their rng split, and the per-sample intermediate
        values recomputed with their modules and the same random draws (checked against their info)."""
        cfg = agent.config
        batch = batch_f32(batch)
        jb = {k: jnp.asarray(v) for k, v in batch.items()}
        for k, v in batch.items():
            rec[f"{tag}/batch/{k}"] = v
        rec[f"{tag}/rng_before"] = (
            np.asarray(jax.random.key_data(agent.rng))
            if jnp.issubdtype(agent.rng.dtype, jax.dtypes.prng_key)
            else np.asarray(agent.rng)
        )
        if scan:
            new_agent, info = agent.batch_update(jax.tree_util.tree_map(lambda x: x[None], jb))
        else:
            new_agent, info = agent.update(jb)
        info = {k: float(v) for k, v in info.items()}
        for k, v in info.items():
            rec[f"{tag}/info/{k}"] = np.float32(v)

        # the same rng chain as _update / total_loss / critic_loss / sample_actions / actor_loss
        _, rng = jax.random.split(agent.rng)
        _, actor_rng, critic_rng = jax.random.split(rng, 3)
        _, sample_rng = jax.random.split(critic_rng)
        _, init_noise_rng = jax.random.split(sample_rng)

        grads, ginfo = jax.grad(lambda p: agent.total_loss(jb, p, rng=rng), has_aux=True)(agent.network.params)
        for k, v in _flat(jax.tree_util.tree_map(np.asarray, grads), f"grads/{tag}").items():
            if "/modules_target_critic/" in k or "/modules_actor_drift_ema/" in k:
                assert not v.any(), k  # their loss never passes these params: zero gradients, not stored
            else:
                rec[k] = v
        # check: their optimizer step on these gradients, then Polyak/EMA from the pre-step params
        stepped = agent.network.apply_gradients(grads=grads)
        p_old, p_new = agent.network.params, dict(stepped.params)
        tau, etau = cfg["tau"], cfg.get("actor_ema_tau")
        p_new["modules_target_critic"] = jax.tree_util.tree_map(
            lambda p, tp: p * tau + tp * (1 - tau), p_old["modules_critic"], p_old["modules_target_critic"]
        )
        if cfg.get("use_actor_ema", False):
            p_new["modules_actor_drift_ema"] = jax.tree_util.tree_map(
                lambda p, ep: p * etau + ep * (1 - etau), p_old["modules_actor_drift"], p_old["modules_actor_drift_ema"]
            )
        after = params_of(new_agent)
        for k, v in _flat(jax.tree_util.tree_map(np.asarray, p_new), "x").items():
            _check(f"{tag} params after {k}", v, _flat(after, "x")[k], rtol=1e-6, atol=1e-7)
        rec.update(_flat(after, f"params/{tag}"))
        rec[f"{tag}/adam_count"] = np.asarray(new_agent.network.opt_state[0].count)

        net = agent.network
        q_agg = getattr(jnp, cfg["q_agg"])
        # critic: best-of-N next chunk under the current actor and critic, target critic, TD target
        next_obs = jb["next_observations"][..., -1, :]
        noise_next = jax.random.normal(init_noise_rng, (B, cfg["q_bon"], D))
        obs_rep = jnp.repeat(next_obs[:, None, :], cfg["q_bon"], axis=1)
        cand = jnp.clip(net.select("actor_drift")(obs_rep, noise_next), -1, 1)
        cand_q = net.select("critic")(obs_rep, cand)
        cand_q = cand_q.mean(axis=0) if cfg["q_agg"] == "mean" else cand_q.min(axis=0)
        best = jnp.argmax(cand_q, axis=-1)
        next_actions = cand[jnp.arange(B), best]
        _check(f"{tag} next actions", next_actions, agent.sample_actions(next_obs, sample_rng, use_q_bon=True))
        next_qs = net.select("target_critic")(next_obs, actions=next_actions)
        next_q = next_qs.min(axis=0) if cfg["q_agg"] == "min" else next_qs.mean(axis=0)
        target_q = jb["rewards"][..., -1] + cfg["discount"] ** h * jb["masks"][..., -1] * next_q
        q = net.select("critic")(jb["observations"], actions=jb["actions"].reshape(B, -1))
        valid = jb["valid"][..., -1]
        critic_loss = (jnp.square(q - target_q) * valid).mean()
        _check(f"{tag} critic_loss", critic_loss, info["critic/critic_loss"])
        _check(f"{tag} tgt_q_mean", next_q.mean(), info["critic/tgt_q_mean"])
        rec.update(
            {
                f"{tag}/critic/noise_next": noise_next,
                f"{tag}/critic/next_candidates": cand,
                f"{tag}/critic/next_candidate_q": cand_q,
                f"{tag}/critic/next_best_index": best,
                f"{tag}/critic/next_actions": next_actions,
                f"{tag}/critic/next_qs": next_qs,
                f"{tag}/critic/next_q": next_q,
                f"{tag}/critic/target_q": target_q,
                f"{tag}/critic/q": q,
                f"{tag}/critic/critic_loss": critic_loss,
            }
        )

        obs, acts = jb["observations"], jb["actions"].reshape(B, -1)
        R = tuple(cfg["drift_temps"])
        mode = cfg.get("drift_mode", "none")
        if mode not in ("hard", "soft"):
            g = cfg["gen_per_label"]
            _, drift_rng = jax.random.split(actor_rng)
            noise = jax.random.normal(drift_rng, (B * g, D))
            obs_g = jnp.repeat(obs, g, axis=0)
            gen = jnp.clip(net.select("actor_drift")(obs_g, noise), -1, 1)
            q_gen = q_agg(net.select("critic")(obs_g, actions=gen), axis=0).reshape(B, g)
            dl, dinfo = drift_loss(
                gen=gen.reshape(B, g, D), fixed_pos=acts[:, None], R_list=R, plus_only=bool(cfg["drift_plus_only"])
            )
            actor_drift_loss = cfg["alpha"] * dl.mean()
            _check(f"{tag} actor_drift_loss", actor_drift_loss, info["actor/actor_drift_loss"])
            rec.update(
                {
                    f"{tag}/actor/noise": noise,
                    f"{tag}/actor/gen": gen.reshape(B, g, D),
                    f"{tag}/actor/q_gen": q_gen,
                    f"{tag}/actor/drift_loss": dl,
                    f"{tag}/actor/drift_scale": dinfo["scale"],
                    f"{tag}/actor/actor_drift_loss": actor_drift_loss,
                }
            )
        else:
            N, a, b, nb = (
                cfg["online_n_samples"],
                cfg["online_pos_samples"],
                cfg["gen_per_label"],
                cfg["online_neg_samples"],
            )
            _, sel_rng, drift_rng = jax.random.split(actor_rng, 3)
            noise_sel = jax.random.normal(sel_rng, (B * N, D))
            obs_N = jnp.repeat(obs, N, axis=0)
            sel_name = "actor_drift_ema" if cfg.get("use_actor_ema", False) else "actor_drift"
            sel = jnp.clip(net.select(sel_name)(obs_N, noise_sel), -1, 1)
            cand_qs = q_agg(net.select("critic")(obs_N, actions=sel), axis=0).reshape(B, N)
            pool = sel.reshape(B, N, D)
            order = jnp.argsort(cand_qs, axis=-1)
            pos_idx, neg_idx = order[:, -a:], order[:, :nb]
            pos = jnp.take_along_axis(pool, pos_idx[..., None], axis=1)
            neg = jnp.take_along_axis(pool, neg_idx[..., None], axis=1)
            noise_drift = jax.random.normal(drift_rng, (B * b, D))
            obs_b = jnp.repeat(obs, b, axis=0)
            gen = jnp.clip(net.select("actor_drift")(obs_b, noise_drift), -1, 1).reshape(B, b, D)
            q_gen = q_agg(net.select("critic")(obs_b, actions=gen.reshape(B * b, D)), axis=0).reshape(B, b)
            kw = dict(R_list=R, plus_only=bool(cfg["drift_plus_only"]), use_neg_only=bool(cfg["drift_use_neg_only"]))
            if mode == "hard":
                dl_pos, dinfo_pos = drift_loss(gen=gen, fixed_pos=pos, fixed_neg=neg, **kw)
            else:
                qmin, qmax = cand_qs.min(-1, keepdims=True), cand_qs.max(-1, keepdims=True)
                norm_qs = 2.0 * (cand_qs - qmin) / jnp.maximum(qmax - qmin, 1e-8) - 1.0
                weight_pos = jnp.maximum(jnp.take_along_axis(norm_qs, pos_idx, axis=1), 0.0)
                dl_pos, dinfo_pos = drift_loss(gen=gen, fixed_pos=pos, fixed_neg=None, weight_pos=weight_pos, **kw)
                rec.update({f"{tag}/actor/norm_qs": norm_qs, f"{tag}/actor/weight_pos": weight_pos})
                _check(f"{tag} weight_pos_mean", weight_pos.mean(), info["actor/weight_pos_mean"])
            dl_tgt, dinfo_tgt = drift_loss(
                gen=gen, fixed_pos=acts[:, None], fixed_neg=None, R_list=R, plus_only=bool(cfg["drift_plus_only"])
            )
            alpha = cfg["alpha"]
            alpha_pos = alpha if cfg.get("alpha_pos") is None else cfg["alpha_pos"]
            alpha_tgt = alpha if cfg.get("alpha_target") is None else cfg["alpha_target"]
            l_pos, l_tgt = alpha_pos * dl_pos.mean(), alpha_tgt * dl_tgt.mean()
            _check(f"{tag} actor_drift_loss_pos", l_pos, info["actor/actor_drift_loss_pos"])
            _check(f"{tag} actor_drift_loss_tgt", l_tgt, info["actor/actor_drift_loss_tgt"])
            _check(
                f"{tag} online_pos_q_mean",
                jnp.take_along_axis(cand_qs, pos_idx, 1).mean(),
                info["actor/online_pos_q_mean"],
            )
            rec.update(
                {
                    f"{tag}/actor/noise_sel": noise_sel,
                    f"{tag}/actor/sel_pool": pool,
                    f"{tag}/actor/cand_qs": cand_qs,
                    f"{tag}/actor/pos_idx": pos_idx,
                    f"{tag}/actor/pos_acts": pos,
                    f"{tag}/actor/neg_idx": neg_idx,
                    f"{tag}/actor/noise_drift": noise_drift,
                    f"{tag}/actor/gen": gen,
                    f"{tag}/actor/q_gen": q_gen,
                    f"{tag}/actor/drift_loss_pos": dl_pos,
                    f"{tag}/actor/drift_loss_tgt": dl_tgt,
                    f"{tag}/actor/drift_scale_pos": dinfo_pos["scale"],
                    f"{tag}/actor/drift_scale_tgt": dinfo_tgt["scale"],
                    f"{tag}/actor/actor_drift_loss_pos": l_pos,
                    f"{tag}/actor/actor_drift_loss_tgt": l_tgt,
                }
            )
        _check(
            f"{tag} total loss",
            info["critic/critic_loss"] + info["actor/actor_loss"],
            float(ginfo["critic/critic_loss"] + ginfo["actor/actor_loss"]),
        )
        rec[f"{tag}/total_loss"] = np.float32(ginfo["critic/critic_loss"] + ginfo["actor/actor_loss"])
        print(f"dfp {tag}: critic_loss {info['critic/critic_loss']:.6g} actor_loss {info['actor/actor_loss']:.6g}")
        return new_agent

    # offline: one `update` as main.py's offline loop
    batch = data.sample_sequence(B, sequence_length=h, discount=config["discount"])
    off = one_update(agent, batch, "offline", scan=False)
    online_batch = data.sample_sequence(B, sequence_length=h, discount=config["discount"])
    # pi_old apart from the actor: the EMA actor after the switch replaced by a perturbed copy (the same for both
    # modes; the target critic is the offline update's, already apart from the critic)
    ema_start = with_perturbed_copy(off, "modules_actor_drift_ema", "modules_actor_drift").network.params
    ema_start = jax.tree_util.tree_map(np.asarray, ema_start["modules_actor_drift_ema"])
    rec.update(_flat(ema_start, "params/online_start/modules_actor_drift_ema"))
    for mode in ("hard", "soft"):
        overrides = {"online_drift_mode": mode}
        if mode == "soft":
            overrides["online_pos_samples"] = DFP_SOFT_POS_SAMPLES
        start = off.replace(config=off.config.copy(overrides))
        start = start.switch_config_to_online()  # their offline -> online switch (EMA := actor)
        for k, v in _flat(params_of(start), "x").items():  # start = offline result with EMA := actor
            k2 = k.replace("modules_actor_drift_ema", "modules_actor_drift")
            _check(f"online start {k}", v, _flat(params_of(off), "x")[k2], rtol=0, atol=0)
        params = dict(start.network.params)
        params["modules_actor_drift_ema"] = jax.tree_util.tree_map(jnp.asarray, ema_start)
        start = start.replace(network=start.network.replace(params=params))
        rec[f"online_{mode}/online_pos_samples"] = np.asarray(start.config["online_pos_samples"])
        one_update(start, online_batch, f"online_{mode}", scan=True)

    # config values and model facts
    for k, v in cfg_plain.items():
        if v is None or k == "ob_dims":
            continue
        if isinstance(v, str):
            rec[f"config/{k}"] = np.asarray(v)
        else:
            rec[f"config/{k}"] = np.asarray(v)
    rec["config/ob_dims"] = np.asarray(cfg["ob_dims"])
    rec["config/action_dim"] = np.asarray(A)
    rec["config/adam_b1_b2_eps"] = np.asarray([0.9, 0.999, 1e-8])  # optax.adam defaults used by create()
    rec["config/layer_norm_eps"] = np.asarray(flax.linen.LayerNorm().epsilon)
    rec["config/seed"] = np.asarray(DFP_SEED)
    rec["config/data_seed"] = np.asarray(DFP_DATA_SEED)
    rec["config/versions"] = np.asarray(f"jax {jax.__version__} flax {flax.__version__} optax {optax.__version__}")
    _save(out_path, rec)


# ------------------------------------------------------------------------------------- DBP and DBPO

DBP_OBS_DIM = 5
DBP_ACT_DIM = 3
DBP_OBS_STEPS = 2  # n_obs_steps (obs history)
DBP_HORIZON = 8  # prediction horizon T (divisible by 2^(len(down_dims) - 1) = 2)
DBP_ACTION_STEPS = 4  # n_action_steps (executed prefix)
DBP_BACKBONE = dict(
    down_dims=[8, 16], kernel_size=5, n_groups=8, cond_predict_scale=True
)  # their model/default.yaml but small
DBP_TEMPS = [0.02, 0.05, 0.2]  # their model/default.yaml
DBP_GEN = 4  # gen_per_label, their model/default.yaml
DBP_BATCH = 6
DBP_SEED = 2026
PERTURB = 0.004  # relative size of the fine-tuned actor's drift from actor_old
# DBPO's actions in dataset units (theirs: D4RL-style data already in [-1, 1], each dimension over its own range), so
# that their action normalizer is not the identity (with Robomimic's, abs_action False, it is)
DBPO_ACT_RANGE = (np.array([0.6, 0.9, 0.3]), np.array([0.2, -0.05, -0.4]))  # dataset action = a * scale + shift
DBPO_NORM_PERTURB = 0.005  # the fine-tuned actor's (trained) normalizer moved off actor_old's by this much


def _dbpo_import(root):
    sys.path.insert(0, root)
    import torch

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    return torch


def _state(module, prefix):
    return {f"{prefix}/{k}": v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def _grads(module, prefix):
    return {
        f"{prefix}/{k}": (p.grad.detach().cpu().numpy() if p.grad is not None else np.zeros(tuple(p.shape), np.float32))
        for k, p in module.named_parameters()
    }


def _dbp_data(rng):
    """Small synthetic demonstrations: 3 episodes of 20 steps, obs with unequal per-dimension ranges,
    actions in [-1, 1]; PushT-style keypoints (9 x 2) and agent state in pixel-like ranges."""
    n = 60
    obs = (rng.normal(size=(n, DBP_OBS_DIM)) * np.array([0.5, 1.0, 2.0, 0.1, 3.0])).astype(np.float32)
    act = rng.uniform(-1, 1, size=(n, DBP_ACT_DIM)).astype(np.float32)
    keypoint = rng.uniform(50, 450, size=(n, 9, 2)).astype(np.float32)
    state = np.concatenate([rng.uniform(20, 480, size=(n, 2)), rng.uniform(-3, 3, size=(n, 3))], -1).astype(np.float32)
    push_act = rng.uniform(15, 495, size=(n, 2)).astype(np.float32)
    return obs, act, keypoint, state, push_act


def _robomimic_normalizer(obs, act):
    """Their RobomimicReplayLowdimDataset.get_normalizer (abs_action False), on arrays instead of an
    hdf5 file: the dataset object is made without __init__ and given only the replay buffer it reads."""
    from dbpo.dataset.robomimic_lowdim_dataset import RobomimicReplayLowdimDataset

    ds = object.__new__(RobomimicReplayLowdimDataset)
    ds.replay_buffer = {"obs": obs, "action": act}
    ds.abs_action = False
    ds.use_legacy_normalizer = False
    return ds.get_normalizer()


def _pusht_normalizer(keypoint, state, act):
    """Their PushTLowdimDataset.get_normalizer() (mode 'limits'), on arrays instead of a zarr file."""
    from dbpo.dataset.pusht_dataset import PushTLowdimDataset

    ds = object.__new__(PushTLowdimDataset)
    ds.replay_buffer = {"keypoint": keypoint, "state": state, "action": act}
    ds.obs_key, ds.state_key, ds.action_key = "keypoint", "state", "action"
    return ds.get_normalizer(), ds._sample_to_data(ds.replay_buffer)


def _limits_normalizer(obs, act):
    """Their LinearNormalizer fitted in mode 'limits' (per dimension to [-1, 1]), as their PushT / D4RL-style
    datasets' get_normalizer() does, on arrays."""
    from dbpo.model.common.normalizer import LinearNormalizer

    normalizer = LinearNormalizer()
    normalizer.fit(data={"obs": obs, "action": act}, last_n_dims=1, mode="limits")
    return normalizer


def _windows(x, starts, length):
    return np.stack([x[s : s + length] for s in starts])


def make_dbp(root, out_path):
    torch = _dbpo_import(root)
    from dbpo.algorithm.dbp_loss import compute_dbp_loss
    from dbpo.methods.dbp.policies import LowdimDBPPolicy

    rng = np.random.default_rng(DBP_SEED)
    obs, act, keypoint, state, push_act = _dbp_data(rng)
    rec = {
        "data/obs": obs,
        "data/action": act,
        "data/pusht_keypoint": keypoint,
        "data/pusht_state": state,
        "data/pusht_action": push_act,
    }

    # normalizers, and their outputs on the whole data
    norm = _robomimic_normalizer(obs, act)
    for k, v in norm.state_dict().items():
        rec[f"robomimic_normalizer/{k}"] = v.numpy()
    rec["robomimic_normalizer/obs_normalized"] = norm["obs"].normalize(torch.from_numpy(obs)).detach().numpy()
    rec["robomimic_normalizer/action_normalized"] = norm["action"].normalize(torch.from_numpy(act)).detach().numpy()
    pnorm, pdata = _pusht_normalizer(keypoint, state, push_act)
    for k, v in pnorm.state_dict().items():
        rec[f"pusht_normalizer/{k}"] = v.numpy()
    rec["pusht_normalizer/obs"] = pdata["obs"]
    rec["pusht_normalizer/obs_normalized"] = pnorm["obs"].normalize(torch.from_numpy(pdata["obs"])).detach().numpy()
    rec["pusht_normalizer/action_normalized"] = pnorm["action"].normalize(torch.from_numpy(push_act)).detach().numpy()
    rec["pusht_normalizer/action_unnormalized_roundtrip"] = (
        pnorm["action"].unnormalize(pnorm["action"].normalize(torch.from_numpy(push_act))).detach().numpy()
    )

    torch.manual_seed(DBP_SEED)
    policy = LowdimDBPPolicy(
        obs_dim=DBP_OBS_DIM,
        action_dim=DBP_ACT_DIM,
        horizon=DBP_HORIZON,
        n_action_steps=DBP_ACTION_STEPS,
        n_obs_steps=DBP_OBS_STEPS,
        backbone_kwargs=DBP_BACKBONE,
        temperatures=DBP_TEMPS,
        per_timestep_loss=False,
        gen_per_label=DBP_GEN,
    )
    policy.set_normalizer(norm)
    rec.update(_state(policy.model, "unet"))

    # a batch as their sampler gives (obs history of n_obs_steps inside a window of T steps)
    starts = rng.integers(0, len(obs) - DBP_HORIZON, size=DBP_BATCH)
    batch = {
        "obs": torch.from_numpy(_windows(obs, starts, DBP_HORIZON)),
        "action": torch.from_numpy(_windows(act, starts, DBP_HORIZON)),
    }
    rec["batch/obs"], rec["batch/action"] = batch["obs"].numpy(), batch["action"].numpy()

    # forward: latent z [B, T, Da] and the flattened normalized obs history [B, To * Do]
    z = torch.from_numpy(rng.normal(size=(DBP_BATCH, DBP_HORIZON, DBP_ACT_DIM)).astype(np.float32))
    cond = norm["obs"].normalize(batch["obs"])[:, :DBP_OBS_STEPS].reshape(DBP_BATCH, -1).detach()
    with torch.no_grad():
        out = policy.model(z, global_cond=cond)
        pa = policy.predict_action(obs_dict={"obs": batch["obs"]}, noise=z)
    rec.update(
        {
            "forward/z": z.numpy(),
            "forward/global_cond": cond.numpy(),
            "forward/output": out.numpy(),
            "forward/predict_action/action": pa["action"].numpy(),
            "forward/predict_action/action_pred": pa["action_pred"].numpy(),
        }
    )

    for mode, per_step in (("chunk", False), ("step", True)):
        policy.per_timestep_loss = per_step
        seed = DBP_SEED + (1 if per_step else 0)
        torch.manual_seed(seed)
        policy.zero_grad()
        loss, metrics = policy.compute_loss(batch)
        loss.backward()
        rec.update(_grads(policy.model, f"{mode}/grad"))
        # the one draw compute_loss makes, recomputed from the same seed
        torch.manual_seed(seed)
        noise = torch.randn(DBP_BATCH * DBP_GEN, DBP_HORIZON, DBP_ACT_DIM)
        nact = norm["action"].normalize(batch["action"]).detach()
        with torch.no_grad():
            pred = policy.model(noise, global_cond=cond.repeat_interleave(DBP_GEN, dim=0))
            pred = pred.reshape(DBP_BATCH, DBP_GEN, DBP_HORIZON, DBP_ACT_DIM)
            if per_step:
                per = [
                    compute_dbp_loss(pred[:, :, t], nact[:, t].unsqueeze(1), temp_schedule=tuple(DBP_TEMPS))[0]
                    for t in range(DBP_HORIZON)
                ]
                per_loss = torch.stack(per, 1)  # [B, T]
                check = per_loss.mean(0).mean()
            else:
                per_loss, _ = compute_dbp_loss(
                    pred.reshape(DBP_BATCH, DBP_GEN, -1), nact.reshape(DBP_BATCH, 1, -1), temp_schedule=tuple(DBP_TEMPS)
                )
                check = per_loss.mean()
        _check(f"dbp {mode} loss", check, loss.item())
        rec.update(
            {
                f"{mode}/seed": np.asarray(seed),
                f"{mode}/noise": noise.numpy(),
                f"{mode}/pred": pred.numpy(),
                f"{mode}/per_sample_loss": per_loss.numpy(),
                f"{mode}/loss": np.float32(loss.item()),
            }
        )
        for k, v in metrics.items():
            rec[f"{mode}/metrics/{k}"] = np.float32(v)
        print(f"dbp {mode}: loss {loss.item():.6g}")
    rec["config/backbone"] = np.asarray(str(DBP_BACKBONE))
    rec["config/temperatures"] = np.asarray(DBP_TEMPS)
    rec["config/gen_per_label"] = np.asarray(DBP_GEN)
    rec["config/shapes"] = np.asarray(
        [DBP_OBS_DIM, DBP_ACT_DIM, DBP_OBS_STEPS, DBP_HORIZON, DBP_ACTION_STEPS, DBP_BATCH]
    )
    rec["config/versions"] = np.asarray(f"torch {torch.__version__}")
    _save(out_path, rec)


def make_dbpo(root, out_path):
    torch = _dbpo_import(root)
    from dbpo.methods.dbp.policies import LowdimDBPPolicy
    from dbpo.methods.dbpo.ppo_adapter import DBPOPolicyOptimizer
    from dbpo.methods.dbpo.rollout_buffer import RolloutBuffer
    from dbpo.model.common.critic import ValueCritic

    rng = np.random.default_rng(DBP_SEED + 10)
    obs, act, _, _, _ = _dbp_data(np.random.default_rng(DBP_SEED))
    act = (act * DBPO_ACT_RANGE[0] + DBPO_ACT_RANGE[1]).astype(np.float32)
    norm = _limits_normalizer(obs, act)  # non-identity: actions scaled and shifted per dimension
    torch.manual_seed(DBP_SEED + 10)
    actor = LowdimDBPPolicy(
        obs_dim=DBP_OBS_DIM,
        action_dim=DBP_ACT_DIM,
        horizon=DBP_HORIZON,
        n_action_steps=DBP_ACTION_STEPS,
        n_obs_steps=DBP_OBS_STEPS,
        backbone_kwargs=DBP_BACKBONE,
        temperatures=DBP_TEMPS,
        gen_per_label=DBP_GEN,
    )
    actor.set_normalizer(norm)
    critic = ValueCritic(obs_dim=DBP_OBS_DIM, n_obs_steps=DBP_OBS_STEPS, hidden_dims=[16, 16])
    # their configs/finetune.yaml model section; the other arguments are the adapter's defaults
    model = DBPOPolicyOptimizer(
        actor=actor,
        critic=critic,
        actor_policy_path=None,
        device="cpu",
        horizon_steps=DBP_HORIZON,
        action_dim=DBP_ACT_DIM,
        act_min=-1.0,
        act_max=1.0,
        executed_act_steps=DBP_ACTION_STEPS,
        clip_ploss_coef=0.02,
        norm_adv=True,
        anchor_loss_coeff=1.0,
    )
    rec = {}
    rec.update(_state(model.actor_old, "actor_old"))
    rec.update(_state(critic, "critic"))

    # one stored rollout batch: latents z and actions from their get_actions (sampling the stochastic
    # head, clipped to [-1, 1]) under the current actor_ft
    n = 10
    state = torch.from_numpy(rng.normal(size=(n, DBP_OBS_STEPS, DBP_OBS_DIM)).astype(np.float32) * 1.5)
    cond = {"state": state}
    torch.manual_seed(DBP_SEED + 11)
    _, chains, oldlogprobs = model.get_actions(
        cond, eval_mode=False, save_chains=True, normalize_act_space_dimension=True, ret_logprob=True
    )
    torch.manual_seed(DBP_SEED + 11)  # recompute the draws: z, then the Gaussian sample
    z_check = torch.randn(n, DBP_HORIZON, DBP_ACT_DIM)
    _check("dbpo z", z_check, chains[:, 0])
    oldlogprobs = oldlogprobs.clone()
    oldlogprobs[:2] = torch.tensor([-3.5, -2.5])  # two stored log-probs below the -2 clamp
    # the fine-tuned actor after some updates: perturb its generator and its log-std head
    with torch.no_grad():
        g = torch.Generator().manual_seed(DBP_SEED + 12)
        for p_ in model.actor_ft.policy.model.parameters():
            p_.add_(PERTURB * torch.randn(p_.shape, generator=g) * (p_.abs().mean() + 1e-3))
        head = model.actor_ft.logstd_head.proj
        head.weight.copy_(PERTURB * torch.randn(head.weight.shape, generator=g))
        n_pre = DBP_ACTION_STEPS * DBP_ACT_DIM  # the head's output is [T * Da], the executed prefix first
        # prefix: around the lower std clamp (0.03, the initial std); suffix: above the upper one (0.10)
        head.bias.add_(
            torch.cat([torch.linspace(-0.05, 0.05, n_pre), torch.linspace(0.5, 1.5, head.bias.numel() - n_pre)])
        )
        # their fine-tuned actor trains its (deep-copied) normalizer too: move it off actor_old's
        for name, p_ in model.actor_ft.policy.normalizer.named_parameters():
            if name.endswith(".scale") or name.endswith(".offset"):
                p_.mul_(1 + DBPO_NORM_PERTURB * torch.randn(p_.shape, generator=g))
    chains = chains.clone()
    chains[2, 1] = -chains[2, 1].sign()  # one stored chunk far from the mean: its new log-prob hits -2
    rec.update(_state(model.actor_ft, "actor_ft"))
    returns = torch.from_numpy(rng.normal(size=n).astype(np.float32))
    oldvalues = torch.from_numpy(rng.normal(size=n).astype(np.float32))
    advantages = torch.from_numpy(rng.normal(size=n).astype(np.float32) * 2 + 0.3)
    rec.update(
        {
            "batch/state": state.numpy(),
            "batch/chains": chains.numpy(),
            "batch/returns": returns.numpy(),
            "batch/oldvalues": oldvalues.numpy(),
            "batch/advantages": advantages.numpy(),
            "batch/oldlogprobs": oldlogprobs.numpy(),
        }
    )

    # the loss, as their finetune workspace calls it
    model.zero_grad()
    pg, ent, v, anchor, clipfrac, approx_kl, ratio_mean, noise_std = model.loss(
        cond,
        chains,
        returns,
        oldvalues,
        advantages,
        oldlogprobs,
        normalize_act_space_dimension=True,
        verbose=False,
        clip_intermediate_actions=True,
    )
    ent_coef, vf_coef = 0.01, 0.5  # configs/finetune.yaml train section
    total = pg + ent * ent_coef + v * vf_coef + anchor * model.anchor_loss_coeff
    total.backward()
    rec.update(_grads(model.actor_ft, "grad/actor_ft"))
    rec.update(_grads(model.critic, "grad/critic"))
    # intermediate values with their functions (no randomness in loss)
    with torch.no_grad():
        newlp, entropy, _ = model.get_logprobs(
            cond, chains, get_entropy=True, normalize_act_space_dimension=True, verbose_entropy_stats=False
        )
        dist, mean, std = model._distribution(cond, chains[:, 0])
        newlp_c, oldlp_c = newlp.clamp(min=model.logprob_min), oldlogprobs.clamp(min=model.logprob_min)
        ratio = (newlp_c - oldlp_c).exp()
        adv_n = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        pg1, pg2 = -adv_n * ratio, -adv_n * ratio.clamp(1 - model.clip_ploss_coef, 1 + model.clip_ploss_coef)
        _check("dbpo pg_loss", torch.max(pg1, pg2).mean(), pg.item())
        _check("dbpo ratio mean", ratio.mean(), ratio_mean)
        old_actions = model.actor_old.predict_action(cond={"obs": state}, noise=chains[:, 0])["action_pred"]
        new_actions = model.actor_ft.policy.predict_action(cond={"obs": state}, noise=chains[:, 0])["action_pred"]
        values = model.critic(cond).view(-1)
    rec.update(
        {
            "loss/mean": mean.numpy(),
            "loss/std": std.numpy(),
            "loss/newlogprobs_raw": newlp.numpy(),
            "loss/newlogprobs": newlp_c.numpy(),
            "loss/oldlogprobs": oldlp_c.numpy(),
            "loss/ratio": ratio.numpy(),
            "loss/advantages_normalized": adv_n.numpy(),
            "loss/entropy": entropy.numpy(),
            "loss/newvalues": values.numpy(),
            "loss/old_actions": old_actions.numpy(),
            "loss/new_actions": new_actions.numpy(),
            "loss/pg_loss": np.float32(pg.item()),
            "loss/entropy_loss": np.float32(ent.item()),
            "loss/v_loss": np.float32(v.item()),
            "loss/anchor_loss": np.float32(anchor.item()),
            "loss/clipfrac": np.float32(clipfrac),
            "loss/approx_kl": np.float32(approx_kl),
            "loss/ratio_mean": np.float32(ratio_mean),
            "loss/noise_std": np.float32(noise_std.item()),
            "loss/total": np.float32(total.item()),
        }
    )
    print(f"dbpo loss: pg {pg.item():.6g} ent {ent.item():.6g} v {v.item():.6g} anchor {anchor.item():.6g}")

    # rollout buffer: reward scaling, GAE and returns
    n_steps, n_envs = 6, 3
    buf = RolloutBuffer(
        n_steps=n_steps,
        n_envs=n_envs,
        horizon_steps=DBP_HORIZON,
        act_steps=DBP_ACTION_STEPS,
        action_dim=DBP_ACT_DIM,
        n_cond_step=DBP_OBS_STEPS,
        obs_dim=DBP_OBS_DIM,
        furniture_sparse_reward=False,
        best_reward_threshold_for_success=1.0,
        reward_scale_running=True,
        gamma=0.99,
        gae_lambda=0.95,
        reward_scale_const=1.0,
        device=torch.device("cpu"),
    )
    buf.reset()
    r = rng.normal(size=(n_steps, n_envs)) + 0.5
    term = np.zeros((n_steps, n_envs), bool)
    trunc = np.zeros((n_steps, n_envs), bool)
    term[2, 0] = term[4, 1] = True
    trunc[3, 2] = True
    vals = rng.normal(size=(n_steps, n_envs))
    lps = rng.normal(size=(n_steps, n_envs))
    states = rng.normal(size=(n_steps, n_envs, DBP_OBS_STEPS, DBP_OBS_DIM)).astype(np.float32)
    for t in range(n_steps):
        buf.add(t, states[t], np.zeros((n_envs, 2, DBP_HORIZON, DBP_ACT_DIM)), r[t], term[t], trunc[t], vals[t], lps[t])
    last_obs = {"state": rng.normal(size=(n_envs, DBP_OBS_STEPS, DBP_OBS_DIM)).astype(np.float32)}
    with torch.no_grad():
        last_values = critic({"state": torch.from_numpy(last_obs["state"])}).reshape(-1).numpy()
    buf.update(last_obs, critic)
    rec.update(
        {
            "buffer/rewards": r,
            "buffer/terminated": term,
            "buffer/truncated": trunc,
            "buffer/values": vals,
            "buffer/last_state": last_obs["state"],
            "buffer/last_values": last_values,
            "buffer/rewards_scaled": buf.reward_trajs,
            "buffer/advantages": buf.advantages_trajs,
            "buffer/returns": buf.returns_trajs,
            "buffer/firsts": buf.firsts_trajs,
            "buffer/gamma_lambda_scale": np.asarray([0.99, 0.95, 1.0]),
        }
    )
    rec["config/adapter"] = np.asarray(
        str(
            dict(
                min_sampling_std=model.min_sampling_std,
                min_logprob_std=model.min_logprob_std,
                max_logprob_std=model.max_logprob_std,
                init_logprob_std=model.init_logprob_std,
                logprob_min=model.logprob_min,
                logprob_max=model.logprob_max,
                clip_ploss_coef=model.clip_ploss_coef,
                clip_vloss_coef=model.clip_vloss_coef,
                randn_clip_value=model.randn_clip_value,
                norm_adv=model.norm_adv,
                anchor_loss_coeff=model.anchor_loss_coeff,
                executed_act_steps=model.executed_act_steps,
                ent_coef=ent_coef,
                vf_coef=vf_coef,
            )
        )
    )
    rec["config/backbone"] = np.asarray(str(DBP_BACKBONE))
    rec["config/critic_hidden_dims"] = np.asarray([16, 16])
    rec["config/shapes"] = np.asarray([DBP_OBS_DIM, DBP_ACT_DIM, DBP_OBS_STEPS, DBP_HORIZON, DBP_ACTION_STEPS, n])
    rec["config/versions"] = np.asarray(f"torch {torch.__version__}")
    _save(out_path, rec)


def _save(path, rec):
    arrays = {}
    for k, v in rec.items():
        v = np.asarray(v)
        if v.dtype == np.float64:
            v = v.astype(np.float32)
        if v.dtype == bool:
            v = v.astype(np.float32)
        if v.dtype == np.int64:
            v = v.astype(np.int32)
        arrays[k] = v
    np.savez_compressed(path, **arrays)
    print(f"wrote {path}: {len(arrays)} keys, {os.path.getsize(path) / 1024:.0f} KiB")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dfp", help="checkout of GitHub KAIST-Visual-AI-Group/DFP")
    p.add_argument("--dbpo", help="checkout of GitHub YuxuanGao0822/DBPO")
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder (default tests/data)")
    args = p.parse_args()
    if not args.dfp and not args.dbpo:
        p.error("give --dfp and/or --dbpo")
    if args.dfp:
        make_dfp(os.path.abspath(args.dfp), os.path.join(args.out, "dfp_update_reference.npz"))
    if args.dbpo:
        make_dbp(os.path.abspath(args.dbpo), os.path.join(args.out, "dbp_reference.npz"))
        make_dbpo(os.path.abspath(args.dbpo), os.path.join(args.out, "dbpo_loss_reference.npz"))


if __name__ == "__main__":
    main()
