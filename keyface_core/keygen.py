"""`python -m keyface_core.keygen NAME [--dir DIR]`: write a new 256-bit key file (mode 600)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import KeyFaceError
from .keys import KEY_FILE_SUFFIX, write_key_file


def default_keys_dir() -> Path:
    """$KEYFACE_KEYS_DIR, else ComfyUI/models/keyface_keys when the pack sits in custom_nodes, else ./keys."""
    if os.environ.get("KEYFACE_KEYS_DIR"):
        return Path(os.environ["KEYFACE_KEYS_DIR"])
    pack = Path(__file__).resolve().parents[1]
    if pack.parent.name == "custom_nodes":
        return pack.parent.parent / "models" / "keyface_keys"
    return Path.cwd() / "keys"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keyface_core.keygen", description=__doc__)
    parser.add_argument("name", help="key name; the file is NAME.key")
    parser.add_argument("--dir", type=Path, default=None, help="folder for the key (default: %(default)s → see docs)")
    args = parser.parse_args(argv)
    name = args.name if args.name.endswith(KEY_FILE_SUFFIX) else args.name + KEY_FILE_SUFFIX
    if Path(name).name != name:
        parser.error("NAME must be a plain file name, not a path; use --dir for the folder")
    folder = args.dir or default_keys_dir()
    try:
        path = write_key_file(folder / name)
    except KeyFaceError as err:
        print(f"keygen: {err}", file=sys.stderr)
        return 1
    print(f"wrote {path} (owner-only). Back it up: without it, images anonymized with it cannot be restored.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
