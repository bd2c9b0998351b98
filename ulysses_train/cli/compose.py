"""Everything Hydra: schema registration, override pre-checking, error translation.

Only `train.py` imports this module, so `import ulysses_train` never pulls in Hydra. The library
below it sees plain dataclasses (`ulysses_train.config.schema.Config`), never a DictConfig.

Why pre-check: Hydra reports an unknown key or a wrong type as a multi-line message and exits 1.
The contract (docs/architecture.md §2) is one line `error: <key>: <what to do>` and exit 2 on every
rank, so we compose the overrides ourselves first, inside a try, and translate whatever goes wrong.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import sys
import time
import typing
from typing import NoReturn, Sequence

from ..checkpoint.identity import check_before_start
from ..config.errors import ConfigError, exception_chain
from ..config.schema import MODEL_PRESETS, Config
from ..config.validate import validate
from ..hf.config import apply_init_from, explicit_model_keys, run_name
from ..utils.atomic import atomic_write
from .checks import check_inputs

# configs/ at the repository root (ulysses_train/cli/ -> ../../configs)
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "configs")
GROUP_OPTIONS = {"model": MODEL_PRESETS}


def run_hash(override_dirname: str) -> str:
    """Short stable hash of the overrides that define a run (used in the default run dir)."""
    return hashlib.sha1(override_dirname.encode()).hexdigest()[:8]


def register() -> None:
    """Register the schema node and the `run_hash` resolver with Hydra (idempotent)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    ConfigStore.instance().store(name="schema", node=Config)
    if not OmegaConf.has_resolver("run_hash"):
        OmegaConf.register_new_resolver("run_hash", run_hash)
    if not OmegaConf.has_resolver("run_name"):  # the run dir names the model init_from gives
        OmegaConf.register_new_resolver("run_name", run_name)


def rank_overrides(rank: int) -> list[str]:
    """Hydra overrides that keep non-zero ranks from writing shared files into the run dir.

    Every torchrun rank runs Hydra; only rank 0 may write `.hydra/` and the job log.
    """
    if rank == 0:
        return []
    return ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]


def _full_key(text: str) -> str | None:
    match = re.search(r"full_key:\s*(\S+)", text)
    return match.group(1) if match else None


GRAMMAR_URL = "https://hydra.cc/docs/advanced/override_grammar/basic/"


def quoted_override(prefix: str, key: str, value: str) -> str | None:
    """`key=value` with the value (each element of a `[...]` list) in double quotes, wrapped in
    single quotes for the shell: the form Hydra's override grammar parses whatever characters
    the value holds (`~`, `#`, `&`, `=`, brackets, parentheses). None where quoting alone would
    not do: a value with quotes of its own or an `${...}` interpolation."""
    if any(c in value for c in "\"'") or "${" in value:
        return None
    if value.startswith("[") and value.endswith("]"):
        items = [item.strip() for item in value[1:-1].split(",")]
        if any(c in item for item in items for c in "[]{}"):
            return None
        value = "[" + ",".join(f'"{item}"' for item in items if item) + "]"
    else:
        value = f'"{value}"'
    return f"'{prefix}{key}={value}'"


def _unparsable_value(exc: BaseException) -> ConfigError | None:
    """The error for an override Hydra's grammar cannot parse (hydra.errors.
    OverrideParseException, e.g. `model.init_from=~/x`: `~` is an operator there), naming the
    key before `=` and the quoting that parses; None for any other failure. Our path keys
    expand a quoted `~` (os.path.expanduser); Hydra's own (hydra.run.dir) do not."""
    override = next((getattr(e, "override", None) for e in exception_chain(exc)
                     if type(e).__name__ == "OverrideParseException"), None)
    if not isinstance(override, str) or "=" not in override:
        return None  # `key` alone: the "write key=value" case below
    target, value = override.split("=", 1)
    key = target.lstrip("+~")
    if key.startswith("hydra.") and (value == "~" or value.startswith("~/")):  # made verbatim
        return ConfigError(key, f"Hydra cannot parse the value {value!r} unquoted, and would "
                                f"not expand ~ in it: write {key}=$HOME{value[1:]}")
    fixed = quoted_override(target[:len(target) - len(key)], key, value)
    if fixed is None:
        return ConfigError(key, f"Hydra cannot parse the value {value!r}; quote or escape it as "
                                f"{GRAMMAR_URL} says")
    return ConfigError(key, f"Hydra cannot parse the value {value!r} unquoted; quote it: {fixed}")


