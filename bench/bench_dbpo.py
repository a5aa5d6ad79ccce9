"""Throughput of dbpo_ppo.py: env steps per second of the rollout and of the PPO update.

Runs the real training loop (a subprocess, no evaluation) for a few iterations and reads the script's final
`timing:` line. Rollout SPS = env steps / time collecting them (one generator pass per chunk decision, Ta env
steps per decision); update SPS = env steps / time of the update epochs on them. Without --checkpoint it
benchmarks a freshly initialized generator of dbp_bc.py's MLP size (MLP 3x512, To=2, Tp=16, Ta=8);
weights do not change the cost, only how often episodes end.
--update-only times dbpo_ppo.ppo_update alone (its --update-epochs epochs, the actor and the critic updated, no KL
early stop) on a synthetic rollout of --decisions chunk decisions (random observations, the agent's own latents, chunks
and log-likelihoods): the cost of the update at the authors' 40 envs x 500 decisions = 20,000, for each of --backbones.

  python bench/bench_dbpo.py                                   # cube-single task 1, 8 envs x 25 decisions
  python bench/bench_dbpo.py --env Hopper-v5 --iterations 3
  python bench/bench_dbpo.py --update-only --cuda --backbones mlp unet --out bench/results/dbpo_cuda.json
"""

import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("MUJOCO_GL", "egl")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402


@dataclass
class Args:
    env: str = "cube-single-play-singletask-task1-v0"
    """an OGBench singletask id or Hopper-v5 / Walker2d-v5 / Ant-v5"""
    checkpoint: str | None = None
    """a dbp_bc.py checkpoint for --env (None: a freshly initialized default-size generator)"""
    iterations: int = 3
    """PPO iterations measured (the first one includes warm-up costs)"""
    num_envs: int = 8
    """parallel environments"""
    num_steps: int = 25
    """chunk decisions per environment per iteration"""
    update_epochs: int = 5
    """PPO epochs per iteration (no KL early stop in the benchmark)"""
    minibatch_size: int = 50000
    """minibatch size (capped at the rollout size)"""
    num_threads: int = 1
    """torch CPU threads"""
    cuda: bool = False
    """run the networks on CUDA if available"""
    update_only: bool = False
    """time ppo_update alone on a synthetic rollout of --decisions decisions (no env steps; see above)"""
    decisions: int = 20000
    """--update-only: chunk decisions in the rollout (the authors': 40 envs x 500)"""
    backbones: tuple[str, ...] = ("mlp",)
    """--update-only without --checkpoint: fresh generators to time (mlp: 3x512, unet: --unet-dims)"""
    unet_dims: tuple[int, ...] = (512, 1024, 2048)
    """U-Net widths of a fresh unet generator (dbp_bc.py's default)"""
    hidden_dim: int = 512
    """MLP width of a fresh mlp generator (dbp_bc.py's default)"""
    num_layers: int = 3
    """MLP hidden layers of a fresh mlp generator (dbp_bc.py's default)"""
    repeats: int = 3
    """--update-only: timed updates after one warm-up; the best one counts"""
    out: str | None = None
    """--update-only: also write the rows as JSON to this path (with the machine: GPU name, versions)"""


def fresh_checkpoint(env_id: str, path: str, backbone="mlp", unet_dims=(512, 1024, 2048), hidden_dim=512, num_layers=3):
    """A dbp_bc.py-format checkpoint (see its README section) with a randomly initialized generator."""
    import dbpo_ppo
    import envs

    env = envs.make_chunk_env(
        envs.resolve_env_id(env_id, gym_ids=envs.LOCOMOTION_ENVS), 8, 2
    )  # obs [2, O], chunk [8, A]
    obs_dim, act_dim = env.observation_space.shape[-1], env.action_space.shape[-1]
    low, high = env.unwrapped.action_space.low, env.unwrapped.action_space.high
    env.close()
    sizes = dict(hidden_dim=hidden_dim, num_layers=num_layers) if backbone == "mlp" else dict(down_dims=list(unet_dims))
    kwargs = dict(obs_dim=obs_dim, action_dim=act_dim, obs_horizon=2, pred_horizon=16, **sizes)
    generator = dbpo_ppo.make_generator(backbone, **kwargs)
    torch.save(
        {
            "format": "dbp-v1",
            "args": {},
            "env_id": env_id,
            "obs_dim": obs_dim,
            "action_dim": act_dim,
            "obs_horizon": 2,
            "pred_horizon": 16,
            "action_horizon": 8,
            "backbone": backbone,
            "generator_kwargs": kwargs,
            "loss": "drift",
            "model": generator.state_dict(),
            "step": 0,
            "obs_offset": torch.zeros(obs_dim),
            "obs_scale": torch.ones(obs_dim),
            "action_offset": torch.zeros(act_dim),
            "action_scale": torch.ones(act_dim),
            "action_low": torch.as_tensor(low, dtype=torch.float32),
            "action_high": torch.as_tensor(high, dtype=torch.float32),
        },
        path,
    )


