"""`model.init_from` refuses bad input in one line (`model.init_from: ...`, exit 2), from file
listings, safetensors headers and meta.json alone — before the model is built.

Each case starts from a real `save_pretrained` directory (tests/hf/conftest.py) and breaks one
thing: a missing, stray or duplicate file, an index that names a missing shard or disagrees
with the headers, missing/unexpected/misshapen tensors, biases, a tied/untied mismatch.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from support.common import run_train, small_config
from support.hf import model_config
from ulysses_train.cli.checks import check_inputs
from ulysses_train.config.errors import ConfigError
from ulysses_train.hf.init_from import HF, OURS, check_initial_weights
from ulysses_train.hf.weights_dir import INDEX, SINGLE, expected_shapes


def _refused(path, cfg, *fragments) -> str:
    with pytest.raises(ConfigError) as info:
        check_initial_weights(str(path), cfg)
    assert info.value.key == "model.init_from"
    assert "\n" not in info.value.message
    for fragment in fragments:
        assert fragment in info.value.message, info.value.message
    return info.value.message


def _copy(src: str, tmp_path, name="copy") -> str:
    dst = str(tmp_path / name)
    shutil.copytree(src, dst)
    return dst


def _shards(path: str) -> list[str]:
    return sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))


def _single(tmp_path, src: str, edit) -> str:
    """A single-file copy of HF dir `src` whose tensors went through `edit(dict) -> dict`."""
    dst = str(tmp_path / "single")
    os.makedirs(dst)
    shutil.copy(os.path.join(src, "config.json"), dst)
    tensors = {}
    for f in _shards(src):
        tensors.update(load_file(os.path.join(src, f)))
    save_file(edit(tensors), os.path.join(dst, SINGLE))
    return dst


def test_expected_shapes_are_the_models(hf_untied):
    """The header check's shapes (unpadded vocab) are those of the GPT that will be built."""
    from ulysses_train.model import GPT

    for tie in (False, True):
        cfg = dataclasses.replace(model_config(hf_untied), tie_embeddings=tie)
        with torch.device("meta"):
            model = GPT(cfg)
        shapes = expected_shapes(cfg)
        for name, p in model.named_parameters():
            want = shapes[name]
            if name in ("tok_embeddings.weight", "output.weight"):
                want = (384,) + want[1:]  # 300 rows padded to a multiple of 128
            assert tuple(p.shape) == want, name


def test_good_directories_pass(hf_untied, hf_tied, tmp_path):
    for hf_dir in (hf_untied, hf_tied):
        assert check_initial_weights(hf_dir, model_config(hf_dir)) == (HF, hf_dir)
    # old Llama conversions carry rotary inv_freq buffers: ignored, as transformers does
    extra = _single(tmp_path, hf_tied, lambda t: {
        **t, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(6)})
    assert check_initial_weights(extra, model_config(hf_tied))[0] == HF


def test_paths_that_are_no_model(tmp_path, hf_untied):
    cfg = model_config(hf_untied)
    _refused(tmp_path / "nope", cfg, "does not exist")
    _refused(os.path.join(hf_untied, "config.json"), cfg, "is not a directory")
    _refused(tmp_path, cfg, "neither a Hugging Face model directory")
    (tmp_path / "config.json").write_text("{}")
    _refused(tmp_path, cfg, f"has no {SINGLE}", "not a Hugging Face model directory")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    _refused(tmp_path, cfg, "only PyTorch .bin weights")


