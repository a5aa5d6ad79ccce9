"""The tests write only inside temporary folders: what Ray and matplotlib would leave in the user's HOME and in /tmp
(~/.ray/auth_token, /tmp/ray/session_*, ~/.cache/matplotlib) goes to one folder per test session, removed at its end.

Set through the environment when pytest starts, before any test module imports ray or matplotlib, so that the
subprocesses the tests start (training scripts, Ray's own processes) inherit it too.
"""

import os
import secrets
import shutil
import tempfile

# Short on purpose: Ray's unix sockets live under it (<dir>/ray/session_<date>_<pid>/sockets/plasma_store) and a
# socket path may not exceed 107 characters. pytest's own tmp_path (/tmp/pytest-of-<user>/pytest-<n>/...) is longer.
SESSION_DIR = tempfile.mkdtemp(prefix="pytest-env-")

ENV = {
    "RAY_TMPDIR": SESSION_DIR,  # instead of /tmp/ray
    "MPLCONFIGDIR": os.path.join(SESSION_DIR, "matplotlib"),  # instead of ~/.config/matplotlib, ~/.cache/matplotlib
    # Ray's token authentication with a token held in the environment, which its processes inherit: instead of the
    # token ray.init writes to ~/.ray/auth_token when no token exists. Set before ray is imported (it reads the mode
    # once, at import).
    "RAY_AUTH_MODE": "token",
    "RAY_AUTH_TOKEN": secrets.token_hex(32),
}


def pytest_configure(config):
    for key, value in ENV.items():
        os.environ[key] = value


def pytest_unconfigure(config):
    shutil.rmtree(SESSION_DIR, ignore_errors=True)
