"""Models and data by name: torchvision and checkpoints, the reference CNNs, data sources.

The public names are re-exported lazily by ``ghostify``; import the modules directly inside the package.
"""
