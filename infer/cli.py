"""xray-infer: not built yet; its issue delivers the real command."""
import sys

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """xray-infer (not built yet)."""
    print("xray-infer: not built yet (see the infer issue)", file=sys.stderr)
    sys.exit(2)
