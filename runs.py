"""The run plumbing the training scripts share: one-line refusals of bad input, the command line, the run folder,
seeding and the tensorboard log, the CUDA-graph wrapper of an update, one signal design, atomic checkpoints (with the
RNG states) and their checks, the non-finite stop, the printed resume command, the refusal of a missing optional
package. No algorithm: CudaGraphUpdate only wraps an update function (DFP's --cudagraphs), whatever it computes.

    args = runs.parse(Args, rules)                    # tyro; any parse error or broken rule: one `error:` line, exit 2
    run_dir = runs.plan_run_dir(args.runs_dir, name, "checkpoint.pt", resume=args.resume)  # checked, not created
    stop = runs.Stop()                                # a signal exits at once ...
    stop.armed = True                                 # ... from here it sets a flag: the loops poll stop.requested()
    runs.save(state, path)                            # atomic
    ckpt = runs.load_checkpoint(path, "--resume", "dfp-v1", KEYS, "pass the checkpoint.pt of a DFP run")
    device = runs.seed(args.seed, args.torch_deterministic, args.num_threads, args.cuda)  # and the device
    writer = runs.tensorboard(run_dir, args, name, start=step + 1)  # purge_step: a resume never logs a step twice
    ckpt["rng"] = runs.rng_state(sampler=gen)        # saved; runs.set_rng_state(ckpt["rng"], sampler=gen) on resume
    runs.check_rng_devices(ckpt["rng"], sampler=gen)  # at the start of a resume: refused if made on another device

torch is imported inside the functions that use it: the dataset generators import this module without paying for
torch in each of their worker processes.
"""

import contextlib
import importlib.util
import io
import itertools
import multiprocessing
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tyro


# ---- bad input: one line `error: ...` on stderr, exit code 2, before anything is written
def fail(msg: str):
    """Refuse: print `error: msg` (one line that says what to do) to stderr and exit with code 2."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def check(ok, msg: str) -> None:
    """fail(msg) unless ok."""
    if not ok:
        fail(msg)


def require(module: str, purpose: str) -> None:
    """Refuse in one line when an optional module is missing, naming the requirements file that pins it."""
    if importlib.util.find_spec(module) is None:
        files = sorted(Path(__file__).resolve().parent.glob("requirements/*.txt"))
        extra = next((f.name for f in files if re.search(rf"^{module}\b", f.read_text(), re.M)), None)
        fail(f"{purpose} needs {module}: pip install " + (f"-r requirements/{extra}" if extra else module))


def why(e: BaseException) -> str:
    """An exception as a short one-line reason: 'Type: first line of the message'."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def parse(args_class, rules: Callable | None = None, args: list | None = None):
    """tyro.cli(args_class, args=args) (None: sys.argv), every parse error (a wrong type, a choice outside a Literal,
    an unknown flag, a missing value) one `error:` line and exit 2; then rules(parsed)'s (ok, message) pairs, the first
    not ok refused alike; then --track without wandb, --capture-video without moviepy. --help: tyro's help, exit 0."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stderr(buf):
            parsed = tyro.cli(args_class, args=args)
    except SystemExit as e:
        if e.code not in (0, None):
            fail(tyro_error(buf.getvalue()) + "; see --help")
        sys.stderr.write(buf.getvalue())
        raise
    sys.stderr.write(buf.getvalue())  # tyro's warnings, if any
    for ok, msg in rules(parsed) if rules is not None else ():
        check(ok, msg)
    for field, module in (("track", "wandb"), ("capture_video", "moviepy")):  # the common flags' optional packages
        if getattr(parsed, field, False):
            require(module, f"--{field.replace('_', '-')}")
    return parsed


def tyro_error(text: str) -> str:
    """tyro's error box on one line: its message (the rows between the title and the first rule), the flag and its
    type for a value that does not parse, and the flags tyro suggests for a misspelled one."""
    rows = [line.strip(" │|") for line in text.splitlines() if line.strip()][1:]  # below the title

    def rule(row):
        return re.fullmatch(r"[─\-+╰╯]*", row)  # boxed or plain, as the output allows

    msg = " ".join(itertools.takewhile(lambda r: not rule(r), itertools.dropwhile(rule, rows))).rstrip(".")
    if "Argument helptext:" in rows:  # "Error parsing --K: invalid literal ..." -> "--K (INT): invalid literal ..."
        usage = rows[rows.index("Argument helptext:") + 1].split()
        msg = re.sub(r"^Error parsing \S+:", f"{usage[0]} ({' '.join(usage[1:]) or 'flag'}):", msg)
    if "Perhaps you meant:" in rows:
        after = rows[rows.index("Perhaps you meant:") + 1 :]
        msg += "; did you mean " + " or ".join(
            dict.fromkeys(r.split()[0] for r in after if r.startswith("--") and not rule(r))
        )
    return msg or " ".join(text.split())


def ranges(args, table: dict) -> list:
    """Rules for parse() from a table {requirement: (test, flag names)}: `--flag must be <requirement>, got <value>`
    for every flag whose value fails its test (a NaN fails every comparison, so it is refused too)."""
    return [
        (test(getattr(args, k)), f"--{k.replace('_', '-')} must be {req}, got {getattr(args, k)}")
        for req, (test, flags) in table.items()
        for k in flags
    ]


# ---- the run folder: <runs_dir>/<run name>, or the folder of the checkpoint a run continues
def run_name(env_id: str, exp_name: str, seed: int) -> str:
    """CleanRL's run name: <env_id>__<exp_name>__<seed>__<unix time>."""
    return f"{env_id}__{exp_name}__{seed}__{int(time.time())}"


