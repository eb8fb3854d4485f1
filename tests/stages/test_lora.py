"""Reading LoRA files and placing every key on a base tensor: the kit's formats, and the refusals."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fuseline.core.manifest import CheckpointRef, VaeRef
from fuseline.core.safetensors_io import sniff_format
from stages.errors import StageError
from stages.fuse import LoraFactors
from stages.lora import COMPONENTS, LoraInput, read_lora, refused_format
from stages.lycoris import LohaFactors, LokrFactors, TuckerLoconFactors
from stages.merge import TemplateIdentity, merge_template, read_base_layout
from testkit.loras import SPECS, kit_lora_factors, read_metadata
from testkit.lycoris import CASES as LYCORIS_CASES
from testkit.lycoris import load_lycoris_network, lycoris_targets

SUPPORTED = ["kohya_sgm", "kohya_diffusers", "kohya_te", "locon", "peft", "dora"]
# Keys per adapted module in the file: kohya down/up/alpha; PEFT lora_A/lora_B (+ DoRA magnitude).
KEYS_PER_MODULE = {"kohya_sgm": 3, "kohya_diffusers": 3, "kohya_te": 3, "locon": 3, "peft": 2, "dora": 3}


@pytest.fixture(scope="module")
def layout(kit):
    return read_base_layout(kit.diffusers_dir)


def _read(path: Path, layout, name: str | None = None, sha256: str | None = None):
    shapes, unet_config = layout
    return read_lora(
        LoraInput(path=path, scale=1.0, name=name or f"file:{path.name}", sha256=sha256), shapes, unet_config
    )


@pytest.mark.parametrize("name", SUPPORTED)
def test_kit_lora_is_placed_completely_with_its_own_factors(name, kit, kit_pipeline, layout):
    loaded = _read(kit.loras[name], layout)
    expected = {
        (f.target.component, f"{f.target.module}.weight"): f for f in kit_lora_factors(kit_pipeline, name)
    }
    assert set(loaded.factors) == set(expected)
    for target, factors in loaded.factors.items():
        truth = expected[target]
        assert torch.equal(factors.down, truth.down), target
        assert torch.equal(factors.up, truth.up), target
        assert factors.alpha == SPECS[name].alpha  # from kohya's .alpha keys or PEFT's adapter metadata
        if name == "dora":
            assert torch.equal(factors.magnitude, truth.magnitude)
        else:
            assert factors.magnitude is None
    file_keys = len(load_file(str(kit.loras[name])))
    assert loaded.file_keys == sum(loaded.placed_keys.values()) == file_keys
    per_component = {c: 0 for c in COMPONENTS}
    for component, _ in expected:
        per_component[component] += KEYS_PER_MODULE[name]
    assert loaded.placed_keys == per_component
    assert loaded.sha256 == hashlib.sha256(kit.loras[name].read_bytes()).hexdigest()


def test_text_encoder_keys_are_placed_on_both_encoders(kit, layout):
    placed = _read(kit.loras["kohya_te"], layout).placed_keys
    assert placed["text_encoder"] > 0 and placed["text_encoder_2"] > 0 and placed["unet"] > 0


def test_peft_file_without_adapter_metadata_reads_alpha_as_rank(kit, layout, tmp_path):
    path = tmp_path / "bare.safetensors"
    save_file(load_file(str(kit.loras["peft"])), str(path), metadata={"format": "pt"})
    assert "lora_adapter_metadata" in read_metadata(kit.loras["peft"])
    loaded = _read(path, layout)
    assert {f.alpha for f in loaded.factors.values()} == {float(SPECS["peft"].rank)}


def test_sd15_lora_is_refused_naming_it_and_its_keys(kit, layout):
    with pytest.raises(StageError) as err:
        _read(kit.loras["sd15"], layout, name="file:loras/sd15.safetensors")
    message = str(err.value)
    assert err.value.code == "LORA_PLACEMENT"
    assert "file:loras/sd15.safetensors" in message
    # an unknown module and a shape mismatch, each with what was found and what the base has
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1" in message
    assert "up factor [640, 4]" in message and "[64, 96]" in message
    assert "text_encoder" in message


def test_truncated_file_is_refused_naming_it(kit, layout, tmp_path):
    data = kit.loras["peft"].read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(StageError, match="truncated") as err:
        _read(path, layout)
    assert str(path) in str(err.value) and err.value.code == "LORA_TRUNCATED"


@pytest.mark.parametrize(
    ("payload", "code"),
    [(b"<html>not found</html>", "LORA_INVALID"), (b"abc", "LORA_INVALID"), (b"", "LORA_INVALID")],
)
def test_non_safetensors_file_is_refused_naming_it(layout, tmp_path, payload, code):
    path = tmp_path / "page.safetensors"
    path.write_bytes(payload)
    with pytest.raises(StageError) as err:
        _read(path, layout)
    assert err.value.code == code and str(path) in str(err.value)


def test_broken_header_json_is_refused(layout, tmp_path):
    path = tmp_path / "bad.safetensors"
    header = b"{not json"
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(StageError, match="no valid safetensors header"):
        _read(path, layout)


def test_pickle_is_refused(layout, tmp_path):
    path = tmp_path / "lora.safetensors"  # the name does not matter, the bytes do
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1)}, path)
    with pytest.raises(StageError, match="pickle") as err:
        _read(path, layout)
    assert err.value.code == "LORA_PICKLE"


@pytest.mark.parametrize(
    ("key", "fmt"),
    [
        ("lora_unet_down_blocks_1_attentions_0_proj_in.oft_blocks", "OFT"),
        ("lora_unet_down_blocks_1_attentions_0_proj_in.a1.weight", "GLoRA"),
        ("lora_unet_down_blocks_1_attentions_0_proj_in.on_input", "IA3"),
        ("lora_unet_down_blocks_1_attentions_0_proj_in.diff", "full weight difference"),
        ("lora_unet_down_blocks_1_attentions_0_norm.w_norm", "norm layers"),
    ],
)
def test_unsupported_lycoris_formats_are_refused_naming_the_format_and_the_fix(layout, tmp_path, key, fmt):
    path = tmp_path / "lycoris.safetensors"
    save_file({key: torch.zeros(2, 2), "lora_unet_x.alpha": torch.tensor(1.0)}, str(path))
    with pytest.raises(StageError, match=fmt) as err:
        _read(path, layout)
    assert err.value.code == "LORA_FORMAT_UNSUPPORTED" and key in str(err.value)
    assert "extract a LoRA" in str(err.value) and "LoHa (hada_*)" in str(err.value)


def test_refused_format_ignores_plain_lora_keys():
    assert refused_format(["lora_unet_a.lora_down.weight", "lora_unet_a.alpha", "x.lora_A.weight"]) is None


def test_sha256_mismatch_is_refused(kit, layout):
    with pytest.raises(StageError, match="sha256") as err:
        _read(kit.loras["peft"], layout, sha256="0" * 64)
    assert err.value.code == "LORA_SHA256_MISMATCH"


def test_missing_file_is_refused(layout, tmp_path):
    with pytest.raises(StageError, match="does not exist"):
        _read(tmp_path / "absent.safetensors", layout)


def test_factor_without_its_partner_is_refused(kit, layout, tmp_path):
    state = load_file(str(kit.loras["peft"]))
    dropped = next(k for k in sorted(state) if k.endswith("lora_B.weight"))
    del state[dropped]
    path = tmp_path / "half.safetensors"
    save_file(state, str(path), metadata=read_metadata(kit.loras["peft"]))
    with pytest.raises(StageError, match="no matching up factor") as err:
        _read(path, layout)
    assert dropped.removesuffix(".lora_B.weight") in str(err.value)


def test_stray_kohya_key_fails_the_whole_lora(kit, layout, tmp_path):
    state = load_file(str(kit.loras["kohya_diffusers"]))
    state["lora_unet_made_up_module.alpha"] = torch.tensor(1.0)
    path = tmp_path / "stray.safetensors"
    save_file(state, str(path))
    with pytest.raises(StageError) as err:
        _read(path, layout, name="file:stray")
    assert "file:stray" in str(err.value) and "made" in str(err.value)


def test_unprefixed_peft_keys_are_not_silently_dropped(kit, layout, tmp_path):
    """A PEFT state dict saved without `unet.` prefixes: diffusers would ignore it; we refuse it."""
    state = {k.removeprefix("unet."): v for k, v in load_file(str(kit.loras["peft"])).items()}
    path = tmp_path / "raw.safetensors"
    save_file(state, str(path))
    with pytest.raises(StageError, match="belongs to no SDXL component"):
        _read(path, layout)


def test_metadata_rank_must_match_the_factors(kit, layout, tmp_path):
    metadata = read_metadata(kit.loras["peft"])
    config = json.loads(metadata["lora_adapter_metadata"])
    config["unet.r"] = 8
    path = tmp_path / "lying.safetensors"
    save_file(
        load_file(str(kit.loras["peft"])), str(path), metadata={"lora_adapter_metadata": json.dumps(config)}
    )
    with pytest.raises(StageError, match="rank 8"):
        _read(path, layout)


def test_keys_dropped_by_the_conversion_are_caught(kit, layout, tmp_path):
    """diffusers silently drops the original-layout keys of a file that mixes both kohya naming styles;
    counting every key of the file catches it."""
    state = load_file(str(kit.loras["kohya_sgm"])) | load_file(str(kit.loras["kohya_diffusers"]))
    path = tmp_path / "mixed.safetensors"
    save_file(state, str(path))
    with pytest.raises(StageError, match=f"{len(state)} keys in the file") as err:
        _read(path, layout)
    assert err.value.code == "LORA_UNACCOUNTED"


# --------------------------------------------------------------------------------------------------------
# LyCORIS files (made by the LyCORIS library, testkit.lycoris)

LYCORIS_KINDS = {
    "loha": LohaFactors,
    "loha_tucker": LohaFactors,
    "loha_dora": LohaFactors,
    "lokr": LokrFactors,
    "lokr_tucker": LokrFactors,
    "lokr_full": LokrFactors,
    "lokr_both": LokrFactors,
}


@pytest.mark.parametrize("name", list(LYCORIS_CASES))
def test_lycoris_file_is_placed_completely_on_the_modules_lycoris_targets(
    name, kit_pipeline, lycoris_loras, layout
):
    """Every key of the file is placed, on exactly the layers LyCORIS's own loader attaches modules to."""
    path = lycoris_loras[name]
    loaded = _read(path, layout)
    assert loaded.file_keys == sum(loaded.placed_keys.values()) == len(load_file(str(path)))
    network, models = load_lycoris_network(kit_pipeline, path, LYCORIS_CASES[name])
    expected = {(t.component, t.module) for t in lycoris_targets(network, models)}
    placed = {(c, t.removesuffix(".weight").removeprefix("text_model.")) for c, t in loaded.factors}
    assert placed == {(c, m.removeprefix("text_model.")) for c, m in expected}
    assert all(loaded.placed_keys[c] > 0 for c in COMPONENTS)
    kinds = {type(f) for f in loaded.factors.values()}
    if name in LYCORIS_KINDS:
        assert kinds == {LYCORIS_KINDS[name]}
    elif name == "locon_tucker":  # Tucker cores on 3x3 convs; linear and 1x1 modules are plain LoCon
        assert kinds == {TuckerLoconFactors, LoraFactors}
        assert all(
            isinstance(f, TuckerLoconFactors) == (len(layout[0][c][t]) == 4 and layout[0][c][t][2] == 3)
            for (c, t), f in loaded.factors.items()
        )
    else:  # kohya-format DoRA: LoRA factors with a magnitude on the axis the file keeps it on
        assert kinds == {LoraFactors}
        assert all(f.magnitude is not None for f in loaded.factors.values())
        assert {f.magnitude_per_input for f in loaded.factors.values()} == {name == "dora_in"}
    spatial = {
        key
        for key in loaded.factors
        if len(layout[0][key[0]][key[1]]) == 4 and layout[0][key[0]][key[1]][2] > 1
    }
    if name == "loha_tucker":  # LyCORIS gives a core to each kernel larger than 1x1
        assert {key for key, f in loaded.factors.items() if f.t1 is not None} == spatial
    if name == "lokr_tucker":  # ... unless the kernel's half is a full matrix
        cores = {key for key, f in loaded.factors.items() if f.t2 is not None}
        assert cores and cores <= spatial


