"""CLI command modules. Each imports `app` from mlx_cai.cli and decorates its commands with @app.command().

Errors the user can fix are library exceptions (ValueError subclasses, BackendError) and OS errors (a full disk,
a missing or unwritable file); wrap the body in `with user_errors():` so they become one red line and exit 1.
Ctrl-C is one line too, exit code 130.
"""

from __future__ import annotations

import errno
from contextlib import contextmanager

BUDGET_HELP = ("GB of memory this command may use (default: the device's: Metal's recommended working set, a CUDA "
               "device's memory, else the RAM); a config estimated above it stops before any work")
FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))  # no space, or no quota left


def os_error_line(e: OSError) -> str:
    """One line for an OSError: a full disk says what to do; others say what and where."""
    where = f" writing {e.filename}" if e.filename else ""
    if e.errno in FULL:
        return (f"no space left on device{where}: free some space, then rerun the same command to continue "
                "(what was written is kept)")
    what = e.strerror or str(e) or type(e).__name__
    return f"{what}: {e.filename}" if e.filename else what


@contextmanager
def user_errors():
    from mlx_cai import ui
    from mlx_cai.chat import BackendError

    try:
        yield
    except (ValueError, BackendError, FileNotFoundError) as e:
        ui.fail(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    except OSError as e:
        ui.fail(os_error_line(e))
    except KeyboardInterrupt:
        ui.fail("interrupted; rerun the same command to continue where it stopped", code=130)
