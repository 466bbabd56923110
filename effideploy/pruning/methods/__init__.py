"""Pruning methods: one small class each, looked up by name (``--method``)."""

from effideploy.registry import Registry

METHODS = Registry(
    "pruning method",
    {
        "cfsp": "effideploy.pruning.methods.cfsp:CFSP",
        "cfsp-reference": "effideploy.pruning.methods.cfsp_reference:CFSPReference",
        "wanda-sp": "effideploy.pruning.methods.wanda_sp:WandaSP",
        "mag-sp": "effideploy.pruning.methods.mag_sp:MagnitudeSP",
        "flap": "effideploy.pruning.methods.flap:FLAP",
        "uniform": "effideploy.pruning.methods.uniform:Uniform",
        "drop-blocks": "effideploy.pruning.methods.drop_blocks:DropBlocks",
        "drop-attention": "effideploy.pruning.methods.drop_attention:DropAttention",
        "cfsp-joint": "effideploy.pruning.methods.cfsp_joint:CFSPJoint",
    },
)
