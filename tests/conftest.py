"""
pytest set-up shared by every test module.

Importing trial here, before pytest configures itself, makes pytest treat
trial's C{todo} attribute as an expected failure (xfail) and an unexpected
success as a failure.  Without it, pytest only learns of trial after
configuration and reports every C{todo} test as an error.
"""

import twisted.trial.unittest  # noqa: F401
