"""Small shared utilities of hapo-ops, private to the package.

``collectives`` (reductions over an optional process group), ``validation`` (argument
checks whose errors name the argument), ``segments`` (sums over groups without a Python
loop) and ``selection`` (the k-th smallest value, exactly, also across ranks). They import
nothing else of hapo-ops.
"""
