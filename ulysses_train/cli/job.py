"""How an entry point ends: one `error: <key>: ...` line and an exit code, whichever way a run
fails (docs/configuration.md, "Errors"), and the body every Hydra entry point shares (`run_job`).

Exit codes: 0 done; 1 an input that could not be read, or a peer rank that stalled or died;
2 bad input; 3 a run that stopped itself (non-finite steps); 130 a second Ctrl-C.
"""
from __future__ import annotations

import os
import re
import sys
import time
from typing import NoReturn

from ..config.errors import ConfigError, exception_chain
from ..config.schema import Config
from ..hf.config import apply_init_from, explicit_model_keys
from ..utils.atomic import atomic_write
from .checks import check_inputs
from .compose import apply_auto


def restart_warning(env) -> str | None:
    """A warning when torchrun restarts this job but they cannot work, else None.

    torch >= 2.5 shares torchrun's rendezvous store with the workers and keeps it across
    restarts: restarted workers read the dead ones' addresses and cannot connect (seen with
    torch 2.13; pytorch#135712). Only torchrun's environment can turn the sharing off.
    """
    if env.get("TORCHELASTIC_MAX_RESTARTS", "0") != "0" and \
            env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return ("warning: torchrun --max-restarts needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in "
                "torchrun's environment, else a restarted worker cannot connect; export it first")
    return None


# Under torchrun every rank fails the same validation, and the launcher stops the other workers
# (SIGTERM) as soon as one exits: if rank 1 exited first, rank 0 could die before printing. So
# rank 0 reports and exits at once, and the other ranks wait this long first — the launcher ends
# them within its 0.1 s monitor interval, silently. A rank still alive after the wait failed
# alone (e.g. a file missing on its node only): it reports too, naming its rank.
PEER_DELAY_S = 5.0


def fail(error: ConfigError, rank: int) -> NoReturn:
    """Print the contract's one error line and exit with the error's code (2: bad input)."""
    line = re.sub(r"\s*\n\s*", " ", f"error: {error}".strip())  # one line, whatever it held
    if rank != 0:
        time.sleep(PEER_DELAY_S)
        line += f" (rank {rank})"
    print(line, file=sys.stderr, flush=True)
    sys.exit(error.exit_code)


def write_effective_config(hydra_dir: str, composed: Config, config: Config) -> bool:
    """Rewrite `hydra_dir`/config.yaml with `config` (what the run uses) when model.init_from or
    parallel.auto made it differ from `composed` (what Hydra wrote before they applied), so the
    run dir's record tells the truth; atomically, with a first comment line saying so. Returns
    whether it wrote. Nothing happens without a config.yaml there (hydra.output_subdir=null)."""
    from omegaconf import OmegaConf

    path = os.path.join(hydra_dir, "config.yaml")
    if config == composed or not os.path.isfile(path):
        return False
    applied = [name for name, on in (("model.init_from", config.model.init_from),
                                     ("parallel.auto", config.parallel.auto)) if on]
    atomic_write(path, f"# the config this run uses: Hydra's composition with "
                 f"{' and '.join(applied)} applied\n" + OmegaConf.to_yaml(OmegaConf.structured(config)))
    return True


def interrupted(error: BaseException) -> bool:
    """Whether `error` is a KeyboardInterrupt, or wraps one: DCP turns an interrupt inside a
    save into a CheckpointException whose `failures` hold it (a second Ctrl-C during the first
    one's save lands there)."""
    for exc in exception_chain(error):
        if isinstance(exc, KeyboardInterrupt):
            return True
        failures = getattr(exc, "failures", None)
        if isinstance(failures, dict) and any(
                isinstance(f[0] if isinstance(f, tuple) else f, KeyboardInterrupt)
                for f in failures.values()):
            return True
    return False


def run_job(cfg, run, rank: int, world_size: int, *, auto: bool = True) -> NoReturn:
    """The body of a Hydra entry point (train.py, scripts/eval.py): the composed `cfg` (a
    DictConfig) to our dataclasses with `model.init_from` (and, if `auto`, `parallel.auto`)
    applied exactly as the pre-check did, then `run(config, run_dir) -> exit code`. Every way it
    can end is one line and an exit code: bad input 2 (a run that stopped itself 3), a second
    Ctrl-C 130, a peer that stalled or died 1 (docs/architecture.md §2)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    try:
        hydra = HydraConfig.get()
        composed = OmegaConf.to_object(cfg)
        config = apply_init_from(composed, explicit_model_keys(hydra.overrides.task),
                                 hydra.runtime.output_dir)  # resuming: its checkpoint decides
        if auto:
            config = apply_auto(config, hydra.overrides.task, world_size, log=rank == 0)
        if hydra.output_subdir is not None:  # rank 0 only (rank_overrides)
            write_effective_config(os.path.join(hydra.runtime.output_dir, hydra.output_subdir),
                                   composed, config)
        check_inputs(config, hydra.runtime.output_dir)  # files may have changed since the pre-check
        code = run(config, hydra.runtime.output_dir)
    except ConfigError as error:
        fail(error, rank)
    except BaseException as error:
        if interrupted(error):  # a second Ctrl-C (the first one stops politely, with a save)
            if rank == 0:
                print("aborted: rerun the same command to resume from the newest checkpoint",
                      file=sys.stderr, flush=True)
            sys.exit(130)
        if not isinstance(error, Exception):
            raise
        from ..parallel.mesh import describe_collective_failure  # a peer stalled or died

        line = describe_collective_failure(error, rank, world_size, cfg.parallel.timeout_s)
        if line is None:
            raise
        print(line, file=sys.stderr, flush=True)
        sys.exit(1)
    sys.exit(code)
