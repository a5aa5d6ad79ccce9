"""What a benchmark's JSON says about the machine it ran on (GPU name, versions), and its atomic write."""

import importlib.metadata
import json
import os
import platform

PACKAGES = ("torch", "numpy", "gymnasium", "mujoco", "ogbench", "dm_control", "tyro", "tensorboard", "jax")


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def info(device: str = "cpu") -> dict:
    """Host, CPU count, Python and package versions; with CUDA also the GPU, its capability and CUDA/cuDNN versions
    (no import but torch: jax's version is read from its metadata)."""
    import torch

    out = {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        **{p: version(p) for p in PACKAGES},
    }
    if device == "cuda" and torch.cuda.is_available():
        out.update(
            gpu=torch.cuda.get_device_name(),
            capability=".".join(map(str, torch.cuda.get_device_capability())),
            gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        )
    return out


def save_json(obj, path: str) -> None:
    """json.dump, atomically (a stage killed by its timeout leaves the last complete file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)
