"""The replay buffer's storage for dfp_offline_to_online.py, as CleanRL imports stable-baselines3's: the offline data
and the online transitions as flat float32 tensors on the training device, a ring once full. Sampling them as h-step
chunks for the chunked TD target is the algorithm, so it lives in the script (`sample_chunks`).

    buffer = ReplayBuffer(to_tensors(data, device), capacity)      # offline data first, online steps appended
    buffer.add(obs, action, reward, mask, terminal, next_obs)      # one env step, in KEYS order
    batch = sample_chunks(buffer.tensors, *buffer.window, gen, batch_size, h, gamma)   # in the script
"""

import numpy as np
import torch

KEYS = ("observations", "actions", "rewards", "masks", "terminals", "next_observations")


def to_tensors(data: dict, device) -> dict:
    """The transition arrays a sampler needs, as float32 tensors on the training device."""
    return {k: torch.as_tensor(np.asarray(data[k], dtype=np.float32), device=device) for k in KEYS}


class ReplayBuffer:
    """Flat transitions on the training device (offline data first, online ones appended; a ring once full)."""

    def __init__(self, data: dict, capacity: int):
        n = len(data["observations"])
        self.capacity, self.size, self.ptr = max(capacity, n + 1), n, n % max(capacity, n + 1)
        self.num_added = 0  # online transitions added so far
        self.tensors = {k: torch.cat([v, v.new_empty((self.capacity - n,) + v.shape[1:])]) for k, v in data.items()}

    def add(self, *transition):
        """One transition of host values in KEYS order (an environment step), written in place into row `ptr` of each
        key: a scalar as it is, an array through torch.as_tensor (which shares its memory): no tensor built per key."""
        for k, v in zip(KEYS, transition, strict=True):
            self.tensors[k][self.ptr] = torch.as_tensor(v) if isinstance(v, (np.ndarray, list)) else float(v)
        self.ptr, self.size, self.num_added = (
            (self.ptr + 1) % self.capacity,
            min(self.size + 1, self.capacity),
            self.num_added + 1,
        )

    def extend(self, part: dict):
        """Transitions [n, ...] in order: one copy per key (a checkpoint's online part on resume)."""
        n = len(part["observations"])
        idx = (self.ptr + torch.arange(n)) % self.capacity
        for k in KEYS:
            self.tensors[k][idx.to(self.tensors[k].device)] = part[k].to(self.tensors[k].device)
        self.ptr, self.size, self.num_added = (
            (self.ptr + n) % self.capacity,
            min(self.size + n, self.capacity),
            self.num_added + n,
        )

    def online_part(self) -> dict:
        """The last online transitions in insertion order, on the CPU (what a checkpoint stores)."""
        n = min(self.num_added, self.capacity)
        idx = (self.ptr - n + torch.arange(n)) % self.capacity
        return {k: v[idx.to(v.device)].cpu() for k, v in self.tensors.items()}

    @property
    def window(self) -> tuple:
        """(start, size, capacity): the oldest entry's index, the number stored, the ring's length."""
        return self.ptr - self.size, self.size, self.capacity
