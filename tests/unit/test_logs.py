"""Serve's failed-request logs: a request we refused is one line."""

import logging

from cluster.errors import InvalidRequest
from cluster.serving.logs import OneLineRefusals


class Wrapper(Exception):  # as Serve wraps a user's exception, keeping it as an attribute
    def __init__(self, original):
        super().__init__("wrapped")
        self.original_exception = original


def _record(error: Exception) -> logging.LogRecord:
    return logging.LogRecord("ray.serve", logging.ERROR, __file__, 1, "Request failed.", (),
                             (type(error), error, None))


def test_a_refused_request_is_one_line_naming_why():
    record = _record(Wrapper(InvalidRequest("max_tokens must be in [1, 64]")))
    assert OneLineRefusals().filter(record)
    assert record.exc_info is None and record.levelno == logging.INFO
    assert record.getMessage() == "Request failed. InvalidRequest: max_tokens must be in [1, 64]"


def test_any_other_failure_keeps_its_traceback():
    record = _record(Wrapper(KeyError("x")))
    assert OneLineRefusals().filter(record) and record.exc_info is not None and record.levelno == logging.ERROR