def test_file_layout_errors(hf_untied, tmp_path):
    cfg = model_config(hf_untied)
    shards = _shards(hf_untied)
    assert len(shards) >= 3  # the fixture is sharded with an index
    gone = _copy(hf_untied, tmp_path, "gone")
    os.remove(os.path.join(gone, shards[1]))
    _refused(gone, cfg, INDEX, shards[1], "missing")
    stray = _copy(hf_untied, tmp_path, "stray")  # e.g. Mistral's consolidated.safetensors
    shutil.copy(os.path.join(stray, shards[0]), os.path.join(stray, "consolidated.safetensors"))
    _refused(stray, cfg, "consolidated.safetensors", f"not named in {INDEX}")
    no_index = _copy(hf_untied, tmp_path, "no_index")
    os.remove(os.path.join(no_index, INDEX))
    _refused(no_index, cfg, f"but no {INDEX}")
    dup = _copy(hf_untied, tmp_path, "dup")
    first, second = (os.path.join(dup, s) for s in shards[:2])
    moved = sorted(load_file(first))[0]
    save_file({**load_file(second), moved: load_file(first)[moved]}, second)
    _refused(dup, cfg, f"tensor {moved} is in both", shards[0], shards[1])
    wrong = _copy(hf_untied, tmp_path, "wrong")
    index = json.load(open(os.path.join(wrong, INDEX)))
    index["weight_map"][moved] = shards[1]
    json.dump(index, open(os.path.join(wrong, INDEX), "w"))
    _refused(wrong, cfg, "disagrees with the shards' headers", moved)


def _rewrite_header(file: str, edit) -> None:
    """Rewrite `file`'s safetensors header through `edit(dict)` and keep its data bytes; the
    header is padded with spaces to its old length, as the format allows, so the data stays
    where it was (https://github.com/huggingface/safetensors, README "Format")."""
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        data = f.read()
    edit(header)
    raw = json.dumps(header, separators=(",", ":")).encode()
    assert len(raw) <= length
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", length) + raw.ljust(length) + data)


def test_file_size_must_match_the_header(hf_untied, hf_tied, tmp_path):
    """An interrupted download (the header intact, the data short) or bytes appended after the
    last tensor is refused from the file's size, naming the file and both sizes."""
    cfg = model_config(hf_untied)
    shard = _shards(hf_untied)[1]
    size = os.path.getsize(os.path.join(hf_untied, shard))
    short = _copy(hf_untied, tmp_path, "short")
    os.truncate(os.path.join(short, shard), size - 3)
    _refused(short, cfg, f"{os.path.join(short, shard)} is truncated ({size - 3} bytes, its "
                         f"header needs {size})", "download it again")
    cut = _copy(hf_tied, tmp_path, "cut_in_header")  # cut inside the JSON header itself
    os.truncate(os.path.join(cut, SINGLE), 20)
    _refused(cut, model_config(hf_tied), f"{SINGLE} is truncated (20 bytes, its header alone")
    os.truncate(os.path.join(cut, SINGLE), 5)
    _refused(cut, model_config(hf_tied), f"{SINGLE} is truncated (5 bytes")
    long = _copy(hf_tied, tmp_path, "long")
    with open(os.path.join(long, SINGLE), "ab") as f:
        f.write(b"\0" * 7)
    _refused(long, model_config(hf_tied), f"{SINGLE} has 7 bytes after its last tensor",
             f"its header needs {os.path.getsize(os.path.join(hf_tied, SINGLE))}")


def test_data_offsets_must_fit_shape_and_dtype(hf_tied, tmp_path):
    """Each tensor's data_offsets span exactly shape x dtype bytes, tiled without gaps."""
    cfg = model_config(hf_tied)
    name = "model.norm.weight"  # (48,) bf16: 96 bytes
    wrong_dtype = _copy(hf_tied, tmp_path, "wrong_dtype")
    _rewrite_header(os.path.join(wrong_dtype, SINGLE),
                    lambda h: h[name].update(dtype="F32"))
    _refused(wrong_dtype, cfg, f"tensor {name}'s data_offsets", "span 96 bytes",
             "[48] x F32 needs 192")
    gap = _copy(hf_tied, tmp_path, "gap")  # the last tensor moved 2 bytes on: a gap before it

    def shift(header):
        last = max((t for t in header if t != "__metadata__"),
                   key=lambda t: header[t]["data_offsets"][1])
        begin, end = header[last]["data_offsets"]
        header[last]["data_offsets"] = [begin + 2, end + 2]
    _rewrite_header(os.path.join(gap, SINGLE), shift)
    _refused(gap, cfg, "starts at byte", "where the previous one ends")


