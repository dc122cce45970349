"""Inspect the delivery spool: stats, dead letters, and putting them back in line.

``stag-relay [--config PATH] spool stats|list-dead|requeue-dead``, on the spool file
named by the relay's configuration (``delivery.spool_path``) or by ``--spool PATH``. Safe to run
beside a running relay: SQLite serialises the writes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import attrs

from stag_relay.pipeline.spool import DeadLetter, Spool, SpoolCorrupt, SpoolStats
from stag_relay.service.config import ConfigError, load_config


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action",
        choices=["stats", "list-dead", "requeue-dead"],
        help="stats: what the spool holds; list-dead: batches STAG refused; "
        "requeue-dead: send those again (after fixing what STAG objected to)",
    )
    parser.add_argument("--spool", metavar="PATH", help="spool file (default: delivery.spool_path)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--limit", type=int, default=100, help="list-dead: most rows shown")


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def run(args: argparse.Namespace) -> int:
    path = args.spool
    if path is None:
        try:
            path = load_config(
                config_path=args.config, environ=os.environ
            ).config.delivery.spool_path
        except ConfigError as exc:
            print(f"stag-relay: invalid configuration\n{exc}", file=sys.stderr)
            return 2
    if not path:
        print(
            "stag-relay spool: no spool configured (set delivery.spool_path, or pass --spool PATH)",
            file=sys.stderr,
        )
        return 2
    if not Path(path).exists():
        print(f"stag-relay spool: {path}: no such file", file=sys.stderr)
        return 1
    try:
        spool = Spool(path)
    except SpoolCorrupt as exc:
        print(f"stag-relay spool: {exc}", file=sys.stderr)
        return 1
    try:
        if args.action == "stats":
            stats = spool.stats()
            if args.json:
                print(json.dumps({"path": str(path), **vars_of(stats)}))
            else:
                print(f"spool        {path}")
                print(f"batches      {stats.batches} ({stats.events} events, {stats.bytes} bytes)")
                print(f"oldest       {_when(stats.oldest_created)}")
                print(
                    f"dead letters {stats.dead_letters} "
                    f"({stats.dead_letter_events} events, {stats.dead_letter_bytes} bytes)"
                )
        elif args.action == "list-dead":
            rows = spool.dead_letters(args.limit)
            if args.json:
                print(json.dumps([vars_of(row) for row in rows]))
            else:
                for row in rows:
                    print(
                        f"{row.seq}\t{row.batch_id}\t{row.count} events\tHTTP {row.status}\t"
                        f"failed {_when(row.failed)}\t{row.answer[:80]!r}"
                    )
                if not rows:
                    print("no dead letters")
        else:
            count = spool.requeue_dead()
            print(
                json.dumps({"requeued": count})
                if args.json
                else f"requeued {count} batches; the relay sends them after what is already waiting"
            )
    finally:
        spool.close()
    return 0


def vars_of(value: SpoolStats | DeadLetter) -> dict[str, object]:
    return attrs.asdict(value)
