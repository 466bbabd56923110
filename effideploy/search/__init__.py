"""Recipe search (``effideploy tune``): for one dense model and one runtime, the fastest recipe (pruning x weight
quantization x KV budget ...) that passes a sign-off policy, with the evidence. See docs/search.md."""

# The lever registry before any lever module: effideploy.search.recovery_lever subclasses its Lever, and levers.py
# registers that lever, so whichever of the two is imported first, levers.py must run first.
from effideploy.search import levers as _levers  # noqa: E402,F401
