"""A mixture's data identity: weights and shaping are the stream, resumes elsewhere refused."""
from __future__ import annotations

import dataclasses

import pytest

from support.common import small_config
from ulysses_train.checkpoint.identity import check_resume, config_identity
from ulysses_train.config.errors import ConfigError
from ulysses_train.config.schema import SourceConfig


def _cfg(**entry):
    cfg = small_config()
    cfg.data.sources = [SourceConfig(name="a", kind="megatron", paths=["/d/a"], weight=1.0),
                        SourceConfig(kind="megatron", paths=["/d/b"],
                                     **{"name": "b", "weight": 3.0, **entry})]
    return cfg


def _meta(cfg):
    return {"identity": {"data": config_identity(cfg)}}


@pytest.mark.parametrize("change, key", [
    ({"weight": 1.0}, "data.sources[0].weight"),  # shares 0.25/0.75 -> 0.5/0.5: both move
    ({"min_tokens": 100}, "data.sources[1].min_tokens"),
    ({"length_upsample": 2.0}, "data.sources[1].length_upsample"),
    ({"name": "c"}, "data.sources"),
])
def test_a_changed_weight_or_shaping_refuses_to_resume(change, key):
    saved, now = _cfg(), _cfg(**change)
    with pytest.raises(ConfigError) as err:
        check_resume(_meta(saved), {"data": config_identity(now)}, "ckpt", "auto", print)
    assert err.value.key == key
    assert "ckpt" in err.value.message and "{" not in err.value.message  # no dict dump


def test_proportional_weights_are_the_same_stream():
    saved, now = _cfg(), _cfg()
    now.data.sources = [dataclasses.replace(s, weight=s.weight * 2) for s in now.data.sources]
    check_resume(_meta(saved), {"data": config_identity(now)}, "ckpt", "auto", print)
    assert config_identity(saved)["data.name"] == "mixture"
