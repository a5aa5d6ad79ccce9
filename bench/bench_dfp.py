"""Speed of dfp_offline_to_online.py beside its limit: the same matrix products alone, timed in the same run.

    python bench/bench_dfp.py                          # CPU, 1 thread: writes bench/results/dfp_cpu.json
    python bench/bench_dfp.py --device cuda            # adds --cudagraphs: bench/results/dfp_cuda.json

Training: updates/s of the offline and the online update (chunk sampling on the device included), eager and
--compile (and --cudagraphs, --compile --cudagraphs on CUDA), for 4x512 and 4x256 networks, batch 256, h = 5,
cube-triple shapes (obs 46, action 5). The limit of one update is its matrix products alone (forward and backward
GEMMs of the same shapes):
  actor forward + backward on B x num_hypotheses = 2048 rows, critic ensemble forward + backward on B = 256 rows,
  the TD target's best-of-16: actor + critic forwards on 4096 rows (+ target critic on 256 rows),
  online also: pi_old candidates, actor + critic forwards on B x N = 4096 rows.
ratio = update time / limit time (1.0 = nothing but matrix products); the limit's timed blocks alternate with the
update's, so both see the same load on a shared machine, and the best block of each counts.
Acting: latency at batch 1 of one chunk (1 NFE), best-of-16 (1 NFE + critic), and, with the same network, a
10-step flow sampler and a 100-step diffusion sampler (10 / 100 sequential NFEs): the "1 NFE vs 10/100" figure.
Online step: a WHOLE online step of the script (online_step: acting best-of-16 once per chunk, the env step, the
buffer insert, the sampling and the update) beside the bare offline step (offline_step), with a synthetic env of
cube-triple's spaces (random observations, 1000-step episodes; its step costs ~0, a real MuJoCo step ~2-3 ms on CPU),
at torch's default thread count and at 1 thread: ratio = online step / offline step. The "before" column is the same
step with the replay buffer's former insert (6 host tensors built, 12 small copies per step), alternated with it.
Needs only torch and numpy (gymnasium/ogbench only for the optional evaluation row). Timings depend on the machine
and on what else runs on it: pass --label to say what the machine was. The JSON (with the GPU's name and the versions)
is rewritten after every row, so a run stopped by a timeout keeps the rows it measured.
"""

import argparse
import functools
import itertools
import os
import shlex
import sys
import time
import types

import numpy as np
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import machine  # noqa: E402

from replay import KEYS, ReplayBuffer  # noqa: E402


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 0 = torch's default)")
    p.add_argument("--hidden-dims", type=int, nargs="+", default=[512, 256], help="network widths (4 layers each)")
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--obs-dim", type=int, default=46, help="cube-single 28, double 37, triple 46, quadruple 55")
    p.add_argument("--act-dim", type=int, default=5)
    p.add_argument("--action-horizon", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--updates", type=int, default=8, help="timed updates per block, phase and mode (after warm-up)")
    p.add_argument("--repeats", type=int, default=3, help="timed blocks per measurement; the best one counts")
    p.add_argument("--actions", type=int, default=50, help="timed action selections per acting mode")
    p.add_argument(
        "--no-compile",
        action="store_true",
        help="skip the --compile rows, with and without --cudagraphs (compiling takes minutes)",
    )
    p.add_argument("--eval-episodes", type=int, default=50, help="episodes of the evaluation-time row (0: skip)")
    p.add_argument("--eval-envs", type=int, default=2, help="envs (worker processes) of the vectorized evaluation")
    p.add_argument("--online-step-only", action="store_true", help="only the whole-online-step rows")
    p.add_argument("--label", default="", help="what the machine was (e.g. 'busy shared 2-core CPU')")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/dfp_<device>.json)")
    return p.parse_args()


