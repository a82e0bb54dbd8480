"""The BentoML service's logic: the served model, predictions, feedback and the HTTP routes.

``service.py`` at the project root only wires these together for ``bentoml serve``.
"""
