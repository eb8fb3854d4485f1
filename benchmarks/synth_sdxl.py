"""Synthetic SDXL at full size: random fp16 weights with SDXL's real key layout and shapes, written streaming.

`python -m benchmarks.synth_sdxl [OUT] [--quick] [--seed N]` writes, under OUT (default
/tmp/fuseline-bench/sdxl-synth, or .../quick-synth with --quick):
  config/                  the configs the models are built from (full size: fuseline/configs/sdxl-base)
  base/                    diffusers folder: unet, vae, text_encoder, text_encoder_2 as unsharded fp16
                           safetensors without a variant (as the convert stage writes), tokenizers, scheduler
  sdxl-synth.safetensors   the same tensors as one SGM/LDM single-file checkpoint (the test kit's key map)
  loras/<name>.safetensors kohya LoRAs (rank 32, alpha 16) over every UNet attention, feed-forward, ResNet and
                           sampler conv layer and both text encoders' attention and MLP layers
  synth.json               what was written and how long it took, written last (its presence = complete)

Names and shapes come from the models instantiated on the meta device: nothing is ever materialised
whole. Each tensor is drawn from its own seed (hash of seed, component and name), so the files are the same
every run and any tensor can be regenerated alone; memory holds one tensor (one text-encoder layer for the
single file, whose OpenCLIP layout fuses q, k and v). Values keep an fp16 forward pass finite: weights
N(0, 1/fan_in), norm weights 1, biases 0. `--quick` does the same at the test kit's tiny sizes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

DEFAULT_ROOT = Path("/tmp/fuseline-bench")
SDXL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "fuseline" / "configs" / "sdxl-base"
SYNTH_FORMAT = 1
MARKER_NAME = "synth.json"
SINGLE_FILE_NAME = "sdxl-synth.safetensors"
WEIGHT_FILES = {
    "unet": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
    "text_encoder_2": "model.safetensors",
}
LORA_NAMES = ("style", "detail")
# alpha != rank, so a reader that ignores alpha is visibly wrong.
LORA_RANK = {False: 32, True: 4}
LORA_ALPHA = {False: 16.0, True: 2.0}
SAFETENSORS_DTYPE = "F16"


@dataclass(frozen=True)
class SynthPaths:
    root: Path
    config_dir: Path
    base_dir: Path
    single_file: Path
    loras: dict[str, Path]
    marker: Path


def synth_paths(root: Path) -> SynthPaths:
    root = Path(root)
    return SynthPaths(
        root=root,
        config_dir=root / "config",
        base_dir=root / "base",
        single_file=root / SINGLE_FILE_NAME,
        loras={name: root / "loras" / f"{name}.safetensors" for name in LORA_NAMES},
        marker=root / MARKER_NAME,
    )


def default_root(quick: bool) -> Path:
    return DEFAULT_ROOT / ("quick-synth" if quick else "sdxl-synth")


# ---- configs and meta models ------------------------------------------------------------------------------


def write_quick_config_dir(target: Path) -> None:
    """A diffusers config folder (no weights) at the test kit's tiny sizes."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

    from testkit import models as kit
    from testkit.tokenizers import save_tokenizers

    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SDXL_CONFIG_DIR / "model_index.json", target / "model_index.json")
    with torch.device("meta"):
        UNet2DConditionModel(**kit.UNET_CONFIG).save_config(target / "unet")
        AutoencoderKL(**kit.VAE_CONFIG).save_config(target / "vae")
    kit._text_encoder_config(kit.TEXT_ENCODER_CONFIG).save_pretrained(target / "text_encoder")
    kit._text_encoder_config(kit.TEXT_ENCODER_2_CONFIG).save_pretrained(target / "text_encoder_2")
    EulerDiscreteScheduler(**kit.SCHEDULER_CONFIG).save_config(target / "scheduler")
    save_tokenizers(target)