def best_time(fn, n: int, repeats: int, sync, paired=None):
    """Seconds per call of fn: the best of `repeats` blocks of n calls (fn is warmed up by the caller).
    paired = (fn2, n2), or a list of such pairs: their blocks alternate with fn's, so that all see the same load on a
    shared machine; returns (fn's time, fn2's time, ...)."""
    fns = [(fn, n)] + (paired if isinstance(paired, list) else [paired] if paired else [])
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, (f, k) in enumerate(fns):
            sync()
            t = time.perf_counter()
            for _ in range(k):
                f()
            sync()
            best[i] = min(best[i], (time.perf_counter() - t) / k)
    return tuple(best) if paired else best[0]


def gemm_chain(dims, E: int, rows: int, backward: bool, device):
    """The matrix products of an MLP alone (dims [d_in, H, .., d_out], E members): per layer x @ W forward, and
    backward dY @ W^T (not for the first layer, whose input needs no gradient) and X^T @ dY. No bias, activation,
    norm, loss or optimizer: what the update would cost if it were nothing but its matrix products."""
    xs = [torch.randn(E, rows, d, device=device) for d in dims[:-1]]  # layer inputs
    ws = [torch.randn(E, i, o, device=device) for i, o in itertools.pairwise(dims)]
    dys = [torch.randn(E, rows, o, device=device) for o in dims[1:]]

    def run():
        for x, w in zip(xs, ws, strict=True):
            torch.bmm(x, w)
        if backward:
            for i, (x, w, dy) in enumerate(zip(xs, ws, dys, strict=True)):
                if i > 0:
                    torch.bmm(dy, w.transpose(1, 2))
                torch.bmm(x.transpose(1, 2), dy)

    return run


def train_step(update, sample, online: bool):
    """One update on a freshly sampled batch of chunks (the sampling on the device is part of the step)."""
    return update(sample(), online=online)


@torch.no_grad()
def euler(actor, obs, steps: int):
    """x <- x + dt * f(s, x), `steps` times: a flow / diffusion sampler's cost with the actor's network, obs [1, O]."""
    x = torch.randn(1, actor.act_dim, device=obs.device)
    for _ in range(steps):
        x = x + actor.net(torch.cat([obs, x], -1)) / steps
    return x


