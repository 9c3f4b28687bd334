"""Operator CLI: ``sm-admin workers | map | drain <worker> [--undo] | move <shard> <worker>``.

It asks the leading supervisor over NATS (``sm.admin.*``), so it works from any machine that
can reach NATS; ``NATS_URL`` (and ``NATS_USER``/``NATS_PASSWORD``) as for the services.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import msgspec
import nats

from sessionmgr.common import subjects
from sessionmgr.common.models import AdminReply, ClusterStatus, DrainWorker, MoveShard, json_encoder
from sessionmgr.common.natsauth import connect_options, role_credentials
from sessionmgr.common.settings import SettingsError, load_settings

_status_decoder = msgspec.json.Decoder(ClusterStatus)
_reply_decoder = msgspec.json.Decoder(AdminReply)


def _print_workers(status: ClusterStatus) -> None:
    print(f"leader: {status.leader} (term {status.term})")
    header = f"{'WORKER':<28} {'PID':>7} {'HOST':<16} {'SHARDS':>6} {'SESSIONS':>8} {'IN-FLIGHT':>9} {'LAST BEAT':>9}  STATE"
    print(header)
    for w in status.workers:
        state = "dead" if not w.live else ("draining" if w.draining else "live")
        print(
            f"{w.worker_id:<28} {w.pid:>7} {w.host[:16]:<16} {len(w.shards):>6} {w.sessions:>8} {w.in_flight:>9} "
            f"{w.last_heartbeat_age_s:>8.2f}s  {state}"
        )


def _print_map(status: ClusterStatus) -> None:
    shard_map = status.shard_map
    print(f"term {shard_map.term}, updated {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(shard_map.updated_at))}")
    if shard_map.drained:
        print(f"drained: {', '.join(shard_map.drained)}")
    print(f"{'SHARD':>5}  {'OWNER':<28} {'EPOCH':>15}  PINNED")
    for index, entry in enumerate(shard_map.shards):
        pinned = "yes" if shard_map.pinned.get(index) else ""
        print(f"{index:>5}  {entry.owner or '-':<28} {entry.epoch:>15}  {pinned}")


async def _run(args: argparse.Namespace) -> int:
    settings = load_settings()
    if settings.nats_user is None and settings.is_development:
        # `make admin` against `make run`: the development password of nats.conf's cli user.
        creds = role_credentials("cli")
        settings = settings.with_overrides(nats_user=creds["user"], nats_password=creds["password"])
    nc = await nats.connect(settings.nats_url, name="sm-admin", **connect_options(settings), connect_timeout=3, max_reconnect_attempts=1)
    try:
        if args.command in ("workers", "map"):
            msg = await nc.request(subjects.ADMIN_STATUS, b"", timeout=args.timeout)
            status = _status_decoder.decode(msg.data)
            if args.json:
                print(msg.data.decode())
            else:
                (_print_workers if args.command == "workers" else _print_map)(status)
            return 0
        if args.command == "drain":
            payload = json_encoder.encode(DrainWorker(worker_id=args.worker, undrain=args.undo))
            msg = await nc.request(subjects.ADMIN_DRAIN, payload, timeout=args.timeout)
        else:
            payload = json_encoder.encode(MoveShard(shard=args.shard, worker_id=args.worker))
            msg = await nc.request(subjects.ADMIN_MOVE, payload, timeout=args.timeout)
        reply = _reply_decoder.decode(msg.data)
        print(reply.detail)
        return 0 if reply.ok else 1
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
        print("no supervisor leader answered; is a supervisor running?", file=sys.stderr)
        return 2
    finally:
        await nc.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sm-admin", description="Inspect and steer the Session Manager cluster.")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the leader (default 3)")
    commands = parser.add_subparsers(dest="command", required=True)
    workers = commands.add_parser("workers", help="list workers: id, pid, host, shards, sessions, in-flight, last heartbeat")
    workers.add_argument("--json", action="store_true")
    shard_map = commands.add_parser("map", help="show the shard map with owners and epochs")
    shard_map.add_argument("--json", action="store_true")
    drain = commands.add_parser("drain", help="move every shard off a worker (it keeps running, owning nothing)")
    drain.add_argument("worker")
    drain.add_argument("--undo", action="store_true", help="let the worker take shards again")
    move = commands.add_parser("move", help="move one shard to a worker (pinned there while it lives)")
    move.add_argument("shard", type=int)
    move.add_argument("worker")
    args = parser.parse_args(argv)
    try:
        sys.exit(asyncio.run(_run(args)))
    except SettingsError as exc:
        sys.exit(str(exc))


if __name__ == "__main__":
    main()
