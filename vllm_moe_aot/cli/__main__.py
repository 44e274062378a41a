"""``python -m vllm_moe_aot.cli``: the ``vllm-moe-aot`` command without the installed script."""

from vllm_moe_aot.cli import main

raise SystemExit(main())
