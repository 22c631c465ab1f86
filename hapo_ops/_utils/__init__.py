"""Small shared utilities of hapo-ops, private to the package.

``collectives`` (reductions over an optional process group), ``validation`` (argument
checks whose errors name the argument), ``segments`` (sums over groups without a Python
loop), ``selection`` (the k-th smallest value, exactly, also across ranks) and ``blocks``
(row-blocked CPU work spread over threads by whole blocks). They import
nothing else of hapo-ops.
"""
