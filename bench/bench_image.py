"""The image encoder (image_encoder.py) in a DBP pixel policy: the cost of a training step, of acting, peak memory.

The policy is the pixel one of dbp_bc.py: mu = MLP(features, z) with features = ObsEncoder(obs_hist) (low-dim part,
then 128 features per camera), here with the authors' image-task sizes: 2 cameras at 84x84, 9 low-dim values, To = 1,
Tp = 4, 7 action dims, an MLP 3 x 256 (dbp_bc.MLPGenerator). For each encoder kind, three rows (on the CPU each in
a fresh process, so that its peak memory is its own):
- act: Policy(obs_hist, z) at batch 1 (normalization, encoder in eval mode, MLP), the median and 10/90th percentiles;
- train: dbp_bc.compute_loss (drift loss over G = 4 hypotheses) + backward + clipping + AdamW on --batch-size
  observations, the encoder run once per observation and its features repeated G times (the authors' order: their
  global_cond.repeat_interleave(gen_per_label));
- train_per_hypothesis: the same, but with the observations repeated G times before the encoder (compute_loss called
  on the whole generator, as for a low-dim one): the encoder runs G times per observation (with G different random
  crops for "spatial-softmax").
Training rows report the best of --blocks blocks of --train-iters steps. Memory: on CUDA torch's peak allocation during
the row (the networks included), on the CPU the process's peak resident set (ru_maxrss); beside it, the same after
building the networks.
Observations are random (the cost does not depend on the pixels); the uint8 -> float normalization of a batch is not
timed.

  python bench/bench_image.py                      # CPU, 1 thread
  python bench/bench_image.py --device cuda --train-iters 10 --blocks 3 --out bench/results/image_cuda.json
"""

import multiprocessing
import os
import resource
import shlex
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dbp_bc  # noqa: E402  (importable once the repository root is on sys.path)
import image_encoder  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402  (bench/ on sys.path)

PHASES = ("act", "train", "train_per_hypothesis")


@dataclass
class Args:
    device: str = "cpu"
    """cpu or cuda"""
    num_threads: int = 1
    """torch CPU threads"""
    kinds: tuple[str, ...] = image_encoder.KINDS
    """encoder kinds to time"""
    phases: tuple[str, ...] = PHASES
    """rows per kind: act, train, train_per_hypothesis"""
    cameras: int = 2
    """cameras (the authors' lift/can/square: agentview and eye-in-hand)"""
    image_size: int = 84
    """H = W"""
    low_dim: int = 9
    """low-dim values (eef pos 3, quat 4, gripper 2)"""
    feature_dim: int = 128
    """features per camera"""
    obs_horizon: int = 1
    """To (the authors' image configs)"""
    pred_horizon: int = 4
    """Tp"""
    action_dim: int = 7
    """action dims"""
    hidden_dim: int = 256
    """MLP width"""
    num_layers: int = 3
    """MLP hidden layers"""
    batch_size: int = 64
    """observations per training step (dbp_bc.py's default)"""
    warmup: int = 3
    """untimed calls first (acting); training: 1 untimed step"""
    iters: int = 30
    """timed acting calls"""
    train_iters: int = 2
    """timed training steps per block"""
    blocks: int = 2
    """training blocks (the best one is reported)"""
    note: str = ""
    """a note kept in the JSON (e.g. whether other jobs were running)"""
    out: str | None = None
    """also write the rows as JSON to this path (with the machine: GPU name, versions)"""


class EncodedMLP(nn.Module):
    """mu = MLP(encoder(obs_hist), z): [B, To, O], [B, Tp, da] -> [B, Tp, da] (normalized)."""

    def __init__(self, encoder: nn.Module, backbone: nn.Module):
        super().__init__()
        self.encoder, self.backbone = encoder, backbone

    def forward(self, obs_hist, z):
        return self.backbone(self.encoder(obs_hist), z)


def build(args: Args, kind: str, device: torch.device) -> EncodedMLP:
    layout = {
        "low_dim_keys": [f"low{i}" for i in range(args.low_dim)],
        "low_dim": args.low_dim,
        "cameras": [f"camera{c}" for c in range(args.cameras)],
        "height": args.image_size,
        "width": args.image_size,
    }
    encoder = image_encoder.ObsEncoder(layout, kind=kind, feature_dim=args.feature_dim)
    backbone = dbp_bc.make_generator(
        "mlp",
        obs_dim=encoder.out_dim,
        action_dim=args.action_dim,
        obs_horizon=args.obs_horizon,
        pred_horizon=args.pred_horizon,
        hidden_dim=args.hidden_dim,
        num_layers=args.num_layers,
    )
    return EncodedMLP(encoder, backbone).to(device)


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def time_act(gen: EncodedMLP, args: Args, device: torch.device, sync) -> dict:
    obs_dim = gen.encoder.obs_dim
    pixels = torch.zeros(obs_dim, dtype=torch.bool)
    pixels[args.low_dim :] = True
    stats = {  # x_n = (x - offset) / scale: min-max-like for the low-dim part, 127.5 for the pixels
        "obs_offset": torch.where(pixels, 127.5, 0.0),
        "obs_scale": torch.where(pixels, 127.5, 1.0),
        "action_offset": torch.zeros(args.action_dim),
        "action_scale": torch.ones(args.action_dim),
    }
    policy = dbp_bc.Policy(gen.eval(), stats, -torch.ones(args.action_dim), torch.ones(args.action_dim)).to(device)
    obs = torch.cat(
        [torch.randn(1, args.obs_horizon, args.low_dim), 255 * torch.rand(1, args.obs_horizon, obs_dim - args.low_dim)],
        -1,
    ).to(device)  # [1, To, O], raw: pixels 0..255
    times = []
    for i in range(args.warmup + args.iters):
        z = torch.randn(1, args.pred_horizon, args.action_dim, device=device)  # [1, Tp, da]
        sync()
        t0 = time.perf_counter()
        policy(obs, z)
        sync()  # (CPU ops have finished on return)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1e3
    return {"ms": float(np.median(ms)), "ms_p10": float(np.percentile(ms, 10)), "ms_p90": float(np.percentile(ms, 90))}


