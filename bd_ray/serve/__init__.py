"""Ray Serve deployments and the OpenAI-compatible application builder (see ``app.build_app``).

Submodules: :mod:`.app` (builder), :mod:`.deployments` (``SpecEngine``, ``OpenAIIngress``),
:mod:`.protocol` (OpenAI request/response models), :mod:`.metrics` (Prometheus via Ray).
Kept import-light: nothing here imports Ray until a submodule is used.
"""