def main():
    b = parse()
    default_threads = torch.get_num_threads()
    if b.threads:
        torch.set_num_threads(b.threads)
    if b.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        sys.exit(2)
    sys.path.insert(0, ROOT)
    try:
        import gymnasium  # noqa: F401
    except ImportError:  # the script's env classes subclass gymnasium's; the training and acting rows build no env
        sys.modules["gymnasium"] = type(sys)("gymnasium")
        sys.modules["gymnasium"].Env = sys.modules["gymnasium"].Wrapper = object
    import dfp_offline_to_online as dfp  # after the checks; needs torch, numpy, tyro (gymnasium, ogbench optional)
    import runs

    dev = torch.device(b.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    modes = [
        m
        for m in ("eager", "compile", "cudagraphs", "compile+cudagraphs")
        if not (b.no_compile and "compile" in m) and (dev.type == "cuda" or "cudagraphs" not in m)
    ]
    obs_dim, D = b.obs_dim, b.act_dim * b.action_horizon
    load = os.getloadavg()
    print(
        f"device {dev} ({torch.cuda.get_device_name() if dev.type == 'cuda' else 'CPU'}), threads "
        f"{torch.get_num_threads()}, torch {torch.__version__}, obs {obs_dim}, chunk {b.action_horizon}x{b.act_dim}, "
        f"batch {b.batch_size}, load average {load[0]:.2f} {b.label}",
        flush=True,
    )
    results = {
        "command": "python " + shlex.join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
        "label": b.label,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average_start": load,
        "machine": machine.info(dev.type),
        "training": [],
        "acting": [],
        "online_step": [],
        "evaluation": None,
    }
    out = b.out or os.path.join(ROOT, "bench", "results", f"dfp_{dev.type}.json")

    g = torch.Generator().manual_seed(0)
    n = 10_000
    data = dfp.to_tensors(
        {
            "observations": torch.randn(n, obs_dim, generator=g),
            "next_observations": torch.randn(n, obs_dim, generator=g),
            "actions": torch.rand(n, b.act_dim, generator=g) * 2 - 1,
            "rewards": -torch.ones(n),
            "masks": torch.ones(n),
            "terminals": (torch.arange(n) % 1000 == 999).float(),
        },
        dev,
    )
    if not b.online_step_only:
        print(
            f"{'net':<6} {'phase':<8} {'mode':<19} {'updates/s':>9} {'ms/update':>9} {'limit ms':>8} {'ratio':>6}"
            f"   (compile s)",
            flush=True,
        )
    for H in b.hidden_dims if not b.online_step_only else ():
        args = dfp.Args(action_horizon=b.action_horizon, hidden_dim=H, num_layers=b.num_layers, batch_size=b.batch_size)
        net = f"{b.num_layers}x{H}"
        actor_dims, critic_dims = [obs_dim + D] + [H] * b.num_layers + [D], [obs_dim + D] + [H] * b.num_layers + [1]
        E, B, G, N, Q = args.num_critics, b.batch_size, args.num_hypotheses, args.N, args.q_best_of
        # the limit: the update's matrix products alone (shapes in the module docstring)
        offline = [
            gemm_chain(actor_dims, 1, B * G, True, dev),
            gemm_chain(critic_dims, E, B, True, dev),
            gemm_chain(actor_dims, 1, B * Q, False, dev),
            gemm_chain(critic_dims, E, B * Q, False, dev),
            gemm_chain(critic_dims, E, B, False, dev),
        ]
        online = offline + [gemm_chain(actor_dims, 1, B * N, False, dev), gemm_chain(critic_dims, E, B * N, False, dev)]
        limits = {
            phase: lambda chain=chain: [f() for f in chain]
            for phase, chain in (("offline", offline), ("online", online))
        }
        for run_limit in limits.values():
            run_limit()  # warm-up

        for mode in modes:
            torch.manual_seed(0)
            actor, ema = dfp.Actor(obs_dim, D, H, b.num_layers).to(dev), dfp.Actor(obs_dim, D, H, b.num_layers).to(dev)
            critic = dfp.Critic(obs_dim, D, H, b.num_layers, E).to(dev)
            target = dfp.Critic(obs_dim, D, H, b.num_layers, E).to(dev)
            opt = torch.optim.Adam(
                [*actor.parameters(), *critic.parameters()], lr=args.lr, capturable="cudagraphs" in mode
            )
            update = dfp.make_update(args, actor, critic, target, ema, opt)  # exactly the script's wrapping
            if "compile" in mode:
                update = torch.compile(update)
            if "cudagraphs" in mode:
                update = runs.CudaGraphUpdate(update)
            sampler = torch.Generator(device=dev).manual_seed(0)
            sample = functools.partial(dfp.sample_chunks, data, 0, n, n, sampler, B, b.action_horizon, args.gamma)
            for phase in ("offline", "online"):
                step = functools.partial(train_step, update, sample, phase == "online")
                try:  # a mode that fails (a capture, a compile) is a row with its error; the others still run
                    t = time.perf_counter()
                    for _ in range(4):  # warm-up (compiles, captures the graph)
                        step()
                    sync()
                    warm = time.perf_counter() - t
                    dt, limit = best_time(step, b.updates, b.repeats, sync, paired=(limits[phase], b.updates))
                except Exception as e:
                    results["training"].append({"net": net, "phase": phase, "mode": mode, "error": runs.why(e)})
                    machine.save_json(results, out)
                    print(f"{net:<6} {phase:<8} {mode:<19} error: {runs.why(e)}", flush=True)
                    continue
                row = {
                    "net": net,
                    "phase": phase,
                    "mode": mode,
                    "updates_per_s": 1 / dt,
                    "ms_per_update": dt * 1e3,
                    "limit_ms": limit * 1e3,
                    "ratio": dt / limit,
                }
                if "compile" in mode:
                    row["warmup_s"] = warm
                results["training"].append(row)
                machine.save_json(results, out)
                print(
                    f"{net:<6} {phase:<8} {mode:<19} {1 / dt:9.1f} {dt * 1e3:9.2f} {limit * 1e3:8.2f} "
                    f"{dt / limit:6.2f}" + (f"   ({warm:.0f})" if "compile" in mode else ""),
                    flush=True,
                )
            torch._dynamo.reset()

        # acting at batch 1: 1 NFE (and best-of-16 by the critic) vs 10 / 100 sequential NFEs of the same network
        obs = torch.randn(1, obs_dim, device=dev)

        samplers = {
            "1 sample (1 NFE)": functools.partial(dfp.best_of_n, actor, critic, obs, 1),
            "best-of-16 (1 NFE + critic)": functools.partial(dfp.best_of_n, actor, critic, obs, 16),
            "flow, 10 NFE": functools.partial(euler, actor, obs, 10),
            "diffusion, 100 NFE": functools.partial(euler, actor, obs, 100),
        }
        for name, sample in samplers.items():

            def chunk_to_host(sample=sample):  # the chunk comes back to the host, as when acting
                return sample().cpu()

            chunk_to_host()
            dt = best_time(chunk_to_host, b.actions, b.repeats, sync)
            results["acting"].append({"net": net, "sampler": name, "ms_per_chunk": dt * 1e3})
            machine.save_json(results, out)
            print(f"{net:<6} act batch 1: {name:<28} {dt * 1e3:8.3f} ms per chunk", flush=True)

    print(
        f"{'net':<6} {'threads':>7} {'offline ms':>10} {'online ms before':>16} {'ratio':>6} {'online ms':>9} "
        f"{'ratio':>6}   (whole online step / offline step)",
        flush=True,
    )
    for H in b.hidden_dims:
        for threads in dict.fromkeys([default_threads, 1]):
            row = online_step_row(dfp, b, dev, data, H, threads)
            results["online_step"].append(row)
            machine.save_json(results, out)
            print(
                f"{row['net']:<6} {threads:>7} {row['offline_ms']:10.2f} {row['online_ms_before']:16.2f} "
                f"{row['ratio_before']:6.3f} {row['online_ms']:9.2f} {row['ratio']:6.3f}",
                flush=True,
            )
    torch.set_num_threads(b.threads or default_threads)
    results["evaluation"] = eval_row(dfp, b, dev) if not b.online_step_only else "skipped (--online-step-only)"
    print(f"evaluation, {b.eval_episodes} episodes, sequential vs --eval-envs: {results['evaluation']}")
    machine.save_json(results, out)
    print(f"saved {os.path.relpath(out)}")
    sys.exit(1 if any("error" in t for t in results["training"]) else 0)  # the rows are saved either way


class SyntheticEnv:
    """cube-triple's spaces (obs 46, action 5 by default) with random observations and 1000-step episodes (then the
    info of gymnasium's RecordEpisodeStatistics): what online_step calls, at ~0 cost per step."""

    def __init__(self, obs_dim: int, act_dim: int, length: int = 1000):
        self.rng, self.obs_dim, self.length, self.t = np.random.default_rng(0), obs_dim, length, 0

    def reset(self, seed=None):
        self.t = 0
        return self.rng.standard_normal(self.obs_dim).astype(np.float32), {}

    def step(self, action):
        self.t += 1
        info = {"episode": {"r": -float(self.t), "l": self.t}} if self.t == self.length else {}
        return self.rng.standard_normal(self.obs_dim).astype(np.float32), -1.0, False, self.t == self.length, info


def add_before(buffer, *transition):
    """The replay buffer's insert before it wrote rows in place: 6 host tensors, then extend's index and value
    copies."""
    buffer.extend(
        {k: torch.as_tensor(np.asarray(v, dtype=np.float32))[None] for k, v in zip(KEYS, transition, strict=True)}
    )


def online_step_row(dfp, b, dev, data, H: int, threads: int) -> dict:
    """ms of the script's whole online step (with the buffer insert before and now) and of its offline step, at
    `threads` CPU threads, their blocks alternated; the ratios online / offline."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    obs_dim, A, n = b.obs_dim, b.act_dim, len(data["observations"])
    args = dfp.Args(
        action_horizon=b.action_horizon,
        hidden_dim=H,
        num_layers=b.num_layers,
        batch_size=b.batch_size,
        offline_steps=0,
        online_steps=n,
        start_training=0,
    )  # every online step updates
    modules = dfp.build(args, obs_dim, A, dev, None)
    r = dfp.Run(
        args,
        "bench",
        "",
        SyntheticEnv(obs_dim, A),
        None,
        data,
        [],
        0,
        modules,
        torch.Generator(device=dev).manual_seed(0),
        None,
        None,
        torch.zeros(len(dfp.LOSS_NAMES), device=dev),
    )
    r.writer = type("NoLog", (), {"add_scalar": lambda *a: None})()  # the episode ends' three scalars
    r.update, step = dfp.make_update(args, *modules.values()), [0]

    def online(add):
        def run():
            step[0] += 1
            r.buffer.add = types.MethodType(add, r.buffer)
            dfp.online_step(r, step[0])

        return run

    dfp.online_step(r, 0)  # the switch: the buffer starts as the data
    fns = {"offline": lambda: dfp.offline_step(r, 1), "before": online(add_before), "now": online(ReplayBuffer.add)}
    for f in (*fns.values(), *fns.values()):  # warm-up
        f()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    off, before, now = best_time(
        fns["offline"], b.updates, b.repeats, sync, paired=[(fns["before"], b.updates), (fns["now"], b.updates)]
    )
    return {
        "net": f"{b.num_layers}x{H}",
        "threads": threads,
        "env": "synthetic",
        "offline_ms": off * 1e3,
        "online_ms_before": before * 1e3,
        "online_ms": now * 1e3,
        "ratio_before": before / off,
        "ratio": now / off,
    }


def eval_row(dfp, b, dev):
    """Wall time of --eval-episodes evaluation episodes on cube-triple task 2 (an untrained 4x512 policy acting
    best-of-16, so every episode runs its full length), with 1 env and with --eval-envs envs in worker processes,
    alternated --repeats times so both see the same load; the best time of each counts. 'n/a' without OGBench."""
    if b.eval_episodes <= 0:
        return "skipped (--eval-episodes 0)"
    env_id = "cube-triple-play-singletask-task2-v0"
    try:
        vec = {1: dfp.envs.make_eval_envs(env_id, 1, b.action_horizon)}
    except Exception as e:  # no gymnasium/ogbench/mujoco here
        return f"n/a (no OGBench env: {type(e).__name__})"
    m = min(b.eval_envs, b.eval_episodes)  # envs.evaluate steps every env: none may stay without an episode
    if m > 1:
        vec[m] = dfp.envs.make_eval_envs(env_id, m, b.action_horizon)
    obs_dim, D = vec[1].single_observation_space.shape[0], vec[1].single_action_space.shape[0]  # D = h * A (ChunkEnv)
    actor, critic = dfp.Actor(obs_dim, D, 512, 4).to(dev), dfp.Critic(obs_dim, D, 512, 4, 2).to(dev)
    act = dfp.make_act(actor, critic, 16, dev)  # the script's evaluation: best-of-16, in envs.evaluate
    best = {m: float("inf") for m in vec}
    for _ in range(b.repeats):
        for k, e in vec.items():
            t = time.perf_counter()
            dfp.envs.evaluate(e, act, b.eval_episodes, 0)
            best[k] = min(best[k], time.perf_counter() - t)
    for e in vec.values():
        e.close()
    return {
        "episodes": b.eval_episodes,
        **{f"{k} envs s": round(v, 2) for k, v in best.items()},
        "speedup": round(best[1] / best[m], 2),
    }


if __name__ == "__main__":
    main()
