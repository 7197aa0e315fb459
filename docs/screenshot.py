"""The screenshot of the HTML report in docs/ (docs/report.png): the page of a JSON report,
rendered by ``otbr_onnx.html_report`` and photographed in headless Chromium (Debian's
``chromium``; the driver is the one the HTML test uses, tests/browser.py).

    otbr-onnx clean models/demo_badnets.onnx /tmp/demo_cleaned.onnx --data models/demo_images --report /tmp/demo_report.json
    python docs/screenshot.py /tmp/demo_report.json

The page's top (the verdict, the user's images before and after, the scan's figures) is kept:
``--height`` pixels at 1200 wide.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from otbr_onnx.html_report import write_html  # noqa: E402
from tests.browser import check_page  # noqa: E402


def screenshot(report: dict, out: Path, height: int) -> None:
    """``report``'s page as a PNG at ``out``, cropped to its top ``height`` pixels; refuses a page
    the browser reports errors on."""
    from PIL import Image

    with tempfile.TemporaryDirectory() as folder:
        page = Path(folder) / "report.html"
        write_html(report, page)
        check = check_page(page)
    if check.errors:
        raise SystemExit(f"the page has errors: {check.errors}")
    image = Image.open(BytesIO(check.screenshot)).convert("RGB")
    image.crop((0, 0, image.width, min(height, image.height))).save(out, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path, help="a JSON report of `clean` (with --data, for the images)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "report.png")
    parser.add_argument("--height", type=int, default=1500)
    args = parser.parse_args()
    screenshot(json.loads(args.report.read_text()), args.out, args.height)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
