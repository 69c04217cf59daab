"""xray-export: not built yet; its issue delivers the real command."""
import sys

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """xray-export (not built yet)."""
    print("xray-export: not built yet (see the export issue)", file=sys.stderr)
    sys.exit(2)
