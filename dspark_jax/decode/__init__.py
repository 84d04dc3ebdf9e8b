"""Decoding: sampling rules, plain autoregressive generation, and (later) the speculative loop."""
