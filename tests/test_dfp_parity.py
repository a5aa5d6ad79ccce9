"""Parity of dfp_offline_to_online.py with the authors' DFP, update by update.

`tests/data/dfp_update_reference.npz` holds one offline and two online updates (hard, soft) of the authors' JAX
agent run unchanged (how it was made and every key: tests/data/README.md). These tests load its initial parameters
into our Actor and Critic, feed the same batches and the same noise draws (each actor's `noise` replaced by the
recorded draws), and compare the TD target, the critic loss, every actor-loss term, the Q values, the gradient of
every parameter and the parameters after Adam, Polyak and EMA. CPU, float32, no JAX.
"""

import copy
import math
import os
import sys
import types

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))
import dfp_offline_to_online as dfp  # noqa: E402

REF = np.load(os.path.join(ROOT, "tests", "data", "dfp_update_reference.npz"))
OBS, A, H = 10, 5, 5  # observation, action, chunk length: a chunk is D = H * A = 25 numbers
D, B, E, HIDDEN, LAYERS = H * A, 8, 2, 32, 3
ACTOR, CRITIC, TARGET, EMA = "modules_actor_drift", "modules_critic", "modules_target_critic", "modules_actor_drift_ema"

# ---- Tolerances: float32 round-off of the operands, propagated to each checked value (tests/data/README.md). Both
# sides compute in float32 with their own kernels (XLA's and torch's summation orders), so neither is exact.
U = 2.0**-24  # float32 unit round-off
LAM = 5.0  # confidence of the probabilistic bound below: exceeded with probability <= 2 exp(-LAM^2 / 2) = 7.5e-6
ACTOR_PATH = [OBS + D, HIDDEN, HIDDEN, HIDDEN]  # the fan-ins of the actor's 4 Dense layers ([s, noise] -> chunk)
CRITIC_PATH = ACTOR_PATH + [HIDDEN] * LAYERS  # [s, a] -> Q: 4 Dense layers, and each LayerNorm's mean and variance


def rel_err(*lengths: int) -> float:
    """One side's relative round-off of a value computed through accumulations of these lengths (a dot product of
    n terms, a layer's fan-in): the m = sum(lengths) rounding factors (1 + d), |d| <= u, on its path multiply to
    within LAM sqrt(m) u of 1 (Higham & Mary 2019's probabilistic analysis; the worst case is m u)."""
    return LAM * math.sqrt(sum(lengths)) * U


def bound(scale: float, *lengths: int, cond: float = 1.0) -> float:
    """|ours - reference| of a value whose operands sit at magnitude `scale`: both sides round (x 2) and `cond`
    carries the operands' relative error to the value."""
    return 2 * cond * scale * rel_err(*lengths)


def amax(x) -> float:
    return torch.as_tensor(x).detach().abs().max().item()


def ref(key: str) -> torch.Tensor:
    return torch.from_numpy(np.asarray(REF[key], dtype=np.float32))


def close(ours, key: str, tol, map_ref=lambda x: x):
    """|ours - reference| <= tol, absolute (elementwise where tol is a tensor)."""
    theirs = map_ref(ref(key)).double()
    err = (torch.as_tensor(ours).detach().double() - theirs).abs()
    assert err.shape == theirs.shape, (key, err.shape, theirs.shape)
    bad = err > torch.as_tensor(tol, dtype=torch.float64)
    assert not bad.any(), f"{key}: max error {err.max().item():.3g}, bound {torch.as_tensor(tol).min().item():.3g}"


def q_scale(tag: str, key: str, prefix: str, module: str) -> float:
    """The magnitude of the terms Q sums: |Q| and its last layer's |w| . |h| with LayerNorm'd features h ~ O(1)."""
    last = REF[f"{prefix}/{module}/value_net/Dense_{LAYERS}/kernel"]  # [E, HIDDEN, 1]
    return amax(ref(f"{tag}/{key}")) + float(np.abs(last).sum(1).max())


