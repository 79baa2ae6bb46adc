"""The model: what is read from a transformers config (spec.py), rotary tables (rope.py), the fused
projections (linear.py), the LLaMA-family decoder on the ops (decoder.py) and the nn.Module that
optimize() returns (optimized.py)."""
