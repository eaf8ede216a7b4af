"""`python -m clients.keys`: make a CurveZMQ key pair for the server or for one robot.

    python -m clients.keys                          # print a pair (z85) and the config snippets
    python -m clients.keys --out keys --name server # also write keys/server.key and keys/server.key_secret
    python -m clients.keys --out keys --name robot-07

CurveZMQ encrypts the ZMQ connection and, with `ingress.curve.allowed_client_keys`, lets only robots whose
public key is listed connect at all (ZMQ refuses the others in its handshake: they simply get no reply).
A public key can be shared freely; a secret key never leaves its machine (the file is written 0600).

Files: `NAME.key` holds the public key, `NAME.key_secret` the secret key, each as one line of z85 text
(40 characters). Only numpy, pyzmq and msgpack are needed by clients/; this module needs pyzmq alone.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import zmq

__all__ = ["KeyPair", "generate_keypair", "write_keypair", "read_key", "config_snippet"]


@dataclass(frozen=True)
class KeyPair:
    public: str  # z85, 40 characters
    secret: str


def generate_keypair() -> KeyPair:
    """A fresh CurveZMQ key pair as z85 text. Raises RuntimeError when libzmq was built without CURVE."""
    if not zmq.has("curve"):
        raise RuntimeError("this libzmq has no CURVE support (it was built without libsodium/tweetnacl)")
    public, secret = zmq.curve_keypair()
    return KeyPair(public.decode("ascii"), secret.decode("ascii"))


def write_keypair(pair: KeyPair, out: str | os.PathLike, name: str, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write `out/NAME.key` (public) and `out/NAME.key_secret` (secret, mode 0600); return both paths."""
    if not name or "/" in name or os.sep in name or name in (".", ".."):
        raise ValueError(f"--name: expected a plain file name, got {name!r}")
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    public_path, secret_path = directory / f"{name}.key", directory / f"{name}.key_secret"
    if not overwrite:
        for p in (public_path, secret_path):
            if p.exists():
                raise FileExistsError(f"{p} exists; pass --force to replace it (robots holding the old key stop working)")
    public_path.write_text(pair.public + "\n")
    # The secret is created 0600 from the start (no window where it is world-readable), then written.
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(secret_path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file keeps its old mode through O_CREAT; force it
        os.write(fd, (pair.secret + "\n").encode("ascii"))
    finally:
        os.close(fd)
    return public_path, secret_path


def read_key(path: str | os.PathLike) -> str:
    """A z85 key from a file written by this tool (or any file holding the 40 characters on its first line)."""
    text = Path(path).read_text().strip().splitlines()
    key = text[0].strip() if text else ""
    if len(key) != 40:
        raise ValueError(f"{path}: expected a 40-character z85 key on the first line, got {len(key)} characters")
    return key


def config_snippet(pair: KeyPair, name: str = "server") -> str:
    """How to use the pair: serve_config.yaml's ingress.curve (server pair) and a PolicyClient (robot pair)."""
    return f"""\
# As the SERVER's pair, in serve_config.yaml under applications[].args.ingress:
      curve:
        server_public_key: "{pair.public}"
        server_secret_key: "{pair.secret}"   # keep out of version control
        allowed_client_keys: null   # or a list of robot public keys; others are refused by ZMQ's handshake

# As a ROBOT's pair (list "{pair.public}" in allowed_client_keys), in the robot's code:
from clients import PolicyClient
client = PolicyClient(
    host="<server>", port=5555,
    server_public_key="<the server's public key>",
    client_keys=("{pair.public}", "{pair.secret}"),
)
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clients.keys", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="directory to write NAME.key and NAME.key_secret into (default: print only)")
    parser.add_argument("--name", default="server", help="file name stem (default: server)")
    parser.add_argument("--force", action="store_true", help="overwrite existing key files")
    parser.add_argument("--quiet", action="store_true", help="print the two keys only, no snippet")
    args = parser.parse_args(argv)
    try:
        pair = generate_keypair()
        written = write_keypair(pair, args.out, args.name, overwrite=args.force) if args.out else None
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"public_key: {pair.public}")
    print(f"secret_key: {pair.secret}")
    if written:
        print(f"wrote {written[0]} (public) and {written[1]} (secret, mode 0600)")
    if not args.quiet:
        print()
        print(config_snippet(pair, args.name), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
