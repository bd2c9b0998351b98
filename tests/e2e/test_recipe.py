"""docs/huggingface.md's "Extend a model's context" recipe, every command, at tiny size
(scripts/extend_context_tiny.sh): HF dir in, eval before, two extension stages (Ulysses, then
ring), eval after, export, transformers loads the result. Few steps: this proves the commands
work together, not that the model learns (the measured run is in docs/huggingface.md). Run
through a Qwen3 (YaRN) and a Gemma 3 (linear scaling of its global layer only) (issue 21)."""
import json
import os
import subprocess

import pytest
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# family -> (model_type exported, the global layers' rope_parameters after stage 2). No Llama
# run: Qwen3 runs the same commands with the same YaRN stages (and Llama's import, extension and
# export are tested in tests/hf), which keeps ~1 min of the CI budget (issue 22's note).
FAMILIES = {
    "qwen3": ("qwen3", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 96}),
    "gemma3": ("gemma3_text", {"rope_type": "linear", "factor": 4.0}),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_extend_context_recipe_runs_end_to_end(tmp_path, family):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run(["bash", os.path.join(ROOT, "scripts", "extend_context_tiny.sh"),
                           str(tmp_path), "8", "3", "2", family], capture_output=True, text=True,
                          timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("eval-before", "eval-after"):
        result = json.loads((tmp_path / name / "eval.json").read_text())
        assert result["seq_len"] == 384
        assert {r["length"] for r in result["passkey"]} == {96, 192, 384}
        assert result["loss_by_position"][-1]["end"] == 384
        assert (tmp_path / name / "eval.png").stat().st_size > 0
    before = json.loads((tmp_path / "eval-before" / "eval.json").read_text())
    assert before["checkpoint"] == str(tmp_path / "hf-base")  # the HF dir itself was evaluated
    # stage 2 started from stage 1's weights as a new run (its own step count)
    assert (tmp_path / "stage2" / "checkpoints" / "step_00000003").is_dir()
    config = transformers.AutoConfig.from_pretrained(tmp_path / "hf-extended")
    model_type, want = FAMILIES[family]
    assert config.model_type == model_type
    rope = config.rope_parameters
    if family == "gemma3":  # per layer type: only the global layer was extended
        assert rope["sliding_attention"]["rope_type"] == "default"
        assert rope["sliding_attention"]["rope_theta"] == 10000
        rope = rope["full_attention"]
    assert config.max_position_embeddings == 384
    assert {k: rope[k] for k in want} == want
    assert "transformers loaded" in done.stdout
