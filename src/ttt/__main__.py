"""``python -m ttt ...``: the command line (also ``torchrun -m ttt train ...``)."""

from ttt.cli import main

main()
