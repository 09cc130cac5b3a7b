"""Trade-offs: per-layer sensitivity, ratio allocation under a budget, sweeps, their plots.

The public names are re-exported lazily by ``ghostify``; import the modules directly inside the package.
"""
