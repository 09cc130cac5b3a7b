"""Convert: trace the model, plan one decision per conv, rewrite the graph, fold channel orders.

``tracing`` -> ``plan`` -> ``rewrite`` (the ``convert`` pass, which runs :mod:`ghostify.init`) -> ``fold``.

The public names are re-exported lazily by ``ghostify``; import the modules directly inside the package.
"""
