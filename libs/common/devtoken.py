"""Mint a development JWT: ``make token USER=alice`` or ``sm-token alice --scope 'sessions:admin'``."""

from __future__ import annotations

import argparse
import sys

from sessionmgr.common.settings import SettingsError, load_settings
from sessionmgr.gateway.auth import mint_token


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print a signed development token for the gateway.")
    parser.add_argument("user", help="the user ID, put in the token's sub claim")
    parser.add_argument("--scope", default=None, help="space-separated scopes, e.g. 'sessions:read' or 'sessions:admin'")
    parser.add_argument("--ttl", type=int, default=24 * 3600, help="lifetime in seconds (default one day)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        sys.exit(str(exc))
    print(mint_token(settings.jwt_secret, args.user, ttl_s=args.ttl, scope=args.scope))


if __name__ == "__main__":
    main()
