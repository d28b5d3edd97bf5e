"""Push a saved weights or model folder to the Hugging Face Hub, in one commit.

    python -m training.push runs/stage2/weights OWNER/NAME [--private]

Training scripts push by themselves with `--push-to-hub OWNER/NAME`; this command pushes any folder
that is already saved (for instance after a failed upload). Log in first with `hf auth login`, or
set HF_TOKEN. The folder is read, never changed.
"""

from __future__ import annotations

import sys
from pathlib import Path

from inference.cli import ArgumentParser, UsageError, command
from inference.hub import parse_reference
from training.hub_upload import PublishError, push_folder


@command
def main(argv: list[str] | None = None) -> str:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("folder", type=Path, help="a saved weights folder or transformers model folder")
    parser.add_argument("repo_id", help="Hub model repo, OWNER/NAME (created if it does not exist)")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--message", help="commit message")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        raise UsageError(f"{args.folder} is not a folder")
    if parse_reference(args.repo_id) is None or "@" in args.repo_id:
        raise UsageError(f"{args.repo_id!r} is not a Hub repo id (expected OWNER/NAME)")
    try:
        return push_folder(args.folder, args.repo_id, args.private, args.message)
    except PublishError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
