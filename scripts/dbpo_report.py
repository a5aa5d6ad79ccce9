"""Before/after report of a dbpo_ppo.py run: every evaluation against the first one, paired episode by episode.

    python scripts/dbpo_report.py runs/<dbpo run> --out docs/figures/<name>

Every evaluation of a run plays the same seeded episodes (episode i: env seed --seed + 100000 + i), and the run writes
each episode's return to <run dir>/eval_episodes.csv (the mean path) and, with --eval-sampled, to
eval_episodes_sampled.csv (the sampled policy, the Gaussian PPO trains). So the change of a policy from its first
evaluation (iteration 0: the pretrained policy) to a later one is measured on pairs: the paired standard error is
std(d_i) / sqrt(n) of the per-episode differences d_i over the n episodes both played (with --eval-episodes-ends, the
first and the final evaluation play more episodes than those between), usually far smaller than the unpaired
sqrt(SE_before^2 + SE_after^2). Where both policies were evaluated, sampled - mean path is paired the same way.

Prints markdown tables of the evaluations and of the training diagnostics from the tensorboard events, averaged over
blocks of iterations. With --out PREFIX it writes PREFIX.csv (the curves) and PREFIX.png (return vs env steps).
Bad input: one `error:` line, exit 2, nothing written.
"""

import argparse
import glob
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from envs import EPISODE_COLUMNS  # noqa: E402  (the repository root is put on sys.path just above)
from runs import atomic, check  # noqa: E402  (the same)

POLICIES = {"mean path": "eval_episodes.csv", "sampled": "eval_episodes_sampled.csv"}  # what dbpo_ppo.py writes
DIAGNOSTICS = (
    ("approx. KL per update", "losses/approx_kl", ".1e"),
    ("clip fraction", "losses/clipfrac", ".3f"),
    ("critic explained variance", "losses/explained_variance", ".2f"),
    ("anchor loss", "losses/anchor_loss", ".1e"),
    ("raw advantage std", "charts/advantage_std", ".1f"),
    ("exploration std", "charts/std", ".3f"),
    ("actor lr", "charts/actor_lr", ".1e"),
    ("critic lr", "charts/critic_lr", ".1e"),
    ("training-episode return", "charts/episodic_return", ".0f"),
)


def read_episodes(path: str) -> dict:
    """{step: (env_steps, {env seed: return}, mean length)} from an eval_episodes CSV. Every evaluation must be
    paired with the first one on all its episodes: its seeds are among the first evaluation's."""
    try:
        rows = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
    except ValueError as e:
        check(False, f"{path} is not an eval_episodes.csv of dbpo_ppo.py ({e})")
    with open(path) as f:
        head = f.readline().strip()
    check(
        head == ",".join(EPISODE_COLUMNS) and rows.shape[1] == len(EPISODE_COLUMNS) and len(rows) > 0,
        f"{path}: expected the columns {','.join(EPISODE_COLUMNS)} of dbpo_ppo.py's eval_episodes.csv",
    )
    c = {name: rows[:, i] for i, name in enumerate(EPISODE_COLUMNS)}
    out = {}
    for step in np.unique(c["step"]).astype(int):
        r = c["step"] == step
        check(
            len(np.unique(c["env_seed"][r])) == r.sum(),
            f"{path}: iteration {step} plays an env seed twice; pass the eval_episodes.csv dbpo_ppo.py wrote",
        )
        out[step] = (
            int(c["env_steps"][r][0]),
            dict(zip(c["env_seed"][r], c["return"][r], strict=True)),
            c["length"][r],
        )
    first = out[min(out)][1]
    for step, (_, returns, _) in out.items():
        check(
            set(returns) <= set(first),
            f"{path}: iteration {step} played episodes that iteration {min(out)} did not (a larger --eval-episodes, "
            "or another --seed?); cannot pair them",
        )
    return out


def paired(after: dict, before: dict) -> tuple:
    """(mean change, paired SE, n, ups, downs) of after - before on the seeds both played ({seed: return} each)."""
    d = np.array([after[k] - before[k] for k in after if k in before])
    se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else 0.0
    return d.mean(), se, len(d), int((d > 0).sum()), int((d < 0).sum())


