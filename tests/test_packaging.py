"""
Packaging: the wheel carries the plugin (and no plugin cache, no package
file that would shadow Twisted), and twistd finds the plugin after an
editable install, the way contributors install tcpgreet.

These build with pip exactly as a user would, so they need the package
index (or pip's cache) and take tens of seconds.
"""

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import venv
import zipfile
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from .helpers import fetch, require_tool

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["pyproject.toml", "setup.cfg", "setup.py", "README.rst", "LICENSE", "tcpgreet",
           "twisted"]


def copy_project(into: Path) -> Path:
    """Copy the project's sources (no caches, no build residue) into C{into}."""
    target = into / "project"
    target.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "dropin.cache", "*.egg-info")
    for name in SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=ignore)
        else:
            shutil.copy2(source, target / name)
    return target


def pip(python: str, *args: str, cwd: Path) -> None:
    result = subprocess.run([python, "-m", "pip", "install", "--quiet",
                             "--disable-pip-version-check", *args],
                            capture_output=True, text=True, timeout=600, cwd=cwd)
    if result.returncode != 0:
        raise AssertionError(f"pip install {' '.join(args)} failed:\n"
                             f"{result.stdout}\n{result.stderr}")


class PackagingTests(SynchronousTestCase):
    def setUp(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="tcpgreet-pkg-"))
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def test_wheel_contents(self):
        project = copy_project(self.tmp)
        (project / "twisted" / "plugins" / "dropin.cache").write_bytes(b"stale")
        wheels = self.tmp / "wheels"
        result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet",
                                 "--disable-pip-version-check", "--no-deps",
                                 "-w", str(wheels), str(project)],
                                capture_output=True, text=True, timeout=600, cwd=self.tmp)
        self.assertEqual(result.returncode, 0, result.stderr)
        [wheel] = wheels.glob("tcpgreet-*.whl")
        names = set(zipfile.ZipFile(wheel).namelist())
        self.assertIn("twisted/plugins/tcpgreet_plugin.py", names)
        for module in ("tcpgreet/tap.py", "tcpgreet/client/__main__.py",
                       "tcpgreet/workers/__main__.py"):
            self.assertIn(module, names)
        for shadowing in ("twisted/__init__.py", "twisted/plugins/__init__.py",
                          "twisted/plugins/dropin.cache"):
            self.assertNotIn(shadowing, names)
        self.assertEqual({n for n in names if n.startswith("twisted/")},
                         {"twisted/plugins/tcpgreet_plugin.py"})

    def test_build_makes_an_sdist_and_a_wheel_that_twine_accepts(self):
        # The standard PEP 517 path (pyproject.toml's build-system), as
        # build tools and package indexes take it.
        project = copy_project(self.tmp)
        dist = self.tmp / "dist"
        built = subprocess.run([sys.executable, "-m", "build", "--sdist", "--wheel",
                                "--outdir", str(dist), str(project)],
                               capture_output=True, text=True, timeout=600, cwd=self.tmp)
        self.assertEqual(built.returncode, 0, built.stdout + built.stderr)
        [sdist] = dist.glob("tcpgreet-*.tar.gz")
        [wheel] = dist.glob("tcpgreet-*.whl")
        checked = subprocess.run([sys.executable, "-m", "twine", "check", "--strict",
                                  str(sdist), str(wheel)],
                                 capture_output=True, text=True, timeout=120, cwd=self.tmp)
        self.assertEqual(checked.returncode, 0, checked.stdout + checked.stderr)
        self.assertEqual(checked.stdout.count("PASSED"), 2, checked.stdout)
        with tarfile.open(sdist) as archive:
            names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
        self.assertLessEqual({"pyproject.toml", "setup.cfg", "README.rst", "LICENSE",
                              "twisted/plugins/tcpgreet_plugin.py"}, names)

    def test_editable_install_is_found_by_twistd(self):
        project = copy_project(self.tmp)
        env_dir = self.tmp / "venv"
        venv.create(env_dir, with_pip=True)
        python = str(env_dir / "bin" / "python")
        pip(python, "-e", str(project), cwd=self.tmp)
        where = subprocess.run([python, "-c", "import tcpgreet; print(tcpgreet.__file__)"],
                               capture_output=True, text=True, timeout=60, cwd=self.tmp)
        self.assertEqual(where.stdout.strip(), str(project / "tcpgreet" / "__init__.py"))
        twistd = str(env_dir / "bin" / "twistd")
        listed = subprocess.run([twistd, "--help"], capture_output=True, text=True,
                                timeout=60, cwd=self.tmp)
        self.assertRegex(listed.stdout, r"\n\s+tcpgreet\s+A TCP greeting")
        server = subprocess.Popen([twistd, "-n", "--pidfile=", "tcpgreet", "--listen",
                                   "tcp:0:interface=127.0.0.1"], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, cwd=self.tmp,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.addCleanup(server.wait, 30)
        self.addCleanup(server.terminate)
        for line in server.stdout:  # bounded: twistd exits on error, ending the loop
            if "listening on" in line:
                port = int(line.rsplit(":", 1)[1].split(")")[0])
                break
        else:
            self.fail(f"twistd exited with {server.wait(30)} before listening")
        self.assertEqual(fetch("127.0.0.1", port), b"Thank you for connecting\r\n")


class CheckoutTests(SynchronousTestCase):
    def test_a_server_started_in_the_checkout_leaves_nothing_to_commit(self):
        # twistd writes twistd.pid in the folder it runs from, unless --pidfile=.
        if not (ROOT / ".git").exists():
            raise SkipTest("not a git checkout")
        git = require_tool(self, "git")
        result = subprocess.run([git, "check-ignore", "--no-index", "--quiet", "twistd.pid"],
                                cwd=ROOT, capture_output=True, text=True, timeout=30)
        self.assertEqual(result.returncode, 0, "twistd.pid is not in .gitignore")
