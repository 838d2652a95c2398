"""Serve logs every failed request with its traceback, in the replica and again in the proxy. A request we
refused on purpose (a ServingError: bad input, no credential, overload, a lost expert) is one line instead."""

import logging

from cluster.errors import ServingError

SERVE_LOGGER = "ray.serve"


class OneLineRefusals(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        refusal = _serving_error(record.exc_info[1] if record.exc_info else None)
        if refusal is not None:
            record.msg, record.args = f"{record.getMessage()} {type(refusal).__name__}: {refusal}", ()
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def one_line_refusals() -> None:
    """In this process (a serving replica or a proxy), once."""
    logger = logging.getLogger(SERVE_LOGGER)
    if not any(isinstance(f, OneLineRefusals) for f in logger.filters):
        logger.addFilter(OneLineRefusals())


def _serving_error(error: BaseException | None, depth: int = 6) -> ServingError | None:
    """The ServingError behind `error`, through Serve's and Ray's wrappers."""
    for _ in range(depth):
        if error is None or isinstance(error, ServingError):
            return error
        error = (getattr(error, "original_exception", None) or getattr(error, "cause", None) or error.__cause__
                 or error.__context__)
    return None
