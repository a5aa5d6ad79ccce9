"""Throughput of dbpo_ppo.py: env steps per second of the rollout and of the PPO update.

Runs the real training loop (a subprocess, no evaluation) for a few iterations and reads the script's final
`timing:` line. Rollout SPS = env steps / time collecting them (one generator pass per chunk decision, Ta env
steps per decision); update SPS = env steps / time of the update epochs on them. Without --checkpoint it
benchmarks a freshly initialized generator of dbp_bc.py's MLP size (MLP 3x512, To=2, Tp=16, Ta=8);
weights do not change the cost, only how often episodes end.

  python bench/bench_dbpo.py                                   # cube-single task 1, 8 envs x 25 decisions
  python bench/bench_dbpo.py --env-id Hopper-v5 --iterations 3
"""

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Optional

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("MUJOCO_GL", "egl")
sys.path.insert(0, ROOT)


@dataclass
class Args:
    env_id: str = "cube-single-play-singletask-task1-v0"
    """an OGBench singletask id or Hopper-v5 / Walker2d-v5 / Ant-v5"""
    checkpoint: Optional[str] = None
    """a dbp_bc.py checkpoint for env_id; default: a freshly initialized default-size generator"""
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


def fresh_checkpoint(env_id: str, path: str):
    """A dbp_bc.py-format checkpoint (see its README section) with a randomly initialized MLP generator."""
    import dbpo_ppo
    import envs

    env = envs.make_chunk_env(envs.resolve_env_id(env_id, gym_ids=envs.LOCOMOTION_ENVS), 8, 2)  # obs [2, O], chunk [8, A]
    obs_dim, act_dim = env.observation_space.shape[-1], env.action_space.shape[-1]
    low, high = env.unwrapped.action_space.low, env.unwrapped.action_space.high
    env.close()
    kwargs = dict(obs_dim=obs_dim, action_dim=act_dim, obs_horizon=2, pred_horizon=16, hidden_dim=512, depth=3)
    generator = dbpo_ppo.make_generator("mlp", **kwargs)
    torch.save({"format": "dbp-v1", "args": {}, "env_id": env_id, "obs_dim": obs_dim, "action_dim": act_dim,
                "obs_horizon": 2, "pred_horizon": 16, "action_horizon": 8, "backbone": "mlp", "generator_kwargs": kwargs,
                "loss": "drift", "model": generator.state_dict(), "step": 0,
                "obs_offset": torch.zeros(obs_dim), "obs_scale": torch.ones(obs_dim),
                "action_offset": torch.zeros(act_dim), "action_scale": torch.ones(act_dim),
                "action_low": torch.as_tensor(low, dtype=torch.float32), "action_high": torch.as_tensor(high, dtype=torch.float32)}, path)


if __name__ == "__main__":
    args = tyro.cli(Args)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = os.path.join(tmp, "fresh.pt")
            fresh_checkpoint(args.env_id, checkpoint)
        cmd = [sys.executable, os.path.join(ROOT, "dbpo_ppo.py"), "--checkpoint", checkpoint, "--env-id", args.env_id,
               "--num-iterations", str(args.iterations + 1), "--num-envs", str(args.num_envs), "--num-steps", str(args.num_steps),
               "--update-epochs", str(args.update_epochs), "--minibatch-size", str(args.minibatch_size),
               "--num-threads", str(args.num_threads), "--critic-warmup-iters", "0", "--target-kl", "None",
               # iteration 0 is an evaluation (as the authors count); one 1-episode evaluation, no checkpoint
               "--eval-interval", str(args.iterations + 1), "--eval-episodes", "1", "--eval-envs", "1",
               "--no-save-model", "--cuda" if args.cuda else "--no-cuda"]
        env = dict(os.environ, MUJOCO_GL="egl", PYTHONWARNINGS="ignore")
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, env=env)
        if proc.returncode != 0:
            raise SystemExit(proc.stdout[-2000:] + proc.stderr[-2000:])
    timing = re.search(r"timing: rollout ([\d.]+) env steps/s, update ([\d.]+) env steps/s \((\d+) env steps", proc.stdout)
    device = "cuda" if args.cuda and torch.cuda.is_available() else "cpu"
    print(f"{args.env_id} | {args.num_envs} envs x {args.num_steps} decisions x {args.iterations} iterations "
          f"({timing.group(3)} env steps) | {args.update_epochs} epochs | device {device}, {args.num_threads} thread(s)")
    print(f"rollout: {float(timing.group(1)):.0f} env steps/s | update: {float(timing.group(2)):.0f} env steps/s")
    print(f"load average: {os.getloadavg()[0]:.1f} (1 min) on {os.cpu_count()} CPUs")
