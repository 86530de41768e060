"""The systems under test, one module per system; ``bench/run.py`` wires them up."""
