"""Tests of image_encoder.py: the flat layout's split, shapes, GroupNorm, separate cameras, crops, gradients, sizes."""

import os
import sys

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import image_encoder as ie  # noqa: E402

# lift's image layout: 9 low-dim values (eef pos 3, quat 4, gripper 2), two 84x84 cameras
LAYOUT = {
    "low_dim_keys": ["robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"],
    "low_dim": 9,
    "cameras": ["agentview", "robot0_eye_in_hand"],
    "height": 84,
    "width": 84,
}
PIXELS = 84 * 84 * 3
# torchvision.models.resnet18(): 11,689,512 parameters, of which its fc (512 -> 1000) holds 513,000. GroupNorm has
# the same affine parameters as the BatchNorm it replaces (running statistics are buffers, not parameters).
RESNET18_WITHOUT_FC = 11_689_512 - 513_000


def make_obs(*lead, seed=0):
    """Normalized flat observations [*lead, O]: low-dim values, then each camera's pixels in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(*lead, LAYOUT["low_dim"], generator=g)
    pixels = torch.rand(*lead, 2 * PIXELS, generator=g) * 2 - 1
    return torch.cat([low, pixels], dim=-1)


def camera_slice(c):
    start = LAYOUT["low_dim"] + c * PIXELS
    return slice(start, start + PIXELS)


def feature_slice(c, feature_dim=128):
    start = LAYOUT["low_dim"] + c * feature_dim
    return slice(start, start + feature_dim)


@pytest.fixture(scope="module", params=ie.KINDS)
def encoder(request):
    torch.manual_seed(0)
    return ie.ObsEncoder(LAYOUT, kind=request.param)


def test_shapes_with_leading_dims_and_low_dim_passthrough(encoder):
    obs = make_obs(2, 3)  # [B, To, O]
    assert obs.shape[-1] == encoder.obs_dim == 9 + 2 * PIXELS
    out = encoder.eval()(obs)
    assert encoder.out_dim == 9 + 2 * 128
    assert out.shape == (2, 3, encoder.out_dim)
    assert torch.equal(out[..., :9], obs[..., :9])  # the low-dim part, exactly
    # leading dims are only flattened and restored: the [B, To] batch gives each row's own features
    torch.testing.assert_close(out[1, 2], encoder(obs[1, 2]), rtol=1e-4, atol=1e-5)


def test_group_norm_not_batch_norm(encoder):
    modules = list(encoder.modules())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in modules)
    norms = [m for m in modules if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 2 * 20  # per ResNet-18: its stem, 2 per block x 8 blocks, 3 downsampling projections
    assert all(m.num_groups == m.num_channels // 16 for m in norms)


def test_cameras_have_separate_weights(encoder):
    encoder.eval()
    obs = make_obs(2)
    changed = obs.clone()
    changed[:, camera_slice(1)] = torch.rand(2, PIXELS) * 2 - 1  # camera 1's pixels only
    a, b = encoder(obs), encoder(changed)
    assert torch.equal(a[:, :9], b[:, :9])
    assert torch.equal(a[:, feature_slice(0)], b[:, feature_slice(0)])  # camera 0's features untouched
    assert (a[:, feature_slice(1)] - b[:, feature_slice(1)]).abs().max() > 1e-4
    # no parameter tensor is shared between the two cameras' networks
    ptrs = [{p.data_ptr() for p in net.parameters()} for net in encoder.nets]
    assert len(encoder.nets) == 2 and not ptrs[0] & ptrs[1]


@pytest.mark.parametrize("kind", ie.KINDS)
def test_camera_initialization(kind):
    """The authors deep-copy one random model per camera (equal start); robomimic initializes each on its own."""
    torch.manual_seed(0)
    first, second = (net.state_dict() for net in ie.ObsEncoder(LAYOUT, kind=kind).nets)
    same = all(torch.equal(first[k], second[k]) for k in first)
    assert same == (kind == "resnet18")


def test_pixels_read_as_hwc_per_camera():
    """Camera c's block of the flat vector is its H x W x 3 image, channels last: the encoder must see that image."""
    torch.manual_seed(0)
    enc = ie.ObsEncoder(LAYOUT).eval()
    obs = make_obs(1)
    image = obs[0, camera_slice(1)].reshape(84, 84, 3).permute(2, 0, 1)[None]  # [1, 3, H, W]
    torch.testing.assert_close(enc(obs)[:, feature_slice(1)], enc.nets[1](image), rtol=1e-4, atol=1e-5)


def test_resnet18_crop_is_fixed():
    torch.manual_seed(0)
    enc = ie.ObsEncoder(LAYOUT, kind="resnet18")
    assert enc.crop == (84, 84)  # the whole 84x84 image, as the authors' model sees it
    obs = make_obs(2)
    torch.testing.assert_close(enc.train()(obs), enc.eval()(obs), rtol=0, atol=0)
    small = ie.ObsEncoder(LAYOUT, kind="resnet18", crop=(64, 64))
    image = obs[:, camera_slice(0)].reshape(2, 84, 84, 3).permute(0, 3, 1, 2)
    expected = small.nets[0].proj(small.nets[0].pool(small.nets[0].trunk(image[:, :, 10:74, 10:74])))
    torch.testing.assert_close(small.train()(obs)[:, feature_slice(0)], expected)  # the center, in training too


