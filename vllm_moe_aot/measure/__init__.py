"""The measuring side: everything here only measures, nothing here runs inside vLLM.

``bench`` and ``tuner`` (the ``vllm-moe-aot bench`` / ``tune`` commands), ``timing`` (CUDA-graph
replay medians, floors), ``workload`` (problems and their byte/FLOP floors), ``reference`` (the
float64 reference and the correctness gate), ``model_config`` (a Hugging Face config -> the
per-rank layer) and ``peers`` (the kernels we compare with). The serving core (``runtime``,
``pipeline``, ``dispatch``, ``integration``) never imports this package.
"""
