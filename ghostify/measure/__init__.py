"""Measure: MACs and parameters, latency, accuracy and agreement, and the conversion report.

The public names are re-exported lazily by ``ghostify``; import the modules directly inside the package.
"""