def drift_scale_error(gen: torch.Tensor, scale: float, n_targets: int) -> float:
    """|ours - reference| of the drift scale s = mean distance over the Cg x Ctot pairs of each row: distinct pairs
    carry gen's round-off (the actor, then D-term distances); the Cg self pairs of a row, 1 / Ctot of them, are
    sqrt(max(|x|^2 + |x|^2 - 2 x.x, 1e-8)) of a cancellation that leaves round-off of |x|^2 terms, |r| <= 4 |x|^2
    rel_err(D), so each differs between the sides by up to 2 |x| sqrt(rel_err(D))."""
    x_norm = torch.linalg.vector_norm(gen.detach(), dim=-1).max().item()
    return bound(scale, *ACTOR_PATH, D) + 2 * x_norm * math.sqrt(rel_err(D)) / n_targets


def ref_args(mode: str = "hard") -> dfp.Args:
    """Our defaults, with the reference's small sizes (everything else is the authors' cube default; the soft update
    takes K = 8 positives of N = 16, so that some of their weights clamp at 0)."""
    K = int(REF[f"online_{mode}/online_pos_samples"])
    return dfp.Args(hidden_dim=HIDDEN, num_layers=LAYERS, batch_size=B, online_mode=mode, K=K, cuda=False)


def flax_paths(modules: dict) -> list:
    """(our parameter, its flax path, flax array -> our layout) for every parameter of the four networks."""
    out = []
    for name, flax_name in ((ACTOR, "actor"), (EMA, "ema_actor")):
        linears = [m for m in modules[flax_name].net if isinstance(m, torch.nn.Linear)]
        for i, lin in enumerate(linears):  # Dense kernel [in, out] = torch weight [out, in] transposed
            out += [
                (lin.weight, f"{name}/mlp/Dense_{i}/kernel", lambda x: x.T),
                (lin.bias, f"{name}/mlp/Dense_{i}/bias", lambda x: x),
            ]
    for name, flax_name in ((CRITIC, "critic"), (TARGET, "target_critic")):
        c = modules[flax_name]  # kernels [E, in, out] are our stacked layout; vectors get the broadcast axis [E, 1, d]
        for i in range(LAYERS + 1):
            out += [
                (c.weights[i], f"{name}/value_net/Dense_{i}/kernel", lambda x: x),
                (c.biases[i], f"{name}/value_net/Dense_{i}/bias", lambda x: x[:, None]),
            ]
        for i in range(LAYERS):
            out += [
                (c.norm_weights[i], f"{name}/value_net/LayerNorm_{i}/scale", lambda x: x[:, None]),
                (c.norm_biases[i], f"{name}/value_net/LayerNorm_{i}/bias", lambda x: x[:, None]),
            ]
    return out


def load(modules: dict, prefix: str, copies: dict = (), only: tuple = (ACTOR, CRITIC, TARGET, EMA)) -> None:
    """The reference's parameters `prefix/<path>` of the modules `only` into our networks; `copies` maps a module
    absent there to the one it is a copy of (the fresh agent's EMA actor is the actor)."""
    with torch.no_grad():
        for p, path, f in flax_paths(modules):
            if path.split("/")[0] not in only:
                continue
            for absent, source in dict(copies).items():
                path = path.replace(absent, source)
            p.copy_(f(ref(f"{prefix}/{path}")))


def batch_of(tag: str) -> dict:
    """Their sample_sequence batch ([B, h, ...], cumulative rewards/masks) as our chunk batch: the last entries."""
    b = {
        k: ref(f"{tag}/batch/{k}")
        for k in ("observations", "actions", "rewards", "masks", "valid", "next_observations")
    }
    return {
        "observations": b["observations"],
        "actions": b["actions"].reshape(B, D),
        "rewards": b["rewards"][:, -1],
        "masks": b["masks"][:, -1],
        "valid": b["valid"][:, -1],
        "next_observations": b["next_observations"][:, -1],
    }


def inject(actor: dfp.Actor, *draws: torch.Tensor) -> list:
    """Make `actor` draw the given noise tensors, in order (each [B, n, D], checked against the request)."""
    queue = list(draws)

    def noise(obs, generator=None):
        eps = queue.pop(0)
        assert eps.shape == (*obs.shape[:2], D), (eps.shape, obs.shape)
        return eps

    actor.noise = noise
    return queue


