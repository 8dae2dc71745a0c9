"""`python -m train [--config FILE] [--part.field=value ...]`; see train/config.py."""

import sys

from train.checkpoint import CheckpointError
from train.config import ConfigError, help_text, parse_args
from train.data import DataError
from train.trainer import NonFiniteLoss, run


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(help_text())
        return 0
    try:
        run(parse_args(argv))
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
