"""Fine-tune: recipes, the KD loss, datasets, distributed set-up, checkpoints, the run loop.

The public names are re-exported lazily by ``ghostify``; import the modules directly inside the package.
"""
