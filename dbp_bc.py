"""DBP: Drift-Based Policy, one-step imitation of action chunks (SPEC section 4).

Placeholder header; the training script follows below the network block.
"""

import torch
import torch.nn as nn


# ---- DBP networks: generators mu = gen(obs_hist, z), shared unchanged with dbpo_ppo.py (only torch imports)
# Contract (see the checkpoint format in the README): obs_hist [B, To, obs_dim] and the returned chunk
# [B, Tp, act_dim] are both *normalized* (obs_n = (obs - obs_offset) / obs_scale,
# a = a_n * action_scale + action_offset); z ~ N(0, I) has the chunk's shape [B, Tp, act_dim].
# One forward pass = one chunk (1 NFE); no time input anywhere.
class MLPGenerator(nn.Module):
    """mu = MLP(concat(flatten(obs_hist), flatten(z))): the default backbone for low-dimensional states."""

    def __init__(self, obs_dim: int, action_dim: int, obs_horizon: int, pred_horizon: int, hidden_dim: int = 512, depth: int = 3):
        super().__init__()
        self.obs_dim, self.action_dim = obs_dim, action_dim
        self.obs_horizon, self.pred_horizon = obs_horizon, pred_horizon
        self.cond_dim = obs_horizon * obs_dim  # size of features(obs_hist), e.g. for DBPO's log-std head
        layers, d_in = [], self.cond_dim + pred_horizon * action_dim
        for _ in range(depth):
            layers += [nn.Linear(d_in, hidden_dim), nn.Mish()]
            d_in = hidden_dim
        layers.append(nn.Linear(d_in, pred_horizon * action_dim))
        self.net = nn.Sequential(*layers)

    def features(self, obs_hist: torch.Tensor) -> torch.Tensor:
        """The observation features the generator is conditioned on: flatten(obs_hist) [B, To*obs_dim]."""
        return obs_hist.flatten(1)

    def forward(self, obs_hist: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.features(obs_hist), z.flatten(1)], dim=-1)  # [B, To*obs_dim + Tp*act_dim]
        return self.net(x).view(-1, self.pred_horizon, self.action_dim)  # [B, Tp, act_dim]


class Conv1dBlock(nn.Module):
    """Conv1d -> GroupNorm -> Mish, length preserving."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, n_groups: int):
        super().__init__()
        self.block = nn.Sequential(nn.Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2), nn.GroupNorm(n_groups, c_out), nn.Mish())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class FiLMResBlock1d(nn.Module):
    """Two conv blocks; between them FiLM from the condition: h <- scale(c) * h + bias(c); plus a residual."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int, kernel_size: int, n_groups: int):
        super().__init__()
        self.conv1 = Conv1dBlock(c_in, c_out, kernel_size, n_groups)
        self.conv2 = Conv1dBlock(c_out, c_out, kernel_size, n_groups)
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * c_out))
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)  # [B, c_out, T]
        scale, bias = self.film(cond).unsqueeze(-1).chunk(2, dim=1)  # [B, c_out, 1] each
        h = self.conv2(scale * h + bias)
        return h + self.skip(x)


class UNetGenerator(nn.Module):
    """mu = UNet1d(z; FiLM(flatten(obs_hist))): the paper's conditional 1-D U-Net over the chunk's time axis,
    with no time embedding (z plays the role of the diffusion input, but there is only one pass)."""

    def __init__(self, obs_dim: int, action_dim: int, obs_horizon: int, pred_horizon: int, down_dims=(64, 128, 256), kernel_size: int = 5, n_groups: int = 8):
        super().__init__()
        down_dims = [int(d) for d in down_dims]
        if pred_horizon % (2 ** (len(down_dims) - 1)) != 0:
            raise ValueError(f"pred_horizon {pred_horizon} must be divisible by 2^(len(down_dims)-1) = {2 ** (len(down_dims) - 1)}")
        self.obs_dim, self.action_dim = obs_dim, action_dim
        self.obs_horizon, self.pred_horizon = obs_horizon, pred_horizon
        self.cond_dim = cond_dim = obs_horizon * obs_dim
        dims = [action_dim] + down_dims
        self.down = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
            last = i == len(down_dims) - 1
            self.down.append(nn.ModuleList([
                FiLMResBlock1d(c_in, c_out, cond_dim, kernel_size, n_groups),
                FiLMResBlock1d(c_out, c_out, cond_dim, kernel_size, n_groups),
                nn.Identity() if last else nn.Conv1d(c_out, c_out, 3, stride=2, padding=1),  # T -> T/2
            ]))
        self.mid = nn.ModuleList([FiLMResBlock1d(dims[-1], dims[-1], cond_dim, kernel_size, n_groups) for _ in range(2)])
        self.up = nn.ModuleList()
        for c_skip, c_out in reversed(list(zip(down_dims[:-1], down_dims[1:]))):  # skip widths, deepest first
            self.up.append(nn.ModuleList([
                FiLMResBlock1d(2 * c_out, c_skip, cond_dim, kernel_size, n_groups),
                FiLMResBlock1d(c_skip, c_skip, cond_dim, kernel_size, n_groups),
                nn.ConvTranspose1d(c_skip, c_skip, 4, stride=2, padding=1),  # T/2 -> T
            ]))
        self.final = nn.Sequential(Conv1dBlock(down_dims[0], down_dims[0], kernel_size, n_groups), nn.Conv1d(down_dims[0], action_dim, 1))

    def features(self, obs_hist: torch.Tensor) -> torch.Tensor:
        """The observation features the generator is conditioned on: flatten(obs_hist) [B, To*obs_dim]."""
        return obs_hist.flatten(1)

    def forward(self, obs_hist: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        cond = self.features(obs_hist)  # [B, To*obs_dim]
        x = z.transpose(1, 2)  # [B, act_dim, Tp]: channels = action dims, length = chunk time
        skips = []
        for res1, res2, downsample in self.down:
            x = res2(res1(x, cond), cond)
            skips.append(x)
            x = downsample(x)
        for res in self.mid:
            x = res(x, cond)
        for res1, res2, upsample in self.up:  # the skip popped first is the deepest level, at x's resolution
            x = upsample(res2(res1(torch.cat([x, skips.pop()], dim=1), cond), cond))
        return self.final(x).transpose(1, 2)  # [B, Tp, act_dim]


def make_generator(backbone: str, **kwargs) -> nn.Module:
    """Rebuild a generator from a checkpoint: make_generator(ckpt["backbone"], **ckpt["generator_kwargs"])."""
    classes = {"mlp": MLPGenerator, "unet": UNetGenerator}
    if backbone not in classes:
        raise ValueError(f"unknown backbone '{backbone}'; expected one of {sorted(classes)}")
    return classes[backbone](**kwargs)


# ---- end of DBP networks
