"""CLI command modules. Each imports `app` from mlx_cai.cli and decorates its commands with @app.command().

Errors the user can fix are library exceptions (ValueError subclasses, BackendError); wrap the body in
`with user_errors():` so they become one red line and exit 1.
"""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def user_errors():
    from mlx_cai import ui
    from mlx_cai.chat import BackendError

    try:
        yield
    except (ValueError, BackendError, FileNotFoundError) as e:
        ui.fail(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    except KeyboardInterrupt:
        ui.fail("interrupted; rerun the same command to continue where it stopped", code=130)
