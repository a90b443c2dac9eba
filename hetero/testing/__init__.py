"""Writers of small random checkpoints in exactly the published HF DeepSeek format, for tests."""

from __future__ import annotations

from hetero.testing.checkpoint import write_checkpoint, write_tiny_v2, write_tiny_v3
from hetero.testing.configs import tiny_v2_config, tiny_v3_config
from hetero.testing.index import write_v3_index
from hetero.testing.tokenizer import write_tokenizer
from hetero.testing.weights import fp8_block_dequantize, fp8_block_quantize, random_state_dict

__all__ = [
    "fp8_block_dequantize",
    "fp8_block_quantize",
    "random_state_dict",
    "tiny_v2_config",
    "tiny_v3_config",
    "write_checkpoint",
    "write_tiny_v2",
    "write_tiny_v3",
    "write_tokenizer",
    "write_v3_index",
]
