"""Model families (one folder each: ``clip/``), the interface they give the rest of glajax
(``family``), their registry (``registry``), the shared transformer layers (``layers``),
checkpoint reading and exports (``checkpoints``), the tokenizer wrapper and the heads."""
