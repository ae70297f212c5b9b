"""finetune's plan: each trained method's rows and mixing factor."""

import pytest

from leaml_ray.config import ConfigError, load_config


def test_each_trained_method_gets_its_own_mixing_factor():
    from leaml_ray.stages.finetune import plan_for, row_budget

    def budget(cfg, method: str) -> tuple[int, int]:
        return row_budget(plan_for(cfg, method), 10, 100)

    one = load_config(None, ["target.labeled_upsample=16"])
    assert [budget(one, m) for m in ("leaml", "lora", "full")] == [(160, 260), (260, 260), (260, 260)]
    cfg = load_config(None, ["target.labeled_upsample={leaml: 16, lora: 8}"])
    # leaml: 10 pairs x 16 + 100 pseudo; a baseline: leaml's formula at its own factor, every row labeled
    assert budget(cfg, "leaml") == (160, 260)
    assert budget(cfg, "lora") == (180, 180)
    assert budget(cfg, "full") == (140, 140)  # not listed: the default factor, 4
    with pytest.raises(ConfigError, match="labeled_upsample"):
        load_config(None, ["target.labeled_upsample={zero_shot: 2}"])
