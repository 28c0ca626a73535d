"""Small pure pieces of the update step."""

from marginal_rl.train.config import load_config
from marginal_rl.train.update import measure_drift


def test_drift_not_probed_is_none_not_zero():
    # budget.drift_probe=0: nothing is measured, so the budget must hear "unknown" (None), not "no drift" (0.0)
    cfg = load_config([], ["budget.drift_probe=0"])
    assert measure_drift(None, [], version=3, cfg=cfg, pad_id=0, device="cpu") is None
