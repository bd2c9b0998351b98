"""docs/huggingface.md's "Extend a model's context" recipe, every command, at tiny size
(scripts/extend_context_tiny.sh): HF dir in, eval before, two extension stages (Ulysses, then
ring), eval after, export, transformers loads the result. Few steps: this proves the commands
work together, not that the model learns (the measured run is in docs/huggingface.md)."""
import json
import os
import subprocess

import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_extend_context_recipe_runs_end_to_end(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run(["bash", os.path.join(ROOT, "scripts", "extend_context_tiny.sh"),
                           str(tmp_path), "8", "3", "2"], capture_output=True, text=True,
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
    rope = config.rope_parameters
    assert config.max_position_embeddings == 384
    assert (rope["rope_type"], rope["factor"], rope["original_max_position_embeddings"]) == (
        "yarn", 4.0, 96)
    assert "transformers loaded" in done.stdout
