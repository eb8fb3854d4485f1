"""The streaming fp16 writer: diffusers' variant file names, shard boundaries, byte determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from stages.errors import StageError
from stages.export import BufferPool, PoolClosed, export_component
from stages.shards import ShardWriter, index_file_name, safetensors_layout, shard_file_name
from stages.tensor_files import TensorSpec, find_weight_files, tensor_shapes


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {f"block.{i}.weight": torch.randn(16, 16, generator=g) for i in range(6)}
    tensors["ids"] = torch.arange(7, dtype=torch.int64)
    return tensors


def _component(folder: Path, tensors: dict[str, torch.Tensor], stem: str = "diffusion_pytorch_model") -> Path:
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / f"{stem}.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text('{"b": 1, "a": 2}')
    return folder


def _read_export(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def _bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_names_follow_diffusers_variant_convention():
    assert shard_file_name("diffusion_pytorch_model", 1, 1) == "diffusion_pytorch_model.fp16.safetensors"
    assert shard_file_name("model", 2, 3) == "model.fp16-00002-of-00003.safetensors"
    assert index_file_name("diffusion_pytorch_model") == "diffusion_pytorch_model.safetensors.index.fp16.json"


def test_names_match_what_save_pretrained_writes(tmp_path):
    """Our names are the ones diffusers itself writes for variant="fp16" (sharded and not)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, layers_per_block=1).half()
    vae.save_pretrained(tmp_path / "one", variant="fp16")
    vae.save_pretrained(tmp_path / "many", variant="fp16", max_shard_size="20KB")
    assert (tmp_path / "one" / shard_file_name("diffusion_pytorch_model", 1, 1)).is_file()
    index = json.loads((tmp_path / "many" / index_file_name("diffusion_pytorch_model")).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [
        shard_file_name("diffusion_pytorch_model", i, len(files)) for i in range(1, len(files) + 1)
    ]


def test_export_shards_casts_and_keeps_everything(tmp_path):
    tensors = _tensors()
    source = _component(tmp_path / "src", tensors)
    result = export_component(source, tmp_path / "out", shard_size_mb=0.0012)  # 1200 bytes: 2 fp16 blocks
    out = tmp_path / "out"
    index = json.loads((out / index_file_name("diffusion_pytorch_model")).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == len(result.files) - 1 > 1
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * (2 if t.is_floating_point() else 8) for t in tensors.values()
    )
    exported = _read_export(out)
    for name, tensor in tensors.items():
        expected = tensor.half() if tensor.is_floating_point() else tensor
        assert torch.equal(exported[name], expected), name
    # Each shard within the limit unless it holds a single larger tensor.
    for shard in shards:
        loaded = load_file(str(out / shard))
        size = sum(t.numel() * t.element_size() for t in loaded.values())
        assert size <= 1200 or len(loaded) == 1
        with safe_open(str(out / shard), framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}
    assert (out / "config.json").read_text() == '{"b": 1, "a": 2}'


def test_unsharded_export_has_no_index(tmp_path):
    source = _component(tmp_path / "src", _tensors(), stem="model")
    threads = torch.get_num_threads()
    result = export_component(source, tmp_path / "out", shard_size_mb=100)
    assert torch.get_num_threads() == threads  # the export's own thread setting does not leak
    assert result.files == ["model.fp16.safetensors"]
    assert (tmp_path / "out" / "config.json").is_file()
    assert not list((tmp_path / "out").glob("*index*"))


def test_export_is_byte_deterministic(tmp_path):
    source = _component(tmp_path / "src", _tensors())
    export_component(source, tmp_path / "a", shard_size_mb=0.002)
    export_component(source, tmp_path / "b", shard_size_mb=0.002)
    assert _bytes(tmp_path / "a") == _bytes(tmp_path / "b")


def test_sharded_source_is_read_through_its_index(tmp_path):
    tensors = _tensors(1)
    sharded = _component(tmp_path / "sharded", {}, stem="unused")
    (sharded / "unused.safetensors").unlink()
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[:3]}, str(sharded / "model-00001-of-00002.safetensors"))
    save_file({n: tensors[n] for n in names[3:]}, str(sharded / "model-00002-of-00002.safetensors"))
    weight_map = {n: f"model-0000{1 if i < 3 else 2}-of-00002.safetensors" for i, n in enumerate(names)}
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    assert find_weight_files(sharded).stem == "model"
    assert tensor_shapes(sharded)["block.0.weight"] == (16, 16)
    export_component(sharded, tmp_path / "out", shard_size_mb=100)
    exported = _read_export(tmp_path / "out")
    assert set(exported) == set(tensors)
    assert torch.equal(exported["block.5.weight"], tensors["block.5.weight"].half())


