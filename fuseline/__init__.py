"""fuseline: bake LoRAs into SDXL templates ahead of time and serve them on RunPod serverless."""

__version__ = "0.1.0"
