"""``make man`` builds qvm-firewall(1) from the real parser, with every option in it."""

from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import cannot_run

REPO = Path(__file__).resolve().parent.parent


def test_man_page_documents_every_option(tmp_path: Path) -> None:
    if not (REPO / ".venv" / "bin" / "argparse-manpage").exists():
        cannot_run("argparse-manpage not installed (run make deps)")
    subprocess.run(["make", "-s", "man"], cwd=REPO, check=True, capture_output=True, timeout=120)
    page = (REPO / "doc" / "man" / "qvm-firewall.1").read_text()
    assert page.startswith('.TH QVM\\-FIREWALL "1"')
    for option in ("reload", "raw", "before", "rule\\-no"):
        assert f"\\fB\\-\\-{option}\\fR" in page, option
    for word in ("action=forward", "srchost=", "srcqube=", "forwardtype=", "expire=+SECONDS",
                 "forward:N", "inbound:N", "\\-\\-rule\\-no forward:0", "expire=shutdown"):
        assert word in page, word
