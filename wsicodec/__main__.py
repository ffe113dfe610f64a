"""``python -m wsicodec`` runs the CLI."""

from wsicodec.cli import entry

if __name__ == "__main__":
    entry()
