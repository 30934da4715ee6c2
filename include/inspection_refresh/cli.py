"""``inspection-publish``: list, roll back (and pin), unpin or push published versions; ``pull`` is the
serving hosts' node agent (:mod:`inspection_refresh.agent`); ``keygen`` makes a release-signing key pair::

    inspection-publish list     --root /data/inspection/clip_index --name normal
    inspection-publish rollback --root /data/inspection/clip_index --name normal [--to VERSION]
    inspection-publish unpin    --root /data/inspection/clip_index --name normal
    inspection-publish push     --root /data/inspection/clip_index --name normal [--to VERSION]
    inspection-publish pull     [--artefact clip:normal ...] [--watch --interval 60]   (serving hosts)
    inspection-publish keygen   --out DIR                                             (anywhere)

Everything but ``pull`` and ``keygen`` runs where Airflow runs (the release channel comes from its
connections); ``pull`` imports nothing of Airflow unless ``--conn-id`` asks for an Airflow connection.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from inspection_refresh import compose
from inspection_refresh.config import get_settings
from inspection_refresh.publish import OLD_RELEASES_DIR, Publisher, PublishError, cli_user, describe_pin
from inspection_refresh.registry import RegistryError
from inspection_refresh.signing import SignatureError, write_key_pair
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
    if kind is None:
        return Publisher(root, keep=settings.keep_versions, releases=releases)
    return compose.publisher(kind, root, releases, settings)  # with the channel and the hosts' shared lock


def keygen(argv: list[str]) -> int:
    """``inspection-publish keygen --out DIR``: a new Ed25519 key pair to sign releases with."""
    parser = argparse.ArgumentParser(
        prog="inspection-publish keygen",
        description="Make an Ed25519 key pair for signed releases: the private key goes into the Airflow "
                    "connection INSPECTION_SIGNING_CONN_ID names, the public key onto each serving host "
                    "(inspection-publish pull --trusted-key).")
    parser.add_argument("--out", required=True, type=Path,
                        help="directory for release-signing.key (mode 0600) and release-signing.pub; "
                             "existing keys are never overwritten")
    args = parser.parse_args(argv)
    try:
        private, public, kid = write_key_pair(args.out)
    except (SignatureError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"key {kid}\n"
          f"  private: {private} (secret; put it into the signing connection, then delete the file):\n"
          f"    airflow connections add release_signing --conn-type generic --conn-password \"$(cat {private})\"\n"
          f"    and INSPECTION_SIGNING_CONN_ID=release_signing on every Airflow node\n"
          f"  public:  {public} (copy onto each serving host: inspection-publish pull --trusted-key {public.name})")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["keygen"]:
        return keygen(argv[1:])
    if argv[:1] == ["pull"]:  # the node agent has its own options
        from inspection_refresh import (
            agent,  # needs boto3 only: serving hosts have no Airflow
        )

        return agent.main(argv[1:], connection_storage=_connection_storage)

    parser = argparse.ArgumentParser(prog="inspection-publish",
                                     description="List, roll back (and pin), unpin or push published versions; "
                                                 "'inspection-publish pull --help': the serving hosts' agent; "
                                                 "'inspection-publish keygen --help': a release-signing key pair.")
    parser.add_argument("action", choices=["list", "rollback", "unpin", "push", "pull", "keygen"],
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
    if args.action in ("pull", "keygen"):
        parser.error(f"'{args.action}' takes its own options and comes first: inspection-publish {args.action} --help")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        publisher = _cli_publisher(args.root, args.releases, args.kind)
        unpin_command = f"inspection-publish unpin --root {args.root} --name {args.name}"
        if args.action == "rollback":
            release = publisher.rollback(args.name, args.to, pinned_by=cli_user())
            print(f"{args.name}: live version is now {release.version}, pinned: scheduled runs leave it alone "
                  f"until a manual run publishes a new version or '{unpin_command}'")
        elif args.action == "push":
            version = args.to or publisher.current(args.name)
            publisher.push(args.name, version or "", by=cli_user())
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
    except (PublishError, StorageError, RegistryError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