def draws(tag: str, online: bool) -> dict:
    """The reference's noise for one update: the actor's (TD target's best-of-16, then the generated samples) and,
    online, pi_old's (the N candidates)."""
    gen = ref(f"{tag}/actor/noise_drift" if online else f"{tag}/actor/noise").reshape(B, -1, D)
    return {
        "actor": [ref(f"{tag}/critic/noise_next"), gen],
        "ema_actor": [ref(f"{tag}/actor/noise_sel").reshape(B, -1, D)] if online else [],
    }


def fresh_modules() -> dict:
    """The script's own networks and Adam (build), holding the reference's initial parameters."""
    modules = dfp.build(ref_args(), OBS, A, "cpu", None)
    load(modules, "params/init", copies={EMA: ACTOR})  # the target critic apart from the critic, stored
    return modules


def critic_tols(tag: str) -> dict:
    """Bounds of the critic's terms: Q through CRITIC_PATH, the TD target through the actor's chunk too, the loss."""
    prefix = "params/init" if tag == "offline" else "params/offline"  # the parameters the update starts from
    d_next = bound(q_scale(tag, "critic/next_qs", prefix, TARGET), *ACTOR_PATH, *CRITIC_PATH)  # Q'(s', a'(actor))
    r, q, y = (ref(f"{tag}/{k}").double() for k in ("batch/rewards", "critic/q", "critic/target_q"))
    # y = r + gamma^h m Q': terms at |r| + |Q'|, 3 roundings
    d_y = d_next + bound(amax(r[:, -1]) + amax(ref(f"{tag}/critic/next_q")), 3)
    d_q = bound(q_scale(tag, "critic/q", prefix, CRITIC), *CRITIC_PATH)
    # L = mean(valid (q - y)^2) over E B: d/dq = 2 (q - y), then the mean of E B terms
    loss = float(REF[f"{tag}/critic/critic_loss"])
    d_loss = 2 * (q - y).abs().mean().item() * (d_q + d_y) + bound(loss, E * B, 2)
    return {
        "next_a": bound(amax(ref(f"{tag}/critic/next_actions")), *ACTOR_PATH),
        "next_q": d_next,
        "q": d_q,
        "y": d_y,
        "loss": d_loss,
        "dq_rel": (d_q + d_y) / amax(q - y),
    }  # d L / d q's relative error


def check_critic_terms(args, modules, tag):
    """TD target (best-of-16 next chunk, target critic), Q of the batch and the critic loss."""
    batch, tol = batch_of(tag), critic_tols(tag)
    actor, critic, target = modules["actor"], modules["critic"], modules["target_critic"]
    inject(actor, ref(f"{tag}/critic/noise_next"))
    best = dfp.best_of_n(actor, critic, batch["next_observations"], args.q_best_of)  # the argmax itself is exact
    close(best, f"{tag}/critic/next_actions", tol["next_a"])
    with torch.no_grad():
        cand = ref(f"{tag}/critic/next_candidates")
        close(dfp.q_mean(critic, batch["next_observations"], cand), f"{tag}/critic/next_candidate_q", tol["q"])
        next_qs = target(batch["next_observations"], ref(f"{tag}/critic/next_actions"))
        close(next_qs, f"{tag}/critic/next_qs", tol["q"])
    queue = inject(actor, ref(f"{tag}/critic/noise_next"))
    loss, q, y = dfp.critic_loss(args, actor, critic, target, batch)
    assert not queue
    close(y, f"{tag}/critic/target_q", tol["y"])
    close(q, f"{tag}/critic/q", tol["q"])
    close(loss, f"{tag}/critic/critic_loss", tol["loss"])


