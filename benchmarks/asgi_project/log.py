"""One line per server error, so the harness can say *why* requests failed."""

from __future__ import annotations

import logging


class OneLineErrors(logging.Filter):
    """Fold the exception into the message and drop the traceback.

    Under load a failing mode (stock Django out of connections) logs hundreds
    of errors a second; formatting a traceback for each would cost the server
    more CPU than the requests, and the harness only needs the message.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            record.msg = f"{record.getMessage()}: {type(exc).__name__}: {first_line}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True
