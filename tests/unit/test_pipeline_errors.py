"""Bad input and faults during `builder build`: one clear line, exit 1 (130 when interrupted), nothing written."""

from __future__ import annotations

import errno
import shutil

import pytest
from test_pipeline import write_recipe

from builder.cli import main
from builder.errors import BuildError
from builder.plan import make_plan
from builder.recipe import load_recipes


def build_fails(capsys, recipe, out, *extra: str, code: int = 1) -> str:
    assert main(["build", str(recipe), "--out", str(out), *extra]) == code
    err = capsys.readouterr().err
    return err


@pytest.fixture
def transformers_path(monkeypatch):
    """Take the transformers path (from_pretrained + save_pretrained) whose calls these tests break on purpose;
    plain recipes are otherwise streamed (test_stream_faults_* below break the streaming path)."""
    import builder.steps.quantize

    monkeypatch.setattr(builder.steps.quantize, "stream_plan", lambda recipe, source_dir, task: "forced by the test")


def nothing_written(out) -> bool:
    """No artifact and no temporary folder (the output folder may hold only lock files)."""
    return not out.exists() or all(p.name.endswith(".lock") for p in out.iterdir())


def test_missing_source_folder(tmp_path, capsys):
    recipe = write_recipe(tmp_path, tmp_path / "nowhere")
    err = build_fails(capsys, recipe, tmp_path / "out")
    assert f"error: source folder {tmp_path / 'nowhere'} does not exist" in err
    assert not (tmp_path / "out").exists()


def test_source_folder_without_config(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    recipe = write_recipe(tmp_path, tmp_path / "model")
    assert "has no config.json" in build_fails(capsys, recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pickle_only_weights_need_allow_pickle(tiny_llama, tmp_path, capsys):
    source = tmp_path / "model"
    source.mkdir()
    shutil.copy(tiny_llama / "config.json", source)
    (source / "pytorch_model.bin").write_bytes(b"not read")
    recipe = write_recipe(tmp_path, source)
    err = build_fails(capsys, recipe, tmp_path / "out")
    assert "has only pickle weights (pytorch_model.bin)" in err and "allow_pickle: true" in err
    assert not (tmp_path / "out").exists()


def test_skip_module_matching_nothing(tiny_llama, tmp_path, capsys):
    recipe = write_recipe(tmp_path, tiny_llama, quantize="  method: bnb-8bit\n  skip_modules: [lm_haed]\n")
    err = build_fails(capsys, recipe, tmp_path / "out")
    assert "quantize.skip_modules: 'lm_haed' matches no module" in err
    assert not (tmp_path / "out").exists()


def test_missing_cuda_is_refused(tiny_llama, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    recipe = write_recipe(tmp_path, tiny_llama)
    err = build_fails(capsys, recipe, tmp_path / "out", "--device", "cuda")
    assert "asks for cuda but this host has no CUDA device; build with --device cpu" in err
    assert not (tmp_path / "out").exists()


def test_fp32_cpu_offload_that_would_quantize_nothing(tiny_llama, tmp_path):
    from builder.steps.bnb import preflight

    recipe = write_recipe(
        tmp_path,
        tiny_llama,
        quantize="  method: bnb-8bit\n  fp32_cpu_offload: true\n",
        extra="load:\n  device_map: {model: cpu, lm_head: '0'}\n",
    )
    plan = make_plan(load_recipes(recipe)[0])
    with pytest.raises(BuildError, match="every quantizable layer is on cpu, so nothing would be quantized"):
        preflight(plan, {"model": "cpu", "lm_head": "0"})
    preflight(plan, {"model.embed_tokens": "cpu", "model.layers": "0", "lm_head": "cpu"})  # layers on the GPU: ok


@pytest.mark.parametrize("raised", ["torch.OutOfMemoryError", "allocator"])
def test_out_of_memory_names_the_stage_and_the_fix(
    tiny_llama, tmp_path, capsys, monkeypatch, transformers_path, raised
):
    import torch
    import transformers

    def out_of_memory(*args, **kwargs):
        if raised == "allocator":
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", out_of_memory)
    recipe = write_recipe(tmp_path, tiny_llama)
    err = build_fails(capsys, recipe, tmp_path / "out")
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: out of memory while loading and quantizing {tiny_llama} on cpu")
    assert "load.device_map: auto" in line and "load.max_memory" in line
    assert nothing_written(tmp_path / "out")


def test_disk_full_says_where_and_how_much(tiny_llama, tmp_path, capsys, monkeypatch, transformers_path):
    from transformers import PreTrainedModel

    def disk_full(self, folder, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", disk_full)
    recipe = write_recipe(tmp_path, tiny_llama)
    line = build_fails(capsys, recipe, tmp_path / "out").strip().splitlines()[-1]
    assert line.startswith(f"error: disk full while saving the quantized model into {tmp_path / 'out'}/.tmp-tiny-nf4-")
    assert "MiB there and" in line and "--out" in line
    assert nothing_written(tmp_path / "out")


def test_interrupt_cleans_up_and_exits_130(tiny_llama, tmp_path, capsys, monkeypatch, transformers_path):
    from transformers import PreTrainedModel

    def interrupted(self, folder, *args, **kwargs):
        (folder / "model.safetensors").write_bytes(b"half written")
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", interrupted)
    recipe = write_recipe(tmp_path, tiny_llama)
    build_fails(capsys, recipe, tmp_path / "out", code=130)
    assert nothing_written(tmp_path / "out")


def test_keep_temp_keeps_the_failed_build_folder(tiny_llama, tmp_path, capsys, monkeypatch, transformers_path):
    from transformers import PreTrainedModel

    def disk_full(self, folder, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", disk_full)
    recipe = write_recipe(tmp_path, tiny_llama)
    err = build_fails(capsys, recipe, tmp_path / "out", "--keep-temp")
    kept = [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".tmp-tiny-nf4-")]
    assert len(kept) == 1 and f"kept the temporary build folder {kept[0]}" in err
    assert not (tmp_path / "out" / "tiny-nf4").exists()


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("oom", "error: out of memory while streaming the quantized weights"),
        ("disk", "error: disk full while streaming the quantized weights into"),
    ],
)
def test_stream_faults_name_the_stage(tiny_llama, tmp_path, capsys, monkeypatch, fault, message):
    import torch

    import builder.steps.quantize

    def broken(recipe, source_dir, workdir, device, plan):
        (workdir / "model.safetensors").write_bytes(b"half written")
        if fault == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(builder.steps.quantize, "stream_build", broken)
    recipe = write_recipe(tmp_path, tiny_llama)
    line = build_fails(capsys, recipe, tmp_path / "out").strip().splitlines()[-1]
    assert line.startswith(message)
    assert nothing_written(tmp_path / "out")


def test_folder_that_is_not_an_artifact_is_not_replaced(tiny_llama, tmp_path, capsys):
    mine = tmp_path / "out" / "tiny-nf4"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    recipe = write_recipe(tmp_path, tiny_llama)
    assert "is not a builder artifact (no manifest.json)" in build_fails(capsys, recipe, tmp_path / "out")
    assert (mine / "notes.txt").read_text() == "mine"
