"""Tests of drift_field.py: math identities, invariances, parity with the published loss, learning."""

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import drift_field as df  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
f64 = dict(dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# mean_shift_field (docs/algorithms.md §1)
# ---------------------------------------------------------------------------------------------
def kde_score(x, y, h, w=None):
    """grad_x log p_kde(x), p_kde(x) = sum_j w_j exp(-|x-y_j|^2/(2h^2)), by autograd of a log-sum-exp."""
    x = x.detach().clone().requires_grad_(True)
    logits = -((x[:, :, None, :] - y[:, None, :, :]) ** 2).sum(-1) / (2 * h**2)  # [B, G, P]
    if w is not None:
        logits = logits + w.log()[:, None, :]
    (grad,) = torch.autograd.grad(torch.logsumexp(logits, -1).sum(), x)
    return grad


@pytest.mark.parametrize(
    "B,G,P,Q,D,h,spread",
    [(1, 1, 1, 1, 1, 1.0, 1.0), (3, 5, 7, 4, 2, 0.5, 1.0), (2, 8, 16, 8, 25, 2.0, 3.0), (4, 3, 2, 6, 3, 0.3, 30.0)],
)
def test_score_difference_identity(B, G, P, Q, D, h, spread):
    """V = h^2 (grad log p_kde - grad log q_kde), including points hundreds of bandwidths apart."""
    g = torch.Generator().manual_seed(B * 100 + D)
    x = spread * torch.randn(B, G, D, generator=g, **f64)
    pos = spread * torch.randn(B, P, D, generator=g, **f64) + 5.0
    neg = spread * torch.randn(B, Q, D, generator=g, **f64) - 5.0
    v = df.mean_shift_field(x, pos, neg, h)
    expected = h**2 * (kde_score(x, pos, h) - kde_score(x, neg, h))
    assert v.shape == (B, G, D)
    assert torch.isfinite(v).all()
    torch.testing.assert_close(v, expected, rtol=1e-9, atol=1e-9 * spread)


def test_score_identity_with_weights_and_far_points():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(2, 3, 4, **f64)
    pos = 1e3 + torch.randn(2, 5, 4, generator=g, **f64)  # every kernel value underflows to 0 in float64
    neg = -1e3 + torch.randn(2, 6, 4, generator=g, **f64)
    wp, wn = torch.rand(2, 5, generator=g, **f64) + 0.1, torch.rand(2, 6, generator=g, **f64) + 0.1
    v = df.mean_shift_field(x, pos, neg, 1.0, wp, wn)
    expected = kde_score(x, pos, 1.0, wp) - kde_score(x, neg, 1.0, wn)
    assert torch.isfinite(v).all()
    torch.testing.assert_close(v, expected, rtol=1e-9, atol=1e-6)


def test_field_properties():
    g = torch.Generator().manual_seed(1)
    x, pos = torch.randn(3, 4, 5, generator=g, **f64), torch.randn(3, 6, 5, generator=g, **f64)
    neg = torch.randn(3, 2, 5, generator=g, **f64)
    # V = 0 when positives and negatives are the same set
    torch.testing.assert_close(df.mean_shift_field(x, pos, pos.clone(), 0.7), torch.zeros_like(x))
    # one positive: V_p+(x) = y - x for any bandwidth
    one = pos[:, :1]
    torch.testing.assert_close(df.mean_shift_field(x, one, None, 0.1), one - x)
    # translation equivariance: V(x + c) with all points moved by c is unchanged
    c = torch.randn(1, 1, 5, generator=g, **f64) * 10
    torch.testing.assert_close(df.mean_shift_field(x + c, pos + c, neg + c, 0.8), df.mean_shift_field(x, pos, neg, 0.8))
    # joint scaling of points and bandwidth scales the field
    a = 3.5
    torch.testing.assert_close(
        df.mean_shift_field(a * x, a * pos, a * neg, a * 0.8), a * df.mean_shift_field(x, pos, neg, 0.8)
    )
    # integer weights act like repeated samples
    w = torch.tensor([[1.0, 3.0, 2.0, 1.0, 1.0, 1.0]] * 3, **f64)
    repeated = torch.repeat_interleave(pos, w[0].long(), dim=1)
    torch.testing.assert_close(
        df.mean_shift_field(x, pos, neg, 0.9, pos_weight=w), df.mean_shift_field(x, repeated, neg, 0.9)
    )


# ---------------------------------------------------------------------------------------------
# drift_loss (docs/algorithms.md §2)
# ---------------------------------------------------------------------------------------------
def test_drift_loss_parity_with_published_implementation():
    """Outputs and gradients equal those of the authors' JAX code (KAIST-Visual-AI-Group/DFP,
    utils/drift_loss.py at commit 8b2b07d, float32, jax 0.10.2) on random inputs, stored in
    tests/data/drift_loss_reference.npz (tests/data/README.md says how it was made)."""
    ref = np.load(os.path.join(HERE, "data", "drift_loss_reference.npz"))
    n_cases = int(ref["n_cases"])
    assert n_cases >= 6

    def get(c, k):  # case c's array k as a tensor; None where the case has none (an optional input)
        return torch.from_numpy(ref[f"{c}/{k}"]) if f"{c}/{k}" in ref else None

    for c in range(n_cases):
        gen = get(c, "gen").requires_grad_(True)
        temps = tuple(float(t) for t in ref[f"{c}/temperatures"])
        flags = dict(attraction_only=bool(ref[f"{c}/attraction_only"]), neg_only=bool(ref[f"{c}/neg_only"]))
        loss, info = df.drift_loss(
            gen,
            *(get(c, k) for k in ("pos", "neg")),
            temps,
            *(get(c, f"{k}_weight") for k in ("gen", "pos", "neg")),
            **flags,
        )
        loss.sum().backward()
        torch.testing.assert_close(loss, get(c, "loss"), rtol=1e-4, atol=1e-6, msg=f"loss, case {c}")
        torch.testing.assert_close(gen.grad, get(c, "grad"), rtol=1e-4, atol=1e-6, msg=f"grad, case {c}")
        torch.testing.assert_close(info["scale"], get(c, "scale")[()], rtol=1e-4, atol=0.0)


def _inputs(seed, B=4, Cg=8, Cp=3, Cn=0, S=6, **kw):
    g = torch.Generator().manual_seed(seed)
    gen = torch.randn(B, Cg, S, generator=g, **kw, **f64)
    pos = torch.randn(B, Cp, S, generator=g, **f64) + 1.0
    neg = torch.randn(B, Cn, S, generator=g, **f64) - 1.0 if Cn else None
    return gen, pos, neg


def test_gradient_only_through_gen_and_points_along_force():
    gen, pos, neg = _inputs(0, Cn=2, requires_grad=True)
    pos.requires_grad_(True), neg.requires_grad_(True)
    loss, info = df.drift_loss(gen, pos, neg)
    loss.sum().backward()
    assert loss.shape == (4,) and pos.grad is None and neg.grad is None
    assert gen.grad is not None and torch.isfinite(gen.grad).all()
    # One temperature: the force is normalized to unit mean square (step 8), so the mean loss is exactly 1; a force
    # normalized another way (per condition, by its mean, not at all) would not give 1.
    torch.testing.assert_close(loss.mean(), torch.tensor(1.0, **f64))
    assert set(info) == {"scale", "force_sq_0.1"}
    # One sample, one positive, no negatives: the only force is the pull p - x (the self pair is masked), and the
    # loss's gradient is -2 F / (Cg S s_in): descending it moves the sample straight at the positive.
    x1 = gen[:, :1].detach().clone().requires_grad_(True)
    df.drift_loss(x1, pos[:, :1])[0].sum().backward()
    cos = torch.nn.functional.cosine_similarity(-x1.grad, pos[:, :1] - x1.detach(), dim=-1)
    torch.testing.assert_close(cos, torch.ones_like(cos))


def test_drift_loss_translation_and_scale_invariance():
    gen, pos, neg = _inputs(1, Cn=3)
    temps = (0.05, 0.2)
    base, _ = df.drift_loss(gen, pos, neg, temps)
    shifted, _ = df.drift_loss(gen + 2.5, pos + 2.5, neg + 2.5, temps)
    scaled, info = df.drift_loss(7.0 * gen, 7.0 * pos, 7.0 * neg, temps)
    assert info["scale"] > 1.0  # far from the 1e-3 floors
    torch.testing.assert_close(shifted, base, rtol=1e-6, atol=1e-8)
    # Not exact: each self pair's distance is floored at sqrt(1e-8) (docs/algorithms.md §2, step 2), and that
    # floor, which does not scale, enters the mean distance `scale`: ~1e-6 relative here.
    torch.testing.assert_close(scaled, base, rtol=1e-5, atol=1e-8)


def _force(gen, pos, neg=None, **kw):
    """The (normalized) force implied by the loss gradient: d loss_b / d gen = -2 F / (Cg S s_in)."""
    gen = gen.detach().clone().requires_grad_(True)
    loss, _ = df.drift_loss(gen, pos, neg, **kw)
    loss.sum().backward()
    return -gen.grad


def test_attraction_only_and_neg_only():
    gen, pos, _ = _inputs(2, Cp=1)
    # attraction_only with one positive: the force on every sample points straight at it
    f = _force(gen, pos, attraction_only=True)
    cos = torch.nn.functional.cosine_similarity(f, pos - gen, dim=-1)
    torch.testing.assert_close(cos, torch.ones_like(cos))
    assert (torch.nn.functional.cosine_similarity(_force(gen, pos), pos - gen, dim=-1) < 0.999).any()
    # neg_only with negatives equal to the positives: attraction and repulsion cancel exactly,
    # while by default the generated samples still repel each other.
    pos4 = _inputs(3, Cp=4)[1]
    loss, _ = df.drift_loss(gen, pos4, pos4.clone(), neg_only=True)
    torch.testing.assert_close(loss, torch.zeros_like(loss))
    # By default the same positives and negatives still leave the samples' mutual repulsion: a small step along the
    # force spreads them apart (the mean pairwise distance grows), where neg_only's zero force leaves them as they are.
    f = _force(gen, pos4, pos4.clone())
    step = 0.01 * f / f.norm(dim=-1).mean()
    assert torch.cdist(gen + step, gen + step).mean() > torch.cdist(gen, gen).mean()


def test_self_mask_keeps_a_sample_from_repelling_itself():
    """x1 at the origin, x2 just to its right, the positive straight up. With the self mask x1 is
    clearly pushed left by x2; if x1's own copy counted as a negative (neg_only with neg = gen,
    no mask) its huge self-affinity would drown that repulsion."""
    gen = torch.tensor([[[0.0, 0.0], [0.3, 0.0]]], **f64)
    pos = torch.tensor([[[0.0, 3.0]]], **f64)
    masked = _force(gen, pos)[0, 0]
    unmasked = _force(gen, pos, gen.clone(), neg_only=True)[0, 0]
    assert masked[1] > 0 and unmasked[1] > 0  # both attracted upward
    assert masked[0] < -5 * abs(unmasked[0].item())  # repulsion from x2 survives only with the mask
    assert masked[0] / masked[1] < -0.05


def test_weights_and_multi_temperature_info():
    gen, pos, neg = _inputs(4, Cn=2)
    w_pos = torch.ones(4, 3, **f64)
    a, _ = df.drift_loss(gen, pos, neg, (0.02, 0.05, 0.2))
    b, info = df.drift_loss(gen, pos, neg, (0.02, 0.05, 0.2), pos_weight=w_pos)
    torch.testing.assert_close(a, b)
    assert {"force_sq_0.02", "force_sq_0.05", "force_sq_0.2"} <= set(info)
    # weighting one positive up pulls samples toward it
    w_pos[:, 0] = 5.0
    f0, f1 = _force(gen, pos, neg), _force(gen, pos, neg, pos_weight=w_pos)
    to_p0 = pos[:, :1] - gen
    assert (f1 * to_p0).sum() > (f0 * to_p0).sum()


def test_drift_loss_dtypes():
    gen = torch.randn(2, 4, 3, dtype=torch.bfloat16, requires_grad=True)
    loss, _ = df.drift_loss(gen, torch.randn(2, 1, 3, dtype=torch.bfloat16))
    assert loss.dtype == torch.float32
    loss.sum().backward()
    assert gen.grad.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# top_k (docs/algorithms.md §3)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 4, 16])
def test_top_k_matches_brute_force_sort_with_ties(k):
    g = torch.Generator().manual_seed(k)
    scores = torch.randint(0, 4, (32, 16), generator=g).float()  # many ties
    cands = torch.randn(32, 16, 5, generator=g)
    selected, idx = df.top_k(cands, scores, k)
    assert selected.shape == (32, k, 5) and idx.shape == (32, k)
    for b in range(32):
        order = sorted(range(16), key=lambda j: (-scores[b, j].item(), j))[:k]  # best first, low index on ties
        assert idx[b].tolist() == order
        torch.testing.assert_close(selected[b], cands[b, order])


# ---------------------------------------------------------------------------------------------
# Bad input: one ValueError that names the problem, for each function
# ---------------------------------------------------------------------------------------------
X, G3, P3 = torch.randn(2, 3, 4), torch.randn(2, 4, 3), torch.randn(2, 1, 3)  # [B, G, D] samples, positives
BAD_INPUT = [  # (id, the call, what the error says)
    ("field-batch", lambda: df.mean_shift_field(X, torch.randn(3, 5, 4), None, 1.0), "batch size"),
    ("field-feature", lambda: df.mean_shift_field(X, torch.randn(2, 5, 3), None, 1.0), "feature size"),
    ("field-bandwidth", lambda: df.mean_shift_field(X, torch.randn(2, 5, 4), None, 0.0), "bandwidth"),
    ("field-no-pos", lambda: df.mean_shift_field(X, torch.randn(2, 0, 4), None, 1.0), "at least one positive"),
    ("field-weight", lambda: df.mean_shift_field(X, torch.randn(2, 5, 4), None, 1.0, torch.ones(2, 4)), "pos_weight"),
    ("loss-batch", lambda: df.drift_loss(G3, torch.randn(3, 1, 3)), "batch size"),
    ("loss-feature", lambda: df.drift_loss(G3, P3, torch.randn(2, 2, 5)), "feature size"),
    ("loss-temperatures", lambda: df.drift_loss(G3, P3, temperatures=(0.1, -1.0)), "temperatures"),
    ("loss-no-pos", lambda: df.drift_loss(G3, torch.randn(2, 0, 3)), "at least one positive"),
    ("loss-neg-only", lambda: df.drift_loss(G3, P3, neg_only=True), "neg_only"),
    ("loss-weight", lambda: df.drift_loss(G3, P3, gen_weight=torch.ones(2, 5)), "gen_weight"),
    ("top-k-above-n", lambda: df.top_k(torch.randn(2, 16, 3), torch.randn(2, 16), 17), "k must be in 1..N"),
    ("top-k-zero", lambda: df.top_k(torch.randn(2, 16, 3), torch.randn(2, 16), 0), "k must be in 1..N"),
    ("top-k-scores", lambda: df.top_k(torch.randn(2, 16, 3), torch.randn(2, 15), 4), "scores"),
]


@pytest.mark.parametrize("call,message", [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_bad_input_raises_one_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------------------------------------
# Learning: a one-step generator covers both modes of a mixture; MSE regression collapses
# ---------------------------------------------------------------------------------------------
def _train_generator(loss_kind, steps=300, seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(1, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 1)
    )
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    B, G, P = 16, 16, 16
    for _ in range(steps):
        data = 2.0 * torch.sign(torch.randn(B, P, 1)) + 0.2 * torch.randn(B, P, 1)  # modes at -2 and +2
        x = net(torch.randn(B, G, 1))  # [B, G, 1]
        if loss_kind == "drift":
            loss = df.drift_loss(x, data, temperatures=(0.05, 0.2))[0].mean()
        elif loss_kind == "mean_shift":
            # h must be comparable to the gap between the modes: a narrow kernel sees too little
            # repulsion between generated samples and collapses onto one mode.
            v = df.mean_shift_field(x.detach(), data, x.detach(), bandwidth=1.5)
            loss = (x - (x + v).detach()).pow(2).mean()
        else:  # plain regression of noise onto randomly paired data: learns the mean
            loss = (x - data[:, :G]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return net(torch.randn(4000, 1)).squeeze(-1)


@pytest.mark.parametrize("loss_kind", ["drift", "mean_shift"])
def test_generator_covers_both_modes(loss_kind):
    samples = _train_generator(loss_kind)
    right = (samples > 0).float().mean().item()
    off_mean = (samples.abs() > 1.0).float().mean().item()
    assert 0.3 <= right <= 0.7, f"mode balance {right:.2f}"
    assert off_mean > 0.75, f"only {off_mean:.2f} of samples away from the mean"
    if loss_kind == "drift":  # the normalized loss also concentrates the samples on the modes
        near_mode = ((samples.abs() - 2.0).abs() < 0.6).float().mean().item()
        assert near_mode > 0.75, f"only {near_mode:.2f} of samples near a mode"


def test_mse_regression_collapses_to_the_mean():
    samples = _train_generator("mse")
    assert (samples.abs() > 1.0).float().mean() < 0.2 and samples.abs().mean() < 0.6
