"""Everything Hydra: schema registration, composition, override pre-checking, error translation.

Only the entry points (cli/) import this module, and it imports Hydra inside its functions, so
`import ulysses_train` never pulls Hydra in. The library below sees plain dataclasses
(`ulysses_train.config.schema.Config`), never a DictConfig.

Why pre-check: Hydra reports an unknown key or a wrong type as a multi-line message and exits 1.
The contract (docs/architecture.md §2) is one line `error: <key>: <what to do>` and exit 2 on every
rank, so we compose the overrides ourselves first, inside a try, and translate whatever goes wrong.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import typing
from typing import Sequence

from ..checkpoint.identity import check_before_start
from ..config.errors import ConfigError, exception_chain
from ..config.overrides import override
from ..config.schema import MODEL_PRESETS, Config
from ..config.validate import validate
from ..hf.config import apply_init_from, explicit_model_keys, run_name
from .checks import check_inputs, check_run_dir

# configs/ at the repository root (ulysses_train/cli/ -> ../../configs)
CONFIG_DIR = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                          os.pardir, os.pardir, "configs"))
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
    match = re.search(r"full_key:[ \t]*(\S+)", text)  # an empty one is None, not the next line
    return match.group(1) if match else None


GRAMMAR_URL = "https://hydra.cc/docs/advanced/override_grammar/basic/"


def quoted_override(prefix: str, key: str, value: str) -> str | None:
    """The command-line text `key=value` (each element of a `[...]` list) quoted as Hydra's
    grammar parses it whatever characters the value holds (config/overrides.py). None where
    quoting alone would not do: a value with quotes of its own or an `${...}` interpolation."""
    if any(c in value for c in "\"'") or "${" in value:
        return None
    if value.startswith("[") and value.endswith("]"):
        items = [item.strip() for item in value[1:-1].split(",")]
        if any(c in item for item in items for c in "[]{}"):
            return None
        return override(prefix + key, [item for item in items if item], quote=True)
    return override(prefix + key, value, quote=True)


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


# The example each list key's "expects a list" line shows (other list keys: [a,b]).
_LIST_EXAMPLES = {
    "data.paths": "a.jsonl,b.jsonl",
    "model.layer_types": "sliding_attention,full_attention",
    "eval.buckets": "0,1024,4096",
    "eval.passkey_lengths": "1024,4096",
    "eval.passkey_depths": "0.0,0.5,1.0",
    "data.sources": "{name:web,kind:files,paths:[web.jsonl],weight:0.7},"
                    "{name:code,kind:megatron,paths:[code_text_document],weight:0.3}",
}


def _entry_key(text: str, key: str | None) -> str | None:
    """`data.sources[i].key` for a key OmegaConf reports without its list entry (it names
    `key` alone when an entry of `data.sources=[{...},{...}]` is wrong); `key` otherwise."""
    if not key or "reference_type=SourceConfig" not in text or key.startswith("data.sources"):
        return key
    listed = re.search(r"data\.sources=\[(.*)\]", text)
    entries, depth, start = [], 0, 0
    body = listed.group(1) if listed else ""
    for i, c in enumerate(body):  # the top-level {...} entries of the list
        depth += (c == "{") - (c == "}")
        if c == "{" and depth == 1:
            start = i
        elif c == "}" and depth == 0:
            entries.append(body[start:i + 1])
    index = next((i for i, e in enumerate(entries) if re.search(rf"[{{,]\s*{key}\s*:", e)),
                 None)
    return f"data.sources[{'' if index is None else index}].{key}"  # []: a YAML group's entry

def _structural(text: str, key: str | None) -> ConfigError | None:
    """Errors about a list's or a YAML file's shape rather than one value: a data.sources entry
    that is not a mapping or past the list's end, a list entry deleted by index, a duplicate
    key in a YAML file. None for anything else."""
    example = "{name:web,kind:files,paths:[web.jsonl],weight:0.7}"
    past = re.search(r"override data\.sources\.(\d+)\.", text)
    if past and "is not a subclass of SourceConfig" in text:
        return ConfigError(f"data.sources[{past.group(1)}]", "there is no such entry (they count "
                           "from 0); to add one, give the whole list: data.sources=[...]")
    wrong = re.search(r"Invalid type assigned: (\w+) is not a subclass of SourceConfig", text)
    if wrong:
        return ConfigError(key or "data.sources", f"an entry is a mapping such as {example}, "
                           f"not a {wrong.group(1)}")
    if "list indices must be integers or slices, not str" in text:
        return ConfigError("overrides", "a list entry cannot be removed by its index "
                           "(~key.N); give the whole list without it")
    duplicate = re.search(r'found duplicate key (\S+)\s+in "([^"]+)", line (\d+)', text)
    group = re.search(r"In '(\w+)/([\w.-]+)'", text)
    if group and key is None and "Cannot merge DictConfig with ListConfig" in text:
        return ConfigError(f"{group.group(1)}/{group.group(2)}.yaml", "a key that takes a list "
                           "(sources, paths, ...) holds a mapping here; write its entries as a "
                           "YAML list, one '- {...}' per line")
    if duplicate:
        name, path, line = duplicate.groups()
        return ConfigError(path, f"key {name!r} appears twice (again at line {line}); keep one")
    return None


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
    key = _entry_key(text, _full_key(text))
    structural = _structural(text, key)
    if structural is not None:
        return structural
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
    if ("is not a ListConfig, list or tuple" in text  # e.g. data.paths=a.jsonl
            or "Cannot merge DictConfig with ListConfig" in text):  # data.sources={...}
        k = key or "config"
        items = _LIST_EXAMPLES.get(k, "a,b")
        return ConfigError(k, f"expects a list; write {k}=[{items}] (quoted in the "
                              f"shell: '{k}=[{items}]')")
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
        item = typing.get_args(sub)
        if isinstance(value, list) and item and dataclasses.is_dataclass(item[0]):
            entries = [(f"{prefix}{name}[{i}].", v, item[0]) for i, v in enumerate(value)]
        else:  # a nested section, or a plain value
            entries = [(f"{prefix}{name}.", value, sub)]
        for at, v, kind in entries:
            found = (_unknown_key(v, kind, at)
                     if isinstance(v, dict) and dataclasses.is_dataclass(kind) else None)
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
            if check:  # Hydra would fail to make it with a traceback, or use the cwd for ""
                check_run_dir(run_dir)
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


# Hydra's flags that only print the composed config, with the value each takes (if any).
PRINT_FLAGS = {"--cfg": 1, "-c": 1, "--package": 1, "-p": 1, "--resolve": 0}


def overrides_of(args: Sequence[str]) -> list[str] | None:
    """The overrides of a command line whose flags only print the config (`--cfg job`,
    `--resolve`, `--package`), so they can be checked as a run's are; None when another flag
    (--help, --multirun, ...) makes Hydra do something else."""
    out, i = [], 0
    while i < len(args):
        if args[i].startswith("-"):
            if args[i] not in PRINT_FLAGS:
                return None
            i += 1 + PRINT_FLAGS[args[i]]
            continue
        out.append(args[i])
        i += 1
    return out


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
    (checkpoint/identity.py check_before_start). Raises ConfigError. Runs before any heavy work
    (no process group, data or model), so a bad command line fails in a second.
    """
    config, run_dir = _compose(overrides, world_size)
    check_before_start(config, run_dir)
    return config