def actor_tols(tag: str, online: bool) -> dict:
    """Bounds of the actor's terms: samples through ACTOR_PATH, the drift scales, the drift losses (1 by construction
    with one temperature: the mean squared force normalized by its batch RMS; d log L / d log x and d log L / d log s
    are 0 in float64 on these inputs), and the relative error of d L / d gen, which the drift scale rescales."""
    G, K = ref_args().num_hypotheses, ref_args(tag.split("_")[-1] if online else "hard").K
    gen = ref(f"{tag}/actor/gen")
    names = [("drift_scale_tgt", 1, "actor_drift_loss_tgt"), ("drift_scale_pos", K, "actor_drift_loss_pos")]
    tol = {"gen": bound(amax(gen), *ACTOR_PATH)}
    for key, n_pos, loss_key in names if online else [("drift_scale", 1, "actor_drift_loss")]:
        s = float(REF[f"{tag}/actor/{key}"])
        tol[key] = drift_scale_error(gen, s, G + n_pos)
        tol[loss_key] = bound(abs(float(REF[f"{tag}/actor/{loss_key}"])), *ACTOR_PATH, D, G * (G + n_pos))
        tol["ds_rel"] = max(tol.get("ds_rel", 0.0), tol[key] / s)
    tol["loss"] = sum(v for k, v in tol.items() if "loss" in k)
    return tol


def record_drift(monkeypatch) -> list:
    """Record every drift() call of the script: (gen, pos, pos_weight) and what it returned."""
    calls, drift = [], dfp.drift

    def recorded(args, gen, pos, pos_weight=None):
        out = drift(args, gen, pos, pos_weight)
        calls.append({"gen": gen, "pos": pos, "weight": pos_weight, "out": out})
        return out

    monkeypatch.setattr(dfp, "drift", recorded)
    return calls


def grad_tol(tag: str, path: str, online: bool) -> float:
    """|d total / d param| bound for one tensor, at the scale of its largest reference entry: the forward path, the
    same layers backward and the sum over the batch (B G samples of D numbers for the actor, E B for the critic),
    plus the relative error of the upstream gradient (the drift scale's for the actor; q - y's for the critic)."""
    scale = amax(ref(f"grads/{tag}/{path}"))
    if path.startswith(ACTOR):
        n = B * ref_args().num_hypotheses
        return bound(scale, *ACTOR_PATH, *ACTOR_PATH, n, D) + scale * actor_tols(tag, online)["ds_rel"]
    return bound(scale, *CRITIC_PATH, *CRITIC_PATH, E * B) + scale * critic_tols(tag)["dq_rel"]


def adam_tol(tag: str, path: str, f, lr: float) -> torch.Tensor:
    """Elementwise bound of Adam's step difference. Its step is m^ / (sqrt(v^) + eps) with m^, v^ bias-corrected
    averages of the gradients so far (weights summing to 1): a gradient error d moves m^ and sqrt(v^) by <= d, and
    |m^| <= 1.0014 sqrt(v^) (Cauchy-Schwarz over the two steps' weights), so the step moves by
    <= 2.003 d / (sqrt(v^) - d + eps) and never by more than 2.003: float noise in a near-zero gradient entry can
    flip a whole step of lr. Their sqrt(v^) from their gradients; d = the gradient bound of each step taken."""
    b1, b2, eps = (float(v) for v in REF["config/adam_b1_b2_eps"])
    steps = ["offline"] if tag == "offline" else ["offline", tag]
    g = [f(ref(f"grads/{t}/{path}")).double() for t in steps]
    k = len(g)
    v = sum(b2 ** (k - 1 - i) * (1 - b2) * gi**2 for i, gi in enumerate(g)) / (1 - b2**k)
    d = max(grad_tol(t, path, t != "offline") for t in steps)
    return lr * torch.clamp(2.003 * d / ((v.sqrt() - d).clamp(min=0.0) + eps), max=2.003)


