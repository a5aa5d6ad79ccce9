"""Image observation encoders for the pixel Robomimic tasks (`<task>-<mh|ph>-image`), shared by DBP and DBPO.

An image observation is one flat float32 vector, normalized by the policy: the low-dim keys first (D values), then each
camera's H x W x 3 image (HWC, flattened), pixels mapped from 0..255 to [-1, 1] by x_n = (x - 127.5) / 127.5.
`ObsEncoder(layout)` maps that vector [..., O] to features [..., D + C * feature_dim]: the low-dim part unchanged, then
one feature vector per camera (a separate network per camera), in the layout's camera order. Two kinds:
- "resnet18", the authors' encoder (DBPO's MultiImageResNetEncoder with their defaults): a ResNet-18 (random init,
  every BatchNorm a GroupNorm with channels // 16 groups), average-pooled to 512 features, then Linear -> feature_dim;
- "spatial-softmax", Diffusion Policy's Robomimic encoder (robomimic's VisualCore): the same ResNet-18 trunk without
  its pooling, a SpatialSoftmax of 32 keypoints, then Linear(64 -> feature_dim); random crops in training.

Both see images in [-1, 1], as in the authors' code (their dataset divides by 255, their image normalizer maps [0, 1]
to [-1, 1] and ImageNet normalization is off), so there is no conversion here. The ResNet-18 is written out below
(torchvision's architecture, layer for layer, under torchvision's parameter names) rather than imported: one module to
read, and no torchvision build that has to match the installed torch build (CPU or CUDA).
"""

import copy
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

KINDS = ("resnet18", "spatial-softmax")
NUM_KEYPOINTS = 32  # Diffusion Policy's SpatialSoftmax (robomimic's num_kp)
DP_CROP_FRACTION = 0.9  # DP's random crop: 76 x 76 of an 84 x 84 image (round(0.9 * 84) = 76)


# ---------------------------------------------------------------------------------------------
# ResNet-18 with GroupNorm (torchvision.models.resnet18 with every BatchNorm2d replaced, as the authors and DP do)
# ---------------------------------------------------------------------------------------------
def group_norm(channels: int) -> nn.GroupNorm:
    # channels // 16 groups (4, 8, 16, 32 for 64..512 channels): the authors' and DP's replacement of BatchNorm2d.
    # GroupNorm has no running statistics, so training and evaluation normalize alike, even at batch 1.
    return nn.GroupNorm(channels // 16, channels)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (torchvision's BasicBlock; `bn*` hold GroupNorms)."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, padding=1, bias=False)
        self.bn1 = group_norm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, padding=1, bias=False)
        self.bn2 = group_norm(channels)
        self.downsample = None  # a 1x1 projection where the shape changes, as torchvision
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), group_norm(channels)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


def resnet18_trunk() -> nn.Sequential:
    """ResNet-18 up to its last conv stage, randomly initialized: [N, 3, H, W] -> [N, 512, ~H/32, ~W/32].

    The first 7x7 stride-2 conv and the 3x3 max pool stay, as in the authors' model (their torchvision resnet18, fc
    dropped) and DP's (robomimic's ResNet18Conv): an 84x84 image reaches layer4 at 3x3. Parameter names match
    torchvision's, so a torchvision (or the authors') ResNet-18 state dict loads key for key."""
    layers = [("conv1", nn.Conv2d(3, 64, 7, 2, padding=3, bias=False)), ("bn1", group_norm(64)), ("relu", nn.ReLU())]
    layers.append(("maxpool", nn.MaxPool2d(3, 2, padding=1)))
    in_channels = 64
    for i, (channels, stride) in enumerate([(64, 1), (128, 2), (256, 2), (512, 2)]):
        layers.append(
            (f"layer{i + 1}", nn.Sequential(BasicBlock(in_channels, channels, stride), BasicBlock(channels, channels)))
        )
        in_channels = channels
    trunk = nn.Sequential(OrderedDict(layers))
    for m in trunk.modules():  # torchvision's initialization (the norms start at weight 1, bias 0 by default)
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return trunk


class SpatialSoftmax(nn.Module):
    """Keypoints from a feature map (Finn et al. 2016; robomimic's SpatialSoftmax, temperature 1, no noise).

    A 1x1 conv makes K maps; each map's softmax over the H*W positions is a distribution whose mean (x, y), with
    coordinates in [-1, 1], is one keypoint: [N, C, H, W] -> [N, 2K] as (x_0, y_0, x_1, y_1, ...)."""

    def __init__(self, in_channels: int, num_keypoints: int = NUM_KEYPOINTS):
        super().__init__()
        self.keypoints = nn.Conv2d(in_channels, num_keypoints, kernel_size=1)

    def forward(self, feature):
        maps = self.keypoints(feature)  # [N, K, H, W]
        n, k, h, w = maps.shape
        attention = torch.softmax(maps.reshape(n, k, h * w), dim=-1)  # [N, K, H*W], sums to 1 over positions
        ys, xs = torch.meshgrid(
            torch.linspace(-1, 1, h, device=maps.device, dtype=maps.dtype),
            torch.linspace(-1, 1, w, device=maps.device, dtype=maps.dtype),
            indexing="ij",
        )
        grid = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)  # [H*W, 2]: (x, y) of each position
        return (attention @ grid).reshape(n, 2 * k)  # E[x], E[y] per keypoint: [N, 2K]


