"""haoyuan's benchmarks beyond the engine's own (``benchmarks/engine_bench.py``) and the
API's (``benchmarks/http_bench.py``): ``peers`` (the release spike vs the relational
design) and ``peking`` (the Peking-scale release morning). Each exposes an
async ``run_*(quick: bool) -> dict``; ``haoyuan bench peers|peking`` runs
them. Figures and methodology: ``benchmarks/README.md``.
"""
