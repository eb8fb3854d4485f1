"""LyCORIS files for the tiny SDXL kit, written by the LyCORIS library itself, and LyCORIS's own reading of
them: the oracle for fuseline's LoHa, LoKr, Tucker LoCon and kohya-format DoRA merge.

fuseline's merge of these formats is checked against an independent implementation, so the files do not
come from fuseline's writer: `write_lycoris` builds LyCORIS's kohya network (`lycoris.kohya`, what kohya's
sd-scripts trains with `--network_module lycoris.kohya`) on the kit pipeline, draws every factor from a
fixed seed (as if trained: LyCORIS initialises half of each update to zero) and saves it with LyCORIS's
`save_weights`. `forward_weights` reads the file back with LyCORIS's own loader and asks each LyCORIS
module's `forward` for the weight it applies (see there).

Needs the `lycoris-lora` package (requirements/build.in); only tests import this module.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

# LyCORIS's "full" preset restricted to what an SDXL UNet and CLIP text encoders have: attention, ResNet,
# sampler and embedding layers, convolutions included. LyCORIS 4.1.3's own "full" preset also lists
# `TimestepEmbedding` (for Anima), which makes it target diffusers' time_embedding twice and fail its
# duplicate-name check.
SDXL_FULL_PRESET: dict[str, Any] = {
    "enable_conv": True,
    "unet_target_module": ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"],
    "unet_target_name": ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"],
    "text_encoder_target_module": ["CLIPAttention", "CLIPMLP"],
    "text_encoder_target_name": [],
}


@dataclass(frozen=True)
class LycorisCase:
    """One LyCORIS file: the algorithm and the `create_network` arguments kohya would pass for it."""

    name: str
    algo: str
    seed: int
    dim: int = 4
    alpha: float = 2.0
    conv_dim: int = 4
    conv_alpha: float = 1.0
    # network_args as kohya passes them (`--network_args use_tucker=True factor=8 ...`)
    args: Mapping[str, Any] = field(default_factory=dict)
    dtype: torch.dtype = torch.float16
    # False where LyCORIS's file loader cannot rebuild the file's modules (see `load_lycoris_network`)
    loader_reads_it: bool = True
    # std of the random factors: chosen per algorithm so that each update is comparable to the weight it
    # changes (neither lost below fp16 resolution nor swamping it)
    std: float = 0.5


CASES: dict[str, LycorisCase] = {
    case.name: case
    for case in (
        LycorisCase("loha", "loha", seed=201, std=0.32),
        LycorisCase("loha_tucker", "loha", seed=202, args={"use_tucker": True}, std=0.32),
        LycorisCase("lokr", "lokr", seed=203, args={"factor": 8}, std=0.19),
        LycorisCase("lokr_tucker", "lokr", seed=204, args={"factor": 8, "use_tucker": True}, std=0.19,
                    loader_reads_it=False),
        LycorisCase("lokr_full", "lokr", seed=205, args={"factor": 8, "full_matrix": True}, std=0.15),
        LycorisCase("lokr_both", "lokr", seed=206, dim=2, conv_dim=2,
                    args={"factor": 8, "decompose_both": True}, std=0.32, loader_reads_it=False),
        LycorisCase("locon_tucker", "locon", seed=207, args={"use_tucker": True}, std=0.19),
        LycorisCase("dora", "lora", seed=208, args={"dora_wd": True}, std=0.2),
        LycorisCase("dora_in", "lora", seed=209, args={"dora_wd": True, "wd_on_output": False}, std=0.2,
                    loader_reads_it=False),
        LycorisCase("loha_dora", "loha", seed=210, args={"dora_wd": True}, std=0.32),
    )
}  # fmt: skip


@dataclass(frozen=True)
class _Models:
    """Models by component name, read as attributes (as LyCORIS reads them off a pipeline)."""

    models: Mapping[str, nn.Module]

    def __getattr__(self, name: str) -> nn.Module:
        try:
            return self.models[name]
        except KeyError:
            raise AttributeError(name) from None


def _text_encoders(pipe) -> list[nn.Module]:
    # kohya names text encoder modules from CLIPTextModel's `text_model.` level, which transformers 5
    # dropped from CLIPTextModel (CLIPTextModelWithProjection keeps it); a container puts it back, so the
    # file has the names real SDXL LyCORIS files have.
    te1 = pipe.text_encoder
    if not hasattr(te1, "text_model"):
        te1 = nn.ModuleDict({"text_model": te1})
    return [te1, pipe.text_encoder_2]


def _create_network(pipe, case: LycorisCase):
    """LyCORIS's kohya network for `case` on the models of `pipe`, made as kohya's trainer makes it."""
    import tempfile

    import toml
    from lycoris.kohya import create_network

    # create_network takes a preset by name or as a TOML file, and applies it to the network class.
    with tempfile.TemporaryDirectory() as folder:
        preset = Path(folder) / "sdxl-full.toml"
        preset.write_text(toml.dumps(SDXL_FULL_PRESET))
        return create_network(
            1.0,
            case.dim,
            case.alpha,
            None,
            _text_encoders(pipe),
            pipe.unet,
            algo=case.algo,
            conv_dim=case.conv_dim,
            conv_alpha=case.conv_alpha,
            preset=str(preset),
            # network_args arrive from kohya's command line as strings
            **{key: str(value) for key, value in case.args.items()},
        )


@torch.no_grad()
def _draw_factors(network, case: LycorisCase) -> None:
    generator = torch.Generator().manual_seed(case.seed)
    for module in network.loras:
        for name, param in sorted(module.named_parameters()):
            if name == "dora_scale":
                # DoRA's magnitude starts as the base weight's norms: perturb it so it is not a no-op.
                param.mul_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * case.std)


def write_lycoris(pipe, case: LycorisCase, path: Path) -> None:
    """Write LyCORIS file `case` for the kit pipeline `pipe` to `path`. The network is applied (as kohya
    does before training) to copies of the pipeline's models, so `pipe` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    models = _Models({component: copy.deepcopy(getattr(pipe, component)) for component in COMPONENTS})
    network = _create_network(models, case)
    network.apply_to(_text_encoders(models), models.unet, apply_text_encoder=True, apply_unet=True)
    _draw_factors(network, case)
    network.save_weights(str(path), case.dtype, {"ss_network_module": "lycoris.kohya"})