def check_update(args, modules, tag, online):
    """One update of the script (make_update: losses, backward, Polyak/EMA, Adam) against the reference's: every
    gradient, then every parameter after the step."""
    queues = [inject(modules[name], *d) for name, d in draws(tag, online).items()]
    before = {path: p.detach().clone() for p, path, _ in flax_paths(modules)}
    out = dfp.make_update(args, *modules.values())(batch_of(tag), online=online)
    assert not any(queues)  # every recorded draw was used, in order
    ct, at = critic_tols(tag), actor_tols(tag, online)
    close(out[0], f"{tag}/info/critic/critic_loss", ct["loss"])
    total = out[0] + (out[1] if not online else args.topk_weight * out[2] + args.bc_weight * out[1])
    close(total, f"{tag}/total_loss", ct["loss"] + at["loss"])
    grads = {path: (p.grad, f) for p, path, f in flax_paths(modules) if path.split("/")[0] in (ACTOR, CRITIC)}
    for path, (g, f) in grads.items():  # d total loss / d params, through one backward of critic + actor loss
        close(g, f"grads/{tag}/{path}", grad_tol(tag, path, online), map_ref=f)
    for p, path, f in flax_paths(modules):  # after Adam (actor, critic), Polyak (target) and EMA (pi_old)
        tol = bound(amax(before[path]), 3)  # theta' + tau (theta - theta'), or theta - lr step: their roundings
        if path.split("/")[0] in (ACTOR, CRITIC):
            tol = tol + adam_tol(tag, path, f, args.lr)
        close(p, f"params/{tag}/{path}", tol, map_ref=f)
    steps = {s["step"].item() for s in modules["optimizer"].state.values()}
    assert steps == {REF[f"{tag}/adam_count"].item()}, steps  # online: Adam kept from the offline phase


@pytest.fixture(scope="module")
def after_offline():
    """Our modules and Adam after the offline parity update (the online updates start from there)."""
    modules = fresh_modules()
    for name, d in draws("offline", online=False).items():
        inject(modules[name], *d)
    dfp.make_update(ref_args(), *modules.values())(batch_of("offline"), online=False)
    return modules


# ------------------------------------------------------------------------------------------------ the defaults
def test_defaults_are_the_reference_config():
    """Our defaults are the authors' cube config, as recorded with the reference (sizes aside)."""
    a, c = (
        dfp.Args(),
        lambda k: REF[f"config/{k}"].item() if REF[f"config/{k}"].ndim == 0 else tuple(REF[f"config/{k}"]),
    )
    pairs = {
        "lr": a.lr,
        "tau": a.tau,
        "actor_ema_tau": a.ema_tau,
        "discount": a.gamma,
        "alpha": a.alpha,
        "alpha_pos": a.topk_weight,
        "alpha_target": a.bc_weight,
        "gen_per_label": a.num_hypotheses,
        "online_n_samples": a.N,
        "online_pos_samples": a.K,
        "q_bon": a.q_best_of,
        "eval_bon": a.act_best_of,
        "num_qs": a.num_critics,
        "horizon_length": a.action_horizon,
        "drift_temps": a.temperatures,
        "online_drift_mode": a.online_mode,
        "q_agg": "mean",
        "online_neg_samples": 0,
        "q_alpha": 0.0,
        "use_actor_ema": 1.0,
        "actor_layer_norm": 0.0,
        "layer_norm": 1.0,
    }
    for k, ours in pairs.items():
        assert np.allclose(c(k), ours) if not isinstance(ours, str) else c(k) == ours, (k, c(k), ours)
    assert np.allclose(REF["config/adam_b1_b2_eps"], [0.9, 0.999, 1e-8])  # torch.optim.Adam's defaults
    opt = dfp.build(ref_args(), OBS, A, "cpu", None)["optimizer"]
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8 and opt.defaults["weight_decay"] == 0
    assert REF["config/layer_norm_eps"] == np.float32(1e-6) and (a.eval_episodes, a.exact_gelu) == (100, False)


