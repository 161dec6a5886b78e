"""The shipped presets: one YAML file per named config (``hdebm-ray presets`` lists them)."""