def _save_lycoris(tmp_path: Path, state: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "lycoris.safetensors"
    save_file(state, str(path))
    return path


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda sd, m: sd.pop(f"{m}.hada_w2_b"), "without its w2_b"),
        (lambda sd, m: sd.__setitem__(f"{m}.hada_w3_a", torch.zeros(2, 2)), "hada_w3_a: not a LoHa tensor"),
        (lambda sd, m: sd.__setitem__(f"{m}.lokr_w1", torch.zeros(2, 2)), "mixes LyCORIS kinds"),
        (lambda sd, m: sd.__setitem__(f"{m}.hada_w1_a", torch.zeros(3, 4)), "LoHa factors do not fit"),
        (lambda sd, m: sd.__setitem__(f"{m}.dora_scale", torch.ones(7, 1)), "DoRA magnitude has 7 values"),
        (lambda sd, m: sd.__setitem__(f"{m}.alpha", torch.ones(2)), "alpha has 2 values"),
    ],
)
def test_broken_lycoris_module_fails_the_lora_naming_its_key(
    lycoris_loras, layout, tmp_path, change, fragment
):
    state = load_file(str(lycoris_loras["loha"]))
    module = "lora_unet_down_blocks_1_attentions_0_proj_in"
    assert f"{module}.hada_w1_a" in state
    change(state, module)
    with pytest.raises(StageError) as err:
        _read(_save_lycoris(tmp_path, state), layout, name="file:broken")
    assert err.value.code == "LORA_PLACEMENT" and "file:broken" in str(err.value)
    assert fragment in str(err.value) and module in str(err.value)