def time_train(gen: EncodedMLP, args: Args, device: torch.device, sync, per_hypothesis: bool) -> dict:
    a = dbp_bc.Args()  # the script's loss flags (drift, G = 4), weight decay and clipping
    opt = torch.optim.AdamW(gen.parameters(), lr=a.lr, weight_decay=a.weight_decay)
    B = args.batch_size
    obs = torch.rand(B, args.obs_horizon, gen.encoder.obs_dim, device=device) * 2 - 1  # [B, To, O] normalized
    chunk = torch.rand(B, args.pred_horizon, args.action_dim, device=device) * 2 - 1  # [B, Tp, da]
    gen.train()

    def step():
        if per_hypothesis:  # compute_loss repeats the observations: the encoder sees B * G of them
            loss, _ = dbp_bc.compute_loss(gen, obs, chunk, *dbp_bc.loss_flags(a))
        else:  # encode once, compute_loss repeats the features [B, To, F]
            loss, _ = dbp_bc.compute_loss(gen.backbone, gen.encoder(obs), chunk, *dbp_bc.loss_flags(a))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(gen.parameters(), a.max_grad_norm)
        opt.step()
        return loss.detach()

    step().item()  # warm-up: AdamW's state, cuDNN's choices
    best = float("inf")
    for _ in range(args.blocks):
        sync()
        t0 = time.perf_counter()
        for _ in range(args.train_iters):
            loss = step()
        loss.item()  # the block's last step has finished (a device sync)
        best = min(best, (time.perf_counter() - t0) / args.train_iters)
    return {"ms": best * 1e3}


def measure(args: Args, kind: str, phase: str) -> dict:
    """One row, in its own process: the networks built, then the phase timed; its peak memory."""
    torch.set_num_threads(args.num_threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    if device.type == "cuda":  # the peak from here on: the networks, then the phase
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    gen = build(args, kind, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    built = peak_mib(device)
    if phase == "act":
        row = time_act(gen, args, device, sync)
    else:
        row = time_train(gen, args, device, sync, per_hypothesis=phase == "train_per_hypothesis")
    return {
        "kind": kind,
        "phase": phase,
        **row,
        "peak_mib": peak_mib(device),
        "built_mib": built,
        "encoder_params": sum(p.numel() for p in gen.encoder.parameters()),
        "params": sum(p.numel() for p in gen.parameters()),
    }


def main():
    args = tyro.cli(Args)
    for ok, msg in (
        (set(args.kinds) <= set(image_encoder.KINDS), f"--kinds: use {' '.join(image_encoder.KINDS)}"),
        (set(args.phases) <= set(PHASES), f"--phases: use {' '.join(PHASES)}"),
        (args.device in ("cpu", "cuda"), "--device: cpu or cuda"),
        (
            min(args.iters, args.train_iters, args.blocks, args.batch_size) >= 1,
            "--iters, --train-iters, --blocks and --batch-size must be >= 1",
        ),
    ):
        if not ok:
            print(f"error: {msg}", file=sys.stderr)
            sys.exit(2)
    load = os.getloadavg()
    print(
        f"device {args.device}, {args.num_threads} thread(s), load average {load[0]:.2f}, torch {torch.__version__}; "
        f"batch {args.batch_size}, {args.cameras} cameras {args.image_size}x{args.image_size}, To {args.obs_horizon}"
    )
    here = os.path.relpath(os.path.abspath(__file__), ROOT)
    results = {
        "command": "python " + shlex.join([here] + sys.argv[1:]),
        "device": args.device,
        "machine": machine.info(args.device),
        "load_average_start": list(load),
        "config": asdict(args),
        "rows": [],
    }
    print(f"{'kind':<16} {'phase':<22} {'ms':>9} {'p10':>8} {'p90':>8} {'peak MiB':>9} {'built MiB':>9} {'params':>11}")
    ctx = multiprocessing.get_context("spawn")
    for kind in args.kinds:
        for phase in args.phases:
            if args.device == "cuda":  # torch's peak allocation is reset per row (the last row's tensors are freed)
                r = measure(args, kind, phase)
            else:  # a fresh process per row: the peak resident set of a process only grows
                with ctx.Pool(1) as pool:
                    r = pool.apply(measure, (args, kind, phase))
            p10, p90 = (f"{r[k]:>8.2f}" if k in r else f"{'':>8}" for k in ("ms_p10", "ms_p90"))
            print(
                f"{kind:<16} {phase:<22} {r['ms']:>9.2f} {p10} {p90} {r['peak_mib']:>9.0f} {r['built_mib']:>9.0f} "
                f"{r['params']:>11} (encoder {r['encoder_params']})",
                flush=True,
            )
            results["rows"].append(r)
            if args.out:
                machine.save_json(results, args.out)


if __name__ == "__main__":
    main()
