"""The bundled search spaces: this folder installs as defect_tune.search_spaces (see pyproject.toml)."""
