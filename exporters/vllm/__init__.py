"""The vLLM exporter: ``export`` (``export_vllm``, the entry point registered in ``effideploy.exporters``),
``quant`` (compressed-tensors W8A8 / W4A16), ``checks`` (static checks and unquantized parity), ``quant_checks``
(parity of quantized exports), ``parity`` (the child process that runs stock vLLM) and ``schemes`` (the weight
schemes the search reads).

Empty on purpose: importing this package must not import vLLM, compressed-tensors or torch (importing vLLM takes
seconds and binds threads)."""
