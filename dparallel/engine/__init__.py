"""The engine: decoding rules, the decoding loop over a masked canvas, its caches, and the pipeline that loads a
model (with its components) and decodes prompts."""
