"""Before/after report of a dbpo_ppo.py run: every evaluation against the first one, paired episode by episode.

    python scripts/dbpo_report.py runs/<dbpo run> --out docs/figures/<name>

Every evaluation of a run plays the same seeded episodes (episode i: env seed --seed + 100000 + i), and the run writes
each episode's return to <run dir>/eval_episodes.csv. So the change from the first evaluation (iteration 0: the
pretrained policy) to a later one is measured on pairs: the paired standard error is std(d_i) / sqrt(n) of the
per-episode differences d_i, usually far smaller than the unpaired sqrt(SE_before^2 + SE_after^2).

Prints a markdown table of the evaluations, and one of the training diagnostics from the tensorboard events, averaged
over blocks of iterations. With --out PREFIX it writes PREFIX.csv (the curve) and PREFIX.png (return vs env steps).
Bad input: one `error:` line, exit 2, nothing written.
"""

import argparse
import glob
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from envs import EPISODE_COLUMNS  # noqa: E402
from runs import atomic, check  # noqa: E402

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
    """{step: (env_steps, returns [n], lengths [n])} from eval_episodes.csv, every evaluation on the same seeds."""
    check(os.path.isfile(path), f"{path} does not exist: pass a dbpo_ppo.py run folder (it writes eval_episodes.csv)")
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
        out[step] = (int(c["env_steps"][r][0]), c["return"][r], c["length"][r], c["env_seed"][r])
    first = out[min(out)][3]
    check(
        all(len(v[3]) == len(first) and (v[3] == first).all() for v in out.values()),
        f"{path}: the evaluations do not play the same seeded episodes (different --eval-episodes?); cannot pair them",
    )
    return out


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
    evals = read_episodes(os.path.join(a.run_dir, "eval_episodes.csv"))
    tb = scalars(a.run_dir)

    base = evals[min(evals)][1]
    print(
        "| iteration | env steps | mean return +- SE | mean length | paired change | paired SE | change / SE | up / down |"
    )
    print("|---|---|---|---|---|---|---|---|")
    curve = []
    for step, (env_steps, ret, length, _) in sorted(evals.items()):
        d, n = ret - base, len(ret)
        se, d_se = ret.std(ddof=1) / np.sqrt(n) if n > 1 else 0.0, d.std(ddof=1) / np.sqrt(n) if n > 1 else 0.0
        z = d.mean() / d_se if d_se > 0 else 0.0
        first = step == min(evals)
        print(
            f"| {step} | {env_steps} | {ret.mean():.1f} +- {se:.1f} | {length.mean():.1f} | "
            + (
                "| | | |"
                if first
                else f"{d.mean():+.1f} | {d_se:.1f} | {z:+.2f} | {int((d > 0).sum())} / {int((d < 0).sum())} |"
            )
        )
        curve.append((step, env_steps, ret.mean(), se, d.mean(), d_se))

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
        train = tb.get("charts/episodic_return", {})
        steps_of = tb.get("charts/env_steps", {})
        with atomic(a.out + ".csv") as tmp, open(tmp, "w") as f:
            f.write("iteration,env_steps,eval_return,eval_return_se,paired_change,paired_se,train_episode_return\n")
            rows = {s: f"{s},{int(e)},{m:.4f},{se:.4f},{d:.4f},{dse:.4f}," for s, e, m, se, d, dse in curve}
            rows.update({i: f"{i},{int(steps_of[i])},,,,,{train[i]:.4f}" for i in train if i in steps_of})
            f.write("".join(rows[k] + "\n" for k in sorted(rows)))
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 3.8))
        ti = [i for i in sorted(train) if i in steps_of]
        ax.plot(
            [steps_of[i] for i in ti],
            [train[i] for i in ti],
            "-",
            lw=1,
            alpha=0.6,
            label="training episodes (sampled actions)",
        )
        x, m, se = (np.array([c[k] for c in curve]) for k in (1, 2, 3))
        ax.errorbar(
            x,
            m,
            yerr=se,
            fmt="s--",
            ms=5,
            capsize=3,
            label=f"evaluation: mean path, the same {len(base)} seeded episodes",
        )
        ax.set(xlabel="fine-tuning env steps", ylabel="episode return", title=a.title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        with atomic(a.out + ".png") as tmp:
            fig.savefig(tmp, dpi=120, format="png")
        print(f"\nwrote {a.out}.csv and {a.out}.png")


if __name__ == "__main__":
    main()
