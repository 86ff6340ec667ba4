"""What every daemon shares: common flags, logging, the ready line, signal
handling, and start-up errors printed as one line instead of a traceback."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import signal
import sys
from typing import Any, Awaitable, Callable, Mapping

from .config import Config, ConfigError, load


class StartupError(Exception):
    """A daemon cannot start; the message names what is wrong and is printed as is."""


def add_common_arguments(parser: argparse.ArgumentParser, default_port: int) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help="YAML configuration file (default: $TINYCI_CONFIG, else built-in defaults)")
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int,
                        help=f"port to listen on; 0 picks a free one (default {default_port})")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")


def load_config(args: argparse.Namespace, overrides: Mapping[str, Mapping[str, Any]]) -> Config:
    try:
        config = load(args.config, overrides=overrides)
        config.secret  # read a secret_file now, so a bad one fails at start-up
        return config
    except ConfigError as exc:
        raise StartupError(f"configuration error: {exc}") from None


def setup_logging(name: str, verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
        format=f"%(asctime)s {name} %(levelname)s %(message)s", datefmt="%H:%M:%S", force=True)


def announce(name: str, host: str, port: int, extra: str = "") -> None:
    """The one ready line tests and `tinyci up` wait for."""
    print(f"tinyci {name} listening on {host}:{port}{extra}", flush=True)


async def listen(start: Callable[[], Awaitable[Any]], what: str, host: str, port: int) -> Any:
    """Start a server, turning the usual bind failures into a StartupError naming the address."""
    try:
        return await start()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(f"{what}: port {port} on {host} is already in use "
                               f"(pick another with --port, or 0 for any free port)") from None
        if exc.errno in (errno.EADDRNOTAVAIL, errno.EACCES):
            raise StartupError(f"{what}: cannot listen on {host}:{port}: {exc.strerror}") from None
        raise StartupError(f"{what}: cannot listen on {host}:{port}: {exc}") from None


def run(name: str, body: Callable[[asyncio.Event], Awaitable[None]], verbose: bool = False) -> int:
    """Run ``body(stop)`` until it returns; SIGINT/SIGTERM only set ``stop``."""
    setup_logging(name, verbose)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await body(stop)

    try:
        asyncio.run(main())
    except StartupError as exc:
        print(f"tinyci {name}: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        pass
    logging.getLogger(f"ci.{name}").info("stopped")
    return 0
