"""The library's borders: what it writes for the outside world and reads from it.

Exporting (`export`: one pipeline, a writer per format; `delta`: this library's format; `peft`: PEFT SHiRA and
Super-Tuning; `checks`: the checks they share; `export_target`: atomic output directories; `model_card`), reading
back (`apply`, `checkpoint`, `multi_delta`, `name_pattern`), evaluating (`evaluate`, lm-eval), and model
resolution (`models`, `gguf`). The top-level modules of the same names are aliases kept for old imports.
"""
