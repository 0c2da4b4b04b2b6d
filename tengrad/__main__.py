"""``python -m tengrad ...`` (and ``torchrun ... -m tengrad demo --distributed``): the ``tengrad`` CLI."""
from tengrad.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
