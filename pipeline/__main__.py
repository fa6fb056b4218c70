"""``python -m pipeline`` (and ``torchrun -m pipeline``): the ``distill`` command."""

from pipeline.cli import main

if __name__ == "__main__":
    main(prog_name="distill")