@dataclass(frozen=True)
class ForwardWeight:
    """The weight a LyCORIS module's forward applies to the layer `module` of `component`."""

    component: str
    module: str
    lycoris_name: str
    algo: str
    weight: torch.Tensor


def _without_biases(model: nn.Module) -> nn.Module:
    """A copy of `model` whose linear and conv layers have no bias, so that a layer's output on a one-hot
    probe is a weight entry exactly (adding and subtracting a bias would round it)."""
    model = copy.deepcopy(model)
    for layer in model.modules():
        if isinstance(layer, nn.Linear | nn.Conv2d) and layer.bias is not None:
            layer.bias = None
    return model


@torch.no_grad()
def forward_weight(module, multiplier: float) -> torch.Tensor:
    """The weight LyCORIS module `module` applies at `multiplier`, read off its forward pass: the layer's
    output for one-hot inputs. A linear layer gets the identity matrix (row i of the output is column i of
    the weight). A stride-1 convolution gets one image per input channel holding a single 1, placed so that
    the output positions around it see every kernel tap; a strided one gets one image per input channel
    and tap, placed where one output position sees the whole kernel. The layer must have no bias (see
    `_without_biases`): each output is then a weight entry times 1 plus zeros, exact."""
    layer = module.org_module[0]
    module.multiplier = multiplier
    if isinstance(layer, nn.Linear):
        return module(torch.eye(layer.in_features)).T.contiguous()
    if not isinstance(layer, nn.Conv2d) or layer.groups != 1 or layer.dilation != (1, 1):
        raise TypeError(f"{module.lora_name}: no probe for {layer}")
    out_channels, in_channels, *kernel = layer.weight.shape
    channels = torch.arange(in_channels)
    if layer.stride == (1, 1):
        # A 1 at input position a reaches output position a + padding - u through tap u.
        at = [max(0, k - 1 - p) for k, p in zip(kernel, layer.padding, strict=True)]
        probe = torch.zeros(in_channels, in_channels, at[0] + kernel[0], at[1] + kernel[1])
        probe[channels, channels, at[0], at[1]] = 1.0
        out = module(probe)  # (in, out, h, w)
        rows, cols = (
            [a + p - u for u in range(k)] for a, p, k in zip(at, layer.padding, kernel, strict=True)
        )
        return out[:, :, rows][:, :, :, cols].permute(1, 0, 2, 3).contiguous()
    # Output position o sees input rows o * stride - padding ... + kernel - 1: put the kernel window there.
    where = [math.ceil(p / s) for p, s in zip(layer.padding, layer.stride, strict=True)]
    start = [o * s - p for o, s, p in zip(where, layer.stride, layer.padding, strict=True)]
    probe = torch.zeros(in_channels, *kernel, in_channels, start[0] + kernel[0], start[1] + kernel[1])
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            probe[channels, i, j, channels, start[0] + i, start[1] + j] = 1.0
    out = module(probe.flatten(0, 2))[:, :, where[0], where[1]]  # (in * kh * kw, out)
    return out.T.reshape(out_channels, in_channels, *kernel).contiguous()


