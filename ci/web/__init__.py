"""`tinyci web`: the web page, JSON API, badges and metrics, as a process of
its own that reads the dispatcher like the console does (role reader).

This module holds only the command line; ``app`` (and aiohttp) is imported
when the command runs, so `tinyci --help` does not pay for it.
"""

from __future__ import annotations

import argparse

DEFAULT_PORT = 8080


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="address to listen on (default web.host, 127.0.0.1); another than "
                                       "loopback needs a login (web.users or web.token) or --insecure")
    parser.add_argument("--port", type=int,
                        help=f"port to listen on; 0 picks a free one (default web.port, {DEFAULT_PORT})")
    parser.add_argument("--dispatcher", metavar="HOST:PORT",
                        help="the dispatcher to read (default web.dispatcher, else dispatcher.host:port)")
    parser.add_argument("--config", metavar="FILE",
                        help="YAML configuration file (default: $TINYCI_CONFIG, else built-in defaults)")
    parser.add_argument("--insecure", action="store_true",
                        help="listen on a non-loopback --host with no login configured (anyone who "
                             "reaches the port can then read every build, log and artifact)")
    parser.add_argument("--hash-password", action="store_true",
                        help="read a password (from the terminal, or one line of stdin) and print the "
                             "hash to put in web.users; then exit")
    from .. import daemon
    daemon.add_logging_arguments(parser)            # -v, --log-file: as every daemon


def main(args: argparse.Namespace) -> int:
    if args.hash_password:
        from .auth import hash_password
        import getpass
        import sys
        password = getpass.getpass("password: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\n")
        if not password:
            print("tinyci web: an empty password cannot be used", file=sys.stderr)
            return 2
        print(hash_password(password))
        return 0
    from .app import main as run
    return run(args)