# ---------------------------------------------------------------------------------------------
# Crops
# ---------------------------------------------------------------------------------------------
def center_crop(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[N, 3, H, W] -> [N, 3, height, width], the middle (torchvision's center_crop offsets)."""
    top = int(round((images.shape[-2] - height) / 2))
    left = int(round((images.shape[-1] - width) / 2))
    return images[..., top : top + height, left : left + width]


def random_crop(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[N, 3, H, W] -> [N, 3, height, width], each image at its own uniformly drawn offset (torch's global RNG)."""
    n, _, h, w = images.shape
    top = torch.randint(0, h - height + 1, (n, 1), device=images.device)  # [N, 1]
    left = torch.randint(0, w - width + 1, (n, 1), device=images.device)
    rows = top + torch.arange(height, device=images.device)  # [N, height]
    cols = left + torch.arange(width, device=images.device)  # [N, width]
    batch = torch.arange(n, device=images.device)[:, None, None]
    # advanced indices on dims 0, 2, 3 around the channel slice put their broadcast shape first: [N, height, width, 3]
    return images[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------
# One camera's network, and the observation encoder
# ---------------------------------------------------------------------------------------------
class CameraEncoder(nn.Module):
    """One camera: crop, ResNet-18 trunk, pooling (average or spatial softmax), Linear: [N, 3, H, W] -> [N, F]."""

    def __init__(self, kind: str, feature_dim: int, crop: tuple[int, int]):
        super().__init__()
        self.kind, self.crop = kind, crop
        self.trunk = resnet18_trunk()
        if kind == "resnet18":
            self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())  # [N, 512, h, w] -> [N, 512]
            self.proj = nn.Linear(512, feature_dim)
        else:
            self.pool = SpatialSoftmax(512)  # [N, 512, h, w] -> [N, 2K]
            self.proj = nn.Linear(2 * NUM_KEYPOINTS, feature_dim)

    def forward(self, images):
        # The authors' "resnet18": a fixed crop in training and evaluation (eval_fixed_crop); DP: random in training,
        # the center at evaluation (DP's CropRandomizer replacing robomimic's).
        if self.kind == "spatial-softmax" and self.training:
            images = random_crop(images, *self.crop)
        else:
            images = center_crop(images, *self.crop)
        # NCHW-contiguous: the HWC pixels arrive permuted (channels-last strides), which ran the trunk about 2.5x
        # slower on the CPU (torch 2.13, one thread) than a contiguous copy
        return self.proj(self.pool(self.trunk(images.contiguous())))  # [N, F]


class ObsEncoder(nn.Module):
    """Normalized flat image observation [..., O] -> features [..., D + C * feature_dim] (`out_dim`).

    layout: env_args["image_layout"], {"low_dim_keys", "low_dim": D, "cameras": [C names], "height": H, "width": W};
        O = D + C * H * W * 3.
    kind: "resnet18" (the authors') or "spatial-softmax" (Diffusion Policy's).
    crop: (height, width) of the crop; None: the kind's default, the whole image for "resnet18" (the authors' 84x84
        on the 84x84 tasks; their MultiImageObsEncoder assigns its CenterCrop to a variable that the next line
        overwrites, so on tool_hang's 240x240 images their encoder sees the whole image too), and 0.9 of each side
        for "spatial-softmax" (DP's 76x76 of 84x84).
    """

    def __init__(
        self, layout: dict, kind: str = "resnet18", feature_dim: int = 128, crop: tuple[int, int] | None = None
    ):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown image encoder kind {kind!r}: use one of {', '.join(KINDS)}")
        self.low_dim, self.height, self.width = int(layout["low_dim"]), int(layout["height"]), int(layout["width"])
        self.cameras = list(layout["cameras"])
        if crop is None:
            fraction = 1.0 if kind == "resnet18" else DP_CROP_FRACTION
            crop = (round(fraction * self.height), round(fraction * self.width))
        crop = (int(crop[0]), int(crop[1]))
        if not (0 < crop[0] <= self.height and 0 < crop[1] <= self.width):
            raise ValueError(f"crop {crop} must fit the {self.height}x{self.width} images: pick a smaller crop")
        self.kind, self.feature_dim, self.crop = kind, feature_dim, crop
        self.obs_dim = self.low_dim + len(self.cameras) * self.height * self.width * 3  # O
        self.out_dim = self.low_dim + len(self.cameras) * feature_dim  # D + C * F
        first = CameraEncoder(kind, feature_dim, crop)
        # The authors deep-copy one randomly initialized model per camera (share_rgb_model false), so their cameras
        # start from equal weights; robomimic (DP) initializes each camera's network on its own. Separate parameters
        # either way.
        copies = [
            copy.deepcopy(first) if kind == "resnet18" else CameraEncoder(kind, feature_dim, crop)
            for _ in self.cameras[1:]
        ]
        self.nets = nn.ModuleList([first, *copies])

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        if obs.shape[-1] != self.obs_dim:
            raise ValueError(
                f"the image encoder expects observations of size {self.obs_dim} (low-dim {self.low_dim} + "
                f"{len(self.cameras)} cameras x {self.height}x{self.width}x3), got {obs.shape[-1]}"
            )
        lead = obs.shape[:-1]  # e.g. [B, To]
        flat = obs.reshape(-1, self.obs_dim)  # [N, O], N = prod(lead)
        features = [flat[:, : self.low_dim]]  # [N, D], passed through
        pixels = self.height * self.width * 3
        for c, net in enumerate(self.nets):
            start = self.low_dim + c * pixels
            hwc = flat[:, start : start + pixels].reshape(-1, self.height, self.width, 3)  # [N, H, W, 3]
            features.append(net(hwc.permute(0, 3, 1, 2)))  # [N, 3, H, W] -> [N, F]
        return torch.cat(features, dim=-1).reshape(*lead, self.out_dim)  # [..., D + C * F]
