"""One module per ``adasr`` subcommand (argparse only at import time)."""
