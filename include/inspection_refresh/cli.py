"""``inspection-publish``: list, roll back (and pin), unpin or push published versions; ``pull`` is the
serving hosts' node agent (:mod:`inspection_refresh.agent`)::

    inspection-publish list     --root /data/inspection/clip_index --name normal
    inspection-publish rollback --root /data/inspection/clip_index --name normal [--to VERSION]
    inspection-publish unpin    --root /data/inspection/clip_index --name normal
    inspection-publish push     --root /data/inspection/clip_index --name normal [--to VERSION]
    inspection-publish pull     [--artefact clip:normal ...] [--watch --interval 60]   (serving hosts)

Everything but ``pull`` runs where Airflow runs (the release channel comes from its connections);
``pull`` imports nothing of Airflow unless ``--conn-id`` asks for an Airflow connection.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from inspection_refresh import compose
from inspection_refresh.config import get_settings
from inspection_refresh.publish import OLD_RELEASES_DIR, Publisher, PublishError, cli_user, describe_pin
from inspection_refresh.storage import ObjectStorage, StorageError

log = logging.getLogger(__name__)


def _connection_storage(conn_id: str, bucket: str | None, transfers: int) -> ObjectStorage:
    """The agent's ``--conn-id``: the release channel's bucket through an Airflow connection."""
    return compose.object_storage(conn_id, bucket, max_transfers=transfers)


def _cli_publisher(root: str, releases: str | None, kind: str | None) -> Publisher:
    """The Publisher of ``root``, with the release channel when ``INSPECTION_PUBLISH_TARGETS`` includes it:
    of ``kind``, or of the configured root that ``root`` is (``INSPECTION_INDEX_ROOT``: clip, ...)."""
    settings = get_settings()
    if kind is None:
        roots = {os.path.realpath(settings.index_root): "clip", os.path.realpath(settings.patchcore_root): "patchcore"}
        kind = roots.get(os.path.realpath(root))
    channel = compose.release_channel(kind, settings) if kind else None
    return Publisher(root, keep=settings.keep_versions, releases=releases, channel=channel)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["pull"]:  # the node agent has its own options
        from inspection_refresh import (
            agent,  # needs boto3 only: serving hosts have no Airflow
        )

        return agent.main(argv[1:], connection_storage=_connection_storage)

    parser = argparse.ArgumentParser(prog="inspection-publish",
                                     description="List, roll back (and pin), unpin or push published versions; "
                                                 "'inspection-publish pull --help': the serving hosts' agent.")
    parser.add_argument("action", choices=["list", "rollback", "unpin", "push", "pull"],
                        help="rollback also pins the version: scheduled runs leave it alone until it is unpinned "
                             "or a manual run publishes a new version; push: make the live (or --to) version the "
                             "release channel's current one")
    parser.add_argument("--root", required=True, help="index root or PatchCore root")
    parser.add_argument("--releases", help="where versions are kept (default: <root>.releases beside the root)")
    parser.add_argument("--name", required=True, help="normal, defect, or a product code")
    parser.add_argument("--to", help="version to re-publish (default: the one before the live version)")
    parser.add_argument("--kind", choices=["clip", "patchcore"],
                        help="release channel of the root (default: from INSPECTION_INDEX_ROOT / INSPECTION_PATCHCORE_ROOT)")
    args = parser.parse_args(argv)
    if args.action == "pull":
        parser.error("'pull' takes its own options and comes first: inspection-publish pull --help")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        publisher = _cli_publisher(args.root, args.releases, args.kind)
        unpin_command = f"inspection-publish unpin --root {args.root} --name {args.name}"
        if args.action == "rollback":
            release = publisher.rollback(args.name, args.to, pinned_by=cli_user())
            print(f"{args.name}: live version is now {release.version}, pinned: scheduled runs leave it alone "
                  f"until a manual run publishes a new version or '{unpin_command}'")
        elif args.action == "push":
            if publisher.channel is None:
                raise PublishError("no release channel: set INSPECTION_PUBLISH_TARGETS to channel or both "
                                   "(and --kind unless --root is a configured root)")
            version = args.to or publisher.current(args.name)
            if version not in publisher.versions(args.name):
                raise PublishError(f"{args.name}: version {version} is not kept under {publisher.releases}")
            publisher.channel.make_current(args.name, version, publisher.releases / args.name / version,
                                           by=cli_user(), action="push")
            print(f"{args.name}: the release channel's current version is now {version}")
        elif args.action == "unpin":
            pin = publisher.unpin(args.name)
            print(f"{args.name}: unpinned (was {describe_pin(pin)})" if pin else f"{args.name}: was not pinned")
        else:
            if (publisher.root / OLD_RELEASES_DIR).is_dir():
                print(f"note: {publisher.root} still has the old layout; the next publish or rollback moves "
                      f"its versions to {publisher.releases}", file=sys.stderr)
            pin = publisher.pinned(args.name)
            if pin:
                print(f"{args.name} is {describe_pin(pin)}; scheduled runs skip it ('{unpin_command}' to undo)")
            if publisher.channel is not None:
                pointer = publisher.channel.pointer(args.name)
                print(f"release channel {publisher.channel.url(publisher.channel.name_prefix(args.name))}: current "
                      f"{pointer['version'] if pointer else 'none'}; versions: "
                      f"{', '.join(publisher.channel.versions(args.name)) or 'none'}")
            live = publisher.current(args.name)
            for version in publisher.versions(args.name):
                print(f"{'*' if version == live else ' '} {version}")
    except (PublishError, StorageError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