def test_initialization_is_the_reference_scheme():
    """Xavier-uniform (variance_scaling(1, fan_avg, uniform)) kernels and zero biases, as the reference's init."""
    torch.manual_seed(0)
    actor, critic = dfp.Actor(40, 24, 256, 2), dfp.Critic(40, 24, 256, 2, 2)
    for w in [m.weight for m in actor.net if isinstance(m, torch.nn.Linear)] + list(critic.weights):
        fan_in, fan_out = (w.shape[1], w.shape[0]) if w.dim() == 2 else w.shape[1:]
        bound = (6 / (fan_in + fan_out)) ** 0.5
        assert w.abs().max() <= bound and abs(w.std().item() - bound / 3**0.5) < 0.05 * bound, w.shape
    assert all(not b.any() for b in [m.bias for m in actor.net if isinstance(m, torch.nn.Linear)] + list(critic.biases))
    assert not torch.equal(critic.weights[1][0], critic.weights[1][1])  # members drawn independently
    for k in ("params/init/modules_actor_drift/mlp/Dense_1", "params/init/modules_critic/value_net/Dense_1"):
        kernel = REF[f"{k}/kernel"]  # the reference's own draw lies within the same bound, biases zero
        assert np.abs(kernel).max() <= (6 / sum(kernel.shape[-2:])) ** 0.5 and not REF[f"{k}/bias"].any()


def test_chunk_construction_matches_reference_batches():
    """sample_chunks on the reference's synthetic dataset (regenerated by tools/make_references.py's own function)
    gives, for each chunk start of their batches, their discounted reward, min mask, valid flag, actions and s_{t+h}."""
    import make_references

    np.random.seed(make_references.DFP_DATA_SEED)
    data = make_references._dfp_dataset(
        types.SimpleNamespace(create=dict), np.random.default_rng(make_references.DFP_DATA_SEED)
    )
    data = {k: torch.as_tensor(np.asarray(v, np.float32)) for k, v in data.items()}
    n = len(data["observations"])
    for tag in ("offline", "online_hard"):
        b = batch_of(tag)
        starts = [int(torch.nonzero((data["observations"] == o).all(1))[0]) for o in b["observations"]]
        g = torch.Generator().manual_seed(0)
        # a window of exactly h entries starting at t: the only chunk that fits starts at t
        ours = [dfp.sample_chunks(data, t, H, n, g, 1, H, 0.99) for t in starts]
        for k in b:
            # gathered entries are exact; the discounted reward sums h terms at |r| (theirs in float64, ours float32)
            tol = bound(H * amax(data["rewards"]), H, H) if k == "rewards" else 0.0
            torch.testing.assert_close(torch.cat([c[k] for c in ours]), b[k], rtol=0.0, atol=tol, msg=k)
        assert 0.0 in b["valid"] and 0.0 in b["masks"]  # the batches exercise an episode end and a success