def test_spatial_softmax_crops_random_in_training_center_at_eval():
    torch.manual_seed(0)
    enc = ie.ObsEncoder(LAYOUT, kind="spatial-softmax")
    assert enc.crop == (76, 76)  # DP's crop of 84x84 images
    obs = make_obs(2)
    eval_a, eval_b = enc.eval()(obs), enc(obs)
    assert torch.equal(eval_a, eval_b)
    image = obs[:, camera_slice(0)].reshape(2, 84, 84, 3).permute(0, 3, 1, 2)
    net = enc.nets[0]
    torch.testing.assert_close(eval_a[:, feature_slice(0)], net.proj(net.pool(net.trunk(image[:, :, 4:80, 4:80]))))
    enc.train()
    torch.manual_seed(1)
    train_1 = enc(obs)
    torch.manual_seed(1)
    assert torch.equal(enc(obs), train_1)  # the crops come from torch's RNG: reproducible under a seed
    torch.manual_seed(2)
    train_2 = enc(obs)
    assert (train_1[:, 9:] - train_2[:, 9:]).abs().max() > 1e-4
    assert (train_1[:, 9:] - eval_a[:, 9:]).abs().max() > 1e-4
    assert torch.equal(train_1[:, :9], eval_a[:, :9])


def test_random_crop_takes_windows_at_varied_offsets():
    h, w = 12, 10
    coords = torch.arange(h * w, dtype=torch.float32).reshape(1, 1, h, w)  # pixel value = row * w + col
    images = coords.expand(200, 3, h, w)
    torch.manual_seed(0)
    crops = ie.random_crop(images, 5, 4)
    assert crops.shape == (200, 3, 5, 4)
    tops, lefts = crops[:, 0, 0, 0] // w, crops[:, 0, 0, 0] % w
    for n in range(200):
        t, left = int(tops[n]), int(lefts[n])
        assert torch.equal(crops[n], images[n, :, t : t + 5, left : left + 4])
    assert set(tops.long().tolist()) == set(range(h - 5 + 1))  # every offset is drawn, the last one too
    assert set(lefts.long().tolist()) == set(range(w - 4 + 1))


def test_spatial_softmax_keypoint_is_the_peak_location():
    pool = ie.SpatialSoftmax(1, num_keypoints=1)
    with torch.no_grad():
        pool.keypoints.weight.fill_(1.0)
        pool.keypoints.bias.zero_()
    feature = torch.zeros(1, 1, 5, 7)
    feature[0, 0, 1, 6] = 60.0  # row 1 of 5, column 6 of 7: a near one-hot softmax
    x, y = pool(feature)[0].tolist()
    assert x == pytest.approx(-1 + 2 * 6 / 6, abs=1e-6)
    assert y == pytest.approx(-1 + 2 * 1 / 4, abs=1e-6)


@pytest.mark.parametrize("kind", ie.KINDS)
def test_gradients_reach_every_parameter(kind):
    torch.manual_seed(0)
    enc = ie.ObsEncoder(LAYOUT, kind=kind, feature_dim=16).train()
    obs = make_obs(2, 1)
    (enc(obs)[..., 9:] ** 2).sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_trunk_is_torchvision_resnet18_and_parameter_counts():
    trunk = ie.resnet18_trunk()
    assert sum(p.numel() for p in trunk.parameters()) == RESNET18_WITHOUT_FC
    # the 7x7 stride-2 stem and the max pool kept (no 84x84 variant of the stem): stride 32 in all, layer4 at 3x3
    with torch.no_grad():
        assert trunk(torch.zeros(1, 3, 84, 84)).shape == (1, 512, 3, 3)
        assert trunk(torch.zeros(1, 3, 76, 76)).shape == (1, 512, 3, 3)
        assert trunk(torch.zeros(1, 3, 240, 240)).shape == (1, 512, 8, 8)
    enc = ie.ObsEncoder(LAYOUT, kind="resnet18")
    assert sum(p.numel() for p in enc.parameters()) == 2 * (RESNET18_WITHOUT_FC + 512 * 128 + 128)
    enc = ie.ObsEncoder(LAYOUT, kind="spatial-softmax")
    keypoints, proj = 512 * 32 + 32, 64 * 128 + 128
    assert sum(p.numel() for p in enc.parameters()) == 2 * (RESNET18_WITHOUT_FC + keypoints + proj)


def test_bad_input_says_what_to_do():
    with pytest.raises(ValueError, match="resnet18, spatial-softmax"):
        ie.ObsEncoder(LAYOUT, kind="vit")
    with pytest.raises(ValueError, match="must fit"):
        ie.ObsEncoder(LAYOUT, crop=(90, 84))
    enc = ie.ObsEncoder(LAYOUT)
    with pytest.raises(ValueError, match=f"size {9 + 2 * PIXELS}"):
        enc(torch.zeros(1, 9 + PIXELS))
