"""Where a warning points: the user's line, past the library's own frames."""

from __future__ import annotations

import os
import sys


def stacklevel_outside(folder: str) -> int:
    """warnings.warn's stacklevel, for a warn called by this function's caller, of the first frame whose file is
    outside ``folder``: the user's line whatever chain of calls inside the folder led there (a fixed stacklevel
    pointed inside the library for some of them; Python's default filters show a DeprecationWarning only when it
    is attributed to __main__)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.dirname(frame.f_code.co_filename) == folder:
        frame, level = frame.f_back, level + 1
    return level
