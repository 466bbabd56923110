"""The llama.cpp exporter: ``export`` (``export_llamacpp``, the entry point registered in ``effideploy.exporters``),
``gguf`` (the float32 GGUF writer and reader), ``checks`` (parity through the llamacpp runtime) and ``schemes``
(the GGUF weight schemes the search reads).

Empty on purpose: importing this package must not import llama_cpp, gguf or torch."""
