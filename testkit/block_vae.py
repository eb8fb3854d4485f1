"""A VAE set by hand so that it reproduces pictures: encode = 8x8 block means, decode = the blocks again.

The kit's random VAE turns any picture into something unrelated (measured: 106 of 255 levels mean error
for one round trip), so "img2img at a low strength returns a picture close to its input" cannot be seen
through it. This one is an ordinary diffusers `AutoencoderKL` (SDXL's block layout, 8x downsampling, 4
latent channels) whose weights make it linear:

- residual blocks and the mid attention add nothing (their last projection is zero), so the main path is
  the input, 2x2-averaged by each downsampler and nearest-upsampled by each upsampler;
- the one place a GroupNorm sits on the main path (before `conv_out`, on each side) sees each colour as a
  pair of channels (+x, -x) in one group: the group mean is exactly 0, and at the scale used (2^-17) the
  variance is negligible against the norm's eps (1e-6), so the norm only multiplies by 1/sqrt(eps); the
  SiLU that follows is undone exactly by taking silu(y) - silu(-y) = y in the next convolution;
- the encoder's log-variance is -20 (sampling noise e^-10, far below one level of 255).

So a picture made of 8x8 blocks of one colour each comes back unchanged, and the latents are the block
colours (on [-1, 1]) times LATENT_GAIN, about the spread of real SDXL latents (std ~1).
"""

from __future__ import annotations

from typing import Any

LATENT_GAIN = 2.0
# Activations on the main path are this small, so GroupNorm's variance term is negligible against its eps;
# a power of two, so the weights stay exact when the export stores them in fp16.
_SCALE = 2.0**-17
_NORM_EPS = 1e-6  # diffusers' Encoder/Decoder norm eps
_LOG_VARIANCE = -20.0

BLOCK_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    # 16 channels in groups of 2 everywhere: room for the (+x, -x) pairs of the three colours.
    "block_out_channels": (16, 16, 16, 16),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 64,
    "scaling_factor": 1.0,
    "force_upcast": False,
}


def _identity(conv) -> None:
    """A square convolution that passes every channel through (centre tap 1)."""
    conv.weight.zero_()
    conv.bias.zero_()
    centre = conv.weight.shape[2] // 2
    for channel in range(min(conv.weight.shape[:2])):
        conv.weight[channel, channel, centre, centre] = 1.0


def _pairs_in(conv, gain: float) -> None:
    """Colour k (input channel k) into channels 2k and 2k+1 as +gain*x and -gain*x."""
    conv.weight.zero_()
    conv.bias.zero_()
    centre = conv.weight.shape[2] // 2
    for k in range(3):
        conv.weight[2 * k, k, centre, centre] = gain
        conv.weight[2 * k + 1, k, centre, centre] = -gain


def _pairs_out(conv, gain: float) -> None:
    """Output channel k = gain * (silu(y_2k) - silu(y_2k+1)) = gain * y_2k for a (+y, -y) pair."""
    conv.weight.zero_()
    conv.bias.zero_()
    centre = conv.weight.shape[2] // 2
    for k in range(3):
        conv.weight[k, 2 * k, centre, centre] = gain
        conv.weight[k, 2 * k + 1, centre, centre] = -gain


def build_block_vae():
    """The block VAE (fp32); the same weights every call (nothing random survives the settings below)."""
    import torch
    from diffusers import AutoencoderKL
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

    torch.manual_seed(0)
    vae = AutoencoderKL(**BLOCK_VAE_CONFIG).eval()
    # After the norm: y = x * _SCALE / sqrt(eps) on the main path.
    normed = _SCALE / _NORM_EPS**0.5
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, ResnetBlock2D):
                module.conv2.weight.zero_()
                module.conv2.bias.zero_()
            elif isinstance(module, Attention):
                module.to_out[0].weight.zero_()
                module.to_out[0].bias.zero_()
            elif isinstance(module, Downsample2D):
                # Padded (0, 1, 0, 1), 3x3, stride 2: taps (0..1, 0..1) average each 2x2 block.
                conv = module.conv
                conv.weight.zero_()
                conv.bias.zero_()
                for channel in range(conv.weight.shape[0]):
                    conv.weight[channel, channel, :2, :2] = 0.25
            elif isinstance(module, Upsample2D):
                _identity(module.conv)  # after the nearest-neighbour interpolation
        _pairs_in(vae.encoder.conv_in, _SCALE)
        _pairs_out(vae.encoder.conv_out, LATENT_GAIN / normed)
        vae.encoder.conv_out.bias[4:] = _LOG_VARIANCE  # channels 4-7: log-variance of the 4 latents
        _identity(vae.quant_conv)
        _identity(vae.post_quant_conv)
        _pairs_in(vae.decoder.conv_in, _SCALE / LATENT_GAIN)
        _pairs_out(vae.decoder.conv_out, 1.0 / normed)
    return vae
