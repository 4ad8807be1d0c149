"""`python -m keyless.broker ...` runs the broker without the rest of the CLI."""
import argparse
import sys

from .main import add_arguments, run

parser = argparse.ArgumentParser(prog="keyless broker")
add_arguments(parser)
sys.exit(run(parser.parse_args()))
