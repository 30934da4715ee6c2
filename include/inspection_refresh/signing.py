"""Ed25519 signatures of release manifests: the Airflow side signs, serving hosts verify.

Whoever can write the bucket can rewrite a version's objects, its manifest and ``current.json``
together; the sha256 checks then pass. A signature made with a private key that only the Airflow
side holds (``INSPECTION_SIGNING_CONN_ID``) lets a serving host that was given the public key
(``inspection-publish pull --trusted-key``) tell a release of this system from anything else.

A signature document (``<version>/.release-manifest.sig`` in the channel) is JSON::

    {"format": 1, "algorithm": "ed25519", "key_id": "<16 hex>", "manifest_sha256": "<hex>",
     "signature": "<base64 of the Ed25519 signature of the manifest's bytes>"}

``key_id`` is the first 16 hex digits of the sha256 of the raw public key: both sides derive it
from the key itself, so nothing has to be configured to match them, and several trusted keys
(rotation) are told apart. ``cryptography`` is imported only when a key is used, so hosts
that neither sign nor verify do not need it. Nothing here ever logs or repeats key material.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

FORMAT = 1
ALGORITHM = "ed25519"
INSTALL_HINT = 'pip install "inspection-refresh[agent]"'
PRIVATE_KEY_FILE = "release-signing.key"
PUBLIC_KEY_FILE = "release-signing.pub"


class SignatureError(ValueError):
    """A key cannot be used, or a signature does not prove that a trusted key signed the manifest."""


def _ed25519() -> Any:
    """The ``cryptography`` Ed25519 module (imported here only: serving hosts without keys do without it)."""
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise SignatureError(f"signing and verifying releases need the cryptography package: {INSTALL_HINT}") from None
    return ed25519


def _serialization() -> Any:
    _ed25519()
    from cryptography.hazmat.primitives import serialization

    return serialization


def key_id(public_key: Any) -> str:
    """The id of an Ed25519 public key: 16 hex digits of the sha256 of its raw bytes."""
    serialization = _serialization()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


class ManifestSigner:
    """Signs manifests with an Ed25519 private key, loaded on first use (a publish, never at start-up).

    :param load: returns the PEM (PKCS #8, unencrypted) private key, e.g. an Airflow connection's password.
    :param source: where the key comes from, for messages (never the key itself).
    """

    def __init__(self, load: Callable[[], bytes | str], source: str) -> None:
        self._load = load
        self.source = source
        self._key: Any = None

    def __repr__(self) -> str:  # the key stays out of reprs, tracebacks with locals and logs
        return f"ManifestSigner({self.source})"

    def _private_key(self) -> Any:
        if self._key is None:
            ed25519 = _ed25519()
            data = self._load()
            try:
                key = _serialization().load_pem_private_key(data.encode() if isinstance(data, str) else data,
                                                            password=None)
            except (ValueError, TypeError) as exc:  # the message of cryptography never quotes the key
                raise SignatureError(f"{self.source} does not hold a PEM private key ({type(exc).__name__}): "
                                     "make one with 'inspection-publish keygen --out DIR'") from None
            if not isinstance(key, ed25519.Ed25519PrivateKey):
                raise SignatureError(f"{self.source} holds a {type(key).__name__}, not an Ed25519 private key: "
                                     "make one with 'inspection-publish keygen --out DIR'")
            self._key = key
        return self._key

    @property
    def key_id(self) -> str:
        """The id of the public key that verifies this signer's signatures (loads the key)."""
        return key_id(self._private_key().public_key())

    def signed(self, manifest: bytes, signature: bytes) -> bool:
        """Whether ``signature`` is this signer's valid signature of ``manifest``."""
        try:
            TrustedKeys([self._private_key().public_key()]).verify(manifest, signature)
        except SignatureError:
            return False
        return True

    def sign(self, manifest: bytes) -> bytes:
        """The signature document (JSON bytes) of the manifest's exact bytes."""
        key = self._private_key()
        document = {"format": FORMAT, "algorithm": ALGORITHM, "key_id": key_id(key.public_key()),
                    "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
                    "signature": base64.b64encode(key.sign(manifest)).decode()}
        return (json.dumps(document, indent=2) + "\n").encode()


def signature_key_id(signature: bytes) -> str | None:
    """The ``key_id`` a signature document names, or ``None`` when it is not one."""
    try:
        document = json.loads(signature)
        return str(document["key_id"]) if isinstance(document, dict) and "key_id" in document else None
    except ValueError:
        return None


class TrustedKeys:
    """The public keys a serving host accepts releases from (several during a key rotation)."""

    def __init__(self, keys: Iterable[Any] = ()) -> None:
        self.keys = {key_id(key): key for key in keys}

    def __bool__(self) -> bool:
        return bool(self.keys)

    def __repr__(self) -> str:
        return f"TrustedKeys({', '.join(self.keys) or 'none'})"

    @classmethod
    def from_files(cls, paths: Iterable[str | os.PathLike]) -> TrustedKeys:
        """Keys from PEM public key files (``inspection-publish keygen`` writes one)."""
        keys = []
        for path in paths:
            ed25519 = _ed25519()
            try:
                key = _serialization().load_pem_public_key(Path(path).read_bytes())
            except OSError as exc:
                raise SignatureError(f"cannot read trusted key {path}: {exc.strerror or exc}") from None
            except (ValueError, TypeError) as exc:
                raise SignatureError(f"trusted key {path} is not a PEM public key ({type(exc).__name__}); give the "
                                     f"{PUBLIC_KEY_FILE} that 'inspection-publish keygen' wrote") from None
            if not isinstance(key, ed25519.Ed25519PublicKey):
                raise SignatureError(f"trusted key {path} is a {type(key).__name__}, not an Ed25519 public key")
            keys.append(key)
        return cls(keys)

    def verify(self, manifest: bytes, signature: bytes) -> str:
        """The id of the trusted key that signed ``manifest``; :class:`SignatureError` saying why not."""
        try:
            document = json.loads(signature)
            if not isinstance(document, dict):
                raise ValueError("not a JSON object")
            algorithm, kid, value = document.get("algorithm"), document.get("key_id"), document.get("signature")
            if algorithm != ALGORITHM or not isinstance(kid, str) or not isinstance(value, str):
                raise ValueError(f"algorithm {algorithm!r}, key_id {kid!r}: expected {ALGORITHM} with a key_id "
                                 "and a signature")
            raw = base64.b64decode(value, validate=True)
        except (ValueError, binascii.Error) as exc:
            raise SignatureError(f"the signature is not a valid signature document ({exc})") from None
        key = self.keys.get(kid)
        if key is None:
            raise SignatureError(f"signed with key {kid}, which this node does not trust (trusted: "
                                 f"{', '.join(self.keys) or 'none'})")
        from cryptography.exceptions import InvalidSignature

        try:
            key.verify(raw, manifest)
        except InvalidSignature:
            raise SignatureError(f"the signature of key {kid} does not match the manifest (altered after "
                                 "signing)") from None
        return kid


def generate_key_pair() -> tuple[bytes, bytes, str]:
    """A new Ed25519 key pair: ``(private PEM (PKCS #8, unencrypted), public PEM, key id)``."""
    ed25519, serialization = _ed25519(), _serialization()
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public, key_id(key.public_key())


def write_key_pair(directory: str | os.PathLike) -> tuple[Path, Path, str]:
    """Write a new key pair into ``directory`` (private key mode 0600); never overwrites a key.

    Returns ``(private key path, public key path, key id)``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    private_path, public_path = directory / PRIVATE_KEY_FILE, directory / PUBLIC_KEY_FILE
    for path in (private_path, public_path):
        if path.exists():
            raise SignatureError(f"{path} already exists: move it away or choose another --out directory")
    private, public, kid = generate_key_pair()
    # O_EXCL + 0600 from the start: the private key is never readable by others, not even for a moment.
    with os.fdopen(os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as handle:
        handle.write(private)
    public_path.write_bytes(public)
    return private_path, public_path, kid