def check_creatable(folder: str, what: str) -> None:
    """`folder` is a writable folder or can be made: its nearest existing ancestor is a writable folder."""
    p = os.path.abspath(folder)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    check(
        os.path.isdir(p) and os.access(p, os.W_OK | os.X_OK),
        f"cannot create {what} {folder}: {p} is {'not writable' if os.path.isdir(p) else 'a file'}; pick another place",
    )


def plan_run_dir(runs_dir: str, name: str, ckpt_file: str, resume: str | None = None, writable: bool = True) -> str:
    """The run folder, checked; nothing is created. resume (the checkpoint a --resume or --eval-only reads): its
    folder, which must be writable if `writable`. Else runs_dir/name, refused if runs_dir is a file or the folder
    already holds ckpt_file (a run: the message names the --resume that continues it) or cannot be created."""
    if resume is not None:
        run_dir = os.path.dirname(os.path.abspath(resume))
        check(
            not writable or os.access(run_dir, os.W_OK | os.X_OK),
            f"the run folder {run_dir} of {resume} is not writable; copy the run folder somewhere writable",
        )
        return run_dir
    check(not os.path.isfile(runs_dir), f"--runs-dir {runs_dir} is a file, not a folder; pass another --runs-dir")
    run_dir = os.path.join(runs_dir, name)
    check(not os.path.isfile(run_dir), f"the run folder {run_dir} is a file; pass another --run-name")
    ckpt = os.path.join(run_dir, ckpt_file)
    check(
        not os.path.exists(ckpt),
        f"the run folder {run_dir} already holds a run; pass another --run-name, or continue it with --resume {ckpt}",
    )
    check_creatable(run_dir, "the run folder")
    return run_dir


def resume_command(ckpt_path: str) -> str:
    """This run's command line with --resume <ckpt_path> in place of any --resume, --run-name and --runs-dir given
    (a resumed run stays in its checkpoint's folder)."""
    drop, argv, skip = ("--resume", "--run-name", "--runs-dir"), [], False
    for a in sys.argv[1:]:
        if not skip and a.split("=", 1)[0] not in drop:
            argv.append(a)
        skip = not skip and a in drop  # the value after a dropped flag goes too
    return shlex.join(["python", sys.argv[0], *argv, "--resume", os.path.abspath(ckpt_path)])


