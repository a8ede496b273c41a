"""Logging of the asyncrlhf processes: what reaches a person's console, what goes to the logs.

Two audiences. A person at the console of `asyncrlhf run` (or any command) wants our own
warnings and errors, not the INFO lines and warnings of the libraries underneath (vLLM,
DeepSpeed, transformers, matplotlib): `console_logging` lets through only `asyncrlhf.*`
warnings and anything at ERROR; `-v` shows everything. Libraries that bring their own console
handler (DeepSpeed, vLLM and transformers do) are held to the same rule: handlers they attach to
stdout/stderr get the same filter (`_GuardedLogger`).

The per-process logs (`runs/<job>/<role>-<i>.log`, a pod's log) keep everything, but a warning
repeated word for word — vLLM's `RotaryEmbedding: Failed to load weights` comes once per weight
reload — is written once, then as a count at 10, 100, 1000, ... repeats (`RepeatFilter`).
vLLM configures its own logging in each of its processes (the engine core, the workers); it is
given a configuration that carries the same filter (VLLM_LOGGING_CONFIG_PATH).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Optional

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
OWN = "asyncrlhf"  # our loggers: asyncrlhf.*, asyncrlhf_operator.*
MAX_REMEMBERED = 10_000  # distinct repeated messages tracked per process
VLLM_CONFIG = "VLLM_LOGGING_CONFIG_PATH"
STATS_LOGGER = "vllm.v1.metrics.loggers"  # vLLM's stats loggers (the periodic log line, Prometheus)


class RepeatFilter(logging.Filter):
    """Collapse warnings (and errors) repeated word for word: the first passes, the next ones are
    counted and let through only as '(repeated N times)' at N = 10, 100, 1000, ..."""

    def __init__(self, name: str = "") -> None:
        super().__init__(name)
        self.seen: dict[tuple[str, int, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.levelno, record.getMessage())
        count = self.seen.get(key, 0) + 1
        if count == 1 and len(self.seen) >= MAX_REMEMBERED:
            return True  # too many distinct messages to remember: pass them all
        self.seen[key] = count
        if count == 1:
            return True
        if not _power_of_ten(count):
            return False
        record.msg, record.args = f"{key[2]} (repeated {count} times so far; identical repeats are counted, not written)", None
        return True


def _power_of_ten(n: int) -> bool:
    while n >= 10 and n % 10 == 0:
        n //= 10
    return n == 1


class ConsoleFilter(logging.Filter):
    """What a person sees by default: our warnings and errors, and anyone's errors."""

    def __init__(self, verbose: bool = False) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if self.verbose:
            return True
        if record.levelno >= logging.ERROR:
            return True
        return record.levelno >= logging.WARNING and record.name.startswith(OWN)


_console_filter = ConsoleFilter()


def _guard(handler: logging.Handler) -> None:
    if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) in (sys.stdout, sys.stderr):
        if _console_filter not in handler.filters:
            handler.addFilter(_console_filter)


class _GuardedLogger(logging.Logger):
    """A library's own console handler (DeepSpeed, vLLM, transformers attach one at import) gets
    the console filter, so its INFO lines and warnings stay off the console unless -v."""

    def addHandler(self, hdlr: logging.Handler) -> None:  # noqa: N802 -- logging's name
        if not self.name.startswith(OWN):
            _guard(hdlr)
        super().addHandler(hdlr)


def console_logging(verbose: bool = False, level: int = logging.INFO) -> None:
    """The `asyncrlhf` command's own process: one stderr handler; third-party noise off unless
    `verbose` (then DEBUG and everything)."""
    _console_filter.verbose = verbose
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT if verbose else "%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_console_filter)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else level)
    logging.captureWarnings(True)  # warnings.warn from libraries (matplotlib, torch) become records: filtered too
    logging.setLoggerClass(_GuardedLogger)
    for name, logger in list(logging.Logger.manager.loggerDict.items()):  # libraries imported already
        if isinstance(logger, logging.Logger) and not name.startswith(OWN):
            for h in logger.handlers:
                _guard(h)


def add_file_log(path: Path, level: int = logging.INFO) -> logging.Handler:
    """Everything this process logs at `level` and above, also into `path` (remove_log undoes it)."""
    handler = logging.FileHandler(path)
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(RepeatFilter())
    logging.getLogger().addHandler(handler)
    return handler


def remove_log(handler: logging.Handler) -> None:
    logging.getLogger().removeHandler(handler)
    handler.close()


def workload_logging(verbose: bool = False) -> None:
    """A generator or learner process (locally, its stdout is its log file; in a pod, the pod's
    log): everything at INFO (DEBUG with `verbose`), repeated warnings collapsed, Python warnings
    as log records, and vLLM's processes configured with the same filter."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(RepeatFilter())
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.captureWarnings(True)
    if VLLM_CONFIG not in os.environ and os.environ.get("VLLM_CONFIGURE_LOGGING", "1") != "0":
        os.environ[VLLM_CONFIG] = str(write_vllm_config(verbose))


def vllm_config(verbose: bool = False) -> dict:
    """vLLM's own logging configuration (its format, stdout) with RepeatFilter on its handler."""
    level = "DEBUG" if verbose else "INFO"
    return {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"vllm": {"()": "vllm.logging_utils.NewLineFormatter", "log_level": level,
                                "format": "(%(vllm_process_name)s pid=%(process)d) %(levelname)s %(asctime)s "
                                          "[%(fileinfo)s:%(lineno)d] %(message)s",
                                "datefmt": "%m-%d %H:%M:%S"}},
        "filters": {"repeats": {"()": f"{__name__}.RepeatFilter"}},
        "handlers": {"vllm": {"class": "logging.StreamHandler", "formatter": "vllm", "level": level,
                              "stream": "ext://sys.stdout", "filters": ["repeats"]}},
        "loggers": {"vllm": {"handlers": ["vllm"], "level": level, "propagate": False},
                    # its periodic stats line ("Avg prompt throughput ...", every 10 s while generating):
                    # the numbers are on /metrics (telemetry.py), and vLLM creates that logger only
                    # when this one logs INFO
                    STATS_LOGGER: {"level": level if verbose else "WARNING"}},
    }


def write_vllm_config(verbose: bool = False) -> Path:
    """The configuration as a file (vLLM reads a path); one per content, written atomically."""
    text = json.dumps(vllm_config(verbose), sort_keys=True)
    path = Path(tempfile.gettempdir()) / f"asyncrlhf-vllm-logging-{os.getuid()}-{'debug' if verbose else 'info'}.json"
    if not path.exists() or path.read_text() != text:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".asyncrlhf-vllm-logging-")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------
# Reading a process's log after it failed

_EXCEPTION = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Exit|Interrupt|Failure)\b(?::\s?.*)?$")
_ERROR_RECORD = re.compile(r"\b(?:ERROR|CRITICAL)\b\s+\S+:\s(.+)$")
TAIL_BYTES = 64 << 10


def last_error(log: Path) -> Optional[str]:
    """The last error a process wrote (an exception's `Type: message` line, an `error: ...` line
    of the CLI, an ERROR record), from the end of its log; None when there is none."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - TAIL_BYTES))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        text = line.strip()
        if text.startswith("error: "):
            return text.removeprefix("error: ")
        if _EXCEPTION.match(text):
            return text
        if match := _ERROR_RECORD.search(text):
            return match.group(1)
    return None
