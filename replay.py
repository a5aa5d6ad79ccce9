"""The replay buffer of dfp_offline_to_online.py, as CleanRL imports stable-baselines3's (and QC keeps its chunk
sampler in its datasets module): the offline data and the online transitions as flat float32 tensors on the training
device, sampled as h-step chunks for the chunked TD target (docs/algorithms.md §3). Indexing happens on the device with
a device generator: no host copy, no sync.

    buffer = ReplayBuffer(to_tensors(data, device), capacity)      # offline data first, online steps appended
    batch = buffer.sample(gen, batch_size, h, gamma)               # or sample_chunks(data, 0, n, n, ...) of the data
"""
import numpy as np
import torch

KEYS = ("observations", "actions", "rewards", "masks", "terminals", "next_observations")


def to_tensors(data: dict, device) -> dict:
    """The transition arrays a sampler needs, as float32 tensors on the training device."""
    return {k: torch.as_tensor(np.asarray(data[k], dtype=np.float32), device=device) for k in KEYS}


class ReplayBuffer:
    """Flat transitions on the training device (offline data first, online ones appended; a ring once full),
    sampled as h-step chunks."""

    def __init__(self, data: dict, capacity: int):
        n = len(data["observations"])
        self.capacity, self.size, self.ptr = max(capacity, n + 1), n, n % max(capacity, n + 1)
        self.num_added = 0  # online transitions added so far
        self.tensors = {k: torch.cat([v, v.new_empty((self.capacity - n,) + v.shape[1:])]) for k, v in data.items()}

    def add(self, **transition):
        """One transition of host values (an environment step)."""
        self.extend({k: torch.as_tensor(np.asarray(transition[k], dtype=np.float32))[None] for k in KEYS})

    def extend(self, part: dict):
        """Transitions [n, ...] in order: one copy per key (a checkpoint's online part on resume)."""
        n = len(part["observations"])
        idx = (self.ptr + torch.arange(n)) % self.capacity
        for k in KEYS:
            self.tensors[k][idx.to(self.tensors[k].device)] = part[k].to(self.tensors[k].device)
        self.ptr, self.size, self.num_added = (self.ptr + n) % self.capacity, min(self.size + n, self.capacity), self.num_added + n

    def online_part(self) -> dict:
        """The last online transitions in insertion order, on the CPU (what a checkpoint stores)."""
        n = min(self.num_added, self.capacity)
        idx = (self.ptr - n + torch.arange(n)) % self.capacity
        return {k: v[idx.to(v.device)].cpu() for k, v in self.tensors.items()}

    def sample(self, gen: torch.Generator, batch_size: int, h: int, gamma: float) -> dict:
        return sample_chunks(self.tensors, self.ptr - self.size, self.size, self.capacity, gen, batch_size, h, gamma)


def sample_chunks(data: dict, start: int, size: int, capacity: int, gen: torch.Generator, batch_size: int, h: int,
                  gamma: float) -> dict:
    """Chunks s_t, a_t..a_{t+h-1} of the stored data (oldest entry at `start`, ring-wise), never past the newest entry.
    Device indexing with the device generator `gen` only: no host copy, no sync (docs/algorithms.md §3)."""
    dev = data["rewards"].device
    idx = (start + torch.randint(0, size - h + 1, (batch_size,), device=dev, generator=gen)) % capacity  # [B]
    j = (idx[:, None] + torch.arange(h, device=dev)) % capacity  # [B, h]
    discounts = gamma ** torch.arange(h, device=dev, dtype=torch.float32)  # [h]
    return {
        "observations": data["observations"][idx],  # [B, O]
        "actions": data["actions"][j].reshape(batch_size, -1),  # [B, h * A]
        "rewards": data["rewards"][j] @ discounts,  # sum_k gamma^k r_{t+k}, [B]
        "masks": data["masks"][j].amin(1),  # min_k mask_{t+k}, [B]
        "valid": (data["terminals"][j[:, :-1]].sum(1) == 0).float(),  # 0 if the episode ends inside the chunk, [B]
        "next_observations": data["next_observations"][j[:, -1]],  # s_{t+h}, [B, O]
    }
