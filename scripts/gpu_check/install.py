"""Stage install: install the carried wheels whose distribution is missing here, and record the
machine (GPU, torch, CUDA, transformers).

    GPU_CHECK_WHEELS=DIR GPU_CHECK_SITE=SITE python -m gpu_check.install OUT

The GPU machine has torch, transformers, sentencepiece, pytest but no hydra-core, omegaconf or
datasets, and no network: their wheels travel with the call (docs/benchmarks.md "GPU check").
Each `*.whl` in DIR whose distribution is not importable is installed with `pip install
--no-index --no-deps --target SITE` (the shell puts SITE first on PYTHONPATH for every later
stage); one already installed is skipped, so a second run installs nothing. No wheel folder is
an error only if something is missing.

Without --cpu-dry-run on a machine without CUDA this stage fails with one line, and the shell
stops: the rest would measure nothing.
"""
from __future__ import annotations

import glob
import importlib.metadata
import os
import subprocess
import sys

from gpu_check.common import dry, run_stage


def wheel_dist(path: str) -> str:
    """The distribution name of a wheel file (PEP 427: `{name}-{version}-...whl`)."""
    return os.path.basename(path).split("-")[0]


def installed(dist: str) -> str | None:
    """The installed version of `dist` or None (names compare as PEP 503 normalises them)."""
    try:
        return importlib.metadata.version(dist.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    import torch

    env = {"python": sys.version.split()[0], "torch": torch.__version__,
           "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_mem_gib=round(props.total_memory / 2**30, 1),
                   sm_count=props.multi_processor_count, gpu_count=torch.cuda.device_count())
    for name in ("transformers", "triton", "hydra-core", "omegaconf", "datasets", "liger-kernel"):
        env[name] = installed(name)
    return env


def body(stage) -> None:
    wheels_dir = os.environ.get("GPU_CHECK_WHEELS", "")
    site = os.environ.get("GPU_CHECK_SITE", "")
    wheels = sorted(glob.glob(os.path.join(wheels_dir, "*.whl"))) if wheels_dir else []
    present = {os.path.basename(w): installed(wheel_dist(w)) for w in wheels}
    missing = [w for w in wheels if present[os.path.basename(w)] is None]
    stage.set(wheels_dir=wheels_dir, site=site, present={k: v for k, v in present.items() if v},
              to_install=[os.path.basename(w) for w in missing])
    if missing:
        os.makedirs(site, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
               "--no-compile", "--no-cache-dir", "--target", site, *missing]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sys.stderr.write(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            stage.set(pip_output=(proc.stdout + proc.stderr).splitlines()[-10:])
            stage.finish("failed", f"pip exit {proc.returncode}")
            return
        importlib.invalidate_caches()
    still = [os.path.basename(w) for w in missing if installed(wheel_dist(w)) is None]
    stage.set(installed=[os.path.basename(w) for w in missing if os.path.basename(w) not in still],
              environment=environment())
    if not wheels and not os.path.isdir(wheels_dir or "/nonexistent"):
        stage.set(note=f"no wheel folder at {wheels_dir!r}: nothing installed")
    if still:
        stage.finish("failed", f"installed but not importable from {site}: {', '.join(still)}")
    elif not dry() and not stage.data["environment"]["cuda_available"]:
        stage.set(abort=True)  # the shell stops: every later stage would fail for this
        stage.finish("failed", "no CUDA GPU here; use --cpu-dry-run for the CPU miniature")
    else:
        stage.finish("passed")


if __name__ == "__main__":
    raise SystemExit(run_stage("install", body))
