"""wandb for a run: which mode it can start in without a login prompt, and starting it.

Only rank 0 logs (train/metrics.py `Reporter`). `import wandb` happens in `start_wandb` alone:
wandb is heavy, and `logging.wandb.mode=disabled` never needs it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import netrc
import os
import sys


def wandb_login_source(environ=os.environ) -> str | None:
    """Where wandb would find credentials without asking the network, or None if nowhere.

    The same order as wandb's own lookup (wandb 0.2x-0.3x `sdk/lib/wbauth`): WANDB_API_KEY,
    WANDB_IDENTITY_TOKEN_FILE, then a netrc entry (file: $NETRC, else ~/.netrc, else
    ~/_netrc) for the host of WANDB_BASE_URL (default https://api.wandb.ai). A key kept only
    in wandb's settings file is not seen: such a run logs offline (see `wandb_mode`).
    """
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        if environ.get(name):
            return name
    from urllib.parse import urlsplit

    host = urlsplit(environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc
    home = environ.get("HOME") or os.path.expanduser("~")
    paths = [environ["NETRC"]] if environ.get("NETRC") else [
        os.path.join(home, ".netrc"), os.path.join(home, "_netrc")]
    for path in paths:
        try:
            entry = netrc.netrc(os.path.expanduser(path)).authenticators(host)
        except (OSError, netrc.NetrcParseError):  # missing or unreadable: not a login
            continue
        if entry and entry[2]:
            return path
    return None


def wandb_mode(mode: str, run_dir: str, environ=os.environ) -> tuple[str, str | None]:
    """(the mode to start wandb in, a warning or None). `online` without credentials becomes
    `offline`, so the run is not lost to a login prompt or a traceback after the data and the
    model were built: its logs stay in `run_dir/wandb` for `wandb sync` later."""
    if mode != "online" or wandb_login_source(environ):
        return mode, None
    where = os.path.join(os.path.abspath(run_dir), "wandb")
    return "offline", (
        "warning: logging.wandb.mode=online but no wandb login was found (WANDB_API_KEY or a "
        f"netrc entry): logging offline to {where}; upload it later with "
        f"`wandb sync {where}/offline-run-*`, or run `wandb login` before the next run")


def with_wandb_fallback(cfg, run_dir: str, is_main: bool):
    """`cfg` (a config.Config), with `logging.wandb.mode` as `wandb_mode` resolves it; rank 0
    prints the warning, if any, on stderr."""
    mode, warning = wandb_mode(cfg.logging.wandb.mode, run_dir)
    if warning is None:
        return cfg
    if is_main:
        print(warning, file=sys.stderr, flush=True)
    wandb_cfg = dataclasses.replace(cfg.logging.wandb, mode=mode)
    return dataclasses.replace(cfg, logging=dataclasses.replace(cfg.logging, wandb=wandb_cfg))


def start_wandb(run_dir: str, wandb_cfg, config_dict: dict):
    """`wandb.init` for this run (rank 0): `logging.wandb.*`, logs under `run_dir`, and a stable
    id per run dir so that a resumed run continues the same wandb run."""
    import wandb  # heavy; only imported when a run asks for it

    # A stable id per run dir makes a resumed run continue the same wandb run.
    run_id = hashlib.sha1(os.path.abspath(run_dir).encode()).hexdigest()[:12]
    return wandb.init(project=wandb_cfg.project, name=wandb_cfg.name or None,
                      mode=wandb_cfg.mode, dir=run_dir, id=run_id, resume="allow",
                      config=config_dict)