# ---- the start of a run: CleanRL's seeding, the tensorboard log (and wandb), the CUDA-graph speed path
def seed(seed: int, deterministic: bool = True, threads: int = 0, cuda: bool = True):
    """Seed Python's, NumPy's and torch's RNGs, make cudnn deterministic if asked and use `threads` CPU threads (0:
    torch's default); the device: CUDA when available and `cuda`, else the CPU."""
    import random

    import torch

    if threads:
        torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = deterministic
    return torch.device("cuda" if cuda and torch.cuda.is_available() else "cpu")


def tensorboard(
    run_dir: str,
    args,
    name: str,
    start: int = 1,
    wandb_project: str | None = None,
    wandb_entity: str | None = None,
):
    """The run's SummaryWriter in run_dir (created here), writing from step `start` on: a resumed run drops what the
    interrupted process logged after its checkpoint, so no step is written twice; a fresh one (start 1) gets the
    hyperparameter table. wandb_project: the run is tracked with wandb too (imported lazily, synced from tensorboard,
    the same wandb run on resume)."""
    os.makedirs(run_dir, exist_ok=True)
    if wandb_project:
        import wandb

        wandb.init(
            project=wandb_project,
            entity=wandb_entity,
            sync_tensorboard=True,
            config=vars(args),
            name=name,
            save_code=True,
            resume="allow",
            id=name[-40:],
        )
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(run_dir, purge_step=start)
    if start == 1:
        writer.add_text(
            "hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
        )
    return writer


class CudaGraphUpdate:
    """--cudagraphs: update(batch, **kw) (a gradient step that reads only its inputs and the models, with no host
    sync) captured once per distinct kw (e.g. online=False / True) as a CUDA graph, replayed on each batch copied into
    static inputs. The first `warmup` calls of each run eagerly on a side stream (allocating the optimizer's state).
    Returns what update returns (a tensor), cloned."""

    def __init__(self, update: Callable, warmup: int = 3):
        self.update, self.warmup, self.graphs = update, warmup, {}

    def __call__(self, batch: dict, **kw):
        import torch

        p = self.graphs.setdefault(
            tuple(sorted(kw.items())), {"calls": 0, "inputs": {k: torch.empty_like(v) for k, v in batch.items()}}
        )
        for k, v in batch.items():
            p["inputs"][k].copy_(v)  # the graph reads its inputs from these fixed addresses
        p["calls"] += 1
        if p["calls"] <= self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.update(p["inputs"], **kw)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if "graph" not in p:  # capture records the kernels without running them; the replay below runs them
            p["graph"] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(p["graph"]):
                p["out"] = self.update(p["inputs"], **kw)
        p["graph"].replay()
        return p["out"].clone()


# ---- signals: one design for every script
class Interrupted(Exception):
    """Raised by Stop.check() once a signal asked the run to stop."""


class Stop:
    """SIGINT and SIGTERM. Until `armed` is set (nothing worth saving yet) a signal exits at once with 128 + signum.
    Once armed, the first one only sets `signum`: the loops poll requested() (or check(), which raises Interrupted)
    within one env or gradient step, save, and exit with `exit_code` (128 + signum). A second one exits at once."""

    def __init__(self):
        self.signum, self.armed = 0, False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signum or not self.armed:
            os.write(2, f"\n{name}: exiting at once\n".encode())  # os.write: safe inside a handler
            os._exit(128 + signum)
        self.signum = signum
        os.write(2, f"\n{name}: stopping after this step (send it again to exit at once)\n".encode())

    def requested(self) -> bool:
        return self.signum != 0

    def check(self) -> None:
        if self.signum:
            raise Interrupted

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def worker_signals() -> None:
    """In a worker process (of an AsyncVectorEnv): ignore SIGINT, which Ctrl-C sends to the whole process group (the
    main process stops and closes the workers), and let SIGTERM end the worker. In the main process: nothing."""
    if multiprocessing.parent_process() is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the main process's handler, inherited through fork


