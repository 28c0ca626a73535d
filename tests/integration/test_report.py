"""`marginal-rl report` on a real tiny run: one HTML page, every image beside it, readable offline; and, where
Debian's chromium is installed, the page rendered in a real browser."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from PIL import Image

from marginal_rl.cli import main
from tests.conftest import tiny_overrides


@pytest.fixture(scope="module")
def reported_run(tmp_path_factory, policy_cache):
    run = tmp_path_factory.mktemp("report") / "run"
    assert main(["train", "--config", "configs/quickstart.yaml", *tiny_overrides(policy_cache, str(run)),
                 "train.max_steps=4", "train.eval_every=2", "budget.policy=marginal", "budget.token_budget=400"]) == 0
    assert main(["report", str(run)]) == 0
    return run


def test_run_report_page_and_its_images(reported_run):
    page = (reported_run / "report.html").read_text()
    images = re.findall(r'<img src="([^"]+)"', page)
    expected = {"reward_vs_tokens.png", "reward_vs_steps.png", "tokens_by_use.png", "tokens_by_fate.png",
                "price_components.png", "price.png", "families.png"}
    assert set(images) == expected
    for name in images:
        with Image.open(reported_run / name) as im:  # a real PNG of a readable size, beside the page
            assert im.format == "PNG" and im.size[0] >= 600 and im.size[1] >= 300
    assert page.count("<figcaption>") == len(images)
    assert "the 5 highest-priced trajectories" in page and "the 5 lowest-priced trajectories" in page
    assert "http" not in page  # nothing to fetch: readable offline


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_run_report_renders_in_a_browser(reported_run, tmp_path):
    shot = tmp_path / "page.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1200,3000", (reported_run / "report.html").as_uri()], capture_output=True,
                   timeout=120, check=True)
    with Image.open(shot) as im:
        gray = im.convert("L")
        # drawn, not blank: the plots cover a good part of the page
        dark = sum(1 for v in gray.getdata() if v < 200) / (gray.size[0] * gray.size[1])
    assert dark > 0.02
