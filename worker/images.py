"""Decoding latents with image checks (NaN/Inf, black frames) and encoding images to PNG/JPEG/WebP."""

from __future__ import annotations

import base64
import io

import torch

# Above this many pixels the VAE decodes in tiles: a full-frame fp16 decode of 1536x1536 needs more
# memory than the UNet pass itself on 24 GB cards.
TILING_PIXELS = 1024 * 1536


def latents_are_finite(latents: torch.Tensor) -> bool:
    return bool(torch.isfinite(latents).all())


def invalid_reason(pixels: torch.Tensor) -> str | None:
    """Why decoded images (batch, 3, h, w in [-1, 1]) are unusable, or None when they are fine.

    A black frame is one whose every pixel is 0 after 8-bit quantisation: what an fp16 VAE overflow
    leaves once NaNs are clamped, and practically never a real generation.
    """
    if not bool(torch.isfinite(pixels).all()):
        return "NaN/Inf in the decoded pixels"
    quantised = ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round()
    black = [i for i in range(quantised.shape[0]) if quantised[i].max() == 0]
    if black:
        return f"black frame (image {', '.join(map(str, black))})"
    return None


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, *, force_fp32: bool) -> torch.Tensor:
    """Decode SDXL latents to pixels in [-1, 1] as StableDiffusionXLPipeline does, optionally in fp32.

    Without `force_fp32` the VAE runs in its own dtype, upcast only when its config says it must
    (`force_upcast`, false for the fp16-fix VAE). The VAE is restored to its dtype afterwards: the
    pipeline is shared by later jobs.
    """
    original = vae.dtype
    upcast = force_fp32 or (original == torch.float16 and bool(vae.config.force_upcast))
    dtype = torch.float32 if upcast else original
    batch, _, height, width = latents.shape
    pixels = height * width * 64
    if batch > 1:
        vae.enable_slicing()
    else:
        vae.disable_slicing()
    if pixels > TILING_PIXELS:
        vae.enable_tiling()
    else:
        vae.disable_tiling()
    if dtype != original:
        vae.to(dtype)
    try:
        latents = latents.to(device=vae.device, dtype=dtype)
        mean = getattr(vae.config, "latents_mean", None)
        std = getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean_t = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
            std_t = torch.tensor(std).view(1, -1, 1, 1).to(latents)
            latents = latents * std_t / vae.config.scaling_factor + mean_t
        else:
            latents = latents / vae.config.scaling_factor
        return vae.decode(latents, return_dict=False)[0]
    finally:
        if vae.dtype != original:
            vae.to(original)


def to_pil(pixels: torch.Tensor) -> list:
    """[-1, 1] float images to PIL, rounding as diffusers' VaeImageProcessor does."""
    from PIL import Image

    array = (pixels.float() / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray((image * 255).round().astype("uint8")) for image in array]


def encode_image(image, fmt: str, quality: int) -> bytes:
    """PNG (lossless), JPEG or WebP bytes; the same image gives the same bytes."""
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, format="PNG")
    elif fmt == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    elif fmt == "webp":
        image.save(buffer, format="WEBP", quality=quality)
    else:
        raise ValueError(f"unsupported image format {fmt!r}")
    return buffer.getvalue()


def to_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
