"""The ONNX Runtime exporter: ``export`` (``export_onnx``, the entry point registered in ``effideploy.exporters``),
``graph`` (the decoder-step graph), ``quant`` (MatMulNBits weight quantization and the stored-weight accounting),
``gptq`` (GPTQ from kept statistics), ``checks`` (parity) and ``schemes`` (the weight schemes the search reads).

Empty on purpose: importing this package must not import onnx, onnxruntime or torch (the registry and the scheme
declarations are looked up without them)."""
