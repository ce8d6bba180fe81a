"""The ``fastcm`` command."""
import argparse
import sys

import fastcm


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastcm", description="fastcm: fast, exact, tested consistency models.")
    parser.add_argument("--version", action="version", version=f"fastcm {fastcm.__version__}")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    parser.parse_args(argv)
    print(f"fastcm {fastcm.__version__}")
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
