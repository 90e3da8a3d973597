"""What the browser tests need to start Debian's headless Chromium (driven by Playwright).

Needs ``/usr/bin/chromium`` (``apt-get install chromium``) and the ``playwright`` package;
never ``playwright install`` (it downloads a browser).
"""

from __future__ import annotations

from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
