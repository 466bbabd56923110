"""Weight quantization shared by the exporters: GPTQ (``gptq``) and the per-linear input second moments it reads,
collected in the pruning's own calibration pass (``hessians``)."""
