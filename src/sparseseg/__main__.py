"""`python -m sparseseg ...` is the same as the `sparseseg` console script (and what torchrun launches)."""

from sparseseg.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