def test_lycoris_module_outside_kohya_naming_is_refused(lycoris_loras, layout, tmp_path):
    state = load_file(str(lycoris_loras["loha"]))
    module = "lora_unet_down_blocks_1_attentions_0_proj_in"
    for key in [k for k in state if k.startswith(f"{module}.")]:
        state[key.replace("lora_unet_", "lycoris_", 1)] = state.pop(key)
    with pytest.raises(StageError, match="outside kohya naming") as err:
        _read(_save_lycoris(tmp_path, state), layout)
    assert "lycoris_down_blocks_1_attentions_0_proj_in" in str(err.value)


def test_lycoris_module_for_a_layer_the_base_lacks_is_refused(lycoris_loras, layout, tmp_path):
    state = load_file(str(lycoris_loras["loha"]))
    module = "lora_unet_down_blocks_1_attentions_0_proj_in"
    for key in [k for k in state if k.startswith(f"{module}.")]:
        state[key.replace("attentions_0", "attentions_7")] = state.pop(key)
    with pytest.raises(StageError, match=r"has no tensor down_blocks\.1\.attentions\.7\.proj_in\.weight"):
        _read(_save_lycoris(tmp_path, state), layout)


def _copy_with_0x80_first_byte(source: Path, dest: Path) -> Path:
    """`source`'s tensors and metadata re-saved with a padding metadata entry sized so that the header
    length is 128 mod 256: the file's first byte is 0x80, pickle's PROTO opcode (1 in 32 real files)."""
    with safe_open(source, "pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        metadata = handle.metadata() or {}
    for pad in range(512):
        save_file(tensors, dest, metadata={**metadata, "padding": "x" * pad})
        if dest.read_bytes()[0] == 0x80:
            return dest
    raise AssertionError("no padding gave a header length of 128 mod 256")


def test_a_lora_whose_header_length_starts_with_0x80_is_read_and_merges(kit, layout, tmp_path):
    # Issue 15: a valid safetensors LoRA starting with 0x80 was taken for a pickle (LORA_PICKLE).
    odd = _copy_with_0x80_first_byte(kit.loras["kohya_sgm"], tmp_path / "odd.safetensors")
    assert sniff_format(odd) == "safetensors"
    loaded, original = _read(odd, layout), _read(kit.loras["kohya_sgm"], layout)
    assert loaded.placed_keys == original.placed_keys and set(loaded.factors) == set(original.factors)

    def merge(path: Path, out: Path) -> dict[str, bytes]:
        identity = TemplateIdentity(
            template="odd", checkpoint=CheckpointRef(id="tiny", source="file:tiny"),
            vae=VaeRef(source="file:vae"), spec_hash="0" * 64,
        )  # fmt: skip
        lora = LoraInput(path=path, scale=0.8, name="file:odd.safetensors")
        merge_template(kit.diffusers_dir, kit.vae_dir, [lora], out, identity=identity,
                       prediction_type="epsilon", shard_size_mb=1)  # fmt: skip
        return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*.safetensors")}

    # The same weights, bit for bit, as the merge of the original file.
    assert merge(odd, tmp_path / "odd-model") == merge(kit.loras["kohya_sgm"], tmp_path / "model")
