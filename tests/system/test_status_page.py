"""
The status page in a real headless Chromium: its script fetches status.json
and fills the tables (routes, targets, refusals) with no outside assets. A
screenshot is kept in build/artifacts/ (or $DCROUTER_ARTIFACTS).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.system.conftest import LOCALHOST, REPO, free_ports, make_config

pytestmark = pytest.mark.system

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CHROMIUM or "chromium", "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-dev-shm-usage", "--no-first-run", "--virtual-time-budget=5000",
         f"--user-data-dir={home}", *args],
        capture_output=True, text=True, timeout=90, stdin=subprocess.DEVNULL,
        env={**os.environ, "HOME": str(home)},
    )


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make test installs it)")
def test_the_status_page_renders_live_state_in_chromium(tmp_path: Path, router) -> None:
    web, admin, backend = free_ports(3)
    dcrouter = router(make_config(tmp_path / "state", f"""
        [route:hello]
        ports = {web}
        action = static
        body = hi

        [route:pool]
        ports = {web}
        path = /api/
        action = http
        target = {LOCALHOST}:{backend}
    """) + f"\n[admin]\nlisten = {LOCALHOST}:{admin}\n")
    subprocess.run(["curl", "-s", f"http://{LOCALHOST}:{web}/"], timeout=10, check=True,
                   capture_output=True)
    url = f"http://{LOCALHOST}:{admin}/"
    dom = chromium("--dump-dom", url, home=tmp_path / "chromium")
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    # Filled in by the page's own script from status.json:
    assert "<td>hello</td>" in page and "<td>pool</td>" in page, page[-3000:]
    assert f"{LOCALHOST}:{backend}" in page
    assert "<h2>Certificates</h2>" in page and "<h2>Mail queue</h2>" in page
    summary = re.search(r'<span id="summary"[^>]*>([^<]*)</span>', page)
    assert summary and re.fullmatch(r"\d+ open, \d+ accepted, up \d+ s", summary.group(1)), summary
    artifacts = Path(os.environ.get("DCROUTER_ARTIFACTS", REPO / "build" / "artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / "status-page.png"
    taken = chromium(f"--screenshot={shot}", "--window-size=1200,900", url,
                     home=tmp_path / "chromium")
    assert taken.returncode == 0 and shot.stat().st_size > 10_000, taken.stderr[-2000:]
    assert dcrouter.output()
