"""Examples that use LAS-AT from outside its packages (``examples/custom_agent.py``).

This file makes ``examples`` a regular package, so ``agent._target_=examples.custom_agent.X``
resolves to this folder even if some installed distribution ships a top-level ``examples``.
"""
