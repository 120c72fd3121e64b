"""
C{python -m bench.probecost} is not part of the test run, but must not rot:
one cold start of each and a short fleet run here, every figure present.
"""

import json
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent


class ProbeCostSmokeTests(SynchronousTestCase):
    def test_one_run(self):
        result = subprocess.run([sys.executable, "-m", "bench.probecost", "--runs", "1",
                                 "--targets", "20", "--json"], cwd=ROOT, capture_output=True,
                                text=True, timeout=120, stdin=subprocess.DEVNULL)
        self.assertEqual(result.returncode, 0, result.stderr)
        figures = json.loads(result.stdout)
        self.assertEqual((figures["runs"], figures["targets"]), (1, 20))
        for key in ("twisted_import_ms", "cold_probe_ms", "fleet_ms_per_probe"):
            self.assertGreater(figures[key], 0, key)
        # A probe in a fleet costs far less than one started cold.
        self.assertLess(figures["fleet_ms_per_probe"], figures["cold_probe_ms"] / 10)