def time_update(args: Args, checkpoint: str, device) -> dict:
    """The time of one ppo_update (--update-epochs epochs over --decisions decisions), the best of --repeats."""
    import dbpo_ppo

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    a = dbpo_ppo.Args(
        checkpoint=checkpoint,
        update_epochs=args.update_epochs,
        minibatch_size=args.minibatch_size,
        target_kl=None,
        critic_warmup_iters=0,
    )  # every epoch runs; the actor is updated too
    agent, optimizers = dbpo_ppo.build_agent(ckpt, None, a, device)[:2]
    n, To, obs_dim = args.decisions, ckpt["obs_horizon"], ckpt["obs_dim"]
    obs = torch.randn(n, To, obs_dim, device=device)  # [n, To, obs_dim]
    with torch.no_grad():
        z = agent.sample_latent(n)  # [n, Tp, A]
        chunk, logprob = agent.act(obs, z, torch.randn_like(z))  # [n, Tp, A], [n]: the rollout's own samples
        values = agent.get_value(obs)  # [n]
    batch = [obs, z, chunk, logprob, torch.randn(n, device=device), torch.randn(n, device=device), values]
    stop = SimpleNamespace(check=lambda: None)
    dbpo_ppo.ppo_update(agent, optimizers, batch, 1, a, stop)  # warm-up (optimizer state, cuDNN); ends with a sync
    best = float("inf")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        stats = dbpo_ppo.ppo_update(agent, optimizers, batch, 1, a, stop)  # returns host floats: synced
        best = min(best, time.perf_counter() - t0)
    params = sum(p.numel() for p in agent.generator.parameters())
    return {
        "backbone": ckpt["backbone"],
        "generator_params": params,
        "decisions": n,
        "epochs": stats["update_epochs_done"],
        "minibatches": stats["minibatches_done"],
        "ms_per_update": best * 1e3,
        "decisions_per_s": n * stats["update_epochs_done"] / best,
        "env_steps_per_s": n * ckpt["action_horizon"] / best,
    }  # the script's "update SPS": Ta env steps a decision


def update_only(args: Args) -> None:
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    here = os.path.relpath(os.path.abspath(__file__), ROOT)
    results = {
        "command": "python " + shlex.join([here] + sys.argv[1:]),
        "device": str(device),
        "machine": machine.info(device.type),
        "rows": [],
    }
    print(
        f"ppo_update on {args.decisions} decisions, {args.update_epochs} epochs, minibatch {args.minibatch_size}, "
        f"device {device}, {torch.get_num_threads()} thread(s)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        paths = [args.checkpoint] if args.checkpoint else []
        for b in () if args.checkpoint else args.backbones:
            paths.append(os.path.join(tmp, f"fresh_{b}.pt"))
            fresh_checkpoint(args.env, paths[-1], b, args.unet_dims, args.hidden_dim, args.num_layers)
        for path in paths:
            try:  # e.g. out of memory for one backbone: its row holds the error, the others still run
                row = time_update(args, path, device)
            except Exception as e:
                error = f"{type(e).__name__}: {e}"[:300]
                results["rows"].append({"checkpoint": os.path.basename(path), "error": error})
                print(f"{os.path.basename(path)}: error: {results['rows'][-1]['error']}", flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            results["rows"].append(row)
            print(
                f"{row['backbone']:<5} {row['generator_params']:>10} params | {row['ms_per_update']:9.1f} ms per "
                f"update ({row['epochs']} epochs x {row['minibatches'] // row['epochs']} minibatches) | "
                f"{row['decisions_per_s']:.0f} decisions/s | {row['env_steps_per_s']:.0f} env steps/s",
                flush=True,
            )
            if args.out:
                machine.save_json(results, args.out)
    if args.out:
        machine.save_json(results, args.out)
    if any("error" in r for r in results["rows"]):
        sys.exit(1)


if __name__ == "__main__":
    args = tyro.cli(Args)
    torch.set_num_threads(args.num_threads)
    if args.update_only:
        update_only(args)
        sys.exit(0)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = os.path.join(tmp, "fresh.pt")
            fresh_checkpoint(args.env, checkpoint)
        cmd = [
            sys.executable,
            os.path.join(ROOT, "dbpo_ppo.py"),
            "--checkpoint",
            checkpoint,
            "--env",
            args.env,
            "--num-iterations",
            str(args.iterations + 1),
            "--num-envs",
            str(args.num_envs),
            "--num-steps",
            str(args.num_steps),
            "--update-epochs",
            str(args.update_epochs),
            "--minibatch-size",
            str(args.minibatch_size),
            "--num-threads",
            str(args.num_threads),
            "--critic-warmup-iters",
            "0",
            "--target-kl",
            "None",
            # iteration 0 is an evaluation (as the authors count); one 1-episode evaluation, no checkpoint
            "--eval-interval",
            str(args.iterations + 1),
            "--eval-episodes",
            "1",
            "--eval-envs",
            "1",
            "--no-save-model",
            "--cuda" if args.cuda else "--no-cuda",
        ]
        env = dict(os.environ, MUJOCO_GL="egl", PYTHONWARNINGS="ignore")
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, env=env)
        if proc.returncode != 0:
            raise SystemExit(proc.stdout[-2000:] + proc.stderr[-2000:])
    timing = re.search(
        r"timing: rollout ([\d.]+) env steps/s, update ([\d.]+) env steps/s \((\d+) env steps", proc.stdout
    )
    device = "cuda" if args.cuda and torch.cuda.is_available() else "cpu"
    print(
        f"{args.env} | {args.num_envs} envs x {args.num_steps} decisions x {args.iterations} iterations "
        f"({timing.group(3)} env steps) | {args.update_epochs} epochs | device {device}, {args.num_threads} thread(s)"
    )
    print(f"rollout: {float(timing.group(1)):.0f} env steps/s | update: {float(timing.group(2)):.0f} env steps/s")
    print(f"load average: {os.getloadavg()[0]:.1f} (1 min) on {os.cpu_count()} CPUs")