def meta_models(config_dir: Path) -> dict[str, Any]:
    """The four weighted SDXL components on the meta device: names, shapes and module types, no memory."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config_dir = Path(config_dir)
    with torch.device("meta"):
        return {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder")),
            "text_encoder_2": CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(config_dir / "text_encoder_2")
            ),
        }


def tensor_shapes(model) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


# ---- values ------------------------------------------------------------------------------------------------


def tensor_seed(seed: int, component: str, name: str) -> int:
    digest = hashlib.sha256(f"{seed}/{component}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def synth_tensor(seed: int, component: str, name: str, shape: tuple[int, ...]):
    """The fp16 value of one tensor: N(0, 1/fan_in) for matrices, kernels and embeddings (keeps every
    activation O(1), so fp16 stays finite), 1 for norm weights (every 1-D weight in SDXL is a norm's), 0 for
    biases."""
    import torch

    if len(shape) == 1:
        fill = 1.0 if name.endswith("weight") else 0.0
        return torch.full(shape, fill, dtype=torch.float16)
    generator = torch.Generator().manual_seed(tensor_seed(seed, component, name))
    fan_in = 1
    for size in shape[1:]:
        fan_in *= size
    out = torch.randn(shape, generator=generator, dtype=torch.float16)
    return out.mul_(fan_in**-0.5)


# ---- streaming safetensors ---------------------------------------------------------------------------------


def safetensors_layout(shapes: Mapping[str, tuple[int, ...]]) -> tuple[bytes, dict[str, int], int]:
    """(header bytes incl. its length prefix, data offset of each tensor from the file start, file size) of an
    all-fp16 safetensors file with tensors in sorted name order and metadata {"format": "pt"}."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    cursor = 0
    begins: dict[str, int] = {}
    for name in sorted(shapes):
        size = 2
        for dim in shapes[name]:
            size *= dim
        header[name] = {
            "dtype": SAFETENSORS_DTYPE,
            "shape": list(shapes[name]),
            "data_offsets": [cursor, cursor + size],
        }
        begins[name] = cursor
        cursor += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
    prefix = len(raw).to_bytes(8, "little") + raw
    return prefix, {name: len(prefix) + begin for name, begin in begins.items()}, len(prefix) + cursor


def _tensor_bytes(tensor) -> memoryview:
    import torch

    if tensor.dtype != torch.float16:
        raise TypeError(f"synthetic tensors are fp16, got {tensor.dtype}")
    return memoryview(tensor.contiguous().view(torch.uint8).numpy())


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def write_streaming(path: Path, shapes: Mapping[str, tuple[int, ...]], produce: Callable[[str], Any]) -> int:
    """Write an fp16 safetensors file one tensor at a time (`produce(name)`); returns its size in bytes."""
    prefix, offsets, size = safetensors_layout(shapes)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(prefix)
        for name in sorted(shapes):
            tensor = produce(name)
            if tuple(tensor.shape) != tuple(shapes[name]):
                raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, expected {shapes[name]}")
            if handle.tell() != offsets[name]:
                raise AssertionError(f"{path}: {name} would land at {handle.tell()}, not {offsets[name]}")
            handle.write(_tensor_bytes(tensor))
    os.replace(tmp, path)
    return size


# ---- the single-file checkpoint ----------------------------------------------------------------------------

_TE2_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.")


def sgm_groups(models: Mapping[str, Any]) -> list[tuple[str, list[str], Callable[[dict], dict]]]:
    """(component, diffusers keys, converter) groups: each group converts to its SGM tensors on its own (a
    group is one tensor, or one OpenCLIP layer whose q, k and v become one in_proj)."""
    from testkit.sgm import clip_to_sgm, open_clip_to_sgm, unet_to_sgm, vae_to_sgm

    unet_config, vae_config = models["unet"].config, models["vae"].config
    converters: dict[str, Callable[[dict], dict]] = {
        "unet": lambda sd: unet_to_sgm(sd, unet_config),
        "vae": lambda sd: vae_to_sgm(sd, vae_config),
        "text_encoder": clip_to_sgm,
        "text_encoder_2": open_clip_to_sgm,
    }
    groups: list[tuple[str, list[str], Callable[[dict], dict]]] = []
    for component, model in models.items():
        layers: dict[str, list[str]] = {}
        for key in model.state_dict():
            match = _TE2_LAYER.match(key) if component == "text_encoder_2" else None
            if match:
                layers.setdefault(match[1], []).append(key)
            else:
                groups.append((component, [key], converters[component]))
        groups += [(component, keys, converters[component]) for keys in layers.values()]
    return groups


def read_tensor(fd: int, offset: int, shape: tuple[int, ...]):
    """One fp16 tensor read with pread: no memory map, so the mapped file's pages never count in RSS."""
    import torch

    count = 1
    for dim in shape:
        count *= dim
    buffer = bytearray(2 * count)
    view, done = memoryview(buffer), 0
    while done < len(buffer):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise EOFError(f"safetensors data ends early at byte {offset + done}")
        done += got
    return torch.frombuffer(buffer, dtype=torch.float16).reshape(shape)


def write_single_file(models: Mapping[str, Any], base_dir: Path, path: Path) -> int:
    """Write the SGM single file from the diffusers folder just written (same tensors, SGM names and
    layout), group by group at each tensor's offset. Returns the file size."""
    groups = sgm_groups(models)
    metas = {component: model.state_dict() for component, model in models.items()}
    shapes: dict[str, tuple[int, ...]] = {}
    for component, keys, convert in groups:
        meta = metas[component]
        for name, tensor in convert({k: meta[k] for k in keys}).items():
            if name in shapes:
                raise ValueError(f"SGM name {name} produced twice; fix testkit/sgm.py")
            shapes[name] = tuple(tensor.shape)
    prefix, offsets, size = safetensors_layout(shapes)
    # The diffusers files were written by write_streaming from these same shapes: same layout.
    sources = {c: safetensors_layout(tensor_shapes(m))[1] for c, m in models.items()}
    tmp = path.with_name(f".{path.name}.tmp")
    fds: dict[str, int] = {}
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        fds = {c: os.open(base_dir / c / WEIGHT_FILES[c], os.O_RDONLY) for c in models}
        os.ftruncate(fd, size)
        _pwrite_all(fd, memoryview(prefix), 0)
        for component, keys, convert in groups:
            meta = metas[component]
            tensors = {
                k: read_tensor(fds[component], sources[component][k], tuple(meta[k].shape)) for k in keys
            }
            for name, tensor in convert(tensors).items():
                _pwrite_all(fd, _tensor_bytes(tensor), offsets[name])
    finally:
        os.close(fd)
        for source in fds.values():
            os.close(source)
    os.replace(tmp, path)
    return size


# ---- LoRAs -------------------------------------------------------------------------------------------------


def lora_spec(name: str, seed: int, quick: bool):
    import torch

    from testkit.loras import LOCON_TARGETS, TEXT_ENCODER_LAYER, LoraSpec

    return LoraSpec(
        name=name,
        seed=seed * 1000 + LORA_NAMES.index(name) + 1,
        rank=LORA_RANK[quick],
        alpha=LORA_ALPHA[quick],
        dtype=torch.float16,
        targets={
            "unet": LOCON_TARGETS,
            "text_encoder": TEXT_ENCODER_LAYER,
            "text_encoder_2": TEXT_ENCODER_LAYER,
        },
    )


def write_lora(models: Mapping[str, Any], name: str, seed: int, quick: bool, path: Path) -> int:
    """A kohya LoRA (original SGM block names, as kohya's SDXL scripts write) through the kit's writer; the
    kit reads only module names and shapes from the models, so meta models serve."""
    from testkit.loras import write_kohya

    pipe = SimpleNamespace(**{c: models[c] for c in ("unet", "text_encoder", "text_encoder_2")})
    write_kohya(pipe, lora_spec(name, seed, quick), path, sgm_layout=True)
    return path.stat().st_size


# ---- the whole set ----------------------------------------------------------------------------------------


def is_complete(paths: SynthPaths, quick: bool, seed: int) -> bool:
    try:
        marker = json.loads(paths.marker.read_text())
    except (OSError, ValueError):
        return False
    return (
        marker.get("format") == SYNTH_FORMAT and marker.get("quick") == quick and marker.get("seed") == seed
    )


def generate(root: Path, quick: bool = False, seed: int = 0, log: Callable[[str], None] = print) -> dict:
    """Write the synthetic set under `root` (replacing what is there); returns the report also saved as
    synth.json."""
    paths = synth_paths(root)
    paths.marker.unlink(missing_ok=True)
    for stale in (paths.config_dir, paths.base_dir, paths.root / "loras"):
        shutil.rmtree(stale, ignore_errors=True)
    paths.single_file.unlink(missing_ok=True)
    paths.root.mkdir(parents=True, exist_ok=True)

    seconds: dict[str, float] = {}
    sizes: dict[str, int] = {}
    started = time.perf_counter()
    if quick:
        write_quick_config_dir(paths.config_dir)
    else:
        shutil.copytree(SDXL_CONFIG_DIR, paths.config_dir)
    models = meta_models(paths.config_dir)
    shutil.copytree(paths.config_dir, paths.base_dir)
    params = {c: sum(t.numel() for t in m.state_dict().values()) for c, m in models.items()}
    seconds["setup"] = time.perf_counter() - started

    for component, model in models.items():
        t0 = time.perf_counter()
        shapes = tensor_shapes(model)
        sizes[component] = write_streaming(
            paths.base_dir / component / WEIGHT_FILES[component],
            shapes,
            lambda name, c=component, s=shapes: synth_tensor(seed, c, name, s[name]),
        )
        seconds[component] = time.perf_counter() - t0
        log(f"{component}: {params[component] / 1e9:.3f} B params, {sizes[component] / 1e9:.2f} GB "
            f"in {seconds[component]:.1f} s")  # fmt: skip

    t0 = time.perf_counter()
    sizes["single_file"] = write_single_file(models, paths.base_dir, paths.single_file)
    seconds["single_file"] = time.perf_counter() - t0
    log(f"single file: {sizes['single_file'] / 1e9:.2f} GB in {seconds['single_file']:.1f} s")

    for name, path in paths.loras.items():
        t0 = time.perf_counter()
        sizes[f"lora_{name}"] = write_lora(models, name, seed, quick, path)
        seconds[f"lora_{name}"] = time.perf_counter() - t0
        log(f"lora {name}: {sizes[f'lora_{name}'] / 1e6:.0f} MB in {seconds[f'lora_{name}']:.1f} s")

    seconds["total"] = time.perf_counter() - started
    report = {
        "format": SYNTH_FORMAT,
        "quick": quick,
        "seed": seed,
        "params": params,
        "params_total": sum(params.values()),
        "bytes": sizes,
        "lora": {"rank": LORA_RANK[quick], "alpha": LORA_ALPHA[quick]},
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }
    paths.marker.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report


def ensure(root: Path, quick: bool, seed: int = 0, log: Callable[[str], None] = print) -> SynthPaths:
    """The synthetic set under `root`; generated unless a complete one of the same seed and size is there."""
    paths = synth_paths(root)
    if not is_complete(paths, quick, seed):
        generate(root, quick, seed, log)
    return paths


def main(argv: Iterable[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.synth_sdxl", description=__doc__.splitlines()[0]
    )
    parser.add_argument("out", nargs="?", type=Path, help="output folder (default /tmp/fuseline-bench/...)")
    parser.add_argument("--quick", action="store_true", help="the test kit's tiny sizes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(list(argv) if argv is not None else None)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = args.out or default_root(args.quick)
    report = generate(root, args.quick, args.seed, log=lambda line: print(line, flush=True))
    print(json.dumps(report, indent=2, sort_keys=True))
    print(f"wrote {root}", file=sys.stderr)


if __name__ == "__main__":
    main()
