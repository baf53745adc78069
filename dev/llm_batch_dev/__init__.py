"""Development tooling: the embedded stack, the LLM simulator, the benchmark and the demo.

Installed by the dev setup only (`make venv`); nothing in the runtime packages imports it.
"""