def test_transform_is_applied_before_the_cast(tmp_path):
    source = _component(tmp_path / "src", _tensors())
    result = export_component(
        source,
        tmp_path / "out",
        shard_size_mb=100,
        transform=lambda name, t, destination: t * 2 if name == "block.1.weight" else t,
    )
    assert result.transformed == 1
    exported = _read_export(tmp_path / "out")
    assert torch.equal(exported["block.1.weight"], (_tensors()["block.1.weight"] * 2).half())


def test_transform_may_write_its_result_into_the_destination(tmp_path):
    """A transform that writes fp16 straight into its destination (what the merge's fuser does) gets those
    bytes exported, with no second cast; the destination has the tensor's shape and the export dtype."""
    source = _component(tmp_path / "src", _tensors())
    seen = {}

    def transform(name, tensor, destination):
        if name != "block.2.weight":
            return tensor
        out = destination()
        seen["shape"], seen["dtype"] = tuple(out.shape), out.dtype
        torch.mul(tensor, 3, out=out)
        return out

    result = export_component(source, tmp_path / "out", shard_size_mb=100, transform=transform)
    assert result.transformed == 1
    assert seen == {"shape": (16, 16), "dtype": torch.float16}
    exported = _read_export(tmp_path / "out")
    assert torch.equal(exported["block.2.weight"], (_tensors()["block.2.weight"] * 3).half())
    assert torch.equal(exported["block.3.weight"], _tensors()["block.3.weight"].half())


def test_a_transformed_fp16_result_is_still_checked_for_overflow(tmp_path):
    """An fp16 source passes untouched without a scan, but a fused result written in fp16 is scanned: an
    overflow there is inf and must fail, naming the tensor."""
    tensors = {"w": torch.full((4, 4), 60000.0, dtype=torch.float16)}
    source = _component(tmp_path / "src", tensors)
    export_component(source, tmp_path / "plain", shard_size_mb=1)  # untouched fp16: fine

    def transform(name, tensor, destination):
        out = destination()
        out.copy_(tensor.float() * 2)  # 120000 does not fit fp16: inf
        return out

    with pytest.raises(StageError, match="fp16 range") as err:
        export_component(source, tmp_path / "out", shard_size_mb=1, transform=transform)
    assert err.value.code == "FP16_OVERFLOW" and "tensor w" in str(err.value)
    assert not list((tmp_path / "out").glob("*.safetensors"))


def test_values_beyond_fp16_fail_loudly(tmp_path):
    source = _component(tmp_path / "src", {"w": torch.full((2, 2), 1e6)})
    with pytest.raises(StageError, match="fp16 range") as err:
        export_component(source, tmp_path / "out", shard_size_mb=1)
    assert "w" in str(err.value)


def test_source_without_weights_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(StageError, match="expected one"):
        find_weight_files(tmp_path / "empty")


def test_shard_writer_rejects_a_zero_limit(tmp_path):
    with pytest.raises(StageError, match="positive"):
        ShardWriter(tmp_path, "model", 0, {})


def _mixed_dtypes() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "b.weight": torch.randn(3, 5, generator=g).half(),
        "a.weight": torch.randn(4, generator=g).half(),
        "position_ids": torch.arange(7, dtype=torch.int64),
        "z.f32": torch.randn(2, 2, generator=g),
        "bf": torch.randn(3, generator=g).bfloat16(),
        "f64": torch.randn(1, generator=g).double(),
        "i32": torch.arange(3, dtype=torch.int32),
        "i16": torch.arange(3, dtype=torch.int16),
        "i8": torch.arange(3, dtype=torch.int8),
        "u8": torch.arange(5, dtype=torch.uint8),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5).half(),
        "empty": torch.zeros(0, 4).half(),
        "naïve.weight": torch.ones(2).half(),  # non-ASCII names are UTF-8 in the header, as serde writes them
    }


@pytest.mark.parametrize("tensors", [_mixed_dtypes(), {}], ids=["mixed", "empty"])
def test_streamed_layout_is_byte_identical_to_save_file(tmp_path, tensors):
    """The header computed from shapes and dtypes alone, followed by the tensors in its order, is exactly
    the file safetensors' own save_file writes (tensor order by dtype, then name; padding; metadata)."""
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    layout = safetensors_layout({n: TensorSpec(tuple(t.shape), t.dtype) for n, t in tensors.items()})
    data = b"".join(
        tensors[n].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for n in layout.names
    )
    assert layout.header + data == (tmp_path / "ref.safetensors").read_bytes()
    assert layout.size == (tmp_path / "ref.safetensors").stat().st_size