def test_tensor_errors(hf_untied, hf_tied, tmp_path):
    cfg = model_config(hf_untied)
    layers = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(2)]
    drop = layers + ["model.norm.weight", "model.layers.0.input_layernorm.weight"]
    missing = _single(tmp_path, hf_untied, lambda t: {k: v for k, v in t.items()
                                                       if k not in drop})
    message = _refused(missing, cfg, "4 tensor(s) missing", "and 1 more")
    assert sum(name in message for name in drop) == 3  # three named, the rest counted
    _refused(hf_untied, dataclasses.replace(cfg, ffn_hidden=96), "gate_proj.weight has shape",
             "[90, 48]", "[96, 48]")
    _refused(hf_untied, dataclasses.replace(cfg, vocab_size=256), "embed_tokens.weight",
             "[300, 48]", "[256, 48]")
    _refused(hf_untied, dataclasses.replace(cfg, tie_embeddings=True),
             "lm_head.weight is present but model.tie_embeddings=true")
    _refused(hf_tied, dataclasses.replace(model_config(hf_tied), tie_embeddings=False),
             "lm_head.weight is missing but model.tie_embeddings=false")
    biased = _single(tmp_path / "b", hf_untied, lambda t: {
        **t, **{f"model.layers.{i}.self_attn.{p}_proj.bias": torch.zeros(24 if p != "q" else 48)
                for i in range(2) for p in "qkv"}})
    _refused(biased, cfg, "has biases", "q_proj.bias", "and 3 more", "model.qkv_bias=false")
    extra = _single(tmp_path / "e", hf_untied, lambda t: {**t, "model.extra.weight": torch.ones(2)})
    _refused(extra, cfg, "1 tensor(s) the model has no place for: model.extra.weight")
    quant = _single(tmp_path / "q", hf_untied, lambda t: {
        **t, "model.norm.weight": torch.ones(48, dtype=torch.int8)})
    _refused(quant, cfg, "model.norm.weight is stored as I8")


def test_our_checkpoint_errors(tmp_path, hf_untied):
    """A step dir of another architecture, a partial one, a run dir whose latest is gone."""
    cfg = model_config(hf_untied)
    step = tmp_path / "run" / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    _refused(step, cfg, "not a complete checkpoint")
    (step / ".metadata").write_bytes(b"")
    meta = {"step": 1, "model": {**dataclasses.asdict(cfg), "n_layers": 3}}
    (step / "meta.json").write_text(json.dumps(meta))
    (step / "manifest.json").write_text(json.dumps({"version": 1, "algorithm": "sha256",
                                                    "files": {}}))
    _refused(step, cfg, "another architecture", "n_layers=3 (this run: 2)")
    meta["model"]["n_layers"] = 2
    (step / "meta.json").write_text(json.dumps(meta))
    assert check_initial_weights(str(step), cfg) == (OURS, str(step))
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_00000009\n")
    _refused(tmp_path / "run", cfg, "latest names", "step_00000009", "not a complete")


def test_validation_and_the_command_line_refuse_it_first(tmp_path, small_args, hf_tied):
    """cli/checks.check_inputs runs the check (every rank, no collective); train.py exits 2 in one line
    before building anything, here for an interrupted download (which used to fail inside
    DCP's loader with a traceback, after the run dir was made)."""
    cfg = small_config()
    cfg.model.init_from = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="model.init_from: .* does not exist"):
        check_inputs(cfg)
    short = _copy(hf_tied, tmp_path, "short")
    os.truncate(os.path.join(short, SINGLE), os.path.getsize(os.path.join(short, SINGLE)) - 4)
    args = [a for a in small_args if not a.startswith("model.")]  # config.json decides model.*
    result = run_train(args + [f"model.init_from={short}"])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model.init_from: "), result.stderr
    assert f"{SINGLE} is truncated" in lines[0], result.stderr
    assert not (tmp_path / "run").exists()
