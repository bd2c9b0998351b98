"""The mixture's run-level report (train/mixture_report.py): epochs warning, token fields."""
from __future__ import annotations

import json

from support.data import build
from support.mixture import mixture_cfg
from ulysses_train.train import mixture_report


def test_a_source_read_more_than_once_is_named_with_its_epochs(tmp_path):
    data = build(mixture_cfg(tmp_path, min_tokens=250), batch=8)  # few long windows
    windows = data.sources["long"]["train"].n_windows
    steps = windows  # 0.75 * 8 rows per step: ~6 epochs of 'long'
    lines = mixture_report.epoch_warnings(data, steps)
    assert len(lines) == 1 and "'long'" in lines[0] and "epochs" in lines[0]
    assert mixture_report.epoch_warnings(data, 1) == []
    fields = mixture_report.token_fields(data, steps, 64)
    assert fields["tokens/long"] + fields["tokens/short"] == steps * 8 * 64


def test_the_length_report_is_written_for_mixtures_only(tmp_path):
    data = build(mixture_cfg(tmp_path), batch=8)
    png = mixture_report.write_length_report(data, 10, str(tmp_path))
    report = json.loads((tmp_path / "tokens_by_length.json").read_text())
    assert png.endswith(".png") and report["steps"] == 10
    assert set(report["sources"]) == {"short", "long"}
    plain = data.for_source("short")  # one source alone: no mixture to report
    assert mixture_report.write_length_report(plain, 10, str(tmp_path / "none")) is None
