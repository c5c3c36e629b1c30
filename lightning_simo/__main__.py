"""``python -m lightning_simo`` is the ``lightning_simo`` command."""

from lightning_simo.cli import main

if __name__ == "__main__":
    main()