@dataclass(frozen=True)
class LycorisTarget:
    """A layer a LyCORIS module of a loaded network is attached to."""

    component: str
    module: str
    lycoris_name: str
    algo: str
    lycoris_module: Any


def lycoris_targets(network, models: Mapping[str, nn.Module]) -> list[LycorisTarget]:
    """The layers of `models` (by component) that the modules of a loaded LyCORIS network attach to."""
    names = {
        id(layer): (component, name)
        for component, model in models.items()
        for name, layer in model.named_modules()
        if isinstance(layer, nn.Linear | nn.Conv2d)
    }
    # `network.loras` also holds modules LyCORIS's loader creates and then drops; these two lists do not.
    return [
        LycorisTarget(*names[id(module.org_module[0])], module.lora_name, module.name, module)
        for module in network.unet_loras + network.text_encoder_loras
    ]


def forward_weights(network, models: Mapping[str, nn.Module], multiplier: float) -> list[ForwardWeight]:
    """Every module of a loaded LyCORIS network with the weight its forward applies at `multiplier`."""
    return [
        ForwardWeight(
            t.component, t.module, t.lycoris_name, t.algo, forward_weight(t.lycoris_module, multiplier)
        )
        for t in lycoris_targets(network, models)
    ]


def load_lycoris_network(pipe, path: Path, case: LycorisCase):
    """LyCORIS's reading of file `path` (written for `case`) on bias-free copies of the kit pipeline's
    models: (network, {component: model}).

    LyCORIS's file loader (`create_network_from_weights`) builds each module from the file's tensors alone.
    It cannot rebuild three of its own layouts (a Tucker LoKr: it takes the rank from the wrong side of
    w2_a; LoKr with both halves low-rank: it builds the module with other factor shapes than the file's;
    DoRA with wd_on_out=False: it always builds the magnitude per output), so for those cases
    (`loader_reads_it=False`) the network is created as it was for writing and the file is loaded into it
    with LyCORIS's `load_weights`.
    """
    from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights

    models = {component: _without_biases(getattr(pipe, component)) for component in COMPONENTS}
    bias_free = _Models(models)
    if case.loader_reads_it:
        # The loader builds its network with the preset last applied to LyCORIS's network class.
        LycorisNetworkKohya.apply_preset(SDXL_FULL_PRESET)
        network, _ = create_network_from_weights(
            1.0, str(path), None, _text_encoders(bias_free), bias_free.unet, for_inference=True
        )
        return network, models
    network = _create_network(bias_free, case)
    network.apply_to(_text_encoders(bias_free), bias_free.unet, apply_text_encoder=True, apply_unet=True)
    info = network.load_weights(str(path))
    if info:
        raise RuntimeError(f"LyCORIS could not load {path} into its own network: {info}")
    return network, models
