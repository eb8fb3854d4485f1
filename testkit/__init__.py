"""Offline test kit: tiny SDXL-shaped models, LoRAs, tokenizers and local servers built from configs.

Used by the test suite and by `make demo`; nothing here reaches a model hub.
"""
