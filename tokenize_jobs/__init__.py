"""Ray Data jobs: corpus manifest -> decoded clips -> tokenizer actor pools -> Parquet token shards."""
