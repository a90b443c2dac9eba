from hetero.model.batch import ForwardBatch, KVCache, PagedKVCache
from hetero.model.deepseek import Transformer

__all__ = ["ForwardBatch", "KVCache", "PagedKVCache", "Transformer"]
