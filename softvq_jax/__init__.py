"""softvq_jax: SoftVQ-VAE 1-D continuous image tokenizer in JAX/Flax NNX.

Public API: `load_tokenizer(path_or_hub_id) -> Tokenizer` with `encode` / `decode`, and its
pure-function form `tokenizer_functions(tok)` (params, encode, decode) for use inside a jitted,
sharded step;
`load_generator(path_or_hub_id) -> Generator` (SiT / DiT) with `velocity` / `sample` / `generate`.
"""
from softvq_jax.api import Tokenizer, TokenizerFunctions, load_tokenizer, tokenizer_functions
from softvq_jax.generator import Generator, load_generator

__version__ = "0.1.0"
__all__ = ["Tokenizer", "load_tokenizer", "TokenizerFunctions", "tokenizer_functions", "Generator",
           "load_generator", "__version__"]
