"""`init_logger` with vLLM's `info_once` / `warning_once`."""

import logging
from functools import cache


class _Logger(logging.LoggerAdapter):
    @cache  # noqa: B019 - once per message, as vLLM's
    def info_once(self, msg: str) -> None:
        self.info(msg)

    @cache  # noqa: B019
    def warning_once(self, msg: str) -> None:
        self.warning(msg)


def init_logger(name: str) -> _Logger:
    return _Logger(logging.getLogger(name), {})
