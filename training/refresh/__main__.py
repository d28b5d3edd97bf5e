"""`python -m training.refresh`: the conductor (training/refresh/__init__.py)."""

from training.refresh import main

main()
