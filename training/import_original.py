"""Import the original project's published checkpoint as a weights folder of this project.

    python -m training.import_original                          # download (again) from the original Space
    python -m training.import_original --checkpoint COPY --out weights-original

What it does and why is `inference.original`'s docstring; `app.py` calls the same function when it has
nothing else to serve.
"""

from __future__ import annotations

from pathlib import Path

from inference.cli import ArgumentParser, command
from inference.original import DEFAULT_FOLDER, import_original, original_weights


@command
def main(argv: list[str] | None = None) -> Path:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", type=Path, help="a local copy of the Space (default: download it)")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_FOLDER, help="weights folder to write (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    refreshed = args.checkpoint is None  # downloads the Space's current files, saying if they changed
    folder = original_weights(args.out, refresh=True) if refreshed else import_original(args.checkpoint, args.out)
    print(f"imported the original checkpoint into {folder}; serve it with: python app.py --weights {folder}")
    return folder


if __name__ == "__main__":
    main()
