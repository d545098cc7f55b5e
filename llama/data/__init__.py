"""Training data, prepared once: text or chat jsonl tokenized into uint32 shards (prepare.py).

    python -m llama.data prepare my_corpus/ --out data/ --tokenizer tokenizer.model

llama/train/batches.py reads the shards through memmap.
"""