def translate(exc: BaseException) -> ConfigError:
    """Turn a Hydra/OmegaConf composition failure into one `ConfigError` line."""
    unparsable_value = _unparsable_value(exc)
    if unparsable_value is not None:
        return unparsable_value
    text = "\n".join(str(e) for e in exception_chain(exc))
    missing_group = re.search(r"Could not find '([\w.]+)/([^']+)'", text)
    if missing_group:
        group, name = missing_group.groups()
        options = GROUP_OPTIONS.get(group)
        hint = f"choose one of {', '.join(options)}" if options else f"see configs/{group}/"
        return ConfigError(group, f"unknown preset {name!r}; {hint}")
    key = _full_key(text)
    not_in = re.search(r"Key '([^']+)' not in '(\w+)'", text)
    if not_in:
        override = re.search(r"Could not override '([^']+)'", text)
        key = key or (override.group(1) if override else not_in.group(1))
        return ConfigError(key, "unknown key; check the spelling (python train.py --cfg job "
                                "prints every key)")
    convert = (re.search(r"Value '([^']*)' (?:of type '\w+' )?could not be converted to (\w+)",
                         text)
               or re.search(r"Value '([^']*)' is not a valid (\w+)", text))  # (bools say so)
    if convert:
        value, kind = convert.groups()
        return ConfigError(key or "config", f"{value!r} is not a valid {kind.lower()}")
    if "is not a ListConfig, list or tuple" in text:  # e.g. data.paths=a.jsonl
        k = key or "config"
        return ConfigError(k, f"expects a list; write {k}=[a.jsonl,b.jsonl] (quoted in the "
                              f"shell: '{k}=[a.jsonl,b.jsonl]')")
    unparsable = re.search(r"Error parsing override '([^'=]+)", text)
    if unparsable:
        return ConfigError(unparsable.group(1).lstrip("+~"),
                           "cannot parse this override; write key=value (quote lists: 'k=[a,b]')")
    override = re.search(r"Could not override '([^']+)'", text)
    first_line = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return ConfigError(key or (override.group(1) if override else "overrides"), first_line)


def _unknown_key(tree: dict, schema, prefix: str = "") -> str | None:
    """The first dotted key in `tree` that the dataclass `schema` does not declare."""
    declared = {f.name: f.type for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    for name, value in tree.items():
        if name not in declared:
            return prefix + name
        sub = hints[name]
        if isinstance(value, dict) and dataclasses.is_dataclass(sub):
            found = _unknown_key(value, sub, f"{prefix}{name}.")
            if found:
                return found
    return None


def _compose(overrides: Sequence[str], world_size: int, check: bool = True) -> tuple[Config, str]:
    """The typed, validated config of the overrides, and the run dir Hydra will use.

    `check=False` skips `validate` (the planner validates each layout it tries itself)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf, open_dict

    register()
    try:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
            run_dir = str(cfg.hydra.run.dir)
            if run_dir == "~" or run_dir.startswith("~/"):  # quoted: Hydra keeps it verbatim
                raise ConfigError("hydra.run.dir", f"Hydra does not expand ~ and would make a "
                                  f"directory named '~' here; write hydra.run.dir=$HOME"
                                  f"{run_dir[1:]}")
            with open_dict(cfg):
                del cfg["hydra"]
            extra = _unknown_key(OmegaConf.to_container(cfg), Config)
            if extra:  # `+key=value` slips past the schema's struct mode; refuse it here
                raise ConfigError(extra, "unknown key; check the spelling "
                                         "(python train.py --cfg job prints every key)")
            config = OmegaConf.to_object(cfg)
        config = apply_init_from(config, explicit_model_keys(overrides), run_dir)
        if check:  # parallel.auto: validate the layout train.py will run
            config = apply_auto(config, overrides, world_size)
            validate(config, world_size)
            check_inputs(config, run_dir)  # files: a resuming run does not need model.init_from
        return config, run_dir
    except ConfigError:
        raise
    except Exception as exc:  # Hydra/OmegaConf raise many types; all mean "bad overrides"
        raise translate(exc) from exc
    finally:
        GlobalHydra.instance().clear()


def apply_auto(config: Config, overrides: Sequence[str], world_size: int,
               log: bool = False) -> Config:
    """`config` with `parallel.auto`'s planned layout (plan/auto.py); unchanged without it.
    `log`: print the choice and its predicted peak (rank 0 of train.py)."""
    if not config.parallel.auto:
        return config
    from ..plan.auto import resolve

    config, line = resolve(config, overrides, world_size)
    if log:
        print(line, flush=True)
    return config


def compose(overrides: Sequence[str]) -> Config:
    """The typed config of the overrides, unvalidated (keys and types are checked). Raises
    ConfigError."""
    return _compose(overrides, 1, check=False)[0]


def run_dir_for(overrides: Sequence[str], world_size: int = 1) -> str:
    """The run dir `python train.py <overrides>` uses (relative to the working directory unless
    hydra.run.dir is given). The default one hashes the overrides except the keys listed in
    configs/config.yaml (hydra.job.config.override_dirname.exclude_keys): those that change how
    the same math is computed, or how the run is driven, so changing them resumes the run."""
    return _compose(overrides, world_size)[1]


def precheck(overrides: Sequence[str], world_size: int = 1) -> Config:
    """Compose and validate the command line's overrides; return the typed config.

    Also refuses, from the checkpoint's meta.json, to resume with another data stream
    (run_identity.check_before_start). Raises ConfigError. Runs before torch is imported, so a
    bad command line fails in a second.
    """
    config, run_dir = _compose(overrides, world_size)
    check_before_start(config, run_dir)
    return config


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
    except KeyboardInterrupt:  # a second Ctrl-C (the first one stops politely, with a save)
        if rank == 0:
            print("aborted: rerun the same command to resume from the newest checkpoint",
                  file=sys.stderr, flush=True)
        sys.exit(130)
    except Exception as error:  # a peer rank stalled or died: one line, not a traceback
        from ..parallel.mesh import describe_collective_failure

        line = describe_collective_failure(error, rank, world_size, cfg.parallel.timeout_s)
        if line is None:
            raise
        print(line, file=sys.stderr, flush=True)
        sys.exit(1)
    sys.exit(code)
