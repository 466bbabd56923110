"""Recipe search (``effideploy tune``): for one dense model and one runtime, the fastest recipe (pruning x weight
quantization x KV budget ...) that passes a sign-off policy, with the evidence. See docs/search.md."""
