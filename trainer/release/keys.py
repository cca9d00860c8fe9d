"""Signing keys of the release repository behind a small signer interface.

Each key is referenced by a private-key URI in ``signers.json`` (keyid -> URI). Today the URIs are
``file2:/path/key.pem`` (securesystemslib's CryptoSigner: a PKCS#8 PEM file written with mode 0600 in a
0700 directory, refused if anyone else can read it). Because signers are loaded with
``securesystemslib.signer.Signer.from_priv_key_uri``, a key can move to an HSM or a cloud KMS later by
changing its URI (``hsm:``, ``gcpkms:``, ``awskms:``, ...) without touching the repository code.
Offline keys (root, top-level targets) can live in another directory, e.g. on removable media, and
are only needed for root and delegation changes.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from securesystemslib.signer import CryptoSigner, Key, Signer

from edge_agent.files import write_json_atomic
from trainer.errors import KeyStoreError


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, 0o600)


def check_private_file(path: Path) -> None:
    """Refuse a private key file that group or others can access (like ssh does)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise KeyStoreError(f"{path}: private key not found (offline key not mounted?)") from None
    if stat.S_IMODE(mode) & 0o077:
        raise KeyStoreError(f"{path}: permissions {oct(stat.S_IMODE(mode))} are too open; chmod 600 {path}")


class KeyStore:
    """Private-key URIs by keyid, and key generation into a directory."""

    def __init__(self, index: Path, default_dir: Path) -> None:
        self.index = Path(index)
        self.default_dir = Path(default_dir)

    def _load(self) -> dict[str, dict[str, str]]:
        try:
            return json.loads(self.index.read_text())
        except FileNotFoundError:
            return {}

    def uris(self) -> dict[str, dict[str, str]]:
        """keyid -> {"role": ..., "uri": ...} of every key this repository can sign with."""
        return self._load()

    def generate(self, role: str, directory: Path | None = None) -> Key:
        """A new ed25519 key for ``role``: the private key goes to a 0600 file, the public key is returned."""
        signer = CryptoSigner.generate_ed25519()
        key = signer.public_key
        d = Path(directory) if directory else self.default_dir
        path = (d / f"{role}-{key.keyid[:12]}.pem").resolve()
        _write_private(path, signer.private_bytes)
        entries = self._load()
        entries[key.keyid] = {"role": role, "uri": f"file2:{path}"}
        write_json_atomic(self.index, entries)
        os.chmod(self.index, 0o600)
        return key

    def has(self, keyid: str) -> bool:
        """Whether the private key is usable here (file keys: the file is present, e.g. media mounted)."""
        entry = self._load().get(keyid)
        if entry is None:
            return False
        uri = entry["uri"]
        return not uri.startswith("file2:") or Path(uri[len("file2:") :]).exists()

    def signer(self, key: Key) -> Signer:
        """The signer of public ``key`` (file keys are permission-checked first)."""
        entry = self._load().get(key.keyid)
        if entry is None:
            raise KeyStoreError(f"no private key for keyid {key.keyid[:12]}... in {self.index}")
        uri = entry["uri"]
        if uri.startswith("file2:"):
            check_private_file(Path(uri[len("file2:") :]))
        try:
            return Signer.from_priv_key_uri(uri, key)
        except Exception as exc:  # noqa: BLE001 - any backend failure is one clear error
            raise KeyStoreError(f"cannot load signer {uri}: {type(exc).__name__}: {exc}") from None

    def retire(self, keyid: str) -> None:
        """Forget a key (after rotation): its file moves to ``retired/`` beside it, still mode 0600."""
        entries = self._load()
        entry = entries.pop(keyid, None)
        if entry is None:
            return
        uri = entry["uri"]
        if uri.startswith("file2:"):
            path = Path(uri[len("file2:") :])
            if path.exists():
                retired = path.parent / "retired"
                retired.mkdir(mode=0o700, exist_ok=True)
                os.replace(path, retired / path.name)
        write_json_atomic(self.index, entries)
