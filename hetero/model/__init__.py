from hetero.model.batch import ForwardBatch, KVCache
from hetero.model.deepseek import Transformer

__all__ = ["ForwardBatch", "KVCache", "Transformer"]
