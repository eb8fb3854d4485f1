"""The catalog: the parsed, validated `templates.json` (version 1) shared by the build stages and the worker.

    problems.py   Problem, CatalogError, JSON paths
    sources.py    source strings (civitai:, hf:, https://, s3://, file:)
    model.py      the pydantic model (Catalog, Template, Defaults, ...) and its per-entry checks
    loading.py    parse_catalog / load_catalog: every problem at once, located, in file order

Only pydantic and the standard library here: the worker image and every DVC stage read the catalog, and
neither should pay for torch, diffusers or DVC to read a JSON file.
"""
