"""docs/config-reference.md is what scripts/gen_config_docs.py makes of the schema today."""
import os
import subprocess
import sys

from support.common import ROOT


def test_config_reference_is_generated_from_the_schema():
    """Fails when a key, default or field comment changed without regenerating the page."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import gen_config_docs

    with open(gen_config_docs.OUT) as f:
        on_disk = f.read()
    assert on_disk == gen_config_docs.render(), (
        "docs/config-reference.md is stale: run python scripts/gen_config_docs.py")


def test_every_key_is_listed_with_its_comment():
    """Each field of the schema has a row, and a field comment reaches its row."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import gen_config_docs

    text = gen_config_docs.render()
    assert "| `parallel.ring` | int | `1` | Ring degree inside the sequence-parallel group" in text
    assert "| `logging.wandb.mode` | str | `offline` |" in text
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert all(not line.endswith("|  |") for line in rows), "a key without a comment"


def test_check_mode_passes_on_the_committed_page():
    """What CI or a pre-commit hook would run: `--check` exits 0 on the page in the tree."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gen_config_docs.py"),
                          "--check"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
