"""`python -m keyface` = the `keyface` console script."""

from keyface.cli import main

if __name__ == "__main__":
    main(prog_name="keyface")