def scalars(run_dir: str) -> dict:
    """{tag: {iteration: value}} from the run's tensorboard events (a resumed run's later events win)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for f in sorted(glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))):
        ea = EventAccumulator(f, size_guidance={"scalars": 0})
        ea.Reload()
        for tag in ea.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in ea.Scalars(tag)})
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", help="a dbpo_ppo.py run folder")
    p.add_argument("--out", help="write PREFIX.csv and PREFIX.png")
    p.add_argument("--blocks", type=int, default=6, help="blocks of training iterations in the diagnostics table")
    p.add_argument("--title", default="DBPO fine-tuning", help="the figure's title")
    a = p.parse_args()
    check(a.blocks >= 1, f"--blocks must be >= 1, got {a.blocks}")
    check(os.path.isdir(a.run_dir), f"{a.run_dir} is not a folder: pass a dbpo_ppo.py run folder")
    if a.out:
        check(os.path.isdir(os.path.dirname(os.path.abspath(a.out))), f"--out {a.out}: its folder does not exist")
    paths = {policy: os.path.join(a.run_dir, name) for policy, name in POLICIES.items()}
    check(
        os.path.isfile(paths["mean path"]),
        f"{paths['mean path']} does not exist: pass a dbpo_ppo.py run folder (it writes eval_episodes.csv)",
    )
    evals = {policy: read_episodes(path) for policy, path in paths.items() if os.path.isfile(path)}
    both = sorted(set(evals.get("sampled", {})) & set(evals["mean path"]))  # iterations that evaluated both policies
    for step in both:
        check(
            evals["sampled"][step][1].keys() == evals["mean path"][step][1].keys(),
            f"{paths['sampled']}: iteration {step} played other episodes than the mean path; cannot pair them",
        )
    tb = scalars(a.run_dir)

    print(
        "| iteration | policy | env steps | episodes | mean return +- SE | mean length | paired change | paired SE "
        "| change / SE | up / down |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    curves = {}  # {policy: [(step, env steps, mean return, SE, paired change, paired SE)]}
    for policy, ev in evals.items():
        base = ev[min(ev)][1]
        for step, (env_steps, ret, length) in sorted(ev.items()):
            r = np.array(list(ret.values()))
            se = r.std(ddof=1) / np.sqrt(len(r)) if len(r) > 1 else 0.0
            d, d_se, n, up, down = paired(ret, base)
            cells = f"{d:+.1f} | {d_se:.1f} | {d / d_se if d_se > 0 else 0.0:+.2f} | {up} / {down} |"
            print(
                f"| {step} | {policy} | {env_steps} | {len(r)} | {r.mean():.1f} +- {se:.1f} | {length.mean():.1f} | "
                + ("| | | |" if step == min(ev) else cells)
            )
            curves.setdefault(policy, []).append((step, env_steps, r.mean(), se, d, d_se))
    if "sampled" in evals:
        print("\nSampled policy - mean path, on the episodes both played:\n")
        print("| iteration | episodes | sampled - mean path | paired SE | change / SE | up / down |")
        print("|---|---|---|---|---|---|")
        for step in both:
            d, d_se, n, up, down = paired(evals["sampled"][step][1], evals["mean path"][step][1])
            print(f"| {step} | {n} | {d:+.1f} | {d_se:.1f} | {d / d_se if d_se > 0 else 0.0:+.2f} | {up} / {down} |")

    trained = sorted(tb.get("charts/env_steps", {}))
    if trained:
        print(f"\nDiagnostics, means over blocks of training iterations ({trained[0]}-{trained[-1]}):\n")
        edges = np.array_split(np.array(trained), min(a.blocks, len(trained)))
        print("| training iterations | " + " | ".join(f"{b[0]}-{b[-1]}" for b in edges) + " |")
        print("|---|" + "---|" * len(edges))
        for name, tag, fmt in DIAGNOSTICS:
            vals = tb.get(tag, {})
            cells = [np.mean([vals[i] for i in b if i in vals]) if any(i in vals for i in b) else None for b in edges]
            print(f"| {name} | " + " | ".join("-" if c is None else format(c, fmt) for c in cells) + " |")

    if a.out:
        write_outputs(a, curves, tb)


def write_outputs(a, curves: dict, tb: dict) -> None:
    """PREFIX.csv: one row per iteration (each policy's evaluation, the training episodes' return); PREFIX.png."""
    steps_of = tb.get("charts/env_steps", {})
    train = {i: v for i, v in tb.get("charts/episodic_return", {}).items() if i in steps_of}
    columns = {  # the CSV's columns of each policy's curve (the mean path's as before the sampled one existed)
        "mean path": ("eval_return", "eval_return_se", "paired_change", "paired_se"),
        "sampled": ("sampled_return", "sampled_return_se", "sampled_paired_change", "sampled_paired_se"),
    }
    rows = {i: {"env_steps": f"{int(steps_of[i])}", "train_episode_return": f"{train[i]:.4f}"} for i in train}
    for policy, curve in curves.items():
        for step, env_steps, *values in curve:
            row = rows.setdefault(step, {"env_steps": f"{env_steps}"})
            row.update({c: f"{v:.4f}" for c, v in zip(columns[policy], values, strict=True)})
    header = ["iteration", "env_steps", *columns["mean path"], *columns["sampled"], "train_episode_return"]
    with atomic(a.out + ".csv") as tmp, open(tmp, "w") as f:
        f.write(",".join(header) + "\n")
        f.writelines(",".join([str(i)] + [rows[i].get(c, "") for c in header[1:]]) + "\n" for i in sorted(rows))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    ti = sorted(train)
    ax.plot(
        [steps_of[i] for i in ti], [train[i] for i in ti], "-", lw=1, alpha=0.6, label="training episodes (sampled)"
    )
    for (policy, curve), fmt in zip(curves.items(), ("s--", "o:"), strict=False):
        x, m, se = (np.array([c[k] for c in curve]) for k in (1, 2, 3))
        ax.errorbar(x, m, yerr=se, fmt=fmt, ms=5, capsize=3, label=f"evaluation: {policy}, seeded episodes")
    ax.set(xlabel="fine-tuning env steps", ylabel="episode return", title=a.title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic(a.out + ".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    print(f"\nwrote {a.out}.csv and {a.out}.png")


if __name__ == "__main__":
    main()