# ------------------------------------------------------------------------------------------------ one update each
def test_offline_update_parity_with_reference(monkeypatch):
    args, modules = ref_args(), fresh_modules()
    check_critic_terms(args, modules, "offline")
    calls = record_drift(monkeypatch)
    inject(modules["actor"], draws("offline", online=False)["actor"][1])
    la, lbc, ltop, scale, _ = dfp.actor_loss(
        args, modules["actor"], modules["ema_actor"], modules["critic"], batch_of("offline"), online=False
    )
    (call,) = calls
    tol = actor_tols("offline", online=False)
    close(call["gen"], "offline/actor/gen", tol["gen"])
    close(la, "offline/actor/actor_drift_loss", tol["actor_drift_loss"])
    close(scale, "offline/actor/drift_scale", tol["drift_scale"])
    assert ltop == 0 and torch.equal(call["pos"][:, 0], batch_of("offline")["actions"])
    monkeypatch.undo()
    check_update(args, modules, "offline", online=False)


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_online_update_parity_with_reference(mode, after_offline, monkeypatch):
    """From the offline update (our Adam state, the reference's parameters), the switch (Adam kept) with pi_old apart
    from the actor (the reference's stored start), then one online update."""
    tag, args, modules = f"online_{mode}", ref_args(mode), copy.deepcopy(after_offline)  # Adam's state included
    load(modules, "params/offline")
    load(modules, "params/online_start", only=(EMA,))  # pi_old: a perturbed copy of the actor, not the actor
    for copy_name, name in (("ema_actor", "actor"), ("target_critic", "critic")):  # non-degenerate starting state:
        for p, q in zip(modules[copy_name].parameters(), modules[name].parameters(), strict=True):
            assert not torch.equal(p, q), copy_name  # pi_old apart from the actor, the target critic from the critic
    check_critic_terms(args, modules, tag)

    calls, qs, q_mean = record_drift(monkeypatch), [], dfp.q_mean
    monkeypatch.setattr(dfp, "q_mean", lambda c, o, a: qs.append((a, q_mean(c, o, a))) or qs[-1][1])
    d = draws(tag, online=True)
    inject(modules["actor"], d["actor"][1])
    inject(modules["ema_actor"], *d["ema_actor"])
    la, lbc, ltop, scale, _ = dfp.actor_loss(
        args, modules["actor"], modules["ema_actor"], modules["critic"], batch_of(tag), online=True
    )
    ((pool, cand_q),) = qs
    tol, d_q = (
        actor_tols(tag, online=True),
        bound(q_scale(tag, "actor/cand_qs", "params/offline", CRITIC), *CRITIC_PATH),
    )
    close(pool, f"{tag}/actor/sel_pool", bound(amax(ref(f"{tag}/actor/sel_pool")), *ACTOR_PATH))  # pi_old's N
    d_q += bound(q_scale(tag, "actor/cand_qs", "params/offline", CRITIC), *ACTOR_PATH)  # the candidates' own error
    close(cand_q, f"{tag}/actor/cand_qs", d_q)  # scored by the current critic's mean
    bc, topk = calls
    close(bc["gen"], f"{tag}/actor/gen", tol["gen"])
    assert bc["gen"] is topk["gen"]  # one set of fresh samples for both terms
    flip = lambda x: x.flip(1)  # noqa: E731  ours best first, theirs ascending (argsort, last K)
    close(topk["pos"], f"{tag}/actor/pos_acts", tol["gen"], map_ref=flip)  # the top-K choice itself is exact
    if mode == "soft":  # w = 2 (q - min) / (max - min) - 1: q's error d_q in numerator and range, per row
        q_ref = ref(f"{tag}/actor/cand_qs").double()
        q_range = (q_ref.max(1).values - q_ref.min(1).values)[:, None]  # [B, 1]
        close(topk["weight"], f"{tag}/actor/weight_pos", 8 * d_q / q_range + bound(2.0, 4), map_ref=flip)
        w_ref = ref(f"{tag}/actor/weight_pos")  # non-degenerate: some weights clamp at 0, some do not
        assert (w_ref == 0).any() and (w_ref > 0).any()
    else:
        assert topk["weight"] is None
    close(args.topk_weight * ltop, f"{tag}/actor/actor_drift_loss_pos", tol["actor_drift_loss_pos"])
    close(args.bc_weight * lbc, f"{tag}/actor/actor_drift_loss_tgt", tol["actor_drift_loss_tgt"])
    close(la, f"{tag}/info/actor/actor_drift_loss", tol["loss"])
    close(scale, f"{tag}/actor/drift_scale_tgt", tol["drift_scale_tgt"])
    close(topk["out"][1], f"{tag}/actor/drift_scale_pos", tol["drift_scale_pos"])
    monkeypatch.undo()
    check_update(args, modules, tag, online=True)


def test_polyak_and_ema_start_from_the_pre_step_parameters():
    """With tau = ema_tau = 1 one update makes the target critic and pi_old exact copies of the critic and actor as
    they were BEFORE the Adam step (the reference's order), offline and online."""
    for online in (False, True):
        modules = fresh_modules()
        args = dfp.Args(**{**ref_args().__dict__, "tau": 1.0, "ema_tau": 1.0})
        before = {k: copy.deepcopy(modules[k].state_dict()) for k in ("actor", "critic")}
        torch.manual_seed(0)
        dfp.make_update(args, *modules.values())(batch_of("offline"), online=online)
        for k, copy_k in (("actor", "ema_actor"), ("critic", "target_critic")):
            for name, v in modules[copy_k].state_dict().items():
                assert torch.equal(v, before[k][name]), (copy_k, name)
                assert not torch.equal(modules[k].state_dict()[name], v), (k, name)  # the step moved the original
