"""The merge stage on LyCORIS files made by the LyCORIS library, proven against LyCORIS's own forward pass.

Files: LoHa, LoKr and Tucker LoCon (LyCORIS `create_network` + `save_weights` on the kit pipeline, fp16,
testkit.lycoris), including the Tucker/CP conv variants, LoKr with full `lokr_w1`/`lokr_w2` and
with both halves factorised (`lokr_w1_a/b`, `lokr_w2_a/b`), and kohya-format DoRA (`dora_scale`, per output
and per input channel, on a LoRA and on a LoHa).

Oracle, for each layer a LyCORIS module changes: the weight that module's forward pass applies at the LoRA's
scale (lycoris-lora 4.1.3, LyCORIS's own reading of the file), read off the forward with one-hot probes
(`forward_weights`), cast to fp16. Not LyCORIS's `get_diff_weight`/`get_merged_weight`: in 4.1.3 they apply
alpha/r twice for LoHa and LoKr, disagreeing with its forward. Our streamed export must be within 1 fp16 ulp
of it for every changed tensor (as tests/stages/test_merge_oracle.py holds the diffusers oracle), and the
base cast to fp16, bit for bit, everywhere else.

DoRA files are compared at scale 1 only: at other strengths fuseline keeps PEFT's convention, which LyCORIS
does not share (tests/stages/test_lycoris.py shows both).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from stages.lora import LoraInput
from stages.merge import merge_template
from testkit.lycoris import CASES as LYCORIS_CASES
from testkit.lycoris import forward_weights, load_lycoris_network
from tests.stages.test_merge_oracle import (
    IDENTITY,
    SHARD_MB,
    WEIGHTED,
    read_base_tensors,
    read_variant_tensors,
    ulp_distance,
)

SCALED = ("loha", "loha_tucker", "lokr_tucker", "lokr_both", "locon_tucker")
CASES = [(name, 1.0) for name in LYCORIS_CASES] + [(name, 0.7) for name in SCALED]


@pytest.mark.parametrize(("name", "scale"), CASES)
def test_export_equals_the_lycoris_forward_weight(name, scale, kit, kit_pipeline, lycoris_loras, tmp_path):
    path = lycoris_loras[name]
    lora = LoraInput(path=path, scale=scale, name=f"file:{path.name}")
    out = tmp_path / "out"
    result = merge_template(
        kit.diffusers_dir,
        kit.vae_dir,
        [lora],
        out,
        identity=IDENTITY,
        prediction_type="epsilon",
        shard_size_mb=SHARD_MB,
    )
    assert sum(result.manifest.loras[0].placed_keys.values()) == len(load_file(str(path)))

    network, models = load_lycoris_network(kit_pipeline, path, LYCORIS_CASES[name])
    oracle: dict[str, dict[str, torch.Tensor]] = {component: {} for component in WEIGHTED}
    for target in forward_weights(network, models, scale):
        oracle[target.component][f"{target.module}.weight"] = target.weight
    assert all(oracle[component] for component in WEIGHTED)
    for component in WEIGHTED:
        ours = read_variant_tensors(out / component)
        base = read_base_tensors(kit.diffusers_dir / component)
        assert set(ours) == set(base) and set(oracle[component]) <= set(base)
        assert result.fused_tensors[component] == len(oracle[component])
        for tensor_name, base_tensor in base.items():
            expected = oracle[component].get(tensor_name)
            if expected is None:
                assert torch.equal(ours[tensor_name], base_tensor.to(torch.float16)), (
                    f"{component}/{tensor_name}"
                )
            else:
                assert ulp_distance(ours[tensor_name], expected.to(torch.float16)) <= 1, (
                    f"{component}/{tensor_name}"
                )
                assert not torch.equal(ours[tensor_name], base_tensor.to(torch.float16)), tensor_name
