"""Ray Serve deployments and the OpenAI-compatible application builder (see ``app.build_app``).

Submodules, one job each: :mod:`.app` (builder, deployment options), :mod:`.engine`
(``SpecEngine``: verifier + paired drafter per replica, request registry, streams),
:mod:`.ingress` (``OpenAIIngress``: routes, SSE, usage, error mapping), :mod:`.payload`
(OpenAI request -> ``EngineRequest``), :mod:`.resilience` (surviving engine replica deaths),
:mod:`.protocol` (OpenAI request models, errors, ``EngineRequest``), :mod:`.metrics`
(Prometheus via Ray). Kept import-light: nothing here imports Ray until a submodule is used.
"""
