"""The package's layering: production modules never load the dev fixtures."""

import subprocess
import sys

PRODUCTION = ["aigd.train", "aigd.loop", "aigd.model", "aigd.scorer", "aigd.evaluation", "aigd.report", "aigd.data",
              "aigd.batch_score", "aigd.cli", "aigd.ui"]


def test_production_modules_never_import_the_dev_package():
    code = (f"import sys, importlib\nfor m in {PRODUCTION!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m.startswith('aigd.dev')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
