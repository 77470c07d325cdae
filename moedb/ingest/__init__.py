"""Files into passages (paragraph-aware chunks of .txt/.md, one document per .jsonl line)."""