def leave(code: int, *resources, track: bool = False):
    """Exit now with `code`, everything saved: close the resources (envs, writers; errors ignored, since workers may
    be gone already), finish wandb with `track`, flush, and skip the slow interpreter teardown (torch, MuJoCo)."""
    for r in resources:
        with contextlib.suppress(Exception):
            r.close()
    if track:
        import wandb

        wandb.finish()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def interrupted(step: int, saved: str | None, code: int, *resources, track: bool = False):
    """After a signal: print `interrupted at step N; checkpoint saved to PATH; continue with:` and the resume command
    (saved: the checkpoint just written; None: nothing was saved), then leave(code, *resources, track=track)."""
    how = saved and f"checkpoint saved to {saved}; continue with:\n  {resume_command(saved)}"
    print(f"interrupted at step {step}; {how or 'no checkpoint (--no-save-model)'}", flush=True)
    leave(code, *resources, track=track)


# ---- checkpoints: atomic writes, and reads that refuse a wrong or damaged file in one line
@contextlib.contextmanager
def atomic(path: str):
    """`with atomic(path) as tmp:` write the file `tmp` (a hidden name beside `path`, same extension); it then replaces
    `path` in one step (os.replace), so a crash mid-write never leaves a partial file. On an error `path` is
    untouched."""
    root, ext = os.path.splitext(os.path.basename(path))
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{root}.{os.getpid()}.tmp{ext}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save(obj, path: str) -> None:
    """torch.save(obj, path), atomically."""
    import torch

    with atomic(path) as tmp:
        torch.save(obj, tmp)


def read(path: str, flag: str, hint: str):
    """torch.load(path) onto the CPU, refused in one line if the file is missing, a folder, unreadable or not a
    complete torch file; `hint` says what to pass instead."""
    check(os.path.exists(path), f"{flag} {path} does not exist; {hint}")
    check(os.path.isfile(path), f"{flag} {path} is a folder, not a file; {hint}")
    check(os.access(path, os.R_OK), f"{flag} {path} is not readable (check its permissions)")
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated, not a torch file, ...
        fail(f"cannot read {flag} {path} ({why(e)[:120]}): it is not a complete checkpoint; {hint}")


def check_format(ckpt, where: str, fmt: str, keys, hint: str) -> None:
    """Refuse a checkpoint whose 'format' tag is not `fmt` (another script's, or none) or that lacks any of `keys`."""
    got = ckpt.get("format") if isinstance(ckpt, dict) else None
    check(got == fmt, f"{where} is of another kind (format {got!r}, expected {fmt!r}); {hint}")
    missing = [k for k in keys if k not in ckpt]
    check(not missing, f"{where} lacks {', '.join(missing)}: it is damaged or from another version; {hint}")


def load_checkpoint(path: str, flag: str, fmt: str, keys, hint: str) -> dict:
    """read() and check_format(): the checkpoint dict at `path` (given with `flag`), or a one-line refusal."""
    ckpt = read(path, flag, hint)
    check_format(ckpt, f"{flag} {path}", fmt, keys, hint)
    return ckpt


def load_states(modules: dict, ckpt: dict, hint: str) -> None:
    """module.load_state_dict(ckpt[name]) for each named module (networks, optimizers); a checkpoint that does not fit
    them (other sizes, missing entries) is refused in one line, with `hint` (which flags to match)."""
    try:
        for name, module in modules.items():
            module.load_state_dict(ckpt[name])
    except (RuntimeError, ValueError, KeyError) as e:
        fail(f"checkpoint does not match these networks ({why(e)}); {hint}")


def set_optimizer(optimizer, lr: float, capturable: bool) -> None:
    """What this run's flags decide, not its checkpoint: each param group's lr and `capturable` (--cudagraphs: Adam's
    step counters on the parameters' device, which a CUDA graph needs; else on the CPU, which eager Adam needs)."""
    for group in optimizer.param_groups:
        group["lr"], group["capturable"] = lr, capturable
        for p in group["params"]:
            if "step" in optimizer.state.get(p, {}):
                optimizer.state[p]["step"] = optimizer.state[p]["step"].to(p.device if capturable else "cpu")


