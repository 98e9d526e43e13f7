"""epmq-jax: post-merge quantization for JAX/Flax.

Merge expert models (``epmq_jax.merge``), then quantize the merged model to low bit
(``epmq_jax.quant``: RTN, GPTQ, AWQ; ``epmq_jax.calib``: E-PMQ and the sequential driver),
run it packed (``epmq_jax.nn``) and save it (``epmq_jax.checkpoint``).
"""

__version__ = "0.1.0"
