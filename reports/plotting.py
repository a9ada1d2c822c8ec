"""matplotlib (on the file-only Agg backend) and seaborn, imported when a figure is drawn.

Importing them takes a second or more, which every ``defbench`` command would otherwise pay at start-up
whether or not it draws anything.
"""
from __future__ import annotations


def pyplot_and_seaborn():
    """``(matplotlib.pyplot, seaborn)``, with matplotlib on the Agg backend (figures go to files, never a window)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns
    return plt, sns