def rng_state(**generators) -> dict:
    """The states of Python's, NumPy's, torch's and (once used) CUDA's global RNGs and of the named torch.Generators:
    what a checkpoint keeps so that a resumed run draws the numbers an uninterrupted one would (set_rng_state)."""
    import random

    import torch

    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        **{k: g.get_state() for k, g in generators.items()},
        "devices": {k: g.device.type for k, g in generators.items()},
    }


def check_rng_devices(state: dict, **generators) -> None:
    """Refuse (one line, exit 2) a checkpoint whose generators do not fit these: a torch.Generator's state fits only
    its own device type (a CPU run's sampler cannot continue on CUDA, nor the reverse). Tried on a copy of each.
    An empty state (a fresh run) is not checked."""
    import torch

    for k, g in generators.items() if state else ():
        made_on = state.get("devices", {}).get(k)  # None: a checkpoint from before the device was stored
        try:
            torch.Generator(device=g.device).set_state(state[k])
            fits = made_on in (None, g.device.type)
        except RuntimeError:  # a state of another size: another device type's
            fits = False
        check(
            fits,
            f"the checkpoint's {k} was made on {made_on or 'another device type'}, this run is on "
            f"{g.device.type}; resume on the same device type (with or without --no-cuda as it was made)",
        )


def set_rng_state(state: dict, **generators) -> None:
    """Restore what rng_state() returned (a state without 'cuda', or with None there, leaves CUDA's RNG as it is);
    generators of another device type are refused first (check_rng_devices), before any state is set."""
    import random

    import torch

    check_rng_devices(state, **generators)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")  # older DBP checkpoints: one device's state, not a list
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([cuda] if isinstance(cuda, torch.Tensor) else cuda)
    for k, g in generators.items():
        g.set_state(state[k])


def nonfinite(tree, name: str = "") -> str | None:
    """The dotted name ('critic.weights.0') of the first floating tensor or array holding a NaN or inf in a nested
    dict / list / tuple (a state_dict, a checkpoint), else None. Other leaves (ints, strings, floats) are skipped."""
    import torch

    if isinstance(tree, (dict, list, tuple)):
        for k, v in tree.items() if isinstance(tree, dict) else enumerate(tree):
            found = nonfinite(v, f"{name}.{k}" if name else str(k))
            if found is not None:
                return found
        return None
    if isinstance(tree, torch.Tensor):
        bad = tree.is_floating_point() and not bool(torch.isfinite(tree).all())
    else:
        bad = isinstance(tree, np.ndarray) and np.issubdtype(tree.dtype, np.floating) and not np.isfinite(tree).all()
    return (name or "the value") if bad else None


def stop_nonfinite(bad: str | None, step: int, ckpt_path: str, hint: str = "Try a lower --lr") -> None:
    """If `bad` names a quantity that became non-finite (a loss, or nonfinite()'s parameter name): exit 1 with one
    `error:` line naming it and the last good checkpoint, which stays as it is (nothing non-finite is saved)."""
    if bad is not None:
        kept = f"the last good checkpoint is {ckpt_path}" if os.path.isfile(ckpt_path) else "no checkpoint was written"
        print(
            f"error: {bad} became non-finite by step {step}; stopping ({kept}). {hint} (with --resume to continue "
            "from the checkpoint).",
            file=sys.stderr,
        )
        sys.exit(1)


@contextlib.contextmanager
def bounded_download(timeout: float, targets: list, what: str, then: str):
    """One download attempt, each socket connect and read bounded by `timeout` s; if it raises, what it left for
    `targets` (the topmost folder of each that did not exist, or the file) is removed: one error '<what> failed (<why>);
    <then>'."""
    old_timeout, made = socket.getdefaulttimeout(), []
    for p in targets:
        while not os.path.exists(os.path.dirname(p)):
            p = os.path.dirname(p)
        made.append(p)
    socket.setdefaulttimeout(timeout)
    try:
        yield
    except Exception as e:  # URLError, timeouts, refused connections (OSErrors); no such remote dataset; ...
        for p in filter(os.path.lexists, made):
            (shutil.rmtree if os.path.isdir(p) else os.remove)(p)
        fail(f"{what} failed ({why(e)}); {then}")
    finally:
        socket.setdefaulttimeout(old_timeout)
