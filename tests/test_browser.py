"""A real browser on the real UI: scripts/browser_check.py against a materialized instance.

Materializes the demo graph into a fresh Dagster home, starts `dagster-webserver` on a free
loopback port, opens the asset graph and the `evaluation` asset's page in Debian's headless
Chromium (installed with apt-get when missing and running as root), and checks that every asset
name, and the labels and values of the last materialization's metadata, are on the pages. The
screenshots are kept under pytest's tmp folder (the committed ones in docs/screenshots come from
the same script).

Skips, saying why, only where Chromium can be neither found nor installed.
"""

from __future__ import annotations

import importlib.util
import struct
import sys
from pathlib import Path

import pytest
from deploy_support import apt_install, demo_environment, materialize_demo

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("browser_check", ROOT / "scripts" / "browser_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


browser_check = _load_script()


@pytest.fixture(scope="module")
def chromium_binary() -> str:
    try:
        return browser_check.find_chromium()
    except browser_check.CannotStart:
        pass
    problem = apt_install("chromium")
    try:
        return browser_check.find_chromium()
    except browser_check.CannotStart:
        pytest.skip(f"Chromium not found (/usr/bin/chromium) and could not be installed: {problem}")


@pytest.fixture(scope="module")
def materialized_home(tmp_path_factory) -> Path:
    """A Dagster home (SQLite) in which the demo graph has been materialized once."""
    from dagster import DagsterInstance

    base = tmp_path_factory.mktemp("browser")
    home = base / "dagster_home"
    home.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        for key, value in demo_environment(base / "work").items():
            patch.setenv(key, value)
        instance = DagsterInstance.from_config(str(home))
        try:
            outcome = materialize_demo(instance, base / "work")
        finally:
            instance.dispose()
    assert outcome.success
    return home


@pytest.fixture(scope="module")
def webserver(materialized_home):
    with browser_check.dagster_webserver(materialized_home) as base:
        yield base


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


def test_asset_graph_and_asset_page_render_in_headless_chromium(chromium_binary, materialized_home, webserver,
                                                               tmp_path):
    # The UI draws only the nodes inside the 1600x1000 viewport: with the method and export assets
    # the graph is taller than that, so the NoLA graph's ten assets must be drawn, not every asset
    # (and the check stops waiting once they are: it waited its full timeout for the others).
    nola = ("dataset_manifest", "class_descriptions", "cde_classifier", "clip_features", "dino_features",
            "cde_pseudo_labels", "alignment_checkpoint", "prompt_tuned_encoder", "predictions", "evaluation")
    out = tmp_path / "screenshots"
    checks = browser_check.browser_check(materialized_home, out, asset="evaluation", partition="fashion_mini",
                                         chromium_binary=chromium_binary, timeout=90, base_url=webserver,
                                         graph_wait_for=nola)
    by_name = {check.name: check for check in checks}
    graph, page = by_name["asset_graph"], by_name["asset_page"]
    assert not [s for s in nola if s not in graph.found], f"asset names not drawn in the graph: {graph.missing}"
    for stage in nola:
        assert stage in graph.expected

    assert not page.missing, f"not on the evaluation page: {page.missing}"
    # Labels and values of the last materialization, as the instance recorded them.
    assert "evaluation" in page.found and "seconds" in page.found and "artifact_digest" in page.found
    assert len(page.found) >= 6

    for check in checks:
        assert check.screenshot is not None and check.screenshot.exists()
        assert _png_size(check.screenshot) == (1600, 1000)
        assert check.screenshot.stat().st_size > 30_000, "a nearly empty picture: the page did not draw"


def test_a_missing_metadata_value_is_reported_not_ignored(chromium_binary, webserver, tmp_path):
    """The check can fail: a text that is not on the page comes back as missing."""
    with browser_check.chromium(chromium_binary) as tools:
        check = browser_check.PageCheck("asset_page", "/assets/evaluation",
                                        ["evaluation", "no-such-metadata-label-xyz"])
        browser_check.run_check(tools, webserver, check, tmp_path, timeout=5, settle=0)
    assert check.found == ["evaluation"]
    assert check.missing == ["no-such-metadata-label-xyz"]
