"""The check's summary: OUT/summary.json and the printed table (the last step of gpu_check.sh).

    python -m gpu_check.summary OUT

Reads every stage's file (a missing one is `missing`, which fails the check), writes
summary.json (each stage's status, reason and seconds, the figures worth a glance, `ok`) and
prints one line per stage, then the speed table with the planner's peaks. Exit 0 when every
stage passed (in the dry run the GPU tests count as passed when they skipped for want of a GPU),
else 1. Imports nothing heavy (no torch).
"""
from __future__ import annotations

import json
import os
import sys

from gpu_check.common import write_record

STAGES = ("install", "gpu_tests", "bf16_curve", "parity", "speed")


def load(out_dir: str, name: str) -> dict:
    path = os.path.join(out_dir, f"{name}.json")
    if not os.path.exists(path):
        return {"stage": name, "status": "missing", "reason": f"no {name}.json"}
    with open(path) as f:
        return json.load(f)


def detail(rec: dict) -> str:
    """One line of what a stage found; a record a time box cut short may lack any part, and the
    summary must still be written."""
    try:
        return _detail(rec)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return f"(record incomplete: {type(exc).__name__} {exc})"


def _detail(rec: dict) -> str:
    name = rec["stage"]
    if name == "install":
        env = rec.get("environment", {})
        return (f"installed {len(rec.get('installed', []))} wheel(s); {env.get('gpu', 'no GPU')}, "
                f"torch {env.get('torch')}, transformers {env.get('transformers')}")
    if name == "gpu_tests":
        return ", ".join(f"{n} {k}" for k, n in rec.get("counts", {}).items() if n)
    if name == "bf16_curve":
        return "; ".join(f"{c}: loss {'ok' if r['ok'] else 'OUTSIDE'} (max "
                         f"{r['loss']['max_rel_dev']:.2g}), grad_norm "
                         f"{r['grad_norm']['max_rel_dev']:.2g}"
                         for c, r in rec.get("curves", {}).items())
    if name == "parity":
        parts = []
        for case, r in rec.get("cases", {}).items():
            if "error" in r:
                parts.append(f"{case}: ERROR")
                continue
            worst = max((c["loss"]["max_rel_dev"] for c in r.get("curves", {}).values()),
                        default=float("nan"))
            parts.append(f"{case}: {'ok' if r.get('ok') else 'DIFFERS'} (loss {worst:.2g})")
        return "; ".join(parts)
    if name == "speed":
        return "; ".join(f"{t['seq_len']}: {t['ratio']}x" if "ratio" in t else f"{t['seq_len']}: -"
                         for t in rec.get("table", []))
    return ""


def passed(rec: dict, mode: str) -> bool:
    if rec["status"] == "passed":
        return True
    return rec["status"] == "skipped" and mode == "dry" and rec["stage"] == "gpu_tests"


def speed_lines(rec: dict) -> list[str]:
    planner = {p["seq_len"]: p for p in rec.get("planner", [])}
    lines = [f"{'seq':>8} | {'ours tok/s':>10} {'config':<24} {'GiB':>6} | {'HF tok/s':>9} "
             f"{'config':<6} {'GiB':>6} | {'ratio':>5} {'target':>6} | planner GiB (error)"]
    for t in rec.get("table", []):
        ours, hf, p = t["ours"], t["hf"], planner.get(t["seq_len"])
        left = (f"{'ERROR':>10} {ours['error'][:24]:<24} {'':>6}" if "error" in ours else
                f"{ours['tokens_per_s']:>10,.0f} {ours['config'][:24]:<24} "
                f"{ours['peak_mem_gib']:>6.2f}")
        right = (f"{'ERROR':>9} {hf['error'][:6]:<6} {'':>6}" if "error" in hf else
                 f"{hf['tokens_per_s']:>9,.0f} {hf['config']:<6} {hf['peak_mem_gib']:>6.2f}")
        plan = f"{p['predicted_gib']:.2f} ({p['error_pct']:+.1f} %)" if p else "-"
        ratio = f"{t['ratio']:.2f}" if "ratio" in t else "-"
        lines.append(f"{t['seq_len']:>8} | {left} | {right} | {ratio:>5} "
                     f"{t.get('target_ratio') or '-':>6} | {plan}")
    return lines


def summarise(out_dir: str) -> tuple[dict, list[str]]:
    records = [load(out_dir, name) for name in STAGES]
    mode = next((r["mode"] for r in records if "mode" in r), "full")
    stages = {r["stage"]: {"status": r["status"], "reason": r.get("reason"),
                           "seconds": r.get("wall_seconds", r.get("seconds")),
                           "detail": detail(r)} for r in records}
    ok = all(passed(r, mode) for r in records)
    speed = records[STAGES.index("speed")]
    summary = {"mode": mode, "ok": ok, "stages": stages, "speed_table": speed.get("table", []),
               "planner": speed.get("planner", []),
               "environment": records[0].get("environment", {})}
    lines = [f"GPU check ({mode}): {'PASSED' if ok else 'FAILED'} -> {out_dir}",
             f"{'stage':<11} {'status':<8} {'s':>6}  detail"]
    for name, s in stages.items():
        secs = f"{s['seconds']:.0f}" if isinstance(s["seconds"], (int, float)) else "-"
        why = f" [{s['reason']}]" if s["reason"] else ""
        lines.append(f"{name:<11} {s['status']:<8} {secs:>6}  {s['detail']}{why}")
    if speed.get("table"):
        try:
            lines += ["", *speed_lines(speed)]
        except (KeyError, TypeError, ValueError) as exc:
            lines += ["", f"(speed table incomplete: {type(exc).__name__} {exc})"]
    return summary, lines


def main(argv) -> int:
    if len(argv) != 1:
        sys.stderr.write("error: gpu_check.summary: usage: python -m gpu_check.summary OUT\n")
        return 2
    summary, lines = summarise(argv[0])
    write_record(os.path.join(argv[0], "summary.json"), summary)
    print("\n".join(lines))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