def test_export_of_mixed_dtypes_equals_save_file_of_the_cast_tensors(tmp_path):
    """Each exported shard is byte for byte what save_file writes for the same (cast) tensors."""
    tensors = _mixed_dtypes()
    source = _component(tmp_path / "src", tensors)
    export_component(source, tmp_path / "one", shard_size_mb=100)
    export_component(source, tmp_path / "many", shard_size_mb=0.00004)  # 40 bytes: many shards
    cast = {n: t.half() if t.is_floating_point() else t for n, t in tensors.items()}
    save_file(cast, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    assert (tmp_path / "one" / "diffusion_pytorch_model.fp16.safetensors").read_bytes() == (
        tmp_path / "ref.safetensors"
    ).read_bytes()
    index = json.loads((tmp_path / "many" / index_file_name("diffusion_pytorch_model")).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3
    for shard in shards:
        names = sorted(n for n, f in index["weight_map"].items() if f == shard)
        save_file({n: cast[n] for n in names}, str(tmp_path / "part.safetensors"), metadata={"format": "pt"})
        assert (tmp_path / "many" / shard).read_bytes() == (tmp_path / "part.safetensors").read_bytes(), shard
    assert not list((tmp_path / "many").glob(".*"))  # no temporary files left


def test_failed_transform_stops_the_threads_and_leaves_no_partial_shard(tmp_path):
    source = _component(tmp_path / "src", _tensors())

    def transform(name, tensor, destination):
        if name == "block.3.weight":
            raise RuntimeError("boom")
        return tensor

    with pytest.raises(RuntimeError, match="boom"):
        export_component(source, tmp_path / "out", shard_size_mb=100, transform=transform)
    assert list((tmp_path / "out").glob("*.safetensors")) == []
    assert list((tmp_path / "out").glob(".*.tmp")) == []
    import threading

    assert not [t for t in threading.enumerate() if t.name.startswith("fuseline-export")]


def test_truncated_source_fails_with_its_name(tmp_path):
    source = _component(tmp_path / "src", _tensors())
    weights = source / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(StageError, match="truncated"):
        export_component(source, tmp_path / "out", shard_size_mb=100)


def test_buffer_pool_reuses_grows_and_wakes_waiters_on_close():
    import threading

    pool = BufferPool(2)
    a = pool.acquire(10)
    b = pool.acquire(100)
    pool.release(a)
    again = pool.acquire(8)
    assert again is a  # the free buffer that fits is reused
    pool.release(again)
    bigger = pool.acquire(50)
    assert bigger.numel() >= 50 and bigger is not a  # too small: replaced by a larger one
    errors = []
    waiter = threading.Thread(target=lambda: errors.append(_acquire_or_error(pool)))
    waiter.start()  # both buffers are out: it waits
    waiter.join(0.2)
    assert waiter.is_alive()
    pool.close()
    waiter.join(5)
    assert errors == ["closed"]
    del b


def _acquire_or_error(pool: BufferPool) -> str:
    try:
        pool.acquire(1)
    except PoolClosed:
        return "closed"
    return "acquired"


# Peak RSS of the export alone: ru_maxrss is inherited across fork/exec (it would report pytest's peak), so
# the probe resets the kernel's high-water mark (VmHWM) after its imports and reads it after the export.
MEMORY_PROBE = """
import sys
from pathlib import Path
from stages.export import export_component

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmHWM")
export_component(Path(sys.argv[1]), Path(sys.argv[2]), shard_size_mb=float(sys.argv[3]))
print(status("VmHWM") - before)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_export_memory_stays_near_one_shard(tmp_path):
    """Peak memory grows by about one shard and one tensor, not by the component's size (a memory-mapped
    reader keeps every page it touched resident: here all 192 MB)."""
    import subprocess
    import sys

    tensor_mb, count, shard_mb = 8, 24, 8
    g = torch.Generator().manual_seed(0)
    source = tmp_path / "src"
    source.mkdir()
    save_file(
        {f"t{i:02d}": torch.randn(tensor_mb * 262_144, generator=g) for i in range(count)},
        str(source / "model.safetensors"),
    )
    repo = Path(__file__).resolve().parents[2]
    probe = [sys.executable, "-c", MEMORY_PROBE, str(source), str(tmp_path / "out"), str(shard_mb)]
    result = subprocess.run(probe, cwd=repo, capture_output=True, text=True, check=True)
    growth_mb = int(result.stdout.strip().splitlines()[-1]) / 2**20
    component_mb = tensor_mb * count
    assert growth_mb < component_mb / 2, (
        f"peak RSS grew {growth_mb:.0f} MiB for a {component_mb} MiB component"
    )
