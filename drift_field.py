"""Drifting fields: the one piece of math shared by the three scripts (docs/algorithms.md §1-§2).

A one-step generator x = f(eps, s) is trained by regressing its samples onto a frozen,
drifted copy of themselves:

    L = E || x - sg(x + V(x)) ||^2          (gradient flows only through x)

where the field V pulls x toward positive samples y+ ~ p and pushes it away from negative
samples y- ~ q (usually the generator's own samples). This file holds
- `mean_shift_field`: the textbook Gaussian kernel mean-shift field (docs/algorithms.md §1), which obeys
  V = h^2 (grad log p_kde - grad log q_kde) exactly;
- `drift_loss`: the normalized multi-temperature loss of the published code (docs/algorithms.md §2);
- `top_k`: the batched selection of the K best of N critic-scored candidates (docs/algorithms.md §3).

Everything is batched over conditions (a leading B axis, one set of samples per state), has no
Python loop over the batch, and runs unchanged on CPU or CUDA in any float dtype.
"""

from collections.abc import Sequence

import torch


def _check_samples(x: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    """Raise a ValueError unless `x` is [B, *, D] with the same B and D as `ref`."""
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape [B, n, D], got {tuple(x.shape)}")
    if x.shape[0] != ref.shape[0] or x.shape[2] != ref.shape[2]:
        raise ValueError(
            f"{name} {tuple(x.shape)} and {ref_name} {tuple(ref.shape)} must share the batch "
            f"size B (dim 0) and the feature size D (dim 2)"
        )


def _check_weight(w: torch.Tensor | None, name: str, samples: torch.Tensor, samples_name: str) -> None:
    if w is not None and tuple(w.shape) != tuple(samples.shape[:2]):
        raise ValueError(
            f"{name} must have shape {tuple(samples.shape[:2])} to match {samples_name} {tuple(samples.shape)}, "
            f"got {tuple(w.shape)}"
        )


# ---------------------------------------------------------------------------------------------
# docs/algorithms.md §1: the Gaussian kernel mean-shift field
# ---------------------------------------------------------------------------------------------
def _mean_shift(x: torch.Tensor, y: torch.Tensor, bandwidth: float, weight: torch.Tensor | None) -> torch.Tensor:
    """sum_j k(x,y_j) w_j (y_j - x) / sum_j k(x,y_j) w_j, with k(x,y) = exp(-||x-y||^2 / (2 h^2))."""
    diff = y[:, None, :, :] - x[:, :, None, :]  # [B, G, P, D]: y_j - x_i, exact even far from the origin
    logits = -diff.pow(2).sum(-1) / (2.0 * bandwidth**2)  # [B, G, P]
    if weight is not None:
        logits = logits + weight.log()[:, None, :]  # k * w = exp(logit + log w); w = 0 drops the sample
    # Softmax of logits, not a ratio of exponentials: stable when every kernel value underflows.
    kernel = torch.softmax(logits, dim=-1)  # [B, G, P], rows sum to 1
    return torch.einsum("bgp,bgpd->bgd", kernel, diff)  # [B, G, D]


def mean_shift_field(
    x: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor | None,
    bandwidth: float,
    pos_weight: torch.Tensor | None = None,
    neg_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Kernel mean-shift drifting field V(x) = V_p+(x) - V_q-(x) (docs/algorithms.md §1).

    x [B, G, D] particles, pos [B, P, D] positives, neg [B, Q, D] negatives (None: no repulsion),
    optional non-negative weights pos_weight [B, P], neg_weight [B, Q] (a weight of n acts like
    n copies of the sample). Returns V [B, G, D]; no gradient is needed through it, but autograd
    works. Identity: V = h^2 (grad_x log p_kde(x) - grad_x log q_kde(x)).
    """
    _check_samples(x, "x", x, "x")
    _check_samples(pos, "pos", x, "x")
    if pos.shape[1] == 0:
        raise ValueError(f"pos must hold at least one positive sample, got shape {tuple(pos.shape)}")
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
    _check_weight(pos_weight, "pos_weight", pos, "pos")
    v = _mean_shift(x, pos, bandwidth, pos_weight)  # V_p+
    if neg is not None and neg.shape[1] > 0:
        _check_samples(neg, "neg", x, "x")
        _check_weight(neg_weight, "neg_weight", neg, "neg")
        v = v - _mean_shift(x, neg, bandwidth, neg_weight)  # - V_q-
    return v


# ---------------------------------------------------------------------------------------------
# docs/algorithms.md §2: the normalized, multi-temperature drift loss of the published code
# ---------------------------------------------------------------------------------------------
def drift_loss(
    gen: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor | None = None,
    temperatures: Sequence[float] = (0.1,),
    gen_weight: torch.Tensor | None = None,
    pos_weight: torch.Tensor | None = None,
    neg_weight: torch.Tensor | None = None,
    attraction_only: bool = False,
    neg_only: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Drift loss || gen/s - sg(x/s + F) ||^2 per condition, following docs/algorithms.md §2 step by step.

    gen [B, Cg, S] generated samples (the only input that receives a gradient), pos [B, Cp, S]
    positives, neg [B, Cn, S] extra negatives (optional), weights [B, C*] (optional, default 1).
    attraction_only drops the repulsive part of the force; neg_only uses only `neg` as negatives
    (the generated samples stop repelling each other).
    Returns (loss [B], info) with info["scale"] (mean distance) and info[f"force_sq_{r}"] (mean
    squared force before normalization) for each temperature r; all are tensors (no host sync).
    """
    # --- input checks (shapes only: no device sync) ---
    _check_samples(gen, "gen", gen, "gen")
    _check_samples(pos, "pos", gen, "gen")
    if pos.shape[1] == 0:
        raise ValueError(f"pos must hold at least one positive sample, got shape {tuple(pos.shape)}")
    if neg is not None:
        _check_samples(neg, "neg", gen, "gen")
    if neg_only and (neg is None or neg.shape[1] == 0):
        raise ValueError("neg_only=True needs a non-empty neg [B, Cn, S]")
    if len(temperatures) == 0 or not all(r > 0 for r in temperatures):
        raise ValueError(f"temperatures must be a non-empty sequence of positive numbers, got {tuple(temperatures)}")
    _check_weight(gen_weight, "gen_weight", gen, "gen")
    _check_weight(pos_weight, "pos_weight", pos, "pos")

    B, Cg, S = gen.shape
    dtype = torch.promote_types(gen.dtype, torch.float32)  # half precision is computed in float32
    gen = gen.to(dtype)
    ones = lambda t: torch.ones(t.shape[:2], dtype=dtype, device=t.device)  # noqa: E731
    pos, w_pos = pos.to(dtype), ones(pos) if pos_weight is None else pos_weight.to(dtype)
    if neg is None:
        neg = gen.new_zeros(B, 0, S)
    _check_weight(neg_weight, "neg_weight", neg, "neg")
    neg, w_neg = neg.to(dtype), ones(neg) if neg_weight is None else neg_weight.to(dtype)
    Cn = neg.shape[1]

    with torch.no_grad():
        # 1. x = sg(gen); targets Y = [x, neg, pos] (generated samples are negatives too).
        x = gen.detach()  # [B, Cg, S]
        if neg_only:
            y, w = torch.cat([neg, pos], 1), torch.cat([w_neg, w_pos], 1)
        else:
            w_gen = ones(gen) if gen_weight is None else gen_weight.to(dtype)
            y, w = torch.cat([x, neg, pos], 1), torch.cat([w_gen, w_neg, w_pos], 1)  # [B, Ctot, S], [B, Ctot]

        # 2. d(x_i, y_j) = sqrt(max(|x_i|^2 + |y_j|^2 - 2 x_i.y_j, 1e-8))      [B, Cg, Ctot]
        sq = x.pow(2).sum(-1)[:, :, None] + y.pow(2).sum(-1)[:, None, :] - 2.0 * x @ y.transpose(1, 2)
        dist = sq.clamp_min(1e-8).sqrt()

        # 3. one global scale for the whole batch: mean weighted distance (self pairs included)
        scale = (dist * w[:, None, :]).mean() / w.mean()

        # 4. coordinates / s_in (order-1 coordinates), distances / scale (order-1 distances)
        s_in = (scale / S**0.5).clamp_min(1e-3)
        x_s, y_s = x / s_in, y / s_in
        dist_n = dist / scale.clamp_min(1e-3)

        # 5. a sample never repels itself: push the gen-gen diagonal far away
        if not neg_only:
            dist_n[:, :, :Cg] += 100.0 * torch.eye(Cg, dtype=dtype, device=gen.device)

        split = Cn if neg_only else Cg + Cn  # columns [0, split) are negatives, the rest positives
        info: dict[str, torch.Tensor] = {"scale": scale}
        force = torch.zeros_like(x_s)
        for r in temperatures:
            # 6. kernel exp(-d/(r*scale)); affinity = geometric mean of the softmax over targets j
            #    (rows) and over generated samples i (columns), times the target weight w_j
            logits = -dist_n / r
            a = (torch.softmax(logits, -1) * torch.softmax(logits, -2)).clamp_min(1e-6).sqrt() * w[:, None, :]

            # 7. c_neg = -A_neg * sum_j A_pos,  c_pos = A_pos * sum_j A_neg;
            #    F_r(x_i) = sum_j c_ij y_j - (sum_j c_ij) x_i
            a_neg, a_pos = a[:, :, :split], a[:, :, split:]
            c_neg = -a_neg * a_pos.sum(-1, keepdim=True)
            c_pos = a_pos * a_neg.sum(-1, keepdim=True)
            if attraction_only:
                c_neg = torch.zeros_like(c_neg)
            c = torch.cat([c_neg, c_pos], -1)  # [B, Cg, Ctot]
            force_r = c @ y_s - c.sum(-1, keepdim=True) * x_s  # [B, Cg, S]

            # 8. each temperature's force is normalized by its batch RMS, then summed
            force_sq = force_r.pow(2).mean()
            info[f"force_sq_{r}"] = force_sq
            force = force + force_r / force_sq.clamp_min(1e-8).sqrt()

        # 9. frozen goal in scaled coordinates
        goal = x_s + force

    loss = (gen / s_in - goal).pow(2).mean(dim=(1, 2))  # [B]
    return loss, info


# ---------------------------------------------------------------------------------------------
# Batched top-K (docs/algorithms.md §3)
# ---------------------------------------------------------------------------------------------
def top_k(candidates: torch.Tensor, scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k highest-scoring of N candidates per condition, best first.

    candidates [B, N, D], scores [B, N] -> (selected [B, k, D], indices [B, k]).
    Ties go to the lower index. A stable sort is used instead of `torch.topk`, whose order among
    equal scores is unspecified (and differs between CPU and CUDA); for N ~ 16 it costs the same.
    """
    if candidates.dim() != 3 or scores.dim() != 2 or candidates.shape[:2] != scores.shape:
        raise ValueError(
            f"candidates must be [B, N, D] and scores [B, N], got {tuple(candidates.shape)} and {tuple(scores.shape)}"
        )
    n = scores.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..N = 1..{n}, got k={k}")
    indices = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]  # [B, k]
    selected = candidates.gather(1, indices[:, :, None].expand(-1, -1, candidates.shape[2]))  # [B, k, D]
    return selected, indices
